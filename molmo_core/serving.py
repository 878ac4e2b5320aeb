"""Micro-batching: concurrent requests are grouped into one batched generation.

Decoding is memory-bound: one step reads every weight once whether it serves 1 row or 8, so 8 users
served together cost about as much per step as 1. A single worker thread owns the model; requests that
arrive within `window_s` of the first (up to `max_batch`) run together, each with its own sampling
options, stop strings and text stream. A request's text arrives through its own queue as it is decoded.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterator

from .errors import ModelUnloadedError
from .generation import GenerationOptions, TextStreamer, collate, generate_tokens, image_token_ids
from .model import Molmo
from .preprocessing import MolmoTokenizer, ProcessedInput

_END = object()
_LIVE: "weakref.WeakSet[BatchScheduler]" = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    """Stop worker threads before the interpreter tears torch down (a thread still inside torch at
    exit aborts the process with 'terminate called without an active exception')."""
    for s in list(_LIVE):
        s.close(wait=5.0)


@dataclass
class _Request:
    inputs: ProcessedInput
    opts: GenerationOptions
    out: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: bool = False


class BatchScheduler:
    def __init__(self, model: Molmo, tokenizer: MolmoTokenizer, *, max_batch: int = 8, window_s: float = 0.02,
                 compile: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.window_s, self.compile = max_batch, window_s, compile
        self.pending: "queue.Queue[_Request]" = queue.Queue()
        self.batch_sizes: list[int] = []  # history, for tests and stats
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        _LIVE.add(self)

    def submit(self, inputs: ProcessedInput, opts: GenerationOptions) -> Iterator[str]:
        """Text deltas of one answer, produced by the worker; exceptions are re-raised here."""
        if self._closed:
            raise ModelUnloadedError("The model was unloaded; load a model again.")
        self._ensure_worker()
        req = _Request(inputs, opts)
        self.pending.put(req)  # enqueued now, not at the first next(): callers can start several at once
        return self._drain(req)

    @staticmethod
    def _drain(req: _Request) -> Iterator[str]:
        try:
            while True:
                item = req.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancelled = True  # a client that stops reading frees its row

    def close(self, wait: float = 0.0) -> None:
        """Stop accepting work; the worker exits after the batch in flight (waits up to `wait` s)."""
        self._closed = True
        self.pending.put(None)  # type: ignore[arg-type]
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=wait)

    # ------------------------------------------------------------------ worker
    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="molmo-batcher", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            first = self.pending.get()
            if first is None:
                return
            reqs = [first]
            deadline = time.monotonic() + self.window_s
            while len(reqs) < self.max_batch:
                try:
                    nxt = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.pending.put(None)  # type: ignore[arg-type]
                    break
                reqs.append(nxt)
            reqs = [r for r in reqs if not r.cancelled]
            if reqs:
                self.batch_sizes.append(len(reqs))
                self._run(reqs)

    def _run(self, reqs: list[_Request]) -> None:
        eos = self.tokenizer.special.eos
        streamers = [TextStreamer(self.tokenizer, r.opts.stop) for r in reqs]
        finished = [False] * len(reqs)
        counts = [0] * len(reqs)

        def finish(b: int) -> None:
            if not finished[b]:
                finished[b] = True
                tail = streamers[b].flush()
                if tail:
                    reqs[b].out.put(tail)
                reqs[b].out.put(_END)

        try:
            tokens = generate_tokens(self.model, collate([r.inputs for r in reqs]), [r.opts for r in reqs],
                                     eos_id=eos, suppress=image_token_ids(self.tokenizer), compile=self.compile)
            for tok in tokens:
                if self._closed:
                    raise ModelUnloadedError("The model was unloaded (or replaced) while this answer was being generated; ask again.")
                for b, t in enumerate(tok.tolist()):
                    if finished[b]:
                        continue
                    if reqs[b].cancelled or (t == eos and reqs[b].opts.stop_on_eos):
                        finish(b)
                        continue
                    delta = streamers[b].push(t)
                    counts[b] += 1
                    if delta:
                        reqs[b].out.put(delta)
                    if streamers[b].stopped or counts[b] >= reqs[b].opts.max_new_tokens:
                        finish(b)
                if all(finished):
                    break
            for b in range(len(reqs)):
                finish(b)
        except BaseException as e:  # report to every waiting client; the worker keeps serving
            for b, r in enumerate(reqs):
                if not finished[b]:
                    finished[b] = True
                    r.out.put(e)
