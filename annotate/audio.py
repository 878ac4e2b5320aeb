"""Audio: decode uploads, save lossless audio receipts, record from a local microphone.

An *audio receipt* is the annotator's original recording, kept losslessly as FLAC next to the
project's database with its sha256, duration and sample rate: proof that a person spoke the
description. Decoding tries soundfile (WAV, FLAC, OGG/Vorbis, ...) first and falls back to PyAV
(FFmpeg's libraries, the decoder faster-whisper uses) for MP3, WebM/Opus, M4A and the like.

``sounddevice`` is imported lazily: a machine with no PortAudio or no sound card gets an empty
device list plus a reason, never an exception at import time.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SUPPORTED_HINT = "WAV, FLAC, OGG, MP3, M4A or WebM"
# Upload limits (a PixMo description is 60-90 s): bytes are checked before decoding, the duration from
# the header where it is known and while decoding otherwise, so a small file that decodes to hours is cut off.
MAX_AUDIO_BYTES = 64 * 1024 * 1024
MAX_AUDIO_SECONDS = 10 * 60


class AudioDecodeError(ValueError):
    """The input could not be decoded as audio."""


class AudioTooLargeError(AudioDecodeError):
    """The recording is over ``MAX_AUDIO_BYTES`` or ``MAX_AUDIO_SECONDS``."""


class AudioDeviceError(RuntimeError):
    """A local microphone could not be used."""


@dataclass
class Audio:
    """Decoded audio.

    Attributes:
        samples: (frames, channels) array; int16 for 16-bit (or lower) sources, float32 otherwise.
        sample_rate: samples per second.
    """

    samples: np.ndarray
    sample_rate: int

    @property
    def frames(self) -> int:
        return int(self.samples.shape[0])

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        return self.frames / float(self.sample_rate)


@dataclass(frozen=True)
class AudioReceipt:
    """A saved recording. ``path`` is where the FLAC file lies."""

    path: Path
    sha256: str
    duration: float
    sample_rate: int
    channels: int
    frames: int


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_audio(path: str | os.PathLike, max_bytes: int | None = None, max_seconds: float | None = None) -> Audio:
    """Decode an audio file of any common format.

    Args:
        path: the file (for uploads: the file the browser sent).
        max_bytes: refuse larger files before decoding (default ``MAX_AUDIO_BYTES``).
        max_seconds: refuse longer recordings (default ``MAX_AUDIO_SECONDS``).

    Returns:
        The samples at the file's own sample rate, 16-bit sources kept as int16 (so the receipt
        is bit-exact), others as float32.

    Raises:
        FileNotFoundError: the file does not exist.
        AudioDecodeError: neither soundfile nor PyAV can read it, or it holds no samples.
        AudioTooLargeError: over ``max_bytes`` or ``max_seconds``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Audio file not found: {p}")
    max_bytes = MAX_AUDIO_BYTES if max_bytes is None else max_bytes
    max_seconds = MAX_AUDIO_SECONDS if max_seconds is None else max_seconds
    size = p.stat().st_size
    if size > max_bytes:
        raise AudioTooLargeError(f"'{p.name}' is {size / 2**20:.1f} MB; recordings may be at most "
                                 f"{max_bytes / 2**20:.0f} MB. {_TOO_LARGE_HINT}")
    errors: list[str] = []
    try:
        info = sf.info(str(p))
        _check_seconds(p, info.frames / float(info.samplerate), max_seconds)
        dtype = "int16" if info.subtype in ("PCM_16", "PCM_S8", "PCM_U8", "ALAW", "ULAW") else "float32"
        data, sr = sf.read(str(p), dtype=dtype, always_2d=True)
        audio = Audio(np.ascontiguousarray(data), int(sr))
    except AudioTooLargeError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        errors.append(f"soundfile: {e}")
        try:
            audio = _decode_with_av(p, max_seconds)
        except AudioTooLargeError:
            raise
        except Exception as e2:
            errors.append(f"PyAV: {e2}")
            raise AudioDecodeError(
                f"'{p.name}' is not an audio file we can read ({'; '.join(errors)}). "
                f"Upload a recording in a common audio format ({SUPPORTED_HINT})."
            ) from None
    if audio.frames == 0:
        raise AudioDecodeError(f"'{p.name}' holds no audio samples (0 frames). Record again.")
    return audio


_TOO_LARGE_HINT = "Record a shorter description (60-90 s is the target) or split the recording."


def _check_seconds(path: Path, seconds: float, max_seconds: float) -> None:
    if seconds > max_seconds:
        raise AudioTooLargeError(f"'{path.name}' is {seconds:.0f} s long (at least); recordings may be at most "
                                 f"{max_seconds:.0f} s. {_TOO_LARGE_HINT}")


