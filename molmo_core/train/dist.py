"""How a run is spread over processes: one object per distribution mode, chosen once by `choose_strategy`.

    SingleProcess   one process (the default; every collective is the identity)
    DDP             several CPU processes (torchrun): plain torch DDP over gloo; every rank holds the model
    AccelerateDDP   several GPU processes (`accelerate launch`): DDP through accelerate's Accelerator
    FSDP            `--fsdp` (or an accelerate config with FSDP), full mode: torch-native FSDP2, parameters,
                    gradients and optimizer state sharded over the ranks; over gloo on CPU, NCCL on GPU

The trainer talks to the strategy only, so each mode's wrapping, gradient sync, backward, gathering of a full
state and loading of a saved one live in one class:

    shard(loss_module, log)          before the optimizer exists (FSDP replaces parameters by shards)
    wrap(loss_module, optimizer)     -> (model to call in training, optimizer)
    sync(model, last)                context for one micro-batch; gradients are reduced after the last only
    backward(loss)
    all_reduce / all_gather_object / broadcast_object / barrier
    eval_starts(n, batch_size)       this rank's held-out batches
    model_state / optimizer_state    full (unsharded) states on rank 0, None elsewhere; collective under FSDP
    load_state(...)                  restore a saved full state (every rank reads it, or FSDP: rank 0 reads
                                     and broadcasts into the shards)

Saved states always have the single-process layout (Molmo's parameter names, `optimizer.state_dict()` with
integer keys), so a run may be resumed with another strategy or number of processes.
"""

from __future__ import annotations

import math
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..weights import load_torch_file
from .recipe import TrainArgs

PREFIX = "molmo."  # the trainer wraps Molmo in a LossModule whose only child is `molmo`


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PREFIX): v for k, v in state.items()}


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class SingleProcess:
    """One process on one device; the base of the others (which override what differs)."""

    world, rank = 1, 0
    sharded = False  # parameters split over the ranks (FSDP)

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def load_device(self) -> torch.device:
        """Where the base weights are loaded."""
        return self.device

    # ------------------------------------------------------------------ model and optimizer
    def shard(self, loss_module: nn.Module, log: Callable[[str], None]) -> None:
        """Split the parameters over the ranks (before the optimizer is made); nothing to do here."""

    def wrap(self, loss_module: nn.Module, optimizer: torch.optim.Optimizer):
        """-> (the module to call for training steps, the optimizer to step)."""
        return loss_module, optimizer

    def sync(self, model: nn.Module, last: bool) -> AbstractContextManager:
        """Context for one micro-batch's forward and backward: gradients are synchronised after the last."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, values: list[float]) -> list[float]:
        """Sum of `values` over the ranks."""
        return values

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        return [obj]

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        return obj

    def barrier(self) -> None:
        pass

    def eval_starts(self, n: int, batch_size: int) -> list[int | None]:
        """First index of each of this rank's held-out batches (None: a forward whose result is discarded)."""
        return list(range(self.rank * batch_size, n, batch_size * self.world))

    # ------------------------------------------------------------------ full states
    def model_state(self, loss_module: nn.Module) -> dict[str, torch.Tensor] | None:
        """Molmo's state dict (our parameter names, full size) on rank 0; None on the other ranks."""
        return _strip(loss_module.state_dict()) if self.rank == 0 else None

    def optimizer_state(self, loss_module: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """`optimizer.state_dict()` (integer keys, full-size state) on rank 0; None on the other ranks."""
        return optimizer.state_dict() if self.rank == 0 else None

    def load_state(self, loss_module: nn.Module, optimizer: torch.optim.Optimizer, weights_file: Path,
                   optimizer_file: Path) -> None:
        """Copy the saved weights (a safetensors file of Molmo tensors, e.g. the trainable ones only) into the
        model and the saved `optimizer.state_dict()` into the optimizer; every rank reads the files."""
        params = dict(loss_module.named_parameters())
        with torch.no_grad():
            for name, t in _read_weights(weights_file).items():
                p = params[PREFIX + name]
                p.copy_(t.to(p.dtype))
        optimizer.load_state_dict(load_torch_file(optimizer_file, map_location=self.device))


class _ProcessGroup(SingleProcess):
    """Several processes in one torch.distributed process group: the collectives are real."""

    def __init__(self, device: torch.device, backend: str | None):
        import torch.distributed as dist

        if backend is not None and not dist.is_initialized():
            dist.init_process_group(backend)
        super().__init__(device)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()

    def all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, device=self.device, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def all_gather_object(self, obj) -> list:
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        torch.distributed.barrier()


class DDP(_ProcessGroup):
    """CPU processes (torchrun): plain torch DDP over gloo. Every rank holds the whole model."""

    def __init__(self):
        super().__init__(torch.device("cpu"), "gloo")

    def wrap(self, loss_module, optimizer):
        return nn.parallel.DistributedDataParallel(loss_module), optimizer

    def sync(self, model, last):
        return nullcontext() if last else model.no_sync()


class AccelerateDDP(_ProcessGroup):
    """GPU processes: DDP through accelerate's Accelerator, per the accelerate config."""

    def __init__(self):
        from accelerate import Accelerator

        self.accelerator = Accelerator()  # initialises the process group
        super().__init__(self.accelerator.device, backend=None)

    def wrap(self, loss_module, optimizer):
        return self.accelerator.prepare(loss_module, optimizer)

    def sync(self, model, last):
        return nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, loss):
        self.accelerator.backward(loss)


