"""Cross-process delivery of event frames, run-finished notifications and abort
requests through Redis pub/sub (docs/design.md, persistence and scale-out: a client on process A follows and
`agent.wait`s a run executed by process B).

`RedisEventRelay` is the event bus' `EventRelay` (events/bus.py): the bus hands it every
frame it publishes. Interface (`ClusterMember` in scaleout/member.py wires it)::

    f = RedisEventRelay(redis, prefix="clawgate", origin=process_id,
                    on_event=deliver_frame, on_done=record_finished, on_abort=abort_run)
    f.start(); await f.wait_subscribed()
    f.publish_event(run_id, session_key, frame, end)  # sync, never blocks, may drop (counted)
    f.publish_done(record_json)                   # sync, queued behind the events before it
    f.publish_abort(run_id)                       # sync
    await f.flush()                               # optional: wait until the queue is sent
    await f.stop()

Channels (``P`` is the prefix; names built by ``FanoutKeys``, store/redis_keys.py)::

    P:ev     event frames        msgpack [origin, [[runId|nil, sessionKey, frame bytes, end], ...]]
                                 (a batch, in publish order; the older one-frame form
                                 [origin, runId|nil, sessionKey, frame bytes] is still read)
    P:done   run finished        msgpack [origin, record JSON bytes]
    P:abort  abort request       msgpack [origin, runId]
    P:hello  a process joined    msgpack [origin, ""]; each other process answers [origin, joiner]

Pub/sub keeps nothing in Redis (no keys, nothing to expire) and delivers only to
processes subscribed at that moment: durable state (run records, results) lives in the
store; this only carries the live stream.

Who gets what: a process ignores its **own events** (``on_event`` is only called for
frames published by another origin: the local bus has already delivered them), but
receives its **own done and abort** messages like every other process, so "a run
finished" and "abort this run" take one code path whatever process sent them.
Callbacks run on the event loop and must not block; one that raises is logged and
counted, and delivery goes on.

Nobody else listening: a process publishes event frames only while another process
listens. Every PUBLISH answers with the number of subscribers that got it; when the
channels had no subscriber but this process (one gateway on Redis), event frames are no
longer sent (counted in ``skipped``) until another process shows up: its hello, its
answer to ours, or a done or abort message reaching more than this process ends the
pause at once. A process that (re)subscribes sends a hello and, before
``wait_subscribed`` returns (before the gateway serves), waits up to ``HELLO_WAIT_S`` for
an answer from every process that got it, so a process that has just joined misses no
frame published after it started serving. Done and abort messages are always sent (a
process acts on its own too).

Sending never blocks the caller: messages go into one bounded buffer (``buffer_max``
events) that one task drains, up to ``batch_max`` messages per pipeline. The event frames
queued one after the other (those of one loop turn, or all queued while the previous
pipeline was in flight) go out as one ``P:ev`` message of at most ``BATCH_BYTES`` of
frames, so a run's frames cost one PUBLISH per drain, not one each; a receiver delivers
the batch's frames one by one, in order. Order is kept: one sender, one connection, and
Redis delivers a channel's messages in order. The counters (``published``, ``failed``,
``dropped``, ``received``) count frames and control messages, not PUBLISHes
(``publishes`` counts those).
When the buffer is full a new event is dropped and counted (``dropped``), like a slow
consumer's frames; done and abort messages keep a reserve of ``CONTROL_RESERVE`` more
slots so a flood of events does not drop a run's end. If Redis fails, the batch in
flight is lost and counted (``failed``); the subscriber reconnects and resubscribes.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from clawgate.scaleout.redis_io import as_text, guarded, redis_call
from clawgate.state.supervisor import Supervisor
from clawgate.store.redis_client import checkpoint
from clawgate.store.redis_keys import FanoutKeys

log = structlog.get_logger("clawgate.scaleout.fanout")
T = TypeVar("T")

BUFFER_MAX = 100_000  # queued events per process (each frame is at most max_payload_bytes)
CONTROL_RESERVE = 1024  # extra slots for done/abort above a full event buffer
BATCH_MAX = 256  # messages (frames, done, abort) per pipeline
BATCH_BYTES = 256 * 1024  # frame bytes per batched P:ev message (a larger frame goes alone)
RETRY_S = 0.5  # back-off after a Redis error
HELLO_WAIT_S = 2.0  # how long a joining process waits for the others to answer its hello


class EventEnvelope(msgspec.Struct, array_like=True, frozen=True):
    origin: str
    run_id: str | None
    session_key: str
    frame: bytes
    end: int = 0  # the END_* bit of a run's end event (events/bus.py); absent in older messages


class EventItem(msgspec.Struct, array_like=True, frozen=True):
    run_id: str | None
    session_key: str
    frame: bytes
    end: int = 0


class EventBatch(msgspec.Struct, array_like=True, frozen=True):
    origin: str
    events: list[EventItem]


class DoneEnvelope(msgspec.Struct, array_like=True, frozen=True):
    origin: str
    record: bytes


class AbortEnvelope(msgspec.Struct, array_like=True, frozen=True):
    origin: str
    run_id: str


class HelloEnvelope(msgspec.Struct, array_like=True, frozen=True):
    origin: str
    to: str = ""  # "": a process joined; else the origin of the joiner this answers


_Message = EventEnvelope | DoneEnvelope | AbortEnvelope | HelloEnvelope
_enc = msgspec.msgpack.Encoder()


class _Origin(msgspec.Struct, array_like=True, frozen=True):
    """The first field of every events message, read alone (the rest is skipped, not
    decoded): a process's own batches come back to it and are dropped unread."""

    origin: str


