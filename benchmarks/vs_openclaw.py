"""clawgate and the real OpenClaw gateway on one mock LLM: the same batch through both.

Starts `benchmarks/mock_llm.py` (an OpenAI-compatible chat completions server,
streamed, `--latency-ms` before each answer, a `sessions_spawn` tool call when the
message carries `[[spawn]]`), then, one system at a time:

* clawgate: `python -m clawgate.cli.main gateway --provider openai` with
  `openai_base_url` pointing at the mock (SQLite store, a temporary state dir);
* OpenClaw: `openclaw gateway run` from the `make compat` install (Node 24,
  `openclaw@2026.9.6`, `scripts/compat-setup.sh`), with a temporary HOME, state dir and
  config file that registers the mock as an `openai-completions` provider and makes
  it the default model; token auth on loopback.

Both are driven by the same client (`clawgate.client.Client`, which speaks the
OpenClaw gateway protocol; it connects as client id `cli`, token auth, no device
identity, as `openclaw gateway call --url ws://127.0.0.1:... --token` does): N `agent`
runs, each in its own session, `--concurrency` in flight, each awaited to its final
answer. Two batches per system: plain (one LLM answer per run) and with spawns (the
parent calls `sessions_spawn`, the child answers, the parent answers).

Reported per system and batch: runs/s (N over the time from the first request to the
later of the last final answer and the last LLM call the mock served, so subagent work
that outlives the parent's final answer is counted), latency percentiles of the final
answer, LLM calls per run (counted by the mock), LLM calls/s (runs/s per LLM call: the
systems make different numbers of calls per run, OpenClaw a fourth to announce a
subagent's result), the gateway's start time (spawn to the first successful `health`
call over the WebSocket), the CPU time (user + system) the gateway and its child
processes used per batch, per run and per LLM call (on a shared machine the figure that
depends least on the load), and its
RSS (the process and all its children) before the batches, the peak during them
(sampled every 100 ms) and after `--idle-s` seconds of idle at the end.

    bash scripts/compat-setup.sh                      # once: Node 24 + openclaw into the cache
    .venv/bin/python benchmarks/vs_openclaw.py        # N = 200
    .venv/bin/python benchmarks/vs_openclaw.py --runs 1000 --concurrency 16
    .venv/bin/python benchmarks/vs_openclaw.py --systems clawgate

Writes benchmarks/out/vs_openclaw.json. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from clawgate.client import Client, ClientError

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
CACHE = Path(os.environ.get("CLAWGATE_COMPAT_CACHE") or Path.home() / ".cache" / "clawgate-compat")
OPENCLAW = CACHE / "bin" / "openclaw"
TOKEN = "bench-token-4b1d"
MODEL = "mock-model"
START_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 300.0
QUIET_S = 3.0  # the mock served no call for this long: the batch's work is over


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def tree_cpu_s(proc: psutil.Process) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    return total


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and all its descendants (OpenClaw runs child processes)."""
    total = 0
    with contextlib.suppress(psutil.Error):
        total += proc.memory_info().rss
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
    return total


