"""Token budgets per session: past `budget_tokens`, new runs in the session are refused.

Each run's tokens (its record's `usage.total`) are added to the session's `tokens_used` in
the store at the run's end; a new run is checked against the stored count before it is
accepted. A run already going when the budget is reached finishes: the budget stops new
work, it does not cut a reply in half.
"""

from __future__ import annotations

from clawgate.clip import clip
from clawgate.errors import Forbidden
from clawgate.runs.service import SubmitRequest
from clawgate.sessions.service import SessionService
from clawgate.store.base import Store
from clawgate.store.records import RunRecord


def over_budget(budget_tokens: int | None, tokens_used: int) -> bool:
    """A budget of None or 0 is no budget."""
    return bool(budget_tokens) and tokens_used >= (budget_tokens or 0)


class Budgets:
    def __init__(self, store: Store, sessions: SessionService) -> None:
        self.store = store
        self.sessions = sessions
        self.refused = 0

    async def admit(self, req: SubmitRequest) -> None:
        if req.known_new_session:  # a session created for this run has no budget yet
            return
        meta = await self.sessions.get(req.session_key)
        if meta is None or not meta.budget_tokens:
            return
        # The cached copy's count is stale by design (other runs, other processes): the store's.
        fresh = await self.store.get_session(req.session_key)
        if fresh is None or not over_budget(fresh.budget_tokens, fresh.tokens_used):
            return
        self.refused += 1
        raise Forbidden(
            f"session {clip(req.session_key)} is past its token budget: "
            f"{fresh.tokens_used} of {fresh.budget_tokens} tokens used",
            details={
                "sessionKey": req.session_key,
                "budgetTokens": fresh.budget_tokens,
                "tokensUsed": fresh.tokens_used,
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
