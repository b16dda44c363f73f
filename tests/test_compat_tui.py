"""The real OpenClaw terminal UI (`openclaw tui`) and `openclaw agent` against a real gateway.

Needs the compat cache (`scripts/compat-setup.sh`) and `tmux`: without them these tests
are skipped, unless `CLAWGATE_COMPAT=1` is set, in which case that is a failure.

The TUI runs in a detached tmux session on a private tmux socket (`tmux -L`), driven
with `send-keys` and read with `capture-pane`, as a user would type and read. Between
the TUI and the gateway sits a logging WebSocket relay written here: it records every
method the TUI calls and every error answer, so a TUI call that clawgate does not know
fails the last test instead of degrading the TUI silently.

The tests run in file order and share one TUI (module-scoped fixtures), like one user
session: first message, second message, an abort mid-stream, /reset, /new, switching
sessions, /model. Every screen seen along the way is kept and checked at the end for
"failed", "unknown method" and "not connected".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.server import ServerConnection
from websockets.sync.client import connect

from clawgate.testing import GatewayProcess
from test_compat_openclaw import (
    CLI_TIMEOUT_S,
    GATEWAY_START_TIMEOUT_S,
    OPENCLAW,
    REQUIRED,
    TOKEN,
    _cli_missing,
    _isolated_env,
    openclaw_validate,
)

pytestmark = pytest.mark.compat

SCREEN_TIMEOUT_S = 45.0
TMUX_WIDTH, TMUX_HEIGHT = 160, 50
FIRST_SESSION = "agent:main:tui-first"
BAD_LINES = ("failed", "unknown method", "not connected")


# == the logging relay ============================================================================
@dataclass
class Relay:
    """A WebSocket relay between the TUI and the gateway that records what the TUI calls."""

    upstream: str
    port: int = 0
    calls: list[str] = field(default_factory=list)
    errors: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _methods: dict[str, str] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(ready),), daemon=True)
        self._thread.start()
        assert ready.wait(10), "relay did not start"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with websockets.serve(self._relay, "127.0.0.1", 0, max_size=None) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            ready.set()
            await self._stop.wait()

    async def _relay(self, client: ServerConnection) -> None:
        async with websockets.connect(self.upstream, max_size=None) as upstream:

            async def to_gateway() -> None:
                async for raw in client:
                    self._note_request(raw)
                    await upstream.send(raw)

            async def to_tui() -> None:
                async for raw in upstream:
                    self._note_response(raw)
                    await client.send(raw)

            tasks = [asyncio.create_task(to_gateway()), asyncio.create_task(to_tui())]
            _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _note_request(self, raw: str | bytes) -> None:
        frame = json.loads(raw)
        if frame.get("type") == "req":
            self.calls.append(frame["method"])
            self._methods[frame["id"]] = frame["method"]

    def _note_response(self, raw: str | bytes) -> None:
        frame = json.loads(raw)
        if frame.get("type") == "res" and frame.get("ok") is False:
            self.errors.append((self._methods.get(frame.get("id"), "?"), frame.get("error") or {}))


# == the TUI in tmux =============================================================================
@dataclass
class Tui:
    socket: str
    env: dict[str, str]
    screens: list[str] = field(default_factory=list)

    def tmux(self, *args: str) -> str:
        proc = subprocess.run(
            ["tmux", "-L", self.socket, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=True,
        )
        return proc.stdout

    def screen(self) -> str:
        text = self.tmux("capture-pane", "-p", "-J", "-t", "tui")
        self.screens.append(text)
        return text

    def wait_for(self, *needles: str, timeout: float = SCREEN_TIMEOUT_S) -> str:
        """The screen once every needle is on it (each screen read is kept for the final check)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"not on the TUI screen after {timeout}s: {needles}\n--- screen ---\n{text}")
            time.sleep(0.2)

    def wait_for_line(self, prefix: str, timeout: float = SCREEN_TIMEOUT_S) -> str:
        """The screen once a line starts with `prefix` (the user's own line echoes directives)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if any(ln.strip().startswith(prefix) for ln in text.splitlines()):
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"no line starting {prefix!r} after {timeout}s\n--- screen ---\n{text}")
            time.sleep(0.2)

    def wait_reply(self, reply: str) -> str:
        """The screen once the answer `reply` is shown and the TUI is idle again.

        The answer is a line of its own (the user's line also holds it, inside the
        `[[reply:...]]` directive); the status line ends with `| idle` once the run is over.
        """
        self.wait_for_line(reply)
        deadline = time.monotonic() + SCREEN_TIMEOUT_S
        while True:
            text = self.screen()
            if any(ln.strip().endswith("| idle") for ln in text.splitlines()):
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"the TUI is not idle after {SCREEN_TIMEOUT_S}s\n--- screen ---\n{text}")
            time.sleep(0.2)

    def type(self, text: str) -> None:
        # -l: literal text (no key names), then Enter as a key.
        self.tmux("send-keys", "-t", "tui", "-l", text)
        self.tmux("send-keys", "-t", "tui", "Enter")

    def key(self, name: str) -> None:
        self.tmux("send-keys", "-t", "tui", name)


def _tmux_missing() -> str | None:
    return None if shutil.which("tmux") else "no tmux on PATH (apt-get install -y tmux)"


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    missing = _cli_missing() or _tmux_missing()
    if missing is not None:
        if REQUIRED:
            pytest.fail(f"CLAWGATE_COMPAT=1 but {missing}")
        pytest.skip(missing)
    return _isolated_env(tmp_path_factory.mktemp("openclaw-tui"))


@pytest.fixture(scope="module")
def gateway_ws(tools: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("clawgate-tui")
    gateway = GatewayProcess(root / "state", args=["--token", TOKEN], log_path=root / "gateway.log")
    gateway.start(GATEWAY_START_TIMEOUT_S)
    try:
        yield gateway.url
    finally:
        gateway.stop(20)


@pytest.fixture(scope="module")
def relay(gateway_ws: str) -> Iterator[Relay]:
    r = Relay(gateway_ws)
    r.start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def tui(tools: dict[str, str], relay: Relay) -> Iterator[Tui]:
    socket = f"clawgate-tui-{uuid.uuid4().hex[:8]}"
    t = Tui(socket, {**tools, "TERM": "xterm-256color"})
    cmd = [str(OPENCLAW), "tui", "--url", f"ws://127.0.0.1:{relay.port}", "--token", TOKEN]
    cmd += ["--session", FIRST_SESSION, "--message", "hello [[reply:first answer]]"]
    t.tmux(
        "new-session", "-d", "-s", "tui", "-x", str(TMUX_WIDTH), "-y", str(TMUX_HEIGHT),
        "-c", tools["HOME"], shlex.join(cmd),
    )  # fmt: skip
    # Keep the pane when the TUI exits, so a crash stays readable on the screen.
    t.tmux("set-option", "-t", "tui", "remain-on-exit", "on")
    try:
        yield t
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            t.tmux("kill-server")


class Gateway:
    """A plain protocol client for looking at what the TUI did, on the gateway's side."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        with connect(self.url, open_timeout=10) as ws:
            ws.recv(timeout=10)  # connect.challenge
            # Omitted scopes mean read only: this helper starts runs and patches sessions.
            hello = {
                "minProtocol": 4,
                "maxProtocol": 4,
                "auth": {"token": TOKEN},
                "scopes": ["operator.read", "operator.write"],
            }
            ws.send(json.dumps({"type": "req", "id": "c", "method": "connect", "params": hello}))
            assert json.loads(ws.recv(timeout=10))["ok"] is True
            ws.send(json.dumps({"type": "req", "id": "q", "method": method, "params": params}))
            while True:
                frame = json.loads(ws.recv(timeout=10))
                if frame.get("id") == "q":
                    assert frame["ok"] is True, frame
                    payload: dict[str, Any] = frame["payload"]
                    return payload