class PeakSampler:
    """Samples the tree RSS every 100 ms in a thread; `peak` is the highest seen."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.peak = tree_rss(proc)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, tree_rss(self.proc))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# -- the mock LLM ------------------------------------------------------------------------------


class Mock:
    def __init__(self, port: int, latency_ms: float, log: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            str(ROOT / "mock_llm.py"),
            "--port",
            str(port),
            "--latency-ms",
            str(latency_ms),
        ]
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"mock LLM exited (rc {self.proc.returncode}); see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/stats", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise SystemExit("mock LLM did not start within 60 s")

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.base}/stats", timeout=10).json()
        return data

    def reset(self) -> None:
        httpx.post(f"{self.base}/reset", timeout=10)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- the two gateways --------------------------------------------------------------------------


@dataclass
class Gateway:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    started_at: float
    client_id: str = "cli"
    extra_env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_clawgate(port: int, mock_base: str, root: Path) -> Gateway:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAWGATE_")}
    cmd = [sys.executable, "-m", "clawgate.cli.main", "gateway", "--port", str(port), "--token", TOKEN]
    cmd += ["--state-dir", str(root / "state"), "--provider", "openai", "--log-level", "warning"]
    cmd += ["--set", f"openai_base_url={mock_base}/v1", "--set", f"openai_model={MODEL}"]
    log = root / "clawgate.log"
    started = time.perf_counter()
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return Gateway("clawgate", f"ws://127.0.0.1:{port}/", proc, started)


def openclaw_config(port: int, mock_base: str) -> dict[str, Any]:
    model = {
        "id": MODEL,
        "name": "Mock",
        "reasoning": False,
        "input": ["text"],
        "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
        "contextWindow": 128000,
        "maxTokens": 4096,
    }
    provider = {
        "baseUrl": f"{mock_base}/v1",
        "apiKey": "sk-mock",
        "api": "openai-completions",
        "models": [model],
    }
    return {
        "gateway": {
            "mode": "local",
            "port": port,
            "bind": "loopback",
            "auth": {"mode": "token", "token": TOKEN},
        },
        "models": {"mode": "replace", "providers": {"mock": provider}},
        "agents": {"defaults": {"model": {"primary": f"mock/{MODEL}"}}},
        # Tool Search (on by default) puts `sessions_spawn` behind `tool_search`/`tool_call`;
        # off, the model is offered the tool directly, as clawgate offers it.
        "tools": {"toolSearch": False},
    }


def start_openclaw(port: int, mock_base: str, root: Path) -> Gateway:
    if not OPENCLAW.is_file():
        raise SystemExit(f"{OPENCLAW} is missing: run `bash scripts/compat-setup.sh` (make compat) first")
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    config = root / "openclaw.json"
    config.write_text(json.dumps(openclaw_config(port, mock_base), indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCLAW_")}
    env.update(
        HOME=str(home),
        OPENCLAW_STATE_DIR=str(root / "openclaw-state"),
        OPENCLAW_CONFIG_PATH=str(config),
        NO_COLOR="1",
    )
    log = root / "openclaw.log"
    started = time.perf_counter()
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [str(OPENCLAW), "gateway", "run", "--port", str(port)],
            cwd=root,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Gateway("openclaw", f"ws://127.0.0.1:{port}", proc, started)


async def wait_ready(gw: Gateway) -> float:
    """Seconds from the spawn to the first successful `health` call over the WebSocket."""
    deadline = gw.started_at + START_TIMEOUT_S
    while time.perf_counter() < deadline:
        if gw.proc.poll() is not None:
            raise SystemExit(f"{gw.name} exited early (rc {gw.proc.returncode})")
        client = Client(
            gw.url, token=TOKEN, client_id=gw.client_id, max_reconnect_attempts=0, keep_events=False
        )
        try:
            await client.connect()
            await asyncio.wait_for(client.call("health", {}), 30)
            return time.perf_counter() - gw.started_at
        except (ClientError, OSError, TimeoutError):
            await asyncio.sleep(0.1)
        finally:
            await client.close()
    raise SystemExit(f"{gw.name}: no answer to `health` within {START_TIMEOUT_S:.0f} s")


# -- the batch ---------------------------------------------------------------------------------


async def drive(
    gw: Gateway, mock: Mock, *, runs: int, concurrency: int, spawn: bool, tag: str
) -> dict[str, Any]:
    mock.reset()
    clients = [Client(gw.url, token=TOKEN, client_id=gw.client_id, keep_events=False) for _ in range(4)]
    for c in clients:
        await c.connect()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    counter = iter(range(runs))
    message = "benchmark run [[spawn]]" if spawn else "benchmark run"

    async def worker(client: Client) -> None:
        for i in counter:
            key = f"{tag}-{i}-{uuid.uuid4().hex[:6]}"
            sent = time.perf_counter()
            try:
                final = await client.run_agent(
                    message,
                    session_key=f"agent:main:{key}",
                    idempotency_key=key,
                    timeout=RUN_TIMEOUT_S,
                )
                status = str(final.get("status"))
            except ClientError as exc:
                status = exc.code
                if len(errors) < 5:
                    errors.append(str(exc))
            latencies.append(time.perf_counter() - sent)
            statuses[status] = statuses.get(status, 0) + 1

    # `time.time()` here: the mock stamps its calls with the same wall clock.
    t0_wall = time.time()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(clients[w % len(clients)]) for w in range(concurrency)))
    last_final = time.perf_counter() - t0
    # Subagents (and OpenClaw's announce turn) may still be working: wait until the mock is quiet.
    deadline = time.monotonic() + RUN_TIMEOUT_S
    stats = mock.stats()
    while time.monotonic() < deadline and time.time() - stats["last_call_end"] < QUIET_S:
        await asyncio.sleep(0.2)
        stats = mock.stats()
    for c in clients:
        await c.close()
    wall = max(last_final, stats["last_call_end"] - t0_wall) if stats["calls"] else last_final
    calls = int(stats["calls"])
    return {
        "runs": runs,
        "spawn": spawn,
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "last_final_s": round(last_final, 3),
        "runs_per_s": round(runs / wall, 2),
        "latency_ms": {
            "p50": round(pct(latencies, 0.50) * 1000, 1),
            "p90": round(pct(latencies, 0.90) * 1000, 1),
            "p99": round(pct(latencies, 0.99) * 1000, 1),
            "max": round(max(latencies) * 1000, 1) if latencies else None,
        },
        "statuses": statuses,
        "errors": errors,
        "llm": stats,
        "llm_calls_per_run": round(calls / runs, 2),
        # Per LLM call: the rate at which the batch's LLM calls were served (runs/s x calls/run),
        # which compares systems that make a different number of calls per run.
        "llm_calls_per_s": round(calls / wall, 2),
    }


async def bench_system(name: str, mock: Mock, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    port = free_port()
    gw = (
        start_clawgate(port, mock.base, root) if name == "clawgate" else start_openclaw(port, mock.base, root)
    )
    try:
        start_s = await wait_ready(gw)
        print(f"{name}: ready in {start_s:.2f} s", flush=True)
        proc = psutil.Process(gw.proc.pid)
        await asyncio.sleep(args.settle_s)
        rss_before = tree_rss(proc)
        batches: dict[str, Any] = {}
        with PeakSampler(proc) as sampler:
            for kind in args.batches:
                cpu0 = tree_cpu_s(proc)
                res = await drive(
                    gw,
                    mock,
                    runs=args.runs,
                    concurrency=args.concurrency,
                    spawn=kind == "spawn",
                    tag=f"{name}-{kind}",
                )
                cpu = tree_cpu_s(proc) - cpu0
                res["gateway_cpu_s"] = round(cpu, 2)
                res["gateway_cpu_ms_per_run"] = round(cpu * 1000 / args.runs, 1)
                res["gateway_cpu_ms_per_llm_call"] = round(cpu * 1000 / max(1, res["llm"]["calls"]), 1)
                batches[kind] = res
                print(
                    f"{name} {kind}: {res['runs_per_s']} runs/s, p50 {res['latency_ms']['p50']} ms, "
                    f"p99 {res['latency_ms']['p99']} ms, {res['llm_calls_per_run']} LLM calls/run, "
                    f"statuses {res['statuses']}",
                    flush=True,
                )
        await asyncio.sleep(args.idle_s)
        rss_after = tree_rss(proc)
        mb = 2**20
        return {
            "start_s": round(start_s, 2),
            "rss_mb": {
                "before": round(rss_before / mb, 1),
                "peak": round(sampler.peak / mb, 1),
                "after_idle": round(rss_after / mb, 1),
            },
            "processes": 1 + len(proc.children(recursive=True)),
            "batches": batches,
        }
    finally:
        gw.stop()


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nN = {args.runs}, {args.concurrency} in flight, mock latency {args.latency_ms:g} ms\n")
    print(
        "| system | batch | runs/s | p50 / p90 / p99 ms | LLM calls/run | LLM calls/s | CPU ms/run | CPU ms/LLM call |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, res in results["systems"].items():
        for kind, b in res["batches"].items():
            lat = b["latency_ms"]
            print(
                f"| {name} | {kind} | {b['runs_per_s']} | {lat['p50']} / {lat['p90']} / {lat['p99']} | "
                f"{b['llm_calls_per_run']} | {b['llm_calls_per_s']} | {b['gateway_cpu_ms_per_run']} | "
                f"{b['gateway_cpu_ms_per_llm_call']} |"
            )
    print("\n| system | start (s) | RSS before / peak / after idle (MB) | processes |")
    print("|---|---|---|---|")
    for name, res in results["systems"].items():
        rss = res["rss_mb"]
        print(
            f"| {name} | {res['start_s']} | {rss['before']} / {rss['peak']} / {rss['after_idle']} | {res['processes']} |"
        )


async def amain(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="clawgate-vs-openclaw-") as tmp:
        root = Path(tmp)
        mock = Mock(free_port(), args.latency_ms, root / "mock.log")
        results: dict[str, Any] = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "load_average_start": os.getloadavg(),
            "params": {k: v for k, v in vars(args).items() if k != "out"},
            "systems": {},
        }
        try:
            for name in args.systems:
                sysroot = root / name
                sysroot.mkdir()
                try:
                    results["systems"][name] = await bench_system(name, mock, args, sysroot)
                except SystemExit as exc:
                    log = sysroot / f"{name}.log"
                    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                    print(f"{name} failed: {exc}\n{tail}", file=sys.stderr)
                    results["systems"][name] = {"failed": str(exc), "log_tail": tail}
        finally:
            mock.stop()
        results["load_average_end"] = os.getloadavg()
        results["systems"] = {k: v for k, v in results["systems"].items() if "failed" not in v} | {
            k: v for k, v in results["systems"].items() if "failed" in v
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        ok = {k: v for k, v in results["systems"].items() if "failed" not in v}
        print_table({"systems": ok}, args)
        print(
            f"\nload average {results['load_average_start'][0]:.1f} -> {results['load_average_end'][0]:.1f}"
        )
        print(f"wrote {args.out}")
        return 0 if len(ok) == len(args.systems) else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200, help="runs per batch (default 200)")
    parser.add_argument("--concurrency", type=int, default=8, help="runs in flight")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="mock LLM latency before each answer")
    parser.add_argument(
        "--systems", nargs="+", default=["clawgate", "openclaw"], choices=["clawgate", "openclaw"]
    )
    parser.add_argument("--batches", nargs="+", default=["plain", "spawn"], choices=["plain", "spawn"])
    parser.add_argument("--settle-s", type=float, default=5.0, help="idle before the 'before' RSS")
    parser.add_argument("--idle-s", type=float, default=10.0, help="idle before the 'after' RSS")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "vs_openclaw.json")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so both gateways and the mock are stopped on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    return asyncio.run(amain(args))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
