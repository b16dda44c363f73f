"""The batch's files: the results file (one final line per task) and the spawn journal.

Results (`--out`, default `TASKS.results.jsonl`): one line per finished task,
`{id, runId, status, text, error, attempts, acceptedMs, totalMs, usage}`. Spawn journal
(`OUT.spawns`): `{id, key, runId, childSessionKey}` per accepted spawn, removed once every
task has its final line.

Both are JSON lines appended one write at a time and flushed, so a crash cuts at most the
last line, and reading skips a line cut short.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from clawgate.protocol.constants import FINAL_STATUSES


def spawn_journal_path(out_path: Path) -> Path:
    """Where a batch journals its accepted spawns (`OUT.spawns`, next to the results file)."""
    return out_path.with_name(out_path.name + ".spawns")


def read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        for raw in fh:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                continue  # e.g. a line cut short by a crash
            if isinstance(obj, dict) and "id" in obj:
                yield obj


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    """Task key -> its final result line (the last one, should there be several)."""
    return {str(o["id"]): o for o in read_jsonl(path) if o.get("status") in FINAL_STATUSES}


def load_spawns(path: Path) -> dict[str, dict[str, Any]]:
    """Task key -> its journalled spawn (the last one)."""
    return {str(o["id"]): o for o in read_jsonl(path)}


class Appender:
    """Appends JSON lines, each in one write and flushed, so a crash cuts at most the last line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: TextIO | None = None

    def write(self, obj: dict[str, Any]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            needs_newline = (
                self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
            )
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())
            if needs_newline:
                self._fh.write("\n")
        self._fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"
