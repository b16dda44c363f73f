"""A run's lifecycle decisions as pure functions (clawgate.runs.lifecycle): no loop, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from clawgate.runs import lifecycle
from clawgate.store.records import RunRecord

T0 = 1_700_000_000.0


def record(**kw: Any) -> RunRecord:
    base: dict[str, Any] = {
        "run_id": "r1",
        "session_key": "agent:main:main",
        "agent_id": "main",
        "message": "hi",
    }
    base.update(kw)
    return RunRecord(**base)


# -- the end transition ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("before", "status", "error", "text", "measure", "want"),
    [
        # A run that ran: its duration counts from its start.
        (
            {"status": "running", "started_at": T0},
            "ok",
            None,
            "hello",
            True,
            {
                "status": "ok",
                "ended_at": T0 + 2.5,
                "error": None,
                "result_text": "hello",
                "duration_ms": 2500,
            },
        ),
        # Ended while queued (aborted, timed out): never started, so no duration.
        (
            {"status": "queued"},
            "aborted",
            "aborted",
            None,
            True,
            {
                "status": "aborted",
                "ended_at": T0 + 2.5,
                "error": "aborted",
                "result_text": None,
                "duration_ms": None,
            },
        ),
        # A failed run keeps the text it had streamed.
        (
            {"status": "running", "started_at": T0 + 2},
            "error",
            "provider down",
            "par",
            True,
            {
                "status": "error",
                "ended_at": T0 + 2.5,
                "error": "provider down",
                "result_text": "par",
                "duration_ms": 500,
            },
        ),
        # Restored after a restart: the downtime is not measured as part of the run.
        (
            {"status": "running", "started_at": T0},
            "error",
            lifecycle.INTERRUPTED,
            None,
            False,
            {"status": "error", "ended_at": T0 + 2.5, "error": lifecycle.INTERRUPTED, "duration_ms": None},
        ),
        # An earlier error and text are replaced by the end's own.
        (
            {"status": "running", "started_at": T0, "error": "old", "result_text": "old"},
            "timeout",
            "run timed out",
            None,
            True,
            {"status": "timeout", "error": "run timed out", "result_text": None, "duration_ms": 2500},
        ),
    ],
)
def test_end(
    before: dict[str, Any],
    status: str,
    error: str | None,
    text: str | None,
    measure: bool,
    want: dict[str, Any],
) -> None:
    rec = record(**before)
    snapshot = {name: getattr(rec, name) for name in lifecycle.END_FIELDS}
    ended = lifecycle.end(rec, status, error, text, T0 + 2.5, measure=measure)
    assert ended is not rec
    assert ended.is_final
    for name, value in want.items():
        assert getattr(ended, name) == value, name
    # Pure: the record it was given is left as it was.
    assert {name: getattr(rec, name) for name in lifecycle.END_FIELDS} == snapshot
    # Nothing but the end fields changes.
    for name in rec.__struct_fields__:
        if name not in lifecycle.END_FIELDS:
            assert getattr(ended, name) == getattr(rec, name), name


# -- starting --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "cancel_reason", "draining", "want"),
    [
        ("queued", None, False, True),
        ("queued", None, True, False),  # a draining gateway starts nothing
        ("queued", "aborted", False, False),  # its end is being written in another task
        ("queued", "timeout", False, False),
        ("queued", "shutdown", False, False),
        ("ok", None, False, False),  # already ended (e.g. as an orphan, elsewhere)
        ("error", None, False, False),
        ("aborted", None, True, False),
        ("running", None, False, True),  # re-executed from the shared queue: not final yet
    ],
)
def test_can_start(status: str, cancel_reason: str | None, draining: bool, want: bool) -> None:
    assert lifecycle.can_start(record(status=status), cancel_reason, draining) is want


# -- cancellation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reason", "status", "message"),
    [
        ("aborted", "aborted", "aborted"),
        ("timeout", "timeout", "run timed out"),
        ("shutdown", "error", "gateway shutting down"),
    ],
)
def test_cancel_status_and_message(reason: str, status: str, message: str) -> None:
    assert lifecycle.cancel_status(reason) == status
    assert lifecycle.cancel_message(reason) == message


# -- where the reply is written ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fenced", "status", "text", "want"),
    [
        (False, "ok", "hello", True),  # appended first: the FIFO writer makes it durable with the end
        (True, "ok", "hello", False),  # fenced: the end's own script writes it (RedisStore.end_run)
        (False, "ok", "", False),  # nothing to write
        (False, "ok", None, False),
        (False, "error", "partial", False),  # a failed run's partial text is written by the run itself
        (False, "aborted", "x", False),
        (True, "error", None, False),
    ],
)
def test_reply_before_end(fenced: bool, status: str, text: str | None, want: bool) -> None:
    ended = lifecycle.end(record(), status, None, text, 10.0)
    reply = lifecycle.reply_before_end(fenced, ended)
    assert (reply is not None) is want
    if reply is not None:  # the same line a fenced end's script writes (RunRecord.reply_message)
        assert reply == ended.reply_message()
        assert (reply.role, reply.content, reply.run_id, reply.ts) == ("assistant", text, ended.run_id, 10.0)


# -- the events that tell the end ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "error", "lifecycle_data", "chat_state", "chat"),
    [
        ("ok", None, {"phase": "end", "endedAt": 1_700_000_002_500}, "final", {}),
        (
            "aborted",
            "aborted",
            {"phase": "end", "endedAt": 1_700_000_002_500, "aborted": True},
            "aborted",
            {},
        ),
        (
            "timeout",
            "run timed out",
            {"phase": "error", "endedAt": 1_700_000_002_500, "error": "run timed out"},
            "error",
            {"errorMessage": "run timed out"},
        ),
        (
            "error",
            None,  # no message: the status stands in for it
            {"phase": "error", "endedAt": 1_700_000_002_500, "error": "error"},
            "error",
            {"errorMessage": "error"},
        ),
    ],
)
def test_end_events(
    status: str, error: str | None, lifecycle_data: dict[str, Any], chat_state: str, chat: dict[str, Any]
) -> None:
    events = lifecycle.end_events(record(status=status, error=error), T0 + 2.5)
    assert events.lifecycle == lifecycle_data
    assert events.chat_state == chat_state
    assert events.chat == chat
