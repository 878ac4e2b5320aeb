"""The Train tab: pick data and settings, start / stop a fine-tune in a background process, watch the
loss curve, load the result into the app.

Layout and wiring only: the run is `python -m molmo_core.train ...` started by
`molmo_core.train.cli.start_background`, logging to OUT/train.log and writing OUT/metrics.jsonl, which this
tab polls. Handlers are plain functions so tests can call them directly; every event has an `api_name`
starting with `train_`. User-facing failures are `gr.Error` with what to do.
"""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from molmo_core.train.cli import start_background, stop_background
from molmo_core.train.plot import read_metrics
from molmo_core.train.recipe import TrainArgs

from .handlers import user_errors

_procs: dict[str, subprocess.Popen] = {}
_lock = threading.Lock()
LOG_TAIL_CHARS = 6000


def _error(message: str) -> gr.Error:
    return gr.Error(message, duration=None, print_exception=False)


def _split(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").replace("\n", ",").split(",") if s.strip()]


def default_out_dir() -> str:
    return str(Path("runs") / time.strftime("finetune-%Y%m%d-%H%M%S"))


@user_errors("starting the run")
def start_run(get_model_source: Callable[[], str | None], base_model: str, data: str, images_dir: str, out: str,
              mode: str, max_steps: float | None, lr: float | None, batch_size: float, grad_accum: float,
              max_crops: float, lora_rank: float, lora_connector: bool, eval_fraction: float) -> tuple[str, str]:
    """Start a background run; returns (run folder, status text)."""
    model = (base_model or "").strip() or (get_model_source() or "")
    if not model:
        raise _error("No base model: load a model in the app first, or type a checkpoint folder / hub id.")
    sources = _split(data)
    if not sources:
        raise _error("Enter the training data: a PixMo-Cap parquet, a JSONL of {image, caption, transcripts}, "
                     "a folder of those, or clocks:N.")
    # Absolute paths: the run's log and status name exactly what was used, whatever the run's cwd.
    sources = [str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p for p in sources]
    out = str(Path((out or "").strip() or default_out_dir()).expanduser().resolve())
    images_dir = str(Path(images_dir.strip()).expanduser().resolve()) if (images_dir or "").strip() else None
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    args = TrainArgs(model=model, data=sources, out=out, images_dir=images_dir, mode=mode,
                     max_steps=int(max_steps) if max_steps else None, lr=float(lr) if lr else None,
                     batch_size=int(batch_size), grad_accum=int(grad_accum), max_crops=int(max_crops),
                     lora_rank=int(lora_rank), lora_connector=bool(lora_connector),
                     eval_fraction=float(eval_fraction))
    try:
        args.validate()
    except ValueError as e:
        raise _error(str(e)) from None
    key = out
    with _lock:
        running = _procs.get(key)
        if running is not None and running.poll() is None:
            raise _error(f"A run is already writing to {out}; stop it first or choose another output folder.")
        _procs[key] = start_background(args)
    return key, f"Started: {mode} fine-tune of {model} -> {out} (pid {_procs[key].pid})."


@user_errors("stopping the run")
def stop_run(run_dir: str | None) -> str:
    if not run_dir:
        return "No run started in this session."
    proc = _procs.get(run_dir)
    if proc is None or proc.poll() is not None:
        return "The run is not running."
    code = stop_background(proc)
    return f"Stopped (exit code {code}); a checkpoint was saved, start again with the same folder to resume."


@user_errors("reading the run's progress")
def poll_run(run_dir: str | None) -> tuple[str, str, pd.DataFrame]:
    """(status, log tail, loss table with columns step, loss, series) for the run folder."""
    empty = pd.DataFrame({"step": [], "loss": [], "series": []})
    if not run_dir:
        return "No run yet.", "", empty
    out = Path(run_dir)
    rows = read_metrics(out / "metrics.jsonl")
    data = [{"step": r["step"], "loss": r["loss"], "series": "train"} for r in rows if "loss" in r]
    data += [{"step": r["step"], "loss": r["eval_loss"], "series": "eval"} for r in rows if "eval_loss" in r]
    df = pd.DataFrame(data) if data else empty
    log = out / "train.log"
    tail = log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log.is_file() else ""
    proc = _procs.get(run_dir)
    last = next((r for r in reversed(rows) if "loss" in r), None)
    where = f"step {last['step']}, loss {last['loss']:.4f}, {last['tokens_per_s']:,.0f} tok/s" if last else "starting"
    if proc is not None and proc.poll() is None:
        status = f"Running: {where}."
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
                     on_load_result: Callable[[str], None]) -> dict[str, Any]:
    """Build the Train tab's components inside the current `gr.Blocks` / `gr.Tab` context."""
    c: dict[str, Any] = {}
    run_dir = gr.State(None)
    gr.Markdown("Fine-tune the model on PixMo-Cap-style records (captions, transcripts), clocks or points. "
                "The run happens in a background process; its output folder holds metrics.jsonl, loss.png, "
                "checkpoints/ and, at the end, final/ (loadable here) and adapter/ (LoRA).")
    with gr.Row():
        c["data"] = gr.Textbox(label="Training data", placeholder="captions.parquet, more.jsonl, clocks:200",
                               info="PixMo-Cap parquet, JSONL, a folder of those, or clocks:N; comma-separated")
        c["images_dir"] = gr.Textbox(label="Images folder", placeholder="(next to the data file)")
    with gr.Row():
        c["base_model"] = gr.Textbox(label="Base model", placeholder="(the model loaded in the app)")
        c["out"] = gr.Textbox(label="Output folder", value=default_out_dir())
    with gr.Row():
        c["mode"] = gr.Radio(["lora", "qlora", "full"], value="lora", label="Mode",
                             info="QLoRA fits 7B on a 24 GB card; full needs ~130 GB for 7B")
        c["max_steps"] = gr.Number(label="Max steps (blank = 4 epochs)", value=None, precision=0)
        c["lr"] = gr.Number(label="LLM learning rate (blank = default)", value=None)
    with gr.Row():
        c["batch_size"] = gr.Number(label="Batch size", value=1, precision=0, minimum=1)
        c["grad_accum"] = gr.Number(label="Gradient accumulation", value=8, precision=0, minimum=1)
        c["max_crops"] = gr.Slider(1, 12, value=12, step=1, label="Max crops")
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
    c["log"] = gr.Textbox(label="Log", lines=12, max_lines=12, autoscroll=True)
    c["run_dir"] = run_dir
    timer = gr.Timer(2.0, active=False)  # polls only while a run of this session is running

    def _start(*values):
        return *start_run(get_model_source, *values), gr.Timer(active=True)

    def _poll(run_dir_value):
        return *poll_run(run_dir_value), gr.Timer(active=is_running(run_dir_value))

    start_inputs = [c[k] for k in ("base_model", "data", "images_dir", "out", "mode", "max_steps", "lr", "batch_size",
                                   "grad_accum", "max_crops", "lora_rank", "lora_connector", "eval_fraction")]
    c["start"].click(_start, start_inputs, [run_dir, c["status"], timer], api_name="train_start")
    c["stop"].click(stop_run, [run_dir], [c["status"]], api_name="train_stop")
    poll_outputs = [c["status"], c["log"], c["plot"]]
    c["refresh"].click(poll_run, [run_dir], poll_outputs, api_name="train_refresh")
    timer.tick(_poll, [run_dir], poll_outputs + [timer], api_name="train_poll", show_progress="hidden")
    c["load"].click(lambda d: load_result(d, on_load_result), [run_dir], [c["status"]], api_name="train_load")
    return c
