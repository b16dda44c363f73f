"""Helpers for tests and benchmarks that run real gateway processes (shipped like aiohttp.test_utils)."""

from clawgate.testing.process import GatewayProcess, clean_env, free_port

__all__ = ["GatewayProcess", "clean_env", "free_port"]
