"""The distribution strategies (molmo_core/train/dist.py) in one process: DDP's and FSDP's wrapping, gradient
sync, backward, collectives, state gathering and saving run for real over a one-process gloo group and must
give the single-process losses and checkpoint, so a change that breaks one mode's code path fails here in
seconds. What only shows with several ranks (splitting the batch, reducing gradients, sharding) is tested with
two processes in test_train_fsdp.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from molmo_core.train import TrainArgs, Trainer
from molmo_core.train import dist as strategies
from molmo_core.train import loop as train_loop

from train_helpers import caption_records

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return caption_records(tmp_path_factory.mktemp("dist-data"))


@pytest.fixture
def process_group():
    """A one-process gloo group, as torchrun would set up for rank 0 of 1."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def losses(ckpt: Path, data: Path, out: Path, make_strategy, monkeypatch) -> list[float]:
    """Train and held-out losses of four steps of 2 accumulated micro-batches each (so the no-sync path runs),
    evaluated and saved every 2 steps, under the strategy `make_strategy()` returns."""
    made = []
    monkeypatch.setattr(train_loop, "choose_strategy", lambda args: made.append(make_strategy()) or made[-1])
    args = TrainArgs(model=str(ckpt), data=[str(data)], out=str(out), mode="full", lr=1e-3, max_crops=1,
                     batch_size=1, grad_accum=2, warmup=0, eval_fraction=0.25, eval_every=2, save_every=2,
                     max_steps=4, response_dropout=0.0, gradient_checkpointing=False, export=False)
    trainer = Trainer(args, log=lambda s: None)
    result = trainer.run()
    assert trainer.dist is made[0]
    return result.losses + [v for _, v in result.eval_losses]


STRATEGIES = {"DDP": strategies.DDP, "FSDP": lambda: strategies.FSDP(cuda=False)}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_matches_single_process_losses_and_checkpoint(name, ckpt, data, tmp_path, monkeypatch,
                                                               process_group):
    single = losses(ckpt, data, tmp_path / "single", lambda: strategies.SingleProcess(torch.device("cpu")),
                    monkeypatch)
    other = losses(ckpt, data, tmp_path / name, STRATEGIES[name], monkeypatch)
    assert len(other) == 4 + 2
    np.testing.assert_allclose(other, single, rtol=1e-5)
    a = load_file(str(tmp_path / "single" / "checkpoints" / "step-0000004" / "trainable.safetensors"))
    b = load_file(str(tmp_path / name / "checkpoints" / "step-0000004" / "trainable.safetensors"))
    assert set(a) == set(b) and len(a) > 100
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)  # as test_train_fsdp.py: Adam magnifies
        # float-order differences of near-zero gradients


def test_fsdp_for_lora_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP shards full fine-tunes only; this run has --mode lora. Use --mode full"):
        strategies.choose_strategy(TrainArgs(mode="lora"))


def test_one_process_is_the_single_process_strategy(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    chosen = strategies.choose_strategy(TrainArgs(mode="full", fsdp=True, device="cpu"))
    assert type(chosen) is strategies.SingleProcess and chosen.world == 1 and not chosen.sharded
