"""Two annotators, two browsers, over HTTPS with the self-signed certificate, under a host name that is not
localhost (mapped to 127.0.0.1 by Chromium's --host-resolver-rules), each with a fake microphone fed by a
different espeak-ng recording: both sign in, record, transcribe with the bundled Whisper tiny.en and save,
and each record carries its account. Over plain HTTP the same host name shows the insecure-context notice."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from annotate.asr import BUNDLED_NAME
from annotate.store import Store
from app.access import Accounts
from app.tls import self_signed
from annotate_helpers import espeak_wav, make_images
from app_helpers import free_port

CHROMIUM = "/usr/bin/chromium"
HOST = "annotate.test"
SPOKEN = {
    "bob": "There is a red square on a white table. Two cups stand on the left and a spoon lies on the right.",
    "carol": "A small garden with green grass. A yellow bicycle leans against a wooden fence near the gate.",
}
KEY_WORDS = {"bob": ("square", "table", "cups", "spoon"), "carol": ("garden", "bicycle", "fence")}
PASSWORDS = {"bob": "bob-password-1", "carol": "carol-password-1"}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--host-resolver-rules=MAP {HOST} 127.0.0.1"]
MIC_ARGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", "--ignore-certificate-errors"]


def _sign_in(page, expect, url: str, name: str) -> None:
    page.goto(url, wait_until="load")
    page.locator("input[type=password]").wait_for(timeout=30000)
    page.locator("input:not([type=password])").first.fill(name)
    page.locator("input[type=password]").fill(PASSWORDS[name])
    page.locator("button:has-text('Login'), button[type=submit]").first.click()
    expect(page.locator("#whoami")).to_contain_text(f"Signed in as {name}", timeout=30000)


def _annotate_one(page, expect, name: str) -> str:
    """Next image, record about 6 s, transcribe, save; returns the raw transcript."""
    expect(page.locator("#annotate_next")).to_be_visible(timeout=30000)
    page.locator("#annotate_next").click()
    expect(page.locator("#annotate_image_info")).to_contain_text("img_", timeout=30000)
    page.locator("#annotate_audio .record-button").click()
    page.wait_for_timeout(7000)
    page.locator("#annotate_audio .stop-button").click()
    expect(page.locator("#annotate_check textarea")).to_have_value(re.compile("Hz"), timeout=30000)
    page.locator("#annotate_transcribe").click()
    expect(page.locator("#annotate_raw textarea")).not_to_have_value("", timeout=120000)
    raw = page.locator("#annotate_raw textarea").input_value()
    page.locator("#annotate_save").click()
    expect(page.locator("#annotate_status textarea")).to_have_value(re.compile("^Saved annotation"), timeout=30000)
    return raw


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium at /usr/bin/chromium")
def test_two_annotators_over_https_and_the_http_notice(tmp_path, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    import launch

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio_tmp"))
    monkeypatch.setenv("MOLMO_WHISPER_MODEL", BUNDLED_NAME)  # the bundled tiny.en: real words, offline
    monkeypatch.setenv("MOLMO_ANNOTATE_MIN_SECONDS", "2")
    data = tmp_path / "projects"
    make_images(data / "proj", 2)
    accounts = Accounts(data / ".studio" / "users.json", scrypt_n=2**12)
    for name in PASSWORDS:
        accounts.add(name, "annotator", PASSWORDS[name])
    self_signed(data / ".studio" / "tls", host="127.0.0.1", extra_names=[HOST])  # kept and reused by --https
    wavs = {name: espeak_wav(text, tmp_path / f"{name}.wav", rate_hz=48000) for name, text in SPOKEN.items()}

    https_port, http_port = free_port(), free_port()
    https_demo = launch.main(model=None, port=https_port, block=False, data_root=str(data), https=True,
                             annotate="proj")
    http_demo = launch.main(model=None, port=http_port, block=False, data_root=str(data), annotate="proj")
    raws = {}
    try:
        with sync_api.sync_playwright() as p:
            expect = sync_api.expect
            browsers = {name: p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS + MIC_ARGS
                                                + [f"--use-file-for-fake-audio-capture={os.path.realpath(wavs[name])}"])
                        for name in SPOKEN}
            try:
                pages = {}
                for name, browser in browsers.items():
                    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 1600})
                    pages[name] = ctx.new_page()
                    _sign_in(pages[name], expect, f"https://{HOST}:{https_port}/", name)
                    assert pages[name].evaluate("window.isSecureContext") is True
                    expect(pages[name].locator("#insecure-mic")).to_be_hidden()
                for name, page in pages.items():
                    raws[name] = _annotate_one(page, expect, name)
                # plain HTTP, same host name: no microphone, and the page says why
                page = browsers["bob"].new_context().new_page()
                _sign_in(page, expect, f"http://{HOST}:{http_port}/", "bob")
                assert page.evaluate("window.isSecureContext") is False
                notice = page.locator("#insecure-mic")
                expect(notice).to_be_visible(timeout=20000)
                expect(notice).to_contain_text("No microphone here")
                expect(notice).to_contain_text(f"http://{HOST}:{http_port}")
            finally:
                for b in browsers.values():
                    b.close()
    finally:
        https_demo.close()
        http_demo.close()

    for name in SPOKEN:
        words = raws[name].lower()
        assert all(w in words for w in KEY_WORDS[name]), (name, raws[name])
    records = Store(data / "proj", sync=False).annotations()
    assert sorted(r.annotator for r in records) == ["bob", "carol"]
    for r in records:
        assert r.asr_model == BUNDLED_NAME and all(w in r.transcript_raw.lower() for w in KEY_WORDS[r.annotator])
    assert len({r.image_id for r in records}) == 2  # each got their own image
