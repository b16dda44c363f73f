"""Persistence behind one interface: SQLite (embedded default) and Redis (shared, multi-process)."""

from clawgate.store.base import Store
from clawgate.store.records import RunRecord, SessionMeta, SubagentRecord, TranscriptMessage

__all__ = ["RunRecord", "SessionMeta", "Store", "SubagentRecord", "TranscriptMessage"]
