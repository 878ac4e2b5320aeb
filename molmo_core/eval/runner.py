"""Run models over an evaluation set (batched, resumable), read saved answers, score, compare.

``predictions.jsonl`` holds one ``{"model": NAME, "example": INDEX, "answer": TEXT}`` per line, appended
and flushed batch by batch, so a killed run continues where it stopped: answers already in the file are
never generated again (a line cut off by the kill is dropped). Scoring reads answers only, so the same
code scores answers produced elsewhere (``--predictions``: ``{"example": INDEX, "answer": TEXT}``).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..prompts import family_of
from .data import Dataset, Example
from .formats import CountParser, PointParser
from .metrics import (count_details, count_from_text, mean_values, paired_bootstrap, score_clock, score_count,
                      score_point_bench, score_pointing)

__all__ = ["MAX_NEW_TOKENS", "PredictionsError", "ExampleResult", "ModelResult", "read_done", "append_answers",
           "generate_answers", "read_predictions", "score_example", "score_model", "compare", "disagreements"]

#: Default answer length per task: a counting answer points at every object first (~20 tokens a point).
MAX_NEW_TOKENS = {"point": 512, "count": 512, "clock": 32}
#: Bootstrap settings of every comparison.
BOOTSTRAP = {"resamples": 2000, "seed": 0, "level": 0.95}


class PredictionsError(ValueError):
    """A predictions file that does not fit the data."""


# --------------------------------------------------------------------------- answers on disk


def read_done(path: Path) -> dict[tuple[str, int], str]:
    """Answers already in a run's predictions.jsonl, by (model, example).

    A last line without its newline (the run was killed while writing it) is cut off the file, so the
    next append starts on a clean line.

    Raises:
        PredictionsError: a complete line that is not a prediction (the file is not this runner's).
    """
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done = {}
    for n, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            done[(str(row["model"]), int(row["example"]))] = str(row["answer"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise PredictionsError(f"{path} line {n} is not a prediction of this runner ({e}); expected "
                                   '{"model", "example", "answer"}. Use another --out folder.') from e
    return done


def append_answers(path: Path, model: str, items: Iterable[tuple[int, str]]) -> None:
    """Append answers and make them durable before the next batch starts."""
    with path.open("a", encoding="utf-8") as f:
        for index, answer in items:
            f.write(json.dumps({"model": model, "example": index, "answer": answer}, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def generate_answers(runner, model: str, examples: Sequence[Example], task: str, path: Path, *,
                     batch_size: int = 8, max_new_tokens: int | None = None,
                     done: dict[tuple[str, int], str] | None = None, progress: bool = True) -> int:
    """Generate the answers of ``model`` that ``path`` lacks, ``batch_size`` examples per batched call.

    Args:
        runner: anything with ``generate_batch([(image, prompt), ...], max_new_tokens=...) -> [str]``; its
            ``family`` ("molmo" when it has none, or "molmo2") chooses the prompts.
        model: the name the answers are stored under.
        examples: the examples to answer.
        task: "point", "count" or "clock" (chooses the prompt).
        path: predictions.jsonl (appended to).
        batch_size: examples per call.
        max_new_tokens: answer length (default :data:`MAX_NEW_TOKENS` of the task).
        done: answers already there (default: read from ``path``).
        progress: show a progress bar on stderr.

    Returns:
        How many answers were generated (0 when all were done).
    """
    from tqdm import tqdm

    done = read_done(path) if done is None else done
    family = family_of(runner)
    todo = [ex for ex in examples if (model, ex.index) not in done]
    limit = max_new_tokens or MAX_NEW_TOKENS[task]
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=model, unit="ex",
               disable=not progress, file=sys.stderr)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        answers = runner.generate_batch([(ex.load_image(), ex.prompt(task, family)) for ex in batch],
                                        max_new_tokens=limit)
        append_answers(path, model, [(ex.index, a) for ex, a in zip(batch, answers)])
        done.update({(model, ex.index): a for ex, a in zip(batch, answers)})
        bar.update(len(batch))
    bar.close()
    return len(todo)


def read_predictions(path: Path, n_examples: int) -> dict[int, str]:
    """Answers produced elsewhere: one ``{"example": INDEX, "answer": TEXT}`` per line, every example once.

    Raises:
        PredictionsError: a line that is not such an object, an index outside the data, a repeated index, or
            examples without an answer (the message names them).
    """
    if not path.is_file():
        raise PredictionsError(f"--predictions {path} does not exist; expected a JSONL file.")
    answers: dict[int, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PredictionsError(f"{where} is not JSON ({e}); expected "
                                   '{"example": <row index>, "answer": "<model text>"}.') from e
        if not isinstance(row, dict) or "example" not in row or "answer" not in row:
            raise PredictionsError(f"{where} is {line[:80]!r}; expected "
                                   '{"example": <row index>, "answer": "<model text>"}.')
        index = row["example"]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_examples:
            raise PredictionsError(f"{where}: example {index!r} does not match the data, which has rows 0.."
                                   f"{n_examples - 1}. Check --data and --limit.")
        if index in answers:
            raise PredictionsError(f"{where}: example {index} is answered twice; keep one answer per example.")
        if not isinstance(row["answer"], str):
            raise PredictionsError(f"{where}: answer is {type(row['answer']).__name__}, expected the model's text.")
        answers[index] = row["answer"]
    lacking = [i for i in range(n_examples) if i not in answers]
    if lacking:
        raise PredictionsError(f"{path.name} has no answer for {len(lacking)} of {n_examples} examples "
                               f"(e.g. {lacking[:5]}); answer every example, or evaluate fewer with --limit.")
    return answers


# --------------------------------------------------------------------------- scoring


@dataclass
class ExampleResult:
    """One answer scored: the score object, the points read from the answer (pixels), malformed or not."""

    example: Example
    answer: str
    score: object
    points: np.ndarray
    malformed: bool

    def values(self) -> dict[str, float]:
        return {**self.score.values(), "malformed": float(self.malformed)}


@dataclass
class ModelResult:
    """All answers of one model scored (``answer_format``: how its answers were read)."""

    name: str
    results: list[ExampleResult]
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    answer_format: str = ""

    def values(self, key: str) -> np.ndarray:
        return np.array([r.values()[key] for r in self.results])

    def primary(self) -> np.ndarray:
        return np.array([r.score.primary() for r in self.results])


def score_example(ex: Example, answer: str, task: str, dataset: Dataset, parse: PointParser,
                  count: CountParser | None = None) -> ExampleResult:
    """Score one answer for ``task`` with the data's rule; ``parse`` reads its points, ``count`` its stated
    count (default AI2's v1 rules)."""
    if task == "clock":
        score = score_clock(answer, *ex.clock, tolerance=dataset.clock_tolerance)
        return ExampleResult(ex, answer, score, np.zeros((0, 2)), score.answerable and score.parsed is None)
    points = np.asarray(parse(answer, *ex.size), np.float64).reshape(-1, 2)
    if task == "count":
        score = score_count(answer, len(points), ex.count, count)
        return ExampleResult(ex, answer, score, points, not score.valid)
    if dataset.point_rule == "point_bench":
        score = score_point_bench(points, ex.masks[0])
    elif dataset.point_rule == "mask":
        score = score_pointing(points, ex.points, masks=ex.masks)
    else:
        score = score_pointing(points, ex.points, size=ex.size)
    says_none = count_from_text(answer) == 0
    return ExampleResult(ex, answer, score, points, len(points) == 0 and not says_none)


def score_model(name: str, dataset: Dataset, task: str, answers: dict[int, str], parse: PointParser,
                count: CountParser | None = None, answer_format: str = "") -> ModelResult:
    """Score every example; ``metrics`` holds per-example means plus ``n``, ``details`` the rest.

    ``parse`` / ``count`` read the answers' points and counts (`formats.FORMATS` / `formats.COUNT_PARSERS` of
    ``answer_format``, recorded in the result)."""
    results = [score_example(ex, answers[ex.index], task, dataset, parse, count) for ex in dataset.examples]
    metrics: dict = {"n": len(results), **mean_values([r.values() for r in results])}
    details: dict = {}
    if task == "count":
        details = count_details([r.score for r in results])
        metrics["mean_per_count_accuracy"] = details["mean_per_count_accuracy"]
    if dataset.point_rule == "point_bench" and task == "point":
        by_cat: dict[str, list[float]] = {}
        for r in results:
            by_cat.setdefault(r.example.category or "uncategorised", []).append(r.score.primary())
        details = {"per_category_accuracy": {k: float(np.mean(v)) for k, v in sorted(by_cat.items())}}
    return ModelResult(name, results, metrics, details, answer_format)


# --------------------------------------------------------------------------- comparison

#: Metrics that are not a mean over examples have no paired bootstrap interval.
_NOT_PER_EXAMPLE = ("n", "mean_per_count_accuracy")


def compare(models: Sequence[ModelResult], *, resamples: int = BOOTSTRAP["resamples"],
            seed: int = BOOTSTRAP["seed"]) -> list[dict]:
    """Every later model against the first: per metric the difference (later - first) and a paired
    bootstrap 95 % interval over examples (the same resamples for both)."""
    if len(models) < 2:
        return []
    base = models[0]
    out = []
    for other in models[1:]:
        rows = {}
        for key in base.metrics:
            if key in _NOT_PER_EXAMPLE:
                rows[key] = {"difference": other.metrics[key] - base.metrics[key], "ci95": None}
                continue
            diff, low, high = paired_bootstrap(base.values(key), other.values(key), n_resamples=resamples, seed=seed)
            rows[key] = {"difference": diff, "ci95": [low, high]}
        out.append({"baseline": base.name, "model": other.name, "metrics": rows})
    return out


def disagreements(models: Sequence[ModelResult]) -> list[int]:
    """Positions of examples on which the models' main per-example scores differ."""
    if len(models) < 2:
        return []
    stacked = np.stack([m.primary() for m in models])
    return [int(i) for i in np.flatnonzero((stacked != stacked[0]).any(axis=0))]
