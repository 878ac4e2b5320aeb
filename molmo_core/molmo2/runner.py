"""`Molmo2Runner`: a loaded Molmo2 checkpoint behind the same methods as `molmo_core.api.MolmoRunner`.

The app, the annotator, the eval runner and the trainer's answer drafts call a runner through these methods
(see `molmo_core/api.py`); a Molmo2Runner accepts the same calls and arguments:

    runner.generate(image, prompt, max_new_tokens=..., history=..., temperature=..., top_p=..., seed=...,
                    stop=..., max_crops=..., template="role" | "none") -> str
    runner.stream(image, prompt, **same) -> Iterator[str]          # text deltas
    runner.generate_batch([(image, prompt), ...], max_new_tokens=..., ...) -> list[str]
    runner.process(image, prompt, history=(), max_crops=None, template="role") -> Molmo2Inputs
    runner.name, .path, .quantize, .device, .dtype, .config, .model, .processor, .tokenizer,
    runner.memory_bytes(), runner.close(); runner.family == "molmo2"

What differs from Molmo v1, by design of the model:
  * `image` may be None (text only), one image, a list of images (multi-image prompts:
    "Image 1<|image|>Image 2<|image|>..."), or a video: `molmo_core.molmo2.Video(frames, fps)` with uint8
    frames [T, H, W, 3] (also accepted: a {"frames", "fps"} dict). Images and a video do not mix.
  * Prompts go through the checkpoint's chat template (`<|im_start|>user ... <|im_start|>assistant`);
    template="none" sends the image placeholders and the prompt verbatim, without turn markers (Molmo2 has no
    captioner-style raw format; this exists so that callers written for v1 keep working).
  * Points come back in Molmo2's format (`<points coords="1 1 073 160">`, 0-1000 scale); parsing is
    `molmo_core.outputs`' job.
  * Decoding is transformers' `generate` (greedy unless temperature > 0), one request at a time per runner
    (a lock); `generate_batch` pads a list of image/text requests into one `generate` call (left padding),
    and runs video requests on their own. The v1 runner's cross-user batching scheduler is not used here.
"""

from __future__ import annotations

import gc
import queue
import threading
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..errors import ModelUnloadedError
from ..generation import TextStreamer
from .processing import Molmo2Inputs, Molmo2Preprocessor, Video, batch_images

_END = object()


class _Decoder:
    """The `decode` that `molmo_core.generation.TextStreamer` expects, over a transformers tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _streamer_class():
    from transformers.generation.streamers import BaseStreamer

    class QueueStreamer(BaseStreamer):
        """Receives generated ids from `generate` (the prompt first, skipped) and queues text deltas."""

        def __init__(self, text: TextStreamer, out: queue.Queue):
            self.text, self.out, self.prompt_seen = text, out, False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for tok in value.reshape(-1).tolist():
                if self.text.stopped:
                    return
                delta = self.text.push(int(tok))
                if delta:
                    self.out.put(delta)

        def end(self) -> None:
            delta = self.text.flush()
            if delta:
                self.out.put(delta)

    return QueueStreamer


def _stopping(check):
    """A transformers StoppingCriteria from `check(input_ids) -> bool tensor [B]`."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Criteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return check(input_ids)

    return StoppingCriteriaList([Criteria()])


