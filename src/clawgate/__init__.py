"""clawgate: an asyncio agent gateway whose memory is bounded by construction."""

from clawgate._lean import import_structlog_without_rich

__version__ = "0.1.0"

import_structlog_without_rich()
