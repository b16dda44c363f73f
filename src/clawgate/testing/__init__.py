"""Helpers for tests and benchmarks that run real gateway processes (shipped like aiohttp.test_utils)."""

from clawgate.testing.process import GatewayProcess, astart_all, clean_env, free_port, stop_all

__all__ = ["GatewayProcess", "astart_all", "clean_env", "free_port", "stop_all"]
