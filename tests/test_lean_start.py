"""A plain `clawgate gateway` (SQLite, scripted provider) does not import what it does not use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from clawgate.testing import clean_env
from helpers import HEAVY

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


def test_plain_gateway_imports_no_heavy_module(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "state")],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=True,
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "clawgate" in loaded and "starlette" in loaded  # the probe really built a gateway
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
