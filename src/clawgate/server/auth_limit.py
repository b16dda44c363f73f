"""Failed-authentication limiter per peer address (no I/O; reads the injected clock).

OpenClaw's defaults: 10 failures within 60 s lock the address out for 5 minutes. The
per-address records live in a registered TTLMap, so a scan from many addresses cannot
grow the gateway: past `max_peers` the least recently seen address is forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clawgate.state.clock import Clock
from clawgate.state.ttlmap import TTLMap


@dataclass
class _Peer:
    failures: list[float] = field(default_factory=list)
    locked_until: float = 0.0


class AuthFailures:
    def __init__(
        self,
        clock: Clock,
        *,
        max_failures: int = 10,
        window_s: float = 60.0,
        lockout_s: float = 300.0,
        max_peers: int = 10_000,
    ) -> None:
        self.clock = clock
        self.max_failures = max_failures
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.peers: TTLMap[str, _Peer] = TTLMap(
            "auth_failures", clock, ttl_s=max(window_s, lockout_s), max_size=max_peers
        )
        self.lockouts = 0

    def locked_for(self, peer: str) -> float:
        """Seconds left of this peer's lockout (0 when it may try)."""
        rec = self.peers.get(peer)
        if rec is None:
            return 0.0
        return max(0.0, rec.locked_until - self.clock.time())

    def failed(self, peer: str) -> None:
        now = self.clock.time()
        rec = self.peers.get(peer)
        if rec is None:
            rec = _Peer()
        rec.failures = [t for t in rec.failures if t > now - self.window_s]
        rec.failures.append(now)
        if len(rec.failures) >= self.max_failures:
            rec.locked_until = now + self.lockout_s
            rec.failures.clear()
            self.lockouts += 1
        # Re-set so the record lives a full window (or lockout) after its last failure.
        self.peers.set(peer, rec)
