"""The dashboard in a real browser: Debian's chromium driven by Playwright, against pigeon serve."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pigeon.server.serve import Running, ServeOptions, running
from pigeon.transport import connect
from pigeon.transport.base import ConsumerSpec, Transport

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# PIGEON_SCREENSHOTS=docs/screenshots saves each page there (for the README).
SCREENSHOTS = os.environ.get("PIGEON_SCREENSHOTS")

if CHROMIUM is None:
    message = "Debian's chromium is not installed (scripts/test installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)

from playwright.async_api import Page, async_playwright, expect  # noqa: E402


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Running]:
    options = ServeOptions(data=tmp_path / "data", port=0, http_port=0, sample_interval_s=0.1)
    async with running(options) as parts:
        yield parts


@pytest.fixture
async def page(served: Running) -> AsyncIterator[Page]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        opened = await context.new_page()
        opened.on("dialog", lambda dialog: dialog.accept())
        yield opened
        await browser.close()


def screenshot_path(name: str) -> str:
    assert SCREENSHOTS
    Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
    return str(Path(SCREENSHOTS) / f"{name}.png")


async def shot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        await page.screenshot(path=screenshot_path(name), full_page=True)


async def fill(transport: Transport) -> None:
    from pigeon.transport.base import StreamSpec

    await transport.create_stream(StreamSpec("orders", ("orders.>",), partitions=2))
    for i in range(30):
        await transport.publish("orders.created", b'{"order": %d}' % i, key=f"customer-{i % 5}")
    billing = await transport.consumer("orders", ConsumerSpec("billing", kind="ordered"))
    for received in await billing.fetch(10, 2):
        await received.ack()
    await billing.close()
    mail = await transport.consumer("orders", ConsumerSpec("mailer"))
    for received in await mail.fetch(3, 2):
        await received.term(ValueError(f"no address for order {received.offset}"))
    await mail.close()


async def test_pages_show_the_engine_state_and_reprocess_works(served: Running, page: Page) -> None:
    transport = await connect(served.nats.url)
    try:
        await fill(transport)
        engine = served.engine
        base = served.http.url

        await page.goto(base + "/")
        await expect(page.locator("#streams")).to_have_text(str(len(engine.streams())))
        orders_row = page.locator('tr[data-stream="orders"]')
        await expect(orders_row).to_contain_text("30")
        lag = sum(p.lag for p in engine.group_lag("orders", "billing")) + sum(
            p.lag for p in engine.group_lag("orders", "mailer")
        )
        await expect(page.locator("#total-lag")).to_have_text(str(lag))
        await shot(page, "overview")

        await page.goto(base + "/#/stream/orders")
        await expect(page.locator("main h1")).to_contain_text("Stream orders")
        await expect(page.locator("main table").first.locator("tbody tr")).to_have_count(2)
        await shot(page, "stream")

        await page.goto(base + "/#/group/orders/billing")
        billing_lag = sum(p.lag for p in engine.group_lag("orders", "billing"))
        await expect(page.locator("#group-lag")).to_have_text(str(billing_lag))
        await expect(page.locator("svg.chart polyline")).to_have_count(1, timeout=10_000)
        await shot(page, "group")

        await page.goto(base + "/#/messages/orders?partition=0&offset=0")
        await expect(page.locator("main table tbody tr").first).to_contain_text("orders.created")
        await shot(page, "messages")

        await page.goto(base + "/#/dlq/orders/mailer")
        rows = page.locator("main table tbody tr")
        await expect(rows).to_have_count(3)
        await expect(rows.first).to_contain_text("ValueError")
        await rows.first.locator("a").click()
        await expect(page.locator("#letter-detail")).to_contain_text("no address for order")
        await shot(page, "dead-letters")
        before = engine.stream_info("orders").messages
        await rows.first.locator("button.reprocess").click()
        await expect(page.locator("#status")).to_contain_text("1 message(s) sent back to orders")
        await expect(rows).to_have_count(2)
        assert engine.stream_info("orders").messages == before + 1  # back in its stream
        assert len(await transport.read_dead_letters("orders", "mailer")) == 3  # the stream keeps history
        await rows.nth(0).locator("input[type=checkbox]").check()
        await page.locator("#reprocess-selected").click()
        await expect(rows).to_have_count(1)
        assert engine.stream_info("orders").messages == before + 2
        await page.locator("#purge").click()  # the confirmation is accepted
        await expect(rows).to_have_count(0)
        await expect(page.locator("#letter-count")).to_have_text("0 pending")
    finally:
        await transport.close()
