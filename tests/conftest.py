"""Shared fixtures: a real gateway on an ephemeral 127.0.0.1 port, a fake clock, real clients.

The gateway runs in the test's event loop (uvicorn on a real socket) so tests can
drive its clock (`FakeClock.advance`) and inspect its registry, while every
request still crosses a real WebSocket. Tests that need a separate process (signals,
SIGKILL, several processes) use `gateway_process`.
"""

from __future__ import annotations

import asyncio
import os
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import blockbuster.blockbuster as bb_module
import pytest
import redis.asyncio as aioredis
from blockbuster import BlockBuster, BlockingError, blockbuster_ctx

from clawgate.client import Client
from clawgate.server.gateway import Gateway
from clawgate.server.serve import RunningGateway
from clawgate.settings import Settings, parse_settings
from clawgate.state.clock import FakeClock
from clawgate.testing import GatewayProcess

REDIS_URL = os.environ.get("CLAWGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


# Where a blocking call on the event loop is allowed: (file, functions of that file under whose
# call any blocking call may happen). Each is legitimate and says why.
ALLOWED_BLOCKING: list[tuple[str, set[str]]] = [
    # Starting and stopping a gateway (state dir, opening and closing the store, the final
    # flush) happens before it serves and after it has stopped serving: it delays no request.
    ("clawgate/server/gateway.py", {"__init__", "start", "stop"}),
    ("clawgate/server/serve.py", {"__aenter__", "stop"}),  # also builds the app, reads the UI files
    ("clawgate/store/sqlite.py", {"open", "close"}),  # the store tests open stores without a gateway
    ("clawgate/store/redis_store.py", {"open", "close"}),
    # redis-py reads its own version from the package metadata for each new connection (a few
    # stat calls of sys.path entries).
    ("redis/utils.py", {"get_lib_version"}),
    # The JSONL ended-hook is made when a gateway is built (creates the log's directory) and
    # closed when it stops (joins its writer thread); tests also use one directly.
    ("clawgate/subagents/hooks.py", {"__init__", "close"}),
    # A module imported on first use (the MCP client, lazily to keep the gateway's start lean):
    # once per process.
    ("<frozen importlib._bootstrap>", {"_find_and_load"}),
    # structlog's unconfigured default (a test process that imported structlog and rich before
    # pytest, as scripts/mutate.py does) renders a logged exception with rich, which looks up
    # each frame's file. Test-process logging, not the gateway's: `clawgate gateway` configures
    # a plain or JSON renderer (clawgate/logs.py), and rich only for a person at a terminal.
    ("rich/traceback.py", {"_render_stack"}),
]


@pytest.fixture(autouse=True)
def blockbuster(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[BlockBuster | None]:
    """Fail a test whose event loop makes a blocking call (file or socket I/O, sleep, SQLite, a
    lock wait) in clawgate code, as aiohttp's own tests do. The gateway may swallow the error
    (a background task that logs it, a handler that answers INTERNAL), so every BlockingError
    raised is also recorded here and reported at teardown."""
    if request.node.get_closest_marker("slow") is not None:
        # The soak tests measure time and memory at scale, which the guard's checks distort;
        # the regular tests cover the same code paths.
        yield None
        return
    seen: list[str] = []

    class RecordedBlockingError(BlockingError):
        def __init__(self, func: str) -> None:
            seen.append(f"{func} from:\n{''.join(traceback.format_stack(limit=14)[:-1])}")
            super().__init__(func)

    monkeypatch.setattr(bb_module, "BlockingError", RecordedBlockingError)
    # The guard is for the gateway's event loop: clawgate.testing (process helpers), the CLI and
    # the batch and bench engines (clients of their own, run in-process by some tests) are not scanned.
    excluded = ["clawgate.testing", "clawgate.cli", "clawgate.batch", "clawgate.bench"]
    with blockbuster_ctx("clawgate", excluded_modules=excluded) as bb:
        for filename, functions in ALLOWED_BLOCKING:
            for function in bb.functions.values():
                function.can_block_in(filename, functions)
        yield bb
    if seen:
        pytest.fail("blocking calls on the event loop:\n\n" + "\n\n".join(seen), pytrace=False)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "port": 0,
        "log_level": "warning",
        # Retries of a failed provider turn do not back off on the fake clock unless a test asks
        # for it (tests/test_provider_faults.py does, and advances the clock).
        "provider_retry_base_s": 0,
        # Agent ids the session keys of the tests use: an unconfigured agent is refused.
        "agents": {agent: {} for agent in ("main", "alpha", "beta", "ops", "other", "helper")},
    }
    base.update(overrides)
    return parse_settings(base)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start_gateway(tmp_path: Path, clock: FakeClock) -> AsyncIterator[GatewayFactory]:
    """Start gateways (stopped at teardown). Keyword args override settings."""
    running: list[RunningGateway] = []

    async def factory(*, use_clock: FakeClock | None = None, **overrides: Any) -> RunningGateway:
        settings = make_settings(tmp_path, **overrides)
        rg = RunningGateway(Gateway(settings, clock=use_clock or clock))
        await rg.__aenter__()
        running.append(rg)
        return rg

    yield factory
    for rg in reversed(running):
        await rg.stop()


@pytest.fixture
async def gateway(start_gateway: GatewayFactory) -> RunningGateway:
    return await start_gateway()


@pytest.fixture
async def client(gateway: RunningGateway) -> AsyncIterator[Client]:
    async with Client(gateway.url, max_reconnect_attempts=0) as c:
        yield c


async def settle(gw: Gateway, *, timeout: float = 20.0) -> None:
    """Wait (bounded) until no run is queued or running and no subagent pipeline is in flight."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if (
            gw.runs.running == 0
            and gw.runs.queued == 0
            and len(gw.runs.active) == 0
            and not gw.subagents.tasks
        ):
            await gw.store.flush()
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"gateway did not settle: {gw.registry.sizes()}")


GatewayProcessFactory = Callable[..., GatewayProcess]


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[GatewayProcessFactory]:
    """Gateway subprocesses, not yet started (`.start()`, or `await .astart()` in a coroutine),
    killed at teardown. Keyword args go to `GatewayProcess`; without `state_dir` each gets its
    own, and its log lies beside it in tmp_path."""
    made: list[GatewayProcess] = []

    def factory(state_dir: Path | None = None, **kw: Any) -> GatewayProcess:
        state = state_dir or tmp_path / f"gw{len(made)}"
        kw.setdefault("log_path", tmp_path / f"{state.name}-{len(made)}.log")
        made.append(GatewayProcess(state, **kw))
        return made[-1]

    yield factory
    for gp in made:
        gp.kill()


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A Redis URL with a private key prefix; skips when no server answers."""
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:  # pragma: no cover - depends on the machine
        await client.aclose()
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    await client.aclose()
    yield REDIS_URL


def unique_prefix() -> str:
    return f"cgtest:{uuid.uuid4().hex[:10]}"
