"""Find a checkpoint (local folder or hub id), map the official keys, stream tensors to device and dtype.

Loading never materialises the float32 checkpoint in host memory: the model is built on the `meta`
device, and every tensor is allocated in the target dtype on its device and filled from its file in
16 MB chunks (plain reads for safetensors; pytorch_model.bin is memory-mapped). Peak host memory is about
the target-dtype model (when loading to CPU) plus one chunk.

Key mapping: the module tree mirrors the official names, so the table is nearly the identity.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .config import MolmoConfig
from .errors import CheckpointError, download_hint
from .model import Molmo

# fmt: off
# official key (regex)                        our parameter name (None = drop)
KEY_MAP: list[tuple[str, str | None]] = [
    (r"^model\.(transformer\..*)$",             r"\1"),
    (r"^model\.(vision_backbone\..*)$",         r"\1"),
    (r"^(lm_head\.weight)$",                    r"\1"),   # MolmoE: top-level LM head
    (r"^model\.lm_head\.weight$",               "lm_head.weight"),
]
# fmt: on

WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.txt", "*.model")
ProgressFn = Callable[[float, str], None]


def map_key(key: str) -> str | None:
    for pattern, repl in KEY_MAP:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key) if repl is not None else None
    return key  # unknown prefix: reported as unexpected by the caller


def official_key(name: str) -> str:
    """Our parameter name -> the key the official checkpoints use (the inverse of `map_key`; the LM head is
    written top-level, as MolmoE stores it, which both loaders accept)."""
    return name if name.startswith("lm_head") else "model." + name


# ----------------------------------------------------------------------------------------- locating
def resolve_checkpoint(source: str | os.PathLike, progress: ProgressFn | None = None) -> Path:
    """A local folder as is, or a hub id: its cached snapshot when complete, else downloaded (with progress).

    Offline means the hub library's own reading of `HF_HUB_OFFLINE` (`huggingface_hub.is_offline_mode`).

    Raises:
        CheckpointError: the folder lacks files; the hub id is not cached and the hub is offline or the
            download fails; or the cached copy is incomplete (naming the missing files) and cannot be completed.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        check_checkpoint_dir(path)
        return path
    text = str(source)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise CheckpointError(f"{text!r} is neither an existing folder nor a hub id like 'allenai/Molmo-7B-D-0924'.")
    from huggingface_hub import is_offline_mode, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    incomplete = None  # what is wrong with the cached copy, if there is one
    try:
        local = Path(snapshot_download(text, local_files_only=True, allow_patterns=list(WEIGHT_PATTERNS)))
        check_checkpoint_dir(local)
        return local
    except IncompleteSnapshotError as e:  # the hub's cached file listing names the missing files
        incomplete = str(e)
    except CheckpointError as e:  # our own check: a shard named in the index, or all weights, missing
        incomplete = f"the cached copy in {local} is incomplete: {e}"
    except LocalEntryNotFoundError:
        pass  # not cached at all
    if is_offline_mode():
        offline = "the hub is offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)"
        if incomplete:
            raise CheckpointError(f"{text} is only partly downloaded: {incomplete}\nThe missing files cannot be "
                                  f"fetched here: {offline}. " + _download_hint(text))
        raise CheckpointError(f"The checkpoint {text} is not on this machine and {offline}. " + _download_hint(text))
    try:
        if progress:
            progress(0.0, f"Downloading {text} from the Hugging Face hub...")
        local = snapshot_download(text, allow_patterns=list(WEIGHT_PATTERNS),
                                  tqdm_class=forwarding_tqdm(progress, text) if progress else None)
    except Exception as e:
        before = f" (the cached copy was incomplete: {incomplete})" if incomplete else ""
        raise CheckpointError(f"Could not download {text}{before}: {type(e).__name__}: {e}\n"
                              + _download_hint(text)) from e
    check_checkpoint_dir(Path(local))
    return Path(local)


def forwarding_tqdm(progress: ProgressFn, name: str):
    """A tqdm class that also reports download progress to `progress(fraction, message)` (the UI bar)."""
    from tqdm.auto import tqdm

    class ForwardingTqdm(tqdm):
        def update(self, n=1):
            out = super().update(n)
            if self.total:
                progress(min(self.n / self.total, 1.0), f"Downloading {name}: {self.desc or 'files'} "
                                                        f"{self.n:,.0f}/{self.total:,.0f}")
            return out

    return ForwardingTqdm


