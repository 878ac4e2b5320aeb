"""The trainer on a CUDA device (skipped without one): one process in full and LoRA mode with bf16 autocast,
export and reload; resuming after a crash reproduces the uninterrupted losses; accelerate's DDP plumbing and
FSDP2 over a one-process NCCL group give the single-process losses."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import molmo_core
from molmo_core.train import TrainArgs, Trainer
from molmo_core.train import dist as strategies
from molmo_core.train import loop as train_loop

from train_helpers import caption_records

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="requires CUDA")
pytestmark = [pytest.mark.gpu, requires_cuda]

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; read at its first use


@pytest.fixture(autouse=True)
def deterministic():
    """Deterministic kernels: otherwise two identical single-process runs already differ by ~1e-3 in their
    losses (atomic adds in backward kernels), which would hide what these tests compare."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return caption_records(tmp_path_factory.mktemp("gpu-data"))


def cuda_args(ckpt: Path, data: Path, out: Path, **kw) -> TrainArgs:
    base = dict(model=str(ckpt), data=[str(data)], out=str(out), mode="full", lr=1e-3, max_crops=1, batch_size=2,
                grad_accum=2, warmup=0, eval_fraction=0.0, save_every=2, max_steps=6, response_dropout=0.0,
                gradient_checkpointing=True, device="cuda")
    base.update(kw)
    return TrainArgs(**base)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_cuda_training_learns_and_exports(mode, ckpt, data, tmp_path):
    trainer = Trainer(cuda_args(ckpt, data, tmp_path, mode=mode, lr=3e-3 if mode == "lora" else 1e-3),
                      log=lambda s: None)
    result = trainer.run()
    print(f"cuda {mode}: losses {[round(x, 4) for x in result.losses]}")
    assert trainer.device.type == "cuda" and trainer.autocast
    assert all(np.isfinite(result.losses)) and result.losses[-1] < result.losses[0]
    runner = molmo_core.load(tmp_path / "final", device="cuda", max_crops=1)
    assert isinstance(runner.generate(data.parent / "0.png", "long_caption 0:", max_new_tokens=4, template="none"), str)


def test_cuda_resume_after_exception_matches_uninterrupted(ckpt, data, tmp_path):
    ref = Trainer(cuda_args(ckpt, data, tmp_path / "ref", export=False), log=lambda s: None).run()

    class Crash(Exception):
        pass

    def crash_after_3(trainer, m):
        if m["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        Trainer(cuda_args(ckpt, data, tmp_path / "crash", export=False), log=lambda s: None,
                callbacks=[crash_after_3]).run()
    resumed = Trainer(cuda_args(ckpt, data, tmp_path / "crash", export=False), log=lambda s: None).run()
    print(f"cuda resume: ref {ref.losses}, resumed (steps 3-6) {resumed.losses}")
    np.testing.assert_allclose(resumed.losses, ref.losses[2:], rtol=1e-4)


@pytest.fixture
def nccl_group():
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


CUDA_STRATEGIES = {"AccelerateDDP": strategies.AccelerateDDP, "FSDP": lambda: strategies.FSDP(cuda=True)}


@pytest.mark.parametrize("name", sorted(CUDA_STRATEGIES))
def test_cuda_strategy_matches_single_process(name, ckpt, data, tmp_path, monkeypatch, nccl_group):
    """In float32 (bf16 autocast off): under autocast FSDP2's unsharded parameters give bf16 products that differ
    in the last bits from the single-process ones, and Adam turns that into ~1e-3 relative loss differences."""
    losses = {}
    for label, make in (("single", lambda: strategies.SingleProcess(torch.device("cuda", 0))),
                        (name, CUDA_STRATEGIES[name])):
        made = []
        monkeypatch.setattr(train_loop, "choose_strategy", lambda args: made.append(make()) or made[-1])
        trainer = Trainer(cuda_args(ckpt, data, tmp_path / label, export=False, bf16=False), log=lambda s: None)
        losses[label] = trainer.run().losses
        assert trainer.dist is made[0]
    print(f"cuda {name}: {losses}")
    np.testing.assert_allclose(losses[name], losses["single"], rtol=1e-5)
