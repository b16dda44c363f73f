"""The `clawgate` click group and what its commands share: options, consoles, one call helper.

Importing this module (and every command module) stays cheap: `clawgate gateway` loads the
whole CLI, and rich, the client and the batch / bench engines are imported by the commands
that use them, when they run. click itself costs nothing extra: uvicorn imports it anyway.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from clawgate import __version__
from clawgate.settings import DEFAULT_PORT

F = TypeVar("F", bound=Callable[..., Any])


class Argument(click.Argument):
    """A positional argument with a help line, listed by `Command` under "Arguments".

    click added `help=` to arguments only in 8.5: this one keeps the line itself, so the help
    reads the same on any click >= 8.1 (and click's own section stays empty)."""

    def __init__(self, param_decls: Sequence[str], *, help: str = "", **attrs: Any) -> None:
        super().__init__(param_decls, **attrs)
        self.help_line = help


class Command(click.Command):
    """A command whose help lists its positional arguments (with their help) before the options."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [
            (param.human_readable_name, getattr(param, "help_line", ""))
            for param in self.get_params(ctx)
            if isinstance(param, click.Argument)
        ]
        if rows:
            with formatter.section("Arguments"):
                formatter.write_dl(rows)
        super().format_options(ctx, formatter)


class Group(click.Group):
    """Subcommands listed in the order they were added (click sorts them by name), made as
    `Command`s."""

    command_class = Command

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # No arguments: the help on stdout and exit code 2, as the CLI has always answered, on
        # every click (8.1 exits 0 there, 8.2 and later print the help on stderr).
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            click.echo(ctx.get_help(), color=ctx.color)
            ctx.exit(2)
        return super().parse_args(ctx, args)


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


def url_option(help: str = "Gateway WebSocket URL.", default: str | None = DEFAULT_URL) -> Callable[[F], F]:
    """`--url` (or CLAWGATE_URL) of the gateway a command talks to."""
    return click.option("--url", default=default, envvar="CLAWGATE_URL", show_envvar=True, help=help)


def token_option(f: F) -> F:
    """`--token` (or CLAWGATE_TOKEN): see `warn_if_token_on_command_line`."""
    return click.option(
        "--token",
        envvar="CLAWGATE_TOKEN",
        show_envvar=True,
        help="Gateway token (prefer CLAWGATE_TOKEN or --token-file).",
    )(f)


def token_file_option(f: F) -> F:
    return click.option(
        "--token-file",
        type=click.Path(path_type=Path),
        help="Read the gateway token from this file.",
    )(f)


READ_SCOPES = ["operator.read"]
CMDLINE_TOKEN_WARNING = (
    "[yellow]warning:[/yellow] --token on the command line is visible to every local user "
    "(/proc/PID/cmdline, ps); use CLAWGATE_TOKEN or --token-file"
)


def parse_sets(items: Sequence[str] | None) -> dict[str, Any]:
    """`--set NAME=VALUE` flags as settings overrides (dashes in NAME read as underscores).

    Lists and tables (`fallback_models=["a","b"]`, `model_prices={...}`) are given as JSON;
    any other value is passed on as the string it is."""
    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"--set expects NAME=VALUE, got {item!r}")
        key = name.strip().replace("-", "_")
        if value.lstrip().startswith(("[", "{")):
            try:
                out[key] = json.loads(value)
                continue
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out


def warn_if_token_on_command_line(ctx: click.Context) -> None:
    # Only a token typed on the command line: one from CLAWGATE_TOKEN is not visible to others.
    if ctx.get_parameter_source("token") is ParameterSource.COMMANDLINE:
        err.print(CMDLINE_TOKEN_WARNING)


def client_token(token: str | None, token_file: Path | None) -> str | None:
    if token_file is None:
        return token
    from clawgate.server.credentials import read_token_file

    try:
        return read_token_file(token_file)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def scopes_for(method: str) -> list[str]:
    """The least a CLI call of `method` needs (the gateway refuses more than a token allows)."""
    from clawgate.methods.table import build_table

    spec = build_table().get(method)
    return [spec.scope] if spec is not None else READ_SCOPES


def install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install() if sys.version_info < (3, 12) else None
    except ImportError:
        pass


def run_async(coro: Any) -> Any:
    install_uvloop()
    return asyncio.run(coro)


async def _one_call(url: str, token: str | None, method: str, params: dict[str, Any], final: bool) -> Any:
    from clawgate.client import Client

    async with Client(url, token=token, max_reconnect_attempts=0, scopes=scopes_for(method)) as client:
        if final:
            return await client.call_final(method, params)
        return await client.call(method, params)


def call_or_exit(
    url: str, token: str | None, method: str, params: dict[str, Any], final: bool = False
) -> Any:
    """One RPC's answer; an error answer is printed as JSON on stderr and exits 1, as does an
    unreachable gateway."""
    from clawgate.client import ClientError

    try:
        return run_async(_one_call(url, token, method, params, final))
    except ClientError as exc:
        err.print_json(
            data={"ok": False, "error": {"code": exc.code, "message": exc.message, "details": exc.details}}
        )
        sys.exit(1)
    except OSError as exc:
        err.print(f"[red]cannot reach {url}:[/red] {exc}")
        sys.exit(1)


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        console.print(f"clawgate {__version__}")
        ctx.exit()


@click.group(
    cls=Group,
    name="clawgate",
    no_args_is_help=True,
    # Every option's default in its help line, and help as wide as the terminal up to 120
    # columns (not click's 80), in every subcommand: their contexts inherit both.
    context_settings={"show_default": True, "max_content_width": 120},
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_version,
    help="Print the version and exit.",
)
def app() -> None:
    """clawgate: an asyncio agent gateway with memory bounded by construction."""
