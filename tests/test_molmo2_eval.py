"""Evaluation with Molmo2: `launch.py --eval` end to end on a tiny random Molmo2 (answers are random text, so
the pipeline is checked: predictions, report, metrics, the molmo2 format chosen from the runner's family), and
the scoring of Molmo2 answers checked exactly with a stand-in runner that answers in Molmo2's format (CLI,
saved answers and the app's Eval tab)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

import molmo_core
from app.eval_tab import LOADED_MODEL, EvalManager
from app.service import MolmoService
from molmo_core import prompts
from molmo_core.eval.cli import main
from molmo_core.eval.data import load_dataset
from molmo_core.eval.formats import format_for_family, sniff_format
from molmo_core.molmo2.tiny import write_tiny_molmo2

N = 8  # shapes:8 holds counts 0, 1, 2, 3, 4, 5, 6, 0


@pytest.fixture(scope="module")
def m2(tmp_path_factory):
    return write_tiny_molmo2(tmp_path_factory.mktemp("m2eval") / "tiny-m2", "a")


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _key(image) -> str:
    return hashlib.md5(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def _coords(points, size, k=None) -> str:
    w, h = size
    pts = list(points)[:k]
    return "1 " + " ".join(f"{i} {round(x / w * 1000):03d} {round(y / h * 1000):03d}"
                           for i, (x, y) in enumerate(pts, start=1))


def molmo2_answer(ex, task: str) -> str:
    """Known Molmo2 answers: pointing at the first ceil(n/2) objects; counting by pointing at every object and
    stating the right count on even examples, two too many on odd ones; the right time on clocks."""
    if task == "clock":
        return f"The time is {ex.clock[0]}:{ex.clock[1]:02d}."
    n = len(ex.points)
    if n == 0:
        return "There are none."
    if task == "point":
        return f'<points coords="{_coords(ex.points, ex.size, math.ceil(n / 2))}">{ex.label}</points>'
    stated = n if ex.index % 2 == 0 else n + 2
    return f'There are {stated} <points coords="{_coords(ex.points, ex.size)}">{ex.label}</points>.'


class FakeMolmo2:
    """A Molmo2 stand-in: `family` "molmo2", answers from the data's ground truth, prompts recorded."""

    family = "molmo2"
    name = "fake-molmo2"
    quantize = None
    device = "cpu"
    dtype = "float32"

    def __init__(self, task: str, spec: str):
        self.answers = {_key(ex.load_image()): molmo2_answer(ex, task) for ex in load_dataset(spec, task).examples}
        self.prompts: list[str] = []
        self.closed = False

    def generate_batch(self, requests, *, max_new_tokens: int = 200, **_):
        self.prompts += [p for _, p in requests]
        return [self.answers[_key(image)] for image, _ in requests]

    def generate(self, image, prompt, **_):
        return self.generate_batch([(image, prompt)])[0]

    def memory_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


def expected_point_metrics(spec: str) -> dict:
    """Pointing at ceil(n/2) of n objects, every point in its object: precision 1, recall k/n; no objects and
    "There are none.": 1, 1, 1 (AI2's PointingEval)."""
    p, r, f = [], [], []
    for ex in load_dataset(spec, "point").examples:
        n = len(ex.points)
        rec = 1.0 if n == 0 else math.ceil(n / 2) / n
        p.append(1.0)
        r.append(rec)
        f.append(2 * rec / (1 + rec))
    return {"precision": np.mean(p), "recall": np.mean(r), "f1": np.mean(f), "malformed": 0.0}


# ----------------------------------------------------------------------------------------- a tiny Molmo2


