"""Write random Molmo checkpoints in the official format (config.json, tokenizer, safetensors/bin).

    python -m molmo_core.tiny --variant d --out /tmp/tiny-d          # Molmo-7B-D-style, ~2 MB
    python -m molmo_core.tiny --variant mid --out /tmp/mid           # a few hundred MB, for memory/bench

`python launch.py --model /tmp/tiny-d` then starts and answers on any machine (random text: the weights
are random, but every real code path runs: processor, loader, ViT, decoder, generation).
Variants: d (Qwen2-style dense), o (OLMo-style, QK-norm, post-norm), e (MolmoE-style MoE), mid (dense,
larger). The tokenizer is a small byte-level BPE trained here, with each family's special-token layout.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from .config import ConnectorConfig, MolmoConfig, TextConfig, VisionConfig
from .model import Molmo
from .preprocessing import EXTRA_TOKENS
from .weights import official_key

TINY_VISION = VisionConfig(width=32, num_heads=2, head_dim=16, num_layers=10, mlp_dim=128)


def _text(**kw) -> TextConfig:
    base = dict(d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, mlp_hidden=192, vocab_size=1024,
                embedding_size=1024, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True)
    base.update(kw)
    return TextConfig(**base)


# fmt: off
VARIANTS: dict[str, MolmoConfig] = {
    "d": MolmoConfig(text=_text(), vision=TINY_VISION, connector=ConnectorConfig(projector_hidden=96)),
    "o": MolmoConfig(text=_text(n_kv_heads=4, vocab_size=1000, rope_theta=5e5, qkv_bias=False, qk_norm=True,
                                norm_after=True),
                     vision=TINY_VISION, connector=ConnectorConfig(projector_hidden=96)),
    "e": MolmoConfig(text=_text(n_kv_heads=4, mlp_hidden=64, vocab_size=1000, rope_theta=1e4, norm_eps=1e-5,
                                qkv_bias=False, qk_norm=True, moe_num_experts=8, moe_top_k=2, moe_expert_hidden=32),
                     vision=TINY_VISION, connector=ConnectorConfig(projector_hidden=32), resize="torch",
                     crop_mask="moe"),
    # A mid-size dense model (~135 M parameters, ~540 MB in fp32) with the real ViT geometry but narrower.
    "mid": MolmoConfig(text=_text(d_model=768, n_layers=12, n_heads=12, n_kv_heads=3, head_dim=64, mlp_hidden=4096,
                                  vocab_size=32768, embedding_size=32768),
                       vision=VisionConfig(width=256, num_heads=4, head_dim=64, num_layers=12, mlp_dim=1024),
                       connector=ConnectorConfig(projector_hidden=2048)),
}
# fmt: on

_WORDS = ("the a an of to in on with and is are there how many what where point count clock time hour minute "
          "second image photo picture dog cat cup cups person people car tree sky red blue green white black "
          "small large left right top bottom center describe this that shows total one two three four five six "
          "seven eight nine ten user assistant caption transcript long short table chair window door book phone "
          "house street light water grass wall floor hand face coin coins read shown being").split()


def _corpus() -> list[str]:
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(3000):
        n = int(torch.randint(4, 16, (1,), generator=g))
        idx = torch.randint(0, len(_WORDS), (n,), generator=g).tolist()
        lines.append(" ".join(_WORDS[i] for i in idx) + " . , : ? 0 1 2 3 4 5 6 7 8 9 ' \" < > = / x y")
    return lines


def build_tokenizer(cfg: TextConfig, family: str):
    """Byte-level BPE with the family's special-token layout.

    Dense Qwen-style ("d"): `<|endoftext|>`, fillers up to embedding_size, then the 5 image tokens at
    embedding_size.. (rows of `new_embedding`). OLMo-style ("o", "e"): image tokens right after vocab_size
    (inside the base embedding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    qwen = family == "d"
    target = cfg.embedding_size if qwen else cfg.vocab_size
    n_text = min(target - 8, max(300, target - 64))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_text, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(_corpus(), trainer)
    specials = ["<|endoftext|>"]
    base = tok.get_vocab_size()
    specials += [f"|<EXTRA_TOKENS_{i}>|" for i in range(target - base - len(specials))]
    tok.add_special_tokens(specials + list(EXTRA_TOKENS))
    return tok


def init_random_(model: Molmo, seed: int = 0) -> None:
    """Parity-style init: linear N(0, 1/fan_in), LM head N(0, 4/fan_in), biases N(0, 0.05^2), norm gains
    1 + N(0, 0.1^2), token embeddings N(0, 1), class/positional/pad embeddings N(0, 0.25)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name or name.endswith("ln_f.weight") or "pre_ln.weight" in name:
                p.copy_(1 + 0.1 * r if name.endswith("weight") else 0.05 * r)
            elif name.endswith("bias"):
                p.copy_(0.05 * r)
            elif "wte" in name:
                p.copy_(r)
            elif p.ndim == 2 and "embedding" not in name and "pad_embed" not in name:
                head = name in ("transformer.ff_out.weight", "lm_head.weight")
                p.copy_(r * math.sqrt((4.0 if head else 1.0) / p.shape[1]))
            else:
                p.copy_(0.5 * r)


def official_state_dict(model: Molmo) -> dict[str, torch.Tensor]:
    """Our parameter names -> official checkpoint keys."""
    return {official_key(name): p.detach().contiguous() for name, p in model.state_dict().items()}


def save_checkpoint(model: Molmo, out: str | Path, *, shards: int = 1, fmt: str = "safetensors") -> None:
    """Weights in the official format: model.safetensors, N shards + index, or pytorch_model.bin."""
    from safetensors.torch import save_file

    out = Path(out)
    sd = official_state_dict(model)
    if fmt == "bin":
        torch.save(sd, out / "pytorch_model.bin")
        return
    if shards == 1:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = list(sd)
    per = -(-len(keys) // shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s * per:(s + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_config_files(config: MolmoConfig, out: Path, family: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_checkpoint_config(), indent=2))
    if not config.text.is_moe and config.vision != VisionConfig():
        (out / "full_config.json").write_text(json.dumps(config.vision_full_config(), indent=2))
    gen = {"_from_model_config": True}
    tok = build_tokenizer(config.text, family)
    tok.save(str(out / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    if config.text.is_moe:
        gen.update(eos_token_id=eos, pad_token_id=eos)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                              "pad_token": "<|endoftext|>"}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None,
                                                            "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "base_image_input_size": [config.vision.image_size] * 2, "image_patch_size": config.vision.patch_size,
        "max_crops": config.max_crops, "overlap_margins": [4, 4], "image_token_length_w": 12,
        "image_token_length_h": 12, "do_normalize": True, "image_padding_mask": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }, indent=2))


def write_tiny_checkpoint(out_dir: str | Path, variant: str = "d", seed: int = 0, *, shards: int = 1,
                          fmt: str = "safetensors", config: MolmoConfig | None = None) -> Path:
    """Write a random checkpoint of `variant` (or of `config`) to `out_dir` and return the folder."""
    if config is None:
        if variant not in VARIANTS:
            raise ValueError(f"Unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
        config = VARIANTS[variant]
    out = Path(out_dir)
    family = "e" if config.text.is_moe else ("o" if config.text.vocab_size != config.text.embedding_size else "d")
    write_config_files(config, out, family)
    torch.manual_seed(seed)
    model = Molmo(config)
    init_random_(model, seed)
    save_checkpoint(model, out, shards=shards, fmt=fmt)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="d", choices=sorted(VARIANTS))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    a = p.parse_args()
    path = write_tiny_checkpoint(a.out, a.variant, a.seed, shards=a.shards, fmt=a.format)
    print(f"wrote a random {a.variant!r} Molmo checkpoint to {path}")
