"""Decoder of Molmo v1: Qwen2-style (7B-D, 72B), OLMo-style with QK-norm and post-norm (7B-O), and the
OLMoE-style mixture of experts (MolmoE-1B).

Notable features (module names mirror the checkpoint keys under `model.transformer.`):
  * `wte.embedding` [embedding_size, d] + `wte.new_embedding` [128, d]: one table, two tensors;
  * fused `att_proj` rows [q | k | v] (+ bias for Qwen-based models); QK-norm over the *full* q and k
    vectors before the head split (7B-O, MolmoE);
  * fused `ff_proj` rows [up | gate]: `silu(gate) * up`;
  * 7B-O is post-norm: x + attn_norm(attn(x)), x + ff_norm(mlp(x));
  * MolmoE: router softmax in fp32 over 64 experts, top-8 probabilities *not* renormalised;
  * RMSNorm normalises in fp32, casts back, then multiplies by the weight;
  * RoPE (rotate-half) in fp32 on explicit position ids; untied LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) -> cos, sin (B, 1, T, head_dim) in float32 (the table is cat(freqs, freqs))."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Static, preallocated key/value cache for all layers.

    k[layer], v[layer]: (B, n_kv_heads, max_len, head_dim). `valid` (B, max_len) marks real (non-padding)
    key positions. Positions are written by `cache_pos` (T,) indices shared by the batch.
    """

    def __init__(self, cfg: TextConfig, batch_size: int, max_len: int, device, dtype, layer_devices=None):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        devs = layer_devices or [device] * cfg.n_layers  # per-layer devices when layers span several GPUs
        self.k = [torch.zeros(shape, device=d, dtype=dtype) for d in devs]
        self.v = [torch.zeros(shape, device=d, dtype=dtype) for d in devs]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len

    def mask(self, cache_pos: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, max_len) bool: causal, real keys only; each query may always see itself (so rows of
        padding queries never become empty, which would give NaN)."""
        key = torch.arange(self.max_len, device=cache_pos.device)
        causal = key[None, :] <= cache_pos[:, None]  # (T, S)
        self_only = key[None, :] == cache_pos[:, None]
        return ((causal[None] & self.valid[:, None, :]) | self_only[None])[:, None]


def attention_mask(valid: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Uncached mask: valid (B, T) -> (B, 1, T, T) bool; `allowed` (B, T, T) adds extra constraints
    (e.g. packed annotations that must not see each other)."""
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    m = causal[None] & valid[:, None, :]
    if allowed is not None:
        m = m & allowed
    m = m | torch.eye(T, dtype=torch.bool, device=valid.device)[None]
    return m[:, None]


class Attention(nn.Module):
    """att_proj -> (QK-norm) -> RoPE -> cache -> SDPA (GQA) -> attn_out. Used by the dense and MoE blocks."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.att_proj = nn.Linear(cfg.d_model, cfg.q_dim + 2 * cfg.kv_dim, bias=cfg.qkv_bias)
        self.attn_out = nn.Linear(cfg.q_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.q_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.kv_dim, cfg.norm_eps)

    def attend(self, x, cos, sin, mask, cache: KVCache | None, layer: int, cache_pos) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.att_proj(x).split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], dim=-1)
        if cfg.qk_norm:
            q, k = self.q_norm(q).to(k.dtype), self.k_norm(k).to(k.dtype)
        q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.k[layer].index_copy_(2, cache_pos, k)
            cache.v[layer].index_copy_(2, cache_pos, v)
            k, v = cache.k[layer], cache.v[layer]  # (B, nkv, max_len, hd)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=cfg.n_kv_heads != cfg.n_heads)
        return self.attn_out(att.transpose(1, 2).reshape(B, T, cfg.q_dim))


class DenseBlock(Attention):
    """`model.transformer.blocks.{i}` of the dense checkpoints (attention and MLP weights side by side)."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self.ff_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden // 2, cfg.d_model, bias=False)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.ff_proj(x).chunk(2, dim=-1)
        return self.ff_out(F.silu(gate) * up)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, cache_pos=None) -> torch.Tensor:
        if self.cfg.norm_after:  # 7B-O (OLMo-2): normalise the branch outputs
            x = x + self.attn_norm(self.attend(x, cos, sin, mask, cache, layer, cache_pos))
            return x + self.ff_norm(self.mlp(x))
        x = x + self.attend(self.attn_norm(x), cos, sin, mask, cache, layer, cache_pos)
        return x + self.mlp(self.ff_norm(x))


