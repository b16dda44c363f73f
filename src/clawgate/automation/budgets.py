"""Token budgets per session: past `budget_tokens`, new runs in the session are refused.

Each run's tokens (its record's `usage.total`) are added to the session's `tokens_used` in
the store at the run's end; a new run is checked against the stored count when it is
inserted (`Budgets.gate`). A run already going when the budget is reached finishes: the
budget stops new work, it does not cut a reply in half.
"""

from __future__ import annotations

from clawgate.clip import clip
from clawgate.errors import Forbidden
from clawgate.runs.service import SubmitRequest
from clawgate.sessions.service import SessionService
from clawgate.store.base import SessionGate, Store
from clawgate.store.records import RunRecord, SessionMeta


def over_budget(budget_tokens: int | None, tokens_used: int) -> bool:
    """A budget of None or 0 is no budget."""
    return bool(budget_tokens) and tokens_used >= (budget_tokens or 0)


def _past_budget(meta: SessionMeta) -> bool:
    return over_budget(meta.budget_tokens, meta.tokens_used)


class Budgets:
    def __init__(self, store: Store, sessions: SessionService) -> None:
        self.store = store
        self.sessions = sessions
        self.refused = 0
        self._gate = SessionGate(refuses=_past_budget, refusal=self._refusal)

    def gate(self, req: SubmitRequest) -> SessionGate | None:
        """The check a new run's insert makes against its session's stored record, or None
        when this process knows there is nothing to check. A cached copy without a budget
        is trusted (as `sessions.patch` on this process updates it); a budget, or a session
        not cached, is checked against the store's count in the run's insert itself (one
        writer round trip on SQLite), since the cached count is stale by design."""
        if req.known_new_session:  # a session created for this run has no budget yet
            return None
        meta = self.sessions.cache.get(req.session_key)
        if meta is not None and not meta.budget_tokens:
            return None
        return self._gate

    def _refusal(self, meta: SessionMeta) -> Forbidden:
        self.refused += 1
        return Forbidden(
            f"session {clip(meta.key)} is past its token budget: "
            f"{meta.tokens_used} of {meta.budget_tokens} tokens used",
            details={
                "sessionKey": meta.key,
                "budgetTokens": meta.budget_tokens,
                "tokensUsed": meta.tokens_used,
            },
        )

    def on_run_end(self, rec: RunRecord) -> None:
        tokens = int((rec.usage or {}).get("total") or 0)
        if tokens <= 0:
            return
        # Not awaited (the lane goes on): the write is queued behind the run's end record, and
        # the next run's check reads through the same queue, so it sees it.
        self.store.add_session_tokens(rec.session_key, tokens)
        meta = self.sessions.cache.get(rec.session_key)
        if meta is not None:
            meta.tokens_used += tokens
