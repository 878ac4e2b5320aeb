"""Molmo2 on the CPU: our path (own preprocessing + transformers' model and `generate`, no torchvision) against
plain transformers (`Molmo2Processor` + `generate`), measured in the same run on the same images.

    .venv/bin/python -m bench.molmo2_speed                          # tiny random size-a checkpoint (378-px crops)
    .venv/bin/python -m bench.molmo2_speed --model DIR --n 8 --max-new-tokens 32 --threads 2

transformers' processor needs torchvision, which is not installed in .venv (the PyPI wheel is a CUDA build
that crashes next to the CPU torch); the baseline runs in a subprocess with the test-only copy from
`scripts/setup.sh --test` (.ref/torchvision) on PYTHONPATH and the same number of threads. Per image the
fastest of --repeat runs after a warm-up, then the median over the images; "end to end" is preprocessing +
greedy generation of --max-new-tokens tokens. Both sides generate the same tokens (the parity tests prove the
inputs identical).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Point to the brightest spot."

BASELINE = r'''
import json, statistics, sys, time
import torch
try:
    torch.ops.torchvision.nms
except (AttributeError, RuntimeError):
    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
from PIL import Image
from transformers import AutoProcessor, Molmo2ForConditionalGeneration
model_dir, images, prompt, new, threads, REPEAT = json.loads(sys.argv[1])
torch.set_num_threads(threads)
proc = AutoProcessor.from_pretrained(model_dir)
model = Molmo2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
def run(path):
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.open(path)},
                                         {"type": "text", "text": prompt}]}]
    t0 = time.perf_counter()
    x = proc.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**x, max_new_tokens=new, do_sample=False)
    return t1 - t0, time.perf_counter() - t0, out[0, x["input_ids"].shape[1]:].tolist()
proc_s, total_s, tokens = [], [], []
for p in images:
    run(p)
    runs = [run(p) for _ in range(REPEAT)]
    proc_s.append(min(r[0] for r in runs)); total_s.append(min(r[1] for r in runs)); tokens.append(runs[0][2])
print(json.dumps({"processor": statistics.median(proc_s), "end_to_end": statistics.median(total_s), "tokens": tokens}))
'''


def ours(model_dir: str, images: list[str], new: int, repeat: int) -> dict:
    import torch
    from PIL import Image

    from molmo_core.molmo2 import load_molmo2

    runner = load_molmo2(model_dir, device="cpu")
    proc_s, total_s, tokens = [], [], []
    for path in images:
        runs = []
        for _ in range(1 + repeat):  # a warm-up, then the measured runs (the fastest counts)
            t0 = time.perf_counter()
            x = runner.process(Image.open(path), PROMPT)
            t1 = time.perf_counter()
            with torch.inference_mode():
                toks = runner.generate_ids(x, new)
            runs.append((t1 - t0, time.perf_counter() - t0))
        proc_s.append(min(r[0] for r in runs[1:]))
        total_s.append(min(r[1] for r in runs[1:]))
        tokens.append(toks)
    runner.close()
    return {"processor": statistics.median(proc_s), "end_to_end": statistics.median(total_s), "tokens": tokens}


def baseline(model_dir: str, images: list[str], new: int, threads: int, ref: Path, repeat: int) -> dict | None:
    if not (ref / "torchvision").is_dir():
        print(f"baseline skipped: no test-only torchvision in {ref} (run scripts/setup.sh --test)")
        return None
    env = dict(os.environ, PYTHONPATH=str(ref), HF_HUB_OFFLINE="1")
    arg = json.dumps([model_dir, images, PROMPT, new, threads, repeat])
    r = subprocess.run([sys.executable, "-c", BASELINE, arg], env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"baseline failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Molmo2 checkpoint folder (default: a tiny random size-a one)")
    p.add_argument("--n", type=int, default=6, help="number of images (varied sizes)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3, help="measured runs per image (the fastest counts)")
    p.add_argument("--ref", default=str(ROOT / ".ref" / "torchvision"))
    a = p.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = a.model
        if model_dir is None:
            from molmo_core.molmo2.tiny import write_tiny_molmo2

            model_dir = str(write_tiny_molmo2(work / "tiny-a", "a"))
        rng = np.random.default_rng(0)
        sizes = [(480, 640), (720, 1280), (300, 300), (1000, 700), (200, 1100), (60, 100)]
        images = []
        for k in range(a.n):
            h, w = sizes[k % len(sizes)]
            path = work / f"img{k}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            images.append(str(path))
        print(f"molmo2_speed: model={a.model or 'tiny size a (random)'} images={a.n} "
              f"max_new_tokens={a.max_new_tokens} threads={threads} device=cpu")
        mine = ours(model_dir, images, a.max_new_tokens, a.repeat)
        base = baseline(model_dir, images, a.max_new_tokens, threads, Path(a.ref), a.repeat)
    print(f"ours (no torchvision): processor {mine['processor'] * 1e3:.1f} ms, "
          f"end to end {mine['end_to_end'] * 1e3:.1f} ms (medians)")
    if base:
        print(f"transformers (Molmo2Processor + generate): processor {base['processor'] * 1e3:.1f} ms, "
              f"end to end {base['end_to_end'] * 1e3:.1f} ms")
        print(f"ratio transformers / ours: processor {base['processor'] / mine['processor']:.2f}x, "
              f"end to end {base['end_to_end'] / mine['end_to_end']:.2f}x")
        same = [m == b[:len(m)] for m, b in zip(mine["tokens"], base["tokens"])]
        print(f"same greedy tokens: {sum(same)}/{len(same)}")
    return {"ours": mine, "transformers": base}


if __name__ == "__main__":
    main()
