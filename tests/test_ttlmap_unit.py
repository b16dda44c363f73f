"""TTLMap unit tests that pin what the bounded-memory promise rests on.

Lookups of absent keys, LRU order on replace, a touch never resurrecting an expired entry,
and the heap: compaction keeps every live entry's deadline (sweep still expires on time),
each live entry owns one heap item, and the stale-item bounds (2n+1024 between sweeps,
2n+64 after a sweep or an eviction) are exact, so the heap is rebuilt neither too late
(memory) nor too early (pop would stop being O(1) amortised). No event loop: the FakeClock
is only read.
"""

from __future__ import annotations

from typing import Any

import pytest

from clawgate.state.clock import FakeClock
from clawgate.state.ttlmap import TTLMap

Seen = list[tuple[Any, Any, str]]

# The documented bounds (src/clawgate/state/ttlmap.py): stale heap items tolerated between
# sweeps, and after a sweep or an eviction.
BETWEEN_SWEEPS = 1024
AFTER_SWEEP = 64


def make_map(clock: FakeClock, **kw: Any) -> tuple[TTLMap[Any, Any], Seen]:
    seen: Seen = []
    m: TTLMap[Any, Any] = TTLMap("t", clock, on_expire=lambda k, v, why: seen.append((k, v, why)), **kw)
    return m, seen


# -- lookups ---------------------------------------------------------------------------------------
def test_a_key_never_set_is_absent_on_every_read_path(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=10)
    m.set("present", 1)
    assert "never" not in m
    assert "present" in m
    assert m.get("never") is None
    assert m.get("never", "dflt") == "dflt"
    assert m.get("present", "dflt") == 1
    with pytest.raises(KeyError):
        m["never"]
    assert m.pop("never") is None
    assert m.pop("never", "dflt") == "dflt"
    assert m.touch("never") is False
    assert m.expires_at("never") is None
    assert "never" not in list(m.keys())
    assert seen == []
    assert len(m) == 1


def test_every_read_path_expires_exactly_at_the_deadline(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=10)
    for key in ("get", "in", "item", "touch"):
        m.set(key, key)
    clock.advance(9.999)
    assert m.get("get") == "get"
    assert "in" in m
    assert m["item"] == "item"
    assert seen == []
    clock.advance(0.001)
    assert m.get("get", "gone") == "gone"
    assert "in" not in m
    with pytest.raises(KeyError):
        m["item"]
    assert m.touch("touch") is False
    assert sorted(k for k, _, _ in seen) == ["get", "in", "item", "touch"]
    assert {why for _, _, why in seen} == {"expired"}
    assert m.expired_total == 4
    assert len(m) == 0


def test_getitem_does_not_change_lru_order_but_get_does(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=100, max_size=2)
    m.set("a", 1)
    m.set("b", 2)
    assert m["a"] == 1  # a plain read by subscript
    m.set("c", 3)
    assert seen == [("a", 1, "evicted")]


# -- touch -----------------------------------------------------------------------------------------
def test_touch_never_resurrects_an_entry_past_its_deadline(clock: FakeClock) -> None:
    """Past its deadline but not yet swept: touch expires it (like get and in) and returns False."""
    m, seen = make_map(clock, ttl_s=10)
    m.set("a", 1)
    m.set("b", 2)
    clock.advance(10)
    assert m.touch("a") is False
    assert seen == [("a", 1, "expired")]
    assert "a" not in m
    assert m.get("a") is None
    assert m.touch("a", ttl_s=1000) is False  # and it stays gone
    assert len(m) == 1
    assert m.sweep() == 1  # b, never touched; a was reported once, not twice
    assert seen == [("a", 1, "expired"), ("b", 2, "expired")]


def test_touch_just_before_the_deadline_extends(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=10)
    m.set("a", 1)
    clock.advance(9.999)
    assert m.touch("a") is True
    assert m.expires_at("a") == clock.time() + 10
    clock.advance(9.999)
    assert m.sweep() == 0
    assert m.get("a") == 1
    assert seen == []


def test_touch_to_the_same_deadline_adds_no_heap_item(clock: FakeClock) -> None:
    m, _ = make_map(clock, ttl_s=10)
    for i in range(50):
        m.set(i, i)
    for _ in range(10):
        for i in range(50):
            assert m.touch(i)
    assert len(m._heap) == 50


def test_touch_later_keeps_one_heap_item_per_entry(clock: FakeClock) -> None:
    """Moving deadlines later never pushes: the item re-pushes itself when it surfaces."""
    m, _ = make_map(clock, ttl_s=10)
    for i in range(200):
        m.set(i, i)
    for step in range(30):
        clock.advance(1)
        for i in range(200):
            m.touch(i)
        m.sweep()
        assert len(m._heap) == 200, step
    clock.advance(10)
    assert m.sweep() == 200
    assert m._heap == []


