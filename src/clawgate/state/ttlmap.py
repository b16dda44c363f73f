"""TTLMap: a dict with a TTL per entry and an optional size bound with LRU eviction.

Every in-memory structure keyed by a run, session, connection or request is one
of these (docs/design.md, bounded by construction). get/set/touch/pop are O(1) amortised; expiry
happens lazily on read and in `sweep()`, which pops only expired heap items
(O(k log n) for k expired entries), so a sweep over a large, healthy map is cheap.

Why a heap with lazy re-push: `touch()` (e.g. a run context emitting an event)
only moves the entry's deadline; the heap item is re-pushed when it surfaces,
so each live entry owns at most one heap item and the heap stays O(n).

A map may also be bounded in bytes (`max_bytes` with a `weigh` function): the
entry count alone does not bound memory when values are texts of any length.
The weight is taken when an entry is set; the oldest entries are evicted until
the total is under the bound again (the newest entry always stays).
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from clawgate.state.clock import Clock

K = TypeVar("K")
V = TypeVar("V")

_INF = float("inf")


class _Entry(Generic[V]):
    __slots__ = ("expires_at", "heap_at", "token", "value", "weight")

    def __init__(self, value: V, expires_at: float, weight: int = 0) -> None:
        self.value = value
        self.expires_at = expires_at
        self.heap_at = _INF  # deadline of this entry's live heap item (inf: none)
        self.token = 0
        self.weight = weight


class TTLMap(Generic[K, V]):
    """A bounded mapping. `ttl_s=None` means entries live until removed or evicted."""

    def __init__(
        self,
        name: str,
        clock: Clock,
        *,
        ttl_s: float | None = None,
        max_size: int | None = None,
        on_expire: Callable[[K, V, str], None] | None = None,
        lru: bool = True,
        max_bytes: int | None = None,
        weigh: Callable[[V], int] | None = None,
    ) -> None:
        if ttl_s is None and max_size is None:
            raise ValueError(f"{name}: a registered structure needs a TTL or a max size")
        if (max_bytes is None) != (weigh is None):
            raise ValueError(f"{name}: max_bytes and weigh go together")
        self.name = name
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._clock = clock
        self._data: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._heap: list[tuple[float, int, K]] = []
        self._tokens = itertools.count(1)
        self._on_expire = on_expire
        self._lru = lru
        self.max_bytes = max_bytes
        self._weigh = weigh
        self.bytes = 0  # sum of the weights of the entries held
        self.evicted_total = 0
        self.expired_total = 0

    # -- mapping API -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        entry = self._data.get(key)  # type: ignore[call-overload,arg-type]
        if entry is None:
            return False
        if entry.expires_at <= self._clock.time():
            self._expire(key, entry)  # type: ignore[arg-type]
            return False
        return True

    def get(self, key: K, default: V | None = None) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return default
        if entry.expires_at <= self._clock.time():
            self._expire(key, entry)
            return default
        if self._lru:
            self._data.move_to_end(key)
        return entry.value

    def __getitem__(self, key: K) -> V:
        entry = self._data.get(key)
        if entry is None or entry.expires_at <= self._clock.time():
            if entry is not None:
                self._expire(key, entry)
            raise KeyError(key)
        return entry.value

    def set(self, key: K, value: V, ttl_s: float | None = None) -> None:
        """Insert or replace; the entry's deadline is now + ttl (per-entry TTL overrides the default)."""
        ttl = self.ttl_s if ttl_s is None else ttl_s
        expires_at = _INF if ttl is None else self._clock.time() + ttl
        weight = self._weigh(value) if self._weigh is not None else 0
        entry = self._data.get(key)
        if entry is None:
            entry = _Entry(value, expires_at, weight)
            self._data[key] = entry
            self.bytes += weight
            if self.max_size is not None and len(self._data) > self.max_size:
                self._evict_oldest()
        else:
            entry.value = value
            entry.expires_at = expires_at
            self.bytes += weight - entry.weight
            entry.weight = weight
            if self._lru:
                self._data.move_to_end(key)
        if self.max_bytes is not None:
            while self.bytes > self.max_bytes and len(self._data) > 1:
                self._evict_oldest()
        self._schedule(key, entry)

    __setitem__ = set

    def touch(self, key: K, ttl_s: float | None = None) -> bool:
        """Push an entry's deadline to now + ttl. Returns False if the key is absent.

        An entry already past its deadline (not yet swept) is expired here, as `get` and `in`
        would do, and stays gone: a touch never brings an expired entry back.
        """
        entry = self._data.get(key)
        if entry is None:
            return False
        if entry.expires_at <= self._clock.time():
            self._expire(key, entry)
            return False
        ttl = self.ttl_s if ttl_s is None else ttl_s
        entry.expires_at = _INF if ttl is None else self._clock.time() + ttl
        if self._lru:
            self._data.move_to_end(key)
        self._schedule(key, entry)
        return True

    def pop(self, key: K, default: V | None = None) -> V | None:
        entry = self._data.pop(key, None)
        if entry is None:
            return default
        self.bytes -= entry.weight
        entry.token = 0  # orphan its heap item
        if len(self._heap) > 2 * len(self._data) + 1024:
            self._compact_heap()
        return entry.value

    def remove(self, key: K) -> None:
        self.pop(key)

    def clear(self) -> None:
        self._data.clear()
        self._heap.clear()
        self.bytes = 0

    def keys(self) -> Iterator[K]:
        return iter(list(self._data.keys()))

    def values(self) -> Iterator[V]:
        return iter([e.value for e in self._data.values()])

    def items(self) -> Iterator[tuple[K, V]]:
        return iter([(k, e.value) for k, e in self._data.items()])

    def expires_at(self, key: K) -> float | None:
        entry = self._data.get(key)
        return None if entry is None else entry.expires_at

    # -- expiry ---------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> int:
        """Remove every entry whose deadline has passed. Returns how many were removed."""
        now = self._clock.time() if now is None else now
        removed = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, token, key = heapq.heappop(heap)
            entry = self._data.get(key)
            if entry is None or entry.token != token:
                continue  # stale heap item
            entry.heap_at = _INF
            if entry.expires_at <= now:
                self._expire(key, entry)
                removed += 1
            else:
                self._push(key, entry)  # touched since it was pushed
        self._compact_heap()
        return removed

    def _schedule(self, key: K, entry: _Entry[V]) -> None:
        # A heap item at or before the deadline is fine: it will re-push on surfacing.
        if entry.expires_at != _INF and entry.heap_at > entry.expires_at:
            self._push(key, entry)

    def _push(self, key: K, entry: _Entry[V]) -> None:
        if entry.expires_at == _INF:
            entry.heap_at = _INF
            entry.token = 0
            return
        entry.token = next(self._tokens)
        entry.heap_at = entry.expires_at
        heapq.heappush(self._heap, (entry.expires_at, entry.token, key))
        # Entries expired lazily on read, or re-set after expiring, leave stale items behind
        # that only a sweep would pop: rebuild here too, so the bound holds between sweeps.
        if len(self._heap) > 2 * len(self._data) + 1024:
            self._compact_heap()

    def _compact_heap(self) -> None:
        # Stale items (popped or replaced entries) are dropped lazily; rebuild when they dominate.
        if len(self._heap) > 2 * len(self._data) + 64:
            self._heap = [
                (e.heap_at, e.token, k) for k, e in self._data.items() if e.token and e.heap_at != _INF
            ]
            heapq.heapify(self._heap)

    def _expire(self, key: K, entry: _Entry[V]) -> None:
        if self._data.pop(key, None) is not None:
            self.bytes -= entry.weight
        entry.token = 0
        self.expired_total += 1
        if self._on_expire is not None:
            self._on_expire(key, entry.value, "expired")

    def _evict_oldest(self) -> None:
        key, entry = self._data.popitem(last=False)
        self.bytes -= entry.weight
        entry.token = 0
        self.evicted_total += 1
        if self._on_expire is not None:
            self._on_expire(key, entry.value, "evicted")
        self._compact_heap()
