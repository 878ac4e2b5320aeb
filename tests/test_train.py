"""The embedded trainer on tiny random checkpoints (CPU): packing, recipe, overfitting, exact resume, bad input.

Timing note: the machine running CI may have 2 shared cores; the trainer tests pin torch to one thread
(oversubscribed threads made steps 10x slower and erratic).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import molmo_core
from molmo_core.train import TrainArgs, Trainer, TrainError
from molmo_core.train import loop as train_loop
from molmo_core.train.cli import parse_args, to_argv
from molmo_core.train.data import (IMAGE_SUBSEGMENT, DataError, ExampleOptions, ImageCache, build_example,
                                   caption_user_text, collate, load_records)
from molmo_core.train.recipe import lr_factor, loss_sums

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red cup on the table", "two black dogs", "the blue car on the street", "a white cat"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_images(folder: Path, n: int) -> list[str]:
    names = []
    for i in range(n):
        rng = np.random.default_rng(i)
        name = f"img{i}.png"
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")).save(folder / name)
        names.append(name)
    return names


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    names = make_images(folder, len(CAPTIONS))
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps({"image": n, "caption": c, "transcripts": []}) + "\n"
                            for n, c in zip(names, CAPTIONS)))
    return path


def small_args(ckpt: Path, data: Path, out: Path, **kw) -> TrainArgs:
    base = dict(model=str(ckpt), data=[str(data)], out=str(out), mode="full", lr=1e-3, max_crops=1, batch_size=4,
                grad_accum=1, warmup=0, eval_fraction=0.0, save_every=0, gradient_checkpointing=False)
    base.update(kw)
    return TrainArgs(**base)


def metric_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------------------- packing
def _tokenizer_and_cache(ckpt: Path, opts: ExampleOptions):
    runner = molmo_core.load(ckpt, device="cpu", max_crops=1)
    cfg = runner.config
    return runner, ImageCache(runner.tokenizer, opts, cfg.resize, cfg.vision.image_size, cfg.vision.patch_size)


def test_packing_layout_and_equivalence(ckpt, dataset, one_thread):
    """Two annotations packed after one image copy: positions restart after the image, annotations cannot see
    each other, the loss covers answer + EOS only, and each annotation's loss equals its loss when alone."""
    opts = ExampleOptions(max_crops=1, shuffle_annotations=False, hint_prob=1.0, hint_noise_chars=0)
    runner, cache = _tokenizer_and_cache(ckpt, opts)
    records, _ = load_records(dataset)
    rec = records[0]
    rec.annotations = rec.annotations + [type(rec.annotations[0])("transcript", "um a cup red cup")]
    image = cache.get(rec)
    ex = build_example(rec, image, runner.tokenizer, np.random.default_rng(0), opts)
    n_img = 1 + len(image.image_tokens)
    seg = ex["subsegments"]
    assert (seg[:n_img] == IMAGE_SUBSEGMENT).all() and set(seg[n_img:]) == {1, 2}
    first2 = int(np.argmax(seg == 2))
    assert ex["position_ids"][n_img] == n_img and ex["position_ids"][first2] == n_img  # both continue after image
    tok = runner.tokenizer
    answers = [tok.decode(ex["targets"][(ex["loss_mask"] > 0) & (seg == s)]) for s in (1, 2)]
    assert answers == [" a red cup on the table", " um a cup red cup"]
    eos_targets = ex["targets"][ex["loss_mask"] > 0]
    assert (eos_targets == tok.special.eos).sum() == 2
    prompt = tok.decode(ex["input_ids"][seg == 1])
    assert prompt.startswith(" long_caption 1:")  # the captioner format (section 8.1)

    batch = collate([ex])
    assert not batch["allowed"][0, first2, n_img]  # annotation 2 never attends to annotation 1
    assert batch["allowed"][0, first2, 5]  # ...but sees the image
    model = runner.model.eval()
    with torch.no_grad():
        _, ce_packed, n_packed = loss_sums(model, batch, 0.0)
        ce_alone = n_alone = 0
        for ann in rec.annotations:
            solo = type(rec)(rec.image, [ann], rec.source, rec.key)
            _, ce, n = loss_sums(model, collate([build_example(solo, image, tok, np.random.default_rng(0), opts)]), 0.0)
            ce_alone, n_alone = ce_alone + ce, n_alone + n
    assert n_packed == n_alone
    torch.testing.assert_close(ce_packed, ce_alone, rtol=1e-5, atol=1e-4)


def test_length_hint_format():
    opts = ExampleOptions()
    rng = np.random.default_rng(0)
    prompts = [caption_user_text("long_caption", "x" * 300, rng, opts) for _ in range(2000)]
    hinted = [p for p in prompts if p != "long_caption :"]
    assert 0.87 < len(hinted) / len(prompts) < 0.93  # 90 % carry the hint
    hints = np.array([int(p.split()[1][:-1]) for p in hinted])
    # (300 + int(N(0, 25))) // 15: mean 19.5 (floor), the jitter is +-5 sigma at most
    assert abs(hints.mean() - 19.5) < 0.3 and hints.min() >= 11 and hints.max() <= 28 and hints.std() > 1.2


