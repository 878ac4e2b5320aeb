"""The Train tab: pick data and settings, start / stop a fine-tune in a background process, watch the
loss curve and the held-out task metrics (point / count / clock questions the model answers at each
evaluation, `eval_count_accuracy` ... in metrics.jsonl), load the result into the app.

Layout and wiring only: the run is `python -m molmo_core.train ...` started by
`molmo_core.train.cli.start_background`, logging to OUT/train.log and writing OUT/metrics.jsonl, which this
tab polls. Handlers are plain functions so tests can call them directly; every event has an `api_name`
starting with `train_`. User-facing failures are `gr.Error` with what to do.
"""
from __future__ import annotations

import math
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from molmo_core.train.cli import STOPPED_EXIT_CODE, absolute_paths, start_background, stop_background
from molmo_core.train.plot import read_metrics
from molmo_core.train.recipe import TrainArgs
from molmo_core.train.task_eval import TASK_METRICS

from .crops import MAX_CROPS_DEFAULT, MAX_CROPS_MAX, MAX_CROPS_MIN
from .handlers import checkpoint_source, user_errors
from .paths import Roots

_procs: dict[str, subprocess.Popen] = {}
_lock = threading.Lock()
LOG_TAIL_CHARS = 6000


def _error(message: str) -> gr.Error:
    return gr.Error(message, duration=None, print_exception=False)


