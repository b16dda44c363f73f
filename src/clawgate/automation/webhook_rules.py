"""Pure rules of run-end webhooks: URL checks, Standard Webhooks signatures, retry timing.

No I/O here; automation/webhooks.py does the sending.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import random
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from clawgate.errors import InvalidRequest

URL_MAX = 2048


def check_url(url: str, field: str = "webhook") -> str:
    """An absolute http(s) URL with a host, or INVALID_REQUEST naming the field."""
    parts = urlsplit(url)
    if len(url) > URL_MAX or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"{field} must be an http(s) URL with a host", details={"field": field})
    try:
        parts.port  # noqa: B018 (raises on a port out of range)
    except ValueError:
        raise InvalidRequest(f"{field} has an invalid port", details={"field": field}) from None
    return url


def secret_key(secret: str) -> bytes:
    """The HMAC key: `whsec_<base64>` is decoded as the Standard Webhooks spec says; any other
    string is used as its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_") :])
    return secret.encode()


def sign(key: bytes, msg_id: str, timestamp: int, body: str) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(key: bytes, msg_id: str, timestamp: int, body: str, header: str) -> bool:
    """What a receiver does: any of the space-separated `v1,` signatures matches."""
    expected = sign(key, msg_id, timestamp, body)
    return any(hmac.compare_digest(expected, s) for s in header.split())


def is_private(address: str) -> bool:
    """Loopback, private, link-local, unspecified, reserved or multicast: not the public internet."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Delay before attempt `attempt + 1` (after `attempt` failures): exponential, jittered
    between half and all of it, so deliveries that failed together do not retry together."""
    full = min(max_s, base_s * 2.0 ** max(0, attempt - 1))
    return float(full * (0.5 + rng.random() / 2))


def retry_after_s(value: str | None, now: float) -> float | None:
    """A `Retry-After` header (seconds, or an HTTP date) as a delay; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError):
        return None


def worker_wait_s(
    next_due: float | None,
    now: float,
    *,
    started: int,
    busy: bool,
    poll_s: float | None,
    safety_s: float,
) -> float | None:
    """How long the delivery worker waits after a look at the outbox (None: until woken).

    `next_due`: the earliest `next_at` of a pending delivery, read after the pass; `now`: the
    clock after that read; `started`: attempts the pass started; `busy`: the pass skipped a
    due delivery because it was in flight here, claimed elsewhere or no slot was free;
    `poll_s`: the longest wait (a shared store's poll, or after a failed pass), or None;
    `safety_s`: the longest wait for a wake-up while everything due is busy.

    Something due that the pass neither started nor skipped (it came due after the pass read
    the clock, or the clock moved meanwhile) means look again now: waiting for a wake-up
    there would hold a due retry until the next poll (for ever under a fake clock).
    """
    if next_due is None:
        return poll_s
    if next_due > now:
        return min(poll_s if poll_s is not None else float("inf"), next_due - now)
    if started or not busy:
        return 0.0
    # Everything due is in flight here or claimed elsewhere: an attempt ending wakes the loop;
    # a poll is the safety net against a lost wake-up (and a claim that expires elsewhere).
    return poll_s if poll_s is not None else safety_s
