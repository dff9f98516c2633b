"""The console in a real browser: headless Chromium (Debian's, driven by Playwright) against the web app on real
Redis with a worker. Each test keeps a screenshot of the pages it saw in test-artifacts/ (gitignored)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot import control
from bot.events import ChannelRef
from bot.runtime import Deps
from bot.threads import Status
from tests.conftest import ROOT, status_is, wait_for, web_client
from tests.test_console import public_console
from tests.test_console import settings as settings  # the console tests' agents

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium): bash .ci/install-chromium"
)

if CHROMIUM.exists():
    from playwright.async_api import Browser, Page, async_playwright, expect
else:  # pragma: no cover
    Browser = Page = Any


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def site(deps: Deps, start_worker: Any) -> AsyncIterator[str]:
    """The console's address on 127.0.0.1 (no login), with a worker running."""
    await start_worker()
    async with web_client(deps) as client:
        yield str(client.base_url).rstrip("/")


async def open_page(browser: Browser, width: int = 1100) -> tuple[Page, list[str]]:
    """A new tab, and the errors its console reports (a CSP violation would be one)."""
    page = await browser.new_page(viewport={"width": width, "height": 800})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, errors


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"console-{name}.png"), full_page=True)


async def send(page: Page, site: str, message: str, agent: str = "console-desk") -> str:
    await page.goto(f"{site}/console/chat")
    await page.select_option("select[name=agent]", agent)
    await page.fill("textarea[name=text]", message)
    await page.click("form.composer button")
    await page.wait_for_url(re.compile(r"thread="))
    return page.url.split("thread=")[1]


async def test_send_a_message_and_see_the_reply(browser: Browser, site: str, deps: Deps) -> None:
    page, errors = await open_page(browser)
    tid = await send(page, site, "hello")
    await expect(page.locator(".say.agent").first).to_contain_text("I can refund orders", timeout=10_000)
    await wait_for(deps, tid, status_is(Status.DONE))
    await shot(page, "chat")
    assert errors == []


async def test_approve_a_gated_call_and_the_timeline_shows_the_tool_ran_once(
    browser: Browser, site: str, deps: Deps
) -> None:
    page, errors = await open_page(browser)
    tid = await send(page, site, "refund A100 25")
    approve = page.locator("form.decide button.approve")
    await expect(approve).to_be_visible(timeout=10_000)  # the approval request arrives live
    await shot(page, "chat-approval")
    await approve.click()
    await expect(page.locator(".say.agent.ok").last).to_contain_text("Refunded $25.00", timeout=10_000)
    await wait_for(deps, tid, status_is(Status.DONE))

    await page.goto(f"{site}/console/threads/{tid}")
    results = page.locator('.event[data-type="tool.result"]')
    await expect(results).to_have_count(2)  # the lookup, and the refund
    await expect(results.filter(has_text="refund_id")).to_have_count(1)
    await expect(page.locator('.event[data-type="approval.decided"]')).to_contain_text("approved by console:admin")
    await shot(page, "timeline")
    await page.goto(f"{site}/console/threads")
    await expect(page.locator("table.threads")).to_contain_text(tid)
    await shot(page, "threads")
    assert errors == []


async def test_a_decision_in_one_tab_updates_the_other(browser: Browser, site: str, deps: Deps) -> None:
    ref = ChannelRef(kind="api", address="ops", user="api:ops")
    accepted = await control.launch(deps, "console-desk", "refund A101", ref)
    await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL))
    one, errors_one = await open_page(browser)
    other, errors_other = await open_page(browser, width=390)  # a phone-sized screen
    for page in (one, other):
        await page.goto(f"{site}/console/approvals")
        await expect(page.locator("form.decide")).to_have_count(1)
    await shot(other, "approvals-phone")
    await one.fill("input[name=reason]", "customer kept the cable")
    await one.click("button.reject")
    await expect(one.locator(".card.approval")).to_contain_text("rejected by console:admin")
    # the other tab hears of it through its event stream and shows the inbox as it now is
    await expect(other.locator("form.decide")).to_have_count(0, timeout=10_000)
    await expect(other.locator(".empty")).to_contain_text("Nothing waits for a decision")
    await wait_for(deps, accepted.thread_id, status_is(Status.DONE))
    assert errors_one == errors_other == []


async def test_a_message_with_markup_is_shown_as_text(browser: Browser, site: str, deps: Deps) -> None:
    page, errors = await open_page(browser)
    message = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    tid = await send(page, site, message)
    await wait_for(deps, tid, status_is(Status.DONE))
    await expect(page.locator(".say.you .text")).to_have_text(f"console:admin: {message}")
    assert await page.evaluate("window.pwned") is None
    assert await page.locator(".conversation img").count() == 0
    await page.goto(f"{site}/console/dead-letters")
    await shot(page, "dead-letters")
    assert errors == []


async def test_a_login_is_required_when_bound_to_a_public_address(
    browser: Browser, deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HANDRAIL_CONSOLE_PASSWORD", "admin-pw-123")
    async with public_console(deps) as client:
        site = str(client.base_url).rstrip("/")
        page, errors = await open_page(browser)
        await page.goto(f"{site}/console/approvals")
        await expect(page).to_have_url(re.compile(r"/console/login\?next="))
        await shot(page, "login")
        await page.fill("input[name=name]", "admin")
        await page.fill("input[name=password]", "wrong")
        await page.click("form button")
        await expect(page.locator(".error")).to_contain_text("wrong name or password")
        await page.fill("input[name=password]", "admin-pw-123")
        await page.click("form button")
        await expect(page).to_have_url(f"{site}/console/approvals")
        await expect(page.locator(".me")).to_contain_text("console:admin")
        cookies = await page.context.cookies()
        [session] = [c for c in cookies if c["name"] == "handrail_console"]
        assert session["httpOnly"] and session["sameSite"] == "Strict"
        async with httpx.AsyncClient(base_url=site) as stranger:  # no cookie: no page
            assert (await stranger.get("/console/approvals")).status_code == 303
        await page.close()  # before the server stops, or its event stream's reconnects are errors
    assert [e for e in errors if "401" not in e] == []  # the wrong password's 401 is expected
