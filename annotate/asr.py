"""Speech to text with faster-whisper (CTranslate2 Whisper).

``Transcriber`` loads the model lazily on first use (thread-safe), runs int8 on CPU and float16
on a CUDA GPU, keeps voice-activity detection on (silence is cut before decoding), and returns
segments with start/end timestamps. With no network and no local copy of the model it raises
``AsrModelMissing`` saying what to download and where to put it.

Model selection, first match wins:
  1. ``model`` is an existing folder (a CTranslate2 Whisper: model.bin, config.json, tokenizer.json ...);
  2. ``$MOLMO_WHISPER_DIR/<model>`` (default ``./models/whisper/<model>``) exists;
  3. a faster-whisper model name (``small.en``, ``base``, ``large-v3`` ...) already in the Hugging Face
     cache; downloaded from the hub unless it is offline (``HF_HUB_OFFLINE``, as huggingface_hub reads it).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

DEFAULT_MODEL = "small.en"
MODEL_ENV = "MOLMO_WHISPER_MODEL"
MODEL_DIR_ENV = "MOLMO_WHISPER_DIR"
DEFAULT_MODEL_DIR = Path("models") / "whisper"


class AsrModelMissing(RuntimeError):
    """The Whisper model is not available locally (message says what to download and where)."""


class AsrError(RuntimeError):
    """Transcription failed; the message is fit to show a user."""


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the recording
    end: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "text": self.text}


@dataclass
class Transcript:
    text: str
    segments: list[Segment]
    language: str | None
    duration: float  # seconds of audio
    duration_after_vad: float | None  # seconds left after voice-activity detection
    model: str

    def segments_as_dicts(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.segments]


def _default_device() -> str:
    try:
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    except Exception:
        return "cpu"


class Transcriber:
    """A lazily loaded faster-whisper model.

    Args:
        model: a model name (default ``$MOLMO_WHISPER_MODEL`` or ``small.en``) or a folder.
        device: ``"auto"`` (CUDA when CTranslate2 sees a GPU, else CPU), ``"cpu"`` or ``"cuda"``.
        compute_type: None picks ``int8`` on CPU and ``float16`` on CUDA.
        cpu_threads: CTranslate2 CPU threads (0: its default).
        language: spoken language code (``"en"``); None detects it (multilingual models only).
        beam_size: beam width (5 as in Whisper; 1 is greedy and faster).
        temperature: one temperature or faster-whisper's fallback list.
        vad: cut silence with the Silero VAD bundled with faster-whisper.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        device: str = "auto",
        compute_type: str | None = None,
        cpu_threads: int = 0,
        language: str | None = "en",
        beam_size: int = 5,
        temperature: float | Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        vad: bool = True,
    ) -> None:
        self.model_name = str(model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
        self.device = _default_device() if device == "auto" else device
        self.compute_type = compute_type or ("float16" if self.device == "cuda" else "int8")
        self.cpu_threads = cpu_threads
        self.language = language
        self.beam_size = beam_size
        self.temperature = temperature
        self.vad = vad
        self._model = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _candidates(self) -> list[Path]:
        root = Path(os.environ.get(MODEL_DIR_ENV) or DEFAULT_MODEL_DIR)
        return [Path(self.model_name).expanduser(), root / self.model_name]

    def missing_message(self, detail: str = "") -> str:
        root = Path(os.environ.get(MODEL_DIR_ENV) or DEFAULT_MODEL_DIR)
        target = (root / self.model_name).resolve()
        repo = f"Systran/faster-whisper-{self.model_name}"
        why = f" ({detail})" if detail else ""
        from molmo_core.errors import download_hint  # lazily: importing molmo_core loads torch

        return (
            f"The speech-recognition model '{self.model_name}' is not available offline{why}. "
            + download_hint(repo, str(target)).rstrip(".")
            + f" (about 480 MB for small.en), or point {MODEL_ENV} at any faster-whisper (CTranslate2) model "
            f"folder containing model.bin, config.json, tokenizer.json and vocabulary.*. Until then type the "
            f"transcript by hand; the recording is still saved."
        )

    def load(self):
        """Load the model now (otherwise it loads on the first ``transcribe``).

        Raises:
            AsrModelMissing: no local copy and no way to download one.
        """
        with self._lock:
            if self._model is not None:
                return self._model
            from faster_whisper import WhisperModel

            kwargs = dict(device=self.device, compute_type=self.compute_type, cpu_threads=self.cpu_threads)
            for cand in self._candidates():
                if cand.is_dir():
                    if not (cand / "model.bin").is_file():
                        raise AsrModelMissing(self.missing_message(f"{cand} has no model.bin"))
                    self._model = WhisperModel(str(cand), **kwargs)
                    return self._model
            try:
                self._model = WhisperModel(self.model_name, local_files_only=True, **kwargs)
                return self._model
            except ValueError as e:  # unknown size name
                if "Invalid model size" in str(e):
                    raise AsrModelMissing(self.missing_message(str(e))) from None
            except Exception:
                pass  # not in the cache: try the hub below
            from huggingface_hub import is_offline_mode

            if is_offline_mode():
                raise AsrModelMissing(self.missing_message("HF_HUB_OFFLINE is set and it is not in the cache"))
            try:
                self._model = WhisperModel(self.model_name, **kwargs)
            except Exception as e:
                raise AsrModelMissing(self.missing_message(f"download failed: {type(e).__name__}: {e}")) from None
            return self._model

    def transcribe(self, audio: str | os.PathLike | Any) -> Transcript:
        """Transcribe a file path (any format PyAV decodes) or a float32 16 kHz mono array.

        Raises:
            AsrModelMissing: see ``load``.
            AsrError: decoding or inference failed.
        """
        model = self.load()
        src = str(audio) if isinstance(audio, (str, os.PathLike)) else audio
        try:
            segments, info = model.transcribe(
                src,
                language=self.language,
                beam_size=self.beam_size,
                temperature=self.temperature,
                vad_filter=self.vad,
                condition_on_previous_text=False,
            )
            segs = [Segment(round(s.start, 3), round(s.end, 3), s.text.strip()) for s in segments]
        except Exception as e:
            raise AsrError(f"Transcription failed: {type(e).__name__}: {e}") from None
        return Transcript(
            text=" ".join(s.text for s in segs if s.text).strip(),
            segments=segs,
            language=getattr(info, "language", None),
            duration=float(getattr(info, "duration", 0.0) or 0.0),
            duration_after_vad=getattr(info, "duration_after_vad", None),
            model=self.model_name,
        )
