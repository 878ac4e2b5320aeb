"""Find and load a Molmo2 checkpoint (local folder or hub id) through transformers' native classes.

`load_molmo2(source)` -> `Molmo2Runner`: `Molmo2ForConditionalGeneration.from_pretrained` (no remote code),
bf16 on a GPU and fp32 on the CPU, optionally 8-bit or 4-bit through bitsandbytes with the vision tower, the
adapter and the LM head kept unquantized; our own preprocessing (`processing.py`), so no torchvision.
`model_family(path)` tells Molmo v1 ("molmo", our own implementation, `molmo_core.load`) from Molmo2.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import CheckpointError, download_hint

ProgressFn = Callable[[float, str], None]
# What a Molmo2 snapshot needs: configs, weights, tokenizer files and the chat template.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.jinja"]
# Full module prefixes (a bare "vision_tower" does not match in transformers 5.23; molmo2.md section 1.10). The
# vision tower's 588-input patch embedding cannot be packed for 4-bit on the CPU, and quantizing the vision
# side or the head costs accuracy for little memory.
SKIP_QUANTIZE = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
QUANTIZE = (None, "8bit", "4bit")


# ----------------------------------------------------------------------------------------- family
def read_config(path: str | os.PathLike) -> dict:
    """config.json of a folder (or the file itself) as a dict.

    Raises:
        CheckpointError: no config.json, or it is not valid JSON.
    """
    path = Path(path)
    f = path if path.is_file() else path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path} has no config.json; expected a Molmo or Molmo2 checkpoint folder.")
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); download the checkpoint again.") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f} does not hold a JSON object; download the checkpoint again.")
    return cfg


def family_of_config(cfg: dict) -> str:
    """"molmo2" or "molmo" from a parsed config.json.

    Molmo2 configs (hub and transformers-native alike) say `"model_type": "molmo2"` and
    `Molmo2ForConditionalGeneration`; Molmo v1 hub configs say `"model_type": "molmo"` (MolmoE-1B:
    `"molmoe"`) with `MolmoForCausalLM` / `OLMoForCausalLM` / `MolmoEForCausalLM`.

    Raises:
        CheckpointError: a config of some other model.
    """
    model_type = str(cfg.get("model_type", "")).lower()
    archs = " ".join(str(a) for a in cfg.get("architectures") or [])
    if model_type.startswith("molmo2") or "Molmo2" in archs:
        return "molmo2"
    if model_type in ("molmo", "molmoe") or re.search(r"\b(Molmo|MolmoE|OLMo)ForCausalLM\b", archs):
        return "molmo"
    raise CheckpointError(f"config.json names model_type {cfg.get('model_type')!r} and architectures "
                          f"{cfg.get('architectures')!r}: neither a Molmo v1 nor a Molmo2 checkpoint.")


def model_family(path: str | os.PathLike) -> str:
    """"molmo" (Molmo v1) or "molmo2", read from the checkpoint's config.json.

    `path` is a folder (or its config.json); a hub id is looked up in the local hub cache only.

    Raises:
        CheckpointError: no config.json, unreadable, or a config of another model.
    """
    p = Path(path).expanduser()
    base = adapter_base(p)
    if base is not None:  # a LoRA adapter folder (the trainer's OUT/adapter): the family of its base
        return model_family(base)
    if not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            p = Path(hf_hub_download(str(path), "config.json", local_files_only=True))
        except LocalEntryNotFoundError as e:
            raise CheckpointError(f"{path} is not in the local hub cache, so its family is unknown. "
                                  + _hint(str(path))) from e
    return family_of_config(read_config(p))


def adapter_base(path: str | os.PathLike) -> str | None:
    """The base checkpoint of a LoRA adapter folder (peft's adapter_config.json, no config.json), else None."""
    p = Path(path).expanduser()
    if not (p / "adapter_config.json").is_file() or (p / "config.json").is_file():
        return None
    try:
        base = json.loads((p / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p / 'adapter_config.json'} cannot be read ({e}).") from e
    if not base:
        raise CheckpointError(f"{p / 'adapter_config.json'} names no base_model_name_or_path; load the merged "
                              "model (the trainer's OUT/final) instead.")
    return str(base)


def _load_with_adapter(adapter: Path, base: str, quantize, device, dtype, max_crops, progress):
    """The base loaded as usual, the adapter applied with peft; merged into the weights unless the base is
    quantized (a QLoRA adapter then runs on the 4-bit base it was trained with: the exact trained model)."""
    from peft import PeftModel

    runner = load_molmo2(base, quantize, device, dtype=dtype, max_crops=max_crops, progress=progress)
    if progress:
        progress(0.95, f"Applying the adapter {adapter.name}...")
    try:
        model = PeftModel.from_pretrained(runner.model, str(adapter))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        runner.close()
        raise CheckpointError(f"The adapter in {adapter} does not fit its base {base}: {type(e).__name__}: {e}") from e
    runner.model = (model if quantize else model.merge_and_unload()).eval()
    runner.name, runner.path = f"{adapter.name} (LoRA on {Path(base).name})", adapter
    return runner


# ----------------------------------------------------------------------------------------- locating
def _hint(repo_id: str) -> str:
    folder = f"./checkpoints/{repo_id.split('/')[-1]}"
    return download_hint(repo_id, folder, f"load that folder (`--model {folder}` on the command line)")


def check_molmo2_dir(path: Path) -> None:
    """A usable Molmo2 folder: config.json, weights, tokenizer.

    Raises:
        CheckpointError: naming what the folder has and what it lacks.
    """
    from ..weights import weight_files

    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    found = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "") or "nothing"
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json (found: {found}). Expected a Molmo2 checkpoint folder: "
                              "config.json, model*.safetensors, tokenizer.json and the processor configs.")
    try:
        weight_files(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (found: {found})") from None
    if not ((path / "tokenizer.json").is_file() or
            ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())):
        raise CheckpointError(f"{path} has no tokenizer (tokenizer.json, or vocab.json + merges.txt; found: "
                              f"{found}); copy the checkpoint's tokenizer files into the folder.")


