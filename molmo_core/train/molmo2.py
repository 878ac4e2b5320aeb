"""Fine-tuning a Molmo2 base (transformers' native `Molmo2ForConditionalGeneration`) with peft LoRA or QLoRA.

    python launch.py --finetune --model allenai/Molmo2-4B --data caps.jsonl --out runs/m2 --mode lora|qlora
    (the same command line as Molmo v1; `cli.main` sends Molmo2 bases here, read from config.json)

What it does, step by step (one process; several processes, FSDP and --mode full are refused with a message):
  * model: `load_molmo2(base, quantize=None | "4bit")`, fp32 on the CPU, bf16 on a GPU; QLoRA keeps the vision
    tower, the adapter (`multi_modal_projector`) and the LM head unquantized (`molmo2.load.SKIP_QUANTIZE`);
  * peft LoRA on the language model's attention and MLP projections (`model.language_model.layers.N.self_attn.
    {q,k,v,o}_proj`, `.mlp.{gate,up,down}_proj`), plus the adapter's pooling attention and projector with
    --lora-connector;
  * data: the v1 trainer's records (`data.load_records`: PixMo-Cap parquet, JSONL captions / points / questions,
    clocks:N, shapes:N), one example per annotation, rewritten as Molmo2 targets: captions and transcripts are
    asked with Molmo2's caption prompt (`"long_caption: Describe this image."`, no length hint), points are
    written with `format_molmo2_points` (0-1000 coordinates, image index 1; counts as "Counting the <points ...>
    shows a total of N."), clocks with Molmo2's clock prompt;
  * inputs: `Molmo2Preprocessor(prompt, images=[image])` (the chat template, ending in `<|im_start|>assistant\\n`),
    then the answer's tokens and the end token (`<|im_end|>`); labels are -100 everywhere but on those;
  * loop: AdamW (betas 0.9 / 0.95) over component groups (llm / connector / vit learning rates as the v1
    recipe), gradient accumulation, per-component clipping, linear warmup + cosine (`recipe.make_scheduler`),
    loss = CE (+ z-loss) summed over the answer tokens of the step / their number;
  * files under OUT: metrics.jsonl (step, loss, lr, lr_connector, lr_vit, tokens_per_s, loss_tokens, grad_norm_*,
    elapsed_s, eta_s; eval lines: eval_loss, and eval_{task}_* for held-out point / count / clock questions),
    loss.png, checkpoints/step-N (adapter, optimizer, scheduler, RNG state; `latest` points at the newest,
    resumed by --resume auto), adapter/ (peft `save_pretrained`), final/ (the base in `export_dtype`,
    unquantized, with the adapter merged, `save_pretrained`, plus the base's tokenizer, processor and
    chat-template files and finetune.json), which `load_molmo2(OUT/final)` and the app load.

Text-only dropout (--response-dropout) acts on the language model's residual branches at answer positions, as in
the v1 recipe. Held-out point / count / clock questions are answered greedily through the runner and scored in
Molmo2's format (eval_point_f1, eval_count_accuracy, eval_clock_overall_exact, ...). Ignored for Molmo2:
--prompt-format, --hint-prob / --hint-noise-chars (Molmo2 has no captioner format or length hint). Not carried
over from the v1 trainer (yet): sequence packing of several annotations of one image (each annotation is its own
example, the image encoded again), DDP / FSDP, full fine-tuning; OUT/final keeps the base's processor settings
(a run with fewer --max-crops is loaded with the base's max_crops; finetune.json records the trained value).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..weights import load_torch_file
from .data import Annotation, Record, load_records, split_records
from .export import written_atomically
from .loop import LATEST, RunFiles, TrainError, TrainResult
from .recipe import TrainArgs, clip_per_component, make_optimizer, make_scheduler
from .task_eval import TASK_METRICS, TaskItem, format_metrics, summarize

# LoRA targets (peft full-match regexes over module names of Molmo2ForConditionalGeneration, transformers 5.23).
LM_TARGETS = r"model\.language_model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
CONNECTOR_TARGETS = (r"model\.multi_modal_projector\.(?:image_pooling_2d\.(?:q|k|v|o)_proj"
                     r"|image_projector\.(?:gate|up|down)_proj)")
# What OUT/final copies from the base besides what save_pretrained writes (tokenizer, processor, chat template).
COPY_SUFFIXES = (".json", ".txt", ".model", ".jinja")
WRITTEN_BY_SAVE = {"config.json", "generation_config.json", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json", "adapter_config.json", "finetune.json"}


# ----------------------------------------------------------------------------------------- dispatch
def is_molmo2_base(model: str) -> bool:
    """Whether `model` (a folder or a cached hub id) is a Molmo2 checkpoint; False when its family cannot be read
    (the v1 trainer then reports what is wrong)."""
    from ..errors import CheckpointError
    from ..molmo2.load import model_family

    try:
        return model_family(model) == "molmo2"
    except (CheckpointError, OSError, ValueError):
        return False


def check_supported(args: TrainArgs) -> None:
    """Raises TrainError for what the Molmo2 trainer does not do: --mode full, --fsdp, several processes."""
    if args.mode == "full" or args.fsdp:
        raise TrainError("Full fine-tuning (--mode full, --fsdp) is not supported for Molmo2 bases yet; use "
                         "--mode lora or --mode qlora (peft LoRA on the language model).")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainError("The Molmo2 trainer runs in one process; several processes (torchrun / accelerate "
                         "launch) are not supported for Molmo2 bases yet. Run `python launch.py --finetune ...`.")
    if args.freeze:
        raise TrainError("--freeze applies to --mode full only.")


# ----------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """One training example: an image, the user's prompt and the answer the model must write."""
    image: object
    prompt: str
    answer: str
    kind: str
    source: str = ""


