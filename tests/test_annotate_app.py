"""The Annotate tab through gradio_client, bad input, and a server killed in the middle of a save."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from annotate.store import Store

from annotate_helpers import SPEECH_TEXT, build_test_demo, espeak_wav, free_port, make_images, tiny_whisper_dir

HERE = Path(__file__).resolve().parent


@pytest.fixture
def served(tmp_path, monkeypatch):
    """An in-process test app (minimum 3 s, target 5 s) and a client; yields (client, project)."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio_tmp"))
    project = tmp_path / "proj"
    make_images(project, 3)
    demo = build_test_demo(str(project), str(tiny_whisper_dir()), min_seconds=3.0)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    client = Client(demo.local_url, verbose=False, download_files=False)
    try:
        yield client, project
    finally:
        client.close()
        demo.close()


def _wav(path: Path, seconds: float, amp: float) -> str:
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(path, (amp * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000, subtype="PCM_16")
    return str(path)


def test_flow_and_bad_input_through_the_api(served, tmp_path):
    client, project = served
    speech = espeak_wav(SPEECH_TEXT, tmp_path / "speech.wav")
    out = client.predict("alice", str(project), api_name="/annotate_next")
    assert out[1].startswith("**img_000.png**") and "0/3 complete" in out[-1]
    raw, transcript, segments, status = client.predict(handle_file(str(speech)), api_name="/annotate_transcribe")
    assert raw == transcript and raw and segments and "segments" in status
    draft = client.predict(transcript, str(project), api_name="/annotate_draft_caption")
    assert "No model loaded" in draft[1]
    status, progress = client.predict("alice", str(project), handle_file(str(speech)), "edited words", "",
                                      api_name="/annotate_save")
    assert status.startswith("Saved annotation 1") and "no caption yet" in status and "1/3 complete" in progress
    s = Store(project, sync=False)
    (rec,) = s.annotations()
    assert rec.transcript == "edited words" and rec.transcript_raw == raw and rec.segments
    assert s.abs(rec.audio_path).is_file()

    def confirmed_intact():
        assert [a.transcript for a in Store(project, sync=False).annotations()] == ["edited words"]
        assert Store(project, sync=False).verify() == []

    client.predict("alice", str(project), api_name="/annotate_next")
    # silent audio
    silent = _wav(tmp_path / "silent.wav", 5, 0.0)
    with pytest.raises(AppError, match="Not saved. The recording is silent"):
        client.predict("alice", str(project), handle_file(silent), "words", "", api_name="/annotate_save")
    assert "silent" in client.predict(handle_file(silent), api_name="/annotate_check_upload")
    confirmed_intact()
    # 2 seconds of audio (minimum 3 s here)
    short = _wav(tmp_path / "short.wav", 2, 0.3)
    with pytest.raises(AppError, match=r"too short: 2.0 s, the minimum is 3 s"):
        client.predict("alice", str(project), handle_file(short), "words", "", api_name="/annotate_save")
    confirmed_intact()
    # a non-audio upload
    fake = tmp_path / "holiday.wav"
    fake.write_text("PK\x03\x04 definitely a zip, not a wav")
    with pytest.raises(AppError, match="'holiday.wav' is not an audio file we can read"):
        client.predict(handle_file(str(fake)), api_name="/annotate_transcribe")
    with pytest.raises(AppError, match="is not an audio file"):
        client.predict("alice", str(project), handle_file(str(fake)), "words", "", api_name="/annotate_save")
    confirmed_intact()
    # empty transcript, no name
    with pytest.raises(AppError, match="transcript is empty"):
        client.predict("alice", str(project), handle_file(str(speech)), "  ", "", api_name="/annotate_save")
    with pytest.raises(AppError, match="Enter your annotator name"):
        client.predict("", str(project), api_name="/annotate_next")
    # a missing image file: passed over with a note, reported in progress
    (project / "img_002.png").unlink()
    out = client.predict("alice", str(project), api_name="/annotate_skip")  # skips img_001, finds img_002 gone
    assert out[0] is None and out[-2].startswith("Skipped image 2. Image file missing")
    assert "img_002.png" in out[-2] and "missing files 1 (img_002.png)" in out[-1]
    out = client.predict("bob", str(project), api_name="/annotate_next")
    assert out[1].startswith("**img_001.png**")
    out = client.predict("carol", str(project), api_name="/annotate_next")
    assert out[0] is None and "Some image files are missing" in out[-2]
    confirmed_intact()


def test_corrupt_database_through_the_api(served, tmp_path):
    client, _ = served
    bad = tmp_path / "badproj"
    make_images(bad, 1)
    (bad / "annotations.sqlite").write_bytes(b"\x00garbage" * 500)
    with pytest.raises(AppError, match="cannot be read .* left untouched"):
        client.predict("alice", str(bad), api_name="/annotate_next")
    assert (bad / "annotations.sqlite").read_bytes() == b"\x00garbage" * 500
    with pytest.raises(AppError, match="Project folder not found"):
        client.predict("alice", str(tmp_path / "nope"), api_name="/annotate_next")


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(url)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["audio_written", "before_commit"])
def test_server_killed_mid_save_keeps_store_consistent(tmp_path, stage):
    project = tmp_path / "proj"
    make_images(project, 3)
    speech = espeak_wav("one two three four five. Six seven eight nine ten.", tmp_path / "s.wav")
    s = Store(project)
    t = s.next_image("earlier")
    from annotate.audio import decode_audio

    confirmed = s.save_annotation(t.image_id, "earlier", decode_audio(speech), "raw", "confirmed before the crash",
                                  caption="kept caption")
    s.release(t.image_id, "earlier")
    marker = tmp_path / "paused"
    port = free_port()
    env = dict(os.environ, MOLMO_ANNOTATE_TEST_PAUSE=f"{stage}:{marker}", GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", GRADIO_TEMP_DIR=str(tmp_path / "gtmp"))
    proc = subprocess.Popen([sys.executable, str(HERE / "annotate_helpers.py"), "serve", str(project), str(port), ""],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_http(url, proc)
        client = Client(url, verbose=False, download_files=False)
        info = client.predict("alice", str(project), api_name="/annotate_next")[1]
        given = int(info.split("(image ", 1)[1].split(";", 1)[0])  # "**img_001.png** (image 2; ..."
        job = client.submit("alice", str(project), handle_file(str(speech)), "lost in the crash", "new caption",
                            api_name="/annotate_save")
        deadline = time.time() + 60
        while not marker.exists():
            assert time.time() < deadline, "the save never reached the pause point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        try:
            job.result(timeout=5)
        except Exception:
            pass
        client.close()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    s = Store(project)
    anns = s.annotations()
    assert [(a.id, a.transcript) for a in anns] == [(confirmed.id, "confirmed before the crash")]
    assert s.caption(confirmed.image_id)["caption"] == "kept caption"
    assert s.verify() == []  # integrity ok, confirmed receipt present with its sha256
    flacs = sorted(s.audio_dir.rglob("*.flac"))
    assert len(flacs) == 2  # the confirmed receipt + the orphan of the interrupted save
    removed = s.cleanup_orphans(min_age_seconds=0)
    assert len(removed) == 1 and s.abs(confirmed.audio_path).is_file()
    # the interrupted annotator gets the same image back and can simply do it again
    t = s.next_image("alice")
    assert t.image_id == given != confirmed.image_id
    s.save_annotation(t.image_id, "alice", decode_audio(speech), "raw", "redo")
    assert len(s.annotations()) == 2 and s.verify() == []


def test_changed_folder_name_or_recording_is_refused(served, tmp_path):
    """Save / skip act on the image the session was given, never on another project's image of the same id."""
    client, project = served
    other = tmp_path / "other"
    make_images(other, 2)
    speech = espeak_wav(SPEECH_TEXT, tmp_path / "speech.wav")
    client.predict("alice", str(project), api_name="/annotate_next")
    with pytest.raises(AppError, match="the image was given to alice in"):
        client.predict("alice", str(other), handle_file(str(speech)), "words", "", api_name="/annotate_save")
    with pytest.raises(AppError, match="the image was given to alice in"):
        client.predict("bob", str(project), api_name="/annotate_skip")
    # A new recording with the unedited transcript of the previous one.
    raw = client.predict(handle_file(str(speech)), api_name="/annotate_transcribe")[0]
    tone = _wav(tmp_path / "tone.wav", 5, 0.3)
    with pytest.raises(AppError, match="transcript is the one of an earlier recording"):
        client.predict("alice", str(project), handle_file(tone), raw, "", api_name="/annotate_save")
    assert Store(other, sync=False).annotations() == [] and Store(project, sync=False).annotations() == []
    status, _ = client.predict("alice", str(project), handle_file(str(speech)), raw, "", api_name="/annotate_save")
    assert status.startswith("Saved annotation 1 for image 1")


def test_display_image_applies_exif_and_downscales(tmp_path):
    from PIL import Image

    from app.annotate_tab import DISPLAY_MAX_SIDE, _display_image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored landscape, shown portrait
    Image.new("RGB", (4000, 1000), "red").save(tmp_path / "rot.jpg", exif=exif)
    shown, problem = _display_image(tmp_path / "rot.jpg")
    assert problem == "" and shown.size == (DISPLAY_MAX_SIDE // 4, DISPLAY_MAX_SIDE)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    shown, problem = _display_image(tmp_path / "bad.png")
    assert shown is None and "could not be opened" in problem
