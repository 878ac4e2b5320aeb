"""One MolmoE layer's experts at decode sizes: the per-expert loop (the previous path, the baseline) against
the stacked-expert paths, in the same run (best of 7 each).

    python -m bench.moe                          # CPU, float32, MolmoE-1B widths (d 2048, 64 experts, top 8)
    python -m bench.moe --device cuda --dtype bfloat16

Which path the model takes: grouped GEMM where torch._grouped_mm runs (CPU; Hopper GPUs in bf16), else
gathered (few rows) or dense (decode batches); see molmo_core/text.py SparseMoE.
"""

from __future__ import annotations

import argparse
import time

import torch

from molmo_core.config import TextConfig
from molmo_core.text import SparseMoE


def best_ms(fn, device: torch.device, repeats: int = 7) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


@torch.inference_mode()
def main(device: str = "cpu", dtype: str = "float32", d_model: int = 2048, hidden: int = 1024) -> None:
    dev, dt = torch.device(device), getattr(torch, dtype)
    torch.manual_seed(0)
    moe = SparseMoE(TextConfig(d_model=d_model, moe_num_experts=64, moe_top_k=8, moe_expert_hidden=hidden))
    moe = moe.to(dev, dt).requires_grad_(False)
    w_gu, w_down = moe.stacked()
    paths = {"loop (old)": lambda h, w, c: moe._loop(h, w, c),
             "gathered": lambda h, w, c: moe._gathered(h, w, c, w_gu, w_down),
             "dense": lambda h, w, c: moe._dense(h, w, c, w_gu, w_down)}
    if moe._stack[3]:
        paths["grouped"] = lambda h, w, c: moe._grouped(h, w, c, w_gu, w_down)
    print(f"one MolmoE layer, d {d_model}, 64 experts x {hidden}, top 8, {dev}, {dtype}, "
          f"{torch.get_num_threads()} threads; ms (best of 7) and speed-up over the loop")
    print(f"{'tokens':>6}  " + "  ".join(f"{name:>18}" for name in paths))
    for n in (1, 8, 64):
        h = torch.randn(n, d_model, device=dev, dtype=dt)
        weights, chosen = torch.softmax(moe.gate(h).float(), -1).topk(8)
        weights = weights.to(dt)
        times = {name: best_ms(lambda f=f: f(h, weights, chosen), dev) for name, f in paths.items()}
        base = times["loop (old)"]
        print(f"{n:>6}  " + "  ".join(f"{t:>9.2f} ({base / t:>4.2f}x)" for t in times.values()))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args()
    main(a.device, a.dtype)