def test_touch_without_ttl_in_a_size_bound_map_leaves_the_heap(clock: FakeClock) -> None:
    """A per-entry TTL moved back to "no TTL": its heap item is dropped when it surfaces."""
    m, seen = make_map(clock, max_size=10)
    m.set("a", 1, ttl_s=5)
    m.set("b", 2, ttl_s=5)
    assert len(m._heap) == 2
    assert m.touch("a") is True  # the map's default: no TTL
    assert m.expires_at("a") == float("inf")
    clock.advance(5)
    assert m.sweep() == 1
    assert seen == [("b", 2, "expired")]
    assert m._heap == []
    clock.advance(10**9)
    assert m.sweep() == 0
    assert m.get("a") == 1


# -- set -------------------------------------------------------------------------------------------
def test_replacing_a_value_refreshes_its_lru_position(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=100, max_size=3)
    m.set("a", 1)
    m.set("b", 2)
    m.set("c", 3)
    m.set("a", 10)  # a is now the most recently used
    assert list(m.keys()) == ["b", "c", "a"]
    m.set("d", 4)
    assert seen == [("b", 2, "evicted")]
    assert m.get("a") == 10


def test_replacing_a_value_keeps_insertion_order_without_lru(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=100, max_size=3, lru=False)
    m.set("a", 1)
    m.set("b", 2)
    m.set("c", 3)
    m.set("a", 10)
    assert m.touch("a")
    m.set("d", 4)
    assert seen == [("a", 10, "evicted")]


def test_max_size_is_exact(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=100, max_size=3)
    for i in range(3):
        m.set(i, i)
    assert len(m) == 3
    assert seen == []
    m.set(3, 3)
    assert len(m) == 3
    assert seen == [(0, 0, "evicted")]
    assert m.evicted_total == 1


def test_without_an_expiry_callback(clock: FakeClock) -> None:
    m: TTLMap[str, int] = TTLMap("quiet", clock, ttl_s=10, max_size=1)
    m.set("a", 1)
    m.set("b", 2)  # evicts a
    clock.advance(10)
    assert m.get("b") is None
    m.set("c", 3)
    clock.advance(10)
    assert m.sweep() == 1
    assert (m.evicted_total, m.expired_total) == (1, 2)


def test_sweep_explicit_now_in_the_past_removes_nothing(clock: FakeClock) -> None:
    m, _ = make_map(clock, ttl_s=10)
    m.set("a", 1)
    clock.advance(20)
    assert m.sweep(now=clock.time() - 10.001) == 0
    assert m.sweep(now=clock.time() - 10) == 1


def test_clear_drops_everything_and_the_map_still_works(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=10)
    for i in range(5):
        m.set(i, i)
    m.clear()
    assert (len(m), m._heap) == (0, [])
    m.set("x", 1)
    clock.advance(10)
    assert m.sweep() == 1
    assert seen == [("x", 1, "expired")]


# -- heap compaction -------------------------------------------------------------------------------
def test_sweep_expires_on_time_after_pop_compaction(clock: FakeClock) -> None:
    """Compaction triggered by pops keeps one item per live entry, each at its own deadline."""
    m, seen = make_map(clock, ttl_s=1000)
    for i in range(1400):
        m.set(f"gone{i}", i)
    # Deadlines in an order unrelated to insertion order, so a rebuilt heap must be heapified.
    live = {f"live{i}": float((i * 37) % 173 + 1) for i in range(173)}
    for key, ttl in live.items():
        m.set(key, key, ttl_s=ttl)
    for i in range(1400):
        m.pop(f"gone{i}")
    assert len(m) == 173
    # Rebuilt at the pop that left 274 entries (1573 items > 2*274 + 1024), to one item per
    # entry; the 101 pops after it each left one stale item, within the bound.
    assert len(m._heap) == 274
    live_items = sorted(k for _, token, k in m._heap if k in live and m._data[k].token == token)
    assert live_items == sorted(live)  # one live heap item per entry, none lost
    for t in range(1, 175):
        clock.advance(1)
        due = sorted(k for k, ttl in live.items() if ttl == t)
        assert m.sweep() == len(due), t
        assert sorted(k for k, _, _ in seen[-len(due) :]) == due if due else True
        assert len(m) == sum(1 for ttl in live.values() if ttl > t)
    assert len(seen) == 173
    assert m._heap == []


def test_pop_rebuilds_the_heap_only_past_2n_plus_1024(clock: FakeClock) -> None:
    m, _ = make_map(clock, ttl_s=10)
    for i in range(BETWEEN_SWEEPS):
        m.set(i, i)
    for i in range(BETWEEN_SWEEPS):
        m.pop(i)
    # 1024 stale items over 0 live entries is within the bound: no rebuild on pop (O(1)).
    assert len(m._heap) == BETWEEN_SWEEPS
    m2, _ = make_map(clock, ttl_s=10)
    for i in range(BETWEEN_SWEEPS + 1):
        m2.set(i, i)
    for i in range(BETWEEN_SWEEPS):
        m2.pop(i)
    assert len(m2._heap) == BETWEEN_SWEEPS + 1
    m2.pop(BETWEEN_SWEEPS)  # 1025 > 2*0 + 1024: rebuilt
    assert m2._heap == []