def _download_hint(repo_id: str) -> str:
    folder = f"./checkpoints/{repo_id.split('/')[-1]}"
    return download_hint(repo_id, folder, f"load that folder (`--model {folder}` on the command line)")


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: sharded or single safetensors, else pytorch_model*.bin."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path} is missing shard(s) {', '.join(missing)} listed in "
                                  "model.safetensors.index.json; download them again.")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"No weights in {path}: expected model.safetensors (or shards with "
                              "model.safetensors.index.json) or pytorch_model.bin.")
    return files


def check_checkpoint_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: expected an official Molmo checkpoint folder "
                              "(config.json, tokenizer files, model*.safetensors or pytorch_model.bin).")
    weight_files(path)


# ----------------------------------------------------------------------------------------- reading
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


CHUNK_BYTES = 16 * 1024 * 1024
Reader = Callable[[torch.dtype, "torch.device | str"], torch.Tensor]


def _convert_chunked(src_rows: Callable[[int, int], torch.Tensor], shape: list[int], src_dtype: torch.dtype,
                     dtype: torch.dtype, device) -> torch.Tensor:
    """Fill a new (shape, dtype, device) tensor from row ranges of the source, CHUNK_BYTES at a time, so the
    host never holds a whole float32 tensor next to its converted copy."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    rows = shape[0] if shape else 1
    row_bytes = max(1, out.numel() // rows) * torch.empty((), dtype=src_dtype).element_size()
    step = max(1, CHUNK_BYTES // row_bytes)
    flat = out.view(rows, -1)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        flat[r0:r1].copy_(src_rows(r0, r1).reshape(r1 - r0, -1))
    return out


def iter_safetensors(file: Path) -> Iterator[tuple[str, tuple[int, ...], Reader]]:
    """Yield (key, shape, read) triples; `read(dtype, device)` loads that one tensor with plain file reads."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    header.pop("__metadata__", None)
    for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, end = info["data_offsets"]
        src_dtype, shape = _ST_DTYPES[info["dtype"]], list(info["shape"])

        def read(dtype, device, start=start, end=end, src_dtype=src_dtype, shape=shape) -> torch.Tensor:
            dtype = dtype if src_dtype.is_floating_point else src_dtype
            rows = shape[0] if shape else 1
            row_bytes = (end - start) // rows if rows else 0
            with open(file, "rb") as f:
                def src_rows(r0: int, r1: int) -> torch.Tensor:
                    f.seek(base + start + r0 * row_bytes)
                    return torch.frombuffer(bytearray(f.read((r1 - r0) * row_bytes)), dtype=src_dtype)

                return _convert_chunked(src_rows, shape, src_dtype, dtype, device)

        yield key, tuple(shape), read


def load_torch_file(file: str | os.PathLike, map_location="cpu", numpy_arrays: bool = False, **kwargs):
    """``torch.load`` that never runs code from the file: ``weights_only=True`` (tensors, numbers, strings and
    plain containers only). ``numpy_arrays`` also admits plain numpy arrays (numpy's RNG state in ``rng.pt``).

    Raises:
        CheckpointError: the file is unreadable, or it holds other Python objects (a pickle that could run
            code when loaded); the message names the file and the object refused.
    """
    import pickle

    allowed = []
    if numpy_arrays:
        import numpy as np

        core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
        allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), core.multiarray._reconstruct]  # MT19937 keys
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(file, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)|but got <class '([^']+)'>", str(e))
        detail = f"found {found.group(1) or found.group(2)}" if found else str(e).splitlines()[0][:200]
        raise CheckpointError(
            f"Refused to load {file}: it holds Python objects other than tensors and plain values "
            f"({detail}); loading it could run code. Expected a file written by "
            "torch.save of tensors / state dicts (as Molmo Studio writes them). Use a checkpoint from a source "
            "you trust, re-saved as safetensors or as a plain state dict.") from None
    except Exception as e:
        raise CheckpointError(f"Could not read {file}: {type(e).__name__}: {e}") from e


