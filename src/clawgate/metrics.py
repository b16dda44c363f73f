"""Prometheus metrics, collected on scrape from the gateway's live counters (no per-event cost)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class LatencyHistogram:
    """A fixed-bucket histogram: O(log b) per observation, constant memory."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            out.append((repr(bound), running))
        out.append(("+Inf", self.count))
        return out


class GatewayCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        snap = self._snapshot()
        state = GaugeMetricFamily(
            "clawgate_state_entries", "Entries in a registered in-memory structure", labels=["structure"]
        )
        for name, size in snap["state"].items():
            state.add_metric([name], size)
        yield state
        runs = CounterMetricFamily("clawgate_runs", "Runs ended, by status", labels=["status"])
        for status, n in snap["runs_total"].items():
            runs.add_metric([status], n)
        yield runs
        sweeps = CounterMetricFamily(
            "clawgate_sweep_errors", "Sweeps that raised, by sweep", labels=["sweep"]
        )
        for name, n in snap["sweep_errors"].items():
            sweeps.add_metric([name], n)
        yield sweeps
        task_errors = CounterMetricFamily(
            "clawgate_task_errors", "Background tasks that raised, by task", labels=["task"]
        )
        for name, n in snap.get("task_errors", {}).items():
            task_errors.add_metric([name], n)
        yield task_errors
        ticks = CounterMetricFamily("clawgate_maintenance_ticks", "Maintenance ticks run")
        ticks.add_metric([], snap["ticks"])
        yield ticks
        hist: LatencyHistogram = snap["run_latency"]
        latency = HistogramMetricFamily("clawgate_run_duration_seconds", "Run duration, start to end")
        latency.add_metric([], hist.cumulative(), sum_value=hist.sum)
        yield latency
        yield GaugeMetricFamily(
            "clawgate_connections", "Open WebSocket connections", value=snap["connections"]
        )
        yield GaugeMetricFamily("clawgate_runs_active", "Runs queued or running", value=snap["runs_active"])
        yield GaugeMetricFamily("clawgate_runs_queued", "Runs waiting in a lane", value=snap["runs_queued"])
        yield GaugeMetricFamily("clawgate_process_rss_bytes", "Resident set size", value=snap["rss"])
        yield from _disk_metrics(snap["disk"])
        yield GaugeMetricFamily(
            "clawgate_admission_open",
            "1 when new runs are admitted",
            value=1 if snap["admission_open"] else 0,
        )
        yield from _store_connection_metrics(snap["store_connection"])
        yield from _provider_metrics(snap["provider"])
        tokens = CounterMetricFamily(
            "clawgate_tokens", "Provider tokens, by model and kind", labels=["model", "kind"]
        )
        for (model, kind), n in snap["tokens"].items():
            tokens.add_metric([model, kind], n)
        yield tokens

        subagents = CounterMetricFamily(
            "clawgate_subagent_incidents",
            "Subagent registry incidents: quarantined records, hook errors and timeouts, retries...",
            labels=["kind"],
        )
        for kind, n in snap.get("subagents", {}).items():
            if kind != "stranded":
                subagents.add_metric([kind], n)
        yield subagents
        yield GaugeMetricFamily(
            "clawgate_subagent_stranded",
            "Subagent records whose pipeline failed, waiting for the archive sweep",
            value=snap.get("subagents", {}).get("stranded", 0),
        )


def _store_connection_metrics(conn: dict[str, Any]) -> Iterator[Any]:
    yield GaugeMetricFamily(
        "clawgate_store_up", "1 when the last store round trip succeeded", value=1 if conn["up"] else 0
    )
    yield CounterMetricFamily(
        "clawgate_store_failures", "Store round trips that failed (unreachable)", value=conn["failures"]
    )
    yield CounterMetricFamily(
        "clawgate_store_reconnects", "Store came back after failed round trips", value=conn["reconnects"]
    )


def _provider_metrics(stats: dict[str, Any]) -> Iterator[Any]:
    name = str(stats.get("name", "unknown"))
    errors = CounterMetricFamily(
        "clawgate_provider_errors", "Failed provider turns, by kind", labels=["provider", "kind"]
    )
    for kind, n in stats.get("errors", {}).items():
        errors.add_metric([name, kind], n)
    yield errors
    retries = CounterMetricFamily(
        "clawgate_provider_retries", "Provider turns retried, by failure kind", labels=["provider", "kind"]
    )
    for kind, n in stats.get("retries", {}).items():
        retries.add_metric([name, kind], n)
    yield retries
    circuit = GaugeMetricFamily(
        "clawgate_provider_circuit_open", "1 while a model's circuit is open", labels=["provider", "model"]
    )
    for model, c in stats.get("circuits", {}).items():
        circuit.add_metric([name, model], 0 if c["state"] == "closed" else 1)
    yield circuit


def _disk_metrics(disk: dict[str, Any]) -> Iterator[Any]:
    rows = GaugeMetricFamily("clawgate_store_rows", "Rows (records) per store table", labels=["table"])
    for table, n in disk["rows"].items():
        rows.add_metric([table], n)
    yield rows
    yield GaugeMetricFamily("clawgate_store_bytes", "Bytes the store occupies", value=disk["store_bytes"])
    yield GaugeMetricFamily(
        "clawgate_attachments_bytes", "Bytes of spawn attachments on disk", value=disk["attachments_bytes"]
    )
    yield GaugeMetricFamily(
        "clawgate_state_dir_bytes",
        "Bytes under the state dir (and the ended-hook log)",
        value=disk["state_dir_bytes"],
    )
    removed = CounterMetricFamily(
        "clawgate_retention_removed", "Records removed from disk, by retention rule", labels=["rule"]
    )
    for rule, n in disk["removed"].items():
        removed.add_metric([rule], n)
    yield removed


def make_registry(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(snapshot))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
