"""`clawgate cron add|list|rm|run|runs`: scheduled runs through a gateway's cron.* methods."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from clawgate.cli.app import DEFAULT_URL, TokenOpt, UrlOpt, call_or_exit, console

cron_app = typer.Typer(help="Scheduled runs: add, list, remove and run cron jobs.", no_args_is_help=True)


def _schedule(every: str | None, cron: str | None, at: str | None, tz: str | None) -> dict[str, Any]:
    given = [x for x in (every, cron, at) if x]
    if len(given) != 1:
        raise typer.BadParameter("give exactly one of --every, --cron, --at")
    if every:
        units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
        number, unit = every.rstrip("smhd"), every[len(every.rstrip("smhd")) :] or "ms"
        if unit not in units or not number.isdigit():
            raise typer.BadParameter("--every takes a number with a unit: 30s, 5m, 1h, 1d")
        return {"kind": "every", "everyMs": int(number) * units[unit]}
    if cron:
        return {"kind": "cron", "expr": cron, "tz": tz or "UTC"}
    return {"kind": "at", "at": at}


@cron_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="A name for the job.")],
    message: Annotated[str, typer.Option("--message", "-m", help="The agent turn to run.")],
    every: Annotated[str | None, typer.Option(help="Interval: 30s, 5m, 1h, 1d.")] = None,
    cron: Annotated[str | None, typer.Option(help="Five-field cron expression.")] = None,
    tz: Annotated[str | None, typer.Option(help="IANA time zone of --cron (default UTC).")] = None,
    at: Annotated[str | None, typer.Option(help="One shot at an ISO-8601 time.")] = None,
    session_key: Annotated[str | None, typer.Option("--session-key", help="Run in this session.")] = None,
    agent_id: Annotated[str, typer.Option("--agent-id")] = "main",
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
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
def list_jobs(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """List the jobs."""
    console.print_json(data=call_or_exit(url, token, "cron.list", {})["jobs"])


@cron_app.command("rm")
def remove(job_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Remove a job and its history."""
    console.print_json(data=call_or_exit(url, token, "cron.remove", {"jobId": job_id}))


@cron_app.command("run")
def run(job_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Run a job now (its schedule is unchanged)."""
    console.print_json(data=call_or_exit(url, token, "cron.run", {"jobId": job_id}))


@cron_app.command("runs")
def runs(job_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """A job's run history, newest first."""
    console.print_json(data=call_or_exit(url, token, "cron.runs", {"jobId": job_id})["entries"])
