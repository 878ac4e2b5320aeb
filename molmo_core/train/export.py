"""Write a trained model as an official Molmo checkpoint folder: `molmo_core.load(folder)` and
`python launch.py --model folder` load it like the downloaded originals.

The folder gets the base checkpoint's config, tokenizer, preprocessor and remote-code files copied
unchanged (merged LoRA models without the remote-code `.py` files do not load in transformers, see
2U1/Molmo-Finetune#12), plus the weights under the official keys (`model.` + our names; MolmoE's
`lm_head.weight` stays top-level) in `model.safetensors`, or size-limited shards with
`model.safetensors.index.json` for large models. Everything is written into a temporary folder first
and renamed into place, so an interrupted export never leaves a half-written `final/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..weights import official_key, resolve_checkpoint

SHARD_BYTES = 5 * 1024**3
COPY_SUFFIXES = (".json", ".txt", ".model", ".py", ".md", ".jinja")
SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


def copy_support_files(base: Path, out: Path) -> list[str]:
    """Copy config / tokenizer / processor / remote-code files (not weights) from the base checkpoint."""
    copied = []
    for f in sorted(base.iterdir()):
        if f.is_file() and f.suffix in COPY_SUFFIXES and f.name not in SKIP_FILES:
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return copied


def save_weights(state: dict[str, torch.Tensor], out: Path, shard_bytes: int = SHARD_BYTES) -> list[Path]:
    from safetensors.torch import save_file

    sizes = {k: t.numel() * t.element_size() for k, t in state.items()}
    total = sum(sizes.values())
    if total <= shard_bytes:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return [out / "model.safetensors"]
    shards: list[list[str]] = [[]]
    acc = 0
    for k in state:
        if acc and acc + sizes[k] > shard_bytes:
            shards.append([])
            acc = 0
        shards[-1].append(k)
        acc += sizes[k]
    files, weight_map = [], {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        files.append(out / name)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def written_atomically(out: Path) -> Iterator[Path]:
    """A temporary sibling folder to fill; when the block ends without an error it is fsynced and renamed to
    `out` (a previous `out` is replaced only then); otherwise it is removed and `out` is left untouched."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_model(state: dict[str, torch.Tensor], base: str | Path, out: str | Path,
                 dtype: torch.dtype = torch.float32, extra: dict | None = None) -> Path:
    """Write a plain, unquantized Molmo's full state dict (our names) to `out` in the official format, with the
    base checkpoint's support files; returns `out`.

    Raises:
        OSError: the disk is full or not writable (the previous `out`, if any, is left untouched).
    """
    base_path = resolve_checkpoint(str(base))
    out = Path(out)
    with written_atomically(out) as tmp:
        copy_support_files(base_path, tmp)
        save_weights({official_key(k): v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                      for k, v in state.items()}, tmp)
        if extra:
            (tmp / "finetune.json").write_text(json.dumps(extra, indent=2, default=str))
    return out


def merged_from_adapter(base: str | Path, adapter: str | Path, dtype: torch.dtype = torch.float32,
                        device: str = "cpu") -> nn.Module:
    """Base checkpoint (unquantized, `dtype`) + adapter -> a plain Molmo with the LoRA deltas merged in."""
    from ..weights import load_model
    from .lora import load_adapter, merge_lora_

    model = load_model(resolve_checkpoint(str(base)), device=device, dtype=dtype)
    load_adapter(model, adapter)
    return merge_lora_(model)
