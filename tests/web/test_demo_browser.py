"""The demo page (``/demo``) in real headless Chromium against a live server: a
streamed chat exchange, a barge-in that stores only what was heard (in Firestore),
a dropped connection resumed without a lost or duplicated message, a reload that
shows the history, anonymous Firebase sign-in on the Auth emulator, and a page of
another origin refused.

Chromium is Debian's ``chromium`` package (``scripts/bootstrap --test-tools``
installs it), driven by Playwright through its executable path; without it these
tests skip, and fail with ``CI=true``. Set ``SAMVAD_DEMO_SCREENSHOTS=DIR`` to save
the screenshots shown in the README there.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import shutil
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.cloud.firestore import AsyncClient
from playwright.async_api import Browser, Page, async_playwright

from samvad.config import Settings
from samvad.errors import ConfigError
from samvad.responder import EchoResponder
from samvad.web.app import create_app
from samvad.web.demo import firebase_config as demo_firebase_config
from tests.support.auth_emulator import AuthEmulator
from tests.support.firestore import emulator_missing
from tests.support.metrics import scrape
from tests.support.server import LiveServer, live_server

REPO = Path(__file__).resolve().parents[2]
#: Seconds any one thing may take to show up on the page.
WAIT_MS = 15_000


class Valve:
    """A responder sleep: lets ``passes`` chunks through after the first, then
    holds the reply until :meth:`open` (re-armed by :meth:`hold`)."""

    def __init__(self, passes: int = 0) -> None:
        self.passes = passes
        self.opened = asyncio.Event()
        self.opened.set()

    def hold(self, passes: int) -> None:
        self.passes = passes
        self.opened.clear()

    def open(self) -> None:
        self.opened.set()

    async def sleep(self, seconds: float) -> None:
        if self.passes > 0:
            self.passes -= 1
            await asyncio.sleep(0.01)
            return
        await self.opened.wait()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        emulator_missing(
            "Chromium is not installed (scripts/bootstrap --test-tools installs Debian's "
            "`chromium` package with apt-get)"
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 900, "height": 640})
    opened = await context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield opened
    finally:
        await context.close()
    assert errors == [], f"the page threw: {errors}"


def _settings(**overrides: Any) -> Settings:
    options: dict[str, Any] = {"store": "memory", "ws_reply_chunk_delay": 0.0}
    options.update(overrides)
    return Settings(**options)


async def open_demo(page: Page, base_url: str, user: str | None = None) -> None:
    """Load the demo and wait until its session has started."""
    query = f"?user={user}" if user else ""
    await page.goto(f"{base_url}/demo/{query}")
    await page.evaluate("window.samvadDemo.ready")
    await page.wait_for_selector('#connection[data-status="open"]', timeout=WAIT_MS)


async def shown(page: Page) -> list[dict[str, Any]]:
    """The transcript as the page holds it: role, text, seq, interrupted, state."""
    entries: list[dict[str, Any]] = await page.evaluate("window.samvadDemo.transcript()")
    return entries


async def send(page: Page, text: str) -> None:
    await page.fill("#text", text)
    await page.press("#text", "Enter")


async def wait_for_reply_text(page: Page, at_least: int) -> str:
    """Wait until the streaming reply holds ``at_least`` characters; its text."""
    await page.wait_for_function(
        f"() => (window.samvadDemo.client.currentReply?.text.length ?? 0) >= {at_least}",
        timeout=WAIT_MS,
    )
    text: str = await page.evaluate("window.samvadDemo.client.currentReply.text")
    return text


async def stored_history(server: LiveServer, user: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.get(f"/api/session/{user}/profile")
    assert response.status_code == 200
    history: list[dict[str, Any]] = response.json()["profile"]["conversationHistory"]
    return history


async def screenshot(page: Page, name: str) -> None:
    """Save a screenshot for the docs when ``SAMVAD_DEMO_SCREENSHOTS`` names a directory."""
    target = os.environ.get("SAMVAD_DEMO_SCREENSHOTS")
    if target:
        await page.screenshot(path=str(Path(target) / name))


def _user() -> str:
    return "demo-" + uuid.uuid4().hex[:10]


def _valve(server: LiveServer) -> Valve:
    valve = Valve()
    server.services.hub.responder = EchoResponder(sleep=valve.sleep)
    return valve


@pytest.mark.parametrize(
    ("environ", "served"),
    [
        ({}, True),  # local: auth off, memory
        ({"SAMVAD_AUTH": "firebase", "GOOGLE_CLOUD_PROJECT": "p"}, False),  # production
        ({"SAMVAD_AUTH": "firebase", "GOOGLE_CLOUD_PROJECT": "p", "SAMVAD_DEMO": "on"}, True),
        (
            {
                "SAMVAD_AUTH": "firebase",
                "GOOGLE_CLOUD_PROJECT": "p",
                "FIRESTORE_EMULATOR_HOST": "127.0.0.1:1",
            },
            True,  # the local emulator (the embedded store too)
        ),
        ({"SAMVAD_STORE": "memory", "SAMVAD_AUTH": "firebase", "SAMVAD_AUTH_PROJECT": "p"}, True),
        ({"SAMVAD_DEMO": "off"}, False),
    ],
)
def test_the_demo_is_served_in_local_mode_unless_configured(
    environ: dict[str, str], served: bool
) -> None:
    assert Settings.from_env(environ).demo_enabled is served


def test_demo_and_origin_settings_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "SAMVAD_WS_ORIGINS": "https://a.example, https://b.example",
            "SAMVAD_DEMO_FIREBASE_API_KEY": "AIza-public-web-key",
        }
    )
    assert settings.ws_origins == ("https://a.example", "https://b.example")
    assert settings.demo_firebase_api_key == "AIza-public-web-key"
    with pytest.raises(ConfigError, match="SAMVAD_DEMO"):
        Settings.from_env({"SAMVAD_DEMO": "sometimes"})


async def test_the_page_and_its_files_are_served_with_a_strict_policy() -> None:
    async with (
        live_server(create_app(_settings())) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        page = await http.get("/demo", follow_redirects=True)
        assert page.status_code == 200
        assert page.url.path == "/demo/"
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        assert "frame-ancestors 'none'" in policy
        module = await http.get("/demo/static/samvad.js")
        assert module.status_code == 200
        assert "javascript" in module.headers["content-type"]
        # The client the package serves is the one in clients/js.
        assert module.text == (REPO / "clients" / "js" / "samvad.js").read_text()
        assert module.headers["x-content-type-options"] == "nosniff"
        assert (await http.get("/demo/config.json")).json() == {"auth": "off", "firebase": None}
        for escape in ("/demo/static/../demo.py", "/demo/static/%2e%2e/demo.py", "/demo/nope"):
            assert (await http.get(escape)).status_code == 404, escape


async def test_the_page_is_not_served_when_off() -> None:
    async with (
        live_server(create_app(_settings(demo="off"))) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        for path in ("/demo", "/demo/", "/demo/config.json", "/demo/static/samvad.js"):
            assert (await http.get(path)).status_code == 404, path


def test_with_auth_the_page_signs_in_on_the_auth_emulator_or_google() -> None:
    emulated = Settings(auth="firebase", auth_project="p", auth_emulator_host="127.0.0.1:9099")
    assert demo_firebase_config(emulated) == {
        "projectId": "p",
        "apiKey": "demo-api-key",
        "authEmulatorHost": "127.0.0.1:9099",
    }
    real = Settings(auth="firebase", auth_project="p", demo_firebase_api_key="AIza-key")
    assert demo_firebase_config(real) == {
        "projectId": "p",
        "apiKey": "AIza-key",
        "authEmulatorHost": None,
    }
    # No key: the page says so instead of signing in against Google with a made-up key.
    assert demo_firebase_config(real.replace(demo_firebase_api_key=None))["apiKey"] is None


async def test_a_chat_exchange_streams_the_reply(page: Page) -> None:
    user = _user()
    async with live_server(create_app(_settings())) as server:
        valve = _valve(server)
        await open_demo(page, server.url, user)
        badge = await page.wait_for_selector('#persistence[data-mode="memory"]', timeout=WAIT_MS)
        assert badge is not None and await badge.text_content() == "persistence: memory"
        valve.hold(passes=3)
        await send(page, "What documents do I need?")
        partial = await wait_for_reply_text(page, 1)
        streaming = await page.wait_for_selector("li.msg.assistant.streaming", timeout=WAIT_MS)
        assert streaming is not None
        valve.open()
        await page.wait_for_selector('li.msg.assistant[data-state="stored"]', timeout=WAIT_MS)
        entries = await shown(page)
        history = await stored_history(server, user)
        assert [(e["role"], e["text"], e["seq"]) for e in entries] == [
            (m["role"], m["content"], m["seq"]) for m in history
        ]
        assert [e["seq"] for e in entries] == [1, 2]
        reply = entries[1]["text"]
        assert reply.startswith('You said: "What documents do I need?".')
        assert reply.startswith(partial) and len(partial) < len(reply)
        assert not any(e["interrupted"] for e in entries)
        await send(page, "And how long does it take?")
        await page.wait_for_selector('li.msg.assistant[data-seq="4"]', timeout=WAIT_MS)
        await screenshot(page, "demo-chat.png")


@pytest.mark.firestore
async def test_a_barge_in_stores_only_what_was_heard(
    page: Page, firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    user = _user()
    settings = _settings(
        store="firestore",
        emulator_host=firestore_emulator,
        project=firestore_project,
        flush_linger=0.0,
    )
    async with live_server(create_app(settings)) as server:
        valve = _valve(server)
        await open_demo(page, server.url, user)
        # A loaded machine may answer the first Firestore probe late (memory mode
        # until then); the page polls /healthz and shows the mode once it changed.
        await page.wait_for_selector('#persistence[data-mode="firestore"]', timeout=60_000)
        await page.evaluate("window.samvadDemo.enableVoice({simulated: true})")
        valve.hold(passes=8)
        await send(page, "Tell me everything about home loans please")
        # Nine chunks, then the reply is held: what was sent is known exactly.
        await page.wait_for_function(
            "() => window.samvadDemo.client.currentReply?.chunks === 9", timeout=WAIT_MS
        )
        streamed = await wait_for_reply_text(page, 30)
        # The speech engine has spoken 19 characters (up to a word boundary) when the
        # user starts typing.
        await page.evaluate("window.samvadDemo.simulateHeard(19)")
        await page.wait_for_selector("li.msg.assistant.speaking .heard", timeout=WAIT_MS)
        await page.type("#text", "w")
        await page.wait_for_selector("li.msg.assistant.interrupted", timeout=WAIT_MS)
        heard = streamed[:19]
        entries = await shown(page)
        assert [(e["role"], e["text"], e["interrupted"]) for e in entries] == [
            ("user", "Tell me everything about home loans please", False),
            ("assistant", heard, True),
        ]
        # What was streamed but not heard is shown struck out, and not stored.
        assert await page.text_content("li.msg.assistant .cut") == streamed[19:]

        # The next reply knows where the user cut in: spoken this time.
        await page.fill("#text", "")
        valve.open()
        await page.evaluate("window.samvadDemo.simulateUserSpeech('Just the list, please')")
        await page.wait_for_selector('li.msg.assistant[data-seq="4"]', timeout=WAIT_MS)
        entries = await shown(page)
        assert entries[3]["text"].startswith(f'(You stopped me after "{heard.strip()}".)')
        await screenshot(page, "demo-barge-in.png")

        async with asyncio.timeout(30):
            await server.services.persistence.writes.flush()
        snapshot = await firestore_client.collection("user_profiles").document(user).get()
        stored = (snapshot.to_dict() or {})["conversationHistory"]
        assert [(m["role"], m["content"], m.get("interrupted", False)) for m in stored] == [
            ("user", "Tell me everything about home loans please", False),
            ("assistant", heard, True),
            ("user", "Just the list, please", False),
            ("assistant", entries[3]["text"], False),
        ]


async def test_a_dropped_connection_resumes_without_losing_or_repeating_a_message(
    page: Page,
) -> None:
    user = _user()
    async with live_server(create_app(_settings())) as server:
        valve = _valve(server)
        await open_demo(page, server.url, user)

        # Dropped while the reply streams; the reply goes on after the resume.
        valve.hold(passes=3)
        await send(page, "first question")
        await wait_for_reply_text(page, 1)
        await page.evaluate("window.samvadDemo.dropConnection()")
        await page.wait_for_selector('#connection[data-status="open"]', timeout=WAIT_MS)
        await page.wait_for_function(
            "() => window.samvadDemo.client.status === 'open' && "
            "document.querySelector('#resume').textContent.includes('resumed')",
            timeout=WAIT_MS,
        )
        valve.open()
        await page.wait_for_selector('li.msg.assistant[data-seq="2"]', timeout=WAIT_MS)

        # Dropped while the reply streams, and the reply finishes while disconnected.
        valve.hold(passes=2)
        await send(page, "second question")
        await wait_for_reply_text(page, 1)
        await page.evaluate("window.samvadDemo.dropConnection()")
        valve.open()
        await page.wait_for_selector('li.msg.assistant[data-seq="4"]', timeout=WAIT_MS)
        await page.wait_for_function(
            "() => window.samvadDemo.client.status === 'open'", timeout=WAIT_MS
        )

        entries = await shown(page)
        history = await stored_history(server, user)
        assert [(m["role"], m["content"], m["seq"]) for m in history] == [
            (e["role"], e["text"], e["seq"]) for e in entries
        ]
        assert [e["seq"] for e in entries] == [1, 2, 3, 4]
        assert [e["role"] for e in entries] == ["user", "assistant"] * 2
        assert not any(e["interrupted"] for e in entries)
        assert await page.locator("li.msg").count() == 4


async def test_anonymous_sign_in_and_a_reload_shows_the_history(
    page: Page, auth_emulator_env: AuthEmulator
) -> None:
    settings = _settings(
        auth="firebase",
        auth_project=auth_emulator_env.project,
        auth_emulator_host=auth_emulator_env.host_port,
    )
    async with live_server(create_app(settings)) as server:
        await open_demo(page, server.url)
        uid = await page.evaluate("window.samvadDemo.client.userId")
        assert not uid.startswith("demo-")  # a Firebase uid, not a made-up local one
        await send(page, "remember this")
        await page.wait_for_selector('li.msg.assistant[data-seq="2"]', timeout=WAIT_MS)
        before = await shown(page)

        await page.reload()
        await page.evaluate("window.samvadDemo.ready")
        await page.wait_for_selector('#connection[data-status="open"]', timeout=WAIT_MS)
        assert await page.evaluate("window.samvadDemo.client.userId") == uid
        after = await shown(page)
        assert [(e["role"], e["text"], e["seq"]) for e in after] == [
            (e["role"], e["text"], e["seq"]) for e in before
        ]
        assert {e["state"] for e in after} == {"history"}

        # Without a token the same user is refused: the page did authenticate.
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get(f"/api/session/{uid}/profile")).status_code == 401


PAGE_OPENING_A_SOCKET = """<!doctype html><title>pending</title><script>
const ws = new WebSocket(%r);
ws.onopen = () => { document.title = "open"; ws.close(); };
ws.onclose = (event) => {
  if (document.title !== "open") document.title = "refused " + event.code;
};
</script>"""


class Site:
    """A web server of another origin (127.0.0.1, another port) serving one page."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.html = ""