def _points_percent(text: str) -> tuple[list[tuple[float, float]], str]:
    """Points (percent) and label of a v1 point answer (`<point x= y= alt=>label</point>` / `<points ...>`)."""
    from ..outputs import parse_points, strip_tags

    pts = parse_points(text, 100.0, 100.0)
    label = pts[0].label if pts else ""
    inner = re.search(r">([^<]*)</points?>", text)
    if inner and inner.group(1).strip():
        label = inner.group(1).strip()
    return [(p.x, p.y) for p in pts], label or strip_tags(text).strip()


def _label_from_prompt(prompt: str | None) -> str:
    m = re.match(r"\s*(?:No pointing:\s*)?(?:Point to|How many)\s+(.*?)(?:\s+are there)?\?*\s*$", prompt or "",
                 re.IGNORECASE)
    return m.group(1).strip() if m else ""


def molmo2_target(ann: Annotation) -> tuple[str, str]:
    """A v1 annotation -> (prompt, answer) in Molmo2's form.

    >>> molmo2_target(Annotation("point", '<point x="10.0" y="50.0" alt="cat">cat</point>', "Point to cat"))
    ('Point to cat', '<points alt="cat" coords="1 1 100 500">cat</points>')
    >>> molmo2_target(Annotation("long_caption", "A red cup."))
    ('long_caption: Describe this image.', 'A red cup.')
    """
    from ..outputs import NO_OBJECTS_TEXT, format_molmo2_points, molmo2_points_from_frames
    from ..prompts import caption_prompt, clock_prompt, count_prompt

    if ann.kind in ("long_caption", "transcript"):
        return caption_prompt(ann.kind, family="molmo2"), ann.text
    if ann.kind == "clock":
        return clock_prompt(family="molmo2"), ann.text
    if ann.kind in ("point", "count") and "<point" in ann.text:
        xy, label = _points_percent(ann.text)
        label = _label_from_prompt(ann.prompt) or label
        alt = label.lower()
        pts = molmo2_points_from_frames({1: [(x * 10.0, y * 10.0) for x, y in xy]})
        mode = "point_then_count" if ann.kind == "count" else "point"
        answer = format_molmo2_points(pts, label.lower(), alt=alt, mode=mode)
        prompt = ann.prompt or ""
        if ann.kind == "count":
            prompt = count_prompt(label, family="molmo2") if label else prompt
        return prompt, answer
    if ann.kind == "count":  # "There are none." or a bare number ("No pointing: How many ...?")
        label = _label_from_prompt(ann.prompt)
        if ann.text.strip() == NO_OBJECTS_TEXT or not label:
            return ann.prompt or "", ann.text
        return count_prompt(label, point=False, family="molmo2"), ann.text
    return ann.prompt or "", ann.text  # qa


