"""Headless Chromium with a fake microphone fed from an espeak-ng wav: record, transcribe, edit, save."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from annotate.export import PIXMO_CAP_SCHEMA
from annotate.store import Store

from annotate_helpers import SPEECH_TEXT, build_test_demo, espeak_wav, make_images, tiny_whisper_dir

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium at /usr/bin/chromium")
def test_record_transcribe_edit_save_in_chromium(tmp_path, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio_tmp"))
    project = tmp_path / "proj"
    make_images(project, 2)
    wav = espeak_wav(SPEECH_TEXT, tmp_path / "mic.wav", rate_hz=48000)
    demo = build_test_demo(str(project), str(tiny_whisper_dir()), min_seconds=2.0)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync",
                      "--disable-dev-shm-usage", "--use-fake-ui-for-media-stream",
                      "--use-fake-device-for-media-stream",
                      f"--use-file-for-fake-audio-capture={os.path.realpath(wav)}"],
            )
            try:
                ctx = browser.new_context(permissions=["microphone"], viewport={"width": 1400, "height": 1600})
                page = ctx.new_page()
                expect = sync_api.expect
                page.goto(demo.local_url, wait_until="load")
                expect(page.locator("#annotate_next")).to_be_visible(timeout=30000)
                page.locator("#annotate_annotator textarea, #annotate_annotator input").first.fill("alice")
                page.locator("#annotate_next").click()
                expect(page.locator("#annotate_image_info")).to_contain_text("img_000.png", timeout=20000)
                expect(page.locator("#annotate_progress textarea")).to_have_value(
                    "Images 0/2 complete; annotations 0/2 (1 per image); you (alice): 0", timeout=10000)
                page.locator("#annotate_audio .record-button").click()
                page.wait_for_timeout(4500)
                expect(page.locator("#annotate_timer")).to_contain_text("0:0", timeout=5000)
                page.locator("#annotate_audio .stop-button").click()
                expect(page.locator("#annotate_check textarea")).not_to_have_value("", timeout=20000)
                check = page.locator("#annotate_check textarea").input_value()
                assert "Hz" in check and "silent" not in check, check
                page.locator("#annotate_transcribe").click()
                expect(page.locator("#annotate_raw textarea")).not_to_have_value("", timeout=30000)
                raw = page.locator("#annotate_raw textarea").input_value()
                page.locator("#annotate_transcript textarea").fill("A red square with two cups and a spoon.")
                page.locator("#annotate_draft").click()
                expect(page.locator("#annotate_status textarea")).to_have_value(
                    re.compile("No model loaded"),
                    timeout=10000)
                page.locator("#annotate_caption textarea").fill("A red square next to two cups and a spoon.")
                page.locator("#annotate_save").click()
                expect(page.locator("#annotate_status textarea")).to_have_value(
                    re.compile("^Saved annotation 1 for image 1"), timeout=20000)
                expect(page.locator("#annotate_progress textarea")).to_have_value(re.compile("Images 1/2 complete"))
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "annotate_tab.png"), full_page=True)
            finally:
                browser.close()
    finally:
        demo.close()

    s = Store(project, sync=False)
    (rec,) = s.annotations()
    assert rec.annotator == "alice" and rec.transcript == "A red square with two cups and a spoon."
    assert rec.transcript_raw == raw and rec.segments and rec.duration > 2.0
    assert s.abs(rec.audio_path).is_file() and s.verify() == []
    assert s.caption(rec.image_id)["caption"] == "A red square next to two cups and a spoon."

    from annotate import review
    from annotate.cli import main_export

    review.accept(s, rec.id, "admin")  # the export holds accepted annotations
    out = tmp_path / "pixmo_cap.parquet"
    assert main_export(project, out) == 0
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert ds.column_names[:3] == [f.name for f in PIXMO_CAP_SCHEMA]
    assert ds[0]["caption"] == "A red square next to two cups and a spoon."
    assert ds[0]["transcripts"] == ["A red square with two cups and a spoon."]
    assert ds[0]["audio_paths"] == [rec.audio_path]
