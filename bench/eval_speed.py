"""Evaluation throughput: examples/s at batch 1 (the baseline) and batch 8, measured in the same run.

    .venv/bin/python -m bench.eval_speed                       # tiny random checkpoint on the CPU
    .venv/bin/python -m bench.eval_speed --model DIR --device cuda --n 64 --max-new-tokens 64

Runs the evaluation's own generation path (`molmo_core.eval.runner.generate_answers` -> `generate_batch`)
over `shapes:N` counting prompts, after one warm-up batch per batch size. Greedy decoding gives the same
answers at both batch sizes unless padding changes a near tie; the mean answer length is printed for each so
that the two rates can be checked to cover the same work.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def measure(runner, examples, batch_size: int, max_new_tokens: int, work: Path) -> tuple[float, float]:
    """(examples per second, mean answer length in characters) for one batch size."""
    from molmo_core.eval.runner import generate_answers, read_done

    warm = work / f"warm_{batch_size}.jsonl"
    generate_answers(runner, "warm", examples[:batch_size], "count", warm, batch_size=batch_size,
                     max_new_tokens=max_new_tokens, progress=False)
    path = work / f"b{batch_size}.jsonl"
    start = time.perf_counter()
    generate_answers(runner, "bench", examples, "count", path, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     progress=False)
    rate = len(examples) / (time.perf_counter() - start)
    answers = read_done(path).values()
    return rate, sum(map(len, answers)) / len(answers)


def main(model: str | None = None, n: int = 16, max_new_tokens: int = 32, device: str | None = None,
         threads: int | None = None) -> dict[int, float]:
    """Print and return {batch size: examples/s} for batch 1 and 8."""
    import torch

    import molmo_core
    from molmo_core.eval.data import load_dataset
    from molmo_core.tiny import write_tiny_checkpoint

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = model or str(write_tiny_checkpoint(work / "tiny-d", "d"))
        runner = molmo_core.load(source, device=device)
        examples = load_dataset(f"shapes:{n}", "count").examples
        print(f"eval_speed: model={model or 'tiny-d (random)'} device={runner.device} n={n} "
              f"max_new_tokens={max_new_tokens} threads={torch.get_num_threads()}")
        rates = {b: measure(runner, examples, b, max_new_tokens, work) for b in (1, 8)}
        runner.close()
    for b, (rate, chars) in rates.items():
        print(f"batch {b}: {rate:.2f} examples/s (answers {chars:.0f} characters on average)")
    print(f"batch 8 / batch 1: {rates[8][0] / rates[1][0]:.2f}x")
    return {b: rate for b, (rate, _) in rates.items()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: a tiny random one written to a temp folder)")
    p.add_argument("--n", type=int, default=16, help="examples per batch size (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    a = p.parse_args()
    main(model=a.model, n=a.n, max_new_tokens=a.max_new_tokens, device=a.device, threads=a.threads)
