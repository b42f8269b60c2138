"""The JavaScript client's outbox (``keepUntilDurable``) against the real
server, in headless Chromium, with Firestore (the emulator) behind the fault
proxy: messages acknowledged but not durable are kept, sent again after a
dropped connection, answered as duplicates, and stored once."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.cloud.firestore import AsyncClient
from playwright.async_api import Browser, Page, async_playwright

from samvad.documents import PROFILES
from samvad.web.app import create_app
from tests.support.faultproxy import FaultProxy
from tests.support.firestore import emulator_missing
from tests.support.server import live_server, outage_settings

pytestmark = pytest.mark.firestore

WAIT_MS = 30_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        emulator_missing("Chromium is not installed (scripts/bootstrap --test-tools)")
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
    context = await browser.new_context()
    opened = await context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield opened
    finally:
        await context.close()
    assert errors == [], f"the page threw: {errors}"


async def test_the_js_client_keeps_messages_until_durable_and_resends_them_once(
    page: Page, fault_proxy: FaultProxy, firestore_project: str, firestore_client: AsyncClient
) -> None:
    user, session = "js-durable", "js-durable-s"
    texts = ["one", "two", "three"]
    settings = outage_settings(
        fault_proxy.host_port, firestore_project, ws_reply_chunk_delay=0.0, demo="on"
    )
    async with live_server(create_app(settings)) as server:
        await page.goto(f"{server.url}/healthz")  # any page of the server's origin
        await page.evaluate(
            """async ([url, userId, sessionId]) => {
                const { SamvadClient } = await import("/demo/static/samvad.js");
                const client = new SamvadClient({ url, userId, sessionId });
                window.acks = [];
                client.on("frame", (f) => { if (f.type === "ack") window.acks.push(f); });
                window.client = client;
                await client.connect();
            }""",
            [f"{server.ws_url}/ws", user, session],
        )
        # The durable frame right after started switches keepUntilDurable "auto" on.
        await page.wait_for_function("() => window.client._keepingUntilDurable", timeout=WAIT_MS)

        fault_proxy.cut()
        await page.evaluate(
            "async (texts) => { for (const t of texts) await window.client.send(t).ack; }", texts
        )
        kept: list[dict[str, Any]] = await page.evaluate("window.client.pending")
        assert [(e["text"], e["acked"]) for e in kept] == [(t, True) for t in texts]

        await page.evaluate("window.client.dropConnection('dropped by the test')")
        await page.wait_for_function("() => window.acks.length >= 6", timeout=WAIT_MS)
        fault_proxy.restore()
        await page.wait_for_function("() => window.client.pending.length === 0", timeout=WAIT_MS)
        acks: list[dict[str, Any]] = await page.evaluate("window.acks")
        assert await page.evaluate("window.client.status") == "open"
        await page.evaluate("window.client.close()")

    first, again = acks[:3], acks[3:]
    assert not any(a.get("duplicate") for a in first)
    assert again == [{**a, "duplicate": True} for a in first]
    snapshot = await firestore_client.collection(PROFILES).document(user).get()
    history = (snapshot.to_dict() or {})["conversationHistory"]
    assert [m["content"] for m in history if m["role"] == "user"] == texts
    assert [m["clientId"] for m in history if m["role"] == "user"] == [a["clientId"] for a in first]
