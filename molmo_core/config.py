"""Configs for Molmo v1: small dataclasses per part, composed into `MolmoConfig`, with named presets.

The official checkpoints ship two `config.json` formats:
  * dense (Molmo-7B-D / 7B-O / 72B): HF-style fields (`hidden_size`, ...); the vision tower and the
    connector are hard-coded in the remote `modeling_molmo.py` (CLIP ViT-L/14-336, 23 blocks), so they
    are the defaults of `VisionConfig` here;
  * MolmoE-1B: a full OLMo `ModelConfig` dump (`d_model`, `n_layers`, `block_type: "moe"`, ...,
    `vision_backbone: {...}`).
`MolmoConfig.from_checkpoint_config` reads both. Tiny test folders may carry the vision sizes in
`full_config.json -> model_config_used_by_reference.vision_backbone`; they are read when present.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT-L/14 at 336 px as used by every Molmo v1 checkpoint (only 23 of CLIP's 24 blocks)."""

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    num_heads: int = 16
    head_dim: int = 64
    num_layers: int = 23
    mlp_dim: int = 4096
    num_pos: int = 577  # CLS + 24*24
    norm_eps: float = 1e-5
    vit_layers: tuple[int, ...] = (-2, -9)  # hidden states concatenated in this order

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size  # 24

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3  # 588

    @property
    def feature_dim(self) -> int:
        return self.width * len(self.vit_layers)  # 2048


@dataclass(frozen=True)
class ConnectorConfig:
    """2x2 attention pooling (mean query) + SwiGLU projector + pad embeddings."""

    pool_size: int = 2
    projector_hidden: int = 18944  # = the LLM's per-branch MLP width (dense) or mlp_ratio*d/2 (MoE)


@dataclass(frozen=True)
class TextConfig:
    d_model: int = 3584
    n_layers: int = 28
    n_heads: int = 28
    n_kv_heads: int = 4
    head_dim: int = 128
    mlp_hidden: int = 37888  # FUSED SwiGLU width (ff_proj rows); per-branch width = mlp_hidden // 2
    vocab_size: int = 152064
    embedding_size: int = 152064
    additional_vocab_size: int = 128
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_norm: bool = False  # OLMo-style QK-norm over the full q / k vectors
    norm_after: bool = False  # OLMo-2 post-norm (7B-O)
    max_sequence_length: int = 4096  # RoPE positions available to the dense models
    # Mixture of experts (MolmoE-1B); 0 experts = dense SwiGLU MLP.
    moe_num_experts: int = 0
    moe_top_k: int = 0
    moe_expert_hidden: int = 0

    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