def test_lr_schedule_and_groups(ckpt, dataset, tmp_path):
    assert lr_factor(0, 10, 100, 0.1) == 0.0 and lr_factor(5, 10, 100, 0.1) == 0.5
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0) and lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    args = small_args(ckpt, dataset, tmp_path, lr=2e-5, warmup=None, max_steps=5000)
    assert args.component_lrs() == pytest.approx({"connector": 2e-4, "vit": 6e-6, "llm": 2e-5})
    assert args.component_warmups(5000) == {"connector": 200, "vit": 500, "llm": 500}  # capped at 10 % of the run
    t = Trainer(small_args(ckpt, dataset, tmp_path, max_steps=2), log=quiet).setup()
    comps = {g["component"] for g in t.optimizer.param_groups}
    assert comps == {"connector", "vit", "llm"}
    assert t.optimizer.defaults["betas"] == (0.9, 0.95) and t.optimizer.defaults["eps"] == 1e-6
    m = t.train_step()
    assert set(k for k in m if k.startswith("grad_norm_")) == {"grad_norm_connector", "grad_norm_vit",
                                                                "grad_norm_llm"}


def test_cli_parse_roundtrip():
    args, ns = parse_args(["--finetune", "--model", "m", "--data", "a.parquet", "--data", "clocks:10", "--out", "o",
                           "--mode", "qlora", "--max-steps", "7", "--lr", "3e-4", "--no-gradient-checkpointing",
                           "--freeze", "vit,connector"])
    assert args.data == ["a.parquet", "clocks:10"] and args.mode == "qlora" and args.max_steps == 7
    assert args.lr == 3e-4 and not args.gradient_checkpointing and args.freeze == ["vit", "connector"]
    again, _ = parse_args(to_argv(args))
    assert again == args


# ----------------------------------------------------------------------------------------- overfitting
def test_overfit_four_records_and_generate(ckpt, dataset, tmp_path):
    """Full fine-tune, 40 steps: caption loss drops >= 90 % and greedy decoding reproduces each caption."""
    out = tmp_path / "run"
    t0 = time.perf_counter()
    result = Trainer(small_args(ckpt, dataset, out, max_steps=40), log=quiet).run()
    elapsed = time.perf_counter() - t0
    first, last = result.losses[0], result.losses[-1]
    drop = 1 - last / first
    print(f"overfit: loss {first:.3f} -> {last:.3f} ({drop:.1%} drop) in 40 steps, {elapsed:.1f} s")
    assert drop >= 0.90
    # artifacts
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0]) and rows[-1]["step"] == 40
    assert (out / "loss.png").is_file() and Image.open(out / "loss.png").size == (800, 400)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000040"
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in (out / "final").iterdir()}
    runner = molmo_core.load(out / "final", device="cpu", max_crops=1)
    folder = Path(dataset).parent
    for i, caption in enumerate(CAPTIONS):
        text = runner.generate(folder / f"img{i}.png", f"long_caption {len(caption) // 15}:", max_new_tokens=20, template="none")
        assert text == caption


# ----------------------------------------------------------------------------------------- resume
def test_resume_after_exception_matches_uninterrupted(ckpt, dataset, tmp_path):
    """Batch 2 x 2 accumulation, text-only dropout on, checkpoint every 3 steps; an exception after step 5
    and a resume from step 3 give the same 8 losses as an uninterrupted run."""
    kw = dict(max_steps=8, batch_size=2, grad_accum=2, save_every=3, export=False, lr=3e-4, warmup=2,
              response_dropout=0.1, gradient_checkpointing=True)
    ref = Trainer(small_args(ckpt, dataset, tmp_path / "ref", **kw), log=quiet).run()

    class Crash(Exception):
        pass

    def crash_after_5(trainer, m):
        if m["step"] == 5:
            raise Crash

    out = tmp_path / "crash"
    with pytest.raises(Crash):
        Trainer(small_args(ckpt, dataset, out, **kw), log=quiet, callbacks=[crash_after_5]).run()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    logs: list[str] = []
    resumed = Trainer(small_args(ckpt, dataset, out, **kw), log=logs.append).run()
    assert any("resumed from" in s and "step-0000003" in s for s in logs)
    assert len(resumed.losses) == 5
    got = metric_losses(out)
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(1, 9)], ref.losses, rtol=1e-6, atol=1e-7)


