"""The browser console, as a person uses it: headless Chromium (Debian's) driven by Playwright."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from bus.client import Bus
from bus.settings import TektonSettings
from tests.helpers import env, eventually, in_process_specialists
from tests.test_http import bridge

pytestmark = pytest.mark.anyio

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"

try:
    from playwright.async_api import Browser, async_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    async_playwright = None  # type: ignore[assignment]

needs_browser = pytest.mark.skipif(
    async_playwright is None or not Path(CHROMIUM).exists(),
    reason="needs playwright (dev extra) and Debian's chromium (./dev.sh test installs it as root)",
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                # A "foreign" site served by the test itself: evil.example is this machine.
                "--host-resolver-rules=MAP evil.example 127.0.0.1",
            ],
        )
        try:
            yield launched
        finally:
            await launched.close()


@needs_browser
async def test_console_chats_streams_continues_and_cancels(
    settings: TektonSettings, browser: Browser
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="25"):
        async with bridge(settings) as url, in_process_specialists(settings, "apollo", "athena") as services:
            page = await browser.new_page()
            await page.goto(url)
            await page.wait_for_selector("#status:text('connected')")
            await page.select_option("#target", "apollo")
            await page.fill("#message", "what breaks first?")
            await page.press("#message", "Enter")
            await page.wait_for_selector("text=apollo heard: what breaks first?")
            await page.wait_for_selector("text=/first token \\d+ ms/")
            await page.screenshot(path=str(ARTIFACTS / "console-answer.png"), full_page=True)
            session = await page.input_value("#session")
            assert len(session) == 32

            # A follow-up continues the same session; @capability routing works from the picker.
            await page.select_option("#target", "@knowledge")
            await page.fill("#message", "and why?")
            await page.press("#message", "Enter")
            await page.wait_for_selector("text=athena heard: and why?")
            async with Bus.connect(settings) as bus:
                turns = (await bus.gateway.get(session)).turns
            assert [t.specialist for t in turns] == ["apollo", "apollo", "athena", "athena"]

    with env(TEKTON_SCRIPTED_TOKENS_PER_S="20", TEKTON_SCRIPTED_TOKENS="1000"):
        async with bridge(settings) as url, in_process_specialists(settings, "athena") as services:
            page = await browser.new_page()
            await page.goto(url)
            await page.wait_for_selector("#status:text('connected')")
            await page.select_option("#target", "athena")
            await page.fill("#message", "talk for a long time")
            await page.press("#message", "Enter")
            await page.wait_for_selector("text=athena heard: talk for")
            await page.click("#cancel")
            await page.wait_for_selector(".turn.who >> text=cancelled")
            await page.screenshot(path=str(ARTIFACTS / "console-cancelled.png"), full_page=True)

            def stopped() -> bool:
                return (
                    services["athena"].counters.cancelled == 1 and services["athena"].counters.in_flight == 0
                )

            await eventually(stopped)


@needs_browser
async def test_console_reload_continues_the_answer(settings: TektonSettings, browser: Browser) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    words = " ".join(f"w{i}" for i in range(60))
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="20"):
        async with bridge(settings) as url, in_process_specialists(settings, "apollo") as services:
            page = await browser.new_page()
            await page.goto(url)
            await page.wait_for_selector("#status:text('connected')")
            await page.select_option("#target", "apollo")
            await page.fill("#message", words)
            await page.press("#message", "Enter")
            await page.wait_for_selector(".turn.answer >> text=/w5 /")
            await page.reload()  # mid-answer: the socket closes, the run goes on
            await page.wait_for_selector("text=(continued after a reload)")
            await page.wait_for_selector("text=/first token \\d+ ms/", timeout=30_000)
            await page.screenshot(path=str(ARTIFACTS / "console-reloaded.png"), full_page=True)
            answer = await page.inner_text(".turn.answer span")
            assert answer == f"apollo heard: {words}"  # every chunk once, in order
            assert services["apollo"].counters.cancelled == 0


@needs_browser
async def test_a_specialist_that_starts_after_the_console_opened_is_listed(
    settings: TektonSettings, browser: Browser
) -> None:
    """The console asked for the roster once, on connecting: a specialist started after that (or one
    discovery had not heard yet, on a loaded machine: a CI run) was never in the picker."""
    async with bridge(settings) as url:
        page = await browser.new_page()
        await page.goto(url)
        await page.wait_for_selector("#status:text('connected')")
        async with in_process_specialists(settings, "apollo"):
            await page.select_option("#target", "apollo", timeout=15_000)
            await page.fill("#message", "late but here")
            await page.press("#message", "Enter")
            await page.wait_for_selector("text=apollo heard: late but here")


FOREIGN_PAGE = """<!doctype html><title>elsewhere</title><script>
window.attempt = new Promise((resolve) => {
  const ws = new WebSocket("BRIDGE_WS");
  ws.onopen = () => ws.send(JSON.stringify({jsonrpc: "2.0", id: 1, method: "sessions.list"}));
  ws.onmessage = (e) => resolve("read: " + e.data);
  ws.onclose = (e) => resolve("closed " + e.code);
});
</script>"""


@needs_browser
async def test_a_page_from_another_site_cannot_use_the_bridge_and_the_console_still_works(
    settings: TektonSettings, browser: Browser
) -> None:
    async with bridge(settings) as url, in_process_specialists(settings, "apollo"):
        async with Bus.connect(settings) as bus:
            await bus.gateway.create("apollo", name="private")
        # A page of another site the user happens to have open, opening the bridge's /ws.
        html = FOREIGN_PAGE.replace("BRIDGE_WS", url.replace("http", "ws") + "/ws")

        async def foreign_page(_: web.Request) -> web.Response:
            return web.Response(text=html, content_type="text/html")

        site = web.Application()
        site.router.add_get("/", foreign_page)
        runner = web.AppRunner(site)
        await runner.setup()
        try:
            listener = web.TCPSite(runner, "127.0.0.1", 0)
            await listener.start()
            port = listener._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            page = await browser.new_page()
            await page.goto(f"http://evil.example:{port}/")
            outcome = await page.evaluate("window.attempt")
        finally:
            await runner.cleanup()
        assert outcome.startswith("closed"), outcome  # never "read: ...private..."
        # DNS rebinding: evil.example now resolves to this machine, so its page is the bridge's port.
        rebound = await page.goto(url.replace("127.0.0.1", "evil.example") + "/")
        assert rebound is not None and rebound.status == 403
        # The bridge's own console is let in.
        console = await browser.new_page()
        await console.goto(url)
        await console.wait_for_selector("#status:text('connected')")
        await console.select_option("#target", "apollo")
        await console.fill("#message", "still mine")
        await console.press("#message", "Enter")
        await console.wait_for_selector("text=apollo heard: still mine")
