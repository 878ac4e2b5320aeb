"""``python launch.py --eval ...`` (or ``python -m molmo_core.eval ...``): evaluate models, or saved answers.

    python launch.py --eval --model allenai/Molmo-7B-D-0924 --task point --data shapes:200 --out runs/eval
    python launch.py --eval --model A --model B --task count --data pixmo_count_test.parquet \\
        --images-dir images/ --out runs/ab
    python launch.py --eval --predictions answers.jsonl --task clock --data clocks.parquet --out runs/scored
    python launch.py --eval --model allenai/Molmo2-4B --task count --data shapes:200 --out runs/m2

Models of both families are evaluated alike: `molmo_core.load` reads the family from the checkpoint's
config.json, the prompts are that family's (`molmo_core.prompts`), and with ``--format auto`` (the default)
each model's answers are read in its family's format (Molmo v1: 0-100 percent; Molmo2: ``<points coords>``
0-1000, counts by `parse_molmo2_count`); saved answers are read as Molmo2 when any holds a Molmo2 tag.

Writes ``OUT/predictions.jsonl`` (resumable), ``OUT/report.json``, ``OUT/report.html`` and prints a table.
The shape of report.json is in :mod:`molmo_core.eval.report`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .data import TASKS, EvalDataError, load_dataset
from .formats import AUTO, FORMATS, format_for_family, get_count_parser, get_format, sniff_format
from .report import COUNT_NOTE, MALFORMED_NOTE, RULE_NOTES, format_table, report_dict, write_html, write_json
from .runner import (PredictionsError, append_answers, compare, generate_answers, read_done, read_predictions,
                     score_model)

__all__ = ["EvalError", "evaluate", "main"]


class EvalError(ValueError):
    """An evaluation that cannot run as asked."""


def _unique_names(sources: Sequence[str]) -> list[str]:
    """Model names for the report: the source as given, with #2, #3 ... where a source repeats."""
    names, seen = [], {}
    for s in sources:
        seen[s] = seen.get(s, 0) + 1
        names.append(s if seen[s] == 1 else f"{s}#{seen[s]}")
    return names


def _check_run_folder(out: Path, task: str, data: str, answer_format: str) -> None:
    """Refuse to mix runs: OUT/run.json records the task, data and format the answers belong to."""
    manifest = out / "run.json"
    want = {"task": task, "data": data, "format": answer_format}
    if manifest.is_file():
        have = json.loads(manifest.read_text(encoding="utf-8"))
        if {k: have.get(k) for k in want} != want:
            raise EvalError(f"{out} holds a run of {have}, not {want}; its predictions would not match. Use "
                            "another --out folder (or delete this one to start over).")
    else:
        manifest.write_text(json.dumps(want), encoding="utf-8")


def _model_answers(sources: Sequence[str], names: Sequence[str], dataset, task: str, path: Path, *,
                   batch_size: int, quantize: str | None, max_new_tokens: int | None, device: str | None,
                   progress: bool) -> tuple[dict[str, dict[int, str]], dict[str, str]]:
    """Generate what predictions.jsonl lacks, one model at a time (each loaded only if it has work).

    Returns the answers and each model's family ("molmo" or "molmo2"): the loaded runner's, or for a model
    with nothing left to answer, what its config.json says (`molmo_core.api.family_of`)."""
    import molmo_core
    from molmo_core.api import family_of

    from ..prompts import family_of as runner_family

    done = read_done(path)
    families = {}
    for source, name in zip(sources, names):
        missing = sum((name, ex.index) not in done for ex in dataset.examples)
        generated = 0
        if missing:
            runner = molmo_core.load(source, quantize=quantize, device=device)
            try:
                families[name] = runner_family(runner)
                generated = generate_answers(runner, name, dataset.examples, task, path, batch_size=batch_size,
                                             max_new_tokens=max_new_tokens, done=done, progress=progress)
            finally:
                runner.close()
        else:
            families[name] = family_of(source)
        print(f"{name}: generated {generated} answers, reused {len(dataset) - generated} from {path.name}"
              f" ({'Molmo2' if families[name] == 'molmo2' else 'Molmo v1'})", flush=True)
    return {name: {ex.index: done[(name, ex.index)] for ex in dataset.examples} for name in names}, families


def _saved_answers(files: Sequence[str], dataset, path: Path) -> dict[str, dict[int, str]]:
    """Answers produced elsewhere, named by file name; copied into OUT/predictions.jsonl."""
    names = _unique_names([Path(f).stem for f in files])
    answers = {name: read_predictions(Path(f).expanduser(), len(dataset)) for name, f in zip(names, files)}
    path.write_text("", encoding="utf-8")
    for name, by_index in answers.items():
        append_answers(path, name, sorted(by_index.items()))
    return answers


