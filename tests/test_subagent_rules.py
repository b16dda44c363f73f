"""The registry's decisions as pure functions (clawgate.subagents.rules): no loop, no I/O."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clawgate.settings import Settings, load_settings
from clawgate.store.records import SubagentRecord
from clawgate.subagents import rules

TTLS = rules.Ttls(session_ttl_s=300.0, archive_after_s=3600.0)
T0 = 1_700_000_000.0


def record(**kw: Any) -> SubagentRecord:
    base: dict[str, Any] = {
        "run_id": "r1",
        "child_session_key": "agent:main:subagent:x",
        "requester_session_key": "agent:main:main",
        "task": "t",
    }
    base.update(kw)
    return SubagentRecord(**base)


# -- rule 1: expiry counts from cleanup completed ------------------------------------------------------
def test_rule1_session_expiry_counts_from_cleanup_completed_not_from_end() -> None:
    # Ended an hour before its (deferred) cleanup completed: it still gets its full 5 minutes.
    rec = record(mode="session", ended_at=T0, cleanup_completed_at=T0 + 3600)
    assert rules.expiry_after_cleanup(rec, TTLS) == T0 + 3600 + 300


def test_run_mode_expiry_is_archive_time_from_end_but_never_before_cleanup() -> None:
    rec = record(mode="run", ended_at=T0, cleanup_completed_at=T0 + 2)
    assert rules.expiry_after_cleanup(rec, TTLS) == T0 + 3600
    late = record(mode="run", ended_at=T0, cleanup_completed_at=T0 + 7200)
    assert rules.expiry_after_cleanup(late, TTLS) == T0 + 7200
    no_end = record(mode="run", ended_at=None, cleanup_completed_at=T0)
    assert rules.expiry_after_cleanup(no_end, TTLS) == T0 + 3600


def test_expiry_is_refused_before_cleanup_completed() -> None:
    with pytest.raises(AssertionError):
        rules.expiry_after_cleanup(record(mode="session", ended_at=T0), TTLS)


# -- rule 7: the sweep reports only what reported nothing ------------------------------------------------
@pytest.mark.parametrize("reason", ["deleted", "completed", "swept", "released"])
def test_rule7_sweep_is_silent_for_a_record_already_reported(reason: str) -> None:
    assert rules.sweep_reason(record(ended_reason=reason)) is None


def test_rule7_sweep_reports_swept_for_a_record_never_reported() -> None:
    assert rules.sweep_reason(record(ended_reason=None)) == "swept"


def test_cleanup_reason() -> None:
    assert rules.cleanup_reason(record(cleanup="keep")) == "completed"
    assert rules.cleanup_reason(record(cleanup="delete")) == "deleted"


@pytest.mark.parametrize(
    ("mode", "cleanup", "deletes"),
    [
        ("run", "keep", True),
        ("run", "delete", False),
        ("session", "keep", False),
        ("session", "delete", False),
    ],
)
def test_only_a_kept_run_mode_child_is_deleted_by_the_archive(mode: str, cleanup: str, deletes: bool) -> None:
    assert rules.sweep_deletes_child_session(record(mode=mode, cleanup=cleanup)) is deletes


# -- rule 8: attachments on sweep ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cleanup", "retain", "removes"),
    [("keep", True, False), ("keep", False, True), ("delete", True, True), ("delete", False, True)],
)
def test_rule8_sweep_keeps_attachments_only_when_kept_and_retained(
    cleanup: str, retain: bool, removes: bool
) -> None:
    assert rules.sweep_removes_attachments(record(cleanup=cleanup), retain) is removes


# -- frozen result ------------------------------------------------------------------------------------------------
def test_freeze_cuts_at_a_utf8_boundary() -> None:
    text = "aé€😀"  # 1 + 2 + 3 + 4 bytes
    assert rules.freeze(text, 10) == text
    assert rules.freeze(text, 9) == "aé€"
    assert rules.freeze(text, 6) == "aé€"
    assert rules.freeze(text, 5) == "aé"
    assert rules.freeze(text, 2) == "a"
    assert rules.freeze(text, 1) == "a"
    assert rules.freeze("é", 1) == ""
    assert rules.freeze(None, 10) is None


@given(st.text(), st.integers(min_value=1, max_value=64))
def test_freeze_is_a_valid_prefix_within_the_cap(text: str, cap: int) -> None:
    frozen = rules.freeze(text, cap)
    assert frozen is not None
    data = frozen.encode("utf-8")
    assert len(data) <= cap
    assert text.startswith(frozen)
    # As long as possible: the next character would not have fit.
    if frozen != text:
        assert len(data) + len(text[len(frozen)].encode("utf-8")) > cap


# -- announce retries --------------------------------------------------------------------------------------------
def test_announce_delays_are_1_2_4_8_then_8() -> None:
    delays = Settings().announce_retry_delays_s
    assert [rules.announce_delay(n, delays) for n in range(1, 8)] == [1, 2, 4, 8, 8, 8, 8]


def test_announce_delay_edges() -> None:
    assert rules.announce_delay(0, [1.0, 2.0]) == 1.0  # never wraps around to the last delay
    assert rules.announce_delay(3, []) == 1.0


def test_announce_text() -> None:
    ok = record(outcome="ok", frozen_result="the answer", label="lbl")
    assert rules.announce_text(ok) == "[subagent 'lbl' r1 finished: ok]\nthe answer"
    failed = record(outcome="error", error="interrupted by gateway restart")
    assert rules.announce_text(failed) == "[subagent r1 finished: error] interrupted by gateway restart"
    timed_out = record(outcome="timeout", error=None)
    assert rules.announce_text(timed_out) == "[subagent r1 finished: timeout]"


# -- rule 9: TTLs are named settings, documented in one place -------------------------------------------------------
def test_rule9_ttls_are_settings_with_the_documented_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert (
        s.subagent_session_ttl_s,
        s.subagent_archive_after_s,
        s.pending_error_ttl_s,
        s.lifecycle_error_grace_s,
        s.announce_expiry_s,
        s.announce_hard_expiry_s,
        s.run_context_idle_ttl_s,
        s.max_spawn_depth,
        s.max_children_per_agent,
        s.frozen_result_max_bytes,
        s.attachments_max_bytes,
    ) == (300, 3600, 300, 15, 300, 1800, 1800, 1, 5, 100 * 1024, 5 * 1024 * 1024)
    monkeypatch.setenv("CLAWGATE_SUBAGENT_SESSION_TTL_S", "2.5")
    assert load_settings().subagent_session_ttl_s == 2.5


# -- spawn limits ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("depth", "children", "refused", "details"),
    [
        (1, 0, False, None),
        (2, 4, False, None),  # at the depth limit and one below the children limit
        (3, 0, True, {"depth": 3, "maxSpawnDepth": 2}),
        (1, 5, True, {"activeChildren": 5, "maxChildrenPerAgent": 5}),
        (3, 5, True, {"depth": 3, "maxSpawnDepth": 2}),  # depth is checked first
    ],
)
def test_check_spawn_limits(depth: int, children: int, refused: bool, details: dict[str, int] | None) -> None:
    err = rules.check_spawn_limits("agent:main:main", depth, children, max_depth=2, max_children=5)
    if not refused:
        assert err is None
        return
    assert err is not None and err.code == "FORBIDDEN"
    assert err.details == details
