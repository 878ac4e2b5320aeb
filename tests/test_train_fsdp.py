"""Sharded full fine-tuning (torch FSDP2) on 2 CPU processes over gloo, launched by torchrun.

Checks: the losses equal a single process with the same global batch; checkpoints hold the full (unsharded)
weights and optimizer state in the single-process format; a run whose workers are SIGKILLed mid-run and
started again under FSDP reproduces the uninterrupted losses (text-only dropout and activation checkpointing
on, so every rank's RNG state has to come back); the export loads with `molmo_core.load`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import molmo_core
from molmo_core.train import TrainArgs, Trainer

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red cup on the table", "two black dogs", "the blue car on the street", "a white cat"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    for i in range(len(CAPTIONS) + 1):
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps({"image": f"img{i}.png", "caption": c}) + "\n" for i, c in enumerate(CAPTIONS)))
    held_out = folder / "eval.jsonl"  # one record: rank 1 has no eval batch and must still join the all-gathers
    held_out.write_text(json.dumps({"image": f"img{len(CAPTIONS)}.png", "caption": "a green bird"}) + "\n")
    return train, held_out


def flags(ckpt: Path, train: Path, **kw) -> list[str]:
    base = dict(model=ckpt, data=train, mode="full", lr=1e-3, max_crops=1, grad_accum=1, warmup=0, eval_fraction=0,
                save_every=2)
    base.update(kw)
    out = []
    for k, v in base.items():
        flag = "--" + k.replace("_", "-")
        out += ([flag] if v is True else ["--no-" + k.replace("_", "-")] if v is False else [flag, str(v)])
    return out


def torchrun(args: list[str], out: Path, kill_after: int | None = None) -> tuple[int, str]:
    """Run the CLI under torchrun with --fsdp; with kill_after, SIGKILL both workers once that many steps are
    logged. Returns (exit code, log)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"torchrun-{time.time_ns()}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([*TORCHRUN, "-m", "molmo_core.train", *args, "--fsdp", "--out", str(out)], env=env,
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        if kill_after is not None:
            metrics = out / "metrics.jsonl"
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
                    # torchrun starts each worker in its own session: kill the workers (the agent's children),
                    # as if the machine had died; the agent then reports the failure and exits.
                    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                    for pid in children:
                        os.kill(int(pid), signal.SIGKILL)
                    break
                time.sleep(0.02)
        try:
            rc = proc.wait(180)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    return rc, log.read_text(errors="replace")


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(out) if "loss" in r}


def test_fsdp_matches_single_process_and_writes_full_checkpoints(ckpt, data, tmp_path):
    train, held_out = data
    kw = dict(max_steps=6, eval_data=held_out, eval_every=3, response_dropout=0.0, gradient_checkpointing=False)
    t0 = time.perf_counter()
    single = Trainer(TrainArgs(**{**dict(model=str(ckpt), data=[str(train)], out=str(tmp_path / "single"),
                                         mode="full", lr=1e-3, max_crops=1, batch_size=4, grad_accum=1, warmup=0,
                                         eval_fraction=0.0, save_every=2),
                                  **{**kw, "eval_data": [str(held_out)]}}), log=lambda s: None).run()
    t1 = time.perf_counter()
    out = tmp_path / "fsdp"
    rc, log = torchrun(flags(ckpt, train, batch_size=2, **kw), out)
    t2 = time.perf_counter()
    assert rc == 0, log[-3000:]
    assert "sharded over 2 processes" in log
    got = losses(out)
    print(f"fsdp: single process {t1 - t0:.1f} s, torchrun x2 {t2 - t1:.1f} s; losses single {single.losses}, "
          f"fsdp {[got[s] for s in sorted(got)]}")
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], single.losses, rtol=1e-5)
    evals = {r["step"]: r["eval_loss"] for r in metric_rows(out) if "eval_loss" in r}
    np.testing.assert_allclose([evals[s] for s, _ in single.eval_losses], [v for _, v in single.eval_losses],
                               rtol=1e-5)

    # The checkpoint: every trainable parameter at full size, the same files and layout as one process.
    ckpt_fsdp = out / "checkpoints" / "step-0000006"
    ckpt_single = tmp_path / "single" / "checkpoints" / "step-0000006"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000006"
    assert {p.name for p in ckpt_fsdp.iterdir()} == {p.name for p in ckpt_single.iterdir()} | {"rng-rank1.pt"}
    w_fsdp = load_file(str(ckpt_fsdp / "trainable.safetensors"))
    w_single = load_file(str(ckpt_single / "trainable.safetensors"))
    base = dict(molmo_core.load(ckpt, device="cpu", max_crops=1).model.named_parameters())
    assert set(w_fsdp) == set(w_single) and len(w_fsdp) > 100
    for name, t in w_fsdp.items():
        assert t.shape == base[name].shape, name
        torch.testing.assert_close(t, w_single[name], rtol=1e-4, atol=1e-5)
    o_fsdp = torch.load(ckpt_fsdp / "optimizer.pt", weights_only=False)
    o_single = torch.load(ckpt_single / "optimizer.pt", weights_only=False)
    assert sorted(o_fsdp["state"]) == sorted(o_single["state"])
    assert [g["params"] for g in o_fsdp["param_groups"]] == [g["params"] for g in o_single["param_groups"]]
    for i, st in o_single["state"].items():
        assert o_fsdp["state"][i]["exp_avg"].shape == st["exp_avg"].shape
        torch.testing.assert_close(o_fsdp["state"][i]["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-3, atol=1e-9)

    # The export: official format, full weights, loads and matches the single-process export.
    runner = molmo_core.load(out / "final", device="cpu", max_crops=1)
    ref = dict(molmo_core.load(tmp_path / "single" / "final", device="cpu", max_crops=1).model.state_dict())
    exported = runner.model.state_dict()
    assert set(exported) == set(ref)
    for name, t in exported.items():
        torch.testing.assert_close(t, ref[name], rtol=1e-4, atol=1e-5)
    assert isinstance(runner.generate(train.parent / "img0.png", "long_caption 1:", max_new_tokens=4,
                                      template="none"), str)


@pytest.mark.extended  # 100 s on 2 cores: CI runs it after the default set
def test_fsdp_resume_after_sigkill_matches_uninterrupted(ckpt, data, tmp_path):
    """Dropout and activation checkpointing on; both workers SIGKILLed after step 5, started again under FSDP."""
    train, _ = data
    args = flags(ckpt, train, batch_size=2, max_steps=8, lr=5e-4, response_dropout=0.1, gradient_checkpointing=True,
                 export=False)
    t0 = time.perf_counter()
    rc, log = torchrun(args, tmp_path / "ref")
    assert rc == 0, log[-3000:]
    out = tmp_path / "killed"
    rc, log = torchrun(args, out, kill_after=5)
    assert rc != 0, "the run ended before it was killed"
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert 4 <= int(latest[5:]) < 8
    rc, log = torchrun(args, out)
    assert rc == 0, log[-3000:]
    assert f"resumed from {out / 'checkpoints' / latest}" in log
    ref, got = losses(tmp_path / "ref"), losses(out)
    print(f"fsdp resume: killed after step 5, resumed from {latest}; losses {[got[s] for s in sorted(got)]} "
          f"({time.perf_counter() - t0:.1f} s for 3 runs)")
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [ref[s] for s in range(1, 9)], rtol=1e-6, atol=1e-7)
