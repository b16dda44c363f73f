"""Build the configured provider from Settings."""

from __future__ import annotations

from clawgate.providers.base import Provider
from clawgate.providers.openai_provider import OpenAIProvider
from clawgate.providers.scripted import ScriptedProvider
from clawgate.settings import Settings
from clawgate.state.clock import Clock


def make_provider(settings: Settings, clock: Clock) -> Provider:
    """`scripted` (offline default) or `openai` (OpenAI-compatible HTTP), per `settings.provider`."""
    if settings.provider == "scripted":
        return ScriptedProvider(clock, delay_s=settings.scripted_delay_s, chunks=settings.scripted_chunks)
    if settings.provider == "openai":
        return OpenAIProvider(
            base_url=settings.openai_base_url,
            model=settings.openai_model,
            api_key=settings.openai_api_key,
            timeout_s=settings.openai_timeout_s,
            max_output_bytes=settings.max_reply_bytes,
        )
    raise ValueError(f"unknown provider {settings.provider!r}")
