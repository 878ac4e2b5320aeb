"""Inference speed and memory, every optimisation against the plain eager path measured in the same run.

    python -m bench.speed --config mid                       # CPU, ~135 M-parameter dense model
    python -m bench.speed --config 7b-d --device cuda        # real Molmo-7B-D shapes, random bf16 weights
    python -m bench.speed --config 7b-d --device cuda --quantize 4bit

Weights are random (nothing is downloaded); shapes and code paths are the real ones. Printed:
  * time to first token (TTFT) for one 12-crop image (1024x768 -> 3x4 tiling + global view);
  * decode tokens/s at batch 1 and 8: eager without KV cache (baseline: a full forward per token),
    eager with the static KV cache, compiled static-cache step (torch.compile; CUDA graphs on GPU);
  * peak memory (host RSS on CPU, allocated VRAM on GPU) and, on GPU, the memory-bandwidth bound:
    bytes of weights read per decode step / bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from molmo_core.config import ConnectorConfig, MolmoConfig, TextConfig
from molmo_core.generation import Batch, GenerationOptions, can_compile, collate, generate_tokens
from molmo_core.model import Molmo
from molmo_core.preprocessing import ProcessedInput, SpecialTokens, process_image
from molmo_core.text import SparseMoE
from molmo_core.tiny import VARIANTS, init_random_

# MolmoE's routing (64 experts, top 8, QK-norm) at a width a CPU handles: ~1 B parameters in float32.
MID_E = MolmoConfig(text=TextConfig(d_model=1024, n_layers=8, n_heads=16, n_kv_heads=16, head_dim=64, mlp_hidden=1024,
                                    vocab_size=32768, embedding_size=32768, rope_theta=1e4, norm_eps=1e-5,
                                    qkv_bias=False, qk_norm=True, moe_num_experts=64, moe_top_k=8,
                                    moe_expert_hidden=512),
                    vision=VARIANTS["mid"].vision, connector=ConnectorConfig(projector_hidden=1024), resize="torch",
                    crop_mask="moe")
CONFIGS = {"tiny": VARIANTS["d"], "mid": VARIANTS["mid"], "mid-e": MID_E,
           "7b-d": MolmoConfig.from_name("Molmo-7B-D-0924"),
           "7b-o": MolmoConfig.from_name("Molmo-7B-O-0924"), "72b": MolmoConfig.from_name("Molmo-72B-0924"),
           "1b-e": MolmoConfig.from_name("MolmoE-1B-0924")}
BANDWIDTH_GBS = {"H100": 3350, "H200": 4800, "A100": 2039, "L40S": 864, "4090": 1008, "3090": 936}


@contextlib.contextmanager
def old_expert_loop():
    """MolmoE's previous decode path, as the baseline: the per-expert Python loop for every call."""
    orig = SparseMoE.stacked
    SparseMoE.stacked = lambda self: None
    try:
        yield
    finally:
        SparseMoE.stacked = orig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024


def build(config: MolmoConfig, device: torch.device, dtype: torch.dtype, quantize: str | None) -> Molmo:
    if device.type == "cuda":
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # created in `dtype` on the GPU: no float32 copy of a 7B model
        try:
            with torch.device(device):
                model = Molmo(config)
        finally:
            torch.set_default_dtype(default)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    else:
        model = Molmo(config)
        init_random_(model)
        model = model.to(dtype)
    if quantize:
        from molmo_core.quantize import make_quantizer

        q = make_quantizer(quantize, dtype, lambda name: device)
        weights = {n: p.detach() for n, p in model.named_parameters()}
        q.prepare(model)
        for name in list(weights):
            if q.wants(name):
                q(model, name, weights[name].cpu())
            else:
                module, _, attr = name.rpartition(".")
                model.get_submodule(module)._parameters[attr] = torch.nn.Parameter(weights[name], requires_grad=False)
        del weights
    return model.eval().requires_grad_(False)  # frozen, as loaded for inference (MolmoE then stacks its experts)


def fake_inputs(config: MolmoConfig, batch: int, image: bool, hw: tuple[int, int] = (768, 1024)) -> Batch:
    """Token ids from the real layout (random text tokens), crops from a random image (1024x768: 12 crops
    + the global view)."""
    V = config.text.vocab_size
    sp = SpecialTokens(V, V + 1, V + 2, V + 3, V + 4, bos=V - 1, eos=V - 1)
    rng = np.random.default_rng(0)
    items = []
    for b in range(batch):
        text = rng.integers(0, V - 8, 24).tolist()
        if not image:
            items.append(ProcessedInput(np.array([sp.bos] + text), None, None, None))
            continue
        img = process_image(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), special=sp,
                            crop_size=config.vision.image_size, patch=config.vision.patch_size)
        ids = np.concatenate([[sp.bos], img.image_tokens, text])
        idx = np.where(img.patch_positions >= 0, img.patch_positions + 1, -100)
        items.append(ProcessedInput(ids, img.images, img.image_masks, idx))
    return collate(items)


