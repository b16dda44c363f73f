"""StateRegistry: the list of every bounded in-memory structure of a gateway.

A structure registers with a name, its TTL and its bound; `status`, `/metrics`,
admission control and the leak tests read sizes from here. Nothing keyed by a
run, session, connection or request lives outside it (docs/design.md, bounded by construction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class Sized(Protocol):
    def __len__(self) -> int: ...


class Sweepable(Sized, Protocol):
    name: str
    ttl_s: float | None
    max_size: int | None

    def sweep(self, now: float | None = None) -> int: ...


@dataclass(frozen=True)
class Registered:
    name: str
    size: Callable[[], int]
    ttl_s: float | None
    max_size: int | None
    per_run: bool  # counted against maxTrackedRuns


class StateRegistry:
    def __init__(self) -> None:
        self._items: dict[str, Registered] = {}
        self._sweeps: dict[str, Callable[[], object]] = {}
        # The size functions counted against maxTrackedRuns: read on every `agent` request, so
        # kept apart rather than filtered out of every registered structure each time. A tuple:
        # fixed after start-up, one entry per registered structure, not a growing container.
        self._per_run: tuple[Callable[[], int], ...] = ()

    def register(self, structure: Sweepable, *, per_run: bool = False, sweep: bool = True) -> None:
        """Register a TTLMap-like structure; its `sweep` joins the maintenance tick."""
        will_sweep = sweep and structure.ttl_s is not None
        if will_sweep and structure.name in self._sweeps:
            raise ValueError(f"sweep {structure.name!r} registered twice")
        self.add(
            structure.name,
            structure.__len__,
            ttl_s=structure.ttl_s,
            max_size=structure.max_size,
            per_run=per_run,
        )
        if will_sweep:
            self._sweeps[structure.name] = structure.sweep

    def add(
        self,
        name: str,
        size: Callable[[], int],
        *,
        ttl_s: float | None,
        max_size: int | None,
        per_run: bool = False,
    ) -> None:
        """Register a structure that is bounded some other way (e.g. removed on disconnect)."""
        if name in self._items:
            raise ValueError(f"state structure {name!r} registered twice")
        if ttl_s is None and max_size is None:
            raise ValueError(f"state structure {name!r} has neither a TTL nor a bound")
        self._items[name] = Registered(name, size, ttl_s, max_size, per_run)
        if per_run:
            self._per_run += (size,)

    def add_sweep(self, name: str, fn: Callable[[], object]) -> None:
        """A sweep that is not a plain TTLMap sweep (e.g. the store's subagent archive)."""
        if name in self._sweeps:
            raise ValueError(f"sweep {name!r} registered twice")
        self._sweeps[name] = fn

    def sizes(self) -> dict[str, int]:
        return {name: item.size() for name, item in self._items.items()}

    def tracked_entries(self) -> int:
        return sum(size() for size in self._per_run)

    def describe(self) -> list[Registered]:
        return list(self._items.values())

    @property
    def sweeps(self) -> dict[str, Callable[[], object]]:
        return dict(self._sweeps)

    def __contains__(self, name: object) -> bool:
        return name in self._items
