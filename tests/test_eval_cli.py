"""`launch.py --eval`: scoring saved answers, two tiny models compared, resuming a killed run, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval_helpers import clock_set, count_set, points_eval_set, predictions_file, write_jsonl
from molmo_core.api import MolmoRunner
from molmo_core.eval.cli import main
from molmo_core.eval.data import load_dataset
from molmo_core.outputs import format_points
from molmo_core.synthetic.shapes import random_scene

ROOT = Path(__file__).resolve().parents[1]


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _assert_metrics(metrics: dict, expected: dict):
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k != "n")


# --------------------------------------------------------------------------- --predictions

@pytest.mark.parametrize("build, task", [(points_eval_set, "point"), (count_set, "count"), (clock_set, "clock")])
def test_predictions_are_scored_exactly(tmp_path, build, task):
    data, answers, expected = build(tmp_path)
    preds = predictions_file(tmp_path / "answers.jsonl", answers)
    out = tmp_path / "out"
    assert main(["--predictions", str(preds), "--task", task, "--data", str(data),
                 "--images-dir", str(tmp_path / "images"), "--out", str(out)]) == 0
    report = _report(out)
    _assert_metrics(report["metrics"], expected)
    assert report["models"][0]["name"] == "answers" and report["comparisons"] == []
    assert len((out / "predictions.jsonl").read_text().splitlines()) == len(answers)
    html = (out / "report.html").read_text()
    assert html.count("<img src=\"data:image/jpeg;base64,") == len(answers)
    worst = min(range(len(answers)), key=lambda i: (report["examples"][i]["primary"]["answers"], i))
    assert html.index(f"· #{worst} ·") < min(html.index(f"· #{i} ·") for i in range(len(answers)) if i != worst)


def test_launch_py_eval_verb_scores_points_eval_with_masks(tmp_path):
    data, answers, expected = points_eval_set(tmp_path)
    preds = predictions_file(tmp_path / "answers.jsonl", answers)
    run = subprocess.run([sys.executable, "launch.py", "--eval", "--predictions", str(preds), "--task", "point",
                          "--data", str(data), "--images-dir", str(tmp_path / "images"), "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "f1 " in run.stdout and "0.667" in run.stdout  # the printed table
    report = _report(tmp_path / "o")
    _assert_metrics(report["metrics"], expected)
    assert any("mask of the ground-truth object" in r for r in report["rules"])


def test_synthetic_shapes_and_clocks_scored_from_constructed_answers(tmp_path):
    # shapes:4 has 0, 1, 2, 3 targets: answer "none", both right, and only the first of three points.
    answers = []
    for i in range(4):
        s = random_scene(i)
        pct = [(x / s.image.width * 100, y / s.image.height * 100) for x, y in s.points]
        answers.append(format_points(pct[:1] if i == 3 else pct, s.label))
    preds = predictions_file(tmp_path / "shapes.jsonl", answers)
    assert main(["--predictions", str(preds), "--task", "point", "--data", "shapes:4", "--out", str(tmp_path / "s")]) == 0
    _assert_metrics(_report(tmp_path / "s")["metrics"],
                    {"precision": 1.0, "recall": (3 + 1 / 3) / 4, "f1": (3 + 0.5) / 4, "malformed": 0.0})
    clocks = load_dataset("clocks:3", "clock").examples
    h0, m0 = clocks[0].clock
    h1, m1 = clocks[1].clock
    answers = [f"{h0}:{m0:02d}", f"{h1}:{(m1 + 2) % 60:02d}", "a quarter past"]  # exact, 2 min off, malformed
    preds = predictions_file(tmp_path / "clocks.jsonl", answers)
    assert main(["--predictions", str(preds), "--task", "clock", "--data", "clocks:3", "--out", str(tmp_path / "c")]) == 0
    metrics = _report(tmp_path / "c")["metrics"]
    assert metrics["overall_exact"] == pytest.approx(1 / 3) and metrics["malformed"] == pytest.approx(1 / 3)
    # +-3 minutes (synthetic rule): the 2-minute miss is close, unless the hour changed by the wrap
    assert metrics["overall_close"] == pytest.approx(2 / 3)


def test_two_prediction_files_are_compared_with_paired_intervals(tmp_path, capsys):
    data, answers, _ = count_set(tmp_path)
    a = predictions_file(tmp_path / "a.jsonl", answers)
    b = predictions_file(tmp_path / "b.jsonl", ["2", "3", "0", "5"])  # all right
    assert main(["--predictions", str(a), "--predictions", str(b), "--task", "count", "--data", str(data),
                 "--images-dir", str(tmp_path / "images"), "--out", str(tmp_path / "o")]) == 0
    report = _report(tmp_path / "o")
    comp = report["comparisons"][0]
    assert (comp["baseline"], comp["model"]) == ("a", "b")
    acc = comp["metrics"]["accuracy"]
    assert acc["difference"] == pytest.approx(0.5)
    low, high = acc["ci95"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    assert comp["metrics"]["mean_per_count_accuracy"]["ci95"] is None  # not a per-example mean
    table = capsys.readouterr().out
    assert "M2-M1" in table and "95% CI" in table and f"[{low:+.3f}, {high:+.3f}]" in table
    assert [m["name"] for m in report["models"]] == ["a", "b"] and report["metrics"] == report["models"][0]["metrics"]
    html = (tmp_path / "o" / "report.html").read_text()
    assert "Disagreements (2 examples" in html  # examples 1 and 3: a wrong, b right


# --------------------------------------------------------------------------- bad predictions

@pytest.mark.parametrize("lines, message", [
    ([{"example": 0, "answer": "2"}, {"example": 9, "answer": "1"}], "example 9 does not match the data"),
    ([{"example": 0, "answer": "2"}, {"example": 0, "answer": "1"}], "example 0 is answered twice"),
    ([{"example": 0, "answer": "2"}], r"no answer for 3 of 4 examples \(e.g. \[1, 2, 3\]\)"),
    ([{"row": 0, "text": "2"}], 'expected {"example": <row index>, "answer"'),
    (["not json"], None),
])
def test_predictions_that_do_not_match_the_data_are_refused(tmp_path, capsys, lines, message):
    data, _, _ = count_set(tmp_path)
    preds = tmp_path / "p.jsonl"
    if lines == ["not json"]:
        preds.write_text("{oops\n")
        message = "line 1 is not JSON"
    else:
        write_jsonl(preds, lines)
    assert main(["--predictions", str(preds), "--task", "count", "--data", str(data),
                 "--images-dir", str(tmp_path / "images"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert main(["--task", "count", "--data", "shapes:2", "--out", str(tmp_path)]) == 2
    assert "Give either --model" in capsys.readouterr().err
    assert main(["--predictions", "x.jsonl", "--task", "clock", "--data", "shapes:2", "--out", str(tmp_path)]) == 2
    assert "serves --task point / count" in capsys.readouterr().err
    preds = predictions_file(tmp_path / "p.jsonl", ["0", "1"])
    assert main(["--predictions", str(preds), "--task", "count", "--data", "shapes:2", "--out", str(tmp_path / "o")]) == 0
    assert main(["--predictions", str(preds), "--task", "point", "--data", "shapes:2", "--out", str(tmp_path / "o")]) == 2
    assert "holds a run of" in capsys.readouterr().err


# --------------------------------------------------------------------------- real (tiny) models

@pytest.fixture(scope="module")
def ckpt2(tmp_path_factory) -> Path:
    """A second tiny checkpoint: variant d with another seed."""
    from molmo_core.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny2") / "d1", "d", seed=1)


@pytest.fixture
def batch_log(monkeypatch):
    """Record the size of every generate_batch call (the real method still runs)."""
    sizes = []
    real = MolmoRunner.generate_batch

    def counting(self, requests, **kwargs):
        sizes.append(len(requests))
        return real(self, requests, **kwargs)

    monkeypatch.setattr(MolmoRunner, "generate_batch", counting)
    return sizes


@pytest.mark.parametrize("task, data, metric", [("point", "shapes:6", "f1"), ("clock", "clocks:4", "overall_close")])
def test_two_tiny_models_compared_in_one_command(tmp_path, capsys, ckpt, ckpt2, batch_log, one_thread, task, data,
                                                 metric):
    out = tmp_path / "o"
    assert main(["--model", str(ckpt), "--model", str(ckpt2), "--task", task, "--data", data, "--out", str(out),
                 "--max-new-tokens", "12", "--batch-size", "8", "--no-progress"]) == 0
    n = int(data.split(":")[1])
    assert batch_log == [n, n]  # every example of a model in one batched call
    report = _report(out)
    names = [m["name"] for m in report["models"]]
    assert names == [str(ckpt), str(ckpt2)] and report["n"] == n
    comp = report["comparisons"][0]["metrics"][metric]
    base, other = (m["metrics"][metric] for m in report["models"])
    assert comp["difference"] == pytest.approx(other - base)
    assert comp["ci95"][0] <= comp["difference"] <= comp["ci95"][1]
    table = capsys.readouterr().out
    assert f"M1: {ckpt}" in table and f"M2: {ckpt2}" in table and "M2-M1" in table
    assert f"{metric} " in table and "[" in table
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted((p["model"], p["example"]) for p in preds) == sorted((m, i) for m in names for i in range(n))
    html = (out / "report.html").read_text()
    assert html.count("worst examples first") == 2 and "Disagreements (" in html
    n_disagree = int(html.split("Disagreements (")[1].split(" ")[0])
    assert html.count('<img src="data:image/jpeg;base64,') == 2 * n + 2 * min(n_disagree, 48)
    first_answer = preds[0]["answer"]
    assert __import__("html").escape(first_answer[:300]) in html


def test_a_killed_run_resumes_without_redoing_finished_examples(tmp_path, ckpt, batch_log, one_thread, capsys):
    out = tmp_path / "o"
    args = ["--model", str(ckpt), "--task", "count", "--data", "shapes:5", "--out", str(out),
            "--max-new-tokens", "8", "--batch-size", "2", "--no-progress"]
    assert main(args + ["--limit", "3"]) == 0  # "killed" after 3 examples
    assert batch_log == [2, 1]
    path = out / "predictions.jsonl"
    first = path.read_text().splitlines()
    assert len(first) == 3
    with path.open("a") as f:  # the kill cut the 4th line short
        f.write('{"model": "%s", "example": 3, "answ' % ckpt)
    batch_log.clear()
    assert main(args) == 0
    assert batch_log == [2]  # only examples 3 and 4 were generated
    lines = path.read_text().splitlines()
    assert lines[:3] == first and len(lines) == 5
    assert sorted(json.loads(line)["example"] for line in lines) == [0, 1, 2, 3, 4]
    assert "generated 2 answers, reused 3" in capsys.readouterr().out
    batch_log.clear()
    assert main(args) == 0 and batch_log == []  # nothing left: the model is not even loaded
    assert _report(out)["n"] == 5
