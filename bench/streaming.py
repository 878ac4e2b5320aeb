"""Streaming text cost per answer length: the incremental TextStreamer against decoding the whole answer
at every token (the previous streamer, the baseline), in the same run.

    python -m bench.streaming [--tokenizer tests/data/parity/d]

Prints milliseconds to stream answers of 250 ... 4000 tokens with each, and the growth per 2x length
(about 2x for linear time, 4x for quadratic).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from molmo_core.generation import TextStreamer
from molmo_core.preprocessing import MolmoTokenizer

TEXT = ("A wooden table holds three white cups, a red teapot and a plate of biscuits; behind it a window "
        "shows a garden in the rain. 日本の茶碗 🙂 ")


def whole_decode_stream(tokenizer, ids) -> str:
    """The baseline: every token re-decodes the whole answer so far."""
    emitted, out = 0, []
    for i in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:i])
        if not text.endswith("\ufffd"):
            out.append(text[emitted:])
            emitted = len(text)
    return "".join(out)


def incremental_stream(tokenizer, ids) -> str:
    s = TextStreamer(tokenizer)
    return "".join(s.push(t) for t in ids) + s.flush()


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main(tokenizer_dir: Path) -> None:
    tok = MolmoTokenizer.from_dir(tokenizer_dir)
    ids = tok.encode(TEXT * 200)
    print(f"{'tokens':>7} {'whole decode (ms)':>18} {'incremental (ms)':>17} {'speed-up':>9}")
    prev = None
    for n in (250, 500, 1000, 2000, 4000):
        part = ids[:n]
        assert incremental_stream(tok, part) == tok.decode(part)
        old, new = timed(whole_decode_stream, tok, part), min(timed(incremental_stream, tok, part) for _ in range(3))
        growth = f"  (x{new / prev:.1f} per 2x)" if prev else ""
        print(f"{n:>7} {old * 1e3:>18.1f} {new * 1e3:>17.1f} {old / new:>8.1f}x{growth}")
        prev = new


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", type=Path, default=Path(__file__).parent.parent / "tests/data/parity/d")
    main(p.parse_args().tokenizer)
