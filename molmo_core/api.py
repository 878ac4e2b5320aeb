"""`molmo_core.load(...)` -> a runner: the one object the app, the annotator, the evaluation and the trainer use.

`load` reads the checkpoint's family from its config.json (`molmo_core.molmo2.model_family`) and returns a
`MolmoRunner` (Molmo v1, our own implementation) or a `molmo_core.molmo2.Molmo2Runner` (Molmo2 through
transformers' native classes). Both offer the same methods (`generate`, `stream`, `generate_batch`, `process`,
`memory_bytes`, `close`) and say which they are in `runner.family` ("molmo" or "molmo2"); `family_of(source)`
tells the family without loading anything.
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .config import MolmoConfig
from .errors import CheckpointError
from .generation import GenerationOptions, can_compile, release_compiled
from .model import Molmo
from .preprocessing import MolmoProcessor, MolmoTokenizer, ProcessedInput
from .serving import BatchScheduler
from .weights import default_device, default_dtype, load_model, resolve_checkpoint

ProgressFn = Callable[[float, str], None]


class MolmoRunner:
    """A loaded checkpoint: model + processor + generation.

    Thread-safe: concurrent calls are grouped into batches by one worker thread (`serving.BatchScheduler`),
    so several users share each decode step instead of waiting in line."""

    family = "molmo"  # Molmo v1; a Molmo2Runner says "molmo2"

    def __init__(self, model: Molmo, processor: MolmoProcessor, name: str, path: Path | None = None,
                 quantize: str | None = None, max_batch: int = 8, compile: bool | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.path = path
        self.quantize = quantize
        if compile is None:  # compiled decode by default where it pays off: CUDA, dense models
            compile = model.device.type == "cuda" and can_compile(model)
        self.scheduler = BatchScheduler(model, self.tokenizer, max_batch=max_batch, compile=compile)

    @property
    def config(self) -> MolmoConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def process(self, image, prompt: str, history: Sequence[tuple[str, str]] = (),
                max_crops: int | None = None, template: str = "role") -> ProcessedInput:
        return self.processor(image, prompt, history=history, max_crops=max_crops, template=template)

    def stream(self, image, prompt: str, *, history: Sequence[tuple[str, str]] = (), max_new_tokens: int = 200,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
               max_crops: int | None = None, template: str = "role") -> Iterator[str]:
        """Text deltas of the answer. Raises MolmoInputError (before any generation) on bad input.

        template "role" wraps the prompt as " User: {prompt} Assistant:" (the released models);
        "none" sends it verbatim (the captioner format " long_caption 65:")."""
        inputs = self.process(image, prompt, history, max_crops, template)
        opts = GenerationOptions(max_new_tokens, temperature, top_p, seed, tuple(stop))
        yield from self.scheduler.submit(inputs, opts)

    def generate(self, image, prompt: str, **kwargs) -> str:
        return "".join(self.stream(image, prompt, **kwargs)).strip()

    def generate_batch(self, requests: Sequence[tuple[object, str]], *, max_new_tokens: int = 200,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       stop: Sequence[str] = ()) -> list[str]:
        inputs = [self.process(image, prompt) for image, prompt in requests]
        opts = GenerationOptions(max_new_tokens, temperature, top_p, seed, tuple(stop))
        streams = [self.scheduler.submit(x, opts) for x in inputs]
        # submit() enqueues at once, so all requests land in the same batch before any is read.
        return ["".join(s).strip() for s in streams]

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def close(self) -> None:
        self.scheduler.close()
        if self.model is not None:
            release_compiled(self.model)
        self.model = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def fits_one_gpu(config: MolmoConfig, dtype: torch.dtype, quantize: str | None, headroom: float = 0.85) -> bool:
    """Whether the weights fit in GPU 0's free memory (with room for activations and the KV cache).
    Splitting layers over GPUs only pays when they do not: the GPUs then work one after another."""
    from .weights import build_meta_model

    n = sum(p.numel() for p in build_meta_model(config).parameters())
    per_param = {None: torch.finfo(dtype).bits / 8, "8bit": 1.1, "4bit": 0.6}[quantize]
    free, _ = torch.cuda.mem_get_info(0)
    return n * per_param < headroom * free


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_MOLMO2_NAME = re.compile(r"molmo-?2", re.IGNORECASE)


def family_of(source: str | Path) -> str:
    """"molmo" (Molmo v1) or "molmo2" for a checkpoint folder or hub id, without loading it.

    A folder (or a cached hub id) is what its config.json says (`molmo_core.molmo2.model_family`). A hub id
    that is not cached yet is judged by its name (`allenai/Molmo2-4B` -> "molmo2"). Anything undecidable (no
    config.json, a config of another model, a source that does not exist) is "molmo": the v1 loader then
    says what is wrong with it, as it always has.
    """
    from .molmo2.load import model_family

    path = Path(source).expanduser()
    text = str(source)
    if path.is_dir() or path.is_file() or _HUB_ID.fullmatch(text):
        try:
            return model_family(path if path.exists() else text)
        except CheckpointError:
            pass
    if not path.exists() and _HUB_ID.fullmatch(text) and _MOLMO2_NAME.search(text.split("/")[-1]):
        return "molmo2"
    return "molmo"


def load(source: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         quantize: str | None = None, max_crops: int | None = None, progress: ProgressFn | None = None):
    """Load a Molmo v1 or Molmo2 checkpoint from a local folder or a hub id; the family comes from its
    config.json (:func:`family_of`).

    Returns:
        a `MolmoRunner` (Molmo v1) or a `molmo_core.molmo2.Molmo2Runner` (Molmo2); `runner.family` says which.

    Raises:
        CheckpointError: not found, offline without a local copy, incomplete, or keys that do not match.
    """
    if quantize not in (None, "8bit", "4bit"):
        raise CheckpointError(f"quantize must be None, '8bit' or '4bit'; got {quantize!r}.")
    if family_of(source) == "molmo2":
        from .molmo2.load import load_molmo2

        return load_molmo2(source, quantize=quantize, device=device, dtype=dtype, max_crops=max_crops,
                           progress=progress)
    return load_molmo(source, device=device, dtype=dtype, quantize=quantize, max_crops=max_crops, progress=progress)


def load_molmo(source: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               quantize: str | None = None, max_crops: int | None = None,
               progress: ProgressFn | None = None) -> MolmoRunner:
    """Load an official Molmo v1 checkpoint from a local folder or a hub id.

    Raises:
        CheckpointError: not found, offline without a local copy, incomplete, or keys that do not match.
    """
    if quantize not in (None, "8bit", "4bit"):
        raise CheckpointError(f"quantize must be None, '8bit' or '4bit'; got {quantize!r}.")
    path = resolve_checkpoint(source, progress)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    devices = None
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1 \
            and not fits_one_gpu(MolmoConfig.from_pretrained_dir(path), dtype, quantize):
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]  # e.g. Molmo-72B
    try:
        tokenizer = MolmoTokenizer.from_dir(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Could not load the tokenizer in {path}: {e}") from e
    model = load_model(path, device=device, dtype=dtype, quantize=quantize, devices=devices, progress=progress)
    cfg = model.config
    if max_crops is None:  # a model fine-tuned with other max_crops records it next to its weights
        tuned = path / "finetune.json"
        max_crops = int(json.loads(tuned.read_text()).get("max_crops", 12)) if tuned.is_file() else cfg.max_crops
    processor = MolmoProcessor(tokenizer, max_crops=max_crops, resize=cfg.resize,
                               crop_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size,
                               max_length=cfg.text.max_sequence_length)
    if progress:
        progress(1.0, "Ready")
    return MolmoRunner(model, processor, name=str(source), path=path, quantize=quantize)
