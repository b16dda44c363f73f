"""`clip`: the one way a client-supplied string enters a log line or an error message.

A refused handshake used to log the client's `method` whole, up to the 512 KB
frame limit, at info level: twenty attempts wrote 9.5 MiB of log. Anything a
client chose (method names, roles, scopes, keys, ids) goes through `clip` first.
"""

from __future__ import annotations

CLIP_CHARS = 64


def clip(value: object, limit: int = CLIP_CHARS) -> str:
    """`value` as text of at most `limit` characters plus a marker saying how much was cut."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...(+{len(text) - limit} chars)"
