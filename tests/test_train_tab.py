"""The Train tab: layout and api names, and a real background run driven through its handlers."""
from __future__ import annotations

import json
import os
import time

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from molmo_core.tiny import write_tiny_checkpoint


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
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8")).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a red cup"}) + "\n")
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
