"""Typed identifiers, so a session key is never passed where a run id belongs."""

from __future__ import annotations

import uuid
from typing import NewType

RunId = NewType("RunId", str)
SessionKey = NewType("SessionKey", str)
ConnId = NewType("ConnId", str)

MAIN_SESSION = SessionKey("agent:main:main")


def new_id() -> str:
    return uuid.uuid4().hex


def new_run_id() -> RunId:
    return RunId(str(uuid.uuid4()))


def new_conn_id() -> ConnId:
    return ConnId(uuid.uuid4().hex[:12])
