"""Parity dump: run one (image, prompt) through the production path and save the arrays the official
reference vectors hold.

    python -m molmo_core.dump --model DIR --image FILE|none --prompt TEXT [--max-crops N] --out FILE.npz

Arrays: input_ids, image_input_idx, image_masks, images (the crops), logits (one forward pass, float32,
all positions) and greedy (16 greedy token ids, KV cache, no EOS stopping). Everything in float32 on CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from . import api
from .generation import GenerationOptions, collate, generate_tokens


def dump(model_dir: str | Path, image, prompt: str, max_crops: int = 12, n_greedy: int = 16) -> dict[str, np.ndarray]:
    runner = api.load(model_dir, device="cpu", dtype=torch.float32, max_crops=max_crops)
    return dump_with(runner, image, prompt, max_crops, n_greedy)


@torch.inference_mode()
def dump_with(runner: api.MolmoRunner, image, prompt: str, max_crops: int = 12, n_greedy: int = 16) -> dict[str, np.ndarray]:
    inputs = runner.process(image, prompt, max_crops=max_crops)
    batch = collate([inputs])
    model = runner.model
    logits = model(batch.input_ids, batch.images, batch.image_masks, batch.image_input_idx)[0]
    opts = GenerationOptions(max_new_tokens=n_greedy, stop_on_eos=False)
    greedy = [int(t[0]) for t in generate_tokens(model, batch, opts)]
    out = {"input_ids": inputs.input_ids.astype(np.int64), "logits": logits.float().numpy(),
           "greedy": np.array(greedy, dtype=np.int64)}
    if inputs.images is not None:
        out.update(images=inputs.images, image_masks=inputs.image_masks, image_input_idx=inputs.image_input_idx)
    return out


def main(model: str, image: str, prompt: str, out: str, max_crops: int = 12) -> None:
    arrays = dump(model, None if image.lower() == "none" else image, prompt, max_crops)
    np.savez(out, **arrays)
    print(f"wrote {out}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder or hub id")
    p.add_argument("--image", required=True, help="image file, or 'none' for a text-only prompt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-crops", type=int, default=12)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    main(model=a.model, image=a.image, prompt=a.prompt, out=a.out, max_crops=a.max_crops)
