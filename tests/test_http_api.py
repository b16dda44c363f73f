"""The HTTP API on the gateway port, driven by clients nobody here wrote: the official `openai`
SDK (sync and async, streaming and not) and `httpx`, against a real gateway on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import openai
import pytest

from clawgate.client import Client
from clawgate.server.serve import RunningGateway
from conftest import GatewayFactory, settle

TOKEN = "t0ken-for-http-tests-0123456789"
HOOKS = "hooks-t0ken-0123456789"


@pytest.fixture
async def gw(start_gateway: GatewayFactory) -> RunningGateway:
    return await start_gateway(token=TOKEN, hooks_token=HOOKS)


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sse_events(text: str) -> list[dict[str, Any]]:
    """Parse an SSE body into [{id?, event?, data}]."""
    out = []
    for block in text.strip().split("\n\n"):
        ev: dict[str, Any] = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            ev[name] = value
        out.append(ev)
    return out


# -- OpenAI SDK --------------------------------------------------------------------------------
async def test_openai_async_sdk_chat_completion_and_stream(gw: RunningGateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gw.http_url}/v1", api_key=TOKEN, max_retries=0)
    try:
        done = await client.chat.completions.create(
            model="openclaw:main", messages=[{"role": "user", "content": "[[reply:hello there]]"}]
        )
        assert done.choices[0].message.content == "hello there"
        assert done.choices[0].finish_reason == "stop"
        assert done.id.startswith("chatcmpl-")
        assert done.usage is not None

        stream = await client.chat.completions.create(
            model="clawgate:main",
            messages=[{"role": "user", "content": "[[reply:one two three four]] [[chunks:4]]"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        deltas = []
        usage_seen = False
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                deltas.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage_seen = True
        assert "".join(deltas) == "one two three four"
        assert len(deltas) == 4
        assert usage_seen
    finally:
        await client.close()


async def test_openai_sync_sdk_in_a_thread(gw: RunningGateway) -> None:
    def sync_calls() -> tuple[list[str], str, str]:
        with openai.OpenAI(base_url=f"{gw.http_url}/v1", api_key=TOKEN, max_retries=0) as c:
            models = [m.id for m in c.models.list()]
            one = c.chat.completions.create(
                model="agent:main", messages=[{"role": "user", "content": "[[reply:sync]]"}]
            )
            streamed = "".join(
                ch.choices[0].delta.content or ""
                for ch in c.chat.completions.create(
                    model="openclaw:main",
                    messages=[{"role": "user", "content": "[[reply:abc def]] [[chunks:2]]"}],
                    stream=True,
                )
                if ch.choices
            )
            return models, one.choices[0].message.content or "", streamed

    models, one, streamed = await asyncio.to_thread(sync_calls)
    assert "openclaw:main" in models
    assert one == "sync"
    assert streamed == "abc def"


async def test_openai_responses_sdk_plain_and_streaming(gw: RunningGateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gw.http_url}/v1", api_key=TOKEN, max_retries=0)
    try:
        resp = await client.responses.create(model="openclaw:main", input="[[reply:resp text]]")
        assert resp.output_text == "resp text"
        assert resp.status == "completed"
        kinds: list[str] = []
        text = ""
        stream = await client.responses.create(
            model="openclaw:main", input="[[reply:x y z]] [[chunks:3]]", stream=True
        )
        async for ev in stream:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                text += ev.delta
        assert text == "x y z"
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    finally:
        await client.close()


async def test_openai_errors_have_openai_shape(gw: RunningGateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gw.http_url}/v1", api_key="wrong-token", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError) as err:
            await client.chat.completions.create(
                model="openclaw:main", messages=[{"role": "user", "content": "x"}]
            )
        assert err.value.status_code == 401
        body = err.value.body
        assert isinstance(body, dict) and {"message", "type", "code"} <= set(body)
    finally:
        await client.close()
    async with httpx.AsyncClient(base_url=gw.http_url, headers=auth()) as http:
        r = await http.post("/v1/chat/completions", json={"model": "openclaw:main", "messages": "nope"})
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = await http.post(
            "/v1/chat/completions",
            json={"model": "openclaw:main", "messages": [{"role": "user", "content": "[[error:boom]]"}]},
        )
        assert r.status_code == 502
        assert "boom" in r.json()["error"]["message"]


async def test_session_from_header_and_stable_user_session(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.http_url, headers=auth(), timeout=30) as http:
        key = "agent:main:http-session-1"
        body = {"model": "openclaw:main", "messages": [{"role": "user", "content": "first"}]}
        r = await http.post("/v1/chat/completions", json=body, headers={"x-openclaw-session-key": key})
        assert r.status_code == 200
        h = await http.get(f"/v1/sessions/{key}/history")
        assert [m["content"] for m in h.json()["messages"]] == ["first", "ok: first"]
        # The same `user` lands in the same session both times.
        for text in ("u1", "u2"):
            r = await http.post(
                "/v1/chat/completions",
                json={
                    "model": "openclaw:main",
                    "user": "alice",
                    "messages": [{"role": "user", "content": text}],
                },
            )
            assert r.status_code == 200
    async with Client(gw.url, token=TOKEN, max_reconnect_attempts=0) as c:
        sessions = (await c.call("sessions.list", {"prefix": "agent:main:openai-user:"}))["sessions"]
        assert len(sessions) == 1


# -- REST ----------------------------------------------------------------------------------------
async def test_rest_run_lifecycle_get_wait_cancel(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.http_url, headers=auth(), timeout=30) as http:
        r = await http.post("/v1/runs", json={"message": "[[reply:rest]]", "sessionKey": "agent:main:rest"})
        assert r.status_code == 202
        run_id = r.json()["runId"]
        assert r.json()["status"] == "accepted"
        await settle(gw.gateway)
        got = await http.get(f"/v1/runs/{run_id}")
        assert got.status_code == 200
        assert got.json()["status"] == "ok" and got.json()["text"] == "rest"
        w = await http.post("/v1/runs/wait", json={"message": "[[reply:waited]]"})
        assert w.status_code == 200
        assert w.json()["result"]["payloads"][0]["text"] == "waited"
        assert (await http.get("/v1/runs/nope")).status_code == 404
        stalled = await http.post("/v1/runs", json={"message": "[[stall]]", "sessionKey": "agent:main:stall"})
        sid = stalled.json()["runId"]
        c = await http.post(f"/v1/runs/{sid}/cancel")
        assert c.json() == {"runId": sid, "aborted": True}
        await settle(gw.gateway)
        assert (await http.get(f"/v1/runs/{sid}")).json()["status"] == "aborted"


async def test_idempotency_across_http_and_ws_starts_one_run(gw: RunningGateway) -> None:
    key = f"shared-{uuid.uuid4().hex}"
    async with httpx.AsyncClient(base_url=gw.http_url, headers=auth(), timeout=30) as http:
        r1 = await http.post("/v1/runs", json={"message": "[[reply:once]]"}, headers={"Idempotency-Key": key})
        assert r1.json()["runId"] == key
        async with Client(gw.url, token=TOKEN, max_reconnect_attempts=0) as c:
            final = await c.run_agent("[[reply:twice]]", idempotency_key=key)
        assert final["runId"] == key
        assert final["result"]["payloads"][0]["text"] == "once"
        r2 = await http.post("/v1/runs/wait", json={"message": "[[reply:thrice]]", "idempotencyKey": key})
        assert r2.json()["result"]["payloads"][0]["text"] == "once"
    assert gw.gateway.runs.totals["ok"] == 1


async def test_sse_events_with_seq_ids_and_resume(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.http_url, headers=auth(), timeout=30) as http:
        r = await http.post("/v1/runs", json={"message": "[[reply:a b c d e]] [[chunks:5]]"})
        run_id = r.json()["runId"]
        await settle(gw.gateway)
        full = sse_events((await http.get(f"/v1/runs/{run_id}/events")).text)
        agent = [e for e in full if e.get("event") == "agent"]
        seqs = [int(e["id"]) for e in agent]
        assert seqs == list(range(1, len(seqs) + 1))
        assert full[-1]["event"] == "end"
        assert json.loads(full[-1]["data"])["status"] == "ok"
        resumed = sse_events(
            (await http.get(f"/v1/runs/{run_id}/events", headers={"Last-Event-ID": "3"})).text
        )
        assert [int(e["id"]) for e in resumed if e.get("event") == "agent"] == seqs[3:]


async def test_sse_says_when_the_buffer_no_longer_holds_the_position(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(token=TOKEN, http_event_buffer_events=3)
    async with httpx.AsyncClient(base_url=gw.http_url, headers=auth(), timeout=30) as http:
        r = await http.post("/v1/runs", json={"message": "[[reply:a b c d e f]] [[chunks:6]]"})
        run_id = r.json()["runId"]
        await settle(gw.gateway)
        events = sse_events(
            (await http.get(f"/v1/runs/{run_id}/events", headers={"Last-Event-ID": "1"})).text
        )
        assert events[0]["event"] == "gap"
        gap = json.loads(events[0]["data"])
        assert gap["requestedSeq"] == 2 and gap["oldestSeq"] > 2
        assert len([e for e in events if e.get("event") == "agent"]) == 3


async def test_stream_disconnect_does_not_abort_unless_asked(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.http_url, headers=auth(), timeout=30) as http:
        for abort, expected in (("0", "ok"), ("1", "aborted")):
            key = f"disc-{abort}-{uuid.uuid4().hex}"
            body = {
                "model": "openclaw:main",
                "stream": True,
                "messages": [
                    {"role": "user", "content": "[[reply:slow reply here]] [[chunks:3]] [[delay:5]]"}
                ],
            }
            headers = {"Idempotency-Key": key, "x-clawgate-abort-on-disconnect": abort}
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
                assert resp.status_code == 200
                async for _line in resp.aiter_lines():
                    break  # the first chunk, then hang up
            for _ in range(200):  # move the fake clock until the run has ended either way
                if gw.gateway.runs.active.get(key) is None:
                    break
                gw.gateway.clock.advance(0.5)  # type: ignore[attr-defined]
                await asyncio.sleep(0.01)
            await settle(gw.gateway)
            async with Client(gw.url, token=TOKEN, max_reconnect_attempts=0) as c:
                assert (await c.call("agent.wait", {"runId": key, "timeoutMs": 0}))["status"] == expected


# -- hooks ---------------------------------------------------------------------------------------
async def test_hooks_agent_and_wake(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as http:
        r = await http.post("/hooks/agent", json={"message": "[[reply:hooked]]"}, headers=auth(HOOKS))
        assert r.status_code == 202 and r.json()["ok"] is True
        r = await http.post(
            "/hooks/agent",
            json={"message": "[[reply:done]]", "waitForCompletion": True, "sessionKey": "agent:main:hook-1"},
            headers={"x-openclaw-token": HOOKS},
        )
        assert r.status_code == 200
        assert r.json()["status"] == "ok" and r.json()["text"] == "done"
        # The gateway token is not the hooks token, and a token in the query string is refused.
        assert (await http.post("/hooks/agent", json={"message": "x"}, headers=auth())).status_code == 401
        q = await http.post(f"/hooks/agent?token={HOOKS}", json={"message": "x"})
        assert q.status_code == 400
        w = await http.post(
            "/hooks/wake", json={"text": "wake up", "sessionKey": "agent:main:hook-1"}, headers=auth(HOOKS)
        )
        assert w.status_code == 200
        h = await http.get("/v1/sessions/agent:main:hook-1/history", headers=auth())
        assert h.json()["messages"][-1] == {
            **h.json()["messages"][-1],
            "role": "system",
            "content": "wake up",
        }


# -- auth, limits, admission --------------------------------------------------------------------
async def test_wrong_token_huge_body_and_bad_params(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as http:
        assert (await http.post("/v1/runs", json={"message": "x"})).status_code == 401
        assert (await http.post("/v1/runs", json={"message": "x"}, headers=auth("nope"))).status_code == 401
        big = {"message": "x" * (gw.gateway.settings.max_payload_bytes + 10)}
        r = await http.post("/v1/runs", json=big, headers=auth())
        assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_REQUEST"
        r = await http.post("/v1/runs", json={"message": 5}, headers=auth())
        assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "message"
        r = await http.post("/v1/runs", content=b"{not json", headers=auth())
        assert r.status_code == 400
    # The gateway is still healthy and answers runs.
    async with httpx.AsyncClient(base_url=gw.http_url, headers=auth(), timeout=30) as http:
        assert (await http.post("/v1/runs/wait", json={"message": "still fine"})).status_code == 200


async def test_failed_auth_is_rate_limited_per_address(gw: RunningGateway) -> None:
    # Loopback is exempt from the lockout, except for browser requests (they carry an Origin).
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as http:
        codes = [(await http.get("/v1/runs/x", headers=auth("bad"))).status_code for _ in range(12)]
        assert codes == [401] * 12
        assert (await http.get("/v1/runs/x", headers=auth())).status_code == 404
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30, headers={"Origin": gw.http_url}) as http:
        codes = [(await http.get("/v1/runs/x", headers=auth("bad"))).status_code for _ in range(10)]
        assert codes == [401] * 10
        r = await http.get("/v1/runs/x", headers=auth())
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) > 0
        gw.gateway.clock.advance(301)  # type: ignore[attr-defined]
    # A new client: the header timeout (on the same fake clock) closed the idle keep-alive socket.
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30, headers={"Origin": gw.http_url}) as http:
        assert (await http.get("/v1/runs/x", headers=auth())).status_code == 404


async def test_admission_closed_is_503_with_retry_after(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(token=TOKEN, max_tracked_runs=1)
    async with httpx.AsyncClient(base_url=gw.http_url, headers=auth(), timeout=30) as http:
        first = await http.post("/v1/runs", json={"message": "[[stall]]", "sessionKey": "agent:main:a"})
        assert first.status_code == 202
        r = await http.post("/v1/runs", json={"message": "x", "sessionKey": "agent:main:b"})
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["retryable"] is True
        o = await http.post(
            "/v1/chat/completions",
            json={"model": "openclaw:main", "messages": [{"role": "user", "content": "x"}]},
        )
        assert o.status_code == 503 and "Retry-After" in o.headers
        await http.post(f"/v1/runs/{first.json()['runId']}/cancel")
        await settle(gw.gateway)


async def test_groups_can_be_turned_off(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(http_openai=False, http_rest=False, http_hooks=False)
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as http:
        assert (await http.get("/v1/models")).status_code == 404
        assert (await http.post("/v1/runs", json={"message": "x"})).status_code == 404
        assert (await http.post("/hooks/agent", json={"message": "x"})).status_code == 404
        assert (await http.get("/healthz")).status_code == 200


async def test_http_followers_leave_nothing_behind(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.http_url, headers=auth(), timeout=30) as http:
        for i in range(20):
            r = await http.post(
                "/v1/runs/wait", json={"message": f"[[reply:r{i}]]", "sessionKey": f"agent:main:s{i}"}
            )
            assert r.status_code == 200
    await settle(gw.gateway)
    assert len(gw.gateway.bus.watchers) == 0
    buffers = gw.gateway.registry.sizes()["http_event_buffers"]
    assert buffers == 20
    gw.gateway.clock.advance(gw.gateway.settings.run_result_ttl_s + 1)  # type: ignore[attr-defined]
    await gw.gateway.maintenance.run_once()
    assert gw.gateway.registry.sizes()["http_event_buffers"] == 0


async def test_read_only_token_cannot_start_runs_and_foreign_origins_are_refused(
    start_gateway: GatewayFactory,
) -> None:
    ro = "read-only-t0ken-0123456789"
    gw = await start_gateway(
        token=TOKEN, tokens={"ro": {"token": ro, "scopes": ["operator.read"]}}, hooks_token=HOOKS
    )
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as http:
        r = await http.post("/v1/runs", json={"message": "x"}, headers=auth(ro))
        assert r.status_code == 403 and r.json()["error"]["details"]["code"] == "MISSING_SCOPE"
        o = await http.post(
            "/v1/chat/completions",
            json={"model": "openclaw:main", "messages": [{"role": "user", "content": "x"}]},
            headers=auth(ro),
        )
        assert o.status_code == 403 and o.json()["error"]["type"] == "permission_error"
        assert (await http.get("/v1/models", headers=auth(ro))).status_code == 200
        # A web page elsewhere cannot drive the HTTP API either (refused before the route runs).
        evil = {**auth(), "Origin": "https://evil.example"}
        assert (await http.post("/v1/runs", json={"message": "x"}, headers=evil)).status_code == 403
        assert (
            await http.post(
                "/hooks/agent",
                json={"message": "x"},
                headers={**auth(HOOKS), "Origin": "https://evil.example"},
            )
        ).status_code == 403
