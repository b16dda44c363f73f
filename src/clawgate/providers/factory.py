"""Build the configured provider from Settings."""

from __future__ import annotations

from clawgate.providers.base import Provider
from clawgate.providers.resilient import ResilientProvider
from clawgate.providers.scripted import ScriptedProvider
from clawgate.settings import Settings
from clawgate.state.clock import Clock


def make_provider(settings: Settings, clock: Clock) -> ResilientProvider:
    """The configured provider behind the fault handling (concurrency, breakers, fallbacks)."""
    inner = make_base_provider(settings, clock)
    return ResilientProvider(
        inner,
        clock,
        default_model=settings.openai_model if settings.provider == "openai" else "scripted",
        fallback_models=settings.fallback_models,
        max_concurrency=settings.provider_max_concurrency,
        breaker_failures=settings.provider_breaker_failures,
        breaker_cooldown_s=settings.provider_breaker_cooldown_s,
    )


def make_base_provider(settings: Settings, clock: Clock) -> Provider:
    """`scripted` (offline default) or `openai` (OpenAI-compatible HTTP), per `settings.provider`."""
    if settings.provider == "scripted":
        return ScriptedProvider(clock, delay_s=settings.scripted_delay_s, chunks=settings.scripted_chunks)
    if settings.provider == "openai":
        # Imported here: the openai package takes over a second and tens of MB to import, which
        # a gateway on the scripted provider should not pay at start.
        from clawgate.providers.openai_provider import OpenAIProvider

        return OpenAIProvider(
            base_url=settings.openai_base_url,
            model=settings.openai_model,
            api_key=settings.openai_api_key,
            timeout_s=settings.openai_timeout_s,
            max_output_bytes=settings.max_reply_bytes,
        )
    raise ValueError(f"unknown provider {settings.provider!r}")
