"""The Video tab in headless Chromium: a file that is not a video gets a clear message; then the moving-square
clip is uploaded, "track" picked and run, and the annotated video the page plays (its <video> src) is fetched,
decoded with OpenCV and checked for the markers on the parsed coordinates. A screenshot goes to
artifacts/screenshots/video_tab.png (gitignored).

A Blocks with only the Video tab over the scripted Molmo2 runner of test_video.py (known tracking answer)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from app.render import PALETTE
from app.video_tab import create_video_tab
from app_helpers import free_port
from test_video import H, N_FRAMES, W, FakeRunner, color_at, make_clip, near, read_all, square_x

pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"


@pytest.fixture(scope="module")
def video_app():
    with gr.Blocks(analytics_enabled=False) as demo:
        create_video_tab(lambda: FakeRunner())
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


def test_track_a_clip_in_the_browser_and_fetch_the_annotated_video(browser, video_app, tmp_path):
    from playwright.sync_api import expect

    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video\n" * 50)
    clip = make_clip(tmp_path / "square.mp4")
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    try:
        page.goto(video_app, wait_until="load")
        upload = page.locator("#video_input input[type=file]")
        # a file that is not a video: a clear message, and the tab keeps working
        upload.set_input_files(str(bad))
        page.locator("#video_phrase textarea").fill("the square")
        page.locator("#video_run").click()
        expect(page.get_by_text("is not a video that can be read").first).to_be_visible(timeout=20000)

        page.goto(video_app, wait_until="load")  # a fresh page: the same server, the next request
        upload.set_input_files(str(clip))
        page.locator("#video_phrase textarea").fill("the square")
        expect(page.locator("#video_info")).to_contain_text("6 frames", timeout=20000)  # the info event ran
        page.locator("#video_task label", has_text="track").click()
        page.locator("#video_run").click()
        expect(page.locator("#video_summary")).to_contain_text("1 object tracked", timeout=30000)
        page.wait_for_function("() => { const v = document.querySelector('#video_output video');"
                               " return v && v.src && v.src.length > 0; }", timeout=15000)
        src = page.locator("#video_output video").first.get_attribute("src")
        body = page.request.get(src).body()  # what the browser plays
        out = tmp_path / "annotated.mp4"
        out.write_bytes(body)
        frames = read_all(out)
        assert len(frames) == N_FRAMES and frames[0].shape == (H, W, 3)
        for f, t in ((0, 0.0), (10, 1.0), (20, 2.0)):
            assert near(color_at(frames[f], square_x(t) / 1000 * W, 0.5 * H), PALETTE[0]), f
        expect(page.locator("#video_points")).to_contain_text("115.2")
        expect(page.locator("#video_counts")).to_contain_text("2.5")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "video_tab.png"), full_page=True)
    finally:
        page.close()
