"""Batches of agent runs and spawns through a gateway: exactly once per task, resumable.

`tasks` parses and validates the JSONL tasks file, `journal` owns the results file and the
spawn journal, `runner` drives the tasks (retries, backoff, resume), `progress` draws the bar.
A client of the gateway: it speaks the protocol through `clawgate.client` only.
"""

from clawgate.batch.runner import BatchOptions, BatchRunner, BatchSummary, run_batch
from clawgate.batch.tasks import BadLine, Task, default_out_path, default_session_key, parse_tasks

__all__ = [
    "BadLine",
    "BatchOptions",
    "BatchRunner",
    "BatchSummary",
    "Task",
    "default_out_path",
    "default_session_key",
    "parse_tasks",
    "run_batch",
]