class Molmo2Runner:
    """A loaded Molmo2 checkpoint: transformers' model + our preprocessing + transformers' `generate`.

    Thread-safe: requests are served one `generate` call at a time (a lock)."""

    family = "molmo2"

    def __init__(self, model, processor: Molmo2Preprocessor, name: str, path: Path | None = None,
                 quantize: str | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.path = path
        self.quantize = quantize
        self._lock = threading.Lock()
        self._decoder = _Decoder(self.tokenizer)
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids)))

    # ------------------------------------------------------------------ properties
    @property
    def config(self):
        return self._model().config

    @property
    def device(self) -> torch.device:
        return self._model().device

    @property
    def dtype(self) -> torch.dtype:
        return self._model().dtype

    @property
    def max_crops(self) -> int:
        return self.processor.image.max_crops

    def _model(self):
        if self.model is None:
            raise ModelUnloadedError(f"The model {self.name} was unloaded.")
        return self.model

    # ------------------------------------------------------------------ inputs
    def process(self, image, prompt: str, history: Sequence[tuple[str, str]] = (), max_crops: int | None = None,
                template: str = "role") -> Molmo2Inputs:
        """Model inputs for `image` (None, an image, a list of images, or a `Video`) and `prompt`.

        Raises:
            MolmoInputError: bad image/video, empty prompt, too long an input.
        """
        if isinstance(image, (Video, dict)):
            return self.processor(prompt, video=image, history=history, template=template)
        return self.processor(prompt, images=image, history=history, max_crops=max_crops, template=template)

    def _on_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self._model().device
        return {k: v.to(dev) for k, v in tensors.items()}

    def _sampling(self, temperature: float, top_p: float) -> dict:
        if temperature and temperature > 0:
            return dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None)

    # ------------------------------------------------------------------ generation
    def stream(self, image, prompt: str, *, history: Sequence[tuple[str, str]] = (), max_new_tokens: int = 200,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
               max_crops: int | None = None, template: str = "role") -> Iterator[str]:
        """Text deltas of the answer. Raises MolmoInputError (before any generation) on bad input; closing the
        iterator early stops the generation."""
        inputs = self.process(image, prompt, history, max_crops, template)
        out: queue.Queue = queue.Queue()
        text = TextStreamer(self._decoder, stop)
        cancel = threading.Event()
        streamer = _streamer_class()(text, out)

        def done(ids: torch.Tensor) -> torch.Tensor:
            return torch.full((ids.shape[0],), cancel.is_set() or text.stopped, dtype=torch.bool, device=ids.device)

        def work() -> None:
            try:
                with self._lock:
                    model = self._model()
                    if seed is not None:
                        torch.manual_seed(seed)
                    with torch.inference_mode():
                        model.generate(**self._on_device(inputs.tensors), max_new_tokens=int(max_new_tokens),
                                       streamer=streamer, stopping_criteria=_stopping(done),
                                       pad_token_id=self.pad_id, **self._sampling(temperature, top_p))
            except BaseException as e:  # noqa: BLE001 -- handed to the consumer
                out.put(e)
            finally:
                out.put(_END)

        worker = threading.Thread(target=work, name="molmo2-generate", daemon=True)
        worker.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            worker.join()

    def generate(self, image, prompt: str, **kwargs) -> str:
        return "".join(self.stream(image, prompt, **kwargs)).strip()

    def generate_ids(self, inputs: Molmo2Inputs, max_new_tokens: int = 200) -> list[int]:
        """Greedy new token ids for prepared inputs (up to and without the end token)."""
        return self._generate_padded([inputs], max_new_tokens, 0.0, 1.0, None, ())[0]

    def generate_batch(self, requests: Sequence[tuple[object, str]], *, max_new_tokens: int = 200,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       stop: Sequence[str] = ()) -> list[str]:
        """Answers to (image, prompt) requests: image/text requests padded into one `generate` call, video
        requests each on their own. Raises MolmoInputError for the first bad request, before generating."""
        inputs = [self.process(image, prompt) for image, prompt in requests]
        answers: list[str | None] = [None] * len(inputs)
        plain = [i for i, x in enumerate(inputs) if "pixel_values_videos" not in x.tensors]
        groups = ([plain] if plain else []) + [[i] for i in range(len(inputs)) if i not in plain]
        for group in groups:
            ids = self._generate_padded([inputs[i] for i in group], max_new_tokens, temperature, top_p, seed, stop)
            for i, row in zip(group, ids):
                answers[i] = self._finish(row, stop)
        return [a if a is not None else "" for a in answers]

    def _finish(self, ids: list[int], stop: Sequence[str]) -> str:
        text = self._decoder.decode(ids)
        cuts = [text.find(s) for s in stop if s and s in text]
        return (text[:min(cuts)] if cuts else text).strip()

    def _generate_padded(self, items: list[Molmo2Inputs], max_new_tokens: int, temperature: float, top_p: float,
                         seed: int | None, stop: Sequence[str]) -> list[list[int]]:
        batch = collate(items, self.pad_id)
        n_prompt = batch["input_ids"].shape[1]
        stop = [s for s in stop if s]

        def done(ids: torch.Tensor) -> torch.Tensor:
            flags = [any(s in self._decoder.decode(row[n_prompt:].tolist()) for s in stop) for row in ids]
            return torch.tensor(flags, dtype=torch.bool, device=ids.device)

        with self._lock:
            model = self._model()
            if seed is not None:
                torch.manual_seed(seed)
            with torch.inference_mode():
                out = model.generate(**self._on_device(batch), max_new_tokens=int(max_new_tokens),
                                     pad_token_id=self.pad_id, stopping_criteria=_stopping(done) if stop else None,
                                     **self._sampling(temperature, top_p))
        rows = []
        for row in out[:, n_prompt:].tolist():
            end = next((k for k, t in enumerate(row) if t in self.eos_ids), len(row))
            rows.append(row[:end])
        return rows

    # ------------------------------------------------------------------ housekeeping
    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._model().parameters())

    def close(self) -> None:
        with self._lock:
            self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def collate(items: list[Molmo2Inputs], pad_id: int) -> dict[str, torch.Tensor]:
    """Several single-request inputs -> one left-padded batch, as transformers' processor builds a batch:
    crops concatenated in request order, pooling indices shifted past the earlier requests' patches."""
    if len(items) == 1:
        return dict(items[0].tensors)
    if any("pixel_values_videos" in x.tensors for x in items):
        raise ValueError("Video requests are generated one at a time.")
    length = max(x.length for x in items)

    def left_pad(key: str, value: int) -> torch.Tensor:
        rows = [torch.nn.functional.pad(x[key][0], (length - x.length, 0), value=value) for x in items]
        return torch.stack(rows)

    batch = {"input_ids": left_pad("input_ids", pad_id), "attention_mask": left_pad("attention_mask", 0),
             "mm_token_type_ids": left_pad("mm_token_type_ids", 0)}
    batch.update(batch_images([x.tensors for x in items]))
    return batch
