"""Hardening: no pickle code execution from files a user can point at, size limits on uploaded audio and
on the images the Annotate tab shows."""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from molmo_core.errors import CheckpointError
from molmo_core.weights import iter_torch_bin, load_torch_file

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code an attacker could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(path: Path, marker: Path) -> Path:
    torch.save({"weight": torch.zeros(2), "extra": Payload(marker)}, path)
    return path


def test_the_malicious_pickle_really_runs_code_with_weights_only_false(tmp_path):
    """The control: without weights_only the payload runs (so the refusals below are real)."""
    marker = tmp_path / "pwned"
    torch.load(_malicious(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name, load", [
    ("pytorch_model.bin", lambda f: list(iter_torch_bin(f))),  # MolmoE checkpoints (molmo_core.weights)
    ("scheduler.pt", lambda f: load_torch_file(f)),  # training resume (molmo_core.train.loop)
    ("rng.pt", lambda f: load_torch_file(f, numpy_arrays=True)),
])
def test_malicious_pickle_is_refused(tmp_path, name, load):
    marker = tmp_path / "pwned"
    f = _malicious(tmp_path / name, marker)
    with pytest.raises(CheckpointError) as e:
        load(f)
    assert not marker.exists(), "the payload ran"
    msg = str(e.value)
    assert f"Refused to load {f}" in msg and "found io.open" in msg and "could run code" in msg


def test_optimizer_resume_refuses_a_malicious_pickle(tmp_path):
    from molmo_core.train.dist import SingleProcess

    marker = tmp_path / "pwned"
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "trainable.safetensors"))
    d = SingleProcess.__new__(SingleProcess)
    d.device = torch.device("cpu")
    with pytest.raises(CheckpointError, match="Refused to load"):
        d.load_state(model, opt, tmp_path / "trainable.safetensors", _malicious(tmp_path / "optimizer.pt", marker))
    assert not marker.exists()


def test_trainer_checkpoint_files_still_load_weights_only(tmp_path):
    """What the trainer writes (scheduler, RNG states with numpy's, optimizer) round-trips the safe loader."""
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5])
    opt.step()
    sched.step()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(), "cuda": None}
    for name, obj in [("optimizer.pt", opt.state_dict()), ("scheduler.pt", sched.state_dict()), ("rng.pt", rng)]:
        torch.save(obj, tmp_path / name)
    assert load_torch_file(tmp_path / "optimizer.pt")["state"][0]["step"] == 2
    assert load_torch_file(tmp_path / "scheduler.pt")["last_epoch"] == 1
    back = load_torch_file(tmp_path / "rng.pt", numpy_arrays=True)
    expected = np.random.random(3)
    np.random.set_state(back["numpy"])
    np.testing.assert_array_equal(np.random.random(3), expected)
    with pytest.raises(CheckpointError, match=r"numpy\._core\.multiarray\._reconstruct"):
        load_torch_file(tmp_path / "rng.pt")  # numpy arrays only where asked for


def test_no_unsafe_torch_load_in_the_code():
    """Every torch.load outside tests goes through load_torch_file (weights_only=True)."""
    offenders = []
    for f in [ROOT / "launch.py", *(p for d in ("molmo_core", "app", "annotate", "bench", "scripts")
                                    for p in (ROOT / d).rglob("*.py"))]:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if "weights_only=False" in line or (re.search(r"torch\.load\(", line) and "weights_only=True" not in line):
                offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == []


# ----------------------------------------------------------------------------------- audio limits
def _tone(path: Path, seconds: float, rate: int = 16000, **kw) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, **kw)
    return path


def test_audio_over_the_byte_limit_is_refused_before_decoding(tmp_path):
    from annotate.audio import AudioTooLargeError, decode_audio

    f = _tone(tmp_path / "big.wav", 4.0, subtype="PCM_16")  # 128 kB
    assert decode_audio(f, max_bytes=200_000).duration == 4.0
    with pytest.raises(AudioTooLargeError, match=r"'big.wav' is 0.1 MB; recordings may be at most 0 MB\. Record a shorter"):
        decode_audio(f, max_bytes=100_000)


