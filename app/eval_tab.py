"""The Eval tab: score up to three models on pointing, counting or clock reading, in the background.

Choose the task, the data (synthetic `shapes:N` / `clocks:N`, or a file / Point-Bench folder under the
working directory or a folder named in `$MOLMO_STUDIO_DATA_DIRS`) and the models (the model loaded in the
app, used as it is; local checkpoint folders and hub ids, loaded for the run and freed after). One worker
thread runs the evaluations one after another; the tab polls its progress (examples done / total per
model), then shows the metrics table (differences and paired 95 % intervals against the first model when
there are several), lets you step through the examples (overlay, ground truth, each model's answer and
score) and offers report.html and report.json for download.

The evaluation itself is `molmo_core.eval` (the same data loaders, scoring and report as
`launch.py --eval`); this module only adapts it to the app: path confinement, the loaded runner, progress
per batch, stopping between batches. Molmo v1 and Molmo2 models are evaluated alike: each is asked in its
family's prompts and its answers are read in its family's format (`molmo_core.eval.formats`). Every event has an `api_name` starting with `eval_`:
`/eval_start`, `/eval_status`, `/eval_stop`, `/eval_example`, `/eval_prev`, `/eval_next`.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr
import pandas as pd

from molmo_core.eval.cli import EvalError
from molmo_core.eval.data import TASKS, Dataset, EvalDataError, load_dataset
from molmo_core.eval.formats import format_for_family, get_count_parser, get_format
from molmo_core.prompts import family_of
from molmo_core.eval.metrics import CountScore
from molmo_core.eval.report import (COUNT_NOTE, MALFORMED_NOTE, RULE_NOTES, draw_overlay, report_dict, write_html,
                                    write_json)
from molmo_core.eval.runner import (PredictionsError, ExampleResult, ModelResult, compare, generate_answers,
                                    score_model)

from .handlers import USER_ERRORS, user_errors
from .paths import Roots
from .service import MolmoService

log = logging.getLogger("molmo_studio")

LOADED_MODEL = "loaded model"
DATA_DIRS_ENV = "MOLMO_STUDIO_DATA_DIRS"  # extra folders the tab may read data and checkpoints from (os.pathsep)
MAX_MODELS = 3
MAX_SYNTHETIC = 5000
BATCH_SIZE = 8
ANSWER_FORMAT = "molmo_v1"  # what a runner without a `family` writes; Molmo2 runners' answers are read as molmo2
KEEP_JOBS = 8  # finished jobs kept in memory for browsing (their files stay on disk)
DATA_KINDS = [("synthetic shapes (point / count)", "shapes"), ("synthetic clocks (clock)", "clocks"),
              ("file or folder", "file")]
SYNTHETIC_TASKS = {"shapes": ("point", "count"), "clocks": ("clock",)}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Errors of the evaluation whose message is written for the user.
EVAL_INPUT_ERRORS: tuple[type[Exception], ...] = (EvalDataError, EvalError, PredictionsError)


class EvalInputError(ValueError):
    """A choice in the Eval tab that cannot run as given (the message says what to do)."""


def _error(message: str) -> gr.Error:
    return gr.Error(message, duration=15, print_exception=False)


def eval_errors(action: str) -> Callable:
    """`user_errors(action)` plus the evaluation's own input errors, shown verbatim."""

    def wrap(fn: Callable) -> Callable:
        @user_errors(action)
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (EvalInputError,) + EVAL_INPUT_ERRORS as e:
                raise _error(str(e)) from None
        return inner

    return wrap


# ---------------------------------------------------------------------------------------------- paths


def allowed_roots(extra: Sequence[str | Path] = ()) -> list[Path]:
    """The folders the tab may read: the working directory, `extra`, and `$MOLMO_STUDIO_DATA_DIRS`."""
    env = [p for p in os.environ.get(DATA_DIRS_ENV, "").split(os.pathsep) if p.strip()]
    roots = [Path.cwd(), *map(Path, extra), *map(Path, env)]
    out: list[Path] = []
    for r in roots:
        r = r.expanduser().resolve()
        if r not in out:
            out.append(r)
    return out


