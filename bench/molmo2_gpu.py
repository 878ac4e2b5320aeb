"""Molmo2 at real shapes (random bf16 weights): the `molmo2` section of bench/gpu.py.

For Molmo2-4B and Molmo2-8B shapes (transformers' native `Molmo2ForConditionalGeneration`, built on the GPU
from config classes; the tiny tokenizer's ids stand in for the real vocabulary, which changes no shape):
our preprocessing time for a 1024x768 image (8 crops + the global view), time to first token, decode
tokens/s at batch 1 (that image) and batch 8 (text prompts) with transformers' `generate` and its default
dynamic cache (what our Molmo2Runner runs), peak VRAM, and the share of the bandwidth bound. In the same run, Molmo v1 7B-D through
our implementation (eager static cache) on the same image, as the baseline. The dry run uses the tiny
size-a Molmo2 on the CPU.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

# Text / adapter shapes from the hub configs (Molmo2-4B: Qwen3-4B; Molmo2-8B: Qwen3-8B); the vision tower is
# the same SigLIP 2 so400m (25 of 27 layers used) for both.
SIZES = {
    "molmo2-4b": dict(text=dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                                num_key_value_heads=8, head_dim=128, intermediate_size=9728),
                      adapter_intermediate=9728),
    "molmo2-8b": dict(text=dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                                num_key_value_heads=8, head_dim=128, intermediate_size=12288),
                      adapter_intermediate=18944),
}
VOCAB = 151936
PROMPT = "Point to the red square."


def available() -> str | None:
    """None, or why the section cannot run (no Molmo2 in this transformers)."""
    try:
        import transformers
        from transformers import Molmo2Config, Molmo2ForConditionalGeneration  # noqa: F401
    except ImportError as e:
        import transformers

        return f"transformers {transformers.__version__} has no Molmo2 ({e})"
    return None


def config(size: str, dry_run: bool):
    from transformers import Molmo2Config

    from molmo_core.molmo2.tiny import IMAGE_SPECIALS, TEXT_VOCAB, build_config

    if dry_run:
        return build_config("a")
    s = SIZES[size]
    ids = {t: TEXT_VOCAB + i for i, t in enumerate(IMAGE_SPECIALS)}  # inside the embedding table, as in the hub
    text = dict(s["text"], vocab_size=VOCAB, additional_vocab_size=128, max_position_embeddings=36864,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6})
    return Molmo2Config(
        vision_config={}, text_config=text,
        adapter_config=dict(intermediate_size=s["adapter_intermediate"], text_hidden_size=text["hidden_size"]),
        image_start_token_id=ids["<im_start>"], low_res_image_start_token_id=ids["<low_res_im_start>"],
        image_end_token_id=ids["<im_end>"], image_patch_id=ids["<im_patch>"],
        frame_start_token_id=ids["<frame_start>"], frame_end_token_id=ids["<frame_end>"])


def build(cfg, device: torch.device, dtype: torch.dtype):
    from transformers import Molmo2ForConditionalGeneration

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Molmo2ForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():  # small random weights: finite activations through 36 layers
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def preprocessor(dry_run: bool):
    from molmo_core.molmo2.processing import ImageSettings, Molmo2Preprocessor
    from molmo_core.molmo2.tiny import build_tokenizer

    tok = build_tokenizer()
    if dry_run:
        return Molmo2Preprocessor(tok, ImageSettings(max_crops=2))  # the tiny checkpoints keep 378-px crops
    return Molmo2Preprocessor(tok)  # the real geometry: 378-px crops, up to 8 + the global view


def _gen(model, inputs: dict, n: int, **kw) -> float:
    from bench.speed import sync

    sync(model.device)
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    sync(model.device)
    return time.perf_counter() - t


def decode_rate(model, inputs: dict, steps: int, batch: int, **kw) -> float:
    """Tokens/s over `steps` decode steps (time of steps+1 tokens minus the time of 1: the prefill)."""
    _gen(model, inputs, 2, **kw)  # warm-up (and compile, with a static cache)
    first = statistics.median(_gen(model, inputs, 1, **kw) for _ in range(2))
    whole = statistics.median(_gen(model, inputs, steps + 1, **kw) for _ in range(2))
    return batch * steps / (whole - first) if whole > first else float("nan")


def weight_bytes(model) -> int:
    """Bytes one decode step reads: the language model and its head (the ViT and adapter do not run)."""
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    skip = {id(p) for n, p in model.named_parameters() if "vision" in n or "projector" in n or "adapter" in n}
    total = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)
    emb = lm.get_input_embeddings().weight if hasattr(lm, "get_input_embeddings") else None
    if emb is not None:
        total -= emb.numel() * emb.element_size()  # one row read per token
    return total


def measure(size: str, run, res: dict) -> None:
    from bench.speed import peak_memory

    dev, dtype = run.device, run.dtype
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    cfg = config(size, run.dry_run)
    t = time.monotonic()
    model = build(cfg, dev, dtype)
    res["build_s"] = round(time.monotonic() - t, 1)
    res["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    proc = preprocessor(run.dry_run)
    rgb = np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        x = proc(PROMPT, images=rgb)
        times.append(time.perf_counter() - t)
    res["preprocess_ms"] = round(statistics.median(times) * 1e3, 1)
    image_inputs = {k: x[k].to(dev) for k in x.keys()}
    res["prompt_tokens"] = int(image_inputs["input_ids"].shape[1])
    _gen(model, image_inputs, 1)
    res["ttft_ms"] = round(statistics.median(_gen(model, image_inputs, 1) for _ in range(3)) * 1e3, 1)
    text = proc("Describe a busy street market at noon in detail.", images=None)
    text_inputs = {k: text[k].to(dev).repeat(8, *[1] * (text[k].dim() - 1)) for k in text.keys()}
    steps = run.steps
    res["decode_b1"] = round(decode_rate(model, image_inputs, steps, 1), 1)
    res["decode_b8"] = round(decode_rate(model, text_inputs, steps, 8), 1)
    res["peak_gib"] = round(peak_memory(dev) / 2**30, 2)
    bw = run.results["sections"].get("env", {}).get("bandwidth_gbs")
    res["weight_gb_per_step"] = round(weight_bytes(model) / 1e9, 2)
    if bw:
        bound = bw * 1e9 / weight_bytes(model)
        res["bound_b1_tok_s"] = round(bound, 1)
        res["b1_share_of_bound"] = round(res["decode_b1"] / bound, 3)
    del model


def v1_baseline(run, res: dict) -> None:
    """Molmo v1 7B-D through our implementation, eager static cache, in the same run."""
    from bench.gpu import decode_rates, random_model, ttft_ms

    model = random_model(run, "7b-d", res)
    res["ttft_ms"] = ttft_ms(run, model)
    decode_rates(run, model, res, compile=False)
    del model
