"""The `/ui` dashboard in a real browser (Debian's chromium, driven by Playwright).

The gateway runs as a subprocess with the real clock, so the scripted provider's
`[[delay:S]]` really streams a reply over seconds while the page shows it. A
test that needs the browser fails, with what to install, when it cannot start
one: it never skips.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from clawgate.client.sync import SyncClient
from clawgate.testing import GatewayProcess
from clawgate.testing.process import clean_env

CHROMIUM = os.environ.get("CLAWGATE_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ADMIN_TOKEN = "dash-admin-token"
VIEWER_TOKEN = "dash-viewer-token"
SCREENSHOTS = os.environ.get("CLAWGATE_SCREENSHOTS")  # keep the screenshots in this directory
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def gateway_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    env = clean_env(
        CLAWGATE_TOKEN=ADMIN_TOKEN,
        CLAWGATE_TOKENS=json.dumps({"viewer": {"token": VIEWER_TOKEN, "scopes": ["operator.read"]}}),
    )
    with GatewayProcess(tmp_path_factory.mktemp("dash-gw"), env=env) as gp:
        yield gp


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no browser at {CHROMIUM}: install Debian's `chromium` and `chromium-driver` packages "
            "(`make test` does it when run as root: scripts/browser-setup.sh), or set CLAWGATE_CHROMIUM"
        )
    with sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        except Exception as exc:
            pytest.fail(f"the browser at {CHROMIUM} did not start: {exc}")
        yield b
        b.close()


class Tab:
    """A page at 1280x800 that records console errors and uncaught exceptions."""

    def __init__(self, page: Page, base: str, shots: Path) -> None:
        self.page = page
        self.base = base
        self.shots = shots
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append(msg.text)

    def sign_in(self, token: str) -> None:
        self.page.goto(f"{self.base}/ui/")
        self.page.fill("#token", token)
        self.page.press("#token", "Enter")  # from the keyboard

    def show(self, name: str) -> None:
        self.page.click(f'#nav a[href="#{name}"]')
        expect(self.page.locator("#page h1")).to_have_text(name.capitalize(), timeout=WAIT_MS)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=False)
        return path


@pytest.fixture
def tab(browser: Browser, gateway_proc: GatewayProcess, tmp_path: Path) -> Iterator[Tab]:
    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    yield Tab(page, gateway_proc.http_url, shots)
    context.close()


@pytest.fixture
def admin(gateway_proc: GatewayProcess) -> Iterator[SyncClient]:
    scopes = ["operator.read", "operator.write", "operator.admin"]
    with SyncClient(gateway_proc.url, token=ADMIN_TOKEN, scopes=scopes, max_reconnect_attempts=0) as c:
        yield c


def test_a_wrong_token_shows_the_login_and_no_data(tab: Tab) -> None:
    tab.sign_in("not-the-token")
    expect(tab.page.locator("#error")).to_contain_text("UNAUTHORIZED", timeout=WAIT_MS)
    expect(tab.page.locator("#login")).to_be_visible()
    expect(tab.page.locator("#nav")).to_be_hidden()
    assert tab.page.locator("#page").inner_text().strip() == ""
    assert tab.page.evaluate("sessionStorage.getItem('clawgate.token')") is None
    tab.shot("login-refused")


def test_a_run_appears_live_streams_its_text_and_shows_its_result(tab: Tab, admin: SyncClient) -> None:
    tab.sign_in(ADMIN_TOKEN)
    tab.show("runs")
    words = " ".join(f"word{i}" for i in range(40))
    admin.call(
        "chat.send",
        {
            "sessionKey": "agent:main:live",
            "message": f"[[chunks:12]][[delay:0.5]][[reply:{words}]]",
            "idempotencyKey": "live-run",
        },
    )
    row = tab.page.locator("#runs-table tr", has_text="live-run")
    expect(row).to_be_visible(timeout=WAIT_MS)
    row.focus()
    tab.page.keyboard.press("Enter")
    text = tab.page.locator("#run-text")
    # Part of the reply first, while the run is still streaming ...
    expect(text).to_contain_text("word", timeout=WAIT_MS)
    partial = text.inner_text()
    assert partial != words and words.startswith(partial.strip()), partial
    assert "null" not in tab.page.locator("#run-detail").inner_text()  # absent fields leave no trace
    tab.shot("run-streaming")
    # ... then all of it, and the final record with its status and result.
    expect(text).to_have_text(words, timeout=WAIT_MS)
    expect(tab.page.locator("#run-result")).to_have_text(words, timeout=WAIT_MS)
    expect(tab.page.locator("#run-status")).to_have_text("ok")
    assert tab.errors == []


def test_a_transcript_is_shown_and_an_admin_deletes_the_session(tab: Tab, admin: SyncClient) -> None:
    key = "agent:main:doomed"
    admin.run_agent("remember the pelican", idempotency_key="doomed-1", session_key=key)
    tab.sign_in(ADMIN_TOKEN)
    tab.show("sessions")
    row = tab.page.locator("#sessions-table tr", has_text=key)
    row.click()
    expect(tab.page.locator("#transcript")).to_contain_text("remember the pelican", timeout=WAIT_MS)
    tab.shot("session-transcript")
    tab.page.click("#session-delete")
    tab.page.click("#session-delete")  # the second press confirms
    expect(tab.page.locator("#transcript")).to_contain_text(f"Deleted {key}", timeout=WAIT_MS)
    expect(row).to_have_count(0, timeout=WAIT_MS)
    keys = [s["key"] for s in admin.call("sessions.list", {"limit": 1000})["sessions"]]
    assert key not in keys
    assert tab.errors == []


def test_a_reader_sees_no_admin_actions(tab: Tab, admin: SyncClient) -> None:
    key = "agent:main:kept"
    admin.run_agent("read me", idempotency_key="kept-1", session_key=key)
    tab.sign_in(VIEWER_TOKEN)  # its ceiling is read: the page asks again with fewer scopes
    tab.show("sessions")
    tab.page.locator("#sessions-table tr", has_text=key).click()
    expect(tab.page.locator("#transcript")).to_contain_text("read me", timeout=WAIT_MS)
    assert tab.page.locator("#session-delete").count() == 0
    assert tab.page.locator("#session-reset").count() == 0
    assert tab.errors == []


def test_a_subagent_spawn_appears_in_the_tree(tab: Tab, admin: SyncClient) -> None:
    tab.sign_in(ADMIN_TOKEN)
    tab.show("subagents")
    # The page follows subagent events on a connection it opens when the page is shown: spawn
    # only once that connection is subscribed, or the `spawned` event could pass it by.
    for _ in range(200):
        if admin.call("status")["state"].get("all_subscribers", 0) >= 1:
            break
        tab.page.wait_for_timeout(25)
    spawned = admin.call(
        "sessions.spawn",
        {"sessionKey": "agent:main:parent", "task": "[[delay:1]] look it up", "label": "researcher"},
    )
    child = spawned["childSessionKey"]
    node = tab.page.locator(f'#subagent-tree li[data-run="{spawned["runId"]}"]')
    expect(node).to_contain_text(child, timeout=WAIT_MS)
    expect(tab.page.locator("#subagent-tree")).to_contain_text("agent:main:parent")
    # The phases follow the subagent events as they come.
    phase = node.locator(".phase")
    expect(phase).to_contain_text("cleaned", timeout=WAIT_MS)
    for earlier in ("spawned", "ended (ok)", "announced"):
        expect(phase).to_contain_text(earlier)
    tab.shot("subagents")
    assert tab.errors == []


@pytest.mark.parametrize("width", [1280, 390])
def test_no_console_errors_on_any_page(tab: Tab, admin: SyncClient, width: int) -> None:
    label = f"batch:nightly-{width}"
    admin.run_agent("[[error:model exploded]] fail", idempotency_key=f"batch:bad-{width}", label=label)
    admin.run_agent("fine", idempotency_key=f"batch:good-{width}", label=label)
    admin.call(
        "cron.add",
        {"name": f"nightly-{width}", "schedule": {"kind": "every", "everyMs": 3_600_000}, "message": "tick"},
    )
    tab.page.set_viewport_size({"width": width, "height": 800})
    tab.sign_in(ADMIN_TOKEN)
    checks: dict[str, Any] = {
        "overview": lambda: expect(tab.page.locator(".chart")).to_have_count(6, timeout=WAIT_MS),
        "runs": lambda: expect(tab.page.locator("#runs-table")).to_contain_text("batch:", timeout=WAIT_MS),
        "sessions": lambda: expect(tab.page.locator("#sessions-table")).to_contain_text(
            "agent:", timeout=WAIT_MS
        ),
        "subagents": lambda: expect(tab.page.locator("#subagent-tree")).to_be_visible(),
        "batches": lambda: expect(tab.page.locator("#batches section", has_text=label)).to_contain_text(
            "model exploded", timeout=WAIT_MS
        ),
        "cron": lambda: expect(tab.page.locator("#cron")).to_contain_text(
            f"nightly-{width}", timeout=WAIT_MS
        ),
    }
    for name, check in checks.items():
        tab.show(name)
        check()
        tab.shot(f"{name}-{width}")
    # Overview again after a few status samples: the charts have lines.
    tab.show("overview")
    expect(tab.page.locator(".chart polyline").first).to_be_attached(timeout=WAIT_MS)
    tab.shot(f"overview-{width}-charts")
    assert tab.errors == []


def test_gateway_errors_are_shown_as_the_gateway_states_them(tab: Tab, admin: SyncClient) -> None:
    key = "agent:main:busy"
    admin.call("chat.send", {"sessionKey": key, "message": "[[stall]]", "idempotencyKey": "busy-run"})
    try:
        tab.sign_in(ADMIN_TOKEN)
        tab.show("sessions")
        tab.page.locator("#sessions-table tr", has_text=key).click()
        tab.page.click("#session-reset")
        expect(tab.page.locator("#error")).to_have_text(
            f"FORBIDDEN: cannot reset session {key} while a run is active in it", timeout=WAIT_MS
        )
        tab.shot("gateway-error")
    finally:
        admin.call("agent.abort", {"runId": "busy-run"})


def test_the_page_reconnects_by_itself_after_a_gateway_restart(browser: Browser, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = GatewayProcess(state).start()
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        tab = Tab(context.new_page(), first.http_url, tmp_path)
        tab.sign_in("")  # a gateway without a token, on loopback
        conn = tab.page.locator("#conn")
        expect(conn).to_have_text("connected", timeout=WAIT_MS)
        first.stop()
        expect(conn).to_have_text("reconnecting", timeout=WAIT_MS)
        second = GatewayProcess(state, port=first.port).start()
        try:
            expect(conn).to_have_text("connected", timeout=WAIT_MS)
            with SyncClient(second.url, max_reconnect_attempts=0) as c:
                c.run_agent("after the restart", idempotency_key="after-restart")
            tab.show("runs")
            expect(tab.page.locator("#runs-table")).to_contain_text("after-restart", timeout=WAIT_MS)
        finally:
            second.kill()
    finally:
        context.close()
        first.kill()
