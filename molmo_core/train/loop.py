"""The training loop, in plain sight: setup() -> fit() -> validate() / save_checkpoint() -> export().

    trainer = Trainer(TrainArgs(model=..., data=[...], out=...))
    result = trainer.run()          # setup + fit + export; or call the steps yourself

Files under `args.out`:
    metrics.jsonl              one JSON object per logged step: step, loss, lr, lr_connector, lr_vit,
                               tokens_per_s, loss_tokens, grad_norm_*, elapsed_s, eta_s; eval lines add eval_loss
                               and, when the held-out records hold point / count / clock questions, the task
                               metrics of the model's greedy answers: eval_point_f1 / _precision / _recall,
                               eval_count_accuracy / _close, eval_clock_overall_exact / _overall_close, and
                               eval_{task}_n (see task_eval.py)
    loss.png                   the loss curve (PIL drawing; refreshed at every eval and checkpoint)
    checkpoints/step-NNNNNNN/  trainable.safetensors, optimizer.pt, scheduler.pt, rng.pt, state.json
    checkpoints/latest         the name of the newest *complete* checkpoint (updated last, atomically)
    final/                     the model in the official checkpoint format (`molmo_core.load(out/final)`)
    adapter/                   LoRA / QLoRA only: the adapter (peft LoRA config + safetensors)

A checkpoint is written into `checkpoints/.tmp-...`, every file fsynced, the folder renamed, and only then
is `latest` replaced (write + fsync + rename), so a crash or a full disk mid-write never leaves a corrupted
checkpoint as the latest. Resuming restores the trainable weights, optimizer, scheduler, RNG states and
the data position, so a resumed run reproduces the losses of an uninterrupted one.

Several processes (WORLD_SIZE > 1, started by torchrun or `accelerate launch`) are handled by one strategy
object chosen in `setup()` (`dist.py`): DDP (default; accelerate's Accelerator on GPU, torch DDP over gloo on
CPU; every process holds the whole model and rank 0 writes checkpoints from its copy) or FSDP2 (`--fsdp`, full
mode, or an accelerate config that says FSDP). Under FSDP checkpoints and the export are collective: every rank
takes part in gathering the full weights and optimizer state, rank 0 writes the same files as a single process,
so a run may be resumed with another number of processes or without FSDP, and the other way round; resuming
loads the full state on rank 0 and broadcasts it into the shards. Each rank's RNG state is saved too (rng.pt is
rank 0's, rng-rank{R}.pt the others'), so resumed runs with text-only dropout reproduce the uninterrupted ones.
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
from .dist import choose_strategy
from .recipe import (ResponseDropout, TrainArgs, clip_per_component, enable_gradient_checkpointing, loss_sums,
                     make_optimizer, make_scheduler, param_groups)
from .task_eval import format_metrics, generate_answers, score_items, summarize, task_items

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
    eval_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # task metrics by step
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


# ----------------------------------------------------------------------------------------- run bookkeeping
class RunFiles:
    """What every trainer (Molmo v1 here, Molmo2 in molmo2.py) does the same way around its loop: run(),
    the step log line and metrics.jsonl, loss.png, stop signals, and where checkpoints live. Subclasses
    set `args`, `out`, `log`, `step`, `max_steps`, `rank` and `stop_requested`, and define setup(), fit()
    and export()."""

    def _record_eval(self, result: TrainResult, ev: dict[str, float]) -> None:
        result.eval_losses.append((self.step, ev["eval_loss"]))
        tasks = {k: v for k, v in ev.items() if k != "eval_loss"}
        if tasks:
            result.eval_metrics.append((self.step, tasks))

    def run(self) -> TrainResult:
        """setup() + fit() + export() (when args.export)."""
        self.setup()
        result = self.fit()
        if self.args.export:
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
            tasks = format_metrics(m)
            line += f" ({tasks})" if tasks else ""
        self.log(line)
        keep = ("step", "loss", "lr", "lr_connector", "lr_vit", "tokens_per_s", "loss_tokens", "elapsed_s", "eta_s")
        self._write_metrics({k: v for k, v in m.items() if k in keep or k.startswith(("grad_norm_", "eval_"))})

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


# ----------------------------------------------------------------------------------------- trainer
class Trainer(RunFiles):
    """One fine-tune. `setup()` loads the model, data and optimizer (and resumes), `fit()` runs the loop,
    `export()` writes out/final. Whether this is one process, DDP or FSDP is decided once in `setup()`:
    `self.dist` (see `dist.py`) wraps the model, runs the backward and the collectives."""

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
        self.world, self.rank = 1, 0
        self._metrics_file = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        """Seed, choose the distribution strategy, load the model, the data and the optimizer, resume from
        checkpoints/latest when there is one; returns self."""
        a = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(a.seed)
        random.seed(a.seed)
        np.random.seed(a.seed % 2**32)
        self.dist = choose_strategy(a)
        self.device, self.world, self.rank = self.dist.device, self.dist.world, self.dist.rank
        self.autocast = self.device.type == "cuda" and a.bf16
        if self.rank != 0:
            self.log = lambda s: None
        self.log("train args: " + json.dumps(a.to_dict(), default=str)
                 + (f"; {self.world} processes" if self.world > 1 else ""))
        self._load_model()
        self._load_data()
        self._make_optimizer()
        self._maybe_resume()
        return self

    def _load_model(self) -> None:
        """The base model with LoRA adapters (lora, qlora) or its chosen components trainable (full), inside the
        loss module, sharded when the strategy shards."""
        from ..api import load

        a = self.args
        if a.mode == "full":
            dtype, quantize = torch.float32, None  # fp32 master weights; bf16 comes from autocast
        else:
            dtype = torch.bfloat16 if self.autocast else torch.float32  # frozen base in bf16 on GPU
            quantize = "4bit" if a.mode == "qlora" else None
        self.runner = load(a.model, device=self.dist.load_device, dtype=dtype, quantize=quantize,
                           max_crops=a.max_crops)
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
        self.log(f"model: {a.model} ({a.mode}) on {self.device}, {n_train / 1e6:.3g} M of {n_all / 1e6:.3g} M "
                 f"parameters trainable")
        if a.fsdp and not self.dist.sharded:
            self.log("--fsdp: one process, nothing to shard; training unsharded")
        self.loss_module = LossModule(self.molmo, a.z_loss)
        self.dist.shard(self.loss_module, self.log)

    def _load_data(self) -> None:
        """Training and held-out example streams, and the number of steps."""
        a = self.args
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
        self.task_items = task_items(eval_records)
        if self.task_items:
            tasks = sorted({it.task for it in self.task_items})
            self.log(f"held-out task metrics: {len(self.task_items)} {' / '.join(tasks)} questions answered "
                     "greedily at every evaluation"
                     + ("; skipped under FSDP (see Trainer.task_metrics)" if self.dist.sharded else ""))
        self.max_steps = a.max_steps or max(1, math.ceil(a.epochs * len(train_records) / self._sequences_per_step))

    @property
    def _sequences_per_step(self) -> int:
        return self.args.batch_size * self.args.grad_accum * self.world

    def _make_optimizer(self) -> None:
        """AdamW over the component groups and the schedule; made after sharding (FSDP replaces the parameters
        by DTensor shards), then handed to the strategy to wrap."""
        a = self.args
        lrs = a.component_lrs()
        optimizer = make_optimizer(param_groups(self.molmo, lrs, a.weight_decay))
        self.warmups = a.component_warmups(self.max_steps)
        self.scheduler = make_scheduler(optimizer, self.warmups, self.max_steps, a.min_lr_ratio)
        self.model, self.optimizer = self.dist.wrap(self.loss_module, optimizer)
        self.log(f"schedule: {self.max_steps} steps x {self._sequences_per_step} sequences; lr llm {lrs['llm']:.2e}, "
                 f"connector {lrs['connector']:.2e}, vit {lrs['vit']:.2e}; warmup {self.warmups}; cosine to "
                 f"{a.min_lr_ratio:.0%}")

    # ------------------------------------------------------------------ batches
    def _micro_batches(self, seq_pos: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the step starting at sequence `seq_pos` (rank r takes every world-th)."""
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

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches (per rank); returns its metrics."""
        a = self.args
        t0 = time.perf_counter()
        self.model.train()
        micro = self._micro_batches(self.seq_pos)
        n_local = sum(int((b["loss_mask"] > 0).sum()) for b in micro)
        tokens_local = sum(int((b["input_ids"] != -1).sum()) for b in micro)
        n_global, tokens_global = self.dist.all_reduce([float(n_local), float(tokens_local)])
        divisor = max(n_global / self.world, 1.0)  # loss tokens per rank averaged over the global batch
        ce_local = 0.0
        for i, batch in enumerate(micro):
            batch = self._to_device(batch)
            self.dropout.set_mask(batch["loss_mask"] > 0)
            with self.dist.sync(self.model, last=i == len(micro) - 1):
                with self._autocast():
                    total, ce, _ = self.model(batch)
                self.dist.backward(total / divisor)
            ce_local += float(ce)
        self.dropout.set_mask(None)
        norms = clip_per_component(self.optimizer, a.max_grad_norm)
        lrs = {g["component"]: g["lr"] for g in self.optimizer.param_groups}  # the rates this step used
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.seq_pos += self._sequences_per_step
        (ce_global,) = self.dist.all_reduce([ce_local])
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
        for start in self.dist.eval_starts(n, bs):
            idx = range(start, min(n, start + bs)) if start is not None else range(min(n, bs))
            batch = self._to_device(collate([self.eval_stream.example(i) for i in idx]))
            with self._autocast():
                _, ce, k = self.loss_module(batch)
            if start is not None:
                ce_sum += float(ce)
                n_sum += k
        ce_sum, n_sum = self.dist.all_reduce([ce_sum, n_sum])
        self.model.train()
        return ce_sum / max(n_sum, 1.0)

    def evaluate(self) -> dict[str, float]:
        """{"eval_loss": ..., plus the task metrics (`task_metrics`)}; {} without held-out records."""
        loss = self.validate()
        return {} if loss is None else {"eval_loss": loss, **self.task_metrics()}

    def task_metrics(self) -> dict[str, float]:
        """Greedy answers of the model being trained (eval mode, LoRA adapters included) to the held-out point /
        count / clock questions, scored by molmo_core.eval: {"eval_count_accuracy": ..., ...}; {} when there are none.

        Several processes: under DDP every rank answers every world-th question with its own (identical) copy of the
        model, which needs no collective, and the scores are gathered. Under FSDP a decode step would be collective
        (every rank gathering each block's weights, in lockstep over a variable number of steps), so task metrics
        are skipped there: score OUT/final with `launch.py --eval` instead."""
        if not self.task_items or self.dist.sharded:
            return {}
        mine = self.task_items[self.rank::self.world]
        template = "none" if self.args.prompt_format == "captioner" else "role"
        scored, err = [], None
        self.model.eval()
        try:
            with self._autocast():
                answers = generate_answers(self.molmo, self.runner.processor, mine, template=template)
            scored = score_items(mine, answers)
        except Exception as e:  # noqa: BLE001 -- the other ranks wait in the gather below: tell them, never hang
            err = f"{type(e).__name__}: {e}"
        finally:
            self.model.train()
        gathered = self.dist.all_gather_object((scored, err))
        errors = [e for _, e in gathered if e]
        if errors:
            raise TrainError(f"Answering the held-out questions at step {self.step} failed: {errors[0]}. Train "
                             "without them (--eval-fraction 0, or --eval-data without point / count / clock data).")
        return summarize([s for part, _ in gathered for s in part])

    # ------------------------------------------------------------------ fit
    def fit(self) -> TrainResult:
        """Train from the current step to max_steps: log, evaluate and save on schedule; on a stop request
        (SIGTERM / SIGINT) save a checkpoint and return early; at the end evaluate and save once more."""
        a = self.args
        result = TrainResult(self.out, self.step)
        self._install_signal_handlers()
        self._open_metrics()
        start_step, t_start = self.step, time.perf_counter()
        step_times: list[float] = []
        try:
            for _ in range(self.step, self.max_steps):  # train_step advances self.step
                m = self.train_step()
                step_times.append(m["step_s"])
                m["elapsed_s"] = time.perf_counter() - t_start
                recent = step_times[-20:]
                m["eta_s"] = (self.max_steps - self.step) * (sum(recent) / len(recent))
                result.losses.append(m["loss"])
                if a.eval_every and self.step % a.eval_every == 0 and self.step < self.max_steps:
                    ev = self.evaluate()
                    if ev:
                        m.update(ev)
                        self._record_eval(result, ev)
                if self.step % a.log_every == 0 or self.step == self.max_steps or "eval_loss" in m:
                    self._log_step(m)
                for cb in self.callbacks:
                    cb(self, m)
                if self._stop_agreed():
                    self.log(f"stop requested: saving a checkpoint at step {self.step}")
                    result.stopped = True
                    self.save_checkpoint()
                    break
                if a.save_every and self.step % a.save_every == 0 and self.step < self.max_steps:
                    self.save_checkpoint()
            else:
                ev = self.evaluate()
                if ev:
                    self._record_eval(result, ev)
                    self._write_metrics({"step": self.step, **ev})
                    tasks = format_metrics(ev)
                    self.log(f"eval loss at step {self.step}: {ev['eval_loss']:.4f}" + (f"; {tasks}" if tasks else ""))
                if self.step > start_step or not self._latest_dir():
                    self.save_checkpoint()
        finally:
            self._close_metrics()
            self._restore_signal_handlers()
        result.steps = self.step
        self.plot()
        return result

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop: a signal may reach one process only, every rank stops alike."""
        (stops,) = self.dist.all_reduce([float(self.stop_requested)])
        return stops > 0

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights, full-size, on the CPU; {} on ranks other than 0 (collective under FSDP)."""
        full = self.dist.model_state(self.loss_module)
        if full is None:
            return {}
        return {n: full[n].to("cpu").contiguous() for n, p in self.molmo.named_parameters() if p.requires_grad}

    def optimizer_state(self) -> dict | None:
        """`optimizer.state_dict()` as one process has it (integer keys, full-size state) on rank 0, None elsewhere
        (collective under FSDP: gathered from the shards). The same file therefore resumes either way."""
        return self.dist.optimizer_state(self.loss_module, self.optimizer)

    def _rng_states(self) -> list[dict]:
        """Every rank's RNG states (collective when distributed), in rank order."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        return self.dist.all_gather_object(rng)

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step-N atomically and point `latest` at it (rank 0 writes; when distributed every
        rank must call this: the RNG states, and with FSDP the weights and optimizer state, are gathered).

        Raises:
            TrainError: the disk is full or not writable; the previous checkpoint stays the latest.
        """
        rngs = self._rng_states()
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
        msg = self.dist.broadcast_object(str(err) if err is not None else None)  # every rank fails alike
        if msg is not None and err is None:
            err = TrainError(msg)
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
                     "world": self.world, "fsdp": self.dist.sharded, "args": self.args.to_dict(), "time": time.time()}
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
        """Continue from checkpoints/latest (resume auto / yes), or clear OUT's checkpoints (resume no)."""
        a = self.args
        if self.rank == 0 and self.ckpt_root.is_dir():  # folders a killed run left mid-write are never resumed
            for p in self.ckpt_root.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
            for p in self.ckpt_root.glob(f".{LATEST}.tmp-*"):
                p.unlink(missing_ok=True)
        latest = self._latest_dir()
        if a.resume == "no" or latest is None:
            if a.resume == "yes":
                raise TrainError(f"--resume yes but {self.ckpt_root} has no complete checkpoint. Start without "
                                 "--resume yes, or point --out at the folder of the run to continue.")
            if a.resume == "no" and self.rank == 0 and self.ckpt_root.exists():
                shutil.rmtree(self.ckpt_root)
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            self.dist.barrier()  # nobody looks at OUT before rank 0 has cleared it
            return
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
        missing = [n for n, p in self.molmo.named_parameters() if p.requires_grad and n not in saved_names]
        if missing:
            raise TrainError(f"Checkpoint {latest} lacks {len(missing)} trainable tensors (e.g. {missing[:2]}): it "
                             "was written for another model or --freeze. Use another --out, or --resume no.")
        self.dist.load_state(self.loss_module, self.optimizer, latest / "trainable.safetensors",
                             latest / "optimizer.pt")
        from ..weights import load_torch_file  # weights_only: a checkpoint folder can come from anyone

        self.scheduler.load_state_dict(load_torch_file(latest / "scheduler.pt"))
        own = latest / f"rng-rank{self.rank}.pt"  # older checkpoints / fewer processes: rank 0's states
        rng = load_torch_file(own if self.rank > 0 and own.is_file() else latest / "rng.pt", numpy_arrays=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step, self.seq_pos = state["step"], state["seq_pos"]
        self.log(f"resumed from {latest} at step {self.step}")

    # ------------------------------------------------------------------ export
    def export(self) -> tuple[Path | None, Path | None]:
        """out/final in the official format (merged weights for LoRA), plus out/adapter for LoRA.
        Every rank calls this (FSDP gathers the weights collectively); rank 0 writes, the others get (None, None)."""
        from .export import export_model, merged_from_adapter
        from .lora import save_adapter

        dtype = torch.float32 if self.args.export_dtype == "float32" else torch.bfloat16
        info = {"base": str(self.args.model), "mode": self.args.mode, "steps": self.step,
                "max_crops": self.args.max_crops, "args": self.args.to_dict()}  # molmo_core.load reads max_crops
        if self.args.mode == "full":
            state = self.dist.model_state(self.loss_module)
            if state is None:
                return None, None
            final = export_model(state, self.base_path, self.out / "final", dtype, extra=info)
            self.log(f"exported: {final}")
            return final, None
        if self.rank != 0:
            return None, None
        adapter = save_adapter(self.molmo, self.out / "adapter")
        merged = merged_from_adapter(self.base_path, adapter, dtype=dtype)
        final = export_model(merged.state_dict(), self.base_path, self.out / "final", dtype, extra=info)
        del merged
        self.log(f"exported: {final} (merged) and {adapter} (adapter)")
        return final, adapter


def train(args: TrainArgs, **kwargs) -> TrainResult:
    """Run a whole fine-tune (setup, fit, export). See `Trainer` for the files written."""
    return Trainer(args, **kwargs).run()
