"""faster-whisper through the real pipeline, with a tiny random Whisper built offline."""
from __future__ import annotations

import pytest

from annotate.asr import AsrModelMissing, Transcriber

from annotate_helpers import SPEECH_TEXT, espeak_wav, tiny_whisper_dir


def test_tiny_whisper_transcribes_espeak_speech(tmp_path):
    wav = espeak_wav(SPEECH_TEXT, tmp_path / "speech.wav")
    t = Transcriber(str(tiny_whisper_dir()), device="cpu", cpu_threads=2, beam_size=1, temperature=0.0)
    assert not t.loaded
    result = t.transcribe(wav)
    assert t.loaded and t.compute_type == "int8"
    from faster_whisper import WhisperModel

    assert isinstance(t._model, WhisperModel)  # the real CTranslate2 model, not a stand-in
    assert 10 < result.duration < 20  # about 14.7 s of espeak speech
    assert result.segments, "the random model still emits segments"
    for s in result.segments:
        assert 0 <= s.start <= s.end
    assert result.text  # random tokens such as "tok13203 tok8885", not English
    assert result.segments_as_dicts()[0].keys() == {"start", "end", "text"}


def test_missing_model_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MOLMO_WHISPER_DIR", str(tmp_path / "models"))
    t = Transcriber("small.en", device="cpu", fallback=False)  # the bundled tiny.en would stand in
    with pytest.raises(AsrModelMissing) as e:
        t.load()
    msg = str(e.value)
    assert "hf download Systran/faster-whisper-small.en --local-dir" in msg
    assert str(tmp_path / "models" / "small.en") in msg and "MOLMO_WHISPER_MODEL" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AsrModelMissing, match="has no model.bin"):
        Transcriber(str(empty), device="cpu", fallback=False).load()