def test_resume_after_sigkill_matches_uninterrupted(ckpt, dataset, tmp_path):
    """The CLI in a subprocess, SIGKILLed mid-run, then started again: same losses as without the kill."""
    common = ["--model", str(ckpt), "--data", str(dataset), "--mode", "full", "--lr", "5e-4", "--max-crops", "1",
              "--batch-size", "2", "--grad-accum", "1", "--warmup", "0", "--eval-fraction", "0", "--max-steps", "14",
              "--save-every", "2", "--no-export", "--no-gradient-checkpointing"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def run(out: Path, kill_at: int | None = None) -> int:
        proc = subprocess.Popen([sys.executable, "-m", "molmo_core.train", *common, "--out", str(out)], env=env,
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill_at is None:
            return proc.wait(180)
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_at:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        return proc.wait(30)

    assert run(tmp_path / "ref") == 0
    out = tmp_path / "killed"
    assert run(out, kill_at=7) == -signal.SIGKILL
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("step-") and int(latest[5:]) < 14
    # A kill in the middle of a checkpoint write may leave a .tmp-* folder; `latest` only ever names complete ones.
    assert run(out) == 0
    ref, got = metric_losses(tmp_path / "ref"), metric_losses(out)
    assert sorted(got) == list(range(1, 15))
    np.testing.assert_allclose([got[s] for s in range(1, 15)], [ref[s] for s in range(1, 15)], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------- bad input
def test_empty_dataset_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="No usable training records"):
        load_records(empty)
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "nope.parquet")


def test_records_without_images_are_skipped_and_counted(tmp_path):
    make_images(tmp_path, 1)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"image": "img0.png", "caption": "a cat"}) + "\n"
                    + json.dumps({"image": "gone.png", "caption": "a dog"}) + "\n"
                    + json.dumps({"image": "img0.png", "caption": "", "transcripts": []}) + "\n")
    records, report = load_records(path)
    assert len(records) == 1 and report.missing_images == 1 and report.without_annotations == 1
    assert "gone.png" in report.summary()
    only_missing = tmp_path / "m.jsonl"
    only_missing.write_text(json.dumps({"image": "gone.png", "caption": "a dog"}) + "\n")
    with pytest.raises(DataError, match="1 records whose image was not found"):
        load_records(only_missing)


def test_pixmo_cap_parquet_with_image_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = tmp_path / "images"
    imgs.mkdir()
    make_images(imgs, 2)
    table = pa.table({"image_url": ["https://example.com/a/img0.png", "https://example.com/img9.png",
                                    "https://x.org/img1.png"],
                      "caption": ["a cat", "missing", "a dog"], "transcripts": [["um a cat"], [], []]})
    pq.write_table(table, tmp_path / "pixmo.parquet")
    records, report = load_records(tmp_path / "pixmo.parquet", images_dir=imgs)
    assert [len(r.annotations) for r in records] == [2, 1] and report.missing_images == 1


def test_long_caption_is_truncated_with_warning(ckpt, tmp_path):
    make_images(tmp_path, 1)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"image": "img0.png", "caption": "word " * 3999 + "words"}) + "\n")  # 20,000 chars
    with pytest.warns(UserWarning, match="20000-character text was truncated to 6000"):
        records, report = load_records(path)
    assert report.truncated_captions == 1 and len(records[0].annotations[0].text) <= 6000
    opts = ExampleOptions(max_crops=1, max_seq_len=600)
    runner, cache = _tokenizer_and_cache(ckpt, opts)
    ex = build_example(records[0], cache.get(records[0]), runner.tokenizer, np.random.default_rng(0), opts)
    assert len(ex["input_ids"]) == 600 and ex["loss_mask"].sum() > 0  # also cut to the sequence length


def test_full_disk_leaves_previous_checkpoint_as_latest(ckpt, dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    t = Trainer(small_args(ckpt, dataset, out, max_steps=4, save_every=2, export=False), log=quiet)
    t.setup()
    real = train_loop._save_torch

    def full_disk(obj, path):
        if t.step >= 4 and path.name == "optimizer.pt":  # the second checkpoint, half-way through a file
            path.write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path)

    monkeypatch.setattr(train_loop, "_save_torch", full_disk)
    with pytest.raises(TrainError, match="No space left on the device.*still step-0000002"):
        t.fit()
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-0000002"
    assert not list(root.glob(".tmp-*")) and not (root / "step-0000004").exists()
    monkeypatch.setattr(train_loop, "_save_torch", real)
    # What a SIGKILL mid-write leaves: a temporary folder and a half-written metrics line.
    (root / ".tmp-step-0000006-99999").mkdir()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    resumed = Trainer(small_args(ckpt, dataset, out, max_steps=4, save_every=2, export=False), log=quiet).setup()
    assert resumed.step == 2  # the latest checkpoint is complete and loads
    assert not list(root.glob(".tmp-*"))
    resumed.fit()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines if "loss" in json.loads(ln)] == [1, 2, 3, 4]


def test_bad_args_are_clear(ckpt, dataset, tmp_path):
    with pytest.raises(ValueError, match="mode must be lora, qlora or full"):
        small_args(ckpt, dataset, tmp_path, mode="qlora8").validate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from molmo_core.train.cli import main

        assert main(["--model", str(ckpt), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"),
                     "--max-crops", "1"]) == 2
