"""`clawgate cron add|list|rm|run|runs`: scheduled runs through a gateway's cron.* methods."""

from __future__ import annotations

from typing import Any

import click

from clawgate.cli.app import Argument, Group, call_or_exit, console, token_option, url_option


@click.group("cron", cls=Group, no_args_is_help=True)
def cron_app() -> None:
    """Scheduled runs: add, list, remove and run cron jobs."""


def _schedule(every: str | None, cron: str | None, at: str | None, tz: str | None) -> dict[str, Any]:
    given = [x for x in (every, cron, at) if x]
    if len(given) != 1:
        raise click.BadParameter("give exactly one of --every, --cron, --at")
    if every:
        units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
        number, unit = every.rstrip("smhd"), every[len(every.rstrip("smhd")) :] or "ms"
        if unit not in units or not number.isdigit():
            raise click.BadParameter("--every takes a number with a unit: 30s, 5m, 1h, 1d")
        return {"kind": "every", "everyMs": int(number) * units[unit]}
    if cron:
        return {"kind": "cron", "expr": cron, "tz": tz or "UTC"}
    return {"kind": "at", "at": at}


@cron_app.command("add")
@click.argument("name", cls=Argument, help="A name for the job.")
@click.option("--message", "-m", required=True, help="The agent turn to run.")
@click.option("--every", help="Interval: 30s, 5m, 1h, 1d.")
@click.option("--cron", help="Five-field cron expression.")
@click.option("--tz", help="IANA time zone of --cron (default UTC).")
@click.option("--at", help="One shot at an ISO-8601 time.")
@click.option("--session-key", help="Run in this session.")
@click.option("--agent-id", default="main")
@url_option()
@token_option
def add(
    name: str,
    message: str,
    every: str | None,
    cron: str | None,
    tz: str | None,
    at: str | None,
    session_key: str | None,
    agent_id: str,
    url: str,
    token: str | None,
) -> None:
    """Add a job; prints it (with its id and next run)."""
    params: dict[str, Any] = {
        "name": name,
        "schedule": _schedule(every, cron, at, tz),
        "message": message,
        "agentId": agent_id,
    }
    if session_key:
        params["sessionKey"] = session_key
    console.print_json(data=call_or_exit(url, token, "cron.add", params)["job"])


@cron_app.command("list")
@url_option()
@token_option
def list_jobs(url: str, token: str | None) -> None:
    """List the jobs."""
    console.print_json(data=call_or_exit(url, token, "cron.list", {})["jobs"])


@cron_app.command("rm")
@click.argument("job_id", cls=Argument)
@url_option()
@token_option
def remove(job_id: str, url: str, token: str | None) -> None:
    """Remove a job and its history."""
    console.print_json(data=call_or_exit(url, token, "cron.remove", {"jobId": job_id}))


@cron_app.command("run")
@click.argument("job_id", cls=Argument)
@url_option()
@token_option
def run(job_id: str, url: str, token: str | None) -> None:
    """Run a job now (its schedule is unchanged)."""
    console.print_json(data=call_or_exit(url, token, "cron.run", {"jobId": job_id}))


@cron_app.command("runs")
@click.argument("job_id", cls=Argument)
@url_option()
@token_option
def runs(job_id: str, url: str, token: str | None) -> None:
    """A job's run history, newest first."""
    console.print_json(data=call_or_exit(url, token, "cron.runs", {"jobId": job_id})["entries"])
