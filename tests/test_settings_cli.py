"""Settings (defaults, precedence, validation) and the `clawgate` CLI, run as real subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from clawgate.settings import Settings, is_loopback, load_settings, parse_settings
from clawgate.testing import clean_env, free_port
from conftest import GatewayProcessFactory

CLAWGATE = str(Path(sys.executable).parent / "clawgate")


# -- subprocess helpers (also used by test_security_limits) ---------------------------------------
def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLAWGATE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or clean_env(),
        check=False,
    )


# -- Settings ----------------------------------------------------------------------------------------
def test_defaults_are_the_documented_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CLAWGATE_"):
            monkeypatch.delenv(name)
    s = Settings()
    documented = {
        "maintenance_interval_s": 60,
        "run_context_idle_ttl_s": 1800,
        "run_result_ttl_s": 600,
        "run_result_max": 5000,
        "dedupe_ttl_s": 300,
        "dedupe_max": 1000,
        "subagent_session_ttl_s": 300,
        "subagent_archive_after_s": 3600,
        "pending_error_ttl_s": 300,
        "lifecycle_error_grace_s": 15,
        "announce_expiry_s": 300,
        "announce_hard_expiry_s": 1800,
        "max_spawn_depth": 1,
        "max_children_per_agent": 5,
        "main_concurrency": 4,
        "subagent_concurrency": 8,
        "max_payload_bytes": 524288,
        "max_buffered_bytes": 1572864,
        "tick_interval_s": 30,
        "handshake_timeout_s": 10,
        "provider": "scripted",
        "scripted_delay_s": 0,
        "store": "sqlite",
        "bind": "127.0.0.1",
        "port": 18789,
        "token": None,
        "memory_budget_bytes": None,  # derived from the machine at start
    }
    assert {k: getattr(s, k) for k in documented} == documented
    assert s.announce_retry_delays_s == [1.0, 2.0, 4.0, 8.0]
    assert s.store_kind == "sqlite"
    assert s.state_path == Path.home() / ".clawgate"


def test_precedence_defaults_file_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CLAWGATE_"):
            monkeypatch.delenv(name)
    cfg = tmp_path / "clawgate.toml"
    cfg.write_text("main_concurrency = 3\nsubagent_concurrency = 5\nport = 1111\nrun_result_ttl_s = 1.5\n")
    s = load_settings(cfg)
    assert (s.main_concurrency, s.subagent_concurrency, s.port, s.run_result_ttl_s) == (3, 5, 1111, 1.5)
    monkeypatch.setenv("CLAWGATE_MAIN_CONCURRENCY", "7")
    monkeypatch.setenv("CLAWGATE_PORT", "2222")
    s = load_settings(cfg)
    assert (s.main_concurrency, s.subagent_concurrency, s.port) == (7, 5, 2222)  # env over file
    s = load_settings(cfg, port=3333, main_concurrency=None)
    assert (s.main_concurrency, s.port) == (7, 3333)  # flags over env; None means "not given"
    assert load_settings(None).max_payload_bytes == 524288


def test_config_file_with_a_clawgate_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAWGATE_MAIN_CONCURRENCY", raising=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[clawgate]\nmain_concurrency = 2\nstore = "redis://127.0.0.1:6379/3"\n')
    s = load_settings(cfg)
    assert s.main_concurrency == 2
    assert s.store_kind == "redis"


def test_unknown_and_invalid_settings_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "typo.toml"
    cfg.write_text("main_concurency = 3\n")
    with pytest.raises(ValueError, match=r"unknown setting.*main_concurency"):
        load_settings(cfg)
    with pytest.raises(ValueError, match=r"unknown setting.*run_result_tll_s"):
        load_settings(None, run_result_tll_s=5)
    with pytest.raises(ValueError, match="store must be"):
        load_settings(None, store="postgres://x")
    with pytest.raises(ValueError, match=r"^max_spawn_depth: Expected `int` <= 5"):
        load_settings(None, max_spawn_depth=6)
    with pytest.raises(ValueError, match=r"^max_payload_bytes: Expected `int` >= 1024"):
        load_settings(None, max_payload_bytes=10)
    with pytest.raises(ValueError, match=r"^tokens.*a named token needs exactly one"):
        load_settings(None, tokens={"ci": {"scopes": ["operator.read"]}})
    with pytest.raises(ValueError, match=r"^agents.*unknown field `modle`"):
        load_settings(None, agents={"ops": {"modle": "m1"}})


def test_environment_values_are_parsed_by_the_type_of_their_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLAWGATE_LOG_JSON", "yes")
    monkeypatch.setenv("CLAWGATE_WEBHOOK_ALLOW_PRIVATE", "off")
    monkeypatch.setenv("CLAWGATE_ALLOWED_ORIGINS", '["https://ui.example"]')
    monkeypatch.setenv("CLAWGATE_ANNOUNCE_RETRY_DELAYS_S", "[0.5, 1]")
    monkeypatch.setenv("CLAWGATE_TOKEN_FILE", str(tmp_path / "t"))
    monkeypatch.setenv("CLAWGATE_SCRIPTED_DELAY_S", "0.25")
    monkeypatch.setenv("CLAWGATE_URL", "ws://elsewhere/")  # the CLI's, not a setting: ignored
    s = load_settings()
    assert (s.log_json, s.webhook_allow_private) == (True, False)
    assert s.allowed_origins == ["https://ui.example"]
    assert s.announce_retry_delays_s == [0.5, 1.0]
    assert s.token_file == tmp_path / "t" and isinstance(s.token_file, Path)
    assert s.scripted_delay_s == 0.25
    monkeypatch.setenv("CLAWGATE_PORT", "eighty")
    with pytest.raises(ValueError, match=r"^port: Expected `int`"):
        load_settings()
    monkeypatch.setenv("CLAWGATE_PORT", "80")
    monkeypatch.setenv("CLAWGATE_ALLOWED_HOSTS", "gw.example")
    with pytest.raises(ValueError, match=r"^allowed_hosts: CLAWGATE_ALLOWED_HOSTS is not JSON"):
        load_settings()


def test_settings_cannot_be_changed_after_they_are_checked() -> None:
    s = load_settings(None, main_concurrency=3)
    with pytest.raises(AttributeError):
        s.main_concurrency = 0  # type: ignore[misc]


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("127.8.9.10")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("::")
    assert not is_loopback("")  # binds every interface
    assert not is_loopback("192.168.1.10")
    assert not is_loopback("example.com")


def test_abort_ttl_is_clamped_and_secrets_redacted() -> None:
    s = parse_settings(token="t0k", openai_api_key="sk-real")
    assert s.abort_ttl_s(1) == 120  # timeout + 60 s, at least 2 min
    assert s.abort_ttl_s(600) == 660
    assert s.abort_ttl_s(10**9) == 86400  # at most 24 h
    red = s.redacted()
    assert red["token"] == "***"
    assert red["openai_api_key"] == "***"
    assert Settings().redacted()["token"] is None


# -- the CLI -------------------------------------------------------------------------------------------
def print_config(*args: str, **env: str) -> dict[str, Any]:
    res = run_cli("gateway", "--print-config", *args, env=clean_env(**env))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert isinstance(data, dict)
    return data


def test_print_config_shows_effective_values(tmp_path: Path) -> None:
    data = print_config("--state-dir", str(tmp_path / "s"))
    assert data["main_concurrency"] == 4
    assert data["state_dir"] == str(tmp_path / "s")
    assert data["port"] == 18789
    data = print_config(CLAWGATE_MAIN_CONCURRENCY="7", CLAWGATE_TOKEN="secret")
    assert data["main_concurrency"] == 7
    assert data["token"] == "***"


def test_print_config_precedence_file_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text('main_concurrency = 3\nport = 4444\nprovider = "openai"\nrun_result_ttl_s = 12.5\n')
    data = print_config("--config", str(cfg))
    assert (data["main_concurrency"], data["port"], data["provider"], data["run_result_ttl_s"]) == (
        3,
        4444,
        "openai",
        12.5,
    )
    data = print_config("--config", str(cfg), CLAWGATE_MAIN_CONCURRENCY="7", CLAWGATE_PORT="5555")
    assert (data["main_concurrency"], data["port"]) == (7, 5555)
    data = print_config(
        "--config",
        str(cfg),
        "--port",
        "6666",
        "--provider",
        "scripted",
        "--set",
        "main_concurrency=9",
        "--set",
        "run-result-ttl-s=0.5",
        CLAWGATE_MAIN_CONCURRENCY="7",
        CLAWGATE_PORT="5555",
    )
    assert (data["main_concurrency"], data["port"], data["provider"], data["run_result_ttl_s"]) == (
        9,
        6666,
        "scripted",
        0.5,
    )


def test_bad_settings_exit_2() -> None:
    res = run_cli("gateway", "--print-config", "--set", "main_concurency=3")
    assert res.returncode == 2
    assert "unknown setting(s): main_concurency" in res.stderr
    res = run_cli("gateway", "--print-config", "--set", "main_concurrency=zero")
    assert res.returncode == 2
    assert "invalid settings" in res.stderr
    res = run_cli("gateway", "--print-config", env=clean_env(CLAWGATE_MAIN_CONCURRENCY="-1"))
    assert res.returncode == 2
    res = run_cli("gateway", "--print-config", "--set", "no-equals-sign")
    assert res.returncode == 2
    assert "NAME=VALUE" in res.stderr


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", ""])
def test_refuses_to_bind_everywhere_without_a_token(tmp_path: Path, bind: str) -> None:
    port = free_port()
    res = run_cli(
        "gateway", "--bind", bind, "--port", str(port), "--state-dir", str(tmp_path / "s"), timeout=30
    )
    assert res.returncode == 2
    assert "refusing to bind" in res.stderr
    assert "without a token" in res.stderr
    assert "listening" not in res.stdout
    # Nothing was served.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_cli("gateway", "--port", str(port), "--state-dir", str(tmp_path / "s"), timeout=30)
    assert res.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.stderr


def test_version() -> None:
    res = run_cli("--version")
    assert res.returncode == 0
    assert res.stdout.strip() == "clawgate 0.1.0"


def test_help_lists_the_commands_in_order_with_their_options() -> None:
    """The click CLI, in process: command order, no-args help, env vars, defaults, arguments."""
    from click.testing import CliRunner

    from clawgate.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["--help"], terminal_width=120)
    assert res.exit_code == 0, res.output
    listed = [line.split()[0] for line in res.output.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == ["gateway", "status", "call", "batch", "bench", "cron"]
    for group in ([], ["bench"], ["cron"]):  # no_args_is_help: the help on stdout, exit code 2
        res = runner.invoke(app, group)
        assert res.exit_code == 2 and "Commands:" in res.stdout, (group, res.output)
    res = runner.invoke(app, ["cron", "--help"])
    listed = [line.split()[0] for line in res.output.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == ["add", "list", "rm", "run", "runs"]
    text = " ".join(runner.invoke(app, ["call", "--help"]).output.split())
    assert "env var: CLAWGATE_URL; default: ws://127.0.0.1:18789/" in text
    assert "env var: CLAWGATE_TOKEN" in text
    assert "METHOD Method name, e.g. health, status, agent, sessions.list." in text
    text = " ".join(runner.invoke(app, ["batch", "--help"]).output.split())
    assert "--progress / --no-progress Show the progress bar. [default: progress]" in text
    assert "-c, --concurrency INTEGER RANGE Tasks in flight. [default: 16; x>=1]" in text
    assert "TASKS Tasks file (JSONL)." in text
    text = " ".join(runner.invoke(app, ["bench", "soak", "--help"]).output.split())
    assert "-n, --runs INTEGER Number of spawns. [default: 100000]" in text
    assert "[default: benchmarks/out]" in text


def test_status_and_call_against_a_subprocess_gateway(gateway_process: GatewayProcessFactory) -> None:
    gp = gateway_process(args=["--token", "cli-token"], settings={"main_concurrency": 6}).start()
    env = clean_env(CLAWGATE_TOKEN="cli-token")
    res = run_cli("call", "health", "--url", gp.url, env=env)
    assert res.returncode == 0, res.stderr
    health = json.loads(res.stdout)
    assert health["ok"] is True
    assert health["uptimeMs"] >= 0

    res = run_cli(
        "call", "agent", "--url", gp.url, "--params", '{"message": "from the cli"}', "--expect-final", env=env
    )
    assert res.returncode == 0, res.stderr
    final = json.loads(res.stdout)
    assert final["status"] == "ok"
    assert final["result"]["payloads"][0]["text"] == "ok: from the cli"

    res = run_cli("status", "--json", "--url", gp.url, env=env)
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert status["connections"] == 1  # the status call's own connection
    assert status["runs"]["completed"] == 1
    assert status["store"]["kind"] == "sqlite" and status["store"]["up"] is True
    assert status["state"]["run_results"] == 1
    assert status["state"]["runs_active"] == 0
    assert "session_lanes" in status["state"]

    res = run_cli("status", "--url", gp.url, env=env)
    assert res.returncode == 0, res.stderr
    assert "bounded state" in res.stdout
    assert "run_results" in res.stdout

    # Errors: wrong token, unknown method, bad params, nobody listening.
    # (From the environment: a --token typed on the command line adds a warning to stderr.)
    res = run_cli("call", "health", "--url", gp.url, env=clean_env(CLAWGATE_TOKEN="wrong"))
    assert res.returncode == 1
    assert json.loads(res.stderr)["error"]["code"] == "UNAUTHORIZED"
    res = run_cli("call", "no.such", "--url", gp.url, env=env)
    assert res.returncode == 1
    assert json.loads(res.stderr)["error"]["details"] == {"method": "no.such"}
    res = run_cli("call", "health", "--url", gp.url, "--params", "[1]", env=env)
    assert res.returncode == 2
    res = run_cli("call", "health", "--url", f"ws://127.0.0.1:{free_port()}/", env=env)
    assert res.returncode == 1
    assert "cannot reach" in res.stderr or "CONNECTION_LOST" in res.stderr

    code, log = gp.stop()
    assert code == 0
    assert f"clawgate listening on {gp.url}" in log


def test_empty_token_means_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWGATE_TOKEN", "")
    assert Settings().token is None
    assert load_settings(None).token is None
    assert parse_settings(token="").token is None
    res = run_cli("gateway", "--bind", "0.0.0.0", "--print-config", env=clean_env(CLAWGATE_TOKEN=""))
    assert json.loads(res.stdout)["token"] is None


def test_log_json_and_log_level(gateway_process: GatewayProcessFactory) -> None:
    gp = gateway_process(args=["--log-json"]).start()
    code, log = gp.stop()
    assert code == 0
    # The log file has stdout too: its one plain line says where the gateway listens.
    lines = [
        json.loads(line)
        for line in log.splitlines()
        if line.strip() and not line.startswith("clawgate listening")
    ]
    events = [line["event"] for line in lines]
    assert events[0] == "gateway started"
    assert "gateway stopped" in events
    assert all(line["level"] in ("info", "warning", "error") and "timestamp" in line for line in lines)

    quiet = gateway_process(args=["--log-level", "warning"]).start()
    code, log = quiet.stop()
    assert code == 0
    assert "gateway started" not in log
    assert "gateway stopped" not in log
