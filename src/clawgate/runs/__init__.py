"""The run scheduler: lanes, run lifecycle, abort, timeouts, idempotency, result cache."""
