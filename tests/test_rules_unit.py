"""Edges of the registry's pure rules (clawgate.subagents.rules) that test_subagent_rules.py leaves open."""

from __future__ import annotations

from typing import Any

from clawgate.store.records import SubagentRecord
from clawgate.subagents import rules

TTLS = rules.Ttls(session_ttl_s=300.0, archive_after_s=3600.0)
T0 = 1_700_000_000.0


def record(**kw: Any) -> SubagentRecord:
    base: dict[str, Any] = {
        "run_id": "r9",
        "child_session_key": "agent:main:subagent:y",
        "requester_session_key": "agent:main:main",
        "task": "t",
    }
    base.update(kw)
    return SubagentRecord(**base)


def test_session_mode_expiry_ignores_the_end_time() -> None:
    for ended in (None, T0 - 10_000, T0 + 50):
        rec = record(mode="session", ended_at=ended, cleanup_completed_at=T0)
        assert rules.expiry_after_cleanup(rec, TTLS) == T0 + 300


def test_run_mode_archive_time_exactly_at_cleanup() -> None:
    rec = record(mode="run", ended_at=T0, cleanup_completed_at=T0 + 3600)
    assert rules.expiry_after_cleanup(rec, TTLS) == T0 + 3600


def test_freeze_keeps_a_text_of_exactly_the_cap() -> None:
    assert rules.freeze("abc", 3) == "abc"
    assert rules.freeze("abc", 2) == "ab"
    assert rules.freeze("", 0) == ""
    assert rules.freeze("a", 0) == ""


def test_announce_delay_clamps_both_ends() -> None:
    delays = [1.0, 2.0, 4.0]
    assert [rules.announce_delay(n, delays) for n in (-3, 0, 1, 2, 3, 4, 100)] == [1, 1, 1, 2, 4, 4, 4]
    assert rules.announce_delay(1, [5.0]) == 5.0


def test_announce_text_of_an_ok_run_without_a_result() -> None:
    rec = record(outcome="ok", frozen_result=None, label="")
    assert rules.announce_text(rec) == "[subagent r9 finished: ok]\n"
    failed = record(outcome="error", error="boom", label="x")
    assert rules.announce_text(failed) == "[subagent 'x' r9 finished: error] boom"