def confined_path(text: str, roots: Sequence[Path], what: str) -> Path:
    """`text` as an existing path inside one of `roots` (symlinks resolved first).

    Raises:
        EvalInputError: outside every root (said before anything about the path's existence is told), or
            missing.
    """
    raw = Path(text.strip()).expanduser()
    resolved = (raw if raw.is_absolute() else Path.cwd() / raw).resolve()
    if not any(resolved.is_relative_to(r) for r in roots):
        listed = ", ".join(str(r) for r in roots)
        raise EvalInputError(f"{what} {text.strip()!r} is outside the folders this app may read ({listed}). Put it "
                             f"under the app's working directory, or start the app with {DATA_DIRS_ENV}=<folder> "
                             "to allow that folder.")
    if not resolved.exists():
        raise EvalInputError(f"{what} {text.strip()!r} does not exist (looked for {resolved}); check the path.")
    return resolved


def _whole(n: float | str | None) -> int:
    text = "" if n is None else str(n).strip()
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not (number == number and number.is_integer() and 1 <= number <= MAX_SYNTHETIC):
        raise EvalInputError(f"Number of examples: {text or 'nothing'!r} is not a whole number from 1 to "
                             f"{MAX_SYNTHETIC}; type e.g. 50.")
    return int(number)


def data_spec(kind: str, n: float | str | None, path: str | None, task: str, roots: Sequence[Path]) -> tuple[str, bool]:
    """(spec for `load_dataset`, synthetic?) from the tab's fields, checked.

    Raises:
        EvalInputError: a task the synthetic data has no labels for, N not a whole number in 1..MAX_SYNTHETIC,
            no path, a path outside the allowed folders, a missing file or an unsupported kind of file.
    """
    if task not in TASKS:
        raise EvalInputError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if kind in SYNTHETIC_TASKS:
        if task not in SYNTHETIC_TASKS[kind]:
            other = next(k for k, tasks in SYNTHETIC_TASKS.items() if task in tasks)
            raise EvalInputError(f"Synthetic {kind} have labels for {' / '.join(SYNTHETIC_TASKS[kind])} only; for "
                                 f"the {task} task choose synthetic {other} (or a file).")
        return f"{kind}:{_whole(n)}", True
    if kind != "file":
        raise EvalInputError(f"Unknown data kind {kind!r}; choose shapes, clocks or file.")
    if not (path or "").strip():
        raise EvalInputError("No data file: type the path of a .parquet or .jsonl file (or a Point-Bench folder "
                             "with data.json), relative to the app's working directory.")
    resolved = confined_path(path, roots, "Data")
    if resolved.is_dir():
        if not (resolved / "data.json").is_file():
            raise EvalInputError(f"Data folder {path.strip()!r} has no data.json; expected a PointArena / Point-Bench "
                                 "folder, or give a .parquet / .jsonl file.")
    elif resolved.suffix not in (".parquet", ".jsonl"):
        raise EvalInputError(f"Data file {path.strip()!r} is a {resolved.suffix or 'file without suffix'}; expected "
                             "a .parquet or .jsonl file.")
    return str(resolved), False


def check_images_confined(dataset: Dataset, roots: Sequence[Path]) -> None:
    """Refuse data whose rows name image files outside the allowed folders (e.g. an absolute image_path)."""
    for ex in dataset.examples:
        if isinstance(ex.image, Path):
            resolved = ex.image.resolve()
            if not any(resolved.is_relative_to(r) for r in roots):
                raise EvalInputError(f"{ex.source}: its image {ex.image} is outside the folders this app may read "
                                     f"({', '.join(map(str, roots))}); keep the images next to the data or in an "
                                     f"allowed images folder.")


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelChoice:
    """One model of a run: the app's loaded runner (`source` None), a local folder or a hub id."""

    source: str | None
    label: str  # as typed, for messages

    @property
    def loaded(self) -> bool:
        return self.source is None


