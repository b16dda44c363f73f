"""Benchmark engines behind `clawgate bench` (the soak); clients of a gateway, never part of one."""
