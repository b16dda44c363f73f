"""`clawgate`: run a gateway, query it, call methods, run batches and benchmarks.

Every command module is imported here and its commands are registered on the one click
group (`clawgate.cli.app`), in the order `clawgate --help` lists them. Each command keeps its
heavy imports (rich, the client, the batch and bench engines) inside its body, so
`clawgate gateway` loads none of them.
"""

from __future__ import annotations

from clawgate.cli.app import app
from clawgate.cli.batch import batch
from clawgate.cli.bench import bench_app
from clawgate.cli.cron import cron_app
from clawgate.cli.gateway import gateway
from clawgate.cli.query import call, status

app.add_command(gateway)
app.add_command(status)
app.add_command(call)
app.add_command(batch)
app.add_command(bench_app)
app.add_command(cron_app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