def _split(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").replace("\n", ",").split(",") if s.strip()]


def _optional_number(value: str | float | None, label: str, default: str, whole: bool = False) -> float | int | None:
    """The number typed into an optional field; None (the trainer's default) when it is left blank."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or (whole and not number.is_integer()):
        kind = "a whole number" if whole else "a number"
        raise _error(f"{label}: {text!r} is not {kind}. Type {kind} (e.g. {'500' if whole else '2e-5'}), or leave "
                     f"the field blank for the default ({default}).")
    return int(number) if whole else number


_SYNTHETIC = re.compile(r"^[a-z_]+:")  # clocks:N, shapes:N: generated, not files


def default_out_dir() -> str:
    return str(Path("runs") / time.strftime("finetune-%Y%m%d-%H%M%S"))


def confine_run(roots: Roots | None, model: str, sources: list[str], images_dir: str | None,
                out: str) -> tuple[str, list[str], str | None, str]:
    """The run's paths checked against the allowed folders (unchanged when the app is not confined): data
    and images inside a read root, the output folder inside the data root (relative: under it), the base
    model a hub id or a folder inside a read root. Raises PathRefused with what to do."""
    if roots is None:
        return model, sources, images_dir, out
    files = [s if _SYNTHETIC.match(s) else str(roots.inside(s, "Training data")) for s in sources]
    images = str(roots.inside(images_dir, "Images folder")) if images_dir else None
    out_dir = str(roots.inside(out, "Output folder", write=True, must_exist=False))
    return checkpoint_source(model, roots), files, images, out_dir


def _run_folder(run_dir: str | None, roots: Roots | None) -> str | None:
    """A run folder from the session state, checked like every other path."""
    if not run_dir or roots is None:
        return run_dir
    return str(roots.inside(run_dir, "Run folder", write=True, must_exist=False))


@user_errors("starting the run")
def start_run(get_model_source: Callable[[], str | None], base_model: str, data: str, images_dir: str, out: str,
              mode: str, max_steps: str | float | None, lr: str | float | None, batch_size: float, grad_accum: float,
              max_crops: float, lora_rank: float, lora_connector: bool, eval_fraction: float,
              roots: Roots | None = None) -> tuple[str, str]:
    """Start a background run; returns (run folder, status text). A blank max_steps / lr ("" or None) means the
    trainer's default; relative paths are resolved against the app's working directory (against the data root
    when the app runs confined to `roots`)."""
    model = (base_model or "").strip() or (get_model_source() or "")
    if not model:
        raise _error("No base model: load a model in the app first, or type a checkpoint folder / hub id.")
    sources = _split(data)
    if not sources:
        raise _error("Enter the training data: a PixMo-Cap parquet, a JSONL of {image, caption, transcripts}, "
                     "a folder of those, or clocks:N.")
    model, sources, images, out_dir = confine_run(roots, model, sources, (images_dir or "").strip() or None,
                                                  (out or "").strip() or default_out_dir())
    args = TrainArgs(model=model, data=sources, out=out_dir,
                     images_dir=images, mode=mode,
                     max_steps=_optional_number(max_steps, "Max steps", "4 epochs", whole=True),
                     lr=_optional_number(lr, "LLM learning rate", "2e-5 full, 1e-4 LoRA / QLoRA"),
                     batch_size=int(batch_size), grad_accum=int(grad_accum), max_crops=int(max_crops),
                     lora_rank=int(lora_rank), lora_connector=bool(lora_connector),
                     eval_fraction=float(eval_fraction))
    try:
        args.validate()
    except ValueError as e:
        raise _error(str(e)) from None
    args = absolute_paths(args)  # the run's log and status name exactly what was used
    key = args.out
    with _lock:
        running = _procs.get(key)
        if running is not None and running.poll() is None:
            raise _error(f"A run is already writing to {key}; stop it first or choose another output folder.")
        _procs[key] = start_background(args)
    return key, f"Started: {mode} fine-tune of {args.model} -> {key} (pid {_procs[key].pid})."


def _training_rows(out: Path) -> list[dict]:
    """The lines of OUT/metrics.jsonl that carry a step (a half-written or foreign line is skipped)."""
    return [r for r in read_metrics(out / "metrics.jsonl") if isinstance(r, dict) and "step" in r]


def _progress(rows: list[dict]) -> str:
    """'step S, loss L, T tok/s' from the last training line of metrics.jsonl (fields it lacks are left out)."""
    last = next((r for r in reversed(rows) if "loss" in r), None)
    if last is None:
        return "starting"
    parts = [f"step {last['step']}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("tokens_per_s", "{:,.0f} tok/s")):
        if isinstance(last.get(key), (int, float)):
            parts.append(fmt.format(last[key]))
    tasks = _task_metric_rows(rows)
    if tasks:
        step = tasks[-1]["step"]
        parts.append("held-out " + ", ".join(f"{r['series']} {r['value']:.3f}" for r in tasks if r["step"] == step)
                     + f" (step {step})")
    return ", ".join(parts)


def _task_metric_rows(rows: list[dict]) -> list[dict]:
    """{step, value, series: "count accuracy"} for every task metric (eval_count_accuracy, ...) in the rows."""
    keys = [(f"eval_{task}_{name}", f"{task} {name.replace('_', ' ')}") for task, names in TASK_METRICS.items()
            for name in names]
    return [{"step": r["step"], "value": r[key], "series": series} for r in rows for key, series in keys
            if isinstance(r.get(key), (int, float))]


@user_errors("reading the run's held-out metrics")
def poll_task_metrics(run_dir: str | None) -> pd.DataFrame:
    """The held-out task metrics of the run folder as a table with columns step, value, series."""
    data = _task_metric_rows(_training_rows(Path(run_dir))) if run_dir else []
    return pd.DataFrame(data) if data else pd.DataFrame({"step": [], "value": [], "series": []})


def _stopped_message(code: int | None, where: str) -> str:
    if code == STOPPED_EXIT_CODE:
        return f"Stopped at {where}: a checkpoint was saved; start again with the same folder to resume."
    return (f"Ended with exit code {code} at {where} instead of stopping cleanly; see the log. Starting again with "
            "the same folder resumes from the latest checkpoint, if there is one.")


@user_errors("stopping the run")
def stop_run(run_dir: str | None) -> str:
    """Ask the run to stop (it saves a checkpoint and exports) and wait until its process has ended."""
    if not run_dir:
        return "No run started in this session."
    proc = _procs.get(run_dir)
    if proc is None or proc.poll() is not None:
        return "The run is not running."
    code = stop_background(proc)
    return _stopped_message(code, _progress(_training_rows(Path(run_dir))))


@user_errors("reading the run's progress")
def poll_run(run_dir: str | None) -> tuple[str, str, pd.DataFrame]:
    """(status, log tail, loss table with columns step, loss, series) for the run folder."""
    empty = pd.DataFrame({"step": [], "loss": [], "series": []})
    if not run_dir:
        return "No run yet.", "", empty
    out = Path(run_dir)
    rows = _training_rows(out)
    data = [{"step": r["step"], "loss": r["loss"], "series": "train"} for r in rows if "loss" in r]
    data += [{"step": r["step"], "loss": r["eval_loss"], "series": "eval"} for r in rows if "eval_loss" in r]
    df = pd.DataFrame(data) if data else empty
    log = out / "train.log"
    tail = log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log.is_file() else ""
    proc = _procs.get(run_dir)
    where = _progress(rows)
    if proc is not None and proc.poll() is None:
        status = f"Running: {where}."
    elif proc is not None and proc.returncode == STOPPED_EXIT_CODE:
        status = _stopped_message(proc.returncode, where)
    elif (out / "final" / "config.json").is_file():
        status = f"Finished: {where}. The model is in {out / 'final'}."
    elif proc is not None:
        status = f"Ended with exit code {proc.returncode} at {where}; see the log."
    else:
        status = f"Not running ({where})."
    return status, tail, df


def is_running(run_dir: str | None) -> bool:
    proc = _procs.get(run_dir) if run_dir else None
    return proc is not None and proc.poll() is None


@user_errors("loading the result")
def load_result(run_dir: str | None, on_load_result: Callable[[str], None]) -> str:
    if not run_dir:
        raise _error("Start (or pick) a run first.")
    final = Path(run_dir) / "final"
    if not (final / "config.json").is_file():
        raise _error(f"{final} does not exist yet: wait for the run to finish (or stop it, which exports).")
    on_load_result(str(final))
    return f"Loading {final} into the app."


def create_train_tab(get_model_source: Callable[[], str | None],
                     on_load_result: Callable[[str], None], roots: Roots | None = None) -> dict[str, Any]:
    """Build the Train tab's components inside the current `gr.Blocks` / `gr.Tab` context.

    With `roots` every path is confined (app.paths.Roots): outputs under the data root, inputs under the
    allowed folders."""
    c: dict[str, Any] = {}
    run_dir = gr.State(None)
    gr.Markdown("Fine-tune the model on PixMo-Cap-style records (captions, transcripts), clocks or points. "
                "The run happens in a background process; its output folder holds metrics.jsonl, loss.png, "
                "checkpoints/ and, at the end, final/ (loadable here) and adapter/ (LoRA).")
    with gr.Row():
        c["data"] = gr.Textbox(label="Training data", placeholder="captions.parquet, more.jsonl, clocks:200",
                               info="PixMo-Cap parquet, JSONL, a folder of those, clocks:N or shapes:N; "
                                    "comma-separated")
        c["images_dir"] = gr.Textbox(label="Images folder", placeholder="(next to the data file)")
    with gr.Row():
        c["base_model"] = gr.Textbox(label="Base model", placeholder="(the model loaded in the app)")
        c["out"] = gr.Textbox(label="Output folder", value=default_out_dir())
    with gr.Row():
        c["mode"] = gr.Radio(["lora", "qlora", "full"], value="lora", label="Mode",
                             info="QLoRA fits 7B on a 24 GB card; full needs ~130 GB for 7B")
        # value None + a placeholder: the field is empty (without a placeholder Gradio shows 0)
        # Textboxes, not gr.Number: a Number's page shows 0 when its value is None, so "blank" could not be typed
        c["max_steps"] = gr.Textbox(label="Max steps (blank = 4 epochs)", value="", placeholder="4 epochs",
                                    elem_id="train_max_steps")
        c["lr"] = gr.Textbox(label="LLM learning rate (blank = default)", value="",
                             placeholder="2e-5 full, 1e-4 LoRA / QLoRA", elem_id="train_lr")
    with gr.Row():
        c["batch_size"] = gr.Number(label="Batch size", value=1, precision=0, minimum=1)
        c["grad_accum"] = gr.Number(label="Gradient accumulation", value=8, precision=0, minimum=1)
        c["max_crops"] = gr.Slider(MAX_CROPS_MIN, MAX_CROPS_MAX, value=MAX_CROPS_DEFAULT, step=1, label="Max crops",
                                   elem_id="train_max_crops")
        c["lora_rank"] = gr.Number(label="LoRA rank", value=16, precision=0, minimum=1)
        c["lora_connector"] = gr.Checkbox(label="LoRA on the connector too", value=False)
        c["eval_fraction"] = gr.Slider(0, 0.5, value=0.05, step=0.01, label="Held-out fraction")
    with gr.Row():
        c["start"] = gr.Button("Start", variant="primary")
        c["stop"] = gr.Button("Stop")
        c["refresh"] = gr.Button("Refresh")
        c["load"] = gr.Button("Load result into the app")
    c["status"] = gr.Markdown("No run yet.")
    c["plot"] = gr.LinePlot(x="step", y="loss", color="series", label="Loss", height=300)
    c["metrics_plot"] = gr.LinePlot(x="step", y="value", color="series", y_lim=[0, 1], height=300,
                                    label="Held-out task metrics (the model's answers to point / count / clock "
                                          "questions, scored as in the Evaluate tab)")
    c["log"] = gr.Textbox(label="Log", lines=12, max_lines=12, autoscroll=True)
    c["run_dir"] = run_dir
    timer = gr.Timer(2.0, active=False)  # polls only while a run of this session is running

    @user_errors("starting the run")
    def _start(*values):
        return *start_run(get_model_source, *values, roots=roots), gr.Timer(active=True)

    @user_errors("reading the run's progress")
    def _poll(run_dir_value):
        run = _run_folder(run_dir_value, roots)
        return *poll_run(run), gr.Timer(active=is_running(run))

    @user_errors("stopping the run")
    def _stop(run_dir_value):
        return stop_run(_run_folder(run_dir_value, roots))

    @user_errors("reading the run's progress")
    def _refresh(run_dir_value):
        return poll_run(_run_folder(run_dir_value, roots))

    @user_errors("reading the run's metrics")
    def _metrics(run_dir_value):
        return poll_task_metrics(_run_folder(run_dir_value, roots))

    @user_errors("loading the result")
    def _load(run_dir_value):
        return load_result(_run_folder(run_dir_value, roots), on_load_result)

    start_inputs = [c[k] for k in ("base_model", "data", "images_dir", "out", "mode", "max_steps", "lr", "batch_size",
                                   "grad_accum", "max_crops", "lora_rank", "lora_connector", "eval_fraction")]
    c["start"].click(_start, start_inputs, [run_dir, c["status"], timer], api_name="train_start")
    c["stop"].click(_stop, [run_dir], [c["status"]], api_name="train_stop")
    poll_outputs = [c["status"], c["log"], c["plot"]]
    c["refresh"].click(_refresh, [run_dir], poll_outputs, api_name="train_refresh")
    timer.tick(_poll, [run_dir], poll_outputs + [timer], api_name="train_poll", show_progress="hidden")
    c["refresh"].click(_metrics, [run_dir], [c["metrics_plot"]], api_name="train_refresh_metrics")
    timer.tick(_metrics, [run_dir], [c["metrics_plot"]], api_name="train_poll_metrics",
               show_progress="hidden")
    c["load"].click(_load, [run_dir], [c["status"]], api_name="train_load")
    return c