class FSDP(_ProcessGroup):
    """Full fine-tunes sharded with torch FSDP2: one unit per decoder block and per ViT block, the rest
    (embeddings, connector, ln_f, head) in the root unit on the loss module. Parameter names stay the same.
    Gathering and loading full states are collective: every rank must call them."""

    sharded = True

    def __init__(self, cuda: bool):
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        super().__init__(device, "nccl" if cuda else "gloo")

    @property
    def load_device(self) -> torch.device:
        return torch.device("cpu")  # fully_shard moves each unit's shard to the GPU: no full copy per GPU

    def shard(self, loss_module, log):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        molmo = loss_module.molmo
        mesh = init_device_mesh(self.device.type, (self.world,))
        for block in molmo.transformer.blocks:
            fully_shard(block, mesh=mesh)
        vit_blocks = molmo.vision_backbone.image_vit.transformer.resblocks
        for block in vit_blocks:  # unused ones stay sharded
            fully_shard(block, mesh=mesh)
        fully_shard(loss_module, mesh=mesh)
        log(f"fsdp: parameters, gradients and optimizer state sharded over {self.world} processes "
            f"({len(molmo.transformer.blocks)} decoder + {len(vit_blocks)} ViT units + root)")

    def sync(self, model, last):
        model.set_requires_gradient_sync(last)  # accumulate unsharded gradients, reduce-scatter after the last
        return nullcontext()

    def eval_starts(self, n, batch_size):
        # every rank must run as many forwards (each one all-gathers); the extra ones are discarded
        starts = super().eval_starts(n, batch_size)
        return starts + [None] * (math.ceil(n / (batch_size * self.world)) - len(starts))

    def model_state(self, loss_module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(loss_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _strip(sd) if self.rank == 0 else None

    def optimizer_state(self, loss_module, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(loss_module, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        full = osd["state"]  # keyed by parameter name: back to the integer keys of optimizer.state_dict()
        names = _optimizer_param_names(loss_module, optimizer)
        state = {i: full[n] for i, n in enumerate(names) if n in full}
        return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}

    def load_state(self, loss_module, optimizer, weights_file, optimizer_file):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        weights, optim = {}, {}
        if self.rank == 0:
            weights = {PREFIX + k: v for k, v in _read_weights(weights_file).items()}
            saved = load_torch_file(optimizer_file, map_location="cpu")
            names = _optimizer_param_names(loss_module, optimizer)
            optim = {"state": {names[i]: st for i, st in saved["state"].items()},
                     "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
        set_model_state_dict(loss_module, weights, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=False))  # frozen weights stay the base's
        set_optimizer_state_dict(loss_module, optimizer, optim, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))


def _optimizer_param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter name (in `module`) of each optimizer index (the integer keys of `optimizer.state_dict()`)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def choose_strategy(args: TrainArgs) -> SingleProcess:
    """The strategy for this process, from the launcher's environment (WORLD_SIZE, ACCELERATE_USE_FSDP) and args.

    Raises:
        ValueError: FSDP was asked for (--fsdp, or an accelerate config that says FSDP) by a LoRA / QLoRA run.
    """
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SingleProcess(torch.device(args.device or ("cuda:0" if cuda else "cpu")))
    accelerate_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if args.fsdp or accelerate_fsdp:
        if args.mode != "full":
            raise ValueError(f"FSDP shards full fine-tunes only; this run has --mode {args.mode}. Use --mode "
                                "full, or launch with configs/accelerate/ddp.yaml (DDP) for LoRA / QLoRA.")
        return FSDP(cuda=cuda and (args.device or "cuda").startswith("cuda"))
    return AccelerateDDP() if cuda else DDP()
