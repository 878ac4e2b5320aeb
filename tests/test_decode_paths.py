"""The decode fast paths: MolmoE experts without a Python loop (stacked weights, grouped / gathered /
dense matmuls) and incremental text streaming."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import molmo_core
from molmo_core.config import TextConfig
from molmo_core.generation import (GenerationOptions, TextStreamer, can_compile, collate, decode_step,
                                   generate_tokens)
from molmo_core.text import SparseMoE

PARITY = Path(__file__).parent / "data" / "parity"


# ------------------------------------------------------------------------------------------ MoE
def _moe(seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    m = SparseMoE(TextConfig(d_model=64, moe_num_experts=8, moe_top_k=2, moe_expert_hidden=32, n_layers=1))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.requires_grad_(False)


def _route(m: SparseMoE, h: torch.Tensor):
    weights, chosen = torch.softmax(m.gate(h).float(), -1).topk(m.top_k)
    return weights.to(h.dtype), chosen


@pytest.mark.parametrize("n_tokens", [1, 3, 8, 64, 200])
def test_every_inference_expert_path_equals_the_loop(n_tokens):
    m = _moe()
    h = torch.randn(n_tokens, 64)
    weights, chosen = _route(m, h)
    ref = m._loop(h, weights, chosen)
    w_gu, w_down = m.stacked()
    paths = {"gathered": m._gathered, "dense": m._dense, "grouped": m._grouped}
    if not m._stack[3]:
        paths.pop("grouped")  # this torch build has no CPU grouped GEMM
    for name, fn in paths.items():
        torch.testing.assert_close(fn(h, weights, chosen, w_gu, w_down), ref, rtol=1e-5, atol=1e-5, msg=name)


def test_forward_uses_the_stacked_experts_only_in_inference():
    m = _moe()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        before = m._loop(m.ff_norm(x).reshape(10, 64), *_route(m, m.ff_norm(x).reshape(10, 64)))
    keys = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.inference_mode():
        out = m(x)
    assert m._stack is not None  # inference stacked the experts ...
    torch.testing.assert_close(out.view(10, 64), before, rtol=1e-5, atol=1e-5)
    state = m.state_dict()  # ... keeping the checkpoint's keys and values (views of the stacks)
    assert state.keys() == keys.keys() and all(torch.equal(state[k], keys[k]) for k in keys)
    w_gu, w_down = m._stack[:2]
    assert m.experts[3].up_proj.weight.data_ptr() == w_gu[3, 32:].data_ptr()
    assert m.experts[5].down_proj.weight.data_ptr() == w_down[5].data_ptr()


def test_trainable_or_wrapped_experts_keep_the_loop_and_get_gradients():
    m = _moe().requires_grad_(True)
    assert not m.stackable()
    m(torch.randn(1, 4, 64)).sum().backward()
    assert m._stack is None
    assert any(e.gate_proj.weight.grad is not None for e in m.experts)
    m = _moe()
    m.experts[0].gate_proj = torch.nn.Sequential(m.experts[0].gate_proj)  # e.g. a LoRA wrapper
    with torch.inference_mode():
        m(torch.randn(1, 2, 64))
    assert m._stack is None and not m.stackable()


@pytest.fixture(scope="module")
def runner_e():
    return molmo_core.load(PARITY / "e", device="cpu", dtype=torch.float32)


@pytest.mark.slow
def test_moe_decode_step_compiles_without_graph_breaks_and_matches_eager(runner_e):
    """The policy (can_compile) keeps MolmoE eager on the CPU, where its grouped GEMM is fastest; the
    compilable forms that GPUs use are proven here on the CPU."""
    import shutil

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile needs a C++ compiler on CPU")
    assert not can_compile(runner_e.model)
    img = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    batch = collate([runner_e.process(img, "Describe this image.")])
    opts = GenerationOptions(10, stop_on_eos=False)
    eager = [int(t[0]) for t in generate_tokens(runner_e.model, batch, opts)]
    compiled = [int(t[0]) for t in generate_tokens(runner_e.model, batch, opts, compile=True)]
    assert compiled == eager
    # One graph, no breaks: the old per-expert loop broke the graph at `.unique().tolist()`.
    from molmo_core.text import KVCache

    model = runner_e.model
    cache = KVCache(model.config.text, 1, 64, model.device, model.dtype)
    with torch.inference_mode():
        explain = torch._dynamo.explain(decode_step)(model, torch.zeros(1, 1, dtype=torch.long),
                                                     torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]), cache)
    assert explain.graph_break_count == 0, explain.break_reasons


# ------------------------------------------------------------------------------------------ streaming
def _quadratic_stream(tokenizer, ids, stop):
    """The previous streamer: decode the whole answer at every token (reference semantics)."""
    out, emitted = [], 0
    for i in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:i])
        cuts = [text.find(s) for s in stop if s and text.find(s) >= 0]
        if cuts:
            out.append(text[: next(text.find(s) for s in stop if s and text.find(s) >= 0)][emitted:])
            return "".join(out)
        if text.endswith("\ufffd"):
            continue
        hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        piece = text[: len(text) - hold]
        out.append(piece[emitted:])
        emitted = max(emitted, len(piece))
    out.append(tokenizer.decode(ids)[emitted:])
    return "".join(out)


@pytest.fixture(scope="module")
def tokenizer(runner_e):
    return runner_e.tokenizer


def _stream(tokenizer, ids, stop=()):
    s = TextStreamer(tokenizer, stop)
    pieces = []
    for t in ids:
        pieces.append(s.push(t))
        if s.stopped:
            break
    pieces.append(s.flush())
    return pieces


@settings(max_examples=60, deadline=None)
@given(text=st.lists(st.sampled_from(list("ab c.\n") + ["é", "日本", "🙂", "<point", "Ω"]), max_size=40).map("".join),
       stop=st.sampled_from([(), ("c.",), ("日本",), ("<point", "\n\n")]))
def test_incremental_stream_equals_whole_decode(tokenizer, text, stop):
    ids = tokenizer.encode(text)
    pieces = _stream(tokenizer, ids, stop)
    assert "".join(pieces) == _quadratic_stream(tokenizer, ids, stop)
    if not stop:
        assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces[:-1]) or "\ufffd" in tokenizer.decode(ids)


def test_stream_decodes_a_bounded_window_per_token(tokenizer):
    """Linear time: the ids decoded per token stay bounded however long the answer is."""
    ids = tokenizer.encode("Molmo points at things, counts them and reads clocks. 日本🙂 " * 80)

    class Counting:
        decoded = 0

        def decode(self, window):
            Counting.decoded += len(window)
            return tokenizer.decode(window)

    s = TextStreamer(Counting(), ())
    text = "".join(s.push(t) for t in ids) + s.flush()
    assert text == tokenizer.decode(ids)
    assert Counting.decoded <= 12 * len(ids), (Counting.decoded, len(ids))


@pytest.mark.slow
def test_stream_time_grows_linearly(tokenizer):
    ids = tokenizer.encode("A long caption with many words. " * 400)

    def run(n):
        t = time.perf_counter()
        s = TextStreamer(tokenizer, ("<|stop|>",))
        for tok in ids[:n]:
            s.push(tok)
        return time.perf_counter() - t

    short, long = min(run(len(ids) // 4) for _ in range(3)), min(run(len(ids)) for _ in range(3))
    assert long / short < 8, (short, long)  # 4x the tokens; the quadratic streamer took ~16x
