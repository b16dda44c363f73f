"""Import structlog without rich.

structlog imports rich at import time when it is installed, only to offer rich
tracebacks, which clawgate never uses: its log chain formats exceptions itself
(`format_exc_info`) before any renderer sees them. rich (with pygments) costs a
server process several MB of RSS and a noticeable part of its start time. So the
first import of structlog runs with `import rich` failing, and structlog takes its
plain fallbacks; the CLI commands that print tables still import rich normally
afterwards.
"""

from __future__ import annotations

import sys


def import_structlog_without_rich() -> None:
    if "structlog" in sys.modules or "rich" in sys.modules:
        return  # too late (or rich is already paid for): nothing to save
    sys.modules["rich"] = None  # type: ignore[assignment]  # makes `import rich` raise ImportError
    try:
        import structlog
        import structlog.dev  # noqa: F401  (imports rich too, when it can)
    finally:
        del sys.modules["rich"]