def _decode_with_av(path: Path, max_seconds: float = MAX_AUDIO_SECONDS) -> Audio:
    """Decode with PyAV to float32 at the stream's sample rate (mono or stereo kept), stopping with
    AudioTooLargeError as soon as more than ``max_seconds`` have been decoded."""
    import av  # installed with faster-whisper

    with av.open(str(path), mode="r", metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise AudioDecodeError("no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        channels = min(2, stream.codec_context.channels or 1)
        layout = "stereo" if channels == 2 else "mono"
        resampler = av.AudioResampler(format="flt", layout=layout, rate=rate)
        chunks, frames = [], 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1, channels))
                frames += chunks[-1].shape[0]
            _check_seconds(path, frames / float(rate), max_seconds)
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1, channels))
    data = np.concatenate(chunks, axis=0) if chunks else np.zeros((0, channels), np.float32)
    return Audio(data.astype(np.float32, copy=False), int(rate))


# ---------------------------------------------------------------------------------------------
# Receipts


def write_flac_atomic(audio: Audio, dest: str | os.PathLike) -> AudioReceipt:
    """Write ``audio`` losslessly as FLAC at ``dest`` so that ``dest`` is complete or absent.

    The data goes to a temporary name in the same folder, is fsynced, hashed, then renamed onto
    ``dest``, and the folder entry is fsynced. int16 input is stored bit-exactly as 16-bit FLAC;
    float input as 24-bit FLAC (FLAC's widest integer format).

    Raises:
        FileExistsError: ``dest`` already exists (receipts are never overwritten).
        OSError: the disk is full or not writable (the temporary file is removed).
    """
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"Audio receipt already exists, not overwriting: {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    subtype = "PCM_16" if audio.samples.dtype == np.int16 else "PCM_24"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".flac", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            sf.write(f, audio.samples, audio.sample_rate, format="FLAC", subtype=subtype)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(dest.parent)
    return AudioReceipt(
        path=dest,
        sha256=digest,
        duration=audio.duration,
        sample_rate=audio.sample_rate,
        channels=audio.channels,
        frames=audio.frames,
    )


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def receipt_name() -> str:
    """A unique file name for a new receipt."""
    return f"{uuid.uuid4().hex}.flac"


# ---------------------------------------------------------------------------------------------
# Local microphone (desktop use)


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    channels: int
    default_samplerate: float
    is_default: bool = False

    @property
    def label(self) -> str:
        star = " (default)" if self.is_default else ""
        return f"{self.index}: {self.name}{star}"


def _import_sounddevice():
    try:
        import sounddevice as sd
    except OSError as e:  # "PortAudio library not found"
        raise AudioDeviceError(
            f"Local microphone unavailable: {e}. Install PortAudio (Debian/Ubuntu: "
            "`apt-get install libportaudio2`) and restart; the browser microphone still works."
        ) from None
    except ImportError as e:
        raise AudioDeviceError(
            f"Local microphone unavailable: {e}. `pip install sounddevice`; the browser "
            "microphone still works."
        ) from None
    return sd


def list_input_devices() -> tuple[list[InputDevice], str | None]:
    """Local input devices, or ``([], reason)`` when there are none. Never raises."""
    try:
        sd = _import_sounddevice()
        devices = sd.query_devices()
        try:
            default_in = int(sd.default.device[0])
        except Exception:
            default_in = -1
        found = [
            InputDevice(
                index=i,
                name=str(d["name"]),
                channels=int(d["max_input_channels"]),
                default_samplerate=float(d["default_samplerate"]),
                is_default=(i == default_in),
            )
            for i, d in enumerate(devices)
            if int(d.get("max_input_channels", 0)) > 0
        ]
    except AudioDeviceError as e:
        return [], str(e)
    except Exception as e:  # PortAudioError and friends
        return [], f"Local microphone unavailable: {e}. The browser microphone still works."
    if not found:
        return [], (
            "No local audio input device found (no sound card, or running in a container or on "
            "a server). Use the browser microphone instead."
        )
    return found, None


def record(seconds: float, device: int | str | None = None, sample_rate: int = 16000) -> Audio:
    """Record ``seconds`` of mono 16-bit audio from a local input device (blocking).

    Raises:
        ValueError: ``seconds`` is not positive.
        AudioDeviceError: PortAudio is missing or the device cannot be opened.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    sd = _import_sounddevice()
    frames = int(round(seconds * sample_rate))
    try:
        data = sd.rec(frames, samplerate=sample_rate, channels=1, dtype="int16", device=device)
        sd.wait()
    except Exception as e:
        raise AudioDeviceError(
            f"Could not record from input device {device!r}: {e}. Pick another device, or use "
            "the browser microphone."
        ) from None
    return Audio(np.ascontiguousarray(data.reshape(-1, 1)), sample_rate)


def write_wav(audio: Audio, path: str | os.PathLike) -> Path:
    """Write a WAV file (for handing a local recording to the same path as browser uploads)."""
    subtype = "PCM_16" if audio.samples.dtype == np.int16 else "FLOAT"
    sf.write(str(path), audio.samples, audio.sample_rate, subtype=subtype)
    return Path(path)
