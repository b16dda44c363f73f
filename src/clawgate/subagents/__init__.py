"""The subagent registry: spawn, limits, announce, cleanup, archive, TTL sweep, exactly-once ended hook."""