def weight_bytes_per_token(model: Molmo) -> int:
    """Bytes read by one decode step: every decoder weight once (the ViT does not run while decoding;
    only one embedding row is read, the whole LM head is)."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("vision_backbone") or name.startswith("transformer.wte"):
            continue
        total += p.numel() * p.element_size()
    for name, b in model.named_buffers():
        total += b.numel() * b.element_size() if "blocks" in name else 0
    return total


def time_decode(model: Molmo, batch: Batch, n: int, *, cache: bool, compile: bool, device) -> float:
    """Decode tokens/s (all rows) after the prefill, over n steps."""
    opts = GenerationOptions(max_new_tokens=n + 1, stop_on_eos=False)
    if not cache:
        b = batch.to(device, model.dtype)
        ids = b.input_ids
        with torch.inference_mode():
            ids = torch.cat([ids, model(ids, b.images, b.image_masks, b.image_input_idx, last_only=True)[:, -1].argmax(-1)[:, None]], 1)
            sync(device)
            t = time.perf_counter()
            for _ in range(n):
                tok = model(ids, b.images, b.image_masks, b.image_input_idx, last_only=True)[:, -1].argmax(-1)
                ids = torch.cat([ids, tok[:, None]], 1)
            sync(device)
        return n * ids.shape[0] / (time.perf_counter() - t)
    it = generate_tokens(model, batch, opts, compile=compile)
    next(it)  # prefill + first token
    sync(device)
    t = time.perf_counter()
    steps = 0
    for _ in it:
        steps += 1
    sync(device)
    return steps * batch.input_ids.shape[0] / (time.perf_counter() - t)


def time_to_first_token(model: Molmo, batch: Batch, device, repeats: int = 3) -> float:
    opts = GenerationOptions(max_new_tokens=1, stop_on_eos=False)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        next(generate_tokens(model, batch, opts))
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def main(config: str = "mid", device: str = "cpu", quantize: str | None = None, steps: int = 16,
         baseline_steps: int = 4, no_compile: bool = False, bandwidth_gbs: float | None = None) -> None:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = CONFIGS[config]
    torch.manual_seed(0)
    model = build(cfg, dev, dtype, quantize)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config {config}: {n_params / 1e6:.0f} M parameters, {dev}, {str(dtype).split('.')[-1]}"
          f"{', ' + quantize if quantize else ''}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    img1 = fake_inputs(cfg, 1, image=True)
    print(f"prompt: {img1.input_ids.shape[1]} tokens (12-crop image + 24 text tokens)")
    ttft = time_to_first_token(model, img1, dev)
    print(f"time to first token (1 image, 13 crops): {ttft * 1e3:.0f} ms "
          f"(prefill {img1.input_ids.shape[1] / ttft:.0f} tokens/s incl. the ViT over 13 crops)")

    rows = []
    for bsz in (1, 8):
        batch = fake_inputs(cfg, bsz, image=True) if bsz == 1 else fake_inputs(cfg, bsz, image=False)
        label = "image prompt" if bsz == 1 else "text prompts"
        base = time_decode(model, batch, baseline_steps, cache=False, compile=False, device=dev)
        rows.append((bsz, label, "eager, no KV cache (baseline)", base, 1.0))
        if cfg.text.is_moe:
            with old_expert_loop():
                loop = time_decode(model, batch, steps, cache=True, compile=False, device=dev)
            rows.append((bsz, label, "eager, cache, expert loop (old)", loop, loop / base))
        eager = time_decode(model, batch, steps, cache=True, compile=False, device=dev)
        rows.append((bsz, label, "eager, static KV cache", eager, eager / base))
        if not no_compile and can_compile(model):
            time_decode(model, batch, steps, cache=True, compile=True, device=dev)  # compile + warm-up (same shapes)
            comp = time_decode(model, batch, steps, cache=True, compile=True, device=dev)
            rows.append((bsz, label, "compiled, static KV cache", comp, comp / base))
    print(f"\n{'batch':>5}  {'prompt':<13} {'path':<31} {'tokens/s':>10} {'x baseline':>11}")
    for bsz, label, path, tps, ratio in rows:
        print(f"{bsz:>5}  {label:<13} {path:<31} {tps:>10.1f} {ratio:>10.2f}x")
    best = {b: max(r[3] for r in rows if r[0] == b) for b in (1, 8)}
    print(f"\nbatch-8 aggregate / batch-1 (best paths): {best[8] / best[1]:.2f}x")
    print(f"peak memory: {peak_memory(dev) / 2**30:.2f} GiB")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        bw = bandwidth_gbs or next((v for k, v in BANDWIDTH_GBS.items() if k in name), None)
        per_tok = weight_bytes_per_token(model)
        if bw:
            bound = bw * 1e9 / per_tok
            print(f"bandwidth bound ({name}, {bw} GB/s, {per_tok / 1e9:.2f} GB/step): {bound:.0f} tokens/s; "
                  f"batch-1 best = {best[1] / bound:.0%} of the bound")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mid", choices=sorted(CONFIGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quantize", choices=["8bit", "4bit"])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--baseline-steps", type=int, default=4)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--bandwidth-gbs", type=float)
    a = p.parse_args()
    main(config=a.config, device=a.device, quantize=a.quantize, steps=a.steps, baseline_steps=a.baseline_steps,
         no_compile=a.no_compile, bandwidth_gbs=a.bandwidth_gbs)