@dataclass(frozen=True)
class MolmoConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    # Preprocessing choices that follow the family's official processor.
    resize: str = "tf"  # dense hub code resizes with TensorFlow; MolmoE with torchvision
    crop_mask: str = "dense"  # how all-padding crops are detected (see vision.py)
    max_crops: int = 12

    def replace(self, **changes: Any) -> "MolmoConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ reading checkpoints
    @classmethod
    def from_checkpoint_config(cls, cfg: dict, full_config: dict | None = None) -> "MolmoConfig":
        """Build from an official `config.json` dict (dense or MolmoE format)."""
        if "d_model" in cfg:  # MolmoE / OLMo ModelConfig dump
            return _from_olmo_config(cfg)
        if "hidden_size" not in cfg:
            raise ValueError(
                "config.json has neither 'hidden_size' (dense Molmo format) nor 'd_model' "
                f"(MolmoE format); found keys {sorted(cfg)[:12]}... Is this a Molmo v1 checkpoint?"
            )
        d = cfg["hidden_size"]
        n_heads = cfg["num_attention_heads"]
        text = TextConfig(
            d_model=d,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=d // n_heads,
            mlp_hidden=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            embedding_size=cfg.get("embedding_size") or cfg["vocab_size"],
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
            qkv_bias=bool(cfg.get("qkv_bias", False)),
            qk_norm=bool(cfg.get("attention_layer_norm", False)),
            norm_after=bool(cfg.get("norm_after", False)),
            max_sequence_length=int(cfg.get("max_position_embeddings") or 4096),
        )
        vision = VisionConfig()
        ref = (full_config or {}).get("model_config_used_by_reference")
        if ref and "vision_backbone" in ref:
            vision = _vision_from_olmo(ref["vision_backbone"], ref.get("vit_layers", [-2, -9]))
        return cls(
            text=text,
            vision=vision,
            connector=ConnectorConfig(projector_hidden=text.mlp_hidden // 2),
            resize="tf",
            crop_mask="dense",
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> "MolmoConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"No config.json in {path}: expected an official Molmo checkpoint folder.")
        cfg = json.loads(cfg_file.read_text())
        full = path / "full_config.json"
        return cls.from_checkpoint_config(cfg, json.loads(full.read_text()) if full.is_file() else None)

    def to_checkpoint_config(self) -> dict:
        """The official `config.json` dict for this config (dense or MolmoE format)."""
        t = self.text
        if t.is_moe:
            return _to_olmo_config(self)
        return {
            "architectures": ["MolmoForCausalLM"],
            "auto_map": {
                "AutoConfig": "config_molmo.MolmoConfig",
                "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM",
            },
            "attention_layer_norm": t.qk_norm,
            "clip_qkv": None,
            "embedding_size": t.embedding_size,
            "hidden_size": t.d_model,
            "initializer_range": 0.02,
            "intermediate_size": t.mlp_hidden,
            "layer_norm_eps": t.norm_eps,
            "layer_norm_type": "rms",
            "max_position_embeddings": t.max_sequence_length,
            "model_type": "molmo",
            "norm_after": t.norm_after,
            "num_attention_heads": t.n_heads,
            "num_hidden_layers": t.n_layers,
            "num_key_value_heads": t.n_kv_heads,
            "qkv_bias": t.qkv_bias,
            "rope_theta": t.rope_theta,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "transformers_version": "4.43.3",
            "use_cache": True,
            "use_position_ids": True,
            "vocab_size": t.vocab_size,
            "weight_tying": False,
        }

    def vision_full_config(self) -> dict:
        """`full_config.json` content carrying non-default vision sizes (as the tiny parity folders do)."""
        v = self.vision
        return {
            "model_config_used_by_reference": {
                "vit_layers": list(v.vit_layers),
                "vision_backbone": _vision_to_olmo(v),
            }
        }

    @classmethod
    def from_name(cls, name: str) -> "MolmoConfig":
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; valid names: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]


def _vision_from_olmo(vb: dict, vit_layers) -> VisionConfig:
    size = vb.get("image_default_input_size", [336, 336])
    return VisionConfig(
        image_size=int(size[0]),
        patch_size=int(vb.get("image_patch_size", 14)),
        width=int(vb.get("image_emb_dim", 1024)),
        num_heads=int(vb.get("image_num_heads", 16)),
        head_dim=int(vb.get("image_head_dim", 64)),
        num_layers=int(vb.get("image_num_layers", 23)),
        mlp_dim=int(vb.get("image_mlp_dim", 4096)),
        num_pos=int(vb.get("image_num_pos", 577)),
        norm_eps=float(vb.get("image_norm_eps", 1e-5)),
        vit_layers=tuple(int(i) for i in vit_layers),
    )


def _vision_to_olmo(v: VisionConfig) -> dict:
    return {
        "image_default_input_size": [v.image_size, v.image_size],
        "image_patch_size": v.patch_size,
        "image_pos_patch_size": v.patch_size,
        "image_emb_dim": v.width,
        "image_num_heads": v.num_heads,
        "image_num_key_value_heads": v.num_heads,
        "image_num_layers": v.num_layers,
        "image_head_dim": v.head_dim,
        "image_mlp_dim": v.mlp_dim,
        "image_mlp_activations": "quick_gelu",
        "image_dropout_rate": 0.0,
        "image_num_pos": v.num_pos,
        "image_norm_eps": v.norm_eps,
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "initializer_range": 0.02,
        "image_model_type": "openai",
        "resize_mode": "default",
    }


def _from_olmo_config(cfg: dict) -> MolmoConfig:
    d = cfg["d_model"]
    n_heads = cfg["n_heads"]
    head_dim = cfg.get("head_dim") or d // n_heads
    mlp_ratio = cfg.get("mlp_ratio", 4)
    mlp_hidden = cfg.get("mlp_hidden_size") or mlp_ratio * d
    is_moe = cfg.get("block_type") == "moe"
    text = TextConfig(
        d_model=d,
        n_layers=cfg["n_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("n_kv_heads") or n_heads,
        head_dim=head_dim,
        mlp_hidden=mlp_hidden,
        vocab_size=cfg["vocab_size"],
        embedding_size=cfg.get("embedding_size") or cfg["vocab_size"],
        additional_vocab_size=cfg.get("additional_vocab_size") or 128,
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        qkv_bias=bool(cfg.get("qkv_bias", False)),
        qk_norm=bool(cfg.get("attention_layer_norm", False)),
        norm_after=bool(cfg.get("norm_after", False)),
        max_sequence_length=int(cfg.get("max_sequence_length") or 4096),
        moe_num_experts=int(cfg.get("moe_num_experts", 0)) if is_moe else 0,
        moe_top_k=int(cfg.get("moe_top_k", 0)) if is_moe else 0,
        moe_expert_hidden=mlp_hidden // 2 if is_moe else 0,
    )
    vision = _vision_from_olmo(cfg.get("vision_backbone") or {}, cfg.get("vit_layers", [-2, -9]))
    return MolmoConfig(
        text=text,
        vision=vision,
        connector=ConnectorConfig(projector_hidden=mlp_hidden // 2),
        resize="torch",
        crop_mask="moe" if is_moe else "dense",
        max_crops=int(cfg.get("max_crops", 12)),
    )


def _to_olmo_config(c: MolmoConfig) -> dict:
    t = c.text
    return {
        "auto_map": {
            "AutoConfig": "config_molmoe.MolmoConfig",
            "AutoModelForCausalLM": "modeling_molmoe.MolmoForCausalLM",
        },
        "architectures": ["OLMoForCausalLM"],
        "model_type": "molmo",
        "activation_type": "swiglu",
        "additional_vocab_size": t.additional_vocab_size,
        "attention_layer_norm": t.qk_norm,
        "block_type": "moe",
        "d_model": t.d_model,
        "n_layers": t.n_layers,
        "n_heads": t.n_heads,
        "n_kv_heads": None if t.n_kv_heads == t.n_heads else t.n_kv_heads,
        "head_dim": None,
        "mlp_ratio": t.mlp_hidden // t.d_model,
        "mlp_hidden_size": None,
        "moe_num_experts": t.moe_num_experts,
        "moe_top_k": t.moe_top_k,
        "norm_after": t.norm_after,
        "layer_norm_type": "rms",
        "layer_norm_eps": t.norm_eps,
        "qkv_bias": t.qkv_bias,
        "rope": True,
        "rope_impl": "llama",
        "rope_theta": t.rope_theta,
        "max_sequence_length": t.max_sequence_length,
        "max_position_embeddings": 32768,
        "vocab_size": t.vocab_size,
        "embedding_size": t.embedding_size,
        "weight_tying": False,
        "pad_token_id": 1,
        "max_crops": c.max_crops,
        "vit_layers": list(c.vision.vit_layers),
        "vision_backbone": _vision_to_olmo(c.vision),
        "image_padding_embed": "pad_and_partial_pad",
        "image_pooling_2d": "attention-meanq",
        "image_projector": "mlp",
    }


def _dense(**text: Any) -> MolmoConfig:
    """A dense preset from its decoder fields (the official config.json values): head_dim is
    d_model / n_heads and the projector's hidden width is the MLP's per-branch width, as in the hub code."""
    t = TextConfig(head_dim=text["d_model"] // text["n_heads"], **text)
    return MolmoConfig(text=t, connector=ConnectorConfig(projector_hidden=t.mlp_hidden // 2))


PRESETS: dict[str, MolmoConfig] = {
    # https://huggingface.co/allenai/Molmo-7B-D-0924/blob/main/config.json
    "Molmo-7B-D-0924": _dense(
        d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, mlp_hidden=37888,
        vocab_size=152064, embedding_size=152064, rope_theta=1e6, norm_eps=1e-6,
        qkv_bias=True, qk_norm=False, norm_after=False,
    ),
    # https://huggingface.co/allenai/Molmo-7B-O-0924/blob/main/config.json
    "Molmo-7B-O-0924": _dense(
        d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden=22016,
        vocab_size=100278, embedding_size=100352, rope_theta=5e5, norm_eps=1e-6,
        qkv_bias=False, qk_norm=True, norm_after=True,
    ),
    # https://huggingface.co/allenai/Molmo-72B-0924/blob/main/config.json
    "Molmo-72B-0924": _dense(
        d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, mlp_hidden=59136,
        vocab_size=152064, embedding_size=152064, rope_theta=1e6, norm_eps=1e-5,
        qkv_bias=True, qk_norm=False, norm_after=False,
    ),
    # https://huggingface.co/allenai/MolmoE-1B-0924/blob/main/config.json
    "MolmoE-1B-0924": MolmoConfig(
        text=TextConfig(
            d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, head_dim=128, mlp_hidden=2048,
            vocab_size=50280, embedding_size=50304, rope_theta=10000.0, norm_eps=1e-5,
            qkv_bias=False, qk_norm=True, norm_after=False,
            moe_num_experts=64, moe_top_k=8, moe_expert_hidden=1024,
        ),
        connector=ConnectorConfig(projector_hidden=1024),
        resize="torch",
        crop_mask="moe",
    ),
}
