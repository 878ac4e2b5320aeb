"""Task metrics on held-out records: the model being trained answers their point, count and clock questions,
and `molmo_core.eval` scores the answers against the records' ground truth (`Record.truth`).

    items = task_items(held_out_records)                     # one item per point / count / clock question
    answers = generate_answers(molmo, processor, items, template="none")
    metrics = summarize(score_items(items, answers))         # {"eval_count_accuracy": 0.75, ...}

Answers are greedy and batched (`molmo_core.generation.generate_tokens`, no compiled decode: the weights change
between evaluations), with the prompt wrapped as in training (`template` "none" for the captioner format, "role"
for chat). Each answer may be at most 1.25 x the longest reference answer of its task (+ 8 tokens), never more
than the evaluation's default (`molmo_core.eval.runner.MAX_NEW_TOKENS`): a random model that never stops would
otherwise spend 512 tokens on every question. Scoring is `molmo_core.eval.runner.score_example`: pointing by
mask hits when the truth has masks (shapes:N), else by the distance rule; counts by AI2's text count; clocks by
the synthetic +-3 minute rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..eval.data import SYNTHETIC_CLOCK_TOLERANCE, Dataset, Example
from ..eval.formats import molmo_v1_points
from ..eval.metrics import mean_values
from ..eval.runner import MAX_NEW_TOKENS, score_example
from ..generation import GenerationOptions, collate, generate_tokens, image_token_ids
from .data import Record

#: The metrics written to metrics.jsonl per task, as eval_{task}_{metric}.
TASK_METRICS: dict[str, tuple[str, ...]] = {"point": ("f1", "precision", "recall"), "count": ("accuracy", "close"),
                                            "clock": ("overall_exact", "overall_close")}
GENERATION_BATCH = 8  # held-out questions per batched generate call (the evaluation's default --batch-size)


@dataclass
class TaskItem:
    """One held-out question with a known answer: its task, the user text, the reference answer, the record."""

    task: str
    prompt: str
    reference: str
    record: Record
    _truth: Example | None = field(default=None, repr=False)

    def truth(self) -> Example:
        """The ground truth (built once: synthetic scenes are drawn again for their masks)."""
        if self._truth is None:
            self._truth = self.record.truth()
        return self._truth


def task_items(records: Sequence[Record]) -> list[TaskItem]:
    """The point, count and clock questions of records that carry their ground truth, in record order."""
    return [TaskItem(a.kind, a.prompt, a.text, r) for r in records if r.truth is not None
            for a in r.annotations if a.kind in TASK_METRICS and a.prompt]


def answer_limits(items: Sequence[TaskItem], tokenizer) -> dict[str, int]:
    """Max new tokens per task: 1.25 x the longest reference answer (+ 8, for EOS and slack), capped."""
    longest: dict[str, int] = {}
    for it in items:
        longest[it.task] = max(longest.get(it.task, 0), len(tokenizer.encode(" " + it.reference)))
    return {t: min(MAX_NEW_TOKENS[t], int(1.25 * n) + 8) for t, n in longest.items()}


@torch.no_grad()
def generate_answers(model, processor, items: Sequence[TaskItem], *, template: str,
                     max_new_tokens: dict[str, int] | None = None, batch_size: int = GENERATION_BATCH) -> list[str]:
    """Greedy answers of `model` (a Molmo, LoRA adapters included; the caller sets eval mode) to every item.

    Args:
        model: the Molmo module (not a DDP / FSDP wrapper: nothing here is collective).
        processor: the MolmoProcessor the model was loaded with (its max_crops is the run's).
        items: the questions.
        template: "none" (captioner prompt format) or "role" (chat), as the examples were trained.
        max_new_tokens: per task (default `answer_limits`).
        batch_size: questions per batched call.
    """
    tokenizer = processor.tokenizer
    limits = max_new_tokens or answer_limits(items, tokenizer)
    eos = tokenizer.special.eos
    suppress = image_token_ids(tokenizer)
    answers = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        inputs = [processor(it.record.image() if callable(it.record.image) else it.record.image, it.prompt,
                            template=template) for it in chunk]
        opts = [GenerationOptions(max_new_tokens=limits[it.task]) for it in chunk]
        rows: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for tok in generate_tokens(model, collate(inputs), opts, eos_id=eos, suppress=suppress):
            for b, t in enumerate(tok.tolist()):  # a row that is done keeps receiving EOS
                done[b] = done[b] or t == eos
                if not done[b]:
                    rows[b].append(t)
        answers += [tokenizer.decode(r).strip() for r in rows]
    return answers


def score_items(items: Sequence[TaskItem], answers: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
    """(task, {metric: value}) per answer, scored by `molmo_core.eval.runner.score_example`."""
    out = []
    for it, answer in zip(items, answers, strict=True):
        truth = it.truth()
        rules = Dataset("held-out", [], point_rule="mask" if truth.masks is not None else "distance",
                        clock_tolerance=SYNTHETIC_CLOCK_TOLERANCE)
        values = score_example(truth, answer, it.task, rules, molmo_v1_points).values()
        out.append((it.task, {k: values[k] for k in TASK_METRICS[it.task]}))
    return out


def summarize(scored: Sequence[tuple[str, dict[str, float]]]) -> dict[str, float]:
    """Means per task as {"eval_{task}_{metric}": value}, plus "eval_{task}_n" (questions scored)."""
    out: dict[str, float] = {}
    for task in TASK_METRICS:
        values = [v for t, v in scored if t == task]
        if values:
            out.update({f"eval_{task}_{k}": v for k, v in mean_values(values).items()})
            out[f"eval_{task}_n"] = len(values)
    return out


def format_metrics(metrics: dict[str, float]) -> str:
    """'count accuracy 0.750, count close 1.000' (the `eval_` prefix and the counts left out)."""
    return ", ".join(f"{k[5:].replace('_', ' ', 1)} {v:.3f}" for k, v in metrics.items()
                     if k.startswith("eval_") and k != "eval_loss" and not k.endswith("_n"))


__all__ = ["TASK_METRICS", "TaskItem", "task_items", "answer_limits", "generate_answers", "score_items", "summarize",
           "format_metrics"]
