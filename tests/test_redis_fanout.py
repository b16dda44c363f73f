"""RedisEventRelay against the real Redis: two (or three) fan-out instances with different
origins on one prefix stand for gateway processes."""

from __future__ import annotations

import asyncio
import gc
import inspect
import uuid
import warnings
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from clawgate.scaleout.fanout import RedisEventRelay
from helpers import wait_until

pytestmark = pytest.mark.redis


class Node:
    """One process: its fan-out and what its callbacks saw."""

    def __init__(self, client: aioredis.Redis, prefix: str, origin: str, **kw: Any) -> None:
        self.events: list[tuple[str | None, str, bytes]] = []
        self.done: list[bytes] = []
        self.aborts: list[str] = []
        self.fanout = RedisEventRelay(
            client,
            prefix=prefix,
            origin=origin,
            on_event=lambda run_id, session, frame, end: self.events.append((run_id, session, frame)),
            on_done=self.done.append,
            on_abort=self.aborts.append,
            **kw,
        )


class Env:
    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"cgtest:{uuid.uuid4().hex[:12]}"
        self.admin = aioredis.from_url(url)
        self.clients: list[aioredis.Redis] = []
        self.nodes: list[Node] = []

    async def node(self, origin: str, **kw: Any) -> Node:
        client = aioredis.from_url(self.url, socket_timeout=10)
        self.clients.append(client)
        n = Node(client, self.prefix, origin, **kw)
        self.nodes.append(n)
        n.fanout.start()
        await n.fanout.wait_subscribed()
        return n

    async def subscribers(self) -> dict[str, int]:
        chans = [f"{self.prefix}:{c}" for c in ("ev", "done", "abort")]
        return {_s(k): v for k, v in await self.admin.pubsub_numsub(*chans)}

    async def close(self) -> None:
        for n in self.nodes:
            await n.fanout.stop()
        for c in self.clients:
            await c.aclose()
        await self.admin.aclose()


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


@pytest.fixture
async def env(redis_url: str) -> AsyncIterator[Env]:
    e = Env(redis_url)
    try:
        yield e
    finally:
        await e.close()


def frame(i: int) -> bytes:
    # Binary, not valid UTF-8, varying sizes: the bytes must come through untouched.
    return b"\x00\xff" + i.to_bytes(4, "big") + b"x" * (i % 300)


async def test_events_reach_other_processes_exactly_in_order_and_not_their_origin(env: Env) -> None:
    a = await env.node("proc-a")
    b = await env.node("proc-b")
    assert not inspect.iscoroutinefunction(RedisEventRelay.publish_event)
    sent = [(None if i % 10 == 0 else f"run-{i % 7}", f"agent:main:s{i % 3}", frame(i)) for i in range(1000)]
    for run_id, session, fr in sent:
        a.fanout.publish_event(run_id, session, fr)
    # Nothing was sent yet: publishing only queued (no await happened in between).
    assert a.fanout.pending == 1000
    assert a.fanout.published == 0

    assert await a.fanout.flush()
    await wait_until(lambda: len(b.events) >= 1000, what="1,000 events on B")
    await asyncio.sleep(0.05)  # an echo to A would arrive by now
    assert b.events == sent
    assert a.events == []  # a process never receives its own events
    assert (a.fanout.published, a.fanout.dropped, a.fanout.failed) == (1000, 0, 0)
    assert b.fanout.received == 1000

    # And the other way round.
    b.fanout.publish_event("run-b", "agent:main:b", b"from-b")
    await wait_until(lambda: len(a.events) == 1, what="B's event on A")
    assert a.events == [("run-b", "agent:main:b", b"from-b")]
    assert b.events == sent


async def test_done_and_abort_reach_every_process_including_the_sender(env: Env) -> None:
    a = await env.node("proc-a")
    b = await env.node("proc-b")
    record = b'{"runId":"r1","status":"ok","result":"\xc3\xa9"}'
    a.fanout.publish_done(record)
    b.fanout.publish_abort("r2")
    a.fanout.publish_abort("r3")
    await wait_until(
        lambda: len(a.aborts) == 2 and len(b.aborts) == 2 and a.done and b.done, what="control messages"
    )
    assert a.done == [record] and b.done == [record]
    assert sorted(a.aborts) == ["r2", "r3"] and sorted(b.aborts) == ["r2", "r3"]
    assert a.events == [] and b.events == []


