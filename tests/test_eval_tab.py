"""The Eval tab: evaluations started, polled and browsed through gradio_client on the app with the tiny
checkpoint (the loaded model used as it is; a second model loaded for the run and freed after), clear
messages for bad choices, path confinement, stopping, and the tab driven in headless Chromium.

The app runs with its working directory in a temp folder, so runs (runs/eval/...) and the data and model
folders the tab may read are there.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client.exceptions import AppError
from PIL import Image

import molmo_core
from app.eval_tab import EvalInputError, EvalManager, LOADED_MODEL, metrics_table
from app.service import MolmoService

from app_helpers import *  # noqa: F401,F403
from app_helpers import TEST_LIMITS, make_client, running_app, scripted_loader

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "artifacts" / "screenshots"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The app's working directory for this module: a temp folder holding the tiny checkpoint's folder."""
    folder = tmp_path_factory.mktemp("eval_cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        yield folder


@pytest.fixture(scope="module")
def eval_app(workdir, tiny_checkpoint):
    """The app with the tiny checkpoint loaded; a copy of the checkpoint folder lies under the working dir."""
    import shutil

    local = workdir / "checkpoints" / "tiny-d"
    shutil.copytree(tiny_checkpoint, local)
    service = MolmoService(device="cpu", limits=TEST_LIMITS)
    service.load(str(local), wait=True)
    assert service.status().loaded
    with running_app(service, default_tab="eval") as (_, url):
        yield service, url, local
    service.unload()


def _wait_done(client, timeout: float = 90) -> dict:
    deadline = time.time() + timeout
    while True:
        _, state, *_ = client.predict(None, api_name="/eval_status")
        if state.get("phase") in ("done", "stopped", "error") or time.time() > deadline:
            return state
        time.sleep(0.3)


def _report(state: dict) -> dict:
    return json.loads((Path(state["out"]) / "report.json").read_text())


def _table(value: dict) -> tuple[list[str], list[list]]:
    return value["headers"], value["data"]


# ------------------------------------------------------------------------------------- through gradio_client


def test_shapes_eval_with_the_loaded_model_table_matches_report_json(eval_app):
    service, url, _ = eval_app
    client = make_client(url)
    names = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/eval_start", "/eval_status", "/eval_stop", "/eval_example", "/eval_next", "/eval_prev"} <= set(names)

    markdown, state, _timer = client.predict("point", "shapes", 4, "", "", LOADED_MODEL, "", "", api_name="/eval_start")
    assert state["phase"] in ("queued", "loading data", "generating", "scoring", "done"), state
    state = _wait_done(client)
    assert state["phase"] == "done", state
    assert state["progress"] == [{"model": service.runner.name, "loaded": True, "done": 4, "total": 4}]
    assert service.loads == 1  # the loaded model was used as it is, not reloaded

    markdown, state, table, pick, files = client.predict(None, api_name="/eval_status")
    report = _report(state)
    heads, rows = _table(table)
    assert heads == ["metric", f"M1 {service.runner.name}"]
    assert [r[0] for r in rows] == list(report["metrics"])
    for metric, value in rows:
        expected = report["models"][0]["metrics"][metric]
        if metric == "n":
            assert value == 4
        else:
            assert 0 <= value <= 1 and value == pytest.approx(expected, abs=5e-5), metric
    assert sorted(Path(f["path"] if isinstance(f, dict) else f).name for f in files) == ["report.html", "report.json"]
    assert pick["value"] == 0 and [c[1] for c in pick["choices"]] == [0, 1, 2, 3]
    assert pick["choices"][1][0].startswith("#1: 1 × ")

    # browse: example 1's overlay, truth, and the model's answer as stored in report.json
    gallery, truth, answers = client.predict(1, api_name="/eval_example")
    assert len(gallery) == 1 and gallery[0]["image"]
    assert "Example #1" in truth and "Ground truth" in truth
    heads, rows = _table(answers)
    assert rows[0][1] == report["examples"][1]["answers"][service.runner.name]
    assert rows[0][2] == pytest.approx(report["examples"][1]["primary"][service.runner.name], abs=5e-5)
    index, *_ = client.predict(3, api_name="/eval_next")
    assert index == 0  # wraps around
    index, _, truth, _ = client.predict(0, api_name="/eval_prev")
    assert index == 3 and "Example #3" in truth
    client.close()


def test_two_models_give_a_comparison_with_intervals_and_the_second_is_freed(eval_app, monkeypatch):
    service, url, local = eval_app
    opened = []

    def spy_load(source, **kwargs):
        runner = real_load(source, **kwargs)
        opened.append(runner)
        return runner

    real_load = molmo_core.load
    monkeypatch.setattr(molmo_core, "load", spy_load)
    client = make_client(url)
    client.predict("count", "shapes", 4, "", "", LOADED_MODEL, "checkpoints/tiny-d", "", api_name="/eval_start")
    state = _wait_done(client)
    assert state["phase"] == "done", state
    assert [p["done"] for p in state["progress"]] == [4, 4] and [p["loaded"] for p in state["progress"]] == [True, False]
    assert len(opened) == 1 and opened[0].model is None  # loaded for the run, closed after
    assert service.runner is not None and service.loads == 1

    _, state, table, _, _ = client.predict(None, api_name="/eval_status")
    report = _report(state)
    heads, rows = _table(table)
    assert heads[3:] == ["M2 - M1", "M2 - M1 95% CI"]
    (comparison,) = report["comparisons"]
    by_metric = {r[0]: r for r in rows}
    for metric, cell in comparison["metrics"].items():
        assert by_metric[metric][3] == pytest.approx(cell["difference"], abs=5e-5)
        if cell["ci95"] is None:
            assert by_metric[metric][4] == "-"
        else:
            low, high = map(float, re.findall(r"[-+]\d\.\d{3}", by_metric[metric][4]))
            assert low == pytest.approx(cell["ci95"][0], abs=5e-4) and high == pytest.approx(cell["ci95"][1], abs=5e-4)
            assert low <= cell["difference"] <= high
    assert "accuracy" in by_metric and by_metric["accuracy"][4] != "-"
    # the same weights answer the same: every difference is 0
    assert all(cell["difference"] == 0 for cell in comparison["metrics"].values())
    gallery, _, answers = client.predict(2, api_name="/eval_example")
    assert len(gallery) == 2 and len(_table(answers)[1]) == 2
    client.close()


@pytest.mark.parametrize("args, message", [
    (("point", "shapes", 0, "", ""), "not a whole number"),
    (("clock", "shapes", 4, "", ""), "for the clock task choose synthetic clocks"),
    (("point", "file", 4, "", ""), "No data file"),
    (("point", "file", 4, "/etc/passwd", ""), "outside the folders this app may read"),
    (("point", "file", 4, "../../../../etc/hostname", ""), "outside the folders this app may read"),
    (("point", "file", 4, "missing.parquet", ""), "does not exist"),
    (("point", "file", 4, "checkpoints/tiny-d/config.json", ""), "expected a .parquet or .jsonl file"),
])
def test_bad_data_choices_get_a_clear_error(eval_app, args, message):
    _, url, _ = eval_app
    client = make_client(url)
    with pytest.raises(AppError) as e:
        client.predict(*args, LOADED_MODEL, "", "", api_name="/eval_start")
    assert message in str(e.value) and "Traceback" not in str(e.value)
    client.close()


@pytest.mark.parametrize("models, message", [
    (("", "", ""), "No model chosen"),
    (("/usr/lib",), "outside the folders this app may read"),
    (("checkpoints",), "has no config.json"),
    (("not a model",), "neither a checkpoint folder nor a hub id"),
])
def test_bad_model_choices_get_a_clear_error(eval_app, models, message):
    _, url, _ = eval_app
    client = make_client(url)
    models = (models + ("", "", ""))[:3]
    with pytest.raises(AppError) as e:
        client.predict("point", "shapes", 4, "", "", *models, api_name="/eval_start")
    assert message in str(e.value)
    assert client.predict(None, api_name="/eval_status")  # still serving
    client.close()


# ------------------------------------------------------------------------------------- the manager directly


def test_no_loaded_model_is_a_clear_error(workdir):
    manager = EvalManager(MolmoService())
    with pytest.raises(EvalInputError, match="No model is loaded in the app"):
        manager.start("point", "shapes", 4, "", "", [LOADED_MODEL])


def test_a_symlink_or_a_row_pointing_outside_is_refused(workdir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(secret)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    link = data / "linked.jsonl"
    link.unlink(missing_ok=True)
    os.symlink(outside / "rows.jsonl", link)
    (outside / "rows.jsonl").write_text("{}\n")
    service = MolmoService(loader=scripted_loader)
    service.load("scripted", wait=True)
    manager = EvalManager(service)
    with pytest.raises(EvalInputError, match="outside the folders"):
        manager.start("point", "file", None, "data/linked.jsonl", "", [LOADED_MODEL])
    row = {"image_url": "https://example.com/secret.png", "image_path": str(secret), "label": "dots",
           "points": [{"x": 10, "y": 10}]}
    (data / "rows.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(EvalInputError, match="secret.png is outside the folders this app may read"):
        manager.start("point", "file", None, "data/rows.jsonl", "", [LOADED_MODEL])
    # allowed once its folder is named in the app's data folders
    os.environ["MOLMO_STUDIO_DATA_DIRS"] = str(outside)
    try:
        job = manager.start("point", "file", None, "data/rows.jsonl", "", [LOADED_MODEL])
    finally:
        del os.environ["MOLMO_STUDIO_DATA_DIRS"]
    deadline = time.time() + 30
    while not job.finished and time.time() < deadline:
        time.sleep(0.05)
    assert job.phase == "done", job.to_json()
    assert job.report["models"][0]["metrics"]["n"] == 1


def test_file_data_under_the_working_directory_with_the_first_n_rows(workdir):
    data = workdir / "filedata"
    data.mkdir(exist_ok=True)
    rows = []
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(data / f"img{i}.png")
        rows.append({"image_url": f"https://example.com/img{i}.png", "label": "coins", "count": i})
    (data / "count.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    service = MolmoService(loader=scripted_loader)
    service.load("scripted", wait=True)
    manager = EvalManager(service)
    job = manager.start("count", "file", 2, "filedata/count.jsonl", "", [LOADED_MODEL])
    assert job.total == 2
    deadline = time.time() + 30
    while not job.finished and time.time() < deadline:
        time.sleep(0.05)
    assert job.phase == "done", job.to_json()
    # the scripted answer counts 3 coins: wrong for counts 0 and 1
    assert job.report["n"] == 2 and job.report["metrics"]["accuracy"] == 0.0
    assert job.report["examples"][1]["answers"]["scripted"].endswith("shows a total of 3.")


def test_stop_ends_the_run_between_batches(workdir):
    class SlowRunner:
        name = "slow"

        def generate(self, image, prompt, **_):
            time.sleep(0.1)
            return "There are none."

    service = MolmoService(loader=lambda *a, **k: SlowRunner())
    service.load("slow", wait=True)
    manager = EvalManager(service, batch_size=1)
    job = manager.start("count", "shapes", 30, "", "", [LOADED_MODEL])
    deadline = time.time() + 30
    while job.done[0] < 2 and time.time() < deadline:
        time.sleep(0.02)
    manager.stop(job.id)
    while not job.finished and time.time() < deadline:
        time.sleep(0.02)
    assert job.phase == "stopped" and 2 <= job.done[0] < 30
    assert job.report is None and not (job.out / "report.json").exists()
    lines = (job.out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == job.done[0]


def test_metrics_table_without_a_report_is_empty():
    assert metrics_table(None).empty


# ------------------------------------------------------------------------------------- in the browser


@pytest.mark.browser
def test_eval_tab_in_the_browser(browser, workdir):
    """Scripted model (three points in a row): shapes data, Start, the table appears, Next shows example #1."""
    from playwright.sync_api import expect

    service = MolmoService(loader=scripted_loader)
    service.load("scripted", wait=True)
    with running_app(service) as (_, url):
        page = browser.new_page(viewport={"width": 1360, "height": 1200})
        page.goto(url, wait_until="load")
        page.get_by_role("tab", name="Eval").click()
        page.locator("#eval_kind").get_by_text("synthetic shapes").click()
        page.locator("#eval_n input").fill("3")
        page.locator("#eval_start").click()
        expect(page.locator("#eval_status")).to_contain_text("Done", timeout=60000)
        table = page.locator("#eval_table")
        expect(table).to_contain_text("precision", timeout=10000)
        expect(table).to_contain_text("f1")
        expect(table).to_contain_text("M1 scripted")
        expect(page.locator("#eval_truth")).to_contain_text("Example #0", timeout=10000)
        page.locator("#eval_next").click()
        expect(page.locator("#eval_truth")).to_contain_text("Example #1", timeout=10000)
        expect(page.locator("#eval_answers")).to_contain_text("coins")  # the scripted answer
        expect(page.locator("#eval_gallery img").first).to_be_visible(timeout=10000)
        expect(page.locator("#eval_files")).to_contain_text("report.html")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "eval.png"), full_page=True)
        page.close()
