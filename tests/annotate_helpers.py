"""Test helpers for the annotation mode: a tiny random faster-whisper model built offline,
espeak-ng speech, image folders, a free port, and a small standalone annotate app.

The tiny Whisper is built the way CTranslate2 converts a real one: a byte-level BPE
tokenizer with Whisper's multilingual special-token layout (51865 ids, ``""`` at 50256), a tiny
``WhisperForConditionalGeneration`` with random weights, CTranslate2 int8 conversion, then
``lang_ids`` patched into the ct2 config. It is built once per machine into a cache folder under
the system temp dir (guarded by a file lock) and reused by every test session.

Run as a script, this module serves the Annotate tab alone (used by the crash test):
    python tests/annotate_helpers.py serve <project_dir> <port> <whisper_dir>
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

TINY_WHISPER_VERSION = "v1"
CACHE_ROOT = Path(tempfile.gettempdir()) / "molmo_studio_test_cache"

LANGS = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur "
    "hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si "
    "km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln "
    "ha ba jw su"
).split()


def build_tiny_whisper(out_dir: Path) -> Path:
    """Build the tiny random Whisper into ``out_dir`` (``hf/`` and ``ct2/``); returns ``ct2/``."""
    import ctranslate2
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    assert len(LANGS) == 99, len(LANGS)
    hf_dir, ct2_dir = out_dir / "hf", out_dir / "ct2"
    hf_dir.mkdir(parents=True, exist_ok=True)

    # 1. tokenizer: 256 byte symbols, fillers up to 50255, "" at 50256, then the special tokens
    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    assert len(vocab) == 256
    for i in range(256, 50256):
        vocab[f"tok{i}"] = i
    vocab[""] = 50256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = (
        ["<|endoftext|>", "<|startoftranscript|>"]
        + [f"<|{c}|>" for c in LANGS]
        + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken("<|%.2f|>" % (k * 0.02), special=False, normalized=False) for k in range(1501)])
    assert tok.token_to_id("<|endoftext|>") == 50257
    assert tok.token_to_id("<|notimestamps|>") == 50363
    assert tok.get_vocab_size() == 51865, tok.get_vocab_size()

    # 2. save it twice (AutoTokenizer-loadable folder + the raw tokenizer.json)
    eot = "<|endoftext|>"
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot
    ).save_pretrained(hf_dir)
    tok.save(str(hf_dir / "tokenizer.json"))

    # 3. model
    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=256, decoder_ffn_dim=256,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50258,
        bos_token_id=50257, eos_token_id=50257, pad_token_id=50257, begin_suppress_tokens=[220, 50257],
        suppress_tokens=[],
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    model.generation_config.suppress_tokens = []
    model.generation_config.begin_suppress_tokens = [220, 50257]
    model.save_pretrained(hf_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(hf_dir)

    # 4. convert, 5. patch lang_ids
    ctranslate2.converters.TransformersConverter(
        str(hf_dir), copy_files=["tokenizer.json", "preprocessor_config.json"]
    ).convert(str(ct2_dir), quantization="int8", force=True)
    cfg_path = ct2_dir / "config.json"
    c = json.loads(cfg_path.read_text())
    c["lang_ids"] = list(range(50259, 50358))
    cfg_path.write_text(json.dumps(c, indent=2))
    return ct2_dir


def tiny_whisper_dir() -> Path:
    """The cached tiny Whisper ct2 folder, built on first use (about 8 s), safe across processes."""
    root = CACHE_ROOT / f"tiny-whisper-{TINY_WHISPER_VERSION}"
    done = root / "DONE"
    if done.is_file():
        return root / "ct2"
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / f"tiny-whisper-{TINY_WHISPER_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            tmp = Path(tempfile.mkdtemp(prefix="tiny-whisper-", dir=CACHE_ROOT))
            build_tiny_whisper(tmp)
            shutil.rmtree(tmp / "hf", ignore_errors=True)  # not needed at runtime
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
            (root / "DONE").write_text("ok\n")
    return root / "ct2"


def espeak_wav(text: str, path: Path, rate_hz: int | None = 16000, speed: int = 150) -> Path:
    """Speak ``text`` with espeak-ng into a 16-bit mono wav (resampled with sox when ``rate_hz``)."""
    path = Path(os.path.realpath(path))
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(speed), "-w", str(raw), text], check=True)
    if rate_hz:
        subprocess.run(["sox", str(raw), "-r", str(rate_hz), "-c", "1", "-b", "16", str(path)], check=True)
        raw.unlink()
    else:
        os.replace(raw, path)
    return path


SPEECH_TEXT = (
    "At first glance this is a photo of a red square on a white table. "
    "There are two cups and one spoon. The text on the mug says hello. "
    "The cups are on the left, the spoon is on the right. In the background there is a window."
)


def make_images(folder: Path, n: int, size: tuple[int, int] = (64, 48)) -> list[Path]:
    """``n`` distinct small PNGs in ``folder``."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        im = Image.new("RGB", size, (40 * i % 256, 120, 200 - 20 * i % 200))
        ImageDraw.Draw(im).rectangle([4 + i, 4, 30 + i, 30], fill=(255, 255 - 30 * i % 255, 0))
        p = folder / f"img_{i:03d}.png"
        im.save(p)
        out.append(p)
    return out


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def build_test_demo(project_dir: str, whisper_dir: str | None, get_runner=lambda: None, min_seconds: float = 1.0):
    """A ``gr.Blocks`` holding only the Annotate tab, with test-friendly settings."""
    import gradio as gr

    from annotate.asr import Transcriber
    from annotate.protocol import TimerRules
    from app.annotate_tab import create_annotate_tab

    transcriber = Transcriber(
        whisper_dir or "missing-model", device="cpu", compute_type="int8", cpu_threads=2,
        beam_size=1, temperature=0.0,
    )
    rules = TimerRules(min_seconds=min_seconds, target_seconds=max(min_seconds, 3.0))
    with gr.Blocks(analytics_enabled=False) as demo:
        with gr.Tab("Annotate"):
            create_annotate_tab(project_dir, get_runner, transcriber=transcriber, rules=rules)
    return demo


def _serve(project_dir: str, port: int, whisper_dir: str) -> None:
    demo = build_test_demo(project_dir, whisper_dir or None)
    demo.queue().launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=False)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "serve":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        _serve(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "")
    else:
        print(__doc__)
        sys.exit(2)
