"""The PixMo-Cap collection protocol: guiding questions, timer rules, recording checks.

PixMo-Cap annotators described each image aloud for 60-90 seconds (at first at least 60 s
with three annotators per image, later one annotator for 90 s), guided by seven questions
(the Molmo/PixMo paper, arXiv 2409.17146, section on PixMo-Cap: at first glance, objects and counts,
text, positions, subtle details, background, style and colour). Everything here is pure: no I/O, no Gradio.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

GUIDING_QUESTIONS: tuple[str, ...] = (
    "What is the image at first glance?",
    "What are the objects and their counts?",
    "What does the text say?",
    "What are the positions of the objects?",
    "What subtle details are noticeable?",
    "What is in the background?",
    "What is the style and color?",
)

# Below this RMS (on samples scaled to [-1, 1]) a recording counts as silent: about -50 dBFS,
# well under quiet speech on a laptop microphone (around -35 dBFS) and above digital silence
# or the hiss of an unplugged input.
DEFAULT_SILENCE_RMS = 0.003


@dataclass(frozen=True)
class TimerRules:
    """How long annotators should speak.

    Attributes:
        min_seconds: recordings shorter than this get a "too short" warning and cannot be saved
            (PixMo: 60 s).
        target_seconds: the duration the timer counts towards (PixMo: 90 s).
        silence_rms: RMS (of samples in [-1, 1]) under which a recording counts as silent.
    """

    min_seconds: float = 60.0
    target_seconds: float = 90.0
    silence_rms: float = DEFAULT_SILENCE_RMS

    def __post_init__(self) -> None:
        if self.min_seconds < 0:
            raise ValueError(f"min_seconds must be >= 0, got {self.min_seconds}")
        if self.target_seconds < self.min_seconds:
            raise ValueError(
                f"target_seconds ({self.target_seconds}) must be >= min_seconds ({self.min_seconds})"
            )
        if self.silence_rms < 0:
            raise ValueError(f"silence_rms must be >= 0, got {self.silence_rms}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "TimerRules":
        """Rules from ``MOLMO_ANNOTATE_MIN_SECONDS`` / ``MOLMO_ANNOTATE_TARGET_SECONDS``.

        Unset variables keep the PixMo defaults (60 s / 90 s).

        Raises:
            ValueError: a variable is set but is not a number, or the values are inconsistent.
        """
        env = os.environ if environ is None else environ
        kwargs: dict[str, float] = {}
        for key, field in (
            ("MOLMO_ANNOTATE_MIN_SECONDS", "min_seconds"),
            ("MOLMO_ANNOTATE_TARGET_SECONDS", "target_seconds"),
        ):
            raw = env.get(key)
            if raw is None or raw == "":
                continue
            try:
                kwargs[field] = float(raw)
            except ValueError:
                raise ValueError(f"{key} must be a number of seconds, got {raw!r}") from None
        if "min_seconds" in kwargs and "target_seconds" not in kwargs:
            kwargs["target_seconds"] = max(cls.target_seconds, kwargs["min_seconds"])
        return cls(**kwargs)

    def guidance(self) -> str:
        """One line for the UI, e.g. 'Speak for at least 60 s (aim for 90 s).'"""
        return f"Speak for at least {self.min_seconds:g} s (aim for {self.target_seconds:g} s)."

    def timer_text(self, elapsed: float) -> str:
        """What the recording timer shows after ``elapsed`` seconds.

        >>> TimerRules().timer_text(12.4)
        '0:12 / 1:30 - keep going: 48 s to the 60 s minimum'
        >>> TimerRules().timer_text(95)
        '1:35 / 1:30 - target reached, finish your sentence and stop'
        """
        shown = f"{_mmss(elapsed)} / {_mmss(self.target_seconds)}"
        if elapsed < self.min_seconds:
            left = int(np.ceil(self.min_seconds - elapsed))
            return f"{shown} - keep going: {left} s to the {self.min_seconds:g} s minimum"
        if elapsed < self.target_seconds:
            return f"{shown} - minimum reached, keep going to the {self.target_seconds:g} s target"
        return f"{shown} - target reached, finish your sentence and stop"


def _mmss(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 60}:{s % 60:02d}"


@dataclass(frozen=True)
class RecordingWarning:
    """A problem with a recording. ``blocking`` warnings prevent saving the record."""

    code: str  # "empty" | "too_short" | "silent" | "short_of_target"
    message: str
    blocking: bool = True

    def __str__(self) -> str:
        return self.message


def to_float_mono(samples: np.ndarray) -> np.ndarray:
    """Samples of any integer or float dtype, shape (n,) or (n, channels) -> float32 (n,) in [-1, 1]."""
    x = np.asarray(samples)
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        scale = float(max(abs(info.min), info.max))
        if info.min == 0:  # unsigned PCM (e.g. 8-bit WAV) is centred on the midpoint
            x = x.astype(np.float64) - (info.max + 1) / 2
            scale = (info.max + 1) / 2
        x = x.astype(np.float32) / np.float32(scale)
    else:
        x = x.astype(np.float32, copy=False)
    if x.ndim == 2:
        x = x.mean(axis=1)
    elif x.ndim != 1:
        raise ValueError(f"expected audio samples of shape (n,) or (n, channels), got {x.shape}")
    return x


def rms(samples: np.ndarray) -> float:
    """Root mean square of the samples scaled to [-1, 1] (0.0 for no samples)."""
    x = to_float_mono(samples)
    if x.size == 0:
        return 0.0
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def check_recording(
    samples: np.ndarray, sample_rate: int, rules: TimerRules | None = None
) -> list[RecordingWarning]:
    """Check a recording against the protocol.

    Args:
        samples: audio samples, shape (n,) or (n, channels), any integer or float dtype.
        sample_rate: samples per second.
        rules: timer rules (default: PixMo's 60 s minimum, 90 s target).

    Returns:
        A list of warnings, empty when the recording is fine. ``empty``, ``too_short`` and
        ``silent`` are blocking; ``short_of_target`` (between the minimum and the target) is not.

    Raises:
        ValueError: ``sample_rate`` is not positive.

    >>> sr = 16000
    >>> [w.code for w in check_recording(np.zeros(2 * sr), sr)]
    ['too_short', 'silent']
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    rules = rules or TimerRules()
    x = to_float_mono(samples)
    if x.size == 0:
        return [RecordingWarning("empty", "The recording is empty: no audio samples were received.")]
    duration = x.size / float(sample_rate)
    level = rms(x)
    out: list[RecordingWarning] = []
    if duration < rules.min_seconds:
        out.append(
            RecordingWarning(
                "too_short",
                f"The recording is too short: {duration:.1f} s, the minimum is "
                f"{rules.min_seconds:g} s. Record again and keep describing the image "
                f"(the questions beside it help).",
            )
        )
    elif duration < rules.target_seconds:
        out.append(
            RecordingWarning(
                "short_of_target",
                f"{duration:.0f} s recorded: above the {rules.min_seconds:g} s minimum, "
                f"below the {rules.target_seconds:g} s target.",
                blocking=False,
            )
        )
    if level < rules.silence_rms:
        db = 20 * np.log10(level) if level > 0 else float("-inf")
        out.append(
            RecordingWarning(
                "silent",
                f"The recording is silent (level {db:.0f} dBFS, threshold "
                f"{20 * np.log10(rules.silence_rms):.0f} dBFS). Check that the right microphone "
                f"is selected and not muted, then record again.",
            )
        )
    return out


def blocking(warnings: list[RecordingWarning]) -> list[RecordingWarning]:
    """The warnings that prevent saving."""
    return [w for w in warnings if w.blocking]