@pytest.fixture(scope="module")
def gw(gateway_ws: str) -> Gateway:
    return Gateway(gateway_ws)


def history(gw: Gateway, key: str) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in gw.call("chat.history", {"sessionKey": key})["messages"]]


# == the TUI, step by step ========================================================================
def test_initial_message_round_trip(tui: Tui, gw: Gateway) -> None:
    tui.wait_for(f"session {FIRST_SESSION}", "hello [[reply:first answer]]")
    tui.wait_reply("first answer")
    assert history(gw, FIRST_SESSION) == [
        ("user", "hello [[reply:first answer]]"),
        ("assistant", "first answer"),
    ]


def test_typing_a_second_message(tui: Tui, gw: Gateway) -> None:
    tui.type("and again [[reply:second answer]]")
    screen = tui.wait_reply("second answer")
    # Each message once: the live events and the history reload agree on identities.
    lines = [ln.strip() for ln in screen.splitlines()]
    assert lines.count("first answer") == 1
    assert lines.count("and again [[reply:second answer]]") == 1
    assert lines.count("second answer") == 1
    assert len(history(gw, FIRST_SESSION)) == 4


def test_abort_a_reply_mid_stream(tui: Tui, gw: Gateway) -> None:
    # Four chunks, 1.5 s before each: abort once the first one is on the screen.
    tui.type("stream [[reply:alpha beta gamma delta]] [[chunks:4]] [[delay:1.5]]")
    tui.wait_for_line("alpha")  # the first chunk of the answer
    tui.key("Escape")
    screen = tui.wait_for("run aborted")
    answer = [ln.strip() for ln in screen.splitlines() if ln.strip().startswith("alpha")]
    assert answer and "delta" not in answer[-1], screen
    runs = [m for m in gw.call("chat.history", {"sessionKey": FIRST_SESSION})["messages"]]
    # The user message is in the transcript, no assistant answer for the aborted run.
    assert [m["role"] for m in runs[-2:]] == ["assistant", "user"]


