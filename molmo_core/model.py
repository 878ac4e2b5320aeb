"""Molmo v1 = vision backbone + decoder. Image features are ADDED to the `<im_patch>` token embeddings at
the positions given by `image_input_idx` (not substituted: a classic re-implementation bug).

Module tree = official keys without the leading `model.`:
    vision_backbone.{image_vit, image_pooling_2d, image_projector, pad_embed}
    transformer.{wte, blocks, ln_f, ff_out}         (dense LM head: transformer.ff_out)
    lm_head                                          (MolmoE only; top-level key `lm_head.weight`)
References: arXiv 2409.17146; allenai/molmo `olmo/model.py`; the hub `modeling_molmo.py` / `modeling_molmoe.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MolmoConfig
from .text import KVCache, Transformer, attention_mask, rope_cos_sin
from .vision import VisionBackbone


class Molmo(nn.Module):
    def __init__(self, config: MolmoConfig):
        super().__init__()
        self.config = config
        self.vision_backbone = VisionBackbone(config)
        self.transformer = Transformer(config.text)
        if config.text.is_moe:
            self.lm_head = nn.Linear(config.text.d_model, config.text.embedding_size, bias=False)
        self._block_devices: list[torch.device] | None = None  # set by place_blocks() when split over GPUs

    def place_blocks(self) -> None:
        """Record each decoder block's device (after loading) so forward moves activations between GPUs."""
        devs = [next(b.parameters()).device for b in self.transformer.blocks]
        self._block_devices = devs if len(set(devs)) > 1 else None

    @property
    def device(self) -> torch.device:
        return self.transformer.ln_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.embedding.dtype

    def head(self) -> nn.Module:
        return self.lm_head if self.config.text.is_moe else self.transformer.ff_out

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
              image_masks: torch.Tensor | None = None, image_input_idx: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) with -1 = padding -> embeddings (B, T, d) with image features added."""
        x = self.transformer.wte(input_ids.clamp(min=0))  # (B, T, d); -1 padding looks up row 0
        if images is None:
            return x
        B = input_ids.shape[0]
        feats = self.vision_backbone(images.to(x.dtype), image_masks.to(x.dtype))  # (B, n_crops, 144, d)
        feats = feats.reshape(B, -1, feats.shape[-1])  # (B, n_crops*144, d)
        idx = image_input_idx.reshape(B, -1).long()  # (B, n_crops*144)
        valid = idx >= 0
        rows = torch.arange(B, device=x.device)[:, None].expand_as(idx)
        x = x.index_put((rows[valid], idx[valid]), feats[valid].to(x.dtype), accumulate=True)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T), -1 = padding
        images: torch.Tensor | None = None,  # (B, n_crops, 576, 588)
        image_masks: torch.Tensor | None = None,  # (B, n_crops, 576)
        image_input_idx: torch.Tensor | None = None,  # (B, n_crops, 144)
        position_ids: torch.Tensor | None = None,  # (B, T)
        cache: KVCache | None = None,
        cache_pos: torch.Tensor | None = None,  # (T,) cache slots written by this call
        allowed: torch.Tensor | None = None,  # (B, T, T) extra attention constraint (packing), uncached only
        last_only: bool = False,  # return logits for the last position only
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Returns logits (B, T, embedding_size) (or (B, 1, V) with last_only)."""
        cfg = self.config.text
        valid = input_ids != -1
        if position_ids is None:
            position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
        x = self.embed(input_ids, images, image_masks, image_input_idx)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)
        if cache is not None:
            cache.valid[:, cache_pos] = valid
            mask = cache.mask(cache_pos)
        else:
            mask = attention_mask(valid, allowed)
        for i, block in enumerate(self.transformer.blocks):
            dev = self._block_devices[i] if self._block_devices else None
            if dev is not None and x.device != dev:  # layers split across GPUs (Molmo-72B)
                x, cos, sin, mask = x.to(dev), cos.to(dev), sin.to(dev), mask.to(dev)
                cache_pos = cache_pos.to(dev) if cache_pos is not None else None
            x = block(x, cos, sin, mask, cache, i, cache_pos)
        if last_only:
            x = x[:, -1:]
        x = x.to(self.transformer.ln_f.weight.device)
        x = self.transformer.ln_f(x)
        if return_hidden:
            return x
        return self.head()(x)