_origin_dec = msgspec.msgpack.Decoder(_Origin)
_ev_dec = msgspec.msgpack.Decoder(EventEnvelope)
_batch_dec = msgspec.msgpack.Decoder(EventBatch)
_done_dec = msgspec.msgpack.Decoder(DoneEnvelope)
_abort_dec = msgspec.msgpack.Decoder(AbortEnvelope)
_hello_dec = msgspec.msgpack.Decoder(HelloEnvelope)

# (run id, session key, frame, END_* bit of a run's end event or 0)
OnEvent = Callable[[str | None, str, bytes, int], None]


class RedisEventRelay:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str,
        origin: str,
        on_event: OnEvent,
        on_done: Callable[[bytes], None],
        on_abort: Callable[[str], None],
        buffer_max: int = BUFFER_MAX,
        batch_max: int = BATCH_MAX,
        tasks: Supervisor | None = None,
    ) -> None:
        if buffer_max < 1 or batch_max < 1:
            raise ValueError("buffer_max and batch_max must be >= 1")
        self.redis = redis
        # The gateway's task supervisor; a private one for a relay built alone.
        self.tasks = tasks or Supervisor()
        self.keys = FanoutKeys(prefix)
        self.origin = origin
        self.on_event = on_event
        self.on_done = on_done
        self.on_abort = on_abort
        self.buffer_max = buffer_max
        self.batch_max = batch_max
        self._buf: collections.deque[tuple[str, _Message]] = collections.deque()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._enqueued = 0  # messages ever queued
        self._handled = 0  # of those, sent or failed
        # Whether another process listens (module doc, "Nobody else listening").
        self._alone = False
        self._peers_epoch = 0  # +1 at every sign of another process
        self._hello_expect: int | None = None  # answers awaited for our last hello
        self._answers: set[str] = set()
        self._peers_ready = asyncio.Event()
        # counters
        self.published = 0
        self.publishes = 0  # PUBLISH commands sent (a batch of frames is one)
        self.dropped = 0
        self.failed = 0
        self.skipped = 0  # event frames not sent: no other process listened
        self.received = 0
        self.bad_messages = 0
        self.callback_errors = 0

    # -- sending (never blocks) -------------------------------------------------------------------
    def publish_event(self, run_id: str | None, session_key: str, frame: bytes, end: int = 0) -> None:
        if self._closed or len(self._buf) >= self.buffer_max:
            self.dropped += 1
            return
        self._put(self.keys.events(), EventEnvelope(self.origin, run_id, session_key, frame, end))

    def publish_done(self, record_json: bytes) -> None:
        self._put_control(self.keys.done(), DoneEnvelope(self.origin, record_json))

    def publish_abort(self, run_id: str) -> None:
        self._put_control(self.keys.abort(), AbortEnvelope(self.origin, run_id))

    @property
    def pending(self) -> int:
        """Messages queued and not yet sent."""
        return len(self._buf)

    def _put_control(self, channel: str, msg: DoneEnvelope | AbortEnvelope | HelloEnvelope) -> None:
        if self._closed or len(self._buf) >= self.buffer_max + CONTROL_RESERVE:
            self.dropped += 1
            log.warning("fanout: control message dropped", channel=channel)
            return
        self._put(channel, msg)

    def _put(self, channel: str, msg: _Message) -> None:
        self._buf.append((channel, msg))
        self._enqueued += 1
        self._wake.set()

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued before this call is sent (or failed); False on timeout."""
        target = self._enqueued

        async def wait() -> None:
            while self._handled < target:
                self._progress.clear()
                await self._progress.wait()

        try:
            await asyncio.wait_for(wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _send_loop(self) -> None:
        while True:
            while not self._buf:
                self._wake.clear()
                await self._wake.wait()
            n = min(len(self._buf), self.batch_max)
            batch = [self._buf.popleft() for _ in range(n)]
            epoch = self._peers_epoch
            messages, skipped = self._encode(batch)
            self.skipped += skipped
            if not messages:
                self._handled += n
                self._progress.set()
                continue
            pipe = self.redis.pipeline(transaction=False)
            for channel, data in messages:
                pipe.publish(channel, data)
            try:
                counts = await redis_call(pipe.execute())
                # The hellos and their answers are the relay's own traffic, not counted.
                hellos = sum(1 for _, msg in batch if isinstance(msg, HelloEnvelope))
                self.published += n - skipped - hellos
                self.publishes += len(messages) - hellos
                self._note_receivers(messages, counts, epoch)
            except (RedisError, OSError) as exc:
                self.failed += n
                log.warning("fanout: publish failed", error=str(exc), lost=n)
                await asyncio.sleep(RETRY_S)
            finally:
                self._handled += n
                self._progress.set()

    def _note_receivers(self, messages: list[tuple[str, bytes]], counts: list[Any], epoch: int) -> None:
        """What the PUBLISH answers say about the other processes (module doc, "Nobody else
        listening"). Alone only if no message reached another process and no sign of one
        came while the pipeline was in flight."""
        hello = self.keys.hello()
        receivers = [int(c) for c in counts]
        for (channel, data), got in zip(messages, receivers, strict=True):
            if channel == hello and not _hello_dec.decode(data).to:
                self._hello_expect = max(0, got - 1)  # every subscriber but this process
                self._check_peers_ready()
        if any(got > 1 for got in receivers):
            self._alone = False
        elif epoch == self._peers_epoch and self._subscribed.is_set():
            self._alone = True

    def _encode(self, batch: list[tuple[str, _Message]]) -> tuple[list[tuple[str, bytes]], int]:
        """The PUBLISHes for `batch`, in order, and the number of event frames left out
        (nobody else listens): consecutive event frames become one `EventBatch` message (up
        to BATCH_BYTES of frames), control messages one each."""
        out: list[tuple[str, bytes]] = []
        items: list[EventItem] = []
        size = 0
        skipped = 0

        def close() -> None:
            nonlocal items, size
            if items:
                out.append((self.keys.events(), _enc.encode(EventBatch(self.origin, items))))
                items, size = [], 0

        for channel, msg in batch:
            if isinstance(msg, EventEnvelope):
                if self._alone:
                    skipped += 1
                    continue
                if items and size + len(msg.frame) > BATCH_BYTES:
                    close()
                items.append(EventItem(msg.run_id, msg.session_key, msg.frame, msg.end))
                size += len(msg.frame)
            else:
                close()
                out.append((channel, _enc.encode(msg)))
        close()
        return out, skipped

    # -- receiving --------------------------------------------------------------------------------
    async def wait_subscribed(self, timeout_s: float = 5.0, peers_timeout_s: float = HELLO_WAIT_S) -> None:
        """Wait until the subscriber is listening on all channels (messages published
        by other processes before that are not seen), then, for at most
        `peers_timeout_s`, until every other process answered the hello (from then on
        they publish their event frames: a process that paused them resumes on the hello)."""
        await asyncio.wait_for(self._subscribed.wait(), timeout_s)
        try:
            await asyncio.wait_for(self._peers_ready.wait(), peers_timeout_s)
        except TimeoutError:
            log.warning(
                "fanout: not every process answered the hello",
                expected=self._hello_expect,
                answered=len(self._answers),
            )

    def _check_peers_ready(self) -> None:
        if self._hello_expect is not None and len(self._answers) >= self._hello_expect:
            self._peers_ready.set()

    def _say_hello(self) -> None:
        """(Re)subscribed: ask the other processes to publish their frames again."""
        self._alone = False
        self._peers_epoch += 1
        self._hello_expect = None
        self._answers.clear()
        self._peers_ready.clear()
        self._put_control(self.keys.hello(), HelloEnvelope(self.origin))

    async def _listen_loop(self) -> None:
        k = self.keys
        # The hello channel last: its confirmation (also when redis-py resubscribes after a
        # reconnect, in the same order) means every channel is listened to.
        order = [k.events(), k.done(), k.abort(), k.hello()]
        channels = set(order)
        pubsub = self.redis.pubsub()
        try:
            await redis_call(pubsub.subscribe(*order))
            confirmed: set[str] = set()
            while True:
                # Bounded by its own timeout (None after 1 s of silence): no second one per
                # message from `redis_call`.
                msg = await pubsub.get_message(timeout=1.0)
                checkpoint()
                if msg is None:
                    continue
                kind = as_text(msg["type"])
                if kind == "message":
                    self._deliver(as_text(msg["channel"]), msg["data"])
                elif kind == "subscribe":
                    # Also after a reconnect, when redis-py resubscribes on its own.
                    channel = as_text(msg["channel"])
                    confirmed.add(channel)
                    if confirmed >= channels:
                        self._subscribed.set()
                        if channel == k.hello():
                            self._say_hello()
        finally:
            self._subscribed.clear()
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _deliver(self, channel: str, data: bytes) -> None:
        k = self.keys
        try:
            if channel == k.events():
                self._deliver_events(data)
            elif channel == k.done():
                done = _done_dec.decode(data)
                self.received += 1
                self.on_done(done.record)
            elif channel == k.abort():
                abort = _abort_dec.decode(data)
                self.received += 1
                self.on_abort(abort.run_id)
            elif channel == k.hello():
                self._on_hello(_hello_dec.decode(data))
        except msgspec.DecodeError as exc:
            self.bad_messages += 1
            log.warning("fanout: undecodable message", channel=channel, error=str(exc))
        except Exception:
            self.callback_errors += 1
            log.exception("fanout: callback raised", channel=channel)

    def _on_hello(self, hello: HelloEnvelope) -> None:
        if hello.origin == self.origin:
            return
        self._alone = False  # another process listens: publish again, from now on
        self._peers_epoch += 1
        if not hello.to:
            self._put_control(self.keys.hello(), HelloEnvelope(self.origin, hello.origin))
        elif hello.to == self.origin:
            self._answers.add(hello.origin)
            self._check_peers_ready()

    def _deliver_events(self, data: bytes) -> None:
        """A batch of frames (or one frame in the older form), each to `on_event` in order;
        a callback that raises is counted and the batch's next frames are still delivered."""
        if _origin_dec.decode(data).origin == self.origin:
            return  # the local bus delivered them already
        try:
            batch = _batch_dec.decode(data)
            items = batch.events
        except msgspec.DecodeError:
            ev = _ev_dec.decode(data)  # the one-frame form; raises DecodeError if neither
            items = [EventItem(ev.run_id, ev.session_key, ev.frame, ev.end)]
        for item in items:
            self.received += 1
            try:
                self.on_event(item.run_id, item.session_key, item.frame, item.end)
            except Exception:
                self.callback_errors += 1
                log.exception("fanout: callback raised", channel=self.keys.events())

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._tasks or self._closed:
            raise RuntimeError("fanout already started")
        self._tasks = [
            self.tasks.loop(
                "fanout-send", lambda: self._guard("fanout-send", self._send_loop), retry_s=RETRY_S
            ),
            self.tasks.loop(
                "fanout-listen", lambda: self._guard("fanout-listen", self._listen_loop), retry_s=RETRY_S
            ),
        ]

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Send what is queued (bounded wait), then unsubscribe and end both tasks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._tasks and self._buf:
            await self.flush(flush_timeout_s)
        if self._tasks:
            await self.tasks.stop_loops("fanout-send", "fanout-listen")
        self.dropped += len(self._buf)
        self._buf.clear()

    async def _guard(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        await guarded(
            name, loop, log=log, label="fanout", retry_s=RETRY_S, on_error=self.tasks.record_failure
        )
