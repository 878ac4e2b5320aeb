"""Prefill / decode / sampling / stopping / streaming / batching.

A batch of prompts is LEFT-padded with -1 (so every row's next token lands in the same cache slot);
padding keys are masked, positions count real tokens only (cumsum - 1), so a row gives the same tokens
alone or in a batch. The KV cache is static: allocated once for prompt + max_new_tokens.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from .model import Molmo
from .preprocessing import MolmoTokenizer, ProcessedInput
from .text import KVCache


@dataclass
class GenerationOptions:
    max_new_tokens: int = 200
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_on_eos: bool = True


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) int64, -1 = left padding
    images: torch.Tensor | None = None  # (B, n_crops, 576, 588), -1 = padding crops
    image_masks: torch.Tensor | None = None  # (B, n_crops, 576)
    image_input_idx: torch.Tensor | None = None  # (B, n_crops, 144), -1/-100 = unused

    def to(self, device, dtype) -> "Batch":
        f = lambda t, dt=None: None if t is None else t.to(device=device, dtype=dt or t.dtype)  # noqa: E731
        return Batch(f(self.input_ids), f(self.images, dtype), f(self.image_masks, dtype), f(self.image_input_idx))


def collate(inputs: Sequence[ProcessedInput]) -> Batch:
    """Left-pad several processed inputs into one batch (ids, crops, masks, idx padded with -1)."""
    B = len(inputs)
    L = max(len(x.input_ids) for x in inputs)
    ids = np.full((B, L), -1, dtype=np.int64)
    with_images = [x for x in inputs if x.images is not None]
    n_crops = max((x.images.shape[0] for x in with_images), default=0)
    images = masks = idx = None
    if with_images:
        _, P, D = with_images[0].images.shape
        images = np.full((B, n_crops, P, D), -1, dtype=np.float32)
        masks = np.full((B, n_crops, P), -1, dtype=np.float32)
        idx = np.full((B, n_crops, with_images[0].image_input_idx.shape[1]), -1, dtype=np.int64)
    for b, x in enumerate(inputs):
        pad = L - len(x.input_ids)
        ids[b, pad:] = x.input_ids
        if x.images is not None:
            n = x.images.shape[0]
            images[b, :n], masks[b, :n] = x.images, x.image_masks
            idx[b, :n] = np.where(x.image_input_idx >= 0, x.image_input_idx + pad, -1)
    t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    return Batch(t(ids), t(images), t(masks), t(idx))


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 = argmax; otherwise nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


def decode_step(model: Molmo, tok: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token per row over the static cache: tok (B, 1), pos (B, 1), slot (1,) -> logits (B, V)."""
    return model(tok, position_ids=pos, cache=cache, cache_pos=slot)[:, -1]


def compiled_decode_step(model: Molmo):
    """`decode_step` compiled once per model (kept on the model, so it is freed with it).

    Shapes never change between steps, so it compiles once per (batch size, cache length bucket); on
    CUDA, mode "reduce-overhead" adds CUDA graphs (the cache tensors have static addresses)."""
    fn = model.__dict__.get("_compiled_decode")
    if fn is None:
        # One graph per (batch size, cache bucket) and per loaded model: the scheduler's batch sizes 1-8
        # alone exceed dynamo's default of 8 recompiles, after which it silently falls back to compiling
        # every block on its own (and, with the layer index specialised, to eager after 8 layers).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
        mode = "reduce-overhead" if model.device.type == "cuda" else None
        fn = torch.compile(functools.partial(decode_step, model), mode=mode, dynamic=False)
        model.__dict__["_compiled_decode"] = fn
    return fn


def release_compiled(model: Molmo) -> None:
    """Drop the compiled decode step and its pooled caches. On CUDA, the CUDA-graph trees keep the
    weights they captured alive until dynamo is reset, so closing a compiled model resets it (one model
    is served at a time)."""
    fn = model.__dict__.pop("_compiled_decode", None)
    model.__dict__.pop("_cache_pool", None)
    if fn is not None and model.device.type == "cuda":
        torch._dynamo.reset()