@contextlib.contextmanager
def another_site() -> Iterator[Site]:
    """Run a :class:`Site` until the block ends; set its ``html`` before loading it."""
    holder: list[Site] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = holder[0].html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(Site(f"http://127.0.0.1:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def opened_sockets(server: LiveServer) -> float:
    async with httpx.AsyncClient(base_url=server.url) as http:
        return (await scrape(http)).total("samvad_websocket_connections_opened_total")


async def load_socket_page(page: Page, site: Site, server: LiveServer) -> str:
    """Load ``site``'s page that opens ``/ws`` of ``server``; how that went."""
    site.html = PAGE_OPENING_A_SOCKET % f"{server.ws_url}/ws"
    await page.goto(f"{site.url}/page.html")
    await page.wait_for_function("() => document.title !== 'pending'", timeout=WAIT_MS)
    return await page.title()


async def test_a_page_from_another_origin_is_refused(
    page: Page, caplog: pytest.LogCaptureFixture
) -> None:
    with another_site() as site:
        async with live_server(create_app(_settings())) as server:
            assert await load_socket_page(page, site, server) == "refused 1006"
            assert await opened_sockets(server) == 0
            assert f"refused a WebSocket handshake from origin '{site.url}'" in caplog.text
            # The demo itself, on the server's own origin, connects.
            await open_demo(page, server.url, _user())
            assert await opened_sockets(server) == 1


async def test_a_page_from_a_listed_origin_may_open_a_socket(page: Page) -> None:
    with another_site() as site:
        async with live_server(create_app(_settings(ws_origins=(site.url,)))) as server:
            assert await load_socket_page(page, site, server) == "open"
            assert await opened_sockets(server) == 1
