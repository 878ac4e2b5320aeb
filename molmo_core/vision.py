"""Vision side of Molmo v1: CLIP ViT-L/14 tower -> pad embeddings -> 2x2 attention pooling -> projector.

Notable features (module names mirror the official checkpoint keys under `model.vision_backbone.`):
  * `image_vit`: OpenAI CLIP ViT-L/14-336 *truncated to 23 blocks*; patch embedding is a Linear over
    14*14*3 = 588 values per patch (no bias); pre-LN, no post-LN, no projection head.
  * Features = concat(hidden[-2], hidden[-9]) of the 23 block outputs, CLS dropped (2048-d per patch).
  * `pad_embed` [2, 2048]: added to all-padding (mask == 0) and partial-padding (0 < mask < 1, or -1)
    patches before pooling.
  * `image_pooling_2d`: attention over each 2x2 window with the window *mean* as the query.
  * `image_projector`: SwiGLU w2(silu(w1 x) * w3 x), no biases, to the LLM width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MolmoConfig, VisionConfig


class ViTAttention(nn.Module):
    """Multi-head attention with biased q/k/v/o projections (also used for the 2x2 pooling)."""

    def __init__(self, in_dim: int, n_heads: int, head_dim: int, out_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.wq = nn.Linear(in_dim, n_heads * head_dim)
        self.wk = nn.Linear(in_dim, n_heads * head_dim)
        self.wv = nn.Linear(in_dim, n_heads * head_dim)
        self.wo = nn.Linear(n_heads * head_dim, out_dim)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        B, Tq, _ = q_in.shape
        Tk = kv_in.shape[1]
        q = self.wq(q_in).view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, Tq, hd)
        k = self.wk(kv_in).view(B, Tk, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, Tk, hd)
        v = self.wv(kv_in).view(B, Tk, self.n_heads, self.head_dim).transpose(1, 2)
        # The official code computes q.k and the softmax in float32 (`float32_attention=True`).
        att = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(v.dtype)
        return self.wo(att.transpose(1, 2).reshape(B, Tq, -1))  # (B, Tq, out_dim)


class ViTMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        return self.w2(h * torch.sigmoid(1.702 * h))  # QuickGELU


class ResidualAttentionBlock(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.attention = ViTAttention(v.width, v.num_heads, v.head_dim, v.width)
        self.feed_forward = ViTMLP(v.width, v.mlp_dim)
        self.attention_norm = nn.LayerNorm(v.width, eps=v.norm_eps)
        self.ffn_norm = nn.LayerNorm(v.width, eps=v.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attention_norm(x)
        x = x + self.attention(h, h)
        return x + self.feed_forward(self.ffn_norm(x))


class BlockCollection(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(v) for _ in range(v.num_layers))


class VisionTransformer(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.config = v
        self.class_embedding = nn.Parameter(torch.zeros(v.width))
        self.positional_embedding = nn.Parameter(torch.zeros(v.num_pos, v.width))
        self.patch_embedding = nn.Linear(v.patch_dim, v.width, bias=False)
        self.pre_ln = nn.LayerNorm(v.width, eps=v.norm_eps)
        self.transformer = BlockCollection(v)

    def forward(self, patches: torch.Tensor) -> list[torch.Tensor]:
        """patches (N, 576, 588) -> hidden states after each block that is needed, each (N, 577, width).
        Index them with `layer % num_layers` (the last block is skipped when no selected layer uses it)."""
        N = patches.shape[0]
        x = self.patch_embedding(patches)  # (N, 576, width)
        cls = self.class_embedding.to(x.dtype).expand(N, 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (N, 577, width)
        x = F.layer_norm(x.float(), x.shape[-1:], self.pre_ln.weight.float(), self.pre_ln.bias.float(),
                         self.pre_ln.eps).to(x.dtype)  # LayerNormFp32 in the original
        hidden = []
        for block in self.transformer.resblocks[: self.n_needed_blocks]:
            x = block(x)
            hidden.append(x)
        return hidden

    @property
    def n_needed_blocks(self) -> int:
        """Only the blocks up to the deepest selected layer have to run (all of them for [-2, -9])."""
        L = self.config.num_layers
        return max(i % L for i in self.config.vit_layers) + 1


class ImageProjectorMLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, out_dim, bias=False)  # down
        self.w3 = nn.Linear(in_dim, hidden, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class VisionBackbone(nn.Module):
    def __init__(self, config: MolmoConfig):
        super().__init__()
        v = config.vision
        self.config = config
        self.image_vit = VisionTransformer(v)
        self.image_pooling_2d = ViTAttention(v.feature_dim, v.num_heads, v.head_dim, v.width)
        self.image_projector = ImageProjectorMLP(v.width, config.connector.projector_hidden, config.text.d_model)
        self.pad_embed = nn.Parameter(torch.zeros(2, v.feature_dim))

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        """images (B, n_crops, 576, 588), image_masks (B, n_crops, 576) -> features (B, n_crops, 144, d_model).

        Crops made entirely of -1 (batch padding) give zero ViT features, as in the original.
        """
        v = self.config.vision
        B, T, N, D = images.shape
        flat = images.reshape(B * T, N, D)
        if self.config.crop_mask == "moe":  # modeling_molmoe: a crop is kept only if NO value equals -1
            keep = torch.all(flat != -1, dim=(1, 2), keepdim=True)
        else:  # modeling_molmo: a crop is dropped only if ALL values equal -1
            keep = ~torch.all(flat == -1, dim=(1, 2), keepdim=True)
        hidden = self.image_vit(flat)
        feats = torch.cat([hidden[i % v.num_layers] for i in v.vit_layers], dim=-1)[:, 1:]  # (B*T, 576, 2048), CLS dropped
        feats = (feats * keep).view(B, T, N, -1)

        all_pad = (image_masks == 0).to(feats.dtype).unsqueeze(-1)  # (B, T, 576, 1)
        partial = ((image_masks < 1) & (image_masks != 0)).to(feats.dtype).unsqueeze(-1)
        pad = self.pad_embed.to(feats.dtype)
        feats = feats + pad[0] * all_pad + pad[1] * partial

        # 2x2 windows: (B*T*12*12, 4, 2048) with members ordered top-left, top-right, bottom-left, bottom-right.
        side, p = v.patches_per_side, self.config.connector.pool_size
        g = side // p
        win = feats.view(B * T, g, p, g, p, -1).permute(0, 1, 3, 2, 4, 5).reshape(B * T * g * g, p * p, -1)
        pooled = self.image_pooling_2d(win.mean(dim=1, keepdim=True), win)  # (B*T*144, 1, width)
        pooled = pooled.view(B, T, g * g, -1)  # (B, T, 144, width)
        return self.image_projector(pooled)  # (B, T, 144, d_model)
