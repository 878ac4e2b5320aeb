"""The official Molmo v1 implementation (the hub's remote-code `modeling_molmo.py` + `config_molmo.py` of
allenai/Molmo-7B-D-0924), run side by side with ours on the same weights, for bench/gpu.py.

Those files are not ours and are never committed: put them in the git-ignored `bench/official/`
    python -m bench.official --fetch                 # from the hub (needs network)
    python -m bench.official --from DIR              # copy from a downloaded checkpoint folder
and carry that folder to the GPU machine. They need `einops` (on the GPU image; `pip install einops`
elsewhere). The official model is driven the way its `generate` drives it (`prepare_inputs_for_generation`):
a prefill with images, `use_cache=True`, then one token at a time with its own growing KV cache
(`past_key_values`), position ids continuing after the last real token.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import torch

FOLDER = Path(__file__).parent / "official"
FILES = ("config_molmo.py", "modeling_molmo.py")
REPO = "allenai/Molmo-7B-D-0924"


def available(folder: Path = FOLDER) -> str | None:
    """None when the official files can be imported, else why not."""
    missing = [f for f in FILES if not (folder / f).exists()]
    if missing:
        return f"official files missing in {folder}: {', '.join(missing)} (python -m bench.official --help)"
    if importlib.util.find_spec("einops") is None:
        return "the official code needs einops (pip install einops)"
    return None


def sha256s(folder: Path = FOLDER) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in FILES}


def import_official(folder: Path = FOLDER):
    """Import the folder as the package `official_molmo` (its files use relative imports)."""
    name = "official_molmo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[name] = pkg
    import importlib as _il

    return _il.import_module(f"{name}.modeling_molmo"), _il.import_module(f"{name}.config_molmo")


def build_official(ours, device: torch.device, dtype: torch.dtype):
    """The official `MolmoForCausalLM` (dense family) with our model's config and a copy of its weights.

    Built as its own constructor builds it, with the vision sizes taken from our config (the hub code
    hard-codes CLIP ViT-L/14-336, which is what our VisionConfig defaults to for the real models)."""
    modeling, config_mod = import_official()
    t, v = ours.config.text, ours.config.vision
    if t.is_moe or t.norm_after or t.qk_norm:
        raise ValueError("bench.official drives the dense Qwen2-style family (Molmo-7B-D / 72B) only")
    hf_cfg = config_mod.MolmoConfig(
        vocab_size=t.vocab_size, embedding_size=t.embedding_size, hidden_size=t.d_model,
        intermediate_size=t.mlp_hidden, num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads,
        num_key_value_heads=t.n_kv_heads, max_position_embeddings=t.max_sequence_length,
        layer_norm_eps=t.norm_eps, rope_theta=t.rope_theta, qkv_bias=t.qkv_bias, norm_after=t.norm_after,
        layer_norm_type="rms", attention_layer_norm=False, use_position_ids=True, weight_tying=False,
        tie_word_embeddings=False)
    vision = modeling.VisionBackboneConfig(
        image_default_input_size=(v.image_size, v.image_size), image_patch_size=v.patch_size,
        image_pos_patch_size=v.patch_size, image_emb_dim=v.width, image_num_heads=v.num_heads,
        image_num_key_value_heads=v.num_heads, image_num_layers=v.num_layers, image_head_dim=v.head_dim,
        image_mlp_dim=v.mlp_dim, image_mlp_activations="quick_gelu", image_num_pos=v.num_pos,
        image_norm_eps=v.norm_eps)
    full = modeling.FullMolmoConfig(
        image_padding_embed="pad_and_partial_pad", image_pooling_2d="attention-meanq",
        attention_layer_norm=False, rope_impl="llama", vocab_size=t.vocab_size,
        max_sequence_length=t.max_sequence_length, qkv_bias=t.qkv_bias, norm_after=t.norm_after,
        embedding_size=t.embedding_size, attention_type="sdpa", embedding_dropout=0, attention_dropout=0,
        residual_dropout=0, rope=True, weight_tying=False, include_bias=False, d_model=t.d_model,
        mlp_hidden_size=t.mlp_hidden, n_layers=t.n_layers, additional_vocab_size=t.additional_vocab_size,
        n_heads=t.n_heads, n_kv_heads=t.n_kv_heads, rope_theta=t.rope_theta, layer_norm_eps=t.norm_eps,
        layer_norm_type="rms", vit_layers=list(v.vit_layers), vision_backbone=vision,
        init_device=str(device))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype` on `device`, no float32 copy
    try:
        inner = modeling.Molmo(full, init_params=False)
        model = modeling.MolmoForCausalLM(hf_cfg, model=inner)
    finally:
        torch.set_default_dtype(default)
    missing, unexpected = model.model.load_state_dict(ours.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto the official model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.to(device=device, dtype=dtype).eval()


def right_padded(batch):
    """Our batches are left-padded; the official collator pads on the right (its generate reads the
    logits of the last real token, `append_last_valid_logits`). Same rows, padding moved to the end."""
    from molmo_core.generation import Batch

    ids = batch.input_ids
    n_real = (ids != -1).sum(-1)
    pad = ids.shape[1] - n_real  # (B,)
    cols = (torch.arange(ids.shape[1], device=ids.device)[None] + pad[:, None]) % ids.shape[1]
    new_ids = ids.gather(1, cols)
    idx = batch.image_input_idx
    if idx is not None:
        idx = torch.where(idx >= 0, idx - pad[:, None, None], idx)
    return Batch(new_ids, batch.images, batch.image_masks, idx)


@torch.inference_mode()
def greedy(model, batch, n_new: int, sync=lambda: None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Greedy decoding through the official forward and KV cache, as its generate() runs it.

    Returns (tokens (B, n_new), prefill logits (B, V), seconds to the first token, decode tokens/s)."""
    inner = model.model
    batch = right_padded(batch)
    ids = batch.input_ids
    B, L = ids.shape
    valid = ids != -1
    pos = (valid.int().cumsum(-1) - 1).clamp(min=0)
    mask = torch.cat([valid, valid.new_ones(B, n_new)], dim=1)
    sync()
    t0 = time.perf_counter()
    out = inner(ids, images=batch.images, image_masks=batch.image_masks, image_input_idx=batch.image_input_idx,
                attention_mask=mask[:, :L], position_ids=pos, use_cache=True, last_logits_only=True,
                append_last_valid_logits=valid.long().sum(-1) - 1)
    first_logits = out.logits[:, -1].float()
    tok = first_logits.argmax(-1)
    sync()
    ttft = time.perf_counter() - t0
    toks, past, next_pos = [tok], out.attn_key_values, pos[:, -1:] + 1
    t1 = time.perf_counter()
    for i in range(1, n_new):
        out = inner(tok[:, None], attention_mask=mask[:, :L + i], position_ids=next_pos, past_key_values=past,
                    use_cache=True, last_logits_only=True)
        tok = out.logits[:, -1].argmax(-1)
        past, next_pos = out.attn_key_values, next_pos + 1
        toks.append(tok)
    sync()
    rate = (n_new - 1) * B / max(time.perf_counter() - t1, 1e-9)
    return torch.stack(toks, 1), first_logits, ttft, rate


def fetch(dest: Path = FOLDER) -> None:
    from huggingface_hub import hf_hub_download

    dest.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copy(hf_hub_download(REPO, f), dest / f)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--fetch", action="store_true", help=f"download {', '.join(FILES)} of {REPO}")
    g.add_argument("--from", dest="src", type=Path, help="copy them from a checkpoint folder")
    a = p.parse_args()
    if a.fetch:
        fetch()
    else:
        FOLDER.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            shutil.copy(a.src / f, FOLDER / f)
    print("\n".join(f"{k}  sha256 {v}" for k, v in sha256s().items()))
