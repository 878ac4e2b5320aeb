"""The training loop, in plain sight: setup() -> fit() -> validate() / save_checkpoint() -> export().

    trainer = Trainer(TrainArgs(model=..., data=[...], out=...))
    result = trainer.run()          # setup + fit + export; or call the steps yourself

Files under `args.out`:
    metrics.jsonl              one JSON object per logged step: step, loss, lr, lr_connector, lr_vit,
                               tokens_per_s, loss_tokens, grad_norm_*, elapsed_s, eta_s; eval lines add eval_loss
    loss.png                   the loss curve (PIL drawing; refreshed at every eval and checkpoint)
    checkpoints/step-NNNNNNN/  trainable.safetensors, optimizer.pt, scheduler.pt, rng.pt, state.json
    checkpoints/latest         the name of the newest *complete* checkpoint (updated last, atomically)
    final/                     the model in the official checkpoint format (`molmo_core.load(out/final)`)
    adapter/                   LoRA / QLoRA only: the adapter (peft LoRA config + safetensors)

A checkpoint is written into `checkpoints/.tmp-...`, every file fsynced, the folder renamed, and only then
is `latest` replaced (write + fsync + rename), so a crash or a full disk mid-write never leaves a corrupted
checkpoint as the latest. Resuming restores the trainable weights, optimizer, scheduler, RNG states and
the data position, so a resumed run reproduces the losses of an uninterrupted one.

Several processes (WORLD_SIZE > 1, started by torchrun or `accelerate launch`):
  * DDP (default): on GPU through accelerate's Accelerator (per the accelerate config), on CPU plain
    torch DDP over gloo. Every process holds the whole model; rank 0 writes checkpoints from its copy.
  * FSDP (`--fsdp`, full mode; also chosen when the accelerate config says FSDP): torch-native FSDP2
    (`fully_shard` on every decoder block, every ViT block, then the root), over gloo on CPU or NCCL on GPU;
    accelerate is only the launcher then. Checkpoints and the export are collective: every rank takes part in
    gathering the full (unsharded) weights and optimizer state, rank 0 writes the same files as a single
    process, so a run may be resumed with another number of processes or without FSDP, and the other way round;
    resuming loads the full state on rank 0 and broadcasts it into the shards.
Each rank's RNG state is saved too (rng.pt is rank 0's, rng-rank{R}.pt the others'), so resumed runs with
text-only dropout reproduce the uninterrupted ones.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import (DataReport, ExampleOptions, ExampleStream, ImageCache, collate, load_records, split_records)
from .recipe import (ResponseDropout, TrainArgs, clip_per_component, enable_gradient_checkpointing, loss_sums,
                     make_optimizer, make_scheduler, param_groups)

CHECKPOINTS = "checkpoints"
LATEST = "latest"


class TrainError(RuntimeError):
    """A run that cannot continue, with a message saying what to do (full disk, bad resume, ...)."""


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    final: Path | None = None
    adapter: Path | None = None
    stopped: bool = False


class LossModule(nn.Module):
    """Molmo + the loss, as one module, so DDP / FSDP see the LM head inside their forward."""

    def __init__(self, molmo: nn.Module, z_loss: float):
        super().__init__()
        self.molmo = molmo
        self.z_loss = z_loss

    def forward(self, batch: dict[str, torch.Tensor]):
        return loss_sums(self.molmo, batch, self.z_loss)


# ----------------------------------------------------------------------------------------- file writing
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Written straight to the file (no second copy of the weights in host memory), then fsynced."""
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})
    _fsync_file(path)


