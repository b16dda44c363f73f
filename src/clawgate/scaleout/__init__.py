"""Scale-out on Redis: several gateway processes share runs, events and results.

    keys         store/redis_keys.py (every Redis key, channel and expiry; the store needs them too)
    redis_io     helpers every Redis loop here goes through (cancellation, restarts)
    dispatch     `RedisDispatcher`: the shared per-session run queues; `RedisRunDispatch`: the
                 run service's `RunDispatch` over them
    fanout       `RedisEventRelay`: event frames, run ends and aborts between processes; the
                 event bus' `EventRelay`
    member       `ClusterMember`: this process in the cluster, built and bound by the gateway

Only the composition root (server/gateway.py) imports this package, and only when the store
is Redis: a SQLite gateway never loads the Redis client.
"""
