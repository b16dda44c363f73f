"""Tool arguments and results as they may appear in a debug log: secrets masked, text clipped."""

from __future__ import annotations

import re
from typing import Any

_SECRET_KEY = re.compile(r"(?i)(pass(word)?|secret|token|api[_-]?key|auth|credential|cookie)")
TEXT_MAX = 200
ITEMS_MAX = 20
DEPTH_MAX = 4


def redact(value: Any, depth: int = 0) -> Any:
    """A copy safe to log: values under secret-looking keys masked, strings and lists clipped."""
    if depth >= DEPTH_MAX:
        return "..."
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for n, (key, item) in enumerate(value.items()):
            if n >= ITEMS_MAX:
                out["..."] = f"{len(value) - ITEMS_MAX} more"
                break
            out[str(key)[:64]] = "***" if _SECRET_KEY.search(str(key)) else redact(item, depth + 1)
        return out
    if isinstance(value, list | tuple):
        items = [redact(item, depth + 1) for item in value[:ITEMS_MAX]]
        if len(value) > ITEMS_MAX:
            items.append(f"... {len(value) - ITEMS_MAX} more")
        return items
    if isinstance(value, str) and len(value) > TEXT_MAX:
        return value[:TEXT_MAX] + f"... ({len(value)} chars)"
    return value
