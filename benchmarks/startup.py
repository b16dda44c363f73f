"""Time from process start to /healthz 200, and idle RSS just after, of a plain gateway.

Starts `python -m clawgate gateway --store sqlite --provider scripted` (fresh state
dir, free port, `clawgate.testing.GatewayProcess`) `--repeat` times, polls /healthz every
10 ms from the moment the process is spawned, and reads the gateway's RSS (psutil) right after
the first 200 and again one second later, with the CPU time (user + system) the gateway used until
that first 200: on a loaded machine the wall-clock start time mostly measures the load, the CPU
time much less so. Prints the median and the spread; writes JSON.

    .venv/bin/python benchmarks/startup.py --repeat 7
    # the same against another checkout's sources, for a side-by-side figure:
    PYTHONPATH=/path/to/other/src .venv/bin/python benchmarks/startup.py --repeat 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from clawgate.testing import GatewayProcess

ROOT = Path(__file__).resolve().parent


def one(state: Path) -> dict[str, float]:
    gateway = GatewayProcess(
        state,
        args=["--store", "sqlite", "--provider", "scripted", "--log-level", "warning"],
        log_path=state.parent / f"{state.name}.log",
    )
    started = time.perf_counter()
    try:
        gateway.start(60, poll_s=0.01)
        ready_s = time.perf_counter() - started
        gw = psutil.Process(gateway.pid)
        rss = gw.memory_info().rss
        cpu = gw.cpu_times()
        time.sleep(1.0)
        rss_1s = gw.memory_info().rss
    finally:
        gateway.stop()
    return {
        "healthz_s": ready_s,
        "cpu_s": cpu.user + cpu.system,
        "rss_mb": rss / 2**20,
        "rss_1s_mb": rss_1s / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "startup.json")
    args = parser.parse_args()
    samples = []
    with tempfile.TemporaryDirectory(prefix="clawgate-start-") as tmp:
        for i in range(args.repeat):
            samples.append(one(Path(tmp) / f"s{i}"))
    summary: dict[str, Any] = {"load_avg": os.getloadavg(), "samples": samples}
    for key in ("healthz_s", "cpu_s", "rss_mb", "rss_1s_mb"):
        values = [s[key] for s in samples]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    h, c, r, r1 = summary["healthz_s"], summary["cpu_s"], summary["rss_mb"], summary["rss_1s_mb"]
    print(f"/healthz 200 after  median {h['median']:.3f} s  (min {h['min']:.3f}, max {h['max']:.3f})")
    print(f"CPU until then      median {c['median']:.3f} s  (min {c['min']:.3f}, max {c['max']:.3f})")
    print(f"RSS at first 200    median {r['median']:.1f} MB (min {r['min']:.1f}, max {r['max']:.1f})")
    print(f"RSS 1 s later       median {r1['median']:.1f} MB")
    print(f"load avg            {summary['load_avg']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