def model_choice(text: str | None, service: MolmoService, roots: Sequence[Path]) -> ModelChoice | None:
    """The tab's model field -> a choice (None for a blank field).

    A path (it exists, or starts with /, ., ~) must be a checkpoint folder inside the allowed folders; an
    `owner/name` that is no local folder is a hub id (downloaded when online, like the Model tab).

    Raises:
        EvalInputError: "loaded model" with nothing loaded, a path outside the allowed folders, a folder
            without config.json, or text that is neither a path nor a hub id.
    """
    text = (text or "").strip()
    if not text:
        return None
    if text == LOADED_MODEL:
        if service.get_runner() is None:
            raise EvalInputError("No model is loaded in the app: load one in the Model tab first, or type a "
                                 "checkpoint folder or hub id instead of 'loaded model'.")
        return ModelChoice(None, text)
    local = Path(text).expanduser()
    looks_like_path = text.startswith(("/", ".", "~")) or (local if local.is_absolute() else Path.cwd() / local).exists()
    if looks_like_path or not _HUB_ID.match(text):
        if not looks_like_path:
            raise EvalInputError(f"Model {text!r} is neither a checkpoint folder nor a hub id like "
                                 "allenai/Molmo-7B-D-0924.")
        folder = confined_path(text, roots, "Model folder")
        if not (folder / "config.json").is_file():
            raise EvalInputError(f"Model folder {text!r} has no config.json; expected a checkpoint in the official "
                                 "format (what the Model tab loads).")
        return ModelChoice(str(folder), text)
    return ModelChoice(text, text)


def _unique(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


class _Batched:
    """`generate_batch` for runners that only have `generate` (stand-ins in tests, other families)."""

    def __init__(self, runner: Any):
        self.runner = runner
        self.family = family_of(runner)  # the prompts follow the runner's family

    def generate_batch(self, requests, *, max_new_tokens: int) -> list[str]:
        batch = getattr(self.runner, "generate_batch", None)
        if batch is not None:
            return batch(requests, max_new_tokens=max_new_tokens)
        return [self.runner.generate(image, prompt, max_new_tokens=max_new_tokens) for image, prompt in requests]


# ---------------------------------------------------------------------------------------------- jobs


@dataclass
class EvalJob:
    """One evaluation: what was asked, where it stands, and (when done) the scored results."""

    id: str
    task: str
    data: str
    models: list[ModelChoice]
    out: Path
    dataset: Dataset | None = None
    phase: str = "queued"  # queued, loading data, loading model, generating, scoring, done, stopped, error
    message: str = "Waiting for the evaluation worker."
    names: list[str] = field(default_factory=list)
    total: int = 0
    done: list[int] = field(default_factory=list)
    error: str | None = None
    report: dict | None = None
    results: list[ModelResult] | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.time)

    @property
    def finished(self) -> bool:
        return self.phase in ("done", "stopped", "error")

    def progress(self) -> list[dict]:
        labels = self.names or [m.label for m in self.models]
        return [{"model": name, "loaded": m.loaded, "done": d, "total": self.total}
                for name, m, d in zip(labels, self.models, self.done)]

    def to_json(self) -> dict:
        return {"job": self.id, "task": self.task, "data": self.data, "phase": self.phase, "message": self.message,
                "total": self.total, "progress": self.progress(), "out": str(self.out), "error": self.error}

    def markdown(self) -> str:
        head = {"queued": "Queued", "loading data": "Preparing the data", "loading model": "Loading a model",
                "generating": "Running", "scoring": "Scoring", "done": "Done", "stopped": "Stopped",
                "error": "Failed"}[self.phase]
        lines = [f"**{head}**: {self.task} on `{self.data}` ({self.total or '?'} examples). {self.message}"]
        for i, p in enumerate(self.progress(), start=1):
            tag = " (the app's loaded model)" if p["loaded"] else ""
            lines.append(f"M{i} `{p['model']}`{tag}: {p['done']} / {p['total'] or '?'} examples")
        if self.phase == "done":
            lines.append(f"Files in `{self.out}`.")
        return "  \n".join(lines)


