"""A plain `clawgate gateway` (SQLite, scripted provider) does not import what it does not use,
and neither does the CLI's help (click only: no typer, no pydantic)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from clawgate.testing import clean_env
from helpers import HEAVY

# Also in HEAVY; named here so that a failure says what this guard is about.
NOT_THE_CLI = {"typer", "pydantic", "pydantic_core", "pydantic_settings"}

PROBE = """
import json, sys
from clawgate.cli import main  # the CLI entry point, as `clawgate gateway` loads it
from clawgate.server.app import create_app
from clawgate.server.gateway import Gateway
from clawgate.settings import load_settings

settings = load_settings(state_dir=sys.argv[1], store="sqlite", provider="scripted")
create_app(Gateway(settings))
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def _modules_loaded_by(probe: str, arg: str) -> set[str]:
    """The top-level modules a fresh interpreter has loaded after running `probe`."""
    out = subprocess.run(
        [sys.executable, "-c", probe, arg],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_plain_gateway_imports_no_heavy_module(tmp_path: Path) -> None:
    loaded = _modules_loaded_by(PROBE, str(tmp_path / "state"))
    assert "clawgate" in loaded and "starlette" in loaded  # the probe really built a gateway
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
    # The CLI is click, which uvicorn imports anyway; typer imported pydantic (about 9 MB).
    assert "click" in loaded
    assert loaded.isdisjoint(NOT_THE_CLI), sorted(loaded & NOT_THE_CLI)


# Every command's --help, in one process, through click's test runner.
HELP_PROBE = """
import json, sys
from click.testing import CliRunner
from clawgate.cli.main import app

runner = CliRunner()
for args in json.loads(sys.argv[1]):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, (args, result.output)
    assert "Usage: clawgate" in result.output, (args, result.output)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""
COMMANDS = [
    [],
    ["gateway"],
    ["status"],
    ["call"],
    ["batch"],
    ["bench"],
    ["bench", "soak"],
    ["cron"],
    ["cron", "add"],
    ["cron", "list"],
    ["cron", "rm"],
    ["cron", "run"],
    ["cron", "runs"],
]


def test_cli_help_imports_no_heavy_module() -> None:
    loaded = _modules_loaded_by(HELP_PROBE, json.dumps(COMMANDS))
    assert "click" in loaded and "clawgate" in loaded
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
    assert loaded.isdisjoint(NOT_THE_CLI), sorted(loaded & NOT_THE_CLI)