def test_launch_py_eval_runs_end_to_end_on_a_tiny_molmo2(m2, tmp_path, capsys):
    import launch  # in-process: a subprocess would spend ~10 s importing transformers again

    out = tmp_path / "point"
    assert launch.cli(["--eval", "--model", str(m2), "--task", "point", "--data", f"shapes:{N}", "--out", str(out),
                       "--max-new-tokens", "8", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "(Molmo2)" in stdout and "f1" in stdout
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(row["example"] for row in lines) == list(range(N))
    report = _report(out)
    assert report["format"] == "molmo2" and report["models"][0]["format"] == "molmo2" and report["n"] == N
    assert set(report["metrics"]) >= {"precision", "recall", "f1", "malformed", "n"}
    assert all(0.0 <= v <= 1.0 for k, v in report["metrics"].items() if k != "n")
    assert (out / "report.html").read_text().count("answer format molmo2") == 1
    assert json.loads((out / "run.json").read_text())["format"] == "auto"


def test_count_eval_on_a_tiny_molmo2_in_process_and_resumed(m2, tmp_path, monkeypatch):
    out = tmp_path / "count"
    args = ["--model", str(m2), "--task", "count", "--data", "shapes:4", "--out", str(out), "--max-new-tokens", "8",
            "--no-progress"]
    seen = []
    real_load = molmo_core.load

    def spy_load(source, **kw):
        runner = real_load(source, **kw)
        seen.append(runner.family)
        real_batch = runner.generate_batch
        runner.generate_batch = lambda requests, **k: (seen.extend(p for _, p in requests), real_batch(requests, **k))[1]
        return runner

    monkeypatch.setattr(molmo_core, "load", spy_load)
    assert main(args) == 0
    report = _report(out)
    assert seen[0] == "molmo2" and seen[1:] == [prompts.count_prompt(ex.label, family="molmo2")
                                              for ex in load_dataset("shapes:4", "count").examples]
    assert report["format"] == "molmo2"
    assert set(report["metrics"]) >= {"accuracy", "close", "valid", "points_accuracy", "text_points_disagree",
                                      "mean_per_count_accuracy", "malformed", "n"}
    # a rerun reuses every answer (nothing loaded) and still knows the family from config.json
    seen.clear()
    assert main(args) == 0
    assert seen == [] and _report(out)["format"] == "molmo2" and _report(out)["metrics"] == report["metrics"]


# ----------------------------------------------------------------------------------------- known Molmo2 answers


def test_molmo2_answers_are_scored_right(tmp_path, monkeypatch):
    spec = f"shapes:{N}"
    runners = []

    def fake_load(source, **kw):
        runners.append(FakeMolmo2(task, data))
        return runners[-1]

    monkeypatch.setattr(molmo_core, "load", fake_load)

    task, data = "point", spec
    assert main(["--model", "m2", "--task", "point", "--data", spec, "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    report = _report(tmp_path / "p")
    assert report["format"] == "molmo2" and runners[-1].closed
    for key, value in expected_point_metrics(spec).items():
        assert report["metrics"][key] == pytest.approx(value), key
    assert runners[-1].prompts == [prompts.point_prompt(ex.label, family="molmo2")
                                   for ex in load_dataset(spec, "point").examples]
    # the same answers read as Molmo v1 find no point: only the two examples without objects score
    assert main(["--model", "m2", "--task", "point", "--data", spec, "--out", str(tmp_path / "pv1"), "--format",
                 "molmo_v1", "--no-progress"]) == 0
    forced = _report(tmp_path / "pv1")
    assert forced["format"] == "molmo_v1" and forced["metrics"]["f1"] == pytest.approx(2 / N)

    task = "count"
    assert main(["--model", "m2", "--task", "count", "--data", spec, "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    metrics = _report(tmp_path / "c")["metrics"]
    # stated counts right on the even examples (0, 2, 4, 6) and on both "There are none." (0 and 7)
    assert metrics["accuracy"] == pytest.approx(5 / N) and metrics["valid"] == 1.0
    assert metrics["points_accuracy"] == 1.0 and metrics["text_points_disagree"] == pytest.approx(3 / N)
    assert metrics["close"] == pytest.approx(5 / N) and metrics["malformed"] == 0.0
    # v1 rules find no count in "There are N <points ...>label</points>."
    assert main(["--model", "m2", "--task", "count", "--data", spec, "--out", str(tmp_path / "cv1"), "--format",
                 "molmo_v1", "--no-progress"]) == 0
    assert _report(tmp_path / "cv1")["metrics"]["valid"] == pytest.approx(2 / N)

    task, data = "clock", "clocks:3"
    assert main(["--model", "m2", "--task", "clock", "--data", "clocks:3", "--out", str(tmp_path / "k"),
                 "--no-progress"]) == 0
    assert _report(tmp_path / "k")["metrics"]["overall_exact"] == 1.0
    assert set(runners[-1].prompts) == {prompts.MOLMO2_CLOCK_PROMPT}


def test_saved_molmo2_answers_are_recognised(tmp_path):
    spec = f"shapes:{N}"
    answers = [molmo2_answer(ex, "point") for ex in load_dataset(spec, "point").examples]
    preds = tmp_path / "m2.jsonl"
    preds.write_text("".join(json.dumps({"example": i, "answer": a}) + "\n" for i, a in enumerate(answers)))
    assert main(["--predictions", str(preds), "--task", "point", "--data", spec, "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    report = _report(tmp_path / "o")
    assert report["format"] == "molmo2" and report["metrics"]["f1"] == pytest.approx(expected_point_metrics(spec)["f1"])
    assert sniff_format(["There are none.", '<point x="1.0" y="2.0">a</point>']) == "molmo_v1"
    assert format_for_family("molmo2") == "molmo2" and format_for_family("molmo") == "molmo_v1"


def test_eval_tab_reads_a_loaded_molmo2_in_its_format(tmp_path):
    service = MolmoService(loader=lambda source, **kw: FakeMolmo2("count", f"shapes:{N}"))
    service.load("fake", wait=True)
    manager = EvalManager(service, out_root=tmp_path)
    job = manager.start("count", "shapes", N, "", "", [LOADED_MODEL])
    deadline = time.time() + 60
    while not job.finished and time.time() < deadline:
        time.sleep(0.05)
    assert job.phase == "done", job.to_json()
    assert job.report["format"] == "molmo2" and job.report["metrics"]["accuracy"] == pytest.approx(5 / N)
    assert set(service.runner.prompts) == {prompts.count_prompt(ex.label, family="molmo2")
                                           for ex in load_dataset(f"shapes:{N}", "count").examples}
