"""A bounded, resumable log of run events for HTTP followers (SSE).

The HTTP layer is one sink on the event bus. When an HTTP client starts or follows a run,
the log watches it and keeps its `agent` events in a ring buffer of
`http_event_buffer_events` entries; SSE readers replay from the buffer (resuming after
`Last-Event-ID`, the run's `seq`) and then wait for new events. Buffers are a registered
TTLMap: at most `http_event_buffers_max` runs, each kept `run_result_ttl_s` after its last
event, so followers cost nothing once they are gone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import msgspec

from clawgate.events.bus import EventBus
from clawgate.ids import ConnId, RunId
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.state.ttlmap import TTLMap

SINK_ID = ConnId("http-events")


class _Data(msgspec.Struct):
    phase: str | None = None


class _Payload(msgspec.Struct):
    runId: str
    seq: int = 0
    stream: str = ""
    data: _Data = msgspec.field(default_factory=_Data)


class _Frame(msgspec.Struct):
    event: str
    payload: msgspec.Raw


_frame_decoder = msgspec.json.Decoder(_Frame)
_payload_decoder = msgspec.json.Decoder(_Payload)
_json = msgspec.json.Decoder()


class RunBuffer:
    """The recent events of one run, and a signal for readers waiting on more."""

    __slots__ = ("changed", "ended", "events", "first_seq")

    def __init__(self, capacity: int) -> None:
        self.events: deque[tuple[int, bytes]] = deque(maxlen=capacity)
        self.first_seq = 0  # seq of the first event this buffer saw (0: none yet)
        self.ended = False
        self.changed = asyncio.Event()

    def add(self, seq: int, payload: bytes, ended: bool) -> None:
        if not self.first_seq:
            self.first_seq = seq
        self.events.append((seq, payload))
        self.ended = self.ended or ended
        self.changed.set()
        self.changed = asyncio.Event()

    def oldest_seq(self) -> int:
        return self.events[0][0] if self.events else 0

    def after(self, seq: int) -> list[tuple[int, bytes]]:
        return [(s, p) for s, p in self.events if s > seq]


class RunEventLog:
    """The sink the HTTP API attaches to the bus (one per gateway)."""

    def __init__(
        self,
        bus: EventBus,
        clock: Clock,
        registry: StateRegistry,
        *,
        capacity: int,
        max_runs: int,
        ttl_s: float,
        watch_ttl_s: float,
    ) -> None:
        self.bus = bus
        self.capacity = capacity
        self.watch_ttl_s = watch_ttl_s
        self.buffers: TTLMap[RunId, RunBuffer] = TTLMap(
            "http_event_buffers", clock, ttl_s=ttl_s, max_size=max_runs
        )
        registry.register(self.buffers)
        self.attached = False

    def follow(self, run_id: RunId) -> RunBuffer:
        """Start (or keep) recording a run's events; returns its buffer."""
        if not self.attached:
            self.bus.attach(SINK_ID, self)
            self.attached = True
        buf = self.buffers.get(run_id)
        if buf is None:
            buf = RunBuffer(self.capacity)
            self.buffers.set(run_id, buf)
        self.bus.watch(run_id, SINK_ID, ttl_s=self.watch_ttl_s)
        return buf

    def send_frame(self, frame: bytes) -> None:
        """Bus sink: keep the `agent` events of followed runs."""
        head = _frame_decoder.decode(frame)
        if head.event != "agent":
            return
        payload = _payload_decoder.decode(head.payload)
        buf = self.buffers.get(RunId(payload.runId))
        if buf is None:
            return
        ended = payload.stream == "lifecycle" and payload.data.phase in ("end", "error")
        buf.add(payload.seq, bytes(head.payload), ended)
        self.buffers.touch(RunId(payload.runId))

    def detach(self) -> None:
        if self.attached:
            self.bus.detach(SINK_ID, set())
            self.attached = False


def decode_payload(raw: bytes) -> dict[str, Any]:
    value = _json.decode(raw)
    assert isinstance(value, dict)
    return value