def record_targets(records: Sequence[Record], annotations: str = "all") -> list[Target]:
    """One Target per annotation (`annotations="captions"` keeps captions only; "paper" keeps the caption and
    the first transcript)."""
    out = []
    for r in records:
        anns = r.annotations
        if annotations == "captions":
            anns = [a for a in anns if a.kind == "long_caption"] or anns
        elif annotations == "paper":
            caps = [a for a in anns if a.kind == "long_caption"]
            trs = [a for a in anns if a.kind == "transcript"]
            other = [a for a in anns if a.kind not in ("long_caption", "transcript")]
            anns = caps[:1] + trs[:1] + other
        for a in anns:
            prompt, answer = molmo2_target(a)
            out.append(Target(r.image, prompt, answer, a.kind, r.source))
    return out


def _image_of(image):
    return image() if callable(image) else image


# ----------------------------------------------------------------------------------------- examples / batches
def build_example(target: Target, processor, tokenizer, end_id: int, max_crops: int | None = None,
                  max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Preprocessor inputs for the prompt (chat template, generation prompt) + the answer's tokens + the end token;
    `labels` is -100 on the prompt and holds the answer and end token ids (unshifted, HF convention)."""
    x = processor(target.prompt, images=[_image_of(target.image)], max_crops=max_crops)
    t = dict(x.tensors)
    answer = tokenizer(target.answer, add_special_tokens=False)["input_ids"] + [end_id]
    prompt_ids = t["input_ids"][0]
    n = len(prompt_ids)
    if max_len is not None and n + len(answer) > max_len:
        if n + 1 >= max_len:
            raise ValueError(f"{target.source}: the prompt alone is {n} tokens, more than max_seq_len {max_len}")
        answer = answer[:max_len - n]
    ans = torch.tensor(answer, dtype=torch.long)
    t["input_ids"] = torch.cat([prompt_ids, ans])[None]
    t["attention_mask"] = torch.ones_like(t["input_ids"])
    t["mm_token_type_ids"] = torch.cat([t["mm_token_type_ids"][0], torch.zeros_like(ans)])[None]
    t["labels"] = torch.cat([torch.full((n,), -100, dtype=torch.long), ans])[None]
    return t


def collate(examples: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: crops concatenated in order, pooling indices shifted past the earlier examples'
    patches (as transformers' processor batches), labels -100 on padding."""
    from ..molmo2.processing import batch_images

    length = max(e["input_ids"].shape[1] for e in examples)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.cat([F.pad(e[key], (0, length - e[key].shape[1]), value=value) for e in examples])

    batch = {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0),
             "mm_token_type_ids": pad("mm_token_type_ids", 0), "labels": pad("labels", -100)}
    batch.update(batch_images(examples))
    return batch