class MoEAttention(Attention):
    """`blocks.{i}.attn` of MolmoE: the attention module also owns the pre-norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class Expert(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """`blocks.{i}.mlp` of MolmoE: ff_norm -> router -> top-k experts, weights not renormalised.

    Training (grad enabled) groups tokens by expert, one matmul per used expert: a Python loop with a
    data-dependent trip count, fine for long sequences but impossible to compile or graph-capture.
    Inference reads the experts from stacked tensors instead (gate|up: (E, 2H, D), down: (E, H, D)),
    with no loop and no host sync, so the decode step compiles and runs in a CUDA graph:
      * where `torch._grouped_mm` runs (CPU, where torch.compile traces it in bf16 only; Hopper GPUs in
        bf16): rows sorted by expert, one grouped GEMM per projection; each used expert is read once,
        results equal the loop's;
      * elsewhere, decode batches only: M = tokens * top_k <= E / 3 gathers the chosen experts' weights
        (two batched matmuls); up to DENSE_MAX_TOKENS tokens run every expert with unchosen ones weighted
        0; longer inputs keep the loop.
    Each expert's `gate_proj` / `up_proj` / `down_proj` weight becomes a view of the stacks, so the
    checkpoint keys and memory stay as they were. Stacking happens on the first inference call after
    loading; experts that are trainable, quantized or LoRA-wrapped are never stacked (they loop).
    """

    DENSE_MAX_TOKENS = 64

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.n_experts = cfg.moe_num_experts
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.gate = nn.Linear(cfg.d_model, cfg.moe_num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg.d_model, cfg.moe_expert_hidden) for _ in range(cfg.moe_num_experts))
        self._stack: tuple | None = None  # (w_gu, w_down, expert 0's gate weight when stacked, grouped-GEMM ok)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.ff_norm(x).reshape(B * T, D)
        probs = F.softmax(self.gate(h), dim=-1, dtype=torch.float)  # (N, n_experts)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = weights.to(h.dtype)
        N, M = h.shape[0], h.shape[0] * self.top_k
        stack = None if torch.is_grad_enabled() else self.stacked()  # stacked at the (eager) prefill
        if stack is not None and self._stack[3] and (h.dtype == torch.bfloat16 or not torch.compiler.is_compiling()):
            out = self._grouped(h, weights, chosen, *stack)  # (the compiler traces it for bf16 only)
        elif stack is None or N > self.DENSE_MAX_TOKENS:
            out = self._loop(h, weights, chosen)
        elif 3 * M <= self.n_experts:
            out = self._gathered(h, weights, chosen, *stack)
        else:
            out = self._dense(h, weights, chosen, *stack)
        return out.view(B, T, D)

    def _loop(self, h: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(h)
        for e in chosen.unique().tolist():  # one matmul per used expert
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, self.experts[e](h[rows]) * weights[rows, slot, None])
        return out

    @staticmethod
    def _grouped(h, weights, chosen, w_gu, w_down) -> torch.Tensor:
        """One grouped GEMM per projection over the rows sorted by expert: each used expert's weights are
        read once, no gathered copy, no loop; exact w.r.t. the loop (same per-expert matmuls)."""
        k = chosen.shape[1]
        sorted_experts, order = chosen.reshape(-1).sort()  # (M,)
        experts = torch.arange(w_gu.shape[0], device=h.device)
        # (E,) group ends; searchsorted's output shape is static (bincount's depends on the data)
        offs = torch.searchsorted(sorted_experts, experts, right=True).to(torch.int32)
        rows = order // k  # (M,) token of each sorted row
        gate, up = torch._grouped_mm(h[rows], w_gu.transpose(1, 2), offs=offs).chunk(2, dim=-1)  # (M, H) each
        y = torch._grouped_mm(F.silu(gate) * up, w_down, offs=offs)  # (M, D)
        return torch.zeros_like(h).index_add_(0, rows, y * weights.reshape(-1)[order, None])

    @staticmethod
    def _gathered(h, weights, chosen, w_gu, w_down) -> torch.Tensor:
        """h (N, D), chosen (N, k) -> (N, D): the k chosen experts' weights gathered, two batched matmuls."""
        N, k = chosen.shape
        flat = chosen.reshape(-1)  # (M,)
        a = h.repeat_interleave(k, dim=0)  # (M, D), row r = token r // k
        gate, up = torch.bmm(w_gu[flat], a[:, :, None]).squeeze(-1).chunk(2, dim=-1)  # (M, H) each
        y = torch.bmm((F.silu(gate) * up)[:, None], w_down[flat]).squeeze(1)  # (M, D)
        return (y.view(N, k, -1) * weights[..., None]).sum(1)

    @staticmethod
    def _dense(h, weights, chosen, w_gu, w_down) -> torch.Tensor:
        """Every expert on every row; the routing weights of unchosen experts are 0."""
        E, H2, D = w_gu.shape
        gate, up = (h @ w_gu.reshape(E * H2, D).T).view(-1, E, H2).chunk(2, dim=-1)  # (N, E, H) each
        route = torch.zeros(h.shape[0], E, dtype=h.dtype, device=h.device).scatter(1, chosen, weights)  # (N, E)
        act = F.silu(gate) * up * route[..., None]  # (N, E, H)
        return act.reshape(h.shape[0], -1) @ w_down.reshape(-1, D)  # (N, E*H) @ (E*H, D)

    def stackable(self) -> bool:
        """Plain, frozen float Linear experts (as loaded for inference); trained or wrapped ones are not."""
        if not all(type(m) is nn.Linear for e in self.experts for m in (e.gate_proj, e.up_proj, e.down_proj)):
            return False
        first = self.experts[0].gate_proj.weight
        return not first.is_meta and first.is_floating_point() and not first.requires_grad

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The experts' weights as (E, 2H, D) gate|up and (E, H, D) down, built once after loading; None
        when the experts are not plain float Linear layers (quantized, LoRA-wrapped, on meta)."""
        first = getattr(self.experts[0].gate_proj, "weight", None)
        if self._stack is not None and self._stack[2] is first:
            return self._stack[:2]
        if not self.stackable():
            return None
        with torch.no_grad():
            w_gu = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts])
            w_down = torch.stack([e.down_proj.weight.T for e in self.experts])  # (E, H, D)
            H = w_down.shape[1]
            for i, e in enumerate(self.experts):  # each expert's weights become views of the stacks
                e.gate_proj.weight = nn.Parameter(w_gu[i, :H], requires_grad=e.gate_proj.weight.requires_grad)
                e.up_proj.weight = nn.Parameter(w_gu[i, H:], requires_grad=e.up_proj.weight.requires_grad)
                e.down_proj.weight = nn.Parameter(w_down[i].T, requires_grad=e.down_proj.weight.requires_grad)
        self._stack = (w_gu, w_down, self.experts[0].gate_proj.weight, _grouped_mm_ok(w_gu))
        return w_gu, w_down


def _grouped_mm_ok(w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs for this device and dtype (CPU; Hopper GPUs in bf16): probed once."""
    if not hasattr(torch, "_grouped_mm") or (w.is_cuda and (w.dtype != torch.bfloat16
                                                             or torch.cuda.get_device_capability(w.device)[0] < 9)):
        return False
    try:
        a = torch.ones(4, 16, dtype=w.dtype, device=w.device)
        b = torch.ones(2, 16, 16, dtype=w.dtype, device=w.device).transpose(1, 2)  # as the gate|up stack is read
        out = torch._grouped_mm(a, b, offs=torch.tensor([1, 4], dtype=torch.int32, device=w.device))
        return bool((out == 16).all())
    except (RuntimeError, NotImplementedError):
        return False


class MoEBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attn = MoEAttention(cfg)
        self.mlp = SparseMoE(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, cache_pos=None) -> torch.Tensor:
        x = x + self.attn.attend(self.attn.attn_norm(x), cos, sin, mask, cache, layer, cache_pos)
        return x + self.mlp(x)


class Embedding(nn.Module):
    """`wte`: base rows + 128 extra rows, looked up as one table without concatenating them."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(cfg.embedding_size, cfg.d_model))
        self.new_embedding = nn.Parameter(torch.zeros(cfg.additional_vocab_size, cfg.d_model))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.embedding.shape[0]
        base = F.embedding(ids.clamp(max=n - 1), self.embedding)
        extra = F.embedding((ids - n).clamp(min=0), self.new_embedding)
        return torch.where((ids >= n)[..., None], extra, base)


class Transformer(nn.Module):
    """`model.transformer`: wte -> blocks -> ln_f (-> ff_out, the dense LM head)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.wte = Embedding(cfg)
        block = MoEBlock if cfg.is_moe else DenseBlock
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.is_moe:
            self.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
