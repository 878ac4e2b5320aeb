"""The training recipe: arguments, parameter groups, learning-rate schedule, clipping, loss, dropout.

Follows the Molmo captioner recipe (allenai/molmo `launch_scripts/train_captioner.py`) by default:

  * three components with their own learning rate and warmup: connector (pooling, projector, pad
    embeddings, `wte.new_embedding`), ViT (`vision_backbone.image_vit`), LLM (embeddings, blocks, ln_f,
    LM head). `lr` is the LLM's rate; the connector's and ViT's follow the paper's ratios
    (captioner 2e-4 / 6e-6 / 2e-5 -> x10 and x0.3; multitask fine-tuning 5e-6 / 5e-6 / 1e-5 -> x0.5, x0.5);
  * AdamW betas (0.9, 0.95), eps 1e-6, weight decay 0; linear warmup from 0, then cosine to 10 % of peak;
  * gradient clipping at 1.0 *per component* (each component's own global norm);
  * loss = token CE + 1e-4 * logsumexp(logits)^2 (z-loss) on answer tokens, summed and divided by the number
    of loss tokens in the whole optimizer step (all micro-batches, averaged over ranks);
  * "text-only" dropout: dropout 0.1 on the residual branches at response positions only;
  * bf16 autocast on GPU over fp32 master weights; activation checkpointing per decoder block.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# (connector ratio, ViT ratio, warmups (connector, ViT, LLM)) per recipe, relative to the LLM rate.
RECIPES: dict[str, tuple[float, float, tuple[int, int, int]]] = {
    "captioner": (10.0, 0.3, (200, 2000, 2000)),  # 2e-4 / 6e-6 / 2e-5, train_captioner.py
    "finetune": (0.5, 0.5, (200, 200, 200)),  # 5e-6 / 5e-6 / 1e-5, train_multitask_model.py
}
COMPONENTS = ("connector", "vit", "llm")


@dataclass
class TrainArgs:
    """Everything a run needs; saved with every checkpoint. CLI flags are the field names with dashes."""

    model: str = ""
    """Base checkpoint: a local folder or a hub id (e.g. allenai/Molmo-7B-D-0924)."""
    data: list[str] = field(default_factory=list)
    """Training data: PixMo-Cap parquet, JSONL, a folder of those, clocks:N or shapes:N[:count|:point][:max=M][:plain]
    (several allowed)."""
    out: str = ""
    """Output folder: checkpoints/, metrics.jsonl, loss.png, final/ (and adapter/ for LoRA)."""
    images_dir: str | None = None
    """Folder holding the images the data refers to (default: next to the data file)."""
    eval_data: list[str] = field(default_factory=list)
    """Held-out data (same forms as data, e.g. shapes:16); default: eval_fraction of the training records. Held-out
    point, count and clock questions are answered by the model and scored (eval_count_accuracy, ... in
    metrics.jsonl)."""
    mode: str = "lora"
    """lora | qlora (4-bit base + LoRA) | full."""
    recipe: str = "captioner"
    """Learning-rate ratios and warmups: captioner (PixMo-Cap pre-training) or finetune (the released models'
    multitask stage)."""
    lr: float | None = None
    """LLM learning rate (default 2e-5 for full, 1e-4 for LoRA/QLoRA); connector and ViT follow the recipe."""
    connector_lr_ratio: float | None = None
    """Override the recipe's connector/LLM learning-rate ratio."""
    vit_lr_ratio: float | None = None
    """Override the recipe's ViT/LLM learning-rate ratio."""
    warmup: int | None = None
    """Warmup steps for every component (default: the recipe's, capped at 10 % of the run)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (paper: 0); norms, embeddings and biases never decay."""
    max_grad_norm: float = 1.0
    """Clip each component's gradient norm to this (0 = no clipping)."""
    z_loss: float = 1e-4
    """Weight of the logsumexp^2 auxiliary loss."""
    response_dropout: float = 0.1
    """Dropout on the residual branches at answer positions only ("text-only dropout")."""
    max_steps: int | None = None
    """Optimizer steps; default: epochs over the training records."""
    epochs: float = 4.0
    """Used when max_steps is not given (the captioner trained 4 epochs)."""
    batch_size: int = 1
    """Packed sequences (= images) per micro-batch per device."""
    grad_accum: int = 8
    """Micro-batches per optimizer step."""
    max_seq_len: int = 2304
    """Packed sequence length; later annotations that do not fit are dropped."""
    max_crops: int = 12
    """Image crops (as at inference); lower for speed and memory."""
    max_caption_chars: int = 6000
    """Longer captions/transcripts are truncated with a warning."""
    prompt_format: str = "captioner"
    """captioner: raw ' long_caption 40:' (the captioner's; what the app's Caption tab sends, template "none");
    chat: ' User: long_caption 40: Assistant:' (the released models' chat wrapper, template "role")."""
    hint_prob: float = 0.9
    """Fraction of caption examples whose prompt carries the length hint."""
    hint_noise_chars: float = 25.0
    """Std of the Gaussian jitter (characters) added before dividing the length by 15."""
    annotations: str = "all"
    """all: every caption and transcript of an image in one sequence; paper: caption + one transcript."""
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_connector: bool = False
    """Also put LoRA on the connector (pooling attention and projector)."""
    freeze: list[str] = field(default_factory=list)
    """Full mode only: components to keep frozen (connector, vit, llm)."""
    gradient_checkpointing: bool = True
    """Recompute each decoder block in the backward pass (less memory, ~30 % slower)."""
    bf16: bool = True
    """bf16 autocast on GPU (weights stay fp32 in full mode). Ignored on CPU."""
    device: str | None = None
    """cuda | cpu | cuda:N; default cuda when available."""
    fsdp: bool = False
    """Full mode, several processes (torchrun / accelerate launch): shard parameters, gradients and optimizer
    state over the processes (torch FSDP2, one unit per decoder / ViT block) instead of replicating them (DDP)."""
    seed: int = 0
    log_every: int = 1
    eval_every: int = 100
    eval_fraction: float = 0.05
    save_every: int = 200
    keep_checkpoints: int = 2
    resume: str = "auto"
    """auto: continue from OUT/checkpoints/latest when present; yes: require it; no: start over."""
    export: bool = True
    """Write OUT/final (official format) at the end."""
    export_dtype: str = "float32"
    """float32 (as the official checkpoints) or bfloat16 (half the size). LoRA / QLoRA merge the adapter into the
    base loaded on the CPU in this dtype, so the export needs that much host memory (7B: 28 GB float32, 14 GB
    bfloat16; `--no-export` skips it). A QLoRA adapter was trained against the 4-bit base: merged into the
    unquantized base it gives slightly different logits; OUT/adapter is the exact result."""

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.mode == "full" else 1e-4)

    def component_lrs(self) -> dict[str, float]:
        conn, vit, _ = RECIPES[self.recipe]
        lr = self.resolved_lr()
        conn = self.connector_lr_ratio if self.connector_lr_ratio is not None else conn
        vit = self.vit_lr_ratio if self.vit_lr_ratio is not None else vit
        return {"connector": lr * conn, "vit": lr * vit, "llm": lr}

    def component_warmups(self, max_steps: int) -> dict[str, int]:
        if self.warmup is not None:
            return dict.fromkeys(COMPONENTS, self.warmup)
        cap = max(0, int(0.1 * max_steps))
        return {c: min(w, cap) for c, w in zip(COMPONENTS, RECIPES[self.recipe][2])}

    def validate(self) -> None:
        """Raises ValueError naming the bad field and the accepted values."""
        checks = [
            (self.mode in ("lora", "qlora", "full"), f"mode must be lora, qlora or full; got {self.mode!r}"),
            (self.recipe in RECIPES, f"recipe must be one of {sorted(RECIPES)}; got {self.recipe!r}"),
            (self.prompt_format in ("chat", "captioner"), f"prompt_format must be chat or captioner; got "
                                                          f"{self.prompt_format!r}"),
            (self.annotations in ("all", "paper", "captions"), "annotations must be all, paper or captions"),
            (self.resume in ("auto", "yes", "no"), f"resume must be auto, yes or no; got {self.resume!r}"),
            (self.export_dtype in ("float32", "bfloat16"), "export_dtype must be float32 or bfloat16"),
            (bool(self.model), "--model is required (a checkpoint folder or hub id)"),
            (bool(self.data), "--data is required (parquet, JSONL, folder, clocks:N or shapes:N)"),
            (bool(self.out), "--out is required (the output folder)"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1; got {self.max_steps} (leave it "
                                                             "out to train epochs over the data)"),
            (self.lr is None or self.lr > 0, f"lr must be > 0; got {self.lr} (leave it out for the default: 2e-5 "
                                             "full, 1e-4 LoRA / QLoRA)"),
            (0 <= self.hint_prob <= 1, "hint_prob must be within 0..1"),
            (all(c in COMPONENTS for c in self.freeze), f"freeze takes {COMPONENTS}; got {self.freeze}"),
            (not self.fsdp or self.mode == "full", "fsdp shards full fine-tunes only: use --mode full, or drop "
                                                   "--fsdp (LoRA / QLoRA train with DDP)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------- parameter groups
def component_of(name: str) -> str:
    """Parameter name (ours, possibly with LoRA infixes) -> connector | vit | llm (the captioner's groups)."""
    if "vision_backbone.image_vit" in name:
        return "vit"
    if "vision_backbone." in name or "wte.new_embedding" in name:
        return "connector"
    return "llm"


_NO_DECAY = re.compile(r"(norm|ln_f|pre_ln|bias|embedding|pad_embed|class_embedding)")


def param_groups(model: nn.Module, lrs: dict[str, float], weight_decay: float) -> list[dict]:
    """Trainable parameters split into component x (decay, no decay) AdamW groups."""
    buckets: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = weight_decay > 0 and p.ndim >= 2 and not _NO_DECAY.search(name)
        buckets.setdefault((component_of(name), decay), []).append(p)
    groups = []
    for (comp, decay), params in sorted(buckets.items()):
        groups.append({"params": params, "lr": lrs[comp], "initial_lr": lrs[comp], "component": comp,
                       "weight_decay": weight_decay if decay else 0.0, "name": f"{comp}{'' if decay else '_nodecay'}"})
    if not groups:
        raise ValueError("No trainable parameters: check --mode and --freeze.")
    return groups


def make_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-6)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup from 0 over `warmup` steps, then cosine from 1 to min_ratio at `total` (olmo CosWithWarmup)."""
    if step < warmup:
        return step / max(1, warmup)
    t, t_max = step - warmup, max(1, total - warmup)
    t = min(t, t_max)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t / t_max))


def make_scheduler(opt: torch.optim.Optimizer, warmups: dict[str, int], total: int, min_ratio: float):
    # LambdaLR's count starts at 0 before the first optimizer step; the trainer's steps are 1..total (as in
    # the official trainer), so the first step already has a non-zero rate and the last one ends at min_ratio.
    fns = [lambda s, w=warmups[g["component"]]: lr_factor(s + 1, w, total, min_ratio) for g in opt.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(opt, fns)


def clip_per_component(opt: torch.optim.Optimizer, max_norm: float) -> dict[str, float]:
    """Clip each component's gradients to its own global norm <= max_norm; returns the norms before clipping."""
    by_comp: dict[str, list] = {}
    for g in opt.param_groups:
        by_comp.setdefault(g["component"], []).extend(p for p in g["params"] if p.grad is not None)
    norms = {}
    for comp, params in by_comp.items():
        if not params:
            continue
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # FSDP: sharded (DTensor) gradients give a DTensor norm
            norm = norm.full_tensor()
        norms[comp] = float(norm)
    return norms


# ----------------------------------------------------------------------------------------- loss
def loss_sums(model: nn.Module, batch: dict[str, torch.Tensor], z_loss: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward a packed batch; returns (sum of CE + z-loss over loss tokens, sum of CE, number of loss tokens).

    Logits are computed for the loss positions only ((N, V) in fp32), which matters with a 152k vocabulary.
    """
    molmo = unwrap(model)
    hidden = model(batch["input_ids"], batch["images"], batch["image_masks"], batch["image_input_idx"],
                   position_ids=batch["position_ids"], allowed=batch["allowed"], return_hidden=True)  # (B, T, d)
    sel = batch["loss_mask"] > 0
    h = hidden[sel]  # (N, d)
    logits = molmo.head()(h).float()  # (N, V)
    targets = batch["targets"][sel]
    weights = batch["loss_mask"][sel]
    ce = F.cross_entropy(logits, targets, reduction="none")
    total = ce
    if z_loss > 0:
        total = ce + z_loss * torch.logsumexp(logits, dim=-1).pow(2)
    return (total * weights).sum(), (ce * weights).sum().detach(), int(sel.sum())


def unwrap(model: nn.Module) -> nn.Module:
    """The Molmo module under DDP / FSDP / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


# ----------------------------------------------------------------------------------------- text-only dropout
class ResponseDropout:
    """Dropout on residual branch outputs at response positions only (`response_residual_dropout`).

    Forward hooks on the modules whose output is added to the residual stream: `attn_out` and the block MLP's
    `ff_out` (pre-norm), `attn_norm` / `ff_norm` (post-norm 7B-O, where the norm is the branch's last op), or
    `attn.attn_out` / `mlp` (MolmoE). `set_mask(mask)` before each forward; nothing happens in eval mode.
    """

    def __init__(self, model: nn.Module, p: float):
        self.p = p
        self.mask: torch.Tensor | None = None  # (B, T) bool
        self.handles = []
        if p <= 0:
            return
        molmo = unwrap(model)
        for block in molmo.transformer.blocks:
            if hasattr(block, "attn") and hasattr(block, "mlp") and isinstance(block.mlp, nn.Module):
                targets = [block.attn.attn_out, block.mlp]
            elif molmo.config.text.norm_after:
                targets = [block.attn_norm, block.ff_norm]
            else:
                targets = [block.attn_out, block.ff_out]
            for m in targets:
                self.handles.append(m.register_forward_hook(self._hook))

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor):
        if not module.training or self.mask is None or output.dim() != 3 or output.shape[:2] != self.mask.shape:
            return None
        dropped = F.dropout(output, self.p, training=True)
        return torch.where(self.mask[..., None], dropped, output)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ----------------------------------------------------------------------------------------- checkpointing
def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder block in backward (non-reentrant; dropout RNG is replayed exactly)."""
    for block in unwrap(model).transformer.blocks:
        if getattr(block, "_ckpt_wrapped", False):
            continue
        inner: Callable = block.forward

        def forward(x, cos, sin, mask, cache=None, layer=0, cache_pos=None, _inner=inner):
            if cache is not None or not torch.is_grad_enabled():
                return _inner(x, cos, sin, mask, cache, layer, cache_pos)
            return checkpoint(_inner, x, cos, sin, mask, None, layer, None, use_reentrant=False)

        block.forward = forward
        block._ckpt_wrapped = True