def evaluate(*, task: str, data: str, out: str | Path, models: Sequence[str] = (), predictions: Sequence[str] = (),
             limit: int | None = None, batch_size: int = 8, quantize: str | None = None,
             images_dir: str | None = None, coords: str = "auto", answer_format: str = AUTO,
             max_new_tokens: int | None = None, device: str | None = None, progress: bool = True) -> dict:
    """Evaluate ``models`` (or saved ``predictions``) on ``data`` for ``task``; write the report to ``out``.

    ``answer_format`` "auto" reads each model's answers in its family's format (saved answers: Molmo2 when any
    holds a Molmo2 tag); "molmo_v1" or "molmo2" reads every model's answers that way.

    Returns:
        The report dict (as written to report.json).

    Raises:
        EvalError, EvalDataError, PredictionsError: bad arguments, data or answers.
    """
    if bool(models) == bool(predictions):
        raise EvalError("Give either --model (one or more, answers are generated) or --predictions (one or more "
                        "JSONL files of answers made elsewhere), not both and not neither.")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise EvalError(f"--batch-size and --limit must be >= 1; got {batch_size} and {limit}.")
    if answer_format != AUTO:
        get_format(answer_format)  # an unknown name fails before any work
    dataset = load_dataset(data, task, images_dir=images_dir, coords=coords, limit=limit)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _check_run_folder(out, task, data, answer_format)
    path = out / "predictions.jsonl"
    if predictions:
        answers = _saved_answers(predictions, dataset, path)
        formats = {name: sniff_format(by_index.values()) for name, by_index in answers.items()}
    else:
        answers, families = _model_answers(models, _unique_names(models), dataset, task, path,
                                           batch_size=batch_size, quantize=quantize, max_new_tokens=max_new_tokens,
                                           device=device, progress=progress)
        formats = {name: format_for_family(f) for name, f in families.items()}
    if answer_format != AUTO:
        formats = {name: answer_format for name in answers}
    results = [score_model(name, dataset, task, by_index, get_format(formats[name]), get_count_parser(formats[name]),
                           formats[name]) for name, by_index in answers.items()]
    rules = list(dataset.notes)
    if task == "point":
        rules.append(RULE_NOTES[dataset.point_rule])
    if task == "count":
        rules.append(COUNT_NOTE)
    rules.append(MALFORMED_NOTE)
    report = report_dict(task, data, results, compare(results), rules, answer_format)
    write_json(out / "report.json", report)
    write_html(out / "report.html", report, results)
    print(format_table(report), flush=True)
    print(f"wrote {path}, {out / 'report.json'}, {out / 'report.html'}", flush=True)
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py --eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="checkpoint folder or hub id; repeat to compare")
    p.add_argument("--predictions", action="append", default=[], metavar="FILE.jsonl",
                   help='score saved answers: {"example": <row index>, "answer": "<text>"} per line; repeatable')
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, help="shapes:N, clocks:N, FILE.parquet, FILE.jsonl or a Point-Bench folder")
    p.add_argument("--out", required=True, help="output folder (a rerun with the same folder resumes)")
    p.add_argument("--limit", type=int, help="evaluate the first N examples")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batched generation (default 8)")
    p.add_argument("--quantize", choices=["8bit", "4bit"], help="load the models quantized")
    p.add_argument("--images-dir", help="folder with the images of a parquet / JSONL file")
    p.add_argument("--coords", default="auto", choices=["auto", "percent", "pixels"],
                   help="point coordinates in the data file (default: percent unless one exceeds 100)")
    p.add_argument("--format", default=AUTO, choices=[AUTO] + sorted(FORMATS), dest="answer_format",
                   help="how answers write points: molmo_v1 (0-100 percent), molmo2 (coords 0-1000), or auto "
                        "(default: each model's family; saved answers: molmo2 when any has a Molmo2 tag)")
    p.add_argument("--max-new-tokens", type=int, help="answer length (default: point/count 512, clock 32)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input, with the reason on stderr)."""
    args = _parser().parse_args(argv)
    from ..errors import CheckpointError

    print(f"eval: task={args.task} data={args.data} out={args.out} models={args.model} "
          f"predictions={args.predictions} limit={args.limit} batch_size={args.batch_size}", flush=True)
    try:
        evaluate(task=args.task, data=args.data, out=args.out, models=args.model, predictions=args.predictions,
                 limit=args.limit, batch_size=args.batch_size, quantize=args.quantize, images_dir=args.images_dir,
                 coords=args.coords, answer_format=args.answer_format, max_new_tokens=args.max_new_tokens,
                 device=args.device, progress=not args.no_progress)
    except (EvalError, EvalDataError, PredictionsError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
