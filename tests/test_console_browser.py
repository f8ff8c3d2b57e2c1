"""The console in headless Chromium (Debian's `chromium`, driven by Playwright), over a shop with a real worker.

Each test serves the console with uvicorn on a free port of 127.0.0.1 and signs in as a person. Screenshots of the
pages go to `PAIGEANT_CONSOLE_SCREENSHOTS` when it is set (`docs/images` makes the docs' pictures), else to a
temporary folder. Skipped where /usr/bin/chromium is missing; in CI (`CI` set) that is a failure.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from pydantic_ai import models

from paigeant_ai.console import create_app

from .console_world import PASSWORD, World, world

models.ALLOW_MODEL_REQUESTS = False
pytestmark = pytest.mark.slow  # a browser and a server per test

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not CHROMIUM.exists():
    reason = f"the console's browser tests need Chromium at {CHROMIUM} (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}. CI must provide it (.ci/run installs it).", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

from playwright.async_api import Page, async_playwright, expect  # noqa: E402


@dataclass
class Browsing:
    shop: World
    page: Page
    base: str
    shots: Path

    async def open(self, path: str) -> None:
        await self.page.goto(self.base + path)

    async def shot(self, name: str) -> None:
        await self.page.screenshot(path=self.shots / f"console-{name}.png", full_page=True)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PAIGEANT_CONSOLE_SCREENSHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
async def browsing(tmp_path: Path, shots: Path) -> AsyncGenerator[Browsing]:
    async with world(tmp_path) as shop:
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        port = listening.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(shop.console), log_level="warning"))
        serving = asyncio.create_task(server.serve(sockets=[listening]))
        for _ in range(500):  # uvicorn says when it listens by this flag alone
            if server.started:
                break
            await asyncio.sleep(0.02)
        try:
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                context = await browser.new_context(viewport={"width": 1280, "height": 800})
                context.set_default_timeout(15_000)
                page = await context.new_page()
                browsing = Browsing(shop, page, f"http://127.0.0.1:{port}", shots)
                await browsing.open("/login")
                await browsing.shot("sign-in")
                await page.fill("input[name=name]", "ana")
                await page.fill("input[name=password]", PASSWORD)
                await page.click("button:has-text('Sign in')")
                await expect(page.locator("h1")).to_have_text("Workflows")
                yield browsing
                await browser.close()
        finally:
            server.should_exit = True
            await serving
            listening.close()


async def test_the_list_shows_a_workflow_that_is_followed_live_to_completion(browsing: Browsing) -> None:
    shop, page = browsing.shop, browsing.page
    shop.shop.carrier_down = False
    shop.shop.pack_seconds = 4.0
    faulted = await shop.order("take-order", "charge")
    running = await shop.order("take-order", "pack", "ship")
    await browsing.open("/workflows")
    row = page.locator("tr", has_text=running)
    await expect(row).to_contain_text("running")
    await expect(page.locator("tr", has_text=faulted)).to_contain_text("faulted")
    await browsing.shot("workflows")

    follower = await page.context.new_page()  # the workflow in a tab of its own; the list stays open here
    await follower.goto(f"{browsing.base}/workflows?q={running[:8]}")  # search by ID prefix
    await expect(follower.locator("tbody tr")).to_have_count(1)
    await follower.click(f"text={running}")
    await expect(follower.locator("#state")).to_have_text("running")
    await expect(follower.locator("#state")).to_have_text("completed")  # without reloading the page
    await expect(follower.locator(".timeline .cell")).to_have_count(3)
    payload = follower.locator("#payload")
    await expect(payload).to_contain_text("TRK-555")
    await expect(payload).to_contain_text("[redacted]")
    await expect(payload).not_to_contain_text("hunter2")
    await expect(follower.locator("a", has_text="open its trace")).to_have_attribute(
        "href", f"https://traces.example/search?q={running}"
    )
    await follower.screenshot(path=browsing.shots / "console-workflow.png", full_page=True)
    await expect(row).to_contain_text("completed")  # the list, never reloaded, caught up too


async def test_a_faulted_workflow_shows_why(browsing: Browsing) -> None:
    shop, page = browsing.shop, browsing.page
    faulted = await shop.order("take-order", "charge")
    await browsing.open("/workflows?state=faulted")
    await page.click(f"text={faulted}")
    await expect(page.locator("#state")).to_have_text("faulted")
    await expect(page.locator("#failure")).to_contain_text("the card was declined (insufficient funds)")
    await expect(page.locator(".cell.failed")).to_contain_text("charge")
    await browsing.shot("faulted")


async def test_a_parked_ticket_is_approved_and_completes(browsing: Browsing) -> None:
    shop, page = browsing.shop, browsing.page
    ticket = await shop.ticket()
    await browsing.open("/workflows")
    await expect(page.locator("tr", has_text=ticket)).to_contain_text("waiting")
    await page.click("nav >> text=Approvals")
    request = page.locator("section.request", has_text=ticket)
    await expect(request).to_contain_text("refund")
    await expect(request.locator("pre")).to_contain_text('"amount": 40')
    await expect(request.locator(".said")).to_contain_text("charged twice for one order: I refund the second")
    await expect(request).to_contain_text("Help with: charged twice for one order")
    await browsing.shot("approvals")

    await request.locator("button", has_text="Approve").click()
    await expect(page.locator(".flash")).to_contain_text("refund approved by ana")
    await expect(page.locator("#state")).to_have_text("completed")
    await expect(page.locator("#payload")).to_contain_text("Dear customer: refunded 40 EUR on T-1042")
    await expect(page.locator(".events")).to_contain_text("approved refund (r1) by ana")
    assert shop.shop.refunds == [{"ticket": "T-1042", "amount": 40}]
    seen = page.locator(".cell details.seen")  # what the agent step saw, recorded with its completion
    await expect(seen.locator("summary")).to_contain_text("called refund")
    await seen.locator("summary").click()
    await expect(seen.locator("pre").first).to_contain_text('"ticket": "charged twice for one order"')
    await expect(seen.locator("pre").last).to_contain_text("Dear customer: refunded 40 EUR on T-1042")
    await browsing.shot("agent-step")


async def test_a_denied_ticket_completes_with_the_agents_reply(browsing: Browsing) -> None:
    shop, page = browsing.shop, browsing.page
    ticket = await shop.ticket()
    await browsing.open("/workflows")
    await expect(page.locator("tr", has_text=ticket)).to_contain_text("waiting")
    await browsing.open("/approvals")
    request = page.locator("section.request", has_text=ticket)
    await request.locator("input[name=note]").fill("Refunds over 30 EUR need a manager.")
    await request.locator("button", has_text="Deny").click()
    await expect(page.locator("#state")).to_have_text("completed")
    await expect(page.locator("#payload")).to_contain_text("Dear customer: Refunds over 30 EUR need a manager.")
    await expect(page.locator(".events")).to_contain_text("denied refund (r1) by ana")
    assert shop.shop.refunds == []


async def test_a_dead_letter_is_inspected_and_replayed(browsing: Browsing) -> None:
    shop, page = browsing.shop, browsing.page
    order = await shop.order("take-order", "ship")
    await browsing.open("/workflows?state=faulted")
    await expect(page.locator("tr", has_text=order)).to_contain_text("faulted")
    await browsing.open("/dead-letters")
    letter = page.locator("details.letter", has_text=order)
    await expect(letter).to_contain_text("the carrier's booking service is down")
    await letter.locator("summary").click()
    await expect(letter.locator("pre")).to_contain_text("[redacted]")
    await browsing.shot("dead-letters")

    shop.shop.carrier_down = False  # the cause is fixed
    await letter.locator("button", has_text="Replay").click()
    await expect(page.locator(".flash")).to_contain_text(f"replayed by ana: workflow {order}")
    await expect(page.locator("details.letter", has_text=order)).to_have_count(0)
    await browsing.open(f"/workflows/{order}")
    await expect(page.locator("#state")).to_have_text("completed")
    await expect(page.locator("#payload")).to_contain_text("TRK-555")
