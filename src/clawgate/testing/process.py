"""A `clawgate gateway` subprocess on a free loopback port, for tests, benchmarks and the soak.

Rules built in, because each was a bug in an earlier copy of this helper:
- the process's output goes to a log file, never to a pipe nobody drains (a full pipe blocks
  the gateway);
- the environment is cleaned of the machine's `CLAWGATE_*` variables;
- readiness is one probe, `GET /healthz`;
- every failure message carries the tail of the log.

One object is one port, one state dir and one log: `start()` again after `kill()` restarts the
gateway in place (the crash tests do), appending to the same log.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any CLAWGATE_* variable of the machine running the tests, and
    without the test run's asyncio debug mode: a CLI under test answers on stderr, where debug
    mode's slow-callback lines (frequent on a loaded machine) would mix into its JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAWGATE_") and k != "PYTHONASYNCIODEBUG"}
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"  # rich wraps stderr messages at the terminal width
    env.update(extra)
    return env


class GatewayProcess:
    """`python -m clawgate gateway` with `settings` as `--set NAME=VALUE` flags."""

    def __init__(
        self,
        state_dir: Path,
        *,
        settings: Mapping[str, object] | None = None,
        args: Sequence[str] = (),
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.port = port or free_port()
        self.settings = dict(settings or {})
        self.args = list(args)
        self.env = dict(env) if env is not None else clean_env()
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="clawgate-gw-")) / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "gateway not started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "clawgate",
            "gateway",
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state_dir),
        ]
        for name, value in self.settings.items():
            cmd += ["--set", f"{name}={value}"]
        return [*cmd, *self.args]

    def log(self, tail: int | None = 4000) -> str:
        """The last `tail` characters of the log (all of it with None)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text if tail is None else text[-tail:]

    def spawn(self) -> None:
        """Start the process and return at once; `ready()` / `aready()` wait for it."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def _probe(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.http_url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def _not_ready(self, timeout_s: float) -> AssertionError:
        self.kill()
        return AssertionError(f"gateway did not become healthy in {timeout_s} s:\n{self.log()}")

    def ready(self, timeout_s: float = 60.0, *, poll_s: float = 0.05) -> GatewayProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._probe():
                return self
            time.sleep(poll_s)
        raise self._not_ready(timeout_s)

    async def aready(self, timeout_s: float = 60.0, *, poll_s: float = 0.05) -> GatewayProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self._probe):
                return self
            await asyncio.sleep(poll_s)
        raise self._not_ready(timeout_s)

    def start(self, timeout_s: float = 60.0, *, poll_s: float = 0.05) -> GatewayProcess:
        self.spawn()
        return self.ready(timeout_s, poll_s=poll_s)

    async def astart(self, timeout_s: float = 60.0) -> GatewayProcess:
        self.spawn()
        return await self.aready(timeout_s)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def terminate(self) -> None:
        """SIGTERM without waiting (a stopped, SIGSTOPped, process is continued first)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> tuple[int, str]:
        """SIGTERM (graceful: drain, flush, exit 0); returns (exit code, whole log)."""
        if self.proc is None:
            return 0, self.log(None)
        self.terminate()
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"gateway did not stop in {timeout_s} s:\n{self.log()}") from None
        return rc, self.log(None)

    async def astop(self, timeout_s: float = 30.0) -> tuple[int, str]:
        return await asyncio.to_thread(self.stop, timeout_s)

    def kill(self) -> None:
        """SIGKILL (no goodbye) and reap; the object can `start()` again."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    async def __aenter__(self) -> GatewayProcess:
        return await self.astart()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.kill)


async def astart_all(gateways: Iterable[GatewayProcess], timeout_s: float = 60.0) -> None:
    """Spawn every gateway, then wait for each: they start side by side."""
    started = list(gateways)
    for gp in started:
        gp.spawn()
    for gp in started:
        await gp.aready(timeout_s)


def stop_all(gateways: Iterable[GatewayProcess], timeout_s: float = 30.0) -> None:
    """SIGTERM every gateway, then wait for each: they drain side by side."""
    running = list(gateways)
    for gp in running:
        gp.terminate()
    hung: list[AssertionError] = []
    for gp in running:
        try:
            gp.stop(timeout_s)
        except AssertionError as exc:  # killed; the others are still stopped before it is raised
            hung.append(exc)
    if hung:
        raise hung[0]
