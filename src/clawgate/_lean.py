"""Import structlog and uvicorn without the optional packages clawgate never uses.

Both import optional packages at import time, when they are installed, for features
clawgate does not use:

- structlog imports `rich` (rich tracebacks; clawgate's log chain formats exceptions
  itself with `format_exc_info` before any renderer sees them) and `greenlet` (for the
  deprecated `structlog.threadlocal` context, which clawgate does not use);
- uvicorn imports `watchfiles` (its `--reload` file watcher; clawgate serves through
  `uvicorn.Server` and never reloads).

rich (with pygments) costs a server process several MB of RSS and a noticeable part of
its start time; greenlet and watchfiles together about 1.5 MB. So the first import of
structlog, and of uvicorn, runs with those imports failing, and the library takes its
plain fallback. Anything imported later imports them normally (the CLI commands that
print tables still get rich).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager

STRUCTLOG_SKIPS = ("rich", "greenlet")
UVICORN_SKIPS = ("watchfiles",)


@contextmanager
def _without(names: tuple[str, ...]) -> Iterator[None]:
    """Make `import NAME` raise ImportError for these names, unless one is already loaded."""
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
    try:
        yield
    finally:
        for name in blocked:
            del sys.modules[name]


def _import_without(modules: tuple[str, ...], skips: tuple[str, ...]) -> None:
    if modules[0] in sys.modules:
        return  # too late: nothing to save
    with _without(skips):
        for module in modules:
            importlib.import_module(module)


def import_structlog_without_rich() -> None:
    """Import structlog (and structlog.dev, which imports rich too) without rich and greenlet."""
    _import_without(("structlog", "structlog.dev"), STRUCTLOG_SKIPS)


def import_uvicorn_without_watchfiles() -> None:
    """Import uvicorn without watchfiles (it then falls back to its stat-based reloader)."""
    _import_without(("uvicorn",), UVICORN_SKIPS)
