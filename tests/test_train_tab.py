"""The Train tab: layout and api names, its form fields, real background runs driven through its handlers
(finished and stopped), and `--finetune --background` with relative paths."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from molmo_core.tiny import write_tiny_checkpoint
from molmo_core.train.cli import STOPPED_EXIT_CODE, absolute_paths
from molmo_core.train.plot import read_metrics
from molmo_core.train.recipe import TrainArgs

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def test_tab_builds_with_train_api_names():
    from app.train_tab import create_train_tab

    with gr.Blocks() as demo:
        with gr.Tab("Train"):
            create_train_tab(lambda: None, lambda path: None)
    names = [d.get("api_name") for d in demo.config["dependencies"]]
    assert names and all(n.startswith("train_") for n in names)
    assert {"train_start", "train_stop", "train_poll", "train_load"} <= set(names)


def test_background_run_through_handlers(tmp_path, monkeypatch):
    from app import train_tab

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", "d")
    one_record(tmp_path)
    with pytest.raises(gr.Error, match="No base model"):
        train_tab.start_run(lambda: None, "", str(tmp_path / "d.jsonl"), "", str(tmp_path / "o"), "lora", 3, None, 1,
                            1, 1, 4, False, 0.0)
    run_dir, status = train_tab.start_run(lambda: str(ckpt), "", str(tmp_path / "d.jsonl"), "", str(tmp_path / "out"),
                                          "lora", 3, 1e-3, 1, 1, 1, 4, False, 0.0)
    assert status.startswith("Started")
    deadline = time.time() + 120
    while time.time() < deadline and train_tab._procs[run_dir].poll() is None:
        time.sleep(0.5)
    status, log, df = train_tab.poll_run(run_dir)
    assert status.startswith("Finished"), log
    assert list(df["step"]) == [1, 2, 3] and set(df["series"]) == {"train"}
    loaded = []
    assert "Loading" in train_tab.load_result(run_dir, loaded.append)
    assert loaded == [os.path.join(run_dir, "final")]
    assert train_tab.stop_run(run_dir) == "The run is not running."


# ----------------------------------------------------------------------------------------- form fields
def _components(demo: gr.Blocks) -> dict[str, dict]:
    """elem_id -> props of every component that has one."""
    return {c["props"]["elem_id"]: c["props"] for c in demo.config["components"] if c.get("props", {}).get("elem_id")}


def test_optional_fields_start_blank_and_blank_means_the_default(tmp_path, monkeypatch):
    """Max steps and the learning rate start blank, a blank field reaches the trainer as None (its default), and
    anything but a number is refused with what to type."""
    from app import train_tab

    with gr.Blocks() as demo:
        train_tab.create_train_tab(lambda: None, lambda path: None)
    props = _components(demo)
    for elem_id in ("train_max_steps", "train_lr"):
        assert props[elem_id].get("value") in (None, "") and props[elem_id]["placeholder"], props[elem_id]

    started: list[TrainArgs] = []
    monkeypatch.setattr(train_tab, "start_background", lambda args: started.append(args) or FakeProc())

    def start(max_steps, lr, out: str):
        return train_tab.start_run(lambda: "some/model", "", "clocks:4", "", str(tmp_path / out), "lora", max_steps,
                                   lr, 1, 1, 1, 4, False, 0.0)

    start("", " ", "a")
    start(None, None, "b")
    start("500", "3e-4", "c")
    assert [(a.max_steps, a.lr) for a in started] == [(None, None), (None, None), (500, 3e-4)]
    assert started[0].resolved_lr() == 1e-4  # the LoRA default
    with pytest.raises(gr.Error, match=r"Max steps: '12.5' is not a whole number. Type a whole number \(e.g. 500\)"):
        start("12.5", "", "d")
    with pytest.raises(gr.Error, match="LLM learning rate: 'fast' is not a number.*blank for the default"):
        start("", "fast", "e")
    with pytest.raises(gr.Error, match="max_steps must be >= 1; got 0"):
        start("0", "", "f")


@pytest.mark.browser
def test_optional_fields_show_blank_in_the_browser():
    """What the page shows: empty inputs (a gr.Number whose value is None is drawn as 0 by Gradio's frontend)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from app import train_tab

    with gr.Blocks() as demo:
        train_tab.create_train_tab(lambda: None, lambda path: None)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page()
            page.goto(url, wait_until="load")
            for elem_id in ("train_max_steps", "train_lr"):
                field = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
                field.wait_for(timeout=30000)
                assert field.input_value() == "", elem_id
            browser.close()
    finally:
        demo.close()


class FakeProc:
    pid = 1234

    def poll(self):
        return None


def test_max_crops_slider_has_the_model_tabs_range():
    from app.service import MolmoService
    from app.ui import build_demo

    props = _components(build_demo(MolmoService()))
    model, train = props["model_max_crops"], props["train_max_crops"]
    assert (train["minimum"], train["maximum"], train["value"]) == (model["minimum"], model["maximum"],
                                                                    model["value"])


def test_status_without_tokens_per_s_still_shows_progress(tmp_path):
    """A metrics line lacking tokens_per_s (older runs, hand-written files) must not break the status."""
    from app import train_tab

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "tokens_per_s": 50.0}) + "\n"
                                            + json.dumps({"step": 2, "loss": 1.5}) + "\n"
                                            + json.dumps({"step": 2, "eval_loss": 1.7}) + "\n")
    status, _, df = train_tab.poll_run(str(tmp_path))
    assert status == "Not running (step 2, loss 1.5000)."
    assert list(df["step"]) == [1, 2, 2] and list(df["series"]) == ["train", "train", "eval"]


