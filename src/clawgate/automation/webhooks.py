"""Run-end webhooks: each run with a `webhook` URL (its own, or `webhook_url`) has its final
answer POSTed there, signed the Standard Webhooks way.

The delivery is written with the run's end record in one store transaction (the run
service's end writer is `finish_run` here), so it survives any crash that the run's end
survives. One worker per gateway sleeps on the injected clock until the earliest due
delivery (at most `webhook_poll_s`), then attempts what is due, at most
`webhook_concurrency` at once. Each attempt first claims the delivery (Redis: a key with
expiry, so exactly one process attempts it; SQLite: one process per file) and re-reads it.
A 2xx deletes it; anything else schedules the next attempt with jittered exponential backoff
(or `Retry-After` on 429/503), until `webhook_max_attempts` or `webhook_retry_max_s` is
used up: then it is a dead letter, kept `webhook_dead_ttl_s`, listed by `webhooks.list`
and put back by `webhooks.retry`. Delivery is at least once: a crash after the receiver
answered but before the row was deleted sends it again, with the same `webhook-id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
import structlog

from clawgate import __version__
from clawgate.automation.webhook_rules import (
    backoff_s,
    is_private,
    retry_after_s,
    secret_key,
    sign,
    worker_wait_s,
)
from clawgate.errors import NotFound
from clawgate.settings import Settings
from clawgate.state.clock import Clock, wait_woken
from clawgate.state.registry import StateRegistry
from clawgate.state.supervisor import Supervisor
from clawgate.store.base import Fence, Store
from clawgate.store.records import RunRecord
from clawgate.store.webhook_store import DeliveryState, WebhookDelivery, WebhookStore

if TYPE_CHECKING:
    import httpx

log = structlog.get_logger("clawgate.webhooks")

Payload = Callable[[RunRecord], dict[str, Any]]


@dataclass
class Outcome:
    ok: bool = False
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    final: bool = False  # no later attempt can succeed (a refused target)


class WebhookService:
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        registry: StateRegistry,
        runs_store: Store,
        store: WebhookStore,
        payload: Payload,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.runs_store = runs_store
        self.store = store
        self.payload = payload
        self.owner = uuid.uuid4().hex
        self.key = secret_key(settings.webhook_secret) if settings.webhook_secret else None
        self.private_ok = settings.webhook_private_ok()
        self.rng = random.Random()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        # The owner of the delivery loop and the attempts: the gateway's task supervisor once
        # `start` is given it, a private one before (or for a webhook service started alone).
        self.tasks = Supervisor()
        self.http: httpx.AsyncClient | None = None  # made on the first delivery
        # Attempts in flight, by delivery id: at most `webhook_concurrency` (pump() never starts more).
        self.inflight: dict[str, asyncio.Task[None]] = {}
        # Deliveries another process holds the claim of (Redis), by id -> when that claim
        # expires: not tried again before, so a worker does not spin on them. Pruned each pass.
        self.lost: dict[str, float] = {}
        self.counts: dict[str, int] = {"pending": 0, "dead": 0}
        self.stats: dict[str, int] = {"delivered": 0, "failedAttempts": 0, "deadLettered": 0, "dropped": 0}
        registry.add(
            "webhook_outbox",
            lambda: self.counts["pending"] + self.counts["dead"],
            ttl_s=settings.webhook_retry_max_s + settings.webhook_dead_ttl_s,
            max_size=settings.webhook_outbox_max,
        )
        registry.add(
            "webhook_inflight", self.inflight.__len__, ttl_s=None, max_size=settings.webhook_concurrency
        )
        registry.add(
            "webhook_lost_claims",
            self.lost.__len__,
            ttl_s=settings.webhook_claim_s,
            max_size=settings.webhook_outbox_max,
        )
        registry.add_sweep("webhook_dead_letters", self.sweep)

    # -- the run service's end writer ----------------------------------------------------------------
    async def finish_run(self, rec: RunRecord, fence: Fence | None = None) -> RunRecord | None:
        """Write the run's end, with its delivery when it has a webhook, in one transaction
        (fenced on Redis like every run end: a writer that lost the run's lease writes neither).
        Returns the end as stored (`Store.end_run`)."""
        delivery = self.delivery_for(rec)
        if delivery is None:
            return await self.runs_store.end_run(rec, fence)
        stored = await self.store.finish_run(rec, delivery, fence)
        if stored is rec:
            self.counts["pending"] += 1
            self.wake.set()
        return stored

    def delivery_for(self, rec: RunRecord) -> WebhookDelivery | None:
        if not rec.webhook:
            return None
        if self.counts["pending"] + self.counts["dead"] >= self.settings.webhook_outbox_max:
            # The bound: a receiver down for long with many runs must not grow the outbox without
            # end. Counted and logged, never silent.
            self.stats["dropped"] += 1
            log.warning("webhook outbox full: delivery dropped", run_id=rec.run_id)
            return None
        now = self.clock.time()
        body = msgspec.json.encode(self.payload(rec)).decode()
        return WebhookDelivery(
            id=f"msg_{uuid.uuid4().hex}",
            run_id=rec.run_id,
            url=rec.webhook,
            body=body,
            created_at=now,
            next_at=now,
        )

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self, tasks: Supervisor | None = None) -> None:
        """Start the delivery loop, under the gateway's task supervisor when given one."""
        if self.task is not None:
            return
        if tasks is not None:
            self.tasks = tasks
        self.task = self.tasks.loop("clawgate-webhooks", self._loop, retry_s=self.settings.webhook_poll_s)

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for t in list(self.inflight.values()):
            t.cancel()  # still pending in the store: the next start attempts it again
        if self.inflight:
            await asyncio.gather(*self.inflight.values(), return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    async def _loop(self) -> None:
        while True:
            # Cleared before the look, not after: a wake-up during it (an attempt ending) is kept.
            self.wake.clear()
            started, busy, nxt, failed = 0, False, None, False
            try:
                await self.refresh_counts()
                started, busy = await self.pump()
                nxt = await self.store.next_due_at()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failed = True  # looked at again after `webhook_poll_s`
                if self.runs_store.is_outage(exc):
                    log.warning("webhooks: store unreachable", error=str(exc)[:200])
                else:
                    log.exception("webhooks: pass failed")
            # A store of this process alone needs no polling: every new delivery, retry and
            # finished attempt wakes the loop. A shared one is looked at every `webhook_poll_s`.
            poll_s = self.settings.webhook_poll_s
            wait_s = worker_wait_s(
                nxt,
                self.clock.time(),
                started=started,
                busy=busy,
                poll_s=poll_s if self.store.shared or failed else None,
                safety_s=poll_s,
            )
            await wait_woken(self.clock, self.wake, wait_s)

    async def pump(self) -> tuple[int, bool]:
        """Start an attempt of each due delivery there is a slot for: (attempts started, whether
        a due delivery was skipped: in flight here, claimed elsewhere, or no slot free)."""
        room = self.settings.webhook_concurrency - len(self.inflight)
        if room <= 0:
            return 0, True
        now = self.clock.time()
        for delivery_id in [i for i, until in self.lost.items() if until <= now]:
            del self.lost[delivery_id]
        started, busy = 0, False
        for d in await self.store.due(now, room + len(self.inflight) + len(self.lost)):
            if d.id in self.inflight or d.id in self.lost or started >= room:
                busy = True
                continue
            self.inflight[d.id] = self.tasks.spawn(self._attempt(d.id), name="webhook-attempt")
            started += 1
        return started, busy

    # -- one attempt --------------------------------------------------------------------------------
    async def _attempt(self, delivery_id: str) -> None:
        claimed = False
        try:
            if not await self.store.claim(delivery_id, self.owner, self.settings.webhook_claim_s):
                # Another process is attempting it; if that process dies, its claim expires.
                if len(self.lost) < self.settings.webhook_outbox_max:
                    self.lost[delivery_id] = self.clock.time() + self.settings.webhook_claim_s
                return
            claimed = True
            try:
                d = await self.store.get(delivery_id)
                # Re-read under the claim: delivered, dead or rescheduled by another process meanwhile.
                if d is None or d.state != "pending" or d.next_at > self.clock.time():
                    return
                await self._record(d, await self._send(d))
            finally:
                await self.store.release(delivery_id, self.owner)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("webhook attempt failed", id=delivery_id)
            if not self.runs_store.is_outage(exc):  # a bug, not an outage: counted
                self.tasks.record_failure("webhook-attempt", exc)
        finally:
            self.inflight.pop(delivery_id, None)
            if claimed:  # a slot is free and the outbox changed: look again now
                self.wake.set()

    async def _send(self, d: WebhookDelivery) -> Outcome:
        if not self.private_ok:
            refused = await self._refused(d.url)
            if refused is not None:
                return Outcome(error=refused, final=True)
        ts = int(self.clock.time())
        headers = {
            "content-type": "application/json",
            "user-agent": f"clawgate/{__version__}",
            "webhook-id": d.id,
            "webhook-timestamp": str(ts),
        }
        if self.key is not None:
            headers["webhook-signature"] = sign(self.key, d.id, ts, d.body)
        import httpx  # on the first delivery: a gateway without webhooks never loads it (nor rich)

        if self.http is None:
            self.http = httpx.AsyncClient(
                timeout=self.settings.webhook_timeout_s,
                follow_redirects=False,
                limits=httpx.Limits(max_connections=self.settings.webhook_concurrency),
                trust_env=False,
            )
        try:
            resp = await self.http.post(d.url, content=d.body.encode(), headers=headers)
        except httpx.HTTPError as exc:
            return Outcome(error=f"{type(exc).__name__}: {exc}"[:300])
        if 200 <= resp.status_code < 300:
            return Outcome(ok=True, status=resp.status_code)
        after = retry_after_s(resp.headers.get("retry-after"), self.clock.time())
        return Outcome(
            status=resp.status_code,
            error=f"HTTP {resp.status_code}",
            retry_after=after if resp.status_code in (429, 503) else None,
        )

    async def _refused(self, url: str) -> str | None:
        """Why the target is refused (a private or loopback address), or None. Every address
        the host resolves to is checked: one private one is enough to refuse."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port)
        except OSError as exc:
            return f"cannot resolve {host}: {exc}"
        for info in infos:
            address = str(info[4][0])
            if is_private(address):
                return f"refused: {host} resolves to a private or loopback address ({address})"
        return None

    async def _record(self, d: WebhookDelivery, out: Outcome) -> None:
        now = self.clock.time()
        if out.ok:
            await self.store.delete(d.id)
            self.stats["delivered"] += 1
            self.counts["pending"] = max(0, self.counts["pending"] - 1)
            return
        self.stats["failedAttempts"] += 1
        d.attempts += 1
        d.last_error, d.last_status = out.error, out.status
        delay = backoff_s(
            d.attempts, self.settings.webhook_retry_base_s, self.settings.webhook_retry_delay_max_s, self.rng
        )
        if out.retry_after is not None:
            delay = max(delay, out.retry_after)
        past_window = now + delay > d.created_at + self.settings.webhook_retry_max_s
        if out.final or d.attempts >= self.settings.webhook_max_attempts or past_window:
            d.state, d.dead_at = "dead", now
            self.stats["deadLettered"] += 1
            self.counts["pending"] = max(0, self.counts["pending"] - 1)
            self.counts["dead"] += 1
            log.warning(
                "webhook dead-lettered", id=d.id, run_id=d.run_id, attempts=d.attempts, error=d.last_error
            )
        else:
            d.next_at = now + delay
        await self.store.update(d)

    # -- the API behind webhooks.* ----------------------------------------------------------------------
    async def list(self, state: DeliveryState | None, limit: int) -> list[WebhookDelivery]:
        return await self.store.list(state, limit)

    async def retry(self, delivery_id: str) -> WebhookDelivery:
        d = await self.store.get(delivery_id)
        if d is None:
            raise NotFound(f"unknown webhook delivery {delivery_id[:64]!r}", details={"id": delivery_id})
        now = self.clock.time()
        # A fresh retry window and attempt budget; the same webhook-id, so a receiver that did get
        # an earlier attempt still sees one delivery.
        d.state, d.attempts, d.created_at, d.next_at, d.dead_at = "pending", 0, now, now, None
        await self.store.update(d)
        self.wake.set()
        return d

    async def sweep(self) -> int:
        return await self.store.sweep_dead(self.clock.time() - self.settings.webhook_dead_ttl_s)

    async def refresh_counts(self) -> dict[str, int]:
        """The outbox counts from the store (other processes' deliveries included on Redis)."""
        self.counts = await self.store.counts()
        return self.counts

    def describe(self) -> dict[str, Any]:
        return {
            **self.counts,
            "inFlight": len(self.inflight),
            **self.stats,
            "allowPrivate": self.private_ok,
            "signed": self.key is not None,
        }
