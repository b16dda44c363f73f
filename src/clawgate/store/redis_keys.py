"""Every Redis key, channel, key prefix and key expiry of the gateway, in one place (arq's
constants.py does the same).

``P`` is `Settings.redis_prefix` ("clawgate" by default). Each part of the gateway that
keeps state in Redis has its own namespace under it:

    P:...             the store's records (sessions, transcripts, runs, subagents): `StoreKeys`
    P:cron:...        cron jobs and their run history (store/cron_store.py)
    P:usage:...       token usage per day (store/usage_store.py)
    P:wh:...          webhook deliveries (store/webhook_store.py)
    P:dispatch:...    the shared run queues of scale-out (scaleout/dispatch.py): `DispatchKeys`
    P:fanout:...      the pub/sub channels of scale-out (scaleout/fanout.py): `FanoutKeys`

Why here, in store/: the store is the lowest layer that names Redis keys, and the layers
only import downwards (store must not import scaleout/). The two also meet in one key: the
store's fenced `end_run` checks the dispatch lease (`DispatchKeys.lock`).

Every key expires (docs/design.md, record lives): the TTLs below are the floors and
backstops; the modules that write the keys document which write refreshes which expiry.
Pure: names and numbers only, no Redis client.
"""

from __future__ import annotations

import math

# -- namespaces under the prefix -------------------------------------------------------------------

CRON = "cron"
USAGE = "usage"
WEBHOOKS = "wh"
DISPATCH = "dispatch"
FANOUT = "fanout"


def namespace(prefix: str, part: str) -> str:
    """The key prefix of one part of the gateway: `namespace("clawgate", DISPATCH)`."""
    return f"{prefix}:{part}"


# -- expiry ------------------------------------------------------------------------------------------

DAY_S = 86400.0
# Index sets, zsets and streams (the store's indexes, the dispatch's ready stream, active zset
# and fence counter): refreshed on every write. An int: EXPIRE takes whole seconds.
INDEX_TTL_S = 7 * 86400
DEFAULT_SESSION_TTL_S = 30 * DAY_S  # sessions and transcripts when session_ttl_s is None
OPEN_RUN_TTL_S = 2 * DAY_S  # queued/running run records (at least timeout_s + 1 h)
SUB_SAFETY_MARGIN_S = 3600.0  # subagent records outlive expires_at by this much
QUARANTINE_TTL_S = 7 * DAY_S  # undecodable subagent records kept aside this long
CLAIM_SAFETY_S = 3600.0  # a claim key expires natively this long after its lease deadline
RUNS_ENDED_CAP = 200_000  # P:runs:ended keeps at most this many (oldest dropped first)
QUEUE_TTL_S = 86400.0  # the dispatch's per-session queues, refreshed on each push
READY_MAXLEN = 100_000  # the dispatch's ready stream keeps about this many entries
GROUP = "workers"  # the consumer group of the ready stream


# -- the store's records (store/redis_store.py) ------------------------------------------------------


class StoreKeys:
    """Every key name of the store's records (layout: store/redis_store.py)."""

    def __init__(self, prefix: str) -> None:
        self.p = prefix

    def session(self, key: str) -> str:
        return f"{self.p}:session:{key}"

    def messages(self, key: str) -> str:
        return f"{self.p}:messages:{key}"

    def sessions_index(self) -> str:
        return f"{self.p}:sessions"

    def sessions_expiry(self) -> str:
        return f"{self.p}:sessions:expiry"

    def run(self, run_id: str) -> str:
        return f"{self.p}:run:{run_id}"

    def runs_open(self) -> str:
        return f"{self.p}:runs:open"

    def runs_ended(self) -> str:
        return f"{self.p}:runs:ended"

    def runs_all(self) -> str:
        return f"{self.p}:runs:all"

    def runs_by_session(self, session_key: str) -> str:
        return f"{self.p}:runs:session:{session_key}"

    def idem(self, key: str) -> str:
        return f"{self.p}:idem:{key}"

    def sub(self, run_id: str) -> str:
        return f"{self.p}:sub:{run_id}"

    def subs_all(self) -> str:
        return f"{self.p}:subs:all"

    def subs_by_requester(self, requester: str) -> str:
        return f"{self.p}:subs:requester:{requester}"

    def subs_expiry(self) -> str:
        return f"{self.p}:subs:expiry"

    def subs_live(self) -> str:
        return f"{self.p}:subs:live"

    def sub_claim(self, run_id: str) -> str:
        return f"{self.p}:sub:claim:{run_id}"

    def sub_quarantine(self, run_id: str) -> str:
        return f"{self.p}:sub:quarantine:{run_id}"


# -- the shared run queues of scale-out (scaleout/dispatch.py) -----------------------------------------


class DispatchKeys:
    """Every key name the run dispatcher uses (layout: scaleout/dispatch.py); `prefix` is
    the dispatch namespace, `namespace(P, DISPATCH)`."""

    def __init__(self, prefix: str) -> None:
        self.p = prefix

    def queue(self, session: str) -> str:
        return f"{self.p}:q:{session}"

    def processing(self, session: str) -> str:
        return f"{self.p}:qp:{session}"

    def lock(self, session: str) -> str:
        return f"{self.p}:lock:{session}"

    def active(self) -> str:
        return f"{self.p}:active"

    def ready(self) -> str:
        return f"{self.p}:ready"

    def fence(self) -> str:
        return f"{self.p}:fence"


def queue_run_cmds(
    keys: DispatchKeys,
    run_id: str,
    session_key: str,
    *,
    queue_ttl_s: float = QUEUE_TTL_S,
    ready_maxlen: int = READY_MAXLEN,
) -> list[tuple[str | int, ...]]:
    """The commands that queue a run for the dispatcher: onto its session's queue, and an
    entry in the ready stream that leads a process to the session."""
    q = keys.queue(session_key)
    return [
        ("RPUSH", q, run_id),
        ("EXPIRE", q, max(1, math.ceil(queue_ttl_s))),
        ready_entry_cmd(keys, session_key, ready_maxlen),
        ("EXPIRE", keys.ready(), INDEX_TTL_S),
    ]


def ready_entry_cmd(keys: DispatchKeys, session_key: str, ready_maxlen: int) -> tuple[str | int, ...]:
    """An entry of the ready stream: "session `session_key` has runs queued"."""
    return ("XADD", keys.ready(), "MAXLEN", "~", ready_maxlen, "*", "session", session_key)


# -- the pub/sub channels of scale-out (scaleout/fanout.py) --------------------------------------------


class FanoutKeys:
    """Every channel name the fan-out uses (scaleout/fanout.py); `prefix` is the fan-out
    namespace, `namespace(P, FANOUT)`. Channels hold nothing, so nothing expires."""

    def __init__(self, prefix: str) -> None:
        self.p = prefix

    def events(self) -> str:
        return f"{self.p}:ev"

    def done(self) -> str:
        return f"{self.p}:done"

    def abort(self) -> str:
        return f"{self.p}:abort"

    def hello(self) -> str:
        return f"{self.p}:hello"