CACHE_BUCKET = 256
CACHE_POOL = 4


def pooled_cache(model: Molmo, batch_size: int, max_len: int) -> KVCache:
    """A KV cache reused across generations (same tensors, so compiled/graph-captured steps see the
    same addresses). Lengths are rounded up to CACHE_BUCKET to bound recompilations; the pool keeps the
    CACHE_POOL most recent shapes. Only the single decoding thread may use it."""
    pool: OrderedDict = model.__dict__.setdefault("_cache_pool", OrderedDict())
    max_len = min(-(-max_len // CACHE_BUCKET) * CACHE_BUCKET, model.config.text.max_sequence_length)
    key = (batch_size, max_len)
    cache = pool.pop(key, None)
    if cache is None:
        cache = KVCache(model.config.text, batch_size, max_len, model.device, model.dtype, model._block_devices)
        for t in [*cache.k, *cache.v, cache.valid]:
            torch._dynamo.mark_static_address(t)
    pool[key] = cache
    while len(pool) > CACHE_POOL:
        pool.popitem(last=False)
    cache.valid.zero_()
    return cache


def can_compile(model: Molmo) -> bool:
    """torch.compile needs a working C++ toolchain on CPU. MolmoE compiles on GPUs when its experts can be
    stacked (not quantized or LoRA-wrapped: those keep the data-dependent expert loop); on the CPU its
    eager grouped GEMM is faster than the compilable gathered/dense forms (measured per layer: N=8 tokens
    33 ms grouped vs 228-352 ms), so it stays eager there. Everything else that cannot compile runs eager."""
    if model.config.text.is_moe and (model.device.type != "cuda"
                                     or not all(b.mlp.stackable() for b in model.transformer.blocks)):
        return False
    try:
        import torch._inductor  # noqa: F401
    except Exception:
        return False
    if model.device.type == "cuda":
        return torch.cuda.get_device_capability(model.device)[0] >= 7
    import shutil

    return shutil.which("g++") is not None or shutil.which("c++") is not None


@torch.inference_mode()
def generate_tokens(model: Molmo, batch: Batch, opts: "GenerationOptions | Sequence[GenerationOptions]",
                    eos_id: int | None = None, suppress: Sequence[int] = (),
                    compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) int64 on the CPU per step, until every row is done.

    `opts` may be one GenerationOptions for the whole batch or one per row (own max_new_tokens,
    temperature, top_p, seed). A row is done after EOS or its own max_new_tokens; done rows keep
    receiving EOS (or -1 without an EOS id), which the caller ignores.

    The GPU never waits for Python: each step's tokens and done flags are copied to the host
    asynchronously, the next decode step is queued behind the copies, and only then does the loop wait
    for the copies and yield (so the caller's work on token t overlaps the GPU computing token t+1; when
    a row hits EOS one step may be computed for nothing)."""
    batch = batch.to(model.device, model.dtype)
    B, L = batch.input_ids.shape
    rows = list(opts) if isinstance(opts, (list, tuple)) else [opts] * B
    assert len(rows) == B, f"{len(rows)} option sets for {B} rows"
    steps = max(o.max_new_tokens for o in rows)
    max_len = min(L + steps, model.config.text.max_sequence_length)
    if compile:
        cache = pooled_cache(model, B, max_len)
    else:
        cache = KVCache(model.config.text, B, max_len, model.device, model.dtype, model._block_devices)
    n_steps = max_len - L
    gens = []
    for o in rows:
        g = None
        if o.temperature > 0:
            g = torch.Generator(device=model.device)
            g.manual_seed(o.seed if o.seed is not None else int(torch.randint(0, 2**31, ()).item()))
        gens.append(g)
    uniform = all(o.temperature <= 0 for o in rows)
    limit = torch.tensor([o.max_new_tokens for o in rows], device=model.device)
    stop_eos = torch.tensor([o.stop_on_eos and eos_id is not None for o in rows], device=model.device)
    filler = eos_id if eos_id is not None else -1
    step_fn = compiled_decode_step(model) if compile else functools.partial(decode_step, model)
    slots = torch.arange(L, L + n_steps, device=model.device)  # cache slot of each decode step's input
    copied = torch.cuda.Event() if model.device.type == "cuda" else None

    valid = batch.input_ids != -1
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
    logits = model(batch.input_ids, batch.images, batch.image_masks, batch.image_input_idx, position_ids=pos,
                   cache=cache, cache_pos=torch.arange(L, device=model.device), last_only=True)[:, -1]
    next_pos = pos[:, -1:] + 1  # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    suppress = [i for i in suppress if i < logits.shape[-1]]
    for step in range(n_steps):
        if suppress:
            logits[:, suppress] = float("-inf")
        if uniform:
            tok = logits.argmax(dim=-1)
        else:
            tok = torch.stack([sample(logits[b:b + 1].float(), rows[b].temperature, rows[b].top_p, gens[b])[0]
                               for b in range(B)])
        tok = torch.where(done, torch.full_like(tok, filler), tok)
        done = done | (stop_eos & (tok == filler)) | (step + 1 >= limit)
        tok_host, all_done = tok.to("cpu", non_blocking=True), done.all().to("cpu", non_blocking=True)
        if copied is not None:
            copied.record()
        if step + 1 < n_steps:  # queued now; runs while the host handles this step's tokens
            logits = step_fn(tok.clamp(min=0)[:, None], next_pos, slots[step:step + 1], cache)
            next_pos = next_pos + 1
        if copied is not None:
            copied.synchronize()
        yield tok_host
        if bool(all_done) or step + 1 >= n_steps:
            return


@torch.inference_mode()
def greedy_uncached(model: Molmo, batch: Batch, n: int) -> list[int]:
    """Reference decoding without a cache (a full forward per token); single row."""
    batch = batch.to(model.device, model.dtype)
    ids = batch.input_ids
    out = []
    for _ in range(n):
        logits = model(ids, batch.images, batch.image_masks, batch.image_input_idx, last_only=True)[:, -1]
        tok = logits.argmax(-1)
        out.append(int(tok[0]))
        ids = torch.cat([ids, tok[:, None]], dim=1)
    return out


class TextStreamer:
    """Turns token ids into text deltas; holds back incomplete UTF-8 and text that may start a stop string.

    Incremental: each token decodes only a short window of ids (from `prefix`, the first id whose text
    may still change, to the end), so a long answer streams in time linear in its length; the text is
    the same as decoding all ids at once (the window starts on a token boundary whose text is final)."""

    def __init__(self, tokenizer: MolmoTokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = 0  # ids[:prefix] decode to final text
        self.read = 0  # ids[:read] are in self.text
        self.text = ""  # decode(ids[:read]), complete characters only
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        old = self.tokenizer.decode(self.ids[self.prefix:self.read])
        new = self.tokenizer.decode(self.ids[self.prefix:])
        text = self.text + new[len(old):]
        scanned = len(self.text)
        for s in self.stop:
            cut = text.find(s, max(0, scanned - len(s) + 1))
            if cut >= 0:
                self.stopped = True
                return self._emit(text[:cut])
        if text.endswith("\ufffd") or len(new) <= len(old):
            return ""  # an incomplete character (or nothing yet): wait for the next token
        self.text, self.prefix, self.read = text, self.read, len(self.ids)
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit(text[: len(text) - hold])

    def flush(self) -> str:
        if self.stopped:
            return ""
        old = self.tokenizer.decode(self.ids[self.prefix:self.read])
        return self._emit(self.text + self.tokenizer.decode(self.ids[self.prefix:])[len(old):])

    def _emit(self, text: str) -> str:
        delta = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        return delta


def image_token_ids(tokenizer: MolmoTokenizer) -> list[int]:
    """The image special tokens lie inside the output vocabulary of the OLMo-based models; nothing in the
    original masks them. Suppressing them when decoding text is a harmless safety measure (never used
    in the parity path)."""
    s = tokenizer.special
    return [s.im_start, s.im_end, s.im_patch, s.im_col, s.image]
