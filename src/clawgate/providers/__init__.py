"""LLM providers: `scripted` (offline, deterministic default) and `openai` (OpenAI-compatible HTTP)."""
