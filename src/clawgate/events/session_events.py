"""`sessions.changed` and `session.message`: session-level events, as OpenClaw emits them.

The session service tells this publisher about every created, patched, reset or deleted
session and every appended transcript message; the event bus tells it about run
lifecycles. Each becomes one event frame published on the bus without a run id, so it
reaches the subscribers of that session and the `all` subscribers (which is what
`sessions.subscribe` makes a connection), in every process of a cluster. Nothing is
stored here.
"""

from __future__ import annotations

import asyncio
from typing import Any

from clawgate.events.bus import EventBus
from clawgate.ids import RunId, SessionKey
from clawgate.protocol.frames import encode_event
from clawgate.sessions.keys import agent_id_of
from clawgate.sessions.view import ModelDefaults, chat_message, message_id, ms, session_row
from clawgate.state.clock import Clock
from clawgate.store.records import SessionMeta, TranscriptMessage

LIFECYCLE_PHASES = frozenset({"start", "end", "error"})


class SessionEventPublisher:
    def __init__(self, bus: EventBus, clock: Clock, defaults: ModelDefaults) -> None:
        self.bus = bus
        self.clock = clock
        self.defaults = defaults

    def session_changed(self, key: SessionKey, reason: str, meta: SessionMeta | None) -> None:
        """`reason`: "new", "patch", "reset" or "delete" (OpenClaw's names)."""
        if not self._wanted(key):
            return
        payload = self._base(key)
        payload["reason"] = reason
        if meta is not None:
            payload["sessionId"] = meta.session_id
            payload["updatedAt"] = ms(meta.updated_at)
            payload["session"] = session_row(meta, self.defaults)
        self._publish(key, "sessions.changed", payload)

    def message_appended(self, message: TranscriptMessage, meta: SessionMeta | None) -> None:
        key = SessionKey(message.session_key)
        if not self._wanted(key):
            return
        payload = self._base(key)
        payload["message"] = chat_message(message)
        mid = message_id(message)
        if mid is not None:
            payload["messageId"] = mid
        if message.run_id:
            payload["runId"] = message.run_id
        if meta is not None:
            payload["sessionId"] = meta.session_id
            payload["updatedAt"] = ms(meta.updated_at)
        self._publish(key, "session.message", payload)

    def on_agent_event(self, run_id: RunId, key: SessionKey, stream: str, data: dict[str, Any]) -> None:
        """A run started or ended in a session (an `EventBus` listener)."""
        phase = data.get("phase")
        if stream != "lifecycle" or phase not in LIFECYCLE_PHASES or not self._wanted(key):
            return
        payload = self._base(key)
        payload["phase"] = phase
        payload["runId"] = run_id
        if phase == "start":
            self._publish(key, "sessions.changed", payload)
            return
        # The run's end reaches its session after its final `chat` event (emitted right after
        # the lifecycle end, in the same call), as OpenClaw publishes it once the transcript is
        # persisted: a client that reloads the history on it then finds the final answer.
        asyncio.get_running_loop().call_soon(self._publish, key, "sessions.changed", payload)

    def _wanted(self, key: SessionKey) -> bool:
        """Anyone to tell? Without a listener here or other processes, skip the encoding (the
        run path calls this for every message); with other processes, they may have some."""
        bus = self.bus
        return bool(bus.relay is not None or bus.all_subs or bus.session_subs.get(key))

    def _base(self, key: SessionKey) -> dict[str, Any]:
        return {"sessionKey": key, "agentId": agent_id_of(key), "ts": ms(self.clock.time())}

    def _publish(self, key: SessionKey, event: str, payload: dict[str, Any]) -> None:
        self.bus.publish(None, key, encode_event(event, payload))
