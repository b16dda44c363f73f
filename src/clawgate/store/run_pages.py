"""Paged reads of run records (`runs.list`): the query, its filter and the page it answers.

Pure logic, shared by both stores: a store walks its runs newest first, at most
`scan` records per page, and keeps those `matches` accepts. The cost of a page
is bounded whatever the filter, so a dashboard can page through a store of a
million runs without one read holding the store's writer for long.
"""

from __future__ import annotations

from dataclasses import dataclass

from clawgate.protocol.constants import FINAL_STATUSES
from clawgate.store.records import RunRecord

# `status` filter values besides the record statuses themselves.
ACTIVE = "active"  # queued or running
FINISHED = "finished"  # any final status


@dataclass(frozen=True)
class RunsPageQuery:
    limit: int
    cursor: str | None = None
    status: str | None = None
    session_key: str | None = None
    run_id_prefix: str | None = None
    label: str | None = None
    scan: int = 1000  # records examined per page at most

    @property
    def window(self) -> int:
        """Records a store reads for this page: `limit` when every record matches (the session
        filter is the store's own index), else up to `scan`."""
        filtered = self.status is not None or bool(self.run_id_prefix) or self.label is not None
        return self.scan if filtered else min(self.scan, self.limit)

    def matches(self, rec: RunRecord) -> bool:
        if self.session_key is not None and rec.session_key != self.session_key:
            return False
        if self.run_id_prefix and not rec.run_id.startswith(self.run_id_prefix):
            return False
        if self.label is not None and rec.label != self.label:
            return False
        if self.status is None:
            return True
        if self.status == ACTIVE:
            return not rec.is_final
        if self.status == FINISHED:
            return rec.is_final
        return rec.status == self.status


@dataclass(frozen=True)
class RunsPage:
    runs: list[RunRecord]
    cursor: str | None  # None: nothing after this page


def parse_int_cursor(cursor: str | None) -> int | None:
    """A store's numeric cursor, or None for the first page (a garbled cursor restarts)."""
    if cursor is None or not cursor.isdigit():
        return None
    return int(cursor)


__all__ = ["ACTIVE", "FINAL_STATUSES", "FINISHED", "RunsPage", "RunsPageQuery", "parse_int_cursor"]
