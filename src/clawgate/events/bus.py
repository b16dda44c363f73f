"""Event bus: run contexts with their sequence counters, and fan-out to connections.

The reference gateway kept `runContextById` and `seqByRun` as two maps and
removed them only on a clean lifecycle end; a missed end leaked both, and even
the clean path forgot the counters (docs/design.md, rules 2 and 3). Here
the sequence counter is a field of the context, so the two cannot outlive each
other, and the context map is a TTLMap whose deadline every emitted event
pushes forward: a context idle for `run_context_idle_ttl_s` is swept, a run
that keeps emitting never is. A context whose run has not ended is also held,
however idle: until the run's own backstop (`hold_s`, the `runs_active`
deadline, given by the run service when the run starts) and while the run has
watchers (they go at the run's end). A provider may stay silent longer than
the idle TTL, and sweeping the context then would restart the run's `seq` at 1
in the middle of the run.

Fan-out never awaits a socket: frames are encoded once and handed to each
connection's bounded send buffer (`Sink.send_frame`), which disconnects a slow
consumer instead of growing. With several gateway processes, every frame published here is
also handed to the `EventRelay` given at construction (scaleout/fanout.py), and frames
relayed from other processes come back in through `deliver`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from clawgate.errors import Unavailable
from clawgate.ids import ConnId, RunId, SessionKey
from clawgate.protocol.frames import encode_event
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.state.ttlmap import TTLMap


class Sink(Protocol):
    """Where frames for one connection go (the connection's bounded send buffer)."""

    def send_frame(self, frame: bytes) -> None: ...


class RunContext:
    __slots__ = (
        "chat_seq",
        "chat_text",
        "held_until",
        "last_active_at",
        "registered_at",
        "run_id",
        "seq",
        "session_key",
    )

    def __init__(self, run_id: RunId, session_key: SessionKey, now: float) -> None:
        self.run_id = run_id
        self.session_key = session_key
        self.seq = 0
        self.chat_seq = 0
        self.chat_text = ""
        self.registered_at: float | None = now  # set once, on first registration
        self.last_active_at: float | None = now  # refreshed on every emitted event
        # Not swept before this time, however idle (the executing run's backstop deadline).
        self.held_until = 0.0


# A run's end events, as bits: a process tells each at most once (scaleout/member.py).
END_AGENT = 1  # the `agent` lifecycle end (or error) event
END_CHAT = 2  # the `chat` final (or aborted, error) event
END_BOTH = END_AGENT | END_CHAT


class EventRelay(Protocol):
    """Carries this process's event frames to the other gateway processes."""

    def publish_event(
        self, run_id: RunId | None, session_key: SessionKey, frame: bytes, end: int = 0
    ) -> None:
        """Send one frame on; never blocks (a frame that does not fit may be dropped).
        `end`: the END_* bit of a run's end event, 0 for any other frame."""


EventListener = Callable[[RunId, SessionKey, str, dict[str, Any]], None]


class EventBus:
    def __init__(
        self,
        clock: Clock,
        registry: StateRegistry,
        *,
        idle_ttl_s: float,
        max_runs: int,
        max_connections: int,
        max_session_subscriptions: int = 102_400,
        relay: EventRelay | None = None,
    ) -> None:
        self.clock = clock
        self.idle_ttl_s = idle_ttl_s
        self.contexts: TTLMap[RunId, RunContext] = TTLMap(
            "run_contexts", clock, ttl_s=idle_ttl_s, max_size=max_runs, lru=False
        )
        # The connections that asked for a run's events (the one that started it, and
        # `agent` retries with the same key): removed at run end, TTL as a backstop. One
        # connection id alone, a set only from the second (a set costs 216 bytes a run).
        self.watchers: TTLMap[RunId, ConnId | set[ConnId]] = TTLMap(
            "run_watchers", clock, ttl_s=idle_ttl_s, max_size=max_runs, lru=False
        )
        # Distinct subscribed session keys across connections. Refused beyond the bound
        # (`subscribe`), never evicted: an eviction silently cut another connection off.
        self.session_subs: TTLMap[SessionKey, set[ConnId]] = TTLMap(
            "session_subscriptions", clock, max_size=max_session_subscriptions, lru=False
        )
        self.all_subs: set[ConnId] = set()
        self.sinks: dict[ConnId, Sink] = {}
        registry.register(self.contexts)
        registry.register(self.watchers)
        registry.register(self.session_subs)
        registry.add("event_sinks", self.sinks.__len__, ttl_s=None, max_size=max_connections)
        registry.add("all_subscribers", self.all_subs.__len__, ttl_s=None, max_size=max_connections)
        self.listeners: list[EventListener] = []
        self.relay = relay
        self.frames_out = 0

    def on_event(self, listener: EventListener) -> None:
        """Call `listener` with every `agent` event this process emits (run id, session key,
        stream, data), after the frame went out."""
        self.listeners.append(listener)

    # -- connections --------------------------------------------------------------------
    def attach(self, conn_id: ConnId, sink: Sink) -> None:
        self.sinks[conn_id] = sink

    def detach(self, conn_id: ConnId, subscribed: set[SessionKey]) -> None:
        """Forget a connection everywhere it could be referenced."""
        self.sinks.pop(conn_id, None)
        self.all_subs.discard(conn_id)
        for key in subscribed:
            subs = self.session_subs.get(key)
            if subs is not None:
                subs.discard(conn_id)
                if not subs:
                    self.session_subs.pop(key)

    def subscribe(self, conn_id: ConnId, session_keys: list[SessionKey], all_sessions: bool) -> None:
        """Add subscriptions, all or none: UNAVAILABLE if the new keys do not fit the bound."""
        new_keys = {key for key in session_keys if key not in self.session_subs}
        cap = self.session_subs.max_size
        if cap is not None and len(self.session_subs) + len(new_keys) > cap:
            raise Unavailable(
                f"gateway holds at most {cap} subscribed sessions",
                retry_after_ms=1000,
                details={"maxSessionSubscriptions": cap},
            )
        if all_sessions:
            self.all_subs.add(conn_id)
        for key in session_keys:
            subs = self.session_subs.get(key)
            if subs is None:
                self.session_subs.set(key, {conn_id})
            else:
                subs.add(conn_id)

    def watch(self, run_id: RunId, conn_id: ConnId, *, ttl_s: float | None = None) -> None:
        """Send the run's events to `conn_id` until the run ends (`ttl_s`: backstop, default idle TTL)."""
        conns = self.watchers.get(run_id)
        if conns is None:
            self.watchers.set(run_id, conn_id, ttl_s)
        elif isinstance(conns, set):
            conns.add(conn_id)
        elif conns != conn_id:
            # A second connection: a set, with the deadline the watchers had.
            expires_at = self.watchers.expires_at(run_id)
            now = self.clock.time()
            keep_s = expires_at - now if expires_at is not None and expires_at != float("inf") else None
            self.watchers.set(run_id, {conns, conn_id}, keep_s)
        self._rekeep(run_id)

    def extend_watch(self, run_id: RunId, ttl_s: float) -> None:
        """Move the watchers' backstop to now + `ttl_s` (a run that starts gets its own deadline)."""
        self.watchers.touch(run_id, ttl_s)
        self._rekeep(run_id)

    def unwatch_run(self, run_id: RunId) -> None:
        self.watchers.pop(run_id)

    # -- run contexts -------------------------------------------------------------------------
    def register_run(
        self, run_id: RunId, session_key: SessionKey, *, hold_s: float | None = None
    ) -> RunContext:
        """The run's context, created on first use. `hold_s`: keep it at least that long.

        The run service passes its own backstop for an executing run, so the context (and
        its seq counters) lives as long as the run may, and ends with it (`clear_run`).
        """
        now = self.clock.time()
        ctx = self.contexts.get(run_id)
        if ctx is None:
            ctx = RunContext(run_id, session_key, now)
            self.contexts.set(run_id, ctx)
        if hold_s is not None:
            ctx.held_until = max(ctx.held_until, now + hold_s)
            self._keep(run_id, ctx, now)
        return ctx

    def _keep(self, run_id: RunId, ctx: RunContext, now: float) -> None:
        """Push the context's deadline to the latest of: idle TTL, its hold, its watchers."""
        held_until = ctx.held_until
        watched_until = self.watchers.expires_at(run_id)
        if watched_until is not None and watched_until != float("inf"):
            held_until = max(held_until, watched_until)
        self.contexts.touch(run_id, max(self.idle_ttl_s, held_until - now))

    def _rekeep(self, run_id: RunId) -> None:
        ctx = self.contexts.get(run_id)
        if ctx is not None:
            self._keep(run_id, ctx, self.clock.time())

    def clear_run(self, run_id: RunId) -> None:
        """Normal end: the context goes, and its sequence counter with it (rule 3)."""
        self.contexts.pop(run_id)

    def sweep_contexts(self) -> int:
        return self.contexts.sweep()

    # -- emitting ------------------------------------------------------------------------------
    def emit_agent(
        self,
        run_id: RunId,
        session_key: SessionKey,
        stream: str,
        data: dict[str, Any],
        *,
        seq: int | None = None,
        end: int = 0,
    ) -> int:
        """Emit one `agent` event with the run's next seq (or `seq`); returns the seq."""
        ctx = self.contexts.get(run_id)
        if ctx is None:
            ctx = self.register_run(run_id, session_key)
        now = self.clock.time()
        ctx.seq = seq if seq is not None else ctx.seq + 1
        ctx.last_active_at = now
        self._keep(run_id, ctx, now)
        frame = agent_frame(run_id, session_key, ctx.seq, stream, int(now * 1000), data)
        self.publish(run_id, session_key, frame, end=end)
        for listener in self.listeners:
            listener(run_id, session_key, stream, data)
        return ctx.seq

    def emit_chat(
        self,
        run_id: RunId,
        session_key: SessionKey,
        state: str,
        *,
        seq: int | None = None,
        end: int = 0,
        **fields: Any,
    ) -> None:
        ctx = self.contexts.get(run_id)
        if ctx is None:
            ctx = self.register_run(run_id, session_key)
        now = self.clock.time()
        ctx.chat_seq = seq if seq is not None else ctx.chat_seq + 1
        ctx.last_active_at = now
        self._keep(run_id, ctx, now)
        self.publish(
            run_id, session_key, chat_frame(run_id, session_key, ctx.chat_seq, state, fields), end=end
        )

    def continue_seqs(self, run_id: RunId, session_key: SessionKey, agent_seq: int, chat_seq: int) -> None:
        """This process tells the end of a run whose events another process sent (an orphan
        taken over from a process that died or lost its lease): its next events follow the
        last `agent` and `chat` seqs seen of it here, rather than restart at 1."""
        ctx = self.register_run(run_id, session_key)
        ctx.seq = max(ctx.seq, agent_seq)
        ctx.chat_seq = max(ctx.chat_seq, chat_seq)

    def next_seqs(self, run_id: RunId) -> list[int]:
        """The seqs the run's next `agent` and `chat` events will get."""
        ctx = self.contexts.get(run_id)
        return [1, 1] if ctx is None else [ctx.seq + 1, ctx.chat_seq + 1]

    def emit_session_event(self, session_key: SessionKey, event: str, payload: dict[str, Any]) -> None:
        """An event about a session (e.g. `subagent`), to that session's subscribers."""
        self.publish(None, session_key, encode_event(event, payload))

    def publish(self, run_id: RunId | None, session_key: SessionKey, frame: bytes, *, end: int = 0) -> None:
        self.deliver(run_id, session_key, frame)
        if self.relay is not None:
            self.relay.publish_event(run_id, session_key, frame, end)

    def deliver(self, run_id: RunId | None, session_key: SessionKey, frame: bytes) -> None:
        """Local fan-out: watchers of the run, subscribers of the session, and `all` subscribers.

        The frame is encoded once by the caller; every target gets the same bytes.
        """
        watchers = self.watchers.get(run_id) if run_id is not None else None
        subs = self.session_subs.get(session_key)
        targets: set[ConnId] | tuple[ConnId, ...]
        if not self.all_subs and not subs:
            # The common case (only the run's own requesters): no union set per event. A
            # copy all the same, so a sink may change the watchers while being sent to.
            targets = _conns(watchers)
        else:
            targets = set(self.all_subs)
            targets.update(_conns(watchers))
            if subs:
                targets |= subs
        sinks = self.sinks
        sent = 0
        for conn_id in targets:
            sink = sinks.get(conn_id)
            if sink is not None:
                sink.send_frame(frame)
                sent += 1
        self.frames_out += sent

    def broadcast(self, frame: bytes) -> None:
        for sink in list(self.sinks.values()):
            sink.send_frame(frame)


def agent_frame(
    run_id: RunId, session_key: SessionKey, seq: int, stream: str, ts_ms: int, data: dict[str, Any]
) -> bytes:
    """One `agent` event frame."""
    payload = {
        "runId": run_id,
        "sessionKey": session_key,
        "seq": seq,
        "stream": stream,
        "ts": ts_ms,
        "data": data,
    }
    return encode_event("agent", payload)


def chat_frame(run_id: RunId, session_key: SessionKey, seq: int, state: str, fields: dict[str, Any]) -> bytes:
    """One `chat` event frame."""
    payload: dict[str, Any] = {"runId": run_id, "sessionKey": session_key, "seq": seq, "state": state}
    payload.update(fields)
    return encode_event("chat", payload)


class _SeqPayload(msgspec.Struct):
    seq: int = 0


class _SeqFrame(msgspec.Struct):
    event: str = ""
    payload: _SeqPayload = msgspec.field(default_factory=_SeqPayload)


_seq_dec = msgspec.json.Decoder(_SeqFrame)


def frame_seq(frame: bytes) -> tuple[str, int]:
    """(event name, seq) of an encoded `agent` or `chat` frame; ("", 0) for anything else."""
    try:
        parsed = _seq_dec.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "", 0
    return parsed.event, parsed.payload.seq


def _conns(watchers: ConnId | set[ConnId] | None) -> tuple[ConnId, ...]:
    """A run's watchers (one connection id, or a set of them) as a tuple."""
    if not watchers:
        return ()
    return tuple(watchers) if isinstance(watchers, set) else (watchers,)