def test_reset_empties_the_session(tui: Tui, gw: Gateway) -> None:
    before = gw.call("sessions.describe", {"key": FIRST_SESSION})["session"]["sessionId"]
    tui.type("/reset")
    screen = tui.wait_for(f"session {FIRST_SESSION} reset")
    assert "first answer" not in screen
    assert history(gw, FIRST_SESSION) == []
    assert gw.call("sessions.describe", {"key": FIRST_SESSION})["session"]["sessionId"] != before
    tui.type("after reset [[reply:fresh start]]")
    tui.wait_reply("fresh start")


def test_new_session(tui: Tui, gw: Gateway) -> None:
    tui.type("/new")
    screen = tui.wait_for("new session: agent:main:tui-")
    line = next(ln for ln in screen.splitlines() if "new session: " in ln)
    key = line.split("new session: ", 1)[1].split()[0]
    assert key != FIRST_SESSION
    tui.type("in the new one [[reply:new session answer]]")
    screen = tui.wait_reply("new session answer")
    assert "fresh start" not in screen
    assert history(gw, key) == [
        ("user", "in the new one [[reply:new session answer]]"),
        ("assistant", "new session answer"),
    ]


def test_switching_sessions(tui: Tui) -> None:
    tui.type(f"/session {FIRST_SESSION}")
    tui.wait_for(f"session {FIRST_SESSION}")
    screen = tui.wait_for_line("fresh start")
    assert "new session answer" not in screen
    # The picker lists both sessions (sessions.list with agentId).
    tui.type("/sessions")
    tui.wait_for("Filter:", "tui-first")
    tui.key("Escape")


def test_runs_other_clients_start_show_up_in_the_session_shown(tui: Tui, gw: Gateway) -> None:
    # One run elsewhere, then one in the session the TUI shows (both by another client).
    for key, reply, idem in (
        ("agent:main:tui-elsewhere", "not for this screen", "ext-1"),
        (FIRST_SESSION, "from another client", "ext-2"),
    ):
        params = {"message": f"[[reply:{reply}]]", "sessionKey": key, "idempotencyKey": idem}
        assert gw.call("agent", params)["status"] == "accepted"
        assert gw.call("agent.wait", {"runId": idem, "timeoutMs": 30_000})["status"] == "ok"
    screen = tui.wait_for_line("from another client")
    assert "not for this screen" not in "\n".join(ln for ln in screen.splitlines() if "[[reply:" not in ln)
    assert not any(ln.strip().startswith("not for this screen") for ln in screen.splitlines())