def iter_torch_bin(file: Path) -> Iterator[tuple[str, tuple[int, ...], Reader]]:
    """pytorch_model.bin (MolmoE): memory-mapped, converted chunk by chunk like the safetensors path."""
    sd = load_torch_file(file, map_location="cpu", mmap=True)
    for key in list(sd):
        t = sd[key]

        def read(dtype, device, key=key) -> torch.Tensor:
            src = sd.pop(key)
            dtype = dtype if src.is_floating_point() else src.dtype
            flat = src.reshape(src.shape[0] if src.ndim else 1, -1)
            return _convert_chunked(lambda r0, r1: flat[r0:r1], list(src.shape), src.dtype, dtype, device)

        yield key, tuple(t.shape), read


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, tuple[int, ...], Reader]]:
    for file in files:
        yield from (iter_safetensors(file) if file.suffix == ".safetensors" else iter_torch_bin(file))


# ----------------------------------------------------------------------------------------- loading
def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def load_state_streaming(
    model: nn.Module,
    files: list[Path],
    *,
    dtype: torch.dtype,
    device_for: Callable[[str], torch.device | str],
    quantizer=None,
    progress: ProgressFn | None = None,
) -> None:
    """Assign every official tensor to `model` (built on meta), converting one tensor at a time.

    Raises:
        CheckpointError: naming every missing, unexpected or mis-shaped key.
    """
    expected = {n: p for n, p in model.named_parameters()}
    entries = list(iter_checkpoint(files))
    seen: set[str] = set()
    unexpected, bad_shape = [], []
    for i, (key, shape, read) in enumerate(entries):
        name = map_key(key)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if shape != tuple(expected[name].shape):
            bad_shape.append(f"{key}: checkpoint {shape}, model {tuple(expected[name].shape)}")
            continue
        if quantizer is not None and quantizer.wants(name):
            quantizer(model, name, read(dtype, "cpu"))
        else:
            _set_param(model, name, read(dtype, device_for(name)))
        seen.add(name)
        if progress and (i % 16 == 0 or i == len(entries) - 1):
            progress((i + 1) / len(entries), f"Loading weights {i + 1}/{len(entries)}")
    missing = sorted(set(expected) - seen)
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join("model." + m for m in missing[:20]))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]))
        if bad_shape:
            parts.append("shape mismatches: " + "; ".join(bad_shape[:10]))
        raise CheckpointError("The checkpoint does not match the model built from its config.json: "
                              + " | ".join(parts) + ". Is the folder complete and config.json the original one?")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (never fp16: the ViT overflows), fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_meta_model(config: MolmoConfig) -> Molmo:
    with torch.device("meta"):
        return Molmo(config).eval()


def layer_placement(config: MolmoConfig, devices: list[torch.device]) -> Callable[[str], torch.device]:
    """Split decoder blocks evenly across devices (Molmo-72B on several GPUs). Vision + embeddings live
    on the first device, ln_f and the LM head on the last."""
    n = config.text.n_layers
    per = -(-n // len(devices))

    def device_for(name: str) -> torch.device:
        m = re.match(r"transformer\.blocks\.(\d+)\.", name)
        if m:
            return devices[int(m.group(1)) // per]
        if name.startswith(("transformer.ln_f", "transformer.ff_out", "lm_head")):
            return devices[-1]
        return devices[0]

    return device_for


def load_model(path: Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
               quantize: str | None = None, devices: list[torch.device] | None = None,
               progress: ProgressFn | None = None) -> Molmo:
    """Build the model from `path/config.json` and stream the weights in."""
    config = MolmoConfig.from_pretrained_dir(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    model = build_meta_model(config)
    if devices and len(devices) > 1:
        device_for = layer_placement(config, devices)
    else:
        def device_for(name: str) -> torch.device:
            return device
    quantizer = None
    if quantize:
        from .quantize import make_quantizer

        quantizer = make_quantizer(quantize, dtype, device_for)
        quantizer.prepare(model)
    load_state_streaming(model, weight_files(path), dtype=dtype, device_for=device_for, quantizer=quantizer,
                         progress=progress)
    model.place_blocks()
    return model.eval()