async def test_done_after_events_arrives_after_them(env: Env) -> None:
    a = await env.node("proc-a")
    b = await env.node("proc-b")
    order: list[str] = []
    b.fanout.on_event = lambda run_id, session, fr, end: order.append(fr.decode())
    b.fanout.on_done = lambda rec: order.append("done:" + rec.decode())
    for i in range(50):
        a.fanout.publish_event("r1", "agent:main:main", f"e{i}".encode())
    a.fanout.publish_done(b'{"runId":"r1"}')
    await wait_until(lambda: len(order) == 51, what="events then done")
    assert order == [f"e{i}" for i in range(50)] + ['done:{"runId":"r1"}']


async def test_full_buffer_drops_and_counts_events_but_keeps_done(env: Env) -> None:
    a = await env.node("proc-a", buffer_max=10)
    b = await env.node("proc-b")
    for i in range(15):
        a.fanout.publish_event("r", "agent:main:main", frame(i))
    a.fanout.publish_done(b'{"runId":"r"}')  # over the event bound, within the reserve
    assert a.fanout.pending == 11
    assert a.fanout.dropped == 5
    assert await a.fanout.flush()
    await wait_until(lambda: len(b.events) == 10 and len(b.done) == 1, what="the kept messages")
    assert [fr for _, _, fr in b.events] == [frame(i) for i in range(10)]
    assert b.done == [b'{"runId":"r"}']


async def test_undecodable_or_raising_messages_do_not_stop_delivery(env: Env) -> None:
    a = await env.node("proc-a")
    b = await env.node("proc-b")
    await env.admin.publish(f"{env.prefix}:ev", b"not msgpack at all \xc1")
    await env.admin.publish(f"{env.prefix}:abort", b"\x93\x01\x02\x03")  # wrong shape

    def boom(run_id: str | None, session: str, fr: bytes, end: int) -> None:
        if fr == b"bad":
            raise RuntimeError("callback bug")
        b.events.append((run_id, session, fr))

    b.fanout.on_event = boom
    a.fanout.publish_event("r", "agent:main:main", b"bad")
    a.fanout.publish_event("r", "agent:main:main", b"good")
    await wait_until(lambda: len(b.events) == 1, what="the good event")
    assert b.events == [("r", "agent:main:main", b"good")]
    assert b.fanout.bad_messages == 2
    assert b.fanout.callback_errors == 1


async def test_stop_sends_what_is_queued_and_unsubscribes(env: Env) -> None:
    a = await env.node("proc-a")
    b = await env.node("proc-b")
    assert await env.subscribers() == {f"{env.prefix}:{c}": 2 for c in ("ev", "done", "abort")}
    for i in range(100):
        a.fanout.publish_event("r", "agent:main:main", frame(i))
    await a.fanout.stop()  # flushes first
    assert a.fanout.published == 100
    await wait_until(lambda: len(b.events) == 100, what="events queued before stop")
    assert await env.subscribers() == {f"{env.prefix}:{c}": 1 for c in ("ev", "done", "abort")}
    a.fanout.publish_event("r", "agent:main:main", b"late")  # after stop: dropped, not queued
    assert a.fanout.pending == 0 and a.fanout.dropped == 1
    await a.fanout.stop()  # idempotent
    await b.fanout.stop()
    assert await env.subscribers() == {f"{env.prefix}:{c}": 0 for c in ("ev", "done", "abort")}
    assert all(t.done() for n in (a, b) for t in n.fanout._tasks)


async def test_stop_leaves_no_unclosed_resources(redis_url: str) -> None:
    prefix = f"cgtest:{uuid.uuid4().hex[:12]}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = aioredis.from_url(redis_url, socket_timeout=10)
        node = Node(client, prefix, "proc-x")
        node.fanout.start()
        await node.fanout.wait_subscribed()
        node.fanout.publish_event("r", "agent:main:main", b"x")
        await node.fanout.stop()
        await client.aclose()
        del node, client
        gc.collect()
    assert [str(w.message) for w in caught] == []


