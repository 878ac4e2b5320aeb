"""molmo_core behaviour beyond parity: caching, batching, checkpoint formats, key errors, bad input."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import molmo_core
from molmo_core.config import MolmoConfig
from molmo_core.errors import CheckpointError, MolmoInputError
from molmo_core.generation import GenerationOptions, collate, generate_tokens, greedy_uncached
from molmo_core.preprocessing import image_token_count, load_image, select_tiling
from molmo_core.tiny import VARIANTS, write_tiny_checkpoint

PARITY_D = Path(__file__).parent / "data" / "parity" / "d"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {v: write_tiny_checkpoint(root / v, v) for v in ("d", "o", "e")}


@pytest.fixture(scope="module")
def runner_d():
    return molmo_core.load(PARITY_D, device="cpu", dtype=torch.float32)


def _image(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("variant", ["d", "o", "e"])
def test_cached_equals_uncached_greedy(tiny, variant):
    r = molmo_core.load(tiny[variant], device="cpu")
    batch = collate([r.process(_image(200, 150), "Point to the cup")])
    cached = [int(t[0]) for t in generate_tokens(r.model, batch, GenerationOptions(12, stop_on_eos=False))]
    assert cached == greedy_uncached(r.model, batch, 12)


def test_batch_of_three_equals_one_at_a_time(runner_d):
    reqs = [(_image(640, 480, 1), "Point to the dog."), (_image(100, 80, 2), "Describe this image."),
            (None, "How many cups are there?")]
    opts = GenerationOptions(10, stop_on_eos=False)
    singles = [[int(t[0]) for t in generate_tokens(runner_d.model, collate([runner_d.process(i, p)]), opts)]
               for i, p in reqs]
    batched = list(zip(*[t.tolist() for t in generate_tokens(
        runner_d.model, collate([runner_d.process(i, p) for i, p in reqs]), opts)]))
    assert [list(b) for b in batched] == singles
    assert len({tuple(s) for s in singles}) == 3  # three different answers: the test can tell rows apart


def test_text_api_streams_and_stops(runner_d):
    pieces = list(runner_d.stream(None, "Describe this image.", max_new_tokens=12))
    assert len(pieces) >= 2
    full = runner_d.generate(None, "Describe this image.", max_new_tokens=12)
    assert "".join(pieces).strip() == full
    # A stop string cuts the answer before it.
    stop = full.strip()[3:6]
    if stop.strip():
        cut = runner_d.generate(None, "Describe this image.", max_new_tokens=12, stop=[stop])
        assert stop not in cut and full.startswith(cut)


def test_sampling_is_seeded(runner_d):
    a = runner_d.generate(None, "Hello", max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    b = runner_d.generate(None, "Hello", max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    c = runner_d.generate(None, "Hello", max_new_tokens=10, temperature=1.0, top_p=0.9, seed=4)
    assert a == b and a != c


# ------------------------------------------------------------------------------------------ checkpoints
def _greedy(path: Path) -> list[int]:
    r = molmo_core.load(path, device="cpu")
    batch = collate([r.process(_image(120, 90), "Count the coins")])
    return [int(t[0]) for t in generate_tokens(r.model, batch, GenerationOptions(6, stop_on_eos=False))]


def test_two_shards_and_bin_load_the_same(tmp_path):
    one = write_tiny_checkpoint(tmp_path / "one", "e", seed=1)
    two = write_tiny_checkpoint(tmp_path / "two", "e", seed=1, shards=2)
    binf = write_tiny_checkpoint(tmp_path / "bin", "e", seed=1, fmt="bin")
    assert len(list(two.glob("model-*.safetensors"))) == 2 and (two / "model.safetensors.index.json").is_file()
    assert (binf / "pytorch_model.bin").is_file() and not list(binf.glob("*.safetensors"))
    assert _greedy(one) == _greedy(two) == _greedy(binf)


def _rewrite(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"))


def test_missing_key_is_named(tmp_path):
    shutil.copytree(PARITY_D, tmp_path / "ck")
    _rewrite(tmp_path / "ck", lambda sd: sd.pop("model.transformer.blocks.1.ff_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model\.transformer\.blocks\.1\.ff_norm\.weight"):
        molmo_core.load(tmp_path / "ck", device="cpu")


def test_extra_key_is_named(tmp_path):
    shutil.copytree(PARITY_D, tmp_path / "ck")
    _rewrite(tmp_path / "ck", lambda sd: sd.__setitem__("model.transformer.blocks.9.att_proj.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): model\.transformer\.blocks\.9\.att_proj\.weight"):
        molmo_core.load(tmp_path / "ck", device="cpu")


def test_missing_folder_and_offline_hub_id_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="neither an existing folder nor a hub id"):
        molmo_core.load(tmp_path / "nope" / "x y")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="hf download allenai/Molmo-7B-D-0924 --local-dir ./checkpoints/Molmo-7B-D-0924"):
        molmo_core.load("allenai/Molmo-7B-D-0924")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        molmo_core.load(tmp_path / "empty")


def test_config_reads_both_formats_and_presets():
    dense = json.loads((PARITY_D / "config.json").read_text())
    full = json.loads((PARITY_D / "full_config.json").read_text())
    cfg = MolmoConfig.from_checkpoint_config(dense, full)
    assert (cfg.text.d_model, cfg.text.n_kv_heads, cfg.vision.width, cfg.vision.num_layers) == (64, 2, 32, 10)
    assert MolmoConfig.from_checkpoint_config(dense).vision.num_layers == 23  # hub hard-codes ViT-L/14
    moe = MolmoConfig.from_checkpoint_config(MolmoConfig.from_name("MolmoE-1B-0924").to_checkpoint_config())
    assert moe.text == MolmoConfig.from_name("MolmoE-1B-0924").text
    for name in ("Molmo-7B-D-0924", "Molmo-7B-O-0924", "Molmo-72B-0924"):
        p = MolmoConfig.from_name(name)
        assert MolmoConfig.from_checkpoint_config(p.to_checkpoint_config()) == p
    with torch.device("meta"):
        n = sum(p.numel() for p in molmo_core.model.Molmo(MolmoConfig.from_name("Molmo-7B-D-0924")).parameters())
    assert n == 8_021_025_280  # the official 7B-D index's total_parameters
    with pytest.raises(ValueError, match="valid names"):
        MolmoConfig.from_name("Molmo-7B")


# ------------------------------------------------------------------------------------------ memory
# VmHWM (peak RSS of this process image; unlike ru_maxrss it does not inherit the parent's peak across exec).
MEMORY_SCRIPT = r"""
import sys, psutil, torch
import molmo_core
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
before = psutil.Process().memory_info().rss
assert hwm() < before + 50e6, "import peak should be near the current RSS"
r = molmo_core.load(sys.argv[1], device="cpu", dtype=torch.bfloat16)
print(before, hwm(), r.memory_bytes())
"""


@pytest.mark.slow
def test_loading_to_bf16_never_holds_the_fp32_checkpoint(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "mid", config=VARIANTS["mid"])
    fp32 = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert fp32 > 250e6
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(folder)], capture_output=True, text=True,
                         check=True).stdout.split()
    before, peak, bf16 = map(int, out)
    growth = peak - before
    print(f"fp32 file {fp32 / 1e6:.0f} MB, bf16 weights {bf16 / 1e6:.0f} MB, peak RSS growth {growth / 1e6:.0f} MB")
    assert growth < 1.3 * bf16, f"peak host memory grew by {growth / 1e6:.0f} MB for {bf16 / 1e6:.0f} MB of bf16 weights"


# ------------------------------------------------------------------------------------------ odd input
def test_one_pixel_and_extreme_aspect_ratios(runner_d):
    for w, h, tiling in [(1, 1, (1, 1)), (2000, 100, (1, 1)), (400, 3000, (11, 1)), (4000, 150, (1, 12))]:
        assert select_tiling(h - 112, w - 112, 224, 12) == tiling
        out = runner_d.process(np.full((h, w, 3), 128, np.uint8), "Describe this image.")
        n_img = int(((out.input_ids >= 1024)).sum())
        assert n_img == image_token_count(h, w)
        assert np.isfinite(out.images).all()
    assert select_tiling(480 - 112, 640 - 112, 224, 12) == (2, 3)


def test_grayscale_rgba_and_exif_become_rgb():
    gray = Image.fromarray(np.arange(64 * 32, dtype=np.uint16).reshape(32, 64).astype(np.uint8), "L")
    rgb = load_image(gray)
    assert rgb.shape == (32, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 0  # fully transparent: the official conversion keeps the RGB values
    assert (load_image(Image.fromarray(rgba, "RGBA")) == 200).all()
    img = Image.fromarray(_image(40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert load_image(buf.getvalue()).shape == (40, 20, 3)


def test_bad_files_are_refused_quickly(tmp_path, runner_d):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    with pytest.raises(MolmoInputError, match="empty"):
        runner_d.process(tmp_path / "empty.jpg", "hi")
    with pytest.raises(MolmoInputError, match="not a readable image"):
        runner_d.process(tmp_path / "corrupt.jpg", "hi")
    # A 20000x20000 PNG: the header is enough to refuse it; nothing is decoded.
    Image.new("L", (20000, 20000)).save(tmp_path / "huge.png", optimize=False, compress_level=1)
    import time

    t = time.perf_counter()
    with pytest.raises(MolmoInputError, match="huge.png is 400 megapixels; the limit is 100 megapixels"):
        runner_d.process(tmp_path / "huge.png", "hi")
    assert time.perf_counter() - t < 1.0


def test_empty_and_too_long_prompts(runner_d):
    with pytest.raises(MolmoInputError, match="prompt is empty"):
        runner_d.process(None, "   ")
    with pytest.raises(MolmoInputError, match="context holds 4096"):
        runner_d.process(None, "word " * 5000)


# ------------------------------------------------------------------------------------------ quantization
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_decoder_only(tiny, mode):
    bnb = pytest.importorskip("bitsandbytes")
    ref = molmo_core.load(tiny["d"], device="cpu", dtype=torch.bfloat16)
    q = molmo_core.load(tiny["d"], device="cpu", dtype=torch.bfloat16, quantize=mode)
    block = q.model.transformer.blocks[0]
    kind = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    assert isinstance(block.att_proj, kind) and isinstance(block.attn_out, kind) and isinstance(block.ff_proj, kind)
    # bitsandbytes' CPU 4-bit kernels need in_features % 64 == 0; the tiny ff_out (96 inputs) stays bf16.
    assert isinstance(block.ff_out, kind) == (mode == "8bit")
    # Vision tower, connector, embeddings and LM head stay bf16 nn.Linear / tensors.
    assert type(q.model.vision_backbone.image_vit.patch_embedding) is torch.nn.Linear
    assert type(q.model.vision_backbone.image_projector.w1) is torch.nn.Linear
    assert type(q.model.transformer.ff_out) is torch.nn.Linear
    assert q.model.transformer.wte.embedding.dtype == torch.bfloat16
    assert q.memory_bytes() < ref.memory_bytes()
    inp = collate([q.process(_image(200, 150), "Point to the cup")])
    with torch.no_grad():
        a = ref.model(inp.input_ids, inp.images, inp.image_masks, inp.image_input_idx, last_only=True).float()
        b = q.model(inp.input_ids, inp.images, inp.image_masks, inp.image_input_idx, last_only=True).float()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > (0.99 if mode == "8bit" else 0.9), f"{mode} logits drifted: cosine {cos:.3f}"
    steps = list(generate_tokens(q.model, collate([q.process(None, "Hello")]), GenerationOptions(4, stop_on_eos=False)))
    assert len(steps) == 4 and all(t.shape == (1,) for t in steps)  # the quantized decoder decodes


def test_8bit_cast_message_is_dropped_and_no_global_warning_filter(tiny, caplog):
    pytest.importorskip("bitsandbytes")
    from molmo_core.quantize import BNB_MATMUL_LOGGER, CAST_MESSAGE

    code = ("import warnings, torch, bitsandbytes\n"
            "before = list(warnings.filters)\n"
            "import molmo_core, molmo_core.quantize\n"
            "print(warnings.filters == before)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("True"), out.stdout + out.stderr[-2000:]
    q = molmo_core.load(tiny["d"], device="cpu", dtype=torch.bfloat16, quantize="8bit")
    with caplog.at_level("WARNING"):
        q.generate(None, "Hello", max_new_tokens=2)
        import logging

        logging.getLogger(BNB_MATMUL_LOGGER).warning("another bitsandbytes message")
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if m.startswith(CAST_MESSAGE)]
    assert "another bitsandbytes message" in messages  # only that one message is dropped


# ------------------------------------------------------------------------------------------ serving
def test_concurrent_requests_are_batched_and_correct(runner_d):
    import threading

    reqs = [(_image(100 + 40 * i, 80 + 30 * i, i), f"Point to thing {i}") for i in range(6)] + [(None, "Hello"), (None, "Count")]
    alone = [runner_d.generate(img, p, max_new_tokens=8) for img, p in reqs]
    results: list = [None] * len(reqs)
    barrier = threading.Barrier(len(reqs))
    before = len(runner_d.scheduler.batch_sizes)

    def worker(i):
        barrier.wait()
        results[i] = runner_d.generate(reqs[i][0], reqs[i][1], max_new_tokens=8)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == alone
    assert max(runner_d.scheduler.batch_sizes[before:]) > 1, runner_d.scheduler.batch_sizes[before:]
    assert runner_d.generate_batch(reqs[:3], max_new_tokens=8) == alone[:3]


def test_per_row_options_in_one_batch(runner_d):
    opts = [GenerationOptions(3, stop_on_eos=False), GenerationOptions(9, stop_on_eos=False)]
    alone = ["".join(runner_d.scheduler.submit(runner_d.process(None, "Hello"), o)) for o in opts]
    inputs = [runner_d.process(None, "Hello") for _ in opts]  # processed first: the two submits land together
    before = len(runner_d.scheduler.batch_sizes)
    ta, tb = ["".join(s) for s in [runner_d.scheduler.submit(x, o) for x, o in zip(inputs, opts)]]
    assert runner_d.scheduler.batch_sizes[before:] == [2]  # both rows ran in one batch ...
    assert [ta, tb] == alone and tb.startswith(ta) and len(tb) > len(ta)  # ... each with its own max_new_tokens


@pytest.mark.slow
def test_compiled_decode_matches_eager(runner_d):
    from molmo_core.generation import can_compile

    if not can_compile(runner_d.model):
        pytest.skip("torch.compile needs a C++ compiler on CPU")
    batch = collate([runner_d.process(_image(100, 80), "Describe this image.")])
    opts = GenerationOptions(12, stop_on_eos=False)
    eager = [int(t[0]) for t in generate_tokens(runner_d.model, batch, opts)]
    compiled = [int(t[0]) for t in generate_tokens(runner_d.model, batch, opts, compile=True)]
    assert compiled == eager


def test_layer_split_placement_runs_and_matches(tmp_path):
    """Molmo-72B is split over GPUs by layer; on CPU the same code path runs with two 'devices'."""
    from molmo_core.weights import layer_placement, load_model

    folder = write_tiny_checkpoint(tmp_path / "d", "d")
    cfg = MolmoConfig.from_pretrained_dir(folder)
    place = layer_placement(cfg, ["gpu0", "gpu1"])
    assert [place(f"transformer.blocks.{i}.att_proj.weight") for i in range(3)] == ["gpu0", "gpu0", "gpu1"]
    assert place("vision_backbone.pad_embed") == "gpu0" and place("transformer.ff_out.weight") == "gpu1"
    model = load_model(folder, device="cpu", devices=[torch.device("cpu"), torch.device("cpu")])
    model._block_devices = [torch.device("cpu")] * 3  # force the per-block transfer path
    batch = collate([molmo_core.load(folder, device="cpu").process(_image(90, 120), "Count")])
    split = [int(t[0]) for t in generate_tokens(model, batch, GenerationOptions(6, stop_on_eos=False))]
    model._block_devices = None
    assert split == [int(t[0]) for t in generate_tokens(model, batch, GenerationOptions(6, stop_on_eos=False))]


def test_script_exits_cleanly_without_close(tmp_path):
    """The batching worker thread must not abort the interpreter at exit."""
    code = ("import molmo_core, threading\n"
            f"r = molmo_core.load({str(PARITY_D)!r}, device='cpu')\n"
            "print(r.generate(None, 'Hello', max_new_tokens=3) is not None)\n"
            "it = r.stream(None, 'Hello again', max_new_tokens=50); next(it, None)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "terminate called" not in p.stderr


def test_captioner_template_sends_the_prompt_verbatim(runner_d):
    wrapped = runner_d.process(None, "long_caption 65:")
    raw = runner_d.process(None, "long_caption 65:", template="none")
    tok = runner_d.tokenizer
    assert raw.input_ids.tolist() == [tok.special.bos] + tok.encode(" long_caption 65:")
    assert wrapped.input_ids.tolist() == [tok.special.bos] + tok.encode(" User: long_caption 65: Assistant:")
    verbatim, in_wrapper = ("".join(runner_d.scheduler.submit(x, GenerationOptions(4))).strip() for x in (raw, wrapped))
    assert verbatim != in_wrapper  # the two prompts give different answers here, so the check below can fail
    assert runner_d.generate(None, "long_caption 65:", template="none", max_new_tokens=4) == verbatim


def test_download_progress_reaches_the_callback():
    from molmo_core.weights import forwarding_tqdm

    seen = []
    cls = forwarding_tqdm(lambda f, m: seen.append((f, m)), "allenai/Molmo-7B-D-0924")
    bar = cls(total=4, desc="Fetching 4 files", file=io.StringIO())
    bar.update(1)
    bar.update(3)
    bar.close()
    assert [f for f, _ in seen] == [0.25, 1.0]
    assert "allenai/Molmo-7B-D-0924" in seen[-1][1] and "4/4" in seen[-1][1]


def test_layers_are_split_over_gpus_only_when_one_gpu_is_too_small(monkeypatch):
    from molmo_core.api import fits_one_gpu

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (80 * 2**30, 80 * 2**30))  # one 80 GB card
    assert fits_one_gpu(MolmoConfig.from_name("Molmo-7B-D-0924"), torch.bfloat16, None)
    assert not fits_one_gpu(MolmoConfig.from_name("Molmo-72B-0924"), torch.bfloat16, None)  # ~147 GB in bf16
    assert fits_one_gpu(MolmoConfig.from_name("Molmo-72B-0924"), torch.bfloat16, "4bit")
