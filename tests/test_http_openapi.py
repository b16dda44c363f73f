"""`/openapi.json` matches what the server does: schemathesis (bounded examples) against a real
gateway process finds no 5xx and no response outside the document."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import httpx

from clawgate.testing import GatewayProcess

TOKEN = "openapi-t0ken-0123456789abcdef"


def test_openapi_document_lists_every_route(tmp_path: Path) -> None:
    with GatewayProcess(tmp_path / "state", settings={"token": TOKEN, "hooks_token": TOKEN}) as gw:
        doc = httpx.get(f"{gw.http_url}/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/v1/runs",
        "/v1/runs/wait",
        "/v1/runs/{run_id}",
        "/v1/runs/{run_id}/cancel",
        "/v1/runs/{run_id}/events",
        "/v1/sessions/{key}/history",
        "/tools/invoke",
        "/hooks/agent",
        "/hooks/wake",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/models",
        "/v1/models/{model_id}",
    }
    body = doc["paths"]["/v1/runs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert schema["required"] == ["message"] and "sessionKey" in schema["properties"]


def test_schemathesis_finds_no_server_error_and_no_undocumented_response(tmp_path: Path) -> None:
    settings = {
        "token": TOKEN,
        "hooks_token": TOKEN,
        # Runs end at once; a stalled or delayed message must not hold a worker for long.
        "default_run_timeout_s": 2,
        "rate_limit_per_s": 100000,
        "rate_limit_burst": 100000,
    }
    with GatewayProcess(tmp_path / "state", settings=settings) as gw:
        st = Path(sys.executable).parent / "st"
        report = tmp_path / "junit.xml"
        proc = subprocess.run(
            [
                str(st),
                "run",
                f"{gw.http_url}/openapi.json",
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                "--max-examples",
                "15",
                "--seed",
                "1",
                "--phases",
                "examples,coverage,fuzzing",
                "--request-timeout",
                "20",
                "-H",
                f"Authorization: Bearer {TOKEN}",
                "--report",
                "junit",
                "--report-junit-path",
                str(report),
                "--generation-database",
                "none",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "NO_COLOR": "1"},
            check=False,
        )
        output = proc.stdout[-6000:] + proc.stderr[-2000:]
        assert proc.returncode == 0, output
        # It really exercised every operation.
        cases = ElementTree.parse(report).getroot().iter("testcase")
        assert len({case.get("name") for case in cases}) == 13, output  # every path, /tools/invoke included
        rc, log = gw.stop()
    assert rc == 0, log
    assert "Traceback" not in log, log
