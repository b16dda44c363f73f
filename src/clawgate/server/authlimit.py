"""Failed authentication, limited per peer address (OpenClaw's defaults: 10 in 60 s, 5 min lockout).

Without it, 480 wrong tokens took under a second and the right one still worked
straight after. Loopback peers are exempt (a local CLI must never lock its user
out), except browser pages: a page on loopback could otherwise guess freely.
The state per address lives in a registered TTLMap, bounded in size, swept by
maintenance, timed by the injected clock.
"""

from __future__ import annotations

import ipaddress
from collections import deque

from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.state.ttlmap import TTLMap


class _Peer:
    __slots__ = ("failures", "locked_until")

    def __init__(self, max_attempts: int) -> None:
        self.failures: deque[float] = deque(maxlen=max_attempts)
        self.locked_until = 0.0


def peer_key(host: str) -> str:
    """The unit of limiting: the address, or its /64 for IPv6 (one host usually holds a whole /64)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class AuthFailureLimiter:
    def __init__(
        self,
        clock: Clock,
        registry: StateRegistry,
        *,
        max_attempts: int,
        window_s: float,
        lockout_s: float,
        max_peers: int,
    ) -> None:
        self.clock = clock
        self.max_attempts = max_attempts
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.lockouts = 0
        self._peers: TTLMap[str, _Peer] = TTLMap(
            "auth_failures", clock, ttl_s=max(window_s, lockout_s), max_size=max_peers
        )
        registry.register(self._peers)

    def retry_after_s(self, key: str) -> float | None:
        """Seconds until `key` may try again, or None when it is not locked out."""
        peer = self._peers.get(key)
        if peer is None:
            return None
        left = peer.locked_until - self.clock.time()
        return left if left > 0 else None

    def failed(self, key: str) -> None:
        now = self.clock.time()
        peer = self._peers.get(key)
        if peer is None:
            peer = _Peer(self.max_attempts)
        elif peer.locked_until > now:
            return  # already locked out: the lockout keeps its end
        while peer.failures and peer.failures[0] <= now - self.window_s:
            peer.failures.popleft()
        peer.failures.append(now)
        if len(peer.failures) >= self.max_attempts:
            peer.failures.clear()
            peer.locked_until = now + self.lockout_s
            self.lockouts += 1
            self._peers.set(key, peer, ttl_s=self.lockout_s)
        else:
            # Kept as long as its latest failure still counts.
            self._peers.set(key, peer, ttl_s=self.window_s)

    def succeeded(self, key: str) -> None:
        self._peers.pop(key)
