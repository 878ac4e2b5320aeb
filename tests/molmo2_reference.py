"""Reference outputs from transformers' own Molmo2Processor, for tests/test_molmo2_parity.py.

transformers' Molmo2 image/video processors need torchvision. PyPI's torchvision is a CUDA build that crashes
next to the CPU torch (and breaks `import peft` once installed), so it is never installed into .venv; the
test setup puts it in `.ref/torchvision` (scripts/setup.sh --test) and the tests run this script in a
subprocess with that folder on PYTHONPATH:

    PYTHONPATH=.ref/torchvision .venv/bin/python tests/molmo2_reference.py SPEC.json OUT_DIR

The shim from molmo2.md section 1.9 is applied first, in this process only. SPEC.json lists cases (checkpoint
folder, prompt, history, image files, video .npy + fps, max_crops, template); for each case OUT_DIR/<name>.pt
holds the processor's tensors and the rendered prompt. Nothing here imports molmo_core: the reference is
independent of the code under test. (The model needs no torchvision: the tests run transformers' model and
`generate` on these reference inputs in their own process.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def torchvision_shim() -> None:
    """Register the two ops the CUDA torchvision wheel's meta registrations expect (molmo2.md section 1.9)."""
    import torch

    try:
        torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        torchvision_shim.lib = lib  # keep the registration alive


def messages(case: dict, images: list, video) -> list[dict]:
    """The conversation in transformers' chat format; media on the first user turn."""
    msgs = []
    for q, a in case.get("history", []):
        msgs.append({"role": "user", "content": [{"type": "text", "text": q}]})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    msgs.append({"role": "user", "content": [{"type": "text", "text": case["prompt"]}]})
    media = [{"type": "image", "image": im} for im in images]
    if video is not None:
        media.append({"type": "video", "video": video})
    msgs[0]["content"] = media + msgs[0]["content"]
    return msgs


def run_case(case: dict, proc) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from transformers.video_utils import VideoMetadata

    images = [Image.open(p) for p in case.get("images", [])]
    for im in images:
        im.load()
    video = case.get("video")
    frames = np.load(video["npy"]) if video else None
    bos = proc.tokenizer.bos_token or proc.tokenizer.eos_token
    kwargs = {"return_tensors": "pt"}
    if case.get("max_crops"):
        kwargs["images_kwargs"] = {"max_crops": case["max_crops"]}
    if case.get("template") == "none":
        text = "".join("<|image|>" for _ in images) + ("<|video|>" if video else "") + case["prompt"]
    else:
        text = proc.apply_chat_template(messages(case, images, frames), tokenize=False, add_generation_prompt=True)
    if not case.get("template") == "none" and text.startswith(bos):
        kwargs["add_special_tokens"] = False  # as apply_chat_template(tokenize=True) does
    t0 = time.perf_counter()
    if video:
        meta = VideoMetadata(total_num_frames=len(frames), fps=video["fps"])
        # as a torch tensor: with a numpy video, transformers 5.23 indexes it with a 1-element index tensor when
        # one frame is sampled, numpy takes that as a scalar index, and the frame axis is lost (a crash)
        inputs = proc(text=text, videos=[torch.from_numpy(frames)], video_metadata=[meta], **kwargs)
    else:
        inputs = proc(text=text, images=images or None, **kwargs)
    seconds = time.perf_counter() - t0
    out = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    out["rendered"] = text
    out["seconds"] = seconds
    return out


def main(spec_file: str, out_dir: str) -> None:
    torchvision_shim()
    import torch
    from transformers import AutoProcessor

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(int(spec.get("threads", 1)))
    out = Path(out_dir)
    procs: dict = {}
    for case in spec["cases"]:
        ck = case["checkpoint"]
        if ck not in procs:
            procs[ck] = AutoProcessor.from_pretrained(ck)
        torch.save(run_case(case, procs[ck]), out / f"{case['name']}.pt")
    (out / "done.json").write_text(json.dumps({"cases": len(spec["cases"]),
                                               "processor": type(next(iter(procs.values()))).__name__}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