def base_model(model):
    """The Molmo2ForConditionalGeneration under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def loss_sums(model, batch: dict[str, torch.Tensor], z_loss: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum of CE + z-loss over the label tokens, sum of CE, number of label tokens); logits only where needed."""
    m = base_model(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = m.model(**inputs, use_cache=False).last_hidden_state  # (B, T, d)
    targets = batch["labels"][:, 1:]
    sel = targets != -100
    logits = m.lm_head(hidden[:, :-1][sel]).float()
    tgt = targets[sel]
    ce = F.cross_entropy(logits, tgt, reduction="none")
    total = ce + z_loss * torch.logsumexp(logits, dim=-1).pow(2) if z_loss > 0 else ce
    return total.sum(), ce.sum().detach(), int(sel.sum())


# ----------------------------------------------------------------------------------------- held-out tasks
def task_items(records: Sequence[Record]) -> list[TaskItem]:
    """The point, count and clock questions of records with ground truth, as Molmo2 prompts and references."""
    items = []
    for r in records:
        if r.truth is None:
            continue
        for a in r.annotations:
            if a.kind in TASK_METRICS and a.prompt:
                prompt, answer = molmo2_target(a)
                items.append(TaskItem(a.kind, prompt, answer, r))
    return items


def molmo2_answers(runner, items: Sequence[TaskItem], batch_size: int = 8) -> list[str]:
    """Greedy answers through the runner (its model carries the LoRA layers), batched per task; each answer at
    most 1.25 x the task's longest reference (+ 8 tokens), capped at the evaluation's default."""
    from ..eval.runner import MAX_NEW_TOKENS

    tok = runner.tokenizer
    longest: dict[str, int] = {}
    for it in items:
        longest[it.task] = max(longest.get(it.task, 0), len(tok(it.reference, add_special_tokens=False)["input_ids"]))
    answers: list[str] = [""] * len(items)
    for task, n in longest.items():
        idx = [i for i, it in enumerate(items) if it.task == task]
        limit = min(MAX_NEW_TOKENS[task], int(1.25 * n) + 8)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            out = runner.generate_batch([(_image_of(items[i].record.image), items[i].prompt) for i in chunk],
                                        max_new_tokens=limit)
            for i, a in zip(chunk, out):
                answers[i] = a
    return answers


def score_molmo2(items: Sequence[TaskItem], answers: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
    """(task, {metric: value}) per answer, read in Molmo2's format (`molmo_core.eval.formats` "molmo2")."""
    from ..eval.data import SYNTHETIC_CLOCK_TOLERANCE, Dataset
    from ..eval.formats import get_count_parser, get_format
    from ..eval.runner import score_example

    parse, count = get_format("molmo2"), get_count_parser("molmo2")
    out = []
    for it, answer in zip(items, answers, strict=True):
        truth = it.truth()
        rules = Dataset("held-out", [], point_rule="mask" if truth.masks is not None else "distance",
                        clock_tolerance=SYNTHETIC_CLOCK_TOLERANCE)
        values = score_example(truth, answer, it.task, rules, parse, count).values()
        out.append((it.task, {k: values[k] for k in TASK_METRICS[it.task]}))
    return out


# ----------------------------------------------------------------------------------------- text-only dropout
class ResponseDropout:
    """Dropout on the residual branch outputs of the language model at answer positions only (the v1 recipe's
    "text-only dropout", `recipe.ResponseDropout`): forward hooks on each decoder layer's `self_attn` and `mlp`
    (pre-norm) or `input_layernorm` / `post_attention_layernorm` (post-norm, `norm_after`: the norm is the
    branch's last op). `set_mask(mask)` before each forward; nothing happens in eval mode."""

    def __init__(self, model, p: float):
        self.p, self.mask, self.handles = p, None, []
        if p <= 0:
            return
        lm = base_model(model).model.language_model
        for layer in lm.layers:
            targets = ([layer.input_layernorm, layer.post_attention_layernorm] if getattr(layer, "norm_after", False)
                       else [layer.self_attn, layer.mlp])
            self.handles += [m.register_forward_hook(self._hook) for m in targets]

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def _hook(self, module, inputs, output):
        if not module.training or self.mask is None:
            return None
        out = output[0] if isinstance(output, tuple) else output
        if out.dim() != 3 or out.shape[:2] != self.mask.shape:
            return None
        dropped = torch.where(self.mask[..., None], F.dropout(out, self.p, training=True), out)
        return (dropped, *output[1:]) if isinstance(output, tuple) else dropped

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) True at the positions whose next token is an answer token (where the loss is taken)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


# ----------------------------------------------------------------------------------------- model
def component_of(name: str) -> str:
    """Molmo2 parameter name -> vit | connector | llm."""
    if "vision_tower" in name:
        return "vit"
    if "multi_modal_projector" in name:
        return "connector"
    return "llm"


def param_groups(model, lrs: dict[str, float], weight_decay: float) -> list[dict]:
    buckets: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = weight_decay > 0 and p.ndim >= 2
            buckets.setdefault((component_of(name), decay), []).append(p)
    if not buckets:
        raise TrainError("No trainable parameters.")
    return [{"params": ps, "lr": lrs[c], "initial_lr": lrs[c], "component": c,
             "weight_decay": weight_decay if d else 0.0, "name": f"{c}{'' if d else '_nodecay'}"}
            for (c, d), ps in sorted(buckets.items())]


def lora_config(args: TrainArgs):
    from peft import LoraConfig

    target = LM_TARGETS if not args.lora_connector else f"(?:{LM_TARGETS})|(?:{CONNECTOR_TARGETS})"
    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=target, bias="none")


