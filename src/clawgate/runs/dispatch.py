"""How accepted runs reach an executor: the port the run service queues through.

Two implementations:

- `LocalDispatch` (here): this process executes every run it accepts, on its per-session
  lanes (runs/lanes.py). Nothing runs elsewhere, so aborts and ends never cross a process.
- `clawgate.scaleout.dispatch.RedisRunDispatch`: accepted runs go to shared per-session
  Redis queues and any gateway process may execute them; an abort is broadcast, and a run
  executed by another process reports its end to listeners registered here.

The run service takes one at construction (the composition root chooses) and asks it the
questions that used to be `if dispatch is not None` branches: may this session queue a run,
queue it, does this run execute in another process, ask that process to abort it, and tell
me when that process ends it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from clawgate.errors import Unavailable
from clawgate.ids import RunId, SessionKey
from clawgate.store.base import SessionGate, Store
from clawgate.store.records import RunRecord

if TYPE_CHECKING:
    from clawgate.runs.lanes import Lanes
    from clawgate.runs.service import Run

FinalListener = Callable[[RunRecord], None]
Cancel = Callable[[], None]


class RunDispatch(Protocol):
    def check_room(self, session_key: SessionKey) -> None:
        """Raise UNAVAILABLE when a new run of `session_key` could not be queued now.

        Called before the run is accepted (nothing is written yet)."""

    async def insert(
        self, record: RunRecord, *, reuse_after_s: float, now: float, gate: SessionGate | None
    ) -> RunRecord | None:
        """Durably insert an accepted run (`Store.create_run`: None when inserted, else the
        run already stored under its id). A dispatch whose queue lives in the store queues
        the run in the same atomic write (Redis: one script), so accepted means queued."""

    async def push(self, run: Run) -> None:
        """Hand an inserted run to execution (nothing left to do when `insert` queued it).
        Raises when it could not be queued (the run service then ends the run as error, so
        it still has its one end)."""

    def executes_elsewhere(self, run: Run | None) -> bool:
        """Whether the run (tracked here as `run`, or not tracked here at all: None) ends in
        another process, so that its end reaches this one through `listen`."""

    def abort(self, run_id: RunId) -> None:
        """Ask the process executing the run elsewhere to cancel it (never raises)."""

    def listening(self, run_id: RunId) -> int:
        """How many listeners wait here for the end of a run executed elsewhere (the run
        service refuses one more past its per-run cap)."""

    def listen(self, run_id: RunId, listener: FinalListener) -> Cancel:
        """Call `listener` once with the final record when another process ends the run.

        Returns the function that removes the listener."""


def _nothing() -> None:
    return None


class LocalDispatch:
    """Every run executes here, on the run service's per-session lanes."""

    def __init__(self, lanes: Lanes[Run], store: Store) -> None:
        self.lanes = lanes
        self.store = store

    def check_room(self, session_key: SessionKey) -> None:
        if not self.lanes.has_room(session_key):
            raise Unavailable(
                "gateway overloaded: no session lane free",
                retry_after_ms=1000,
                details={"maxLanes": self.lanes.max_lanes},
            )

    async def insert(
        self, record: RunRecord, *, reuse_after_s: float, now: float, gate: SessionGate | None
    ) -> RunRecord | None:
        return await self.store.create_run(record, reuse_after_s=reuse_after_s, now=now, gate=gate)

    async def push(self, run: Run) -> None:
        # Raises UNAVAILABLE when the lanes filled up while the run was being accepted.
        self.lanes.push(run.record.session_key, run)

    def executes_elsewhere(self, run: Run | None) -> bool:
        return False

    def abort(self, run_id: RunId) -> None:
        return None  # a queued run is dropped from its lane by the run service itself

    def listening(self, run_id: RunId) -> int:
        return 0

    def listen(self, run_id: RunId, listener: FinalListener) -> Cancel:
        return _nothing  # no other process ends runs: never called (`executes_elsewhere`)