def test_pop_keeps_the_heap_within_2n_plus_1024(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=10)
    for i in range(3000):
        m.set(i, i, ttl_s=10 + i % 7)
    for i in range(0, 3000, 3):
        m.set(f"keep{i}", i)
    for i in range(3000):
        m.pop(i)
        assert len(m._heap) <= 2 * len(m) + BETWEEN_SWEEPS
    assert len(m) == 1000
    clock.advance(10)
    assert m.sweep() == 1000
    assert len(seen) == 1000


def test_re_set_after_lazy_expiry_rebuilds_past_2n_plus_1024(clock: FakeClock) -> None:
    """A key set, expired on read and set again leaves one stale item per round, up to the bound."""
    m, _ = make_map(clock, ttl_s=1)
    rounds = 2 * 1 + BETWEEN_SWEEPS  # one live entry while set: the bound is 2*1 + 1024
    for _ in range(rounds):
        m.set("k", 1)
        clock.advance(1)
        assert m.get("k") is None
    assert len(m._heap) == rounds
    m.set("k", 1)  # one item more than the bound: rebuilt to the one live item
    assert len(m._heap) == 1
    clock.advance(1)
    assert m.sweep() == 1


def test_sweep_drops_stale_items_only_past_2n_plus_64(clock: FakeClock) -> None:
    m, _ = make_map(clock, ttl_s=10)
    for i in range(AFTER_SWEEP):
        m.set(i, i)
    for i in range(AFTER_SWEEP):
        m.pop(i)
    assert m.sweep() == 0
    assert len(m._heap) == AFTER_SWEEP  # within 2*0 + 64: left for later
    m.set("x", 1)
    m.set("y", 2)
    m.pop("x")  # 65 stale + 1 live item over 1 entry: 66 > 2*1 + 64 is false
    assert m.sweep() == 0
    assert len(m._heap) == AFTER_SWEEP + 2
    m.pop("y")  # 66 items over 0 entries: 66 > 64
    assert m.sweep() == 0
    assert m._heap == []


def test_sweep_compaction_keeps_deadlines(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=100)
    for i in range(300):
        m.set(f"tmp{i}", i)
    for i in range(20):
        m.set(f"live{i}", i, ttl_s=float(50 - i))  # later insertion, earlier deadline
    for i in range(300):
        m.pop(f"tmp{i}")
    assert m.sweep() == 0
    assert len(m._heap) == 20
    clock.advance(31)
    assert m.sweep() == 1
    assert seen == [("live19", 19, "expired")]
    clock.advance(19)
    assert m.sweep() == 19
    assert m._heap == []


def test_eviction_keeps_the_heap_within_2n_plus_64_and_deadlines_hold(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=100, max_size=10)
    for i in range(500):
        m.set(i, i, ttl_s=100 - (i % 50))
        assert len(m._heap) <= 2 * len(m) + AFTER_SWEEP + 1  # the new entry is pushed after the check
    assert m.evicted_total == 490
    live = list(m.keys())
    assert live == list(range(490, 500))
    before = len(seen)
    clock.advance(50)  # 490..499 have ttl 60..51: none due yet
    assert m.sweep() == 0
    clock.advance(10)
    assert m.sweep() == 10
    assert [k for k, _, why in seen[before:]] == list(range(499, 489, -1))


def test_eviction_rebuild_happens_exactly_past_2n_plus_64(clock: FakeClock) -> None:
    m, _ = make_map(clock, ttl_s=100, max_size=1)
    m.set(0, 0)
    sizes = []
    for i in range(1, 80):
        m.set(i, i)
        sizes.append(len(m._heap))
    # One live entry: each eviction leaves one stale item, until an eviction finds more than
    # 2*1 + 64 items and rebuilds the heap down to the live entry's item.
    assert sizes[:66] == list(range(2, 68))
    assert sizes[66] == 1


def test_the_first_entry_of_a_map_survives_compaction(clock: FakeClock) -> None:
    """Every live entry keeps its heap item through a rebuild, the very first one included."""
    m, seen = make_map(clock, ttl_s=10)
    m.set("first", 1)
    for i in range(200):
        m.set(i, i, ttl_s=100)
    for i in range(200):
        m.pop(i)
    assert m.sweep() == 0  # 201 items over 1 entry: rebuilt
    assert len(m._heap) == 1
    clock.advance(10)
    assert m.sweep() == 1
    assert seen == [("first", 1, "expired")]
