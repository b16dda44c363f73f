# One entry point per job. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
REDIS_PORT ?= 6379
export CLAWGATE_TEST_REDIS_URL ?= redis://127.0.0.1:$(REDIS_PORT)/0

.PHONY: demo test lint fmt bench soak compat compat-setup redis browser clean venv mutation

$(BIN)/activate: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/activate

venv: $(BIN)/activate

demo: venv
	$(BIN)/python -m clawgate.cli.demo

## Start redis-server on REDIS_PORT when nothing answers there and the binary exists.
redis:
	@if $(BIN)/python scripts/redis_ping.py $(REDIS_PORT); then \
	  echo "redis answers on 127.0.0.1:$(REDIS_PORT)"; \
	elif command -v redis-server >/dev/null 2>&1; then \
	  redis-server --daemonize yes --bind 127.0.0.1 --port $(REDIS_PORT) --save "" --appendonly no \
	    --logfile /tmp/clawgate-test-redis-$(REDIS_PORT).log && sleep 0.5 && \
	  $(BIN)/python scripts/redis_ping.py $(REDIS_PORT) && echo "started redis-server on $(REDIS_PORT)"; \
	else \
	  echo "no redis-server binary: Redis tests will be skipped"; \
	fi

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: venv
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

## The real-client tests (OpenClaw CLI and terminal UI) run in `make test` and never skip:
## compat-setup installs what they need once (cached outside the repo, idempotent), and
## CLAWGATE_COMPAT=1 turns a missing piece into a failure. `make test CLAWGATE_COMPAT=0`
## runs without them (they skip, with the reason).
export CLAWGATE_COMPAT ?= 1

compat-setup:
	@if [ "$(CLAWGATE_COMPAT)" = "1" ]; then bash scripts/compat-setup.sh >/dev/null; fi

## Debian's chromium for the dashboard's browser tests (installed when missing and run as root).
browser:
	bash scripts/browser-setup.sh

## asyncio debug mode is on for the suite (any non-empty PYTHONASYNCIODEBUG turns it on):
## never-awaited coroutines and slow callbacks show up as failures or log lines.
test: venv redis browser lint compat-setup
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest -q -p no:cacheprovider

## Mutation testing of the bounded-state core against its unit tests (slow: not part of `test`).
## MUTATION_ARGS="--module ttlmap" limits it to one module; see docs/mutation.md.
mutation: venv
	$(BIN)/python scripts/mutate.py $(MUTATION_ARGS)

bench: venv
	$(BIN)/python benchmarks/runs_throughput.py

soak: venv
	$(BIN)/clawgate bench soak

compat: venv
	bash scripts/compat-setup.sh
	CLAWGATE_COMPAT=1 $(BIN)/pytest -q -p no:cacheprovider -m compat

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