def resolve_molmo2(source: str | os.PathLike, progress: ProgressFn | None = None) -> Path:
    """A local folder as is, or a hub id: its cached snapshot when complete, else downloaded (with progress)
    unless the hub is offline (`HF_HUB_OFFLINE`), in which case the cached copy is all there is.

    Raises:
        CheckpointError: a folder that lacks files; a hub id that is not cached (or only in part) while the hub
            is offline, or that fails to download; or a source that is neither a folder nor a hub id.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        check_molmo2_dir(path)
        return path
    text = str(source)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise CheckpointError(f"{text!r} is neither an existing folder nor a hub id like 'allenai/Molmo2-4B'.")
    from huggingface_hub import is_offline_mode, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    from ..weights import forwarding_tqdm

    incomplete = None
    try:
        local = Path(snapshot_download(text, local_files_only=True, allow_patterns=ALLOW_PATTERNS))
        check_molmo2_dir(local)
        return local
    except IncompleteSnapshotError as e:
        incomplete = str(e)
    except CheckpointError as e:
        incomplete = f"the cached copy is incomplete: {e}"
    except LocalEntryNotFoundError:
        pass
    if is_offline_mode():
        offline = "the hub is offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)"
        if incomplete:
            raise CheckpointError(f"{text} is only partly downloaded: {incomplete}\nThe missing files cannot be "
                                  f"fetched here: {offline}. " + _hint(text))
        raise CheckpointError(f"The checkpoint {text} is not on this machine and {offline}. " + _hint(text))
    try:
        if progress:
            progress(0.0, f"Downloading {text} from the Hugging Face hub...")
        local = Path(snapshot_download(text, allow_patterns=ALLOW_PATTERNS,
                                       tqdm_class=forwarding_tqdm(progress, text) if progress else None))
    except Exception as e:  # noqa: BLE001 -- any hub failure becomes one clear message
        before = f" (the cached copy was incomplete: {incomplete})" if incomplete else ""
        raise CheckpointError(f"Could not download {text}{before}: {type(e).__name__}: {e}\n" + _hint(text)) from e
    check_molmo2_dir(local)
    return local


# ----------------------------------------------------------------------------------------- loading
def quantization_config(quantize: str | None, dtype: torch.dtype):
    """BitsAndBytesConfig for "8bit" / "4bit" (nf4, compute in `dtype`), vision tower, adapter and LM head
    kept in `dtype`; None for no quantization."""
    if quantize is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIP_QUANTIZE))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=False, llm_int8_skip_modules=list(SKIP_QUANTIZE))


def load_molmo2(source: str | os.PathLike, quantize: str | None = None, device: str | torch.device | None = None,
                *, dtype: torch.dtype | None = None, max_crops: int | None = None,
                progress: ProgressFn | None = None):
    """Load a Molmo2 checkpoint from a local folder or a hub id.

    Args:
        source: a folder, or a hub id such as "allenai/Molmo2-4B" (cached copy only when HF_HUB_OFFLINE is set).
        quantize: None, "8bit" or "4bit" (bitsandbytes; the vision tower and adapter stay unquantized).
        device: default CUDA when available, else the CPU.
        dtype: default bf16 on a GPU, fp32 on the CPU.
        max_crops: the default high-res crop budget (the checkpoint's processor config otherwise).
        progress: `progress(fraction, message)` for a UI.

    Returns:
        a `Molmo2Runner`, with the same methods as `molmo_core.MolmoRunner`.

    Raises:
        CheckpointError: not found, offline without a local copy, incomplete, a Molmo v1 checkpoint, or weights
            transformers cannot load.
    """
    from ..weights import default_device, default_dtype
    from .processing import Molmo2Preprocessor
    from .runner import Molmo2Runner

    if quantize not in QUANTIZE:
        raise CheckpointError(f"quantize must be None, '8bit' or '4bit'; got {quantize!r}.")
    base = adapter_base(source)
    if base is not None:
        return _load_with_adapter(Path(source), base, quantize, device, dtype, max_crops, progress)
    path = resolve_molmo2(source, progress)
    family = family_of_config(read_config(path))
    if family != "molmo2":
        raise CheckpointError(f"{source} is a Molmo v1 checkpoint (config.json model_type "
                              f"{read_config(path).get('model_type')!r}); load it with molmo_core.load.")
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or default_dtype(device)
    if progress:
        progress(0.05, "Reading the tokenizer and processor settings...")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"Could not load the tokenizer in {path}: {e}") from e
    if progress:
        progress(0.1, f"Loading the weights ({'fp32' if dtype == torch.float32 else str(dtype)[6:]}"
                      f"{', ' + quantize if quantize else ''}) on {device}...")
    try:
        from transformers import Molmo2ForConditionalGeneration

        model = Molmo2ForConditionalGeneration.from_pretrained(
            str(path), dtype=dtype, device_map={"": str(device)}, local_files_only=True,
            quantization_config=quantization_config(quantize, dtype))
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as e:
        raise CheckpointError(f"Could not load the Molmo2 weights in {path}: {type(e).__name__}: {e}") from e
    model.eval()
    text_cfg = model.config.text_config
    try:
        processor = Molmo2Preprocessor.from_pretrained(path, tokenizer, max_length=text_cfg.max_position_embeddings)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Could not read the processor settings in {path}: {e}") from e
    if max_crops is not None:
        processor.image = replace(processor.image, max_crops=int(max_crops))
    if progress:
        progress(1.0, "Ready")
    return Molmo2Runner(model, processor, name=str(source), path=path, quantize=quantize)