def _save_torch(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _metrics_step(line: str) -> float:
    """The step of one metrics.jsonl line; inf (dropped) for a line a killed run left half-written."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


# ----------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, args: TrainArgs, log: Callable[[str], None] | None = None,
                 callbacks: list[Callable[["Trainer", dict], None]] | None = None):
        args.validate()
        self.args = args
        self.log = log or (lambda s: print(s, flush=True))
        self.callbacks = callbacks or []
        self.out = Path(args.out).expanduser()
        self.step = 0
        self.seq_pos = 0  # data position: sequences consumed (all ranks)
        self.stop_requested = False
        self._stop_agreed = False
        self.accelerator = None
        self.world, self.rank = 1, 0
        self._metrics_file = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        a = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(a.seed)
        random.seed(a.seed)
        np.random.seed(a.seed % 2**32)
        self.ddp = self.fsdp = False
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        accel_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")  # accelerate config: FSDP
        if multi and (a.fsdp or accel_fsdp):
            if a.mode != "full":
                raise TrainError(f"FSDP shards full fine-tunes only; this run has --mode {a.mode}. Use --mode full, "
                                 "or launch with configs/accelerate/ddp.yaml (DDP) for LoRA / QLoRA.")
            import torch.distributed as dist

            cuda = torch.cuda.is_available() and (a.device or "cuda").startswith("cuda")
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            if not dist.is_initialized():
                dist.init_process_group("nccl" if cuda else "gloo")
            self.world, self.rank, self.fsdp = dist.get_world_size(), dist.get_rank(), True
            self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        elif multi and torch.cuda.is_available():
            from accelerate import Accelerator

            self.accelerator = Accelerator()  # DDP, per the accelerate config
            self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
            self.device = self.accelerator.device
        elif multi:  # CPU processes (torchrun): plain DDP over gloo
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
            self.world, self.rank, self.ddp = dist.get_world_size(), dist.get_rank(), True
            self.device = torch.device("cpu")
        else:
            dev = a.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
            self.device = torch.device(dev)
        self.autocast = self.device.type == "cuda" and a.bf16
        self._print_args()

        # model
        from ..api import load

        if a.mode == "full":
            dtype, quantize = torch.float32, None  # fp32 master weights; bf16 comes from autocast
        else:
            dtype = torch.bfloat16 if self.autocast else torch.float32  # frozen base in bf16 on GPU
            quantize = "4bit" if a.mode == "qlora" else None
        # FSDP on GPU: load on the CPU, fully_shard moves each unit's shard to the GPU (no full copy per GPU)
        load_device = torch.device("cpu") if self.fsdp else self.device
        self.runner = load(a.model, device=load_device, dtype=dtype, quantize=quantize, max_crops=a.max_crops)
        self.base_path = self.runner.path
        self.molmo = self.runner.model
        self.tokenizer = self.runner.tokenizer
        if a.mode == "full":
            from .recipe import component_of

            for name, p in self.molmo.named_parameters():
                p.requires_grad_(component_of(name) not in a.freeze)
            vit = self.molmo.vision_backbone.image_vit  # blocks after the deepest selected layer never run
            for block in vit.transformer.resblocks[vit.n_needed_blocks:]:
                block.requires_grad_(False)
        else:
            from .lora import add_lora

            add_lora(self.molmo, a.lora_rank, a.lora_alpha, a.lora_dropout, a.lora_connector)
        self.molmo.train()
        self.dropout = ResponseDropout(self.molmo, a.response_dropout)
        if a.gradient_checkpointing:
            enable_gradient_checkpointing(self.molmo)
        n_train = sum(p.numel() for p in self.molmo.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.molmo.parameters())
        if self.rank != 0:
            self.log = lambda s: None
        self.log(f"model: {a.model} ({a.mode}) on {self.device}, {n_train / 1e6:.3g} M of {n_all / 1e6:.3g} M "
                 f"parameters trainable")
        if a.fsdp and not self.fsdp:
            self.log("--fsdp: one process, nothing to shard; training unsharded")
        self.loss_module = LossModule(self.molmo, a.z_loss)
        if self.fsdp:
            self._shard()

        # data
        records, report = load_records(a.data, a.images_dir, a.max_caption_chars, a.seed)
        self.report: DataReport = report
        if a.eval_data:
            eval_records, _ = load_records(a.eval_data, a.images_dir, a.max_caption_chars, a.seed + 1)
            train_records = records
        else:
            train_records, eval_records = split_records(records, a.eval_fraction, a.seed)
        self.log(f"data: {report.summary()}; {len(train_records)} for training, {len(eval_records)} held out")
        cfg = self.molmo.config
        self.opts = ExampleOptions(a.prompt_format, a.hint_prob, a.hint_noise_chars, a.annotations, True,
                                   a.max_crops, a.max_seq_len)
        cache = ImageCache(self.tokenizer, self.opts, cfg.resize, cfg.vision.image_size, cfg.vision.patch_size)
        self.train_stream = ExampleStream(train_records, self.tokenizer, self.opts, cache, a.seed)
        eval_opts = ExampleOptions(**{**self.opts.__dict__, "shuffle_annotations": False})
        self.eval_stream = (ExampleStream(eval_records, self.tokenizer, eval_opts, cache, a.seed + 7, shuffle=False)
                            if eval_records else None)
        per_step = a.batch_size * a.grad_accum * self.world
        self.max_steps = a.max_steps or max(1, math.ceil(a.epochs * len(train_records) / per_step))

        # optimizer, schedule (after sharding: FSDP replaces the parameters by DTensor shards)
        groups = param_groups(self.molmo, a.component_lrs(), a.weight_decay)
        self.optimizer = make_optimizer(groups)
        self.warmups = a.component_warmups(self.max_steps)
        self.scheduler = make_scheduler(self.optimizer, self.warmups, self.max_steps, a.min_lr_ratio)
        self.model = self.loss_module
        if self.accelerator is not None:
            self.model, self.optimizer = self.accelerator.prepare(self.loss_module, self.optimizer)
        elif self.ddp:
            self.model = torch.nn.parallel.DistributedDataParallel(self.loss_module)
        # with FSDP, self.model is self.loss_module itself (fully_shard works in place)
        lrs = a.component_lrs()
        self.log(f"schedule: {self.max_steps} steps x {per_step} sequences; lr llm {lrs['llm']:.2e}, connector "
                 f"{lrs['connector']:.2e}, vit {lrs['vit']:.2e}; warmup {self.warmups}; cosine to "
                 f"{a.min_lr_ratio:.0%}")
        self._maybe_resume()
        return self

    def _shard(self) -> None:
        """FSDP2: one unit per decoder block and per ViT block, the rest (embeddings, connector, ln_f, head)
        in the root unit on the loss module. Parameter names stay the same."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for block in self.molmo.transformer.blocks:
            fully_shard(block, mesh=mesh)
        for block in self.molmo.vision_backbone.image_vit.transformer.resblocks:  # unused ones stay sharded
            fully_shard(block, mesh=mesh)
        fully_shard(self.loss_module, mesh=mesh)
        self.log(f"fsdp: parameters, gradients and optimizer state sharded over {self.world} processes "
                 f"({len(self.molmo.transformer.blocks)} decoder + "
                 f"{len(self.molmo.vision_backbone.image_vit.transformer.resblocks)} ViT units + root)")

    def _print_args(self) -> None:
        if self.rank == 0:
            self.log("train args: " + json.dumps(self.args.to_dict(), default=str)
                     + (f"; {self.world} processes" if self.world > 1 else ""))

    # ------------------------------------------------------------------ batches
    def _micro_batches(self, seq_pos: int) -> list[dict[str, torch.Tensor]]:
        a = self.args
        batches = []
        for m in range(a.grad_accum):
            examples = []
            for b in range(a.batch_size):
                p = seq_pos + (m * a.batch_size + b) * self.world + self.rank
                examples.append(self.train_stream.example(p))
            batches.append(collate(examples))
        return batches

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _all_reduce(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, device=self.device, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        a = self.args
        t0 = time.perf_counter()
        self.model.train()
        micro = self._micro_batches(self.seq_pos)
        n_local = sum(int((b["loss_mask"] > 0).sum()) for b in micro)
        tokens_local = sum(int((b["input_ids"] != -1).sum()) for b in micro)
        n_global, tokens_global = self._all_reduce([float(n_local), float(tokens_local)])
        divisor = max(n_global / self.world, 1.0)  # loss tokens per rank averaged over the global batch
        ce_local = 0.0
        for i, batch in enumerate(micro):
            batch = self._to_device(batch)
            self.dropout.set_mask(batch["loss_mask"] > 0)
            last = i == len(micro) - 1
            if self.fsdp:  # accumulate unsharded gradients locally, reduce-scatter after the last micro-batch
                self.model.set_requires_gradient_sync(last)
                sync = nullcontext()
            elif self.accelerator is not None and not last:
                sync = self.accelerator.no_sync(self.model)
            elif self.ddp and not last:
                sync = self.model.no_sync()
            else:
                sync = nullcontext()
            with sync:
                with self._autocast():
                    total, ce, _ = self.model(batch)
                loss = total / divisor
                if self.accelerator is not None:
                    self.accelerator.backward(loss)
                else:
                    loss.backward()
            ce_local += float(ce)
        self.dropout.set_mask(None)
        norms = clip_per_component(self.optimizer, a.max_grad_norm)
        lrs = {g["component"]: g["lr"] for g in self.optimizer.param_groups}  # the rates this step used
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.seq_pos += a.batch_size * a.grad_accum * self.world
        # every rank stops at the same step when any was asked to (a signal may reach one process only)
        ce_global, stops = self._all_reduce([ce_local, float(self.stop_requested)])
        self._stop_agreed = stops > 0
        dt = time.perf_counter() - t0
        return {"step": self.step, "loss": ce_global / max(n_global, 1.0), "lr": lrs.get("llm", 0.0),
                "lr_connector": lrs.get("connector", 0.0), "lr_vit": lrs.get("vit", 0.0),
                "tokens_per_s": tokens_global / dt, "loss_tokens": int(n_global), "step_s": dt,
                **{f"grad_norm_{k}": v for k, v in norms.items()}}

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean token CE over the held-out records (no dropout, fixed prompts)."""
        if self.eval_stream is None:
            return None
        self.model.eval()
        ce_sum = n_sum = 0.0
        n, bs = len(self.eval_stream), self.args.batch_size
        starts = list(range(self.rank * bs, n, bs * self.world))
        if self.fsdp:  # every rank must run as many forwards (each one all-gathers); extra ones are discarded
            starts += [None] * (math.ceil(n / (bs * self.world)) - len(starts))
        for start in starts:
            idx = range(start, min(n, start + bs)) if start is not None else range(min(n, bs))
            batch = self._to_device(collate([self.eval_stream.example(i) for i in idx]))
            with self._autocast():
                _, ce, k = self.loss_module(batch)
            if start is not None:
                ce_sum += float(ce)
                n_sum += k
        ce_sum, n_sum = self._all_reduce([ce_sum, n_sum])
        self.model.train()
        return ce_sum / max(n_sum, 1.0)

    # ------------------------------------------------------------------ fit
    def fit(self) -> TrainResult:
        a = self.args
        result = TrainResult(self.out, self.step)
        self._install_signal_handlers()
        self._open_metrics()
        start_step, t_start = self.step, time.perf_counter()
        step_times: list[float] = []
        try:
            while self.step < self.max_steps:
                m = self.train_step()
                step_times.append(m["step_s"])
                recent = step_times[-20:]
                m["elapsed_s"] = time.perf_counter() - t_start
                m["eta_s"] = (self.max_steps - self.step) * (sum(recent) / len(recent))
                result.losses.append(m["loss"])
                if a.eval_every and self.step % a.eval_every == 0 and self.step < self.max_steps:
                    ev = self.validate()
                    if ev is not None:
                        m["eval_loss"] = ev
                        result.eval_losses.append((self.step, ev))
                if self.step % a.log_every == 0 or self.step == self.max_steps or "eval_loss" in m:
                    self._log_step(m)
                for cb in self.callbacks:
                    cb(self, m)
                if self.stop_requested if self.world == 1 else self._stop_agreed:
                    self.log(f"stop requested: saving a checkpoint at step {self.step}")
                    result.stopped = True
                    self.save_checkpoint()
                    break
                if a.save_every and self.step % a.save_every == 0 and self.step < self.max_steps:
                    self.save_checkpoint()
            else:
                ev = self.validate()
                if ev is not None:
                    result.eval_losses.append((self.step, ev))
                    self._write_metrics({"step": self.step, "eval_loss": ev})
                    self.log(f"eval loss at step {self.step}: {ev:.4f}")
                if self.step > start_step or not self._latest_dir():
                    self.save_checkpoint()
        finally:
            self._close_metrics()
            self._restore_signal_handlers()
        result.steps = self.step
        self.plot()
        return result

    def run(self) -> TrainResult:
        """setup() + fit() + export() (when args.export)."""
        self.setup()
        result = self.fit()
        if self.args.export and (self.rank == 0 or self.fsdp):  # FSDP: every rank helps gather the weights
            result.final, result.adapter = self.export()
        return result

    # ------------------------------------------------------------------ logging
    def _log_step(self, m: dict) -> None:
        if self.rank != 0:
            return
        eta = time.strftime("%H:%M:%S", time.gmtime(m["eta_s"]))
        line = (f"step {m['step']:>6}/{self.max_steps}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  "
                f"{m['tokens_per_s']:,.0f} tok/s  eta {eta}")
        if "eval_loss" in m:
            line += f"  eval {m['eval_loss']:.4f}"
        self.log(line)
        keep = ("step", "loss", "lr", "lr_connector", "lr_vit", "tokens_per_s", "loss_tokens", "elapsed_s", "eta_s",
                "eval_loss")
        self._write_metrics({k: v for k, v in m.items() if k in keep or k.startswith("grad_norm_")})

    def _open_metrics(self) -> None:
        if self.rank != 0:
            return
        path = self.out / "metrics.jsonl"
        if path.exists():  # drop lines written after the checkpoint we resumed from, and a half-written last one
            kept = [ln for ln in path.read_text(errors="replace").splitlines() if _metrics_step(ln) <= self.step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self._metrics_file = open(path, "a", encoding="utf-8")

    def _write_metrics(self, m: dict) -> None:
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(m) + "\n")
            self._metrics_file.flush()

    def _close_metrics(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

    def plot(self) -> Path | None:
        if self.rank != 0:
            return None
        from .plot import plot_metrics

        try:
            return plot_metrics(self.out / "metrics.jsonl", self.out / "loss.png")
        except OSError as e:
            self.log(f"warning: could not write loss.png ({e})")
            return None

    # ------------------------------------------------------------------ stop signals
    def _install_signal_handlers(self) -> None:
        self._old_handlers = {}
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, h in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, h)

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_root(self) -> Path:
        return self.out / CHECKPOINTS

    def _latest_dir(self) -> Path | None:
        p = self.ckpt_root / LATEST
        if not p.is_file():
            return None
        d = self.ckpt_root / p.read_text().strip()
        return d if (d / "state.json").is_file() else None

    def _full_state(self) -> dict[str, torch.Tensor] | None:
        """FSDP, collective: the full (unsharded) model state dict under our names on rank 0 (CPU), None elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.loss_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        return {k.removeprefix("molmo."): v for k, v in sd.items()}

    def _opt_param_names(self) -> list[str]:
        """Parameter name of each optimizer index (the integer keys of `optimizer.state_dict()`)."""
        names = {id(p): n for n, p in self.molmo.named_parameters()}
        return [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights, full-size, on the CPU (FSDP: collective; ranks other than 0 get {})."""
        if self.fsdp:
            full = self._full_state()
            if full is None:
                return {}
            return {n: full[n].contiguous() for n, p in self.molmo.named_parameters() if p.requires_grad}
        return {n: p.detach().to("cpu").contiguous() for n, p in self.molmo.named_parameters() if p.requires_grad}

    def optimizer_state(self) -> dict | None:
        """`optimizer.state_dict()` of an unsharded run (integer keys, full-size state); FSDP: collective, gathered
        from the shards onto rank 0 (CPU), None elsewhere. The same file therefore resumes either way."""
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.loss_module, self.optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        full = osd["state"]
        state = {i: full["molmo." + n] for i, n in enumerate(self._opt_param_names()) if "molmo." + n in full}
        return {"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]}

    def _rng_states(self) -> list[dict]:
        """Every rank's RNG states (collective when distributed), in rank order."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        if self.world == 1:
            return [rng]
        rngs: list = [None] * self.world
        torch.distributed.all_gather_object(rngs, rng)
        return rngs

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step-N atomically and point `latest` at it (rank 0 writes; when distributed every
        rank must call this: the RNG states, and with FSDP the weights and optimizer state, are gathered).

        Raises:
            TrainError: the disk is full or not writable; the previous checkpoint stays the latest.
        """
        rngs = self._rng_states()
        if not self.fsdp and self.rank != 0:
            trainable = optim = None
        else:
            trainable, optim = self.trainable_state(), self.optimizer_state()
        err: TrainError | None = None
        final = None
        if self.rank == 0:
            try:
                final = self._write_checkpoint(trainable, optim, rngs)
            except TrainError as e:
                err = e
            except Exception as e:  # noqa: BLE001 -- other ranks wait on the broadcast below: tell them, never hang
                err = TrainError(f"Could not write checkpoint step-{self.step:07d}: {type(e).__name__}: {e}")
        if self.world > 1:  # every rank fails alike (rank 0 saw the full disk)
            msg = [str(err) if err is not None else None]
            torch.distributed.broadcast_object_list(msg, src=0)
            if msg[0] is not None and err is None:
                err = TrainError(msg[0])
        if err is not None:
            raise err
        if self.rank != 0:
            return None
        self._prune()
        self.log(f"checkpoint: {final}")
        self.plot()
        return final

    def _write_checkpoint(self, trainable: dict, optim: dict, rngs: list[dict]) -> Path:
        root = self.ckpt_root
        root.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.step:07d}"
        final = root / name
        tmp = root / f".tmp-{name}-{os.getpid()}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            _save_tensors(trainable, tmp / "trainable.safetensors")
            _save_torch(optim, tmp / "optimizer.pt")
            _save_torch(self.scheduler.state_dict(), tmp / "scheduler.pt")
            _save_torch(rngs[0], tmp / "rng.pt")
            for r, rng in enumerate(rngs[1:], start=1):
                _save_torch(rng, tmp / f"rng-rank{r}.pt")
            state = {"step": self.step, "seq_pos": self.seq_pos, "max_steps": self.max_steps,
                     "world": self.world, "fsdp": self.fsdp, "args": self.args.to_dict(), "time": time.time()}
            _write_bytes(tmp / "state.json", json.dumps(state, indent=2, default=str).encode())
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            pointer = root / f".{LATEST}.tmp-{os.getpid()}"
            _write_bytes(pointer, (name + "\n").encode())
            os.replace(pointer, root / LATEST)
            _fsync_dir(root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            for p in root.glob(f".{LATEST}.tmp-*"):
                p.unlink(missing_ok=True)
            prev = self._latest_dir()
            keep = f"the latest complete checkpoint is still {prev.name}" if prev else "no checkpoint was kept"
            if e.errno == errno.ENOSPC:
                free = _free_bytes(root)
                free_s = f" ({free / 2**30:.1f} GiB free)" if free is not None else ""
                raise TrainError(f"No space left on the device while writing checkpoint {name} to {root}{free_s}. "
                                 f"Free disk space or use --out on a larger disk, then run again to resume; "
                                 f"{keep}.") from e
            raise TrainError(f"Could not write checkpoint {name} to {root}: {e}. {keep[0].upper() + keep[1:]}.") from e
        return final

    def _prune(self) -> None:
        keep = max(1, self.args.keep_checkpoints)
        done = sorted(p for p in self.ckpt_root.glob("step-*") if p.is_dir())
        latest = self._latest_dir()
        for p in done[:-keep]:
            if latest is None or p.resolve() != latest.resolve():
                shutil.rmtree(p, ignore_errors=True)

    def _maybe_resume(self) -> None:
        a = self.args
        if self.rank == 0 and self.ckpt_root.is_dir():  # folders a killed run left mid-write are never resumed
            for p in self.ckpt_root.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
            for p in self.ckpt_root.glob(f".{LATEST}.tmp-*"):
                p.unlink(missing_ok=True)
        latest = self._latest_dir()
        if a.resume == "no" or latest is None:
            if a.resume == "yes":
                raise TrainError(f"--resume yes but {self.ckpt_root} has no complete checkpoint.")
            if a.resume == "no" and self.rank == 0 and self.ckpt_root.exists():
                shutil.rmtree(self.ckpt_root)
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            if self.world > 1:
                torch.distributed.barrier()  # nobody looks at OUT before rank 0 has cleared it
            return
        from safetensors.torch import load_file

        state = json.loads((latest / "state.json").read_text())
        saved = state.get("args", {})
        for key in ("mode", "lora_rank", "lora_connector"):
            if saved.get(key) != getattr(a, key):
                raise TrainError(f"Cannot resume from {latest}: it was trained with {key}={saved.get(key)!r}, this "
                                 f"run has {key}={getattr(a, key)!r}. Use the same settings, another --out, or "
                                 "--resume no to start over.")
        from safetensors import safe_open

        with safe_open(str(latest / "trainable.safetensors"), "pt") as f:
            saved_names = set(f.keys())
        params = dict(self.molmo.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in saved_names]
        if missing:
            raise TrainError(f"Checkpoint {latest} lacks {len(missing)} trainable tensors (e.g. {missing[:2]}).")
        if self.fsdp:
            self._load_sharded(latest)
        else:
            weights = load_file(str(latest / "trainable.safetensors"))
            with torch.no_grad():
                for n, t in weights.items():
                    params[n].copy_(t.to(params[n].dtype))
            self.optimizer.load_state_dict(torch.load(latest / "optimizer.pt", map_location=self.device,
                                                      weights_only=False))
        self.scheduler.load_state_dict(torch.load(latest / "scheduler.pt", weights_only=False))
        own = latest / f"rng-rank{self.rank}.pt"  # older checkpoints / fewer processes: rank 0's states
        rng = torch.load(own if self.rank > 0 and own.is_file() else latest / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step, self.seq_pos = state["step"], state["seq_pos"]
        self.log(f"resumed from {latest} at step {self.step}")

    def _load_sharded(self, latest: Path) -> None:
        """FSDP, collective: rank 0 reads the full weights and optimizer state, every rank keeps its shard."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        weights, optim = {}, {}
        if self.rank == 0:
            weights = {"molmo." + k: v for k, v in load_file(str(latest / "trainable.safetensors")).items()}
            saved = torch.load(latest / "optimizer.pt", map_location="cpu", weights_only=False)
            names = ["molmo." + n for n in self._opt_param_names()]
            optim = {"state": {names[i]: st for i, st in saved["state"].items()},
                     "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
        set_model_state_dict(self.loss_module, weights, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=False))  # frozen weights stay the base's
        set_optimizer_state_dict(self.loss_module, self.optimizer, optim, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))

    # ------------------------------------------------------------------ export
    def export(self) -> tuple[Path, Path | None]:
        """out/final in the official format (merged weights for LoRA), plus out/adapter for LoRA.
        FSDP: every rank must call this (the weights are gathered); rank 0 writes, the others get (None, None)."""
        from .export import export_model, merged_from_adapter
        from .lora import save_adapter

        dtype = torch.float32 if self.args.export_dtype == "float32" else torch.bfloat16
        info = {"base": str(self.args.model), "mode": self.args.mode, "steps": self.step,
                "max_crops": self.args.max_crops, "args": self.args.to_dict()}  # molmo_core.load reads max_crops
        if self.args.mode == "full":
            state = self._full_state() if self.fsdp else self.molmo.state_dict()  # FSDP: gathered, collective
            if state is None:  # FSDP, rank > 0
                return None, None
            final = export_model(state, self.base_path, self.out / "final", dtype, extra=info)
            self.log(f"exported: {final}")
            return final, None
        adapter = save_adapter(self.molmo, self.out / "adapter")
        merged = merged_from_adapter(self.base_path, adapter, dtype=dtype)
        final = export_model(merged.state_dict(), self.base_path, self.out / "final", dtype, extra=info)
        del merged
        self.log(f"exported: {final} (merged) and {adapter} (adapter)")
        return final, adapter


def train(args: TrainArgs, **kwargs) -> TrainResult:
    """Run a whole fine-tune (setup, fit, export). See `Trainer` for the files written."""
    return Trainer(args, **kwargs).run()