class EvalManager:
    """Runs evaluation jobs one after another on one daemon worker thread.

    Args:
        service: the app's service; its loaded runner is used as it is for "loaded model".
        loader: loads other models (default `molmo_core.load`); each is closed after its answers.
        roots: the app's allowed folders (`app.paths.Roots`: data root, checkpoints, $MOLMO_STUDIO_DATA_DIRS),
            or extra folders next to the working directory.
        out_root: where runs are written (default `runs/eval` under the working directory).
        batch_size: examples per batched generation, and how often progress moves.
    """

    def __init__(self, service: MolmoService, *, loader: Callable[..., Any] | None = None,
                 roots: Sequence[str | Path] | Roots = (), out_root: str | Path | None = None,
                 batch_size: int = BATCH_SIZE):
        self.service = service
        self._loader = loader
        self._app_roots = roots if isinstance(roots, Roots) else None
        self._roots = [] if isinstance(roots, Roots) else list(roots)
        if out_root is None and self._app_roots is not None:
            out_root = self._app_roots.data_root / "runs" / "eval"
        self._out_root = out_root
        self.batch_size = batch_size
        self._jobs: dict[str, EvalJob] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[EvalJob] = queue.Queue()
        self._worker: threading.Thread | None = None

    def roots(self) -> list[Path]:
        """The app's allowed folders when it runs confined (app.paths.Roots), else the working directory + extras."""
        return self._app_roots.all if self._app_roots is not None else allowed_roots(self._roots)

    # ------------------------------------------------------------------ submit / query

    def start(self, task: str, kind: str, n: float | str | None, path: str | None, images_dir: str | None,
              models: Sequence[str | None]) -> EvalJob:
        """Check the choices and queue a job (file data is read here, so its errors show at once).

        Raises:
            EvalInputError, EvalDataError: see :func:`data_spec`, :func:`model_choice`; no model chosen.
        """
        roots = self.roots()
        spec, synthetic = data_spec(kind, n, path, task, roots)
        choices = [c for c in (model_choice(m, self.service, roots) for m in list(models)[:MAX_MODELS]) if c]
        if not choices:
            raise EvalInputError(f"No model chosen: pick '{LOADED_MODEL}' (the model loaded in the app), a "
                                 "checkpoint folder or a hub id in at least one model field.")
        dataset = None
        if not synthetic:
            images = str(confined_path(images_dir, roots, "Images folder")) if (images_dir or "").strip() else None
            limit = None if n is None or str(n).strip() == "" else _whole(n)  # file: the first N, blank = all
            dataset = load_dataset(spec, task, images_dir=images, limit=limit)
            check_images_confined(dataset, roots)
        job_id = uuid.uuid4().hex[:8]
        out_root = Path(self._out_root) if self._out_root else Path.cwd() / "runs" / "eval"
        job = EvalJob(job_id, task, spec, choices, out_root / f"{time.strftime('%Y%m%d-%H%M%S')}-{task}-{job_id}",
                      dataset=dataset, total=len(dataset) if dataset else 0, done=[0] * len(choices))
        with self._lock:
            self._jobs[job_id] = job
            self._forget_old()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="molmo-eval", daemon=True)
                self._worker.start()
        self._queue.put(job)
        return job

    def get(self, job_id: str | None) -> EvalJob | None:
        with self._lock:
            return self._jobs.get(job_id) if job_id else None

    def stop(self, job_id: str | None) -> EvalJob | None:
        job = self.get(job_id)
        if job is not None and not job.finished:
            job.stop.set()
            if job.phase == "queued":
                job.phase, job.message = "stopped", "Stopped before it started."
        return job

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.finished]
        for job in sorted(finished, key=lambda j: j.started)[:max(0, len(self._jobs) - KEEP_JOBS)]:
            del self._jobs[job.id]

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job.finished:
                continue
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 -- sorted into user error / bug right here
                job.phase, job.error = "error", self._message(e)
                job.message = job.error

    @staticmethod
    def _message(e: Exception) -> str:
        if isinstance(e, USER_ERRORS + EVAL_INPUT_ERRORS + (EvalInputError,)):
            return str(e) or type(e).__name__
        ref = uuid.uuid4().hex[:8]
        log.exception("Unexpected error in the evaluation worker (ref %s)", ref)
        return (f"Something went wrong on our side while evaluating (ref {ref}); the details are in the server log. "
                "Try again, and quote the ref if it keeps happening.")

    def _open(self, choice: ModelChoice) -> tuple[Any, bool]:
        """(runner, owned): the app's runner as it is, or a freshly loaded one the caller must close."""
        if choice.loaded:
            runner = self.service.get_runner()
            if runner is None:
                raise EvalInputError("The app's model was unloaded before the evaluation reached it; load a model "
                                     "in the Model tab and start again.")
            return runner, False
        import molmo_core

        st = self.service.status()
        loader = self._loader or molmo_core.load
        return loader(choice.source, device=self.service.device, quantize=st.quantization if st.loaded else None), True

    def _run(self, job: EvalJob) -> None:
        if job.dataset is None:
            job.phase, job.message = "loading data", f"Making {job.data}."
            job.dataset = load_dataset(job.data, job.task)
            job.total = len(job.dataset)
        dataset = job.dataset
        loaded = self.service.get_runner()
        job.names = _unique([(getattr(loaded, "name", LOADED_MODEL) if m.loaded else m.label) for m in job.models])
        job.out.mkdir(parents=True, exist_ok=True)
        path = job.out / "predictions.jsonl"
        limit = getattr(self.service.limits, job.task, None)
        done: dict[tuple[str, int], str] = {}
        formats: dict[str, str] = {}
        for i, (choice, name) in enumerate(zip(job.models, job.names)):
            if job.stop.is_set():
                break
            job.phase, job.message = "loading model", f"Loading {name}."
            runner, owned = self._open(choice)
            try:
                job.phase, job.message = "generating", f"Answering with {name}."
                batched = _Batched(runner)
                formats[name] = format_for_family(batched.family)
                for start in range(0, len(dataset), self.batch_size):
                    if job.stop.is_set():
                        break
                    chunk = dataset.examples[start:start + self.batch_size]
                    generate_answers(batched, name, chunk, job.task, path, batch_size=self.batch_size,
                                     max_new_tokens=limit, done=done, progress=False)
                    job.done[i] = start + len(chunk)
            finally:
                if owned:
                    runner.close()
        if job.stop.is_set():
            job.phase = "stopped"
            job.message = "Stopped; answers so far are in predictions.jsonl (no report)."
            return
        job.phase, job.message = "scoring", "Scoring and writing the report."
        results = []
        for name in job.names:
            fmt = formats.get(name, ANSWER_FORMAT)
            results.append(score_model(name, dataset, job.task, {ex.index: done[(name, ex.index)]
                                                                  for ex in dataset.examples},
                                       get_format(fmt), get_count_parser(fmt), fmt))
        rules = list(dataset.notes)
        if job.task == "point":
            rules.append(RULE_NOTES[dataset.point_rule])
        if job.task == "count":
            rules.append(COUNT_NOTE)
        rules.append(MALFORMED_NOTE)
        report = report_dict(job.task, job.data, results, compare(results), rules, ANSWER_FORMAT)
        write_json(job.out / "report.json", report)
        write_html(job.out / "report.html", report, results)
        job.report, job.results = report, results
        job.phase, job.message = "done", "Report written."


