"""clawgate: an asyncio agent gateway whose memory is bounded by construction."""

__version__ = "0.1.0"
