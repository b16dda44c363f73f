"""Bounded in-memory state: the clock, TTL maps, the registry and the maintenance scheduler."""

from clawgate.state.clock import Clock, FakeClock, SystemClock
from clawgate.state.maintenance import Maintenance
from clawgate.state.registry import StateRegistry
from clawgate.state.ttlmap import TTLMap

__all__ = ["Clock", "FakeClock", "Maintenance", "StateRegistry", "SystemClock", "TTLMap"]
