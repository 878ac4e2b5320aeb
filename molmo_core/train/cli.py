"""Command line of the trainer.

    python launch.py --finetune --model DIR_OR_ID --data PATH --out DIR [--mode lora|qlora|full]
                     [--max-steps N] [--lr LR] [... every TrainArgs field as --field-name]
    python -m molmo_core.train  (same flags)

Several GPUs / nodes (DDP through accelerate; see configs/accelerate/README.md):
    accelerate launch --config_file configs/accelerate/ddp.yaml -m molmo_core.train --model ... --data ... --out ...
Sharded full fine-tunes (torch FSDP2; tested on 2 CPU processes only): add --mode full --fsdp, or
    torchrun --nproc_per_node N -m molmo_core.train --mode full --fsdp --model ... --data ... --out ...

Molmo2 bases (config.json model_type "molmo2") are dispatched to `molmo2.py`: LoRA / QLoRA (peft), one process;
--mode full / --fsdp are refused there with a message.

`start_background(args)` runs the same thing as a child process (the UI's Train tab), logging to
OUT/train.log; stop it with `stop_background(proc)` (SIGTERM: the run saves a checkpoint and exports).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import typing
from pathlib import Path

from .recipe import TrainArgs

STOPPED_EXIT_CODE = 130  # the run was asked to stop (SIGTERM / SIGINT), saved a checkpoint and exported


def _field_docs() -> dict[str, str]:
    """Attribute docstrings of TrainArgs (the string literal after each field)."""
    tree = ast.parse(inspect.getsource(TrainArgs))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch.py --finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--finetune", action="store_true", help=argparse.SUPPRESS)  # passed through by launch.py
    p.add_argument("--background", action="store_true", help="run as a child process logging to OUT/train.log")
    docs = _field_docs()
    hints = typing.get_type_hints(TrainArgs)
    for f in dataclasses.fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = docs.get(f.name, "") + (f" (default: {default})" if default not in (None, [], "") else "")
        tp = hints[f.name]
        if tp is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif typing.get_origin(tp) is list:
            p.add_argument(flag, dest=f.name, action="append", default=None, help=help_ + " (repeatable)")
        else:
            base = [t for t in typing.get_args(tp) if t is not type(None)] or [tp]
            conv = base[0] if base[0] in (int, float, str) else str
            p.add_argument(flag, dest=f.name, type=conv, default=default, help=help_)
    return p


def parse_args(argv: list[str]) -> tuple[TrainArgs, argparse.Namespace]:
    ns = build_parser().parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs)}
    for k in ("data", "eval_data", "freeze"):
        items = values[k] or []
        values[k] = [s for item in items for s in (item.split(",") if k == "freeze" else [item]) if s]
    return TrainArgs(**values), ns


def to_argv(args: TrainArgs) -> list[str]:
    """TrainArgs -> the equivalent command-line flags (for the background process)."""
    out = []
    defaults = TrainArgs()
    for f in dataclasses.fields(TrainArgs):
        v, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if v == getattr(defaults, f.name):
            continue
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + f.name.replace("_", "-"))
        elif isinstance(v, list):
            for item in v:
                out += [flag, str(item)]
        elif v is not None:
            out += [flag, str(v)]
    return out


_SYNTHETIC_SOURCE = re.compile(r"^[a-z_]+:")  # clocks:N and the like, not files


def absolute_paths(args: TrainArgs, cwd: str | Path | None = None) -> TrainArgs:
    """A copy of `args` whose local paths are absolute, resolved against `cwd` (default: the current directory):
    out, images_dir, every data / eval_data source except synthetic ones (`clocks:N`), and model when it names
    an existing folder (a hub id stays as it is). The background process runs from another directory, and the
    run's log names exactly the files used."""
    base = Path(cwd if cwd is not None else os.getcwd())

    def absolute(path: str) -> str:
        return str((base / Path(path).expanduser()).resolve())

    def source(s: str) -> str:
        return s if _SYNTHETIC_SOURCE.match(s) and not (base / s).exists() else absolute(s)

    model = absolute(args.model) if args.model and (base / Path(args.model).expanduser()).exists() else args.model
    return dataclasses.replace(args, model=model, out=absolute(args.out) if args.out else args.out,
                               images_dir=absolute(args.images_dir) if args.images_dir else args.images_dir,
                               data=[source(s) for s in args.data], eval_data=[source(s) for s in args.eval_data])


def start_background(args: TrainArgs, python: str | None = None) -> subprocess.Popen:
    """Start the run as a child process (paths resolved against the caller's directory first, see
    `absolute_paths`); stdout and stderr go to OUT/train.log."""
    args.validate()
    args = absolute_paths(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train.log", "ab")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    cmd = [python or sys.executable, "-m", "molmo_core.train", *to_argv(args)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root),
                            start_new_session=True)
    log.close()
    (out / "train.pid").write_text(str(proc.pid))
    return proc


def stop_background(proc: subprocess.Popen, timeout: float = 120.0) -> int | None:
    """Ask the run to stop (SIGTERM: checkpoint + export), kill it if it does not end within `timeout`."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    """Fine-tune Molmo; returns a process exit code (0 done, 2 bad input or full disk, 130 stopped)."""
    from .data import DataError
    from .loop import TrainError, train
    from ..errors import CheckpointError, MolmoInputError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, ns = parse_args(argv)
        args.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ns.background:
        args = absolute_paths(args)
        proc = start_background(args)
        print(f"training in the background: pid {proc.pid}, log {Path(args.out) / 'train.log'}")
        return 0
    try:
        # ---- Molmo2 bases (config.json model_type "molmo2") train through train/molmo2.py (peft LoRA / QLoRA)
        from .molmo2 import is_molmo2_base, train_molmo2

        result = train_molmo2(args) if is_molmo2_base(args.model) else train(args)
        # ---- end of the Molmo2 dispatch
    except (DataError, TrainError, CheckpointError, MolmoInputError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        _shutdown_distributed(wait_for_all=False)
        return 2
    except BaseException:
        _shutdown_distributed(wait_for_all=False)
        raise
    _shutdown_distributed(wait_for_all=True)
    summary = {"steps": result.steps, "last_loss": result.losses[-1] if result.losses else None,
               "final": str(result.final) if result.final else None, "stopped": result.stopped}
    if os.environ.get("RANK", "0") == "0":  # one summary per run, not per process
        print("done: " + json.dumps(summary))
    return STOPPED_EXIT_CODE if result.stopped else 0


def _shutdown_distributed(wait_for_all: bool) -> None:
    """Tear the process group down explicitly: leaving it to interpreter exit can abort a worker.

    After a run that ended normally every rank first waits for the others (rank 0 may still be writing the
    export): a rank that tears down its gloo group while a peer is still using it can be aborted (SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