def load_adapter(model, adapter: str | Path, trainable: bool = False):
    """`model` (a Molmo2ForConditionalGeneration, e.g. `load_molmo2(base).model`) with OUT/adapter applied (peft)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)


def export_merged(base: Path, adapter: Path, out: Path, dtype: torch.dtype = torch.float32,
                  extra: dict | None = None) -> Path:
    """Base (unquantized, `dtype`, CPU) + adapter merged -> `out` via save_pretrained, plus the base's tokenizer,
    processor and chat-template files; written to a temporary folder, fsynced and renamed into place."""
    from transformers import Molmo2ForConditionalGeneration

    with written_atomically(out) as tmp:
        model = Molmo2ForConditionalGeneration.from_pretrained(str(base), dtype=dtype, device_map={"": "cpu"},
                                                               local_files_only=True)
        merged = load_adapter(model, adapter).merge_and_unload()
        merged.save_pretrained(str(tmp))
        del merged, model
        for f in sorted(base.iterdir()):
            if (f.is_file() and f.suffix in COPY_SUFFIXES and f.name not in WRITTEN_BY_SAVE
                    and not (tmp / f.name).exists()):
                shutil.copy2(f, tmp / f.name)
        if extra:
            (tmp / "finetune.json").write_text(json.dumps(extra, indent=2, default=str))
    return out


# ----------------------------------------------------------------------------------------- trainer
class Molmo2Trainer(RunFiles):
    """One Molmo2 LoRA / QLoRA fine-tune: `run()` = setup() + fit() + export()."""

    def __init__(self, args: TrainArgs, log: Callable[[str], None] | None = None,
                 callbacks: list[Callable[["Molmo2Trainer", dict], None]] | None = None):
        args.validate()
        check_supported(args)
        self.args = args
        self.log = log or (lambda s: print(s, flush=True))
        self.callbacks = callbacks or []
        self.out = Path(args.out).expanduser()
        self.step = 0
        self.seq_pos = 0
        self.stop_requested = False
        self._metrics_file = None
        self.rank = 0  # one process

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Molmo2Trainer":
        a = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(a.seed)
        random.seed(a.seed)
        np.random.seed(a.seed % 2**32)
        self.device = torch.device(a.device) if a.device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = self.device.type == "cuda" and a.bf16
        self.log("train args (molmo2): " + json.dumps(a.to_dict(), default=str))
        self._load_model()
        self._load_data()
        self._make_optimizer()
        self._maybe_resume()
        return self

    def _load_model(self) -> None:
        from peft import get_peft_model

        from ..errors import CheckpointError
        from ..molmo2.load import load_molmo2

        a = self.args
        dtype = torch.bfloat16 if self.autocast else torch.float32
        try:
            self.runner = load_molmo2(a.model, quantize="4bit" if a.mode == "qlora" else None, device=self.device,
                                      dtype=dtype)
        except CheckpointError as e:
            raise TrainError(str(e)) from e
        self.base_path = Path(self.runner.path)
        self.processor, self.tokenizer = self.runner.processor, self.runner.tokenizer
        self.max_crops = min(a.max_crops, self.processor.image.max_crops)
        self.processor.image = replace(self.processor.image, max_crops=self.max_crops)  # held-out answers too
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if self.end_id is None or self.end_id == getattr(self.tokenizer, "unk_token_id", None):
            self.end_id = self.tokenizer.eos_token_id
        self.pad_id = self.runner.pad_id
        model = self.runner.model
        model.requires_grad_(False)
        if a.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = get_peft_model(model, lora_config(a))
        self.model.train()
        self.dropout = ResponseDropout(self.model, a.response_dropout)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        self.log(f"model: {a.model} (Molmo2, {a.mode}) on {self.device}, {n_train / 1e6:.3g} M of {n_all / 1e6:.3g} M "
                 "parameters trainable")

    def _load_data(self) -> None:
        a = self.args
        records, report = load_records(a.data, a.images_dir, a.max_caption_chars, a.seed)
        if a.eval_data:
            eval_records, _ = load_records(a.eval_data, a.images_dir, a.max_caption_chars, a.seed + 1)
            train_records = records
        else:
            train_records, eval_records = split_records(records, a.eval_fraction, a.seed)
        self.train_targets = record_targets(train_records, a.annotations)
        self.eval_targets = record_targets(eval_records, a.annotations) if eval_records else []
        self.task_items = task_items(eval_records)
        if self.task_items:
            self.log(f"held-out task metrics: {len(self.task_items)} "
                     f"{' / '.join(sorted({it.task for it in self.task_items}))} questions answered greedily at every "
                     "evaluation")
        self.log(f"data: {report.summary()}; {len(self.train_targets)} training examples, {len(self.eval_targets)} "
                 "held out")
        self.max_steps = a.max_steps or max(1, math.ceil(a.epochs * len(self.train_targets) / self.per_step))

    @property
    def per_step(self) -> int:
        return self.args.batch_size * self.args.grad_accum

    def _make_optimizer(self) -> None:
        a = self.args
        lrs = a.component_lrs()
        self.optimizer = make_optimizer(param_groups(self.model, lrs, a.weight_decay))
        self.warmups = a.component_warmups(self.max_steps)
        self.scheduler = make_scheduler(self.optimizer, self.warmups, self.max_steps, a.min_lr_ratio)
        self.log(f"schedule: {self.max_steps} steps x {self.per_step} examples; lr llm {lrs['llm']:.2e}; warmup "
                 f"{self.warmups['llm']}; cosine to {a.min_lr_ratio:.0%}")

    # ------------------------------------------------------------------ data order
    def _target_at(self, p: int) -> Target:
        """The p-th training example: epochs over the examples, each epoch in its own seeded order."""
        n = len(self.train_targets)
        epoch, i = divmod(p, n)
        order = np.random.default_rng(self.args.seed * 7919 + epoch).permutation(n)
        return self.train_targets[int(order[i])]

    def example(self, target: Target) -> dict[str, torch.Tensor]:
        return build_example(target, self.processor, self.tokenizer, self.end_id, self.max_crops,
                             self.args.max_seq_len if self.args.max_seq_len > 0 else None)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = base_model(self.model).dtype
        return {k: v.to(self.device, dtype=dtype if k.startswith("pixel_values") else None)
                for k, v in batch.items()}

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict:
        a = self.args
        t0 = time.perf_counter()
        self.model.train()
        micro = []
        for m in range(a.grad_accum):
            exs = [self.example(self._target_at(self.seq_pos + m * a.batch_size + b)) for b in range(a.batch_size)]
            micro.append(collate(exs, self.pad_id))
        n_loss = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        n_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        ce_sum = 0.0
        for batch in micro:
            batch = self._to_device(batch)
            self.dropout.set_mask(response_mask(batch["labels"]))
            with self._autocast():
                total, ce, _ = loss_sums(self.model, batch, a.z_loss)
            (total / max(n_loss, 1)).backward()
            ce_sum += float(ce)
        self.dropout.set_mask(None)
        norms = clip_per_component(self.optimizer, a.max_grad_norm)
        lrs = {g["component"]: g["lr"] for g in self.optimizer.param_groups}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.seq_pos += self.per_step
        dt = time.perf_counter() - t0
        return {"step": self.step, "loss": ce_sum / max(n_loss, 1), "lr": lrs.get("llm", 0.0),
                "lr_connector": lrs.get("connector", 0.0), "lr_vit": lrs.get("vit", 0.0),
                "tokens_per_s": n_tokens / dt, "loss_tokens": n_loss, "step_s": dt,
                **{f"grad_norm_{k}": v for k, v in norms.items()}}

    def evaluate(self) -> dict[str, float]:
        """{"eval_loss": ..., plus the held-out task metrics}; {} without held-out records."""
        loss = self.validate()
        return {} if loss is None else {"eval_loss": loss, **self.task_metrics()}

    def task_metrics(self) -> dict[str, float]:
        """Greedy answers of the model being trained (LoRA included) to the held-out point / count / clock
        questions, read in Molmo2's format and scored by molmo_core.eval as the v1 trainer does."""
        if not self.task_items:
            return {}
        self.model.eval()
        try:
            with self._autocast():
                answers = molmo2_answers(self.runner, self.task_items)
        except Exception as e:  # noqa: BLE001 -- one clear message
            raise TrainError(f"Answering the held-out questions at step {self.step} failed: {type(e).__name__}: "
                             f"{e}. Train without them (--eval-fraction 0).") from e
        finally:
            self.model.train()
        return summarize(score_molmo2(self.task_items, answers))

    @torch.no_grad()
    def validate(self) -> float | None:
        if not self.eval_targets:
            return None
        self.model.eval()
        ce_sum = n_sum = 0.0
        bs = self.args.batch_size
        for s in range(0, len(self.eval_targets), bs):
            batch = self._to_device(collate([self.example(t) for t in self.eval_targets[s:s + bs]], self.pad_id))
            with self._autocast():
                _, ce, k = loss_sums(self.model, batch, 0.0)
            ce_sum += float(ce)
            n_sum += k
        self.model.train()
        return ce_sum / max(n_sum, 1.0)

    # ------------------------------------------------------------------ fit
    def fit(self) -> TrainResult:
        a = self.args
        result = TrainResult(self.out, self.step)
        self._install_signal_handlers()
        self._open_metrics()
        start, t_start, times = self.step, time.perf_counter(), []
        try:
            while self.step < self.max_steps:
                m = self.train_step()
                times.append(m["step_s"])
                m["elapsed_s"] = time.perf_counter() - t_start
                recent = times[-20:]
                m["eta_s"] = (self.max_steps - self.step) * sum(recent) / len(recent)
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
                if self.stop_requested:
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
                if self.step > start or not self._latest_dir():
                    self.save_checkpoint()
        finally:
            self._close_metrics()
            self._restore_signal_handlers()
        result.steps = self.step
        self.plot()
        return result

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoints/step-N: adapter/ (peft), optimizer.pt, scheduler.pt, state.json; written to a temporary
        folder, renamed, then `latest` replaced."""
        root = self.ckpt_root
        root.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.step:07d}"
        final, tmp = root / name, root / f".tmp-{name}-{os.getpid()}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            self.model.save_pretrained(str(tmp / "adapter"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                       tmp / "rng.pt")
            state = {"step": self.step, "seq_pos": self.seq_pos, "max_steps": self.max_steps, "family": "molmo2",
                     "args": self.args.to_dict(), "time": time.time()}
            (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = root / f".{LATEST}.tmp-{os.getpid()}"
            pointer.write_text(name + "\n")
            os.replace(pointer, root / LATEST)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise TrainError(f"Could not write checkpoint {name} to {root}: {e}") from e
        keep = max(1, self.args.keep_checkpoints)
        for p in sorted(q for q in root.glob("step-*") if q.is_dir())[:-keep]:
            if p.resolve() != final.resolve():
                shutil.rmtree(p, ignore_errors=True)
        self.log(f"checkpoint: {final}")
        self.plot()
        return final

    def _maybe_resume(self) -> None:
        a = self.args
        if self.ckpt_root.is_dir():
            for p in self.ckpt_root.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        latest = self._latest_dir()
        if a.resume == "no" or latest is None:
            if a.resume == "yes":
                raise TrainError(f"--resume yes but {self.ckpt_root} has no complete checkpoint.")
            if a.resume == "no" and self.ckpt_root.exists():
                shutil.rmtree(self.ckpt_root)
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            return
        state = json.loads((latest / "state.json").read_text())
        saved = state.get("args", {})
        if state.get("family") != "molmo2":
            raise TrainError(f"Cannot resume from {latest}: it is a Molmo v1 run. Use another --out, or --resume no.")
        for key in ("mode", "lora_rank", "lora_connector"):
            if saved.get(key) != getattr(a, key):
                raise TrainError(f"Cannot resume from {latest}: it was trained with {key}={saved.get(key)!r}, this "
                                 f"run has {key}={getattr(a, key)!r}. Use the same settings, another --out, or "
                                 "--resume no to start over.")
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(latest / "adapter" / "adapter_model.safetensors"), device=str(self.device))
        set_peft_model_state_dict(self.model, weights)
        self.optimizer.load_state_dict(load_torch_file(latest / "optimizer.pt", map_location=self.device))
        self.scheduler.load_state_dict(load_torch_file(latest / "scheduler.pt"))
        if (latest / "rng.pt").is_file():  # text-only dropout continues as in an uninterrupted run
            rng = load_torch_file(latest / "rng.pt")
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.step, self.seq_pos = state["step"], state["seq_pos"]
        self.log(f"resumed from {latest} at step {self.step}")

    # ------------------------------------------------------------------ export
    def export(self) -> tuple[Path, Path]:
        """OUT/adapter (peft save_pretrained) and OUT/final (base + adapter merged, save_pretrained)."""
        a = self.args
        adapter = self.out / "adapter"
        self.model.save_pretrained(str(adapter))
        dtype = torch.float32 if a.export_dtype == "float32" else torch.bfloat16
        info = {"base": str(a.model), "family": "molmo2", "mode": a.mode, "steps": self.step,
                "max_crops": self.max_crops, "args": a.to_dict()}
        final = export_merged(self.base_path, adapter, self.out / "final", dtype, info)
        self.log(f"exported: {final} (merged) and {adapter} (adapter)")
        return final, adapter


def train_molmo2(args: TrainArgs, **kwargs) -> TrainResult:
    """Run a whole Molmo2 fine-tune (setup, fit, export). See the module docstring for the files written."""
    return Molmo2Trainer(args, **kwargs).run()
