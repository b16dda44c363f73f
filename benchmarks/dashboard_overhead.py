"""Gateway throughput with and without the `/ui` dashboard open (headless chromium).

For each repetition, in alternating order: start a gateway process, open the
dashboard on PAGE in a headless browser (or not), drive a `runs_throughput.py`
batch against that gateway, and record runs/s. Prints the median of each mode
and the relative drop; writes JSON.

    .venv/bin/python benchmarks/dashboard_overhead.py                 # 20,000 runs, 2 pairs, runs page
    .venv/bin/python benchmarks/dashboard_overhead.py --page overview --reps 3

Target: the dashboard costs at most 5% of throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from clawgate.testing import GatewayProcess

ROOT = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CLAWGATE_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def browse(http_url: str, page_name: str, ready_file: Path) -> None:
    """Keep the dashboard open on `page_name` until killed (runs in a child process)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{http_url}/ui/#{page_name}")
        page.fill("#token", "")
        page.press("#token", "Enter")
        page.wait_for_selector("#page h1", timeout=30_000)
        ready_file.write_text("ready")
        while True:
            page.wait_for_timeout(1000)


def one_batch(runs: int, warmup: int, dashboard: str | None, tmp: Path) -> tuple[float, float]:
    """(runs/s, gateway CPU ms per run) of one batch on a fresh gateway."""
    with GatewayProcess(tmp / f"state-{time.monotonic_ns()}") as gp:
        assert gp.proc is not None
        gateway = psutil.Process(gp.proc.pid)
        viewer: subprocess.Popen[bytes] | None = None
        try:
            if dashboard:
                ready = tmp / f"ready-{time.monotonic_ns()}"
                viewer = subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--browse",
                        gp.http_url,
                        "--page",
                        dashboard,
                        "--ready",
                        str(ready),
                    ]
                )
                deadline = time.monotonic() + 60
                while not ready.exists():
                    if viewer.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the dashboard did not open")
                    time.sleep(0.1)
            out = tmp / f"bench-{time.monotonic_ns()}.json"
            cpu0 = sum(gateway.cpu_times()[:2])
            subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "runs_throughput.py"),
                    "--url",
                    gp.url,
                    "--runs",
                    str(runs),
                    "--warmup",
                    str(warmup),
                    "--out",
                    str(out),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            # CPU per run is steadier than runs/s on a machine shared with other work (warmup included).
            cpu_ms = (sum(gateway.cpu_times()[:2]) - cpu0) * 1000 / (runs + warmup)
            return float(json.loads(out.read_text())["runs_per_s"]), cpu_ms
        finally:
            if viewer is not None:
                viewer.kill()
                viewer.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--reps", type=int, default=3, help="pairs of batches (without, with)")
    parser.add_argument("--page", default="runs", help="dashboard page kept open (overview, runs, ...)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "dashboard_overhead.json")
    parser.add_argument("--browse", help=argparse.SUPPRESS)
    parser.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.browse:
        browse(args.browse, args.page, args.ready)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="clawgate-dash-bench-"))
    results: dict[str, list[float]] = {"without": [], "with": []}
    cpu: dict[str, list[float]] = {"without": [], "with": []}
    for rep in range(args.reps):
        # Alternate the order, so a machine getting busier or quieter does not favour one mode.
        order = ["without", "with"] if rep % 2 == 0 else ["with", "without"]
        for mode in order:
            rate, cpu_ms = one_batch(args.runs, args.warmup, args.page if mode == "with" else None, tmp)
            results[mode].append(rate)
            cpu[mode].append(cpu_ms)
            print(f"{mode:>8} dashboard: {rate:8.0f} runs/s, gateway {cpu_ms:.3f} CPU ms/run", flush=True)
    without, with_ = statistics.median(results["without"]), statistics.median(results["with"])
    drop = (without - with_) / without * 100
    cpu_without, cpu_with = statistics.median(cpu["without"]), statistics.median(cpu["with"])
    cpu_extra = (cpu_with - cpu_without) / cpu_without * 100
    summary = {
        "runs": args.runs,
        "page": args.page,
        "runs_per_s": results,
        "median_without": round(without, 1),
        "median_with": round(with_, 1),
        "drop_percent": round(drop, 2),
        "gateway_cpu_ms_per_run": cpu,
        "median_cpu_ms_per_run_without": round(cpu_without, 4),
        "median_cpu_ms_per_run_with": round(cpu_with, 4),
        "cpu_extra_percent": round(cpu_extra, 2),
        "target_drop_percent": 5,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(
        f"median without {without:.0f} runs/s, with the {args.page} page open {with_:.0f} runs/s: drop {drop:+.1f}%"
    )
    print(f"gateway CPU per run: {cpu_without:.3f} ms without, {cpu_with:.3f} ms with: {cpu_extra:+.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