# ---------------------------------------------------------------------------------------------- views


def metrics_table(report: dict | None) -> pd.DataFrame:
    """One row per metric; one column per model (M1, M2, ...), then per later model its difference from M1
    and the paired bootstrap 95 % interval."""
    if not report:
        return pd.DataFrame({"metric": []})
    models = report["models"]
    heads = ["metric"] + [f"M{i} {m['name']}" for i, m in enumerate(models, start=1)]
    for i, _ in enumerate(report["comparisons"], start=2):
        heads += [f"M{i} - M1", f"M{i} - M1 95% CI"]
    rows = []
    for key in report["metrics"]:
        row: list[Any] = [key]
        row += [int(m["metrics"][key]) if key == "n" else round(float(m["metrics"][key]), 4) for m in models]
        for comp in report["comparisons"]:
            cell = comp["metrics"][key]
            ci = cell["ci95"]
            row.append(round(float(cell["difference"]), 4))
            row.append(f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-")
        rows.append(row)
    return pd.DataFrame(rows, columns=heads, dtype=object)


def truth_text(result: ExampleResult, legend: bool = False) -> str:
    """The ground truth of an example in words (with `legend`, where the overlay shows it)."""
    ex = result.example
    if ex.clock is not None:
        if ex.clock[0] == -1:
            return "unanswerable (no readable clock)"
        return f"{ex.clock[0]}:{ex.clock[1]:02d}" + (f":{ex.second:02d}" if ex.second is not None else "")
    if isinstance(result.score, CountScore):
        return f"{ex.count} {ex.label}"
    if ex.points is not None:
        return f"{len(ex.points)} × {ex.label}" + (" (cyan rings; tinted masks where the data has them)" if legend else "")
    return f"the region of {ex.instruction!r}"


def example_choices(job: EvalJob) -> list[tuple[str, int]]:
    """Dropdown entries: '#i: truth · M1 score · M2 score'."""
    assert job.results is not None
    out = []
    for j, r in enumerate(job.results[0].results):
        scores = " · ".join(f"M{k} {m.results[j].score.primary():.2f}" for k, m in enumerate(job.results, start=1))
        out.append((f"#{r.example.index}: {truth_text(r)[:40]} · {scores}", j))
    return out


def example_view(job: EvalJob, index: int) -> tuple[list, str, pd.DataFrame]:
    """(overlay per model with its name, ground truth markdown, per-model answer and scores)."""
    assert job.results is not None
    first = job.results[0].results[index]
    gallery = [(draw_overlay(m.results[index]), f"M{k} {m.name}") for k, m in enumerate(job.results, start=1)]
    truth = (f"**Example #{first.example.index}** ({first.example.source}) · prompt: `{first.example.prompt(job.task)}`"
             f"  \n**Ground truth:** {truth_text(first, legend=True)}")
    rows = []
    for k, m in enumerate(job.results, start=1):
        r = m.results[index]
        values = ", ".join(f"{key} {v:.2f}" for key, v in r.values().items())
        rows.append([f"M{k} {m.name}", r.answer, round(float(r.score.primary()), 4), values])
    return gallery, truth, pd.DataFrame(rows, columns=["model", "answer", "score", "all scores"])


# ---------------------------------------------------------------------------------------------- handlers


class EvalHandlers:
    """The tab's handlers over one `EvalManager`; the job id lives in the session's `gr.State`."""

    def __init__(self, manager: EvalManager):
        self.m = manager

    @eval_errors("starting the evaluation")
    def start(self, task: str, kind: str, n: float | str | None, path: str, images_dir: str, model1: str,
              model2: str, model3: str) -> tuple[str, str, dict, gr.Timer]:
        job = self.m.start(task, kind, n, path, images_dir, [model1, model2, model3])
        return job.id, job.markdown(), job.to_json(), gr.Timer(active=True)

    def _job(self, job_id: str | None) -> EvalJob:
        job = self.m.get(job_id)
        if job is None:
            raise EvalInputError("No evaluation in this session yet: choose the data and models, and press Start.")
        return job

    @eval_errors("reading the evaluation's progress")
    def status(self, job_id: str | None, current: int | None = None) -> tuple[str, dict, pd.DataFrame, Any, list[str]]:
        """(status, status JSON, metrics table, example dropdown, report files)."""
        job = self.m.get(job_id)
        if job is None:
            return ("No evaluation yet.", {}, metrics_table(None), gr.Dropdown(choices=[], value=None), [])
        if job.phase != "done":
            return job.markdown(), job.to_json(), metrics_table(None), gr.Dropdown(choices=[], value=None), []
        choices = example_choices(job)
        value = current if isinstance(current, int) and 0 <= current < len(choices) else 0
        files = [str(job.out / "report.html"), str(job.out / "report.json")]
        return job.markdown(), job.to_json(), metrics_table(job.report), gr.Dropdown(choices=choices, value=value), files

    def poll(self, job_id: str | None, current: int | None) -> tuple:
        """`status` for the timer, which stops once the job has ended."""
        job = self.m.get(job_id)
        return (*self.status(job_id, current), gr.Timer(active=job is not None and not job.finished))

    @eval_errors("stopping the evaluation")
    def stop(self, job_id: str | None) -> tuple[str, dict]:
        job = self._job(job_id)
        if job.finished:
            return job.markdown(), job.to_json()
        self.m.stop(job_id)
        return job.markdown() + "  \nStopping after the current batch.", job.to_json()

    @eval_errors("showing the example")
    def example(self, job_id: str | None, index: int | float | None) -> tuple[list, str, pd.DataFrame]:
        if index is None:  # the example list was emptied (a new run started): nothing to show
            return [], "", pd.DataFrame(columns=["model", "answer", "score", "all scores"])
        job = self._job(job_id)
        if job.phase != "done" or not job.results:
            raise EvalInputError("The evaluation has not finished yet: the examples can be browsed once it is done.")
        n = len(job.results[0].results)
        if index is None or not float(index).is_integer() or not 0 <= int(index) < n:
            raise EvalInputError(f"Example {index!r} does not exist; choose 0 to {n - 1}.")
        return example_view(job, int(index))

    def step(self, delta: int) -> Callable:
        @eval_errors("showing the example")
        def go(job_id: str | None, index: int | float | None) -> tuple[Any, list, str, pd.DataFrame]:
            job = self._job(job_id)
            if job.phase != "done" or not job.results:
                raise EvalInputError("The evaluation has not finished yet: the examples can be browsed once it is done.")
            n = len(job.results[0].results)
            new = (int(index or 0) + delta) % n
            return (new, *example_view(job, new))
        go.__name__ = "eval_next" if delta > 0 else "eval_prev"
        return go


# ---------------------------------------------------------------------------------------------- layout


def create_eval_tab(service: MolmoService, *, loader: Callable[..., Any] | None = None,
                    roots: Sequence[str | Path] | Roots = (), out_root: str | Path | None = None,
                    batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """Build the Eval tab's components inside the current `gr.Blocks` / `gr.Tab` context; returns them."""
    h = EvalHandlers(EvalManager(service, loader=loader, roots=roots, out_root=out_root, batch_size=batch_size))
    c: dict[str, Any] = {"handlers": h}
    job_id = gr.State(None)
    gr.Markdown("Score models on pointing, counting or clock reading with AI2's metric definitions (the same "
                "evaluation as `launch.py --eval`). Data files must be under the app's allowed folders "
                f"(the data root, ./checkpoints, or a folder in `${DATA_DIRS_ENV}`). Other models are loaded for the run and freed after.")
    with gr.Row():
        with gr.Column():
            c["task"] = gr.Radio(list(TASKS), value="point", label="Task", elem_id="eval_task")
            c["kind"] = gr.Radio(DATA_KINDS, value="shapes", label="Data", elem_id="eval_kind")
            # no minimum / maximum: data_spec's message says what to type
            c["n"] = gr.Number(value=20, precision=0, elem_id="eval_n",
                               label=f"Number of examples (synthetic: 1 to {MAX_SYNTHETIC}; file: the first N, "
                                     "blank = all)")
            c["path"] = gr.Textbox(label="Data file or folder (for 'file or folder')",
                                   placeholder="data/pixmo_points_eval.parquet, clocks.jsonl, point_bench/",
                                   elem_id="eval_path")
            c["images_dir"] = gr.Textbox(label="Images folder (optional)", placeholder="(next to the data file)",
                                         elem_id="eval_images_dir")
        with gr.Column():
            info = "'loaded model', a checkpoint folder or a hub id; leave blank for fewer models"
            c["model1"] = gr.Dropdown([LOADED_MODEL], value=LOADED_MODEL, allow_custom_value=True,
                                      label="Model 1 (the baseline)", info=info, elem_id="eval_model1")
            c["model2"] = gr.Dropdown(["", LOADED_MODEL], value="", allow_custom_value=True, label="Model 2",
                                      elem_id="eval_model2")
            c["model3"] = gr.Dropdown(["", LOADED_MODEL], value="", allow_custom_value=True, label="Model 3",
                                      elem_id="eval_model3")
            with gr.Row():
                c["start"] = gr.Button("Start", variant="primary", elem_id="eval_start")
                c["stop"] = gr.Button("Stop", elem_id="eval_stop")
                c["refresh"] = gr.Button("Refresh", elem_id="eval_refresh")
    c["status"] = gr.Markdown("No evaluation yet.", elem_id="eval_status")
    with gr.Accordion("Status (JSON)", open=False):
        c["status_json"] = gr.JSON(elem_id="eval_status_json")
    c["table"] = gr.Dataframe(label="Metrics (one column per model; differences and 95 % intervals against M1)",
                              interactive=False, elem_id="eval_table", wrap=True)
    c["files"] = gr.File(label="Report (report.html with overlays, report.json)", file_count="multiple",
                         interactive=False, elem_id="eval_files")
    gr.Markdown("### Examples")
    with gr.Row():
        c["prev"] = gr.Button("◀ Previous", elem_id="eval_prev", scale=0)
        c["pick"] = gr.Dropdown(choices=[], value=None, label="Example", elem_id="eval_pick", scale=4)
        c["next"] = gr.Button("Next ▶", elem_id="eval_next", scale=0)
    c["truth"] = gr.Markdown("", elem_id="eval_truth")
    c["gallery"] = gr.Gallery(label="Overlays, one per model (cyan: ground truth; green: hit; red: miss; "
                              "yellow: counted)", columns=3, height=380, elem_id="eval_gallery", format="png")
    c["answers"] = gr.Dataframe(headers=["model", "answer", "score", "all scores"], interactive=False, wrap=True,
                                elem_id="eval_answers")
    c["job_id"] = job_id
    timer = gr.Timer(1.0, active=False)  # polls only while this session's job runs
    c["timer"] = timer

    start_inputs = [c[k] for k in ("task", "kind", "n", "path", "images_dir", "model1", "model2", "model3")]
    status_outputs = [c["status"], c["status_json"], c["table"], c["pick"], c["files"]]
    example_outputs = [c["gallery"], c["truth"], c["answers"]]
    c["start"].click(h.start, start_inputs, [job_id, c["status"], c["status_json"], timer], api_name="eval_start",
                     concurrency_limit=1, concurrency_id="eval_start")
    c["refresh"].click(h.status, [job_id, c["pick"]], status_outputs, api_name="eval_status")
    timer.tick(h.poll, [job_id, c["pick"]], status_outputs + [timer], api_name="eval_poll",
               api_visibility="undocumented", show_progress="hidden")
    c["stop"].click(h.stop, [job_id], [c["status"], c["status_json"]], api_name="eval_stop")
    c["pick"].change(h.example, [job_id, c["pick"]], example_outputs, api_name="eval_example",
                     show_progress="hidden")
    c["prev"].click(h.step(-1), [job_id, c["pick"]], [c["pick"]] + example_outputs, api_name="eval_prev")
    c["next"].click(h.step(+1), [job_id, c["pick"]], [c["pick"]] + example_outputs, api_name="eval_next")
    return c
