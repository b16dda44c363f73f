"""`clawgate`: run a gateway, query it, call methods, run batches and benchmarks.

Every command module is imported here and its commands are registered on the one app
(`clawgate.cli.app`), in the order `clawgate --help` lists them. Each command keeps its heavy
imports (rich, the client, the batch and bench engines) inside its body, so `clawgate gateway`
loads none of them.
"""

from __future__ import annotations

from clawgate.cli.app import app
from clawgate.cli.batch import BATCH_HELP, batch
from clawgate.cli.bench import bench_app
from clawgate.cli.cron import cron_app
from clawgate.cli.gateway import gateway
from clawgate.cli.query import call, status

app.command()(gateway)
app.command()(status)
app.command()(call)
app.command(help=BATCH_HELP)(batch)
app.add_typer(bench_app, name="bench")
app.add_typer(cron_app, name="cron")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