# ----------------------------------------------------------------------------------------- stop
def test_stop_from_the_tab_ends_the_run_and_no_more_steps_are_written(ckpt, tmp_path, monkeypatch):
    """Start a long run through the tab's handler, stop it once it has logged two steps: the process (and its
    process group) is gone, it saved a checkpoint at its last logged step, nothing is written to metrics.jsonl
    after the stop, and the tab says it stopped (not finished, although a stopped run exports final/)."""
    from app import train_tab

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = one_record(tmp_path)
    max_steps = 10_000
    run_dir, status = train_tab.start_run(lambda: str(ckpt), "", str(data), "", str(tmp_path / "out"), "lora",
                                          max_steps, 1e-3, 1, 1, 1, 4, False, 0.0)
    proc = train_tab._procs[run_dir]
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(logged_steps(metrics)) < 2:
        time.sleep(0.1)
    assert proc.poll() is None and len(logged_steps(metrics)) >= 2, (tmp_path / "out" / "train.log").read_text()

    message = train_tab.stop_run(run_dir)
    assert proc.poll() == STOPPED_EXIT_CODE, message
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # the run's whole process group ended, not only the process we started
    steps = logged_steps(metrics)
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] < max_steps
    assert message.startswith(f"Stopped at step {steps[-1]}")
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == f"step-{steps[-1]:07d}"
    written = metrics.read_bytes()
    time.sleep(1.0)
    assert metrics.read_bytes() == written
    status, _, _ = train_tab.poll_run(run_dir)
    assert status.startswith(f"Stopped at step {steps[-1]}") and not train_tab.is_running(run_dir)
    assert train_tab.stop_run(run_dir) == "The run is not running."


def one_record(folder: Path) -> Path:
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8")).save(folder / "a.png")
    (folder / "d.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a red cup"}) + "\n")
    return folder / "d.jsonl"


def logged_steps(metrics: Path) -> list[int]:
    return [r["step"] for r in read_metrics(metrics) if "loss" in r]


# ----------------------------------------------------------------------------------------- --background
def test_absolute_paths_resolve_local_paths_only(tmp_path):
    (tmp_path / "ckpt").mkdir()
    args = TrainArgs(model="ckpt", data=["d.jsonl", "clocks:5"], eval_data=["e.jsonl"], out="runs/a",
                     images_dir="imgs")
    got = absolute_paths(args, cwd=tmp_path)
    assert got.model == str(tmp_path / "ckpt") and got.out == str(tmp_path / "runs" / "a")
    assert got.data == [str(tmp_path / "d.jsonl"), "clocks:5"] and got.eval_data == [str(tmp_path / "e.jsonl")]
    assert got.images_dir == str(tmp_path / "imgs")
    assert absolute_paths(TrainArgs(model="allenai/Molmo-7B-D-0924"), cwd=tmp_path).model == "allenai/Molmo-7B-D-0924"


def test_background_cli_resolves_relative_out_and_data_against_the_callers_cwd(ckpt, tmp_path, monkeypatch):
    """`--finetune --background --data d.jsonl --out run` from another directory than the repository: the
    child process reads tmp/d.jsonl and writes tmp/run (not ROOT/run)."""
    from molmo_core.train import cli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one_record(tmp_path)
    monkeypatch.chdir(tmp_path)
    started = []
    real = cli.start_background
    monkeypatch.setattr(cli, "start_background", lambda args: started.append(real(args)) or started[-1])
    assert cli.main(["--finetune", "--background", "--model", str(ckpt), "--data", "d.jsonl", "--out", "run",
                     "--max-steps", "1", "--max-crops", "1", "--eval-fraction", "0", "--no-export"]) == 0
    assert started[0].wait(120) == 0, (tmp_path / "run" / "train.log").read_text()
    assert logged_steps(tmp_path / "run" / "metrics.jsonl") == [1]
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    assert str(tmp_path / "d.jsonl") in (tmp_path / "run" / "train.log").read_text()
    assert not (ROOT / "run").exists()
