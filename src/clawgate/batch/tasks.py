"""Batch tasks: parse and validate JSONL task lines, and the names derived from a task.

Input: one JSON object per line,

    {"id": "t1", "message": "...", "sessionKey"?: "agent:main:...",
     "spawn"?: {"mode": "run"|"session", "cleanup": "keep"|"delete"}, "timeout"?: seconds}

Malformed lines (and repeated ids) are returned with their line number, never raised.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SAFE = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass(frozen=True)
class Task:
    id: Any  # as given (string or integer); `key` is its string form
    key: str
    message: str
    line: int
    session_key: str | None = None
    spawn: dict[str, str] | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


def parse_tasks(lines: Iterable[str]) -> tuple[list[Task], list[BadLine]]:
    """Parse JSONL task lines; malformed lines (and repeated ids) are returned, never raised."""
    tasks: list[Task] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            bad.append(BadLine(number, f"not JSON: {exc.msg}"))
            continue
        problem = _check(obj)
        if problem is not None:
            bad.append(BadLine(number, problem))
            continue
        key = str(obj["id"])
        if key in seen:
            bad.append(BadLine(number, f"duplicate id {obj['id']!r} (first on line {seen[key]})"))
            continue
        seen[key] = number
        spawn = obj.get("spawn")
        tasks.append(
            Task(
                id=obj["id"],
                key=key,
                message=obj["message"],
                line=number,
                session_key=obj.get("sessionKey"),
                spawn={"mode": spawn.get("mode", "run"), "cleanup": spawn.get("cleanup", "keep")}
                if isinstance(spawn, dict)
                else None,
                timeout=float(obj["timeout"]) if obj.get("timeout") is not None else None,
            )
        )
    return tasks, bad


def _check(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return "not a JSON object"
    task_id = obj.get("id")
    if task_id is None or isinstance(task_id, bool) or not isinstance(task_id, str | int):
        return "missing id (a string or an integer)"
    if isinstance(task_id, str) and not task_id.strip():
        return "empty id"
    message = obj.get("message")
    if not isinstance(message, str) or not message:
        return "missing message (a non-empty string)"
    if "sessionKey" in obj and obj["sessionKey"] is not None and not isinstance(obj["sessionKey"], str):
        return "sessionKey must be a string"
    timeout = obj.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        return "timeout must be a positive number of seconds"
    spawn = obj.get("spawn")
    if spawn is not None:
        if not isinstance(spawn, dict):
            return "spawn must be an object"
        if spawn.get("mode", "run") not in ("run", "session"):
            return "spawn.mode must be 'run' or 'session'"
        if spawn.get("cleanup", "keep") not in ("keep", "delete"):
            return "spawn.cleanup must be 'keep' or 'delete'"
    return None


def read_tasks(path: Path) -> tuple[list[Task], list[BadLine]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return parse_tasks(fh)


def default_session_key(task_key: str) -> str:
    """Each task gets its own session: tasks are independent, and separate lanes run in parallel."""
    safe = _SAFE.sub("_", task_key)[:100]
    if safe != task_key:
        # Sanitizing may map two ids to one name; a digest of the real id keeps them apart.
        safe += "-" + hashlib.sha1(task_key.encode()).hexdigest()[:10]
    return f"agent:main:batch:{safe}"


def default_out_path(tasks_path: Path) -> Path:
    name = tasks_path.name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    return tasks_path.with_name(f"{stem}.results.jsonl")


def batch_label(tasks_path: Path) -> str:
    """The label of a batch's runs: `batch:` and the tasks file's name without `.jsonl`."""
    name = tasks_path.name
    return "batch:" + (name[: -len(".jsonl")] if name.endswith(".jsonl") else name)[:200]


def task_run_key(task: Task, retry: int) -> str:
    return f"batch:{task.key}" if retry == 0 else f"batch:{task.key}:retry{retry}"