def test_model_command(tui: Tui, gw: Gateway) -> None:
    tui.type("/model other-model")
    tui.wait_for("model set to other-model")
    assert gw.call("sessions.describe", {"key": FIRST_SESSION})["session"]["model"] == "other-model"


def test_no_failure_on_screen_and_every_call_known(tui: Tui, relay: Relay, gw: Gateway) -> None:
    tui.screen()
    bad = sorted(
        {
            line.strip()
            for screen in tui.screens
            for line in screen.splitlines()
            if any(b in line.lower() for b in BAD_LINES)
        }
    )
    assert bad == []
    advertised = set(gw.call("health", {}) and _hello_methods(gw.url))
    called = set(relay.calls)
    assert called - advertised == set(), (
        f"the TUI called methods clawgate does not have: {called - advertised}"
    )
    assert relay.errors == [], relay.errors
    # The calls this suite exercised (a TUI release that stops calling one should be looked at).
    assert called >= {
        "connect",
        "sessions.subscribe",
        "agents.list",
        "question.list",
        "plugin.approval.list",
        "sessions.describe",
        "sessions.list",
        "chat.history",
        "chat.send",
        "chat.abort",
        "commands.list",
        "sessions.reset",
        "sessions.create",
        "sessions.patch",
    }


def _hello_methods(url: str) -> list[str]:
    with connect(url, open_timeout=10) as ws:
        ws.recv(timeout=10)
        hello = {"minProtocol": 4, "maxProtocol": 4, "auth": {"token": TOKEN}}
        ws.send(json.dumps({"type": "req", "id": "c", "method": "connect", "params": hello}))
        methods: list[str] = json.loads(ws.recv(timeout=10))["payload"]["features"]["methods"]
        return [*methods, "connect"]


# == the answers, checked with OpenClaw's own schemas =============================================
def test_openclaw_schemas_accept_the_new_answers(gw: Gateway) -> None:
    created = gw.call("sessions.create", {"key": "schema-check", "agentId": "main", "label": "schema"})
    checks: list[tuple[str, str, Any]] = [
        ("agents.list", "AgentsListResultSchema", gw.call("agents.list", {})),
        ("commands.list", "CommandsListResultSchema", gw.call("commands.list", {"agentId": "main"})),
        ("question.list", "QuestionListResultSchema", gw.call("question.list", {})),
        ("sessions.create", "SessionsCreateResultSchema", created),
        (
            "sessions.resolve ok",
            "SessionsResolveResultSchema",
            gw.call("sessions.resolve", {"label": "schema"}),
        ),
        (
            "sessions.resolve missing",
            "SessionsResolveResultSchema",
            gw.call("sessions.resolve", {"label": "no"}),
        ),
    ]
    rejected = [r for r in openclaw_validate(checks) if not r["ok"]]
    assert rejected == []


# == `openclaw agent` through a remote-mode config ================================================
def test_openclaw_agent_through_remote_mode_config(
    tools: dict[str, str], relay: Relay, gw: Gateway, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "openclaw.json"
    url = f"ws://127.0.0.1:{relay.port}"
    config.write_text(json.dumps({"gateway": {"mode": "remote", "remote": {"url": url, "token": TOKEN}}}))
    env = {
        **tools,
        "HOME": str(home),
        "OPENCLAW_CONFIG_PATH": str(config),
        "OPENCLAW_STATE_DIR": str(tmp_path / "s"),
    }
    key = "agent:main:remote-agent"
    proc = subprocess.run(
        [str(OPENCLAW), "agent", "--session-key", key, "-m", "hi [[reply:remote pong]]"],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip().splitlines()[-1] == "remote pong", proc.stdout
    assert history(gw, key) == [("user", "hi [[reply:remote pong]]"), ("assistant", "remote pong")]
