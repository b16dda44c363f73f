"""Run-end webhooks: a real HTTP receiver on 127.0.0.1 checks every delivery's Standard Webhooks
signature, the same webhook-id across retries, Retry-After, dead letters and webhooks.retry,
refused private targets, and at-least-once delivery across a gateway SIGKILL and restart."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clawgate.automation.webhook_rules import (
    backoff_s,
    is_private,
    retry_after_s,
    secret_key,
    sign,
    worker_wait_s,
)
from clawgate.client import Client, ClientError
from clawgate.settings import parse_settings
from clawgate.state.clock import FakeClock
from clawgate.store.records import RunRecord
from clawgate.store.sqlite import SqliteStore
from clawgate.testing import GatewayProcess
from clawgate.testing.process import free_port
from conftest import GatewayFactory, settle, unique_prefix
from helpers import wait_until

RAW_KEY = b"0123456789abcdef0123456789abcdef"
SECRET = "whsec_" + base64.b64encode(RAW_KEY).decode()


@dataclass
class Hit:
    path: str
    id: str
    timestamp: str
    signature: str
    body: str
    answered: int


@dataclass
class Receiver:
    """Answers each webhook-id with `script` (status codes, then 200), recording every request."""

    port: int
    script: list[int] = field(default_factory=list)
    retry_after: str | None = None
    always: int | None = None  # answer every request with this status
    hits: list[Hit] = field(default_factory=list)
    server: uvicorn.Server | None = None
    task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def attempts(self, msg_id: str) -> int:
        return sum(1 for h in self.hits if h.id == msg_id)

    async def handle(self, request: Request) -> Response:
        body = (await request.body()).decode()
        msg_id = request.headers.get("webhook-id", "")
        n = self.attempts(msg_id)
        status = self.always or (self.script[n] if n < len(self.script) else 200)
        self.hits.append(
            Hit(
                request.url.path,
                msg_id,
                request.headers.get("webhook-timestamp", ""),
                request.headers.get("webhook-signature", ""),
                body,
                status,
            )
        )
        headers = {"retry-after": self.retry_after} if self.retry_after and status in (429, 503) else {}
        return Response(status_code=status, headers=headers)

    async def start(self) -> None:
        app = Starlette(routes=[Route("/{path:path}", self.handle, methods=["POST"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            await self.task
            self.server = self.task = None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(free_port())
    await r.start()
    yield r
    await r.stop()


def verify(hit: Hit) -> bool:
    """What a receiver does (the README's recipe), written independently of the gateway's code."""
    signed = f"{hit.id}.{hit.timestamp}.{hit.body}".encode()
    expected = base64.b64encode(hmac.new(RAW_KEY, signed, hashlib.sha256).digest()).decode()
    return any(
        sig.startswith("v1,") and hmac.compare_digest(sig[3:], expected) for sig in hit.signature.split()
    )


async def quiet(seconds: float = 0.3) -> None:
    """Give the worker a chance to do what it must not do (the assertion after it can fail)."""
    await asyncio.sleep(seconds)


async def test_signed_delivery_retries_with_one_id_and_honours_retry_after(
    start_gateway: GatewayFactory, clock: FakeClock, receiver: Receiver
) -> None:
    receiver.script = [503, 500]
    receiver.retry_after = "30"
    gw = await start_gateway(webhook_secret=SECRET, webhook_retry_base_s=1.0)
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        final = await c.run_agent("[[reply:hello hooks]]", idempotency_key="wh-1", webhook=receiver.url)
        failed = gw.gateway.webhooks.stats
        await wait_until(lambda: failed["failedAttempts"] == 1)  # recorded, next attempt scheduled
        await clock.advance_async(10)  # the backoff alone would allow a retry; Retry-After: 30 does not
        await quiet()
        assert len(receiver.hits) == 1
        await clock.advance_async(25)
        await wait_until(lambda: failed["failedAttempts"] == 2)
        await clock.advance_async(5)  # second failure: backoff of at most 2 s
        await wait_until(lambda: len(receiver.hits) == 3)
        await wait_until(lambda: gw.gateway.webhooks.stats["delivered"] == 1)
        listed = await c.call("webhooks.list", {})
        assert listed["deliveries"] == [] and listed["pending"] == 0
    hits = receiver.hits
    assert [h.answered for h in hits] == [503, 500, 200]
    assert len({h.id for h in hits}) == 1 and hits[0].id.startswith("msg_")
    assert all(verify(h) for h in hits)
    assert len({h.timestamp for h in hits}) == 3  # each attempt is signed at its own time
    assert json.loads(hits[0].body) == final
    # A tampered body does not verify.
    assert not verify(Hit(hits[0].path, hits[0].id, hits[0].timestamp, hits[0].signature, "{}", 200))


async def test_dead_letter_is_listed_retried_by_id_and_expires(
    start_gateway: GatewayFactory, clock: FakeClock, receiver: Receiver
) -> None:
    receiver.always = 500
    gw = await start_gateway(
        webhook_secret=SECRET, webhook_max_attempts=2, webhook_retry_base_s=1.0, webhook_dead_ttl_s=3600
    )
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        await c.run_agent("[[reply:a]]", idempotency_key="dl-1", webhook=receiver.url)
        await c.run_agent("[[reply:b]]", idempotency_key="dl-2", webhook=receiver.url)
        await wait_until(lambda: gw.gateway.webhooks.stats["failedAttempts"] == 2)
        await clock.advance_async(5)
        await wait_until(lambda: gw.gateway.webhooks.stats["deadLettered"] == 2)
        dead = (await c.call("webhooks.list", {"state": "dead"}))["deliveries"]
        assert {d["runId"] for d in dead} == {"dl-1", "dl-2"}
        assert all(d["attempts"] == 2 and d["lastStatus"] == 500 and d["state"] == "dead" for d in dead)
        status = await c.call("status")
        assert status["webhooks"]["dead"] == 2 and status["state"]["webhook_outbox"] == 2
        assert (
            'clawgate_state_entries{structure="webhook_outbox"} 2.0' in gw.gateway.render_metrics().decode()
        )
        # No attempt after a delivery is dead, however long one waits.
        await clock.advance_async(600)
        await quiet()
        assert len(receiver.hits) == 4

        receiver.always = None
        first = next(d for d in dead if d["runId"] == "dl-1")
        retried = await c.call("webhooks.retry", {"id": first["id"]})
        assert retried["delivery"]["state"] == "pending"
        await wait_until(lambda: len(receiver.hits) == 5)
        assert receiver.hits[-1].id == first["id"] and receiver.hits[-1].answered == 200
        await wait_until(lambda: gw.gateway.webhooks.stats["delivered"] == 1)
        left = (await c.call("webhooks.list", {}))["deliveries"]
        assert [d["runId"] for d in left] == ["dl-2"]

        with pytest.raises(ClientError) as err:
            await c.call("webhooks.retry", {"id": "msg_nope"})
        assert err.value.code == "NOT_FOUND"

        # The other dead letter expires with its TTL (the maintenance sweep).
        await clock.advance_async(3601)
        await gw.gateway.maintenance.run_once()
        assert (await c.call("webhooks.list", {}))["deliveries"] == []
    assert all(verify(h) for h in receiver.hits)


async def test_private_targets_are_refused_when_not_allowed(
    start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await start_gateway(webhook_allow_private=False)
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        await c.run_agent("[[reply:x]]", idempotency_key="priv-1", webhook=receiver.url)
        await wait_until(lambda: gw.gateway.webhooks.stats["deadLettered"] == 1)
        (dead,) = (await c.call("webhooks.list", {"state": "dead"}))["deliveries"]
        assert "private or loopback" in dead["lastError"] and dead["attempts"] == 1
        localhost = receiver.url.replace("127.0.0.1", "localhost")  # a name resolving to loopback
        await c.run_agent("[[reply:y]]", idempotency_key="priv-2", webhook=localhost)
        await wait_until(lambda: gw.gateway.webhooks.stats["deadLettered"] == 2)
    assert receiver.hits == []


def test_private_targets_default_follows_the_bind_address(tmp_path: Path) -> None:
    base = {"state_dir": str(tmp_path)}
    assert parse_settings(base).webhook_private_ok() is True  # 127.0.0.1
    assert parse_settings({**base, "bind": "0.0.0.0", "token": "t" * 32}).webhook_private_ok() is False
    assert parse_settings(
        {**base, "bind": "0.0.0.0", "token": "t" * 32, "webhook_allow_private": True}
    ).webhook_private_ok()


async def test_bad_webhook_urls_are_refused(client: Client) -> None:
    for bad in ("ftp://example.com/x", "http:///nohost", "not a url", "http://x:99999/"):
        with pytest.raises(ClientError) as err:
            await client.call("agent", {"message": "hi", "idempotencyKey": "bad", "webhook": bad})
        assert err.value.code == "INVALID_REQUEST"


async def test_global_url_http_routes_chat_send_and_spawn(
    start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await start_gateway(
        webhook_url=receiver.url + "/global", webhook_secret=SECRET, hooks_token="h" * 32
    )
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        await c.call(
            "chat.send", {"sessionKey": "agent:main:g", "message": "[[reply:g]]", "idempotencyKey": "g-1"}
        )
        await c.call(
            "sessions.spawn",
            {"sessionKey": "agent:main:g", "task": "[[reply:child]]", "webhook": receiver.url + "/spawn"},
        )
        async with httpx.AsyncClient(base_url=gw.url.replace("ws://", "http://").rstrip("/")) as http:
            r = await http.post(
                "/v1/runs/wait",
                json={
                    "message": "[[reply:rest]]",
                    "idempotencyKey": "rest-1",
                    "webhook": receiver.url + "/rest",
                },
            )
            assert r.status_code == 200, r.text
            r = await http.post(
                "/hooks/agent",
                json={"message": "[[reply:hk]]", "webhook": receiver.url + "/hook"},
                headers={"authorization": "Bearer " + "h" * 32},
            )
            assert r.status_code in (200, 202), r.text
        await settle(gw.gateway)
        await wait_until(lambda: len(receiver.hits) == 4)
        rec = await gw.gateway.store.get_run("rest-1")
        assert rec is not None and rec.webhook == receiver.url + "/rest"  # recorded with the run
    by_path = {h.path: json.loads(h.body) for h in receiver.hits}
    assert set(by_path) == {"/hook/global", "/hook/spawn", "/hook/rest", "/hook/hook"}
    assert by_path["/hook/global"]["runId"] == "g-1"
    assert by_path["/hook/rest"]["result"]["payloads"][0]["text"] == "rest"
    assert by_path["/hook/spawn"]["result"]["payloads"][0]["text"] == "child"
    assert all(verify(h) for h in receiver.hits)


async def test_run_end_and_delivery_are_one_transaction(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    try:
        rec = RunRecord(run_id="r1", session_key="agent:main:main", agent_id="main", message="m")
        await store.put_run(rec)
        rec.status, rec.ended_at = "ok", 1.0

        def broken(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO no_such_table VALUES (1)")

        with pytest.raises(Exception, match="no_such_table"):
            await store.finish_run(rec, broken)
        stored = await store.get_run("r1")
        assert stored is not None and stored.status == "queued"  # the end was rolled back with it
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_each_webhook_is_delivered_by_exactly_one_process(
    start_gateway: GatewayFactory, redis_url: str, receiver: Receiver
) -> None:
    prefix = unique_prefix()
    common: dict[str, Any] = {"store": redis_url, "redis_prefix": prefix, "webhook_secret": SECRET}
    a = await start_gateway(**common)
    b = await start_gateway(**common)
    async with Client(a.url, max_reconnect_attempts=0) as ca, Client(b.url, max_reconnect_attempts=0) as cb:
        finals = await asyncio.gather(
            *[
                (ca if i % 2 else cb).run_agent(
                    f"[[reply:r{i}]]",
                    session_key=f"agent:main:s{i}",
                    idempotency_key=f"{prefix}-{i}",
                    webhook=receiver.url,
                )
                for i in range(20)
            ]
        )
        assert all(f["status"] == "ok" for f in finals)
        await wait_until(lambda: len(receiver.hits) >= 20)
        # Each delivery is deleted from the outbox (a store write) after its 200 came back,
        # then counted: wait for the count, then give a duplicate attempt its chance.
        await wait_until(
            lambda: a.gateway.webhooks.stats["delivered"] + b.gateway.webhooks.stats["delivered"] >= 20,
            "20 deliveries recorded",
        )
        await quiet()
        pending = await a.gateway.webhooks.store.counts()
        assert pending == {"pending": 0, "dead": 0}
    assert len(receiver.hits) == 20
    assert len({h.id for h in receiver.hits}) == 20
    assert {json.loads(h.body)["runId"] for h in receiver.hits} == {f"{prefix}-{i}" for i in range(20)}
    assert all(verify(h) for h in receiver.hits)
    assert a.gateway.webhooks.stats["delivered"] + b.gateway.webhooks.stats["delivered"] == 20


async def test_delivery_survives_sigkill_and_restart(tmp_path: Path) -> None:
    """Runs end while the receiver is down; the gateway is SIGKILLed with every delivery pending;
    after a restart they all arrive, each under one id, signed, none twice under two ids."""
    receiver = Receiver(free_port(), script=[500])  # and then the first attempt after the restart fails
    settings = {
        "webhook_url": receiver.url,
        "webhook_secret": SECRET,
        "webhook_retry_base_s": 0.05,
        "webhook_retry_delay_max_s": 0.2,
        "webhook_max_attempts": 1000,
        "webhook_poll_s": 0.2,
    }
    n = 8
    state = tmp_path / "state"
    async with GatewayProcess(state, settings=settings) as gp:
        async with Client(gp.url, max_reconnect_attempts=0) as c:
            finals = [
                await c.run_agent(
                    f"[[reply:k{i}]]", session_key=f"agent:main:k{i}", idempotency_key=f"kill-{i}"
                )
                for i in range(n)
            ]
        assert all(f["status"] == "ok" for f in finals)
        gp.kill()  # SIGKILL: nothing flushed, nothing handed over
    db = sqlite3.connect(state / "clawgate.db")
    try:
        pending = db.execute("SELECT count(*) FROM webhook_outbox WHERE state='pending'").fetchone()[0]
    finally:
        db.close()
    assert pending == n  # every run's delivery was durable with its end
    await receiver.start()
    try:
        async with GatewayProcess(state, settings=settings):
            await wait_until(lambda: len({h.id for h in receiver.hits if h.answered == 200}) == n, timeout=30)
            await quiet(0.5)
    finally:
        await receiver.stop()
    ok = [h for h in receiver.hits if h.answered == 200]
    assert {json.loads(h.body)["runId"] for h in ok} == {f"kill-{i}" for i in range(n)}
    ids_by_run: dict[str, set[str]] = {}
    for h in receiver.hits:
        ids_by_run.setdefault(json.loads(h.body)["runId"], set()).add(h.id)
    assert all(len(ids) == 1 for ids in ids_by_run.values())  # retries keep their id
    assert len(ok) == n  # nothing delivered twice
    assert all(receiver.attempts(h.id) == 2 for h in ok)  # 500, then 200
    assert all(verify(h) for h in receiver.hits)


def test_signature_matches_the_standard_webhooks_example() -> None:
    # The example of the Standard Webhooks specification (secret, id, timestamp, body, signature).
    key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    sig = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, '{"test": 2432232314}')
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert secret_key("plain") == b"plain"


def test_address_and_retry_rules() -> None:
    for private in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "fe80::1%eth0",
                    "::ffff:10.0.0.1", "0.0.0.0", "100.64.0.1", "224.0.0.1"):  # fmt: skip
        assert is_private(private), private
    for public in ("8.8.8.8", "2606:4700:4700::1111", "::ffff:1.1.1.1"):
        assert not is_private(public), public
    assert retry_after_s("30", 0.0) == 30.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10.0
    assert retry_after_s("soon", 0.0) is None and retry_after_s(None, 0.0) is None
    rng = random.Random(1)
    delays = [backoff_s(n, 1.0, 10.0, rng) for n in range(1, 8)]
    assert all(0.5 * min(10.0, 2 ** (n - 1)) <= d <= min(10.0, 2 ** (n - 1)) for n, d in enumerate(delays, 1))


def test_worker_looks_again_at_once_when_a_retry_came_due_during_its_pass() -> None:
    """The worker's pass reads the clock, asks for due deliveries, then for the next due time.
    When the clock moves in between (another task, or a test's `FakeClock.advance`), a retry
    that was not due for the pass is due by the time the wait is computed. The worker used to
    treat "due now, nothing started" as "everything due is in flight" and wait for a wake-up
    that never came, for `webhook_poll_s` (for ever under a fake clock: the CI failure of
    test_signed_delivery_retries_with_one_id_and_honours_retry_after). It looks again now."""
    wait = worker_wait_s(100.0, 104.0, started=0, busy=False, poll_s=None, safety_s=5.0)
    assert wait == 0.0
    # Due and skipped because it is in flight here: woken by the attempt's end, poll as safety.
    assert worker_wait_s(100.0, 104.0, started=0, busy=True, poll_s=None, safety_s=5.0) == 5.0
    assert worker_wait_s(100.0, 104.0, started=0, busy=True, poll_s=2.0, safety_s=5.0) == 2.0
    # Started some: more may be due beyond the slots it had, look again now.
    assert worker_wait_s(100.0, 104.0, started=3, busy=True, poll_s=None, safety_s=5.0) == 0.0
    # Not due yet: until it is, or the poll of a shared store if sooner.
    assert worker_wait_s(110.0, 104.0, started=0, busy=False, poll_s=None, safety_s=5.0) == 6.0
    assert worker_wait_s(110.0, 104.0, started=0, busy=False, poll_s=5.0, safety_s=5.0) == 5.0
    # Nothing pending: until woken (one process), or the poll (a shared store, a failed pass).
    assert worker_wait_s(None, 104.0, started=0, busy=False, poll_s=None, safety_s=5.0) is None
    assert worker_wait_s(None, 104.0, started=0, busy=False, poll_s=5.0, safety_s=5.0) == 5.0


async def test_cron_job_webhook_gets_each_occurrence(
    start_gateway: GatewayFactory, clock: FakeClock, receiver: Receiver
) -> None:
    gw = await start_gateway(webhook_secret=SECRET)
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        with pytest.raises(ClientError) as err:
            await c.call(
                "cron.add",
                {
                    "name": "bad",
                    "schedule": {"kind": "every", "everyMs": 60_000},
                    "message": "x",
                    "webhook": "ftp://x",
                },
            )
        assert err.value.code == "INVALID_REQUEST"
        job = (
            await c.call(
                "cron.add",
                {
                    "name": "hooked",
                    "schedule": {"kind": "every", "everyMs": 60_000},
                    "message": "[[reply:tick]]",
                    "webhook": receiver.url,
                },
            )
        )["job"]
        assert job["webhook"] == receiver.url
        await clock.advance_async(60, settle=20)
        await wait_until(lambda: len(receiver.hits) == 1)
    body = json.loads(receiver.hits[0].body)
    assert body["runId"].startswith(f"cron-{job['id']}-") and body["status"] == "ok"
    assert verify(receiver.hits[0])


class _BuggyTransport(httpx.AsyncBaseTransport):
    """The HTTP client's transport with a bug: it raises what httpx never does (no HTTPError)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise RuntimeError("transport bug")


async def test_a_failing_delivery_attempt_is_counted_under_its_task_name(
    start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    rg = await start_gateway()
    gw = rg.gateway
    gw.webhooks.http = httpx.AsyncClient(transport=_BuggyTransport())
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        await c.run_agent("[[reply:hello hooks]]", idempotency_key="wh-bug", webhook=receiver.url)
        await wait_until(lambda: gw.supervisor.errors["webhook-attempt"] >= 1)
        status = await c.status()
        assert status["tasks"]["errors"]["webhook-attempt"] >= 1
        assert set(status["tasks"]["errors"]) == {"webhook-attempt"}  # a bounded name, not the delivery id
        assert gw.internal_errors >= 1
        # The delivery is still pending: with the bug gone, it goes out.
        buggy, gw.webhooks.http = gw.webhooks.http, None
        await buggy.aclose()
        await wait_until(lambda: gw.webhooks.stats["delivered"] == 1)
    assert len(receiver.hits) == 1