async def test_frames_queued_together_go_out_as_one_message_and_the_one_frame_form_is_still_read(
    env: Env,
) -> None:
    a = await env.node("proc-a")
    b = await env.node("proc-b")
    sent = [(f"run-{i % 3}", "agent:main:main", frame(i)) for i in range(100)]
    for run_id, session, fr in sent:
        a.fanout.publish_event(run_id, session, fr)
    a.fanout.publish_done(b'{"runId":"run-0"}')
    assert await a.fanout.flush()
    await wait_until(lambda: len(b.events) == 100 and len(b.done) == 1, what="the batch and the done")
    assert b.events == sent
    assert (a.fanout.published, a.fanout.publishes) == (101, 2)  # one batch of frames, one done
    assert b.fanout.received == 101

    # A frame in the one-frame form [origin, runId, sessionKey, frame] is delivered as before.
    old = msgspec.msgpack.encode(["proc-old", "run-x", "agent:main:x", b"\x00old"])
    await env.admin.publish(f"{env.prefix}:ev", old)
    await wait_until(lambda: len(b.events) == 101, what="the one-frame message")
    assert b.events[-1] == ("run-x", "agent:main:x", b"\x00old")
    assert b.fanout.bad_messages == 0


async def test_a_lone_process_stops_publishing_frames_and_a_joiner_misses_none_after_it_serves(
    env: Env,
) -> None:
    """One gateway on Redis publishes its frames to nobody: once a PUBLISH says only this
    process listens, frames are not sent (counted in `skipped`); done messages still are.
    A process that joins sends a hello and `wait_subscribed` returns only after the lone
    process answered it, so every frame published after that reaches the joiner."""
    a = await env.node("proc-a")  # its hello reached only itself: A knows it is alone
    for i in range(50):
        a.fanout.publish_event(f"run-{i}", "agent:main:s", frame(i))
    assert await a.fanout.flush()
    assert a.fanout.skipped == 50 and a.fanout.published == 0
    a.fanout.publish_done(b'{"runId":"r"}')  # control messages still go out (A acts on its own)
    await wait_until(lambda: a.done == [b'{"runId":"r"}'], what="A's own done")

    b = await env.node("proc-b")  # returns once A answered B's hello
    sent = [(f"run-{i}", "agent:main:s", frame(i)) for i in range(100)]
    for run_id, session, fr in sent:
        a.fanout.publish_event(run_id, session, fr)
    assert await a.fanout.flush()
    await wait_until(lambda: len(b.events) == 100, what="every frame A published after B joined")
    assert b.events == sent and a.fanout.skipped == 50

    # B leaves: A's next PUBLISH reaches only A, and A pauses again.
    await b.fanout.stop()
    env.nodes.remove(b)
    a.fanout.publish_event("run-x", "agent:main:s", frame(1))
    assert await a.fanout.flush()
    assert (a.fanout.published, a.fanout.skipped) == (102, 50)  # with the done
    a.fanout.publish_event("run-y", "agent:main:s", frame(2))
    assert await a.fanout.flush()
    assert (a.fanout.published, a.fanout.skipped) == (102, 51)


async def test_a_process_that_missed_a_hello_resumes_when_a_done_reaches_another_process(env: Env) -> None:
    """A process that believes it is alone (a peer's hello lost, or a peer of an older
    version that sends none) publishes again as soon as a done message of its own reaches
    more than itself."""
    a = await env.node("proc-a")
    b = await env.node("proc-b")
    a.fanout._alone = True  # as if B's hello had never arrived
    a.fanout.publish_event("run-lost", "agent:main:s", frame(0))
    a.fanout.publish_done(b'{"runId":"r"}')
    assert await a.fanout.flush()
    assert a.fanout.skipped == 1
    a.fanout.publish_event("run-1", "agent:main:s", frame(1))
    assert await a.fanout.flush()
    await wait_until(lambda: b.events == [("run-1", "agent:main:s", frame(1))], what="A publishing again")
