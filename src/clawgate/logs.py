"""structlog configuration: readable console lines by default, JSON with `--log-json`."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# The event name is padded to this width, as structlog's console renderer does.
EVENT_WIDTH = 30


def plain_renderer(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> str:
    """`TIME [level   ] event   key=value ...`, then the formatted traceback if any.

    The same layout as structlog's ConsoleRenderer without colours, but without
    importing `structlog.dev`, which pulls in rich (and pygments) when they are
    installed: megabytes of RSS and a slower start for a gateway whose log goes to a
    file or a service manager.
    """
    exc = event_dict.pop("exception", None)
    stack = event_dict.pop("stack", None)
    ts = event_dict.pop("timestamp", None)
    level = event_dict.pop("level", "")
    event = str(event_dict.pop("event", ""))
    parts = [] if ts is None else [str(ts)]
    parts.append(f"[{level:<8}]")
    parts.append(event.ljust(EVENT_WIDTH) if event_dict else event)
    parts.extend(
        f"{key}={value!r}" if isinstance(value, str) and " " in value else f"{key}={value}"
        for key, value in sorted(event_dict.items())
    )
    line = " ".join(parts)
    for extra in (stack, exc):
        if extra:
            line += "\n" + str(extra)
    return line


def configure(level: str = "info", *, json: bool = False) -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso" if json else "%Y-%m-%d %H:%M:%S", utc=json),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.typing.Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
    elif sys.stderr.isatty():
        # Colours for a person at a terminal (structlog.dev imports rich for them).
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    else:
        renderer = plain_renderer
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Records of the standard library's loggers (asyncio, uvicorn) go through the same renderer,
    # so `--log-json` means every line on stderr is one JSON object.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *processors],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(lvl, logging.WARNING))
