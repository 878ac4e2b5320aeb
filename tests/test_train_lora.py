"""LoRA / QLoRA on CPU, adapter merging through the official format, and the length hint's effect."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import molmo_core
from molmo_core.train import TrainArgs, Trainer
from molmo_core.train.lora import load_adapter


pytestmark = pytest.mark.usefixtures("one_thread")


def write_records(folder: Path, rows: list[tuple[int, str]]) -> Path:
    for i in {i for i, _ in rows}:
        rng = np.random.default_rng(100 + i)
        Image.fromarray((rng.random((40, 56, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps({"image": f"img{i}.png", "caption": c}) + "\n" for i, c in rows))
    return path


def args_for(ckpt: Path, data: Path, out: Path, **kw) -> TrainArgs:
    base = dict(model=str(ckpt), data=[str(data)], out=str(out), lr=3e-3, max_crops=1, batch_size=4, grad_accum=1,
                warmup=0, eval_fraction=0.0, save_every=0, gradient_checkpointing=False, lora_rank=8)
    base.update(kw)
    return TrainArgs(**base)


def logits(model, runner, image: Path, prompt: str) -> torch.Tensor:
    x = runner.process(str(image), prompt, template="none")
    with torch.no_grad():
        return model(torch.from_numpy(x.input_ids)[None], torch.from_numpy(x.images)[None],
                     torch.from_numpy(x.image_masks)[None], torch.from_numpy(x.image_input_idx)[None].long())


def test_lora_merge_roundtrip_matches_base_plus_adapter(ckpt, tmp_path):
    data = write_records(tmp_path, [(0, "a red cup"), (1, "two dogs"), (2, "a blue car"), (3, "a white cat")])
    out = tmp_path / "run"
    t0 = time.perf_counter()
    result = Trainer(args_for(ckpt, data, out, mode="lora", lora_connector=True, max_steps=6, eval_fraction=0.25,
                              eval_every=3), log=lambda s: None).run()
    print(f"lora: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in 6 steps, "
          f"{time.perf_counter() - t0:.1f} s; eval {result.eval_losses}")
    assert result.losses[-1] < result.losses[0] and result.eval_losses
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    merged = molmo_core.load(out / "final", device="cpu", max_crops=1)
    base = molmo_core.load(ckpt, device="cpu", max_crops=1)
    plain = logits(base.model, base, tmp_path / "img0.png", "long_caption 1:")
    load_adapter(base.model, out / "adapter")
    with_adapter = logits(base.model.eval(), base, tmp_path / "img0.png", "long_caption 1:")
    from_merged = logits(merged.model, merged, tmp_path / "img0.png", "long_caption 1:")
    assert (with_adapter - plain).abs().max() > 1e-2  # the adapter does something...
    torch.testing.assert_close(from_merged, with_adapter, rtol=1e-4, atol=1e-4)  # ...and merging keeps it


def test_qlora_runs_on_cpu(ckpt, tmp_path):
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        pytest.skip(f"bitsandbytes cannot be imported here ({e}); QLoRA needs it")
    data = write_records(tmp_path, [(0, "a red cup"), (1, "two dogs"), (2, "a blue car"), (3, "a white cat")])
    out = tmp_path / "run"
    t = Trainer(args_for(ckpt, data, out, mode="qlora", max_steps=8), log=lambda s: None)
    result = t.run()
    import bitsandbytes as bnb

    assert isinstance(t.molmo.transformer.blocks[0].att_proj.base_layer, bnb.nn.Linear4bit)
    print(f"qlora: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in 8 steps")
    assert all(np.isfinite(result.losses)) and result.losses[-1] < 0.8 * result.losses[0]
    runner = molmo_core.load(out / "final", device="cpu", max_crops=1)  # merged into full-precision weights
    assert isinstance(runner.generate(tmp_path / "img0.png", "long_caption 0:", max_new_tokens=4, template="none"), str)


def test_length_hint_changes_output_length(ckpt, tmp_path):
    """One image with a short (5 chars, hint 0) and a long (57 chars, hint 3) caption: after training, the
    hint alone decides how long the generated caption is."""
    short, long = "a cat", "a cat on the red table with two black dogs and a blue car"
    data = write_records(tmp_path, [(0, short), (0, long)])
    args = args_for(ckpt, data, tmp_path / "run", mode="full", lr=2e-3, batch_size=2, max_steps=100, hint_prob=1.0,
                    hint_noise_chars=0.0)
    t0 = time.perf_counter()
    result = Trainer(args, log=lambda s: None).run()
    runner = molmo_core.load(tmp_path / "run" / "final", device="cpu", max_crops=1)
    outputs = {h: runner.generate(tmp_path / "img0.png", f"long_caption {h}:", max_new_tokens=40, template="none") for h in (0, 3)}
    print(f"length hint: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in 100 steps "
          f"({time.perf_counter() - t0:.1f} s); hint 0 -> {len(outputs[0])} chars, hint 3 -> {len(outputs[3])} chars")
    assert outputs == {0: short, 3: long}
