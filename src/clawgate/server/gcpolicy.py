"""The garbage collector's policy for the gateway's own process (`clawgate gateway`).

CPython's defaults (a young-generation pass every 700 net allocations of tracked objects,
a full pass after every 100 young ones) suit short programs. A gateway allocates a few
hundred small objects per run (frames, futures, records) that reference counting frees
at once, yet the count of net allocations reaches 700 at every local peak: with the
defaults, collections were about a sixth of the gateway's CPU per run
(docs/benchmarks.md), and each full pass walks every object the process ever kept (the
imported modules, the settings, the caches).

`tune_gc` applies the policy once the gateway serves:
- collect once, then `gc.freeze()`: what exists after start-up (modules, the gateway's
  own structures) moves to the permanent generation that no pass scans again. A cycle
  among those objects that became garbage later would never be freed: start-up builds
  no such cycles that die, and everything per run is created after the freeze.
- the young threshold raised to `threshold0` (10,000 by default): cyclic garbage is
  still collected, in fewer, slightly longer passes; at most about `threshold0`
  uncollected objects wait for the next pass (a few MB). The older generations keep
  their thresholds.

`gc_threshold0 = 0` leaves the interpreter's collector as it is. In-process gateways
(tests, `clawgate batch`) never change their host process's collector.
"""

from __future__ import annotations

import gc


def tune_gc(threshold0: int) -> bool:
    """Apply the policy; False (nothing changed) when `threshold0` is 0."""
    if threshold0 <= 0:
        return False
    gc.collect()
    gc.freeze()
    _, threshold1, threshold2 = gc.get_threshold()
    gc.set_threshold(threshold0, threshold1, threshold2)
    return True


def gc_status() -> dict[str, object]:
    """The collector's state for `status.memory.gc`."""
    return {
        "thresholds": list(gc.get_threshold()),
        "frozen": gc.get_freeze_count(),
        "collections": [s["collections"] for s in gc.get_stats()],
    }
