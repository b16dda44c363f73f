"""`clawgate`: run a gateway, query it, call methods, run batches and benchmarks."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from clawgate import __version__
from clawgate.settings import DEFAULT_PORT, load_settings

app = typer.Typer(
    name="clawgate",
    help="clawgate: an asyncio agent gateway with memory bounded by construction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _LazyConsole:
    """A rich Console made on first use: `clawgate gateway` prints nothing through it when all
    goes well, and importing rich costs the server start time and several MB of RSS."""

    def __init__(self, *, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return getattr(self._console, name)


console: Any = _LazyConsole()
err: Any = _LazyConsole(stderr=True)

DEFAULT_URL = f"ws://127.0.0.1:{DEFAULT_PORT}/"
UrlOpt = Annotated[str, typer.Option("--url", envvar="CLAWGATE_URL", help="Gateway WebSocket URL.")]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="CLAWGATE_TOKEN", help="Gateway token (prefer CLAWGATE_TOKEN or --token-file)."
    ),
]
TokenFileOpt = Annotated[
    Path | None, typer.Option("--token-file", help="Read the gateway token from this file.")
]
READ_SCOPES = ["operator.read"]
CMDLINE_TOKEN_WARNING = (
    "[yellow]warning:[/yellow] --token on the command line is visible to every local user "
    "(/proc/PID/cmdline, ps); use CLAWGATE_TOKEN or --token-file"
)


def warn_if_token_on_command_line(ctx: typer.Context) -> None:
    # Only a token typed on the command line: one from CLAWGATE_TOKEN is not visible to others.
    source = ctx.get_parameter_source("token")
    if source is not None and source.name == "COMMANDLINE":
        err.print(CMDLINE_TOKEN_WARNING)


def client_token(token: str | None, token_file: Path | None) -> str | None:
    if token_file is None:
        return token
    from clawgate.server.credentials import read_token_file

    try:
        return read_token_file(token_file)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def scopes_for(method: str) -> list[str]:
    """The least a CLI call of `method` needs (the gateway refuses more than a token allows)."""
    from clawgate.methods.table import build_table

    spec = build_table().get(method)
    return [spec.scope] if spec is not None else READ_SCOPES


def _version(value: bool) -> None:
    if value:
        console.print(f"clawgate {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """clawgate command line."""


@app.command()
def gateway(
    port: Annotated[
        int | None, typer.Option("--port", help=f"Port to listen on (default {DEFAULT_PORT}).")
    ] = None,
    bind: Annotated[str | None, typer.Option("--bind", help="Address to bind (default 127.0.0.1).")] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", help="Token clients must present (visible to local users: prefer CLAWGATE_TOKEN)."
        ),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="Read the token clients must present from this file.")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="State directory (default ~/.clawgate).")
    ] = None,
    store: Annotated[
        str | None, typer.Option("--store", help="'sqlite' (default) or a redis:// URL.")
    ] = None,
    provider: Annotated[
        str | None, typer.Option("--provider", help="'scripted' (default) or 'openai'.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML settings file.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override any setting: NAME=VALUE (repeatable).")
    ] = None,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="Log JSON lines instead of readable text.")
    ] = False,
    log_level: Annotated[str | None, typer.Option("--log-level", help="debug, info, warning, error.")] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the effective settings and exit.")
    ] = False,
) -> None:
    """Serve the gateway (WebSocket RPC and HTTP /healthz /readyz /metrics) until SIGINT/SIGTERM."""
    from clawgate import logs
    from clawgate.server.credentials import exposure_problems, load_credentials, readable_by_others

    if token is not None:
        err.print(CMDLINE_TOKEN_WARNING)
    overrides: dict[str, Any] = dict(
        port=port,
        bind=bind,
        token=token,
        token_file=token_file,
        state_dir=state_dir,
        store=store,
        provider=provider,
        log_level=log_level,
    )
    if log_json:
        overrides["log_json"] = True
    for item in set_ or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects NAME=VALUE, got {item!r}")
        # Lists and tables (`fallback_models=["a","b"]`, `model_prices={...}`) are given as JSON.
        if value.lstrip().startswith(("[", "{")):
            try:
                overrides[name.strip().replace("-", "_")] = json.loads(value)
                continue
            except json.JSONDecodeError:
                pass
        overrides[name.strip().replace("-", "_")] = value
    try:
        settings = load_settings(config, **overrides)
    except Exception as exc:
        err.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None
    for path in readable_by_others(settings):
        err.print(f"[yellow]warning:[/yellow] token file {path} is readable by other users (chmod 600 it)")
    if print_config:
        console.print_json(data=settings.redacted())
        raise typer.Exit()
    try:
        credentials = load_credentials(settings)
    except ValueError as exc:
        err.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None
    problems = exposure_problems(settings, credentials)
    if problems:
        for problem in problems:
            err.print(f"[red]{problem}[/red]")
        raise typer.Exit(2)
    logs.configure(settings.log_level, json=settings.log_json)
    from clawgate.server.fdlimit import FdLimitError, ensure_fd_limit
    from clawgate.server.gateway import Gateway, StateDirError
    from clawgate.server.serve import serve_forever

    try:
        # Refused here, before anything opens: a configuration that cannot hold under load.
        ensure_fd_limit(settings)
        gateway = Gateway(settings)
    except (FdLimitError, StateDirError) as exc:
        err.print(f"[red]refusing to start:[/red] {exc}")
        raise typer.Exit(2) from None
    _install_uvloop()
    try:
        code = asyncio.run(serve_forever(gateway))
    except OSError as exc:
        err.print(f"[red]cannot listen on {settings.bind}:{settings.port}:[/red] {exc}")
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def _install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install() if sys.version_info < (3, 12) else None
    except ImportError:
        pass


def run_async(coro: Any) -> Any:
    _install_uvloop()
    return asyncio.run(coro)


async def _one_call(url: str, token: str | None, method: str, params: dict[str, Any], final: bool) -> Any:
    from clawgate.client import Client

    async with Client(url, token=token, max_reconnect_attempts=0, scopes=scopes_for(method)) as client:
        if final:
            return await client.call_final(method, params)
        return await client.call(method, params)


def _call_or_exit(
    url: str, token: str | None, method: str, params: dict[str, Any], final: bool = False
) -> Any:
    from clawgate.client import ClientError

    try:
        return run_async(_one_call(url, token, method, params, final))
    except ClientError as exc:
        err.print_json(
            data={"ok": False, "error": {"code": exc.code, "message": exc.message, "details": exc.details}}
        )
        raise typer.Exit(1) from None
    except OSError as exc:
        err.print(f"[red]cannot reach {url}:[/red] {exc}")
        raise typer.Exit(1) from None


@app.command()
def status(
    ctx: typer.Context,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")] = False,
) -> None:
    """Show the gateway's status: runs, connections, memory and every bounded structure's size."""
    warn_if_token_on_command_line(ctx)
    data = _call_or_exit(url, client_token(token, token_file), "status", {})
    if as_json:
        console.print_json(data=data)
        return
    from rich.table import Table

    summary = Table(title=f"clawgate {data.get('version')} at {url}", show_header=False)
    summary.add_row("uptime", f"{data['uptimeMs'] / 1000:.1f} s")
    summary.add_row("connections", str(data["connections"]))
    runs = data["runs"]
    summary.add_row(
        "runs", f"active {runs['active']}, queued {runs['queued']}, completed {runs['completed']}"
    )
    summary.add_row("rss", f"{data['memory']['rssBytes'] / 1e6:.1f} MB")
    summary.add_row("store", data["store"]["kind"])
    summary.add_row(
        "admission", "open" if data["admission"]["open"] else f"closed: {data['admission']['reason']}"
    )
    console.print(summary)
    state = Table(title="bounded state")
    state.add_column("structure")
    state.add_column("entries", justify="right")
    for name, size in sorted(data["state"].items()):
        state.add_row(name, str(size))
    for name, size in sorted(data.get("stored", {}).items()):
        state.add_row(f"{name} (store)", str(size))
    console.print(state)


@app.command()
def call(
    ctx: typer.Context,
    method: Annotated[str, typer.Argument(help="Method name, e.g. health, status, agent, sessions.list.")],
    params: Annotated[str, typer.Option("--params", help="Params as a JSON object.")] = "{}",
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    expect_final: Annotated[
        bool, typer.Option("--expect-final", help="Wait for the final answer (agent).")
    ] = False,
) -> None:
    """Send one RPC and print its answer as JSON (asking only for the scope the method needs)."""
    warn_if_token_on_command_line(ctx)
    token = client_token(token, token_file)
    try:
        parsed = json.loads(params)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--params is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter("--params must be a JSON object")
    if method == "agent" and "idempotencyKey" not in parsed:
        parsed["idempotencyKey"] = os.urandom(8).hex()
    console.print_json(data=_call_or_exit(url, token, method, parsed, final=expect_final))


def main() -> None:
    # `clawgate gateway` needs none of the other commands: registering them imports rich and
    # the batch / bench / cron modules, which the server process would then carry for nothing.
    if sys.argv[1:2] != ["gateway"]:
        from clawgate.cli import commands_extra  # noqa: F401  (registers batch / bench commands)

    app()


if __name__ == "__main__":
    # Run through the imported module so `commands_extra` registers on the same `app`
    # (as __main__, this file would be a second copy of the module).
    from clawgate.cli import main as _module

    _module.main()
