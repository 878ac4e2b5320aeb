"""Headless Chromium (Playwright + Debian's /usr/bin/chromium): upload, click, see the overlay and the
count, and check what every tab shows; a screenshot of every tab goes to artifacts/screenshots/
(gitignored), written fresh by each run.

The service runs with a scripted runner (known points: three coins in a row) so the overlay has
markers to look at; the real-model paths are covered through gradio_client in test_app.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.service import MolmoService

from app_helpers import *  # noqa: F401,F403
from app_helpers import running_app, scripted_loader

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "artifacts" / "screenshots"
TABS = [("Model", "model"), ("Point & Count", "point_count"), ("Clock", "clock"), ("Ask", "ask"),
        ("Caption", "caption"), ("Annotate", "annotate"), ("Train", "train")]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def scripted_app():
    service = MolmoService(loader=scripted_loader)
    service.load("scripted", wait=True)
    with running_app(service) as (_, url):
        yield url


def _fill(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(text)


def test_point_and_count_in_the_browser_and_screenshots(browser, scripted_app):
    from playwright.sync_api import expect

    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):  # a screenshot left by an earlier run must not pass for this one
        old.unlink()
    started = time.time()
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    page.goto(scripted_app, wait_until="load")  # not networkidle: Gradio keeps a heartbeat open
    expect(page.get_by_role("tab", name="Point & Count")).to_be_visible(timeout=30000)

    # Point & Count (the default tab with a model loaded): upload, type, click Count.
    page.get_by_role("tab", name="Point & Count").click()
    page.locator("#pc_image input[type=file]").set_input_files(str(ROOT / "assets" / "coins.png"))
    expect(page.locator("#pc_image img").first).to_be_visible(timeout=15000)
    _fill(page, "pc_phrase", "coins")
    page.locator("#pc_count").click()
    expect(page.locator("#pc_count_badge")).to_contain_text("Count: 3", timeout=20000)
    overlay = page.locator("#pc_overlay img").first
    expect(overlay).to_be_visible(timeout=20000)
    assert overlay.evaluate("img => img.naturalWidth") == 384  # the overlay has the photo's size
    expect(page.locator("#pc_table")).to_contain_text("coins")
    expect(page.locator("#pc_answer textarea")).to_have_value(
        'Counting the <points x1="25.0" y1="50.0" x2="50.0" y2="50.0" x3="75.0" y3="50.0" alt="coins">coins'
        "</points> shows a total of 3.")
    page.screenshot(path=str(SHOTS / "point_count.png"), full_page=True)

    # An empty phrase shows a clear error toast, not a traceback.
    _fill(page, "pc_phrase", "")
    page.locator("#pc_point").click()
    toast = page.locator(".toast-body, [data-testid='toast-body']").first
    expect(toast).to_contain_text("empty", timeout=10000)
    assert "Traceback" not in toast.inner_text()
    page.locator(".toast-close").first.click()

    # Clock: read a rendered clock; the time appears large with a face drawn from it.
    page.get_by_role("tab", name="Clock").click()
    page.locator("#clock_image input[type=file]").set_input_files(str(ROOT / "assets" / "clock_10_08.png"))
    expect(page.locator("#clock_image img").first).to_be_visible(timeout=15000)
    page.locator("#clock_read").click()
    expect(page.locator("#clock_time")).to_contain_text("10:08", timeout=20000)
    expect(page.locator("#clock_face img").first).to_be_visible(timeout=20000)
    page.screenshot(path=str(SHOTS / "clock.png"), full_page=True)

    # Ask: two turns.
    page.get_by_role("tab", name="Ask").click()
    page.locator("#ask_image input[type=file]").set_input_files(str(ROOT / "assets" / "coffee.jpg"))
    expect(page.locator("#ask_image img").first).to_be_visible(timeout=15000)
    for q in ("What is in the picture?", "And what colour is it?"):
        _fill(page, "ask_question", q)
        page.locator("#ask_send").click()
        expect(page.locator("#ask_chat")).to_contain_text(q, timeout=20000)
        expect(page.locator("#ask_question textarea")).to_have_value("", timeout=20000)  # answer done
    expect(page.locator("#ask_chat")).to_contain_text("three coins", timeout=20000)
    assert page.locator("#ask_chat").inner_text().count("three coins") == 2
    page.screenshot(path=str(SHOTS / "ask.png"), full_page=True)

    # Caption.
    page.get_by_role("tab", name="Caption").click()
    page.locator("#caption_image input[type=file]").set_input_files(str(ROOT / "assets" / "chelsea.jpg"))
    expect(page.locator("#caption_image img").first).to_be_visible(timeout=15000)
    page.locator("#caption_run").click()
    expect(page.locator("#caption_answer textarea")).to_have_value(
        "A photo of three coins on a table, seen from above.", timeout=20000)
    page.screenshot(path=str(SHOTS / "caption.png"), full_page=True)

    # Model and the optional tabs.
    page.get_by_role("tab", name="Model").click()
    expect(page.locator("#model_status")).to_contain_text("scripted", timeout=10000)
    page.screenshot(path=str(SHOTS / "model.png"), full_page=True)

    # Annotate and Train: their controls are on the page once their tab is open.
    page.get_by_role("tab", name="Annotate").click()
    expect(page.locator("#annotate_next")).to_be_visible(timeout=10000)
    expect(page.locator("#annotate_image_info")).to_contain_text("press Next image")
    page.screenshot(path=str(SHOTS / "annotate.png"), full_page=True)
    page.get_by_role("tab", name="Train").click()
    expect(page.get_by_role("button", name="Load result into the app")).to_be_visible(timeout=10000)
    expect(page.get_by_text("No run yet.")).to_be_visible()
    page.screenshot(path=str(SHOTS / "train.png"), full_page=True)
    page.close()
    for _, stem in TABS:  # one fresh, non-empty PNG per tab, written by this run
        shot = SHOTS / f"{stem}.png"
        assert shot.is_file(), f"no screenshot of the {stem} tab"
        assert shot.stat().st_mtime >= started - 1 and shot.read_bytes()[:8] == PNG_MAGIC, shot