def test_long_recording_in_a_small_file_is_refused_by_duration(tmp_path):
    """11 minutes of silence as FLAC is tiny on disk: the duration limit (default 10 min) catches it."""
    from annotate.audio import MAX_AUDIO_BYTES, MAX_AUDIO_SECONDS, AudioTooLargeError, decode_audio

    f = tmp_path / "long.flac"
    sf.write(str(f), np.zeros(11 * 60 * 8000, np.int16), 8000, format="FLAC")
    assert f.stat().st_size < MAX_AUDIO_BYTES // 100 and MAX_AUDIO_SECONDS == 600
    with pytest.raises(AudioTooLargeError, match=r"'long.flac' is 660 s long \(at least\); recordings may be at most 600 s"):
        decode_audio(f)


def test_pyav_decoding_stops_at_the_duration_limit(tmp_path):
    """Formats soundfile cannot read (here: Opus in WebM, what browsers record) are cut off while decoding."""
    import av

    from annotate.audio import AudioTooLargeError, decode_audio

    f = tmp_path / "rec.webm"
    rate, seconds = 48000, 5
    with av.open(str(f), "w") as out:
        stream = out.add_stream("libopus", rate=rate)
        stream.layout = "mono"
        t = np.arange(rate * seconds) / rate
        pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
        for i in range(0, pcm.size, 960):
            frame = av.AudioFrame.from_ndarray(pcm[None, i:i + 960], format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    assert abs(decode_audio(f).duration - seconds) < 0.1
    with pytest.raises(AudioTooLargeError, match=r"'rec.webm' is [23] s long \(at least\); recordings may be at most 2 s"):
        decode_audio(f, max_seconds=2)


class _NoTranscriber:
    model_name = "unused"

    def transcribe(self, audio):
        raise AssertionError("an oversized recording reached speech recognition")


def test_annotate_tab_refuses_oversized_uploads_with_a_clear_error(tmp_path, monkeypatch):
    import gradio as gr

    import annotate.audio
    from annotate.protocol import TimerRules
    from app.annotate_tab import AnnotateHandlers, new_session

    h = AnnotateHandlers(lambda: None, _NoTranscriber(), TimerRules(min_seconds=1.0, target_seconds=3.0))
    f = str(_tone(tmp_path / "upload.wav", 4.0, subtype="PCM_16"))
    monkeypatch.setattr(annotate.audio, "MAX_AUDIO_SECONDS", 3)
    assert "is 4 s long (at least); recordings may be at most 3 s" in h.check(f)
    with pytest.raises(gr.Error, match="recordings may be at most 3 s"):
        h.transcribe(f, new_session())
    monkeypatch.setattr(annotate.audio, "MAX_AUDIO_BYTES", 1000)
    with pytest.raises(gr.Error, match="recordings may be at most 0 MB"):
        h.transcribe(f, new_session())


def test_annotate_tab_does_not_open_images_over_the_file_limit(tmp_path, monkeypatch):
    import app.annotate_tab as tab
    from molmo_core.preprocessing import MAX_FILE_BYTES, MAX_IMAGE_PIXELS

    from annotate_helpers import make_images

    assert (tab.MAX_FILE_BYTES, tab.DISPLAY_MAX_PIXELS) == (MAX_FILE_BYTES, MAX_IMAGE_PIXELS)
    (img,) = make_images(tmp_path, 1)
    shown, problem = tab._display_image(img)
    assert shown is not None and problem == ""
    monkeypatch.setattr(tab, "MAX_FILE_BYTES", img.stat().st_size - 1)
    shown, problem = tab._display_image(img)
    assert shown is None and "img_000.png is 0 MB; images may be at most 0 MB. Skip or flag it" in problem
