"""Draft a clean caption from spoken transcripts with a text-only language model.

PixMo-Cap's captions were written by a language-only LLM from the annotators' ASR transcripts
(arXiv 2409.17146). Molmo Studio uses the loaded Molmo's own language model in text-only mode
(``runner.generate(None, prompt)``); the annotator then edits the draft. No model loaded is not an
error: the draft step says so and the record can still be saved.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

NO_MODEL_STATUS = (
    "No model loaded, so no caption draft: load a Molmo checkpoint to draft one, or write the "
    "caption yourself. The record can be saved without a caption."
)

MAX_TRANSCRIPT_CHARS = 6000  # per transcript; 90 s of speech is about 1,500 characters


@dataclass(frozen=True)
class CaptionDraft:
    text: str | None  # None when no draft was produced
    status: str  # what happened, for the UI

    @property
    def ok(self) -> bool:
        return bool(self.text)


def build_caption_prompt(transcripts: Sequence[str]) -> str:
    """The instruction that turns spoken transcripts of one image into one written caption.

    >>> print(build_caption_prompt(["um a red car"]).splitlines()[0])
    Below are spoken descriptions of one image, transcribed by speech recognition.
    """
    cleaned = [_squash(t)[:MAX_TRANSCRIPT_CHARS] for t in transcripts if t and t.strip()]
    if not cleaned:
        raise ValueError("No transcript to draft a caption from: transcribe (or type) at least one.")
    n = len(cleaned)
    who = "one person" if n == 1 else f"{n} people"
    blocks = "\n\n".join(f"Transcript {i + 1}:\n{t}" for i, t in enumerate(cleaned))
    return (
        "Below are spoken descriptions of one image, transcribed by speech recognition.\n"
        f"They were spoken by {who} looking at the image, who covered: what the image is at first "
        "glance, the objects and their counts, any text, the positions of the objects, subtle "
        "details, the background, and the style and colors.\n\n"
        f"{blocks}\n\n"
        "Write one detailed, fluent caption of the image in English prose, in the third person, "
        "as if written while looking at the image. Keep every concrete detail that is stated "
        "(objects, counts, text, positions, colors, background, style); where speakers disagree, "
        "keep the more specific statement. Drop filler words, false starts, repetitions and "
        "remarks about the speaker or the recording. Do not invent anything that was not said. "
        "Answer with the caption only.\n\nCaption:"
    )


def draft_caption(
    transcripts: Sequence[str],
    generate_text: Callable[[str], str] | None,
) -> CaptionDraft:
    """Draft a caption from ``transcripts`` with ``generate_text(prompt) -> text``.

    Never raises for a missing model or a failing model: the status says what happened.

    Args:
        transcripts: the image's (edited) transcripts.
        generate_text: e.g. ``lambda p: runner.generate(None, p, max_new_tokens=400)``; None when
            no model is loaded.
    """
    try:
        prompt = build_caption_prompt(transcripts)
    except ValueError as e:
        return CaptionDraft(None, str(e))
    if generate_text is None:
        return CaptionDraft(None, NO_MODEL_STATUS)
    try:
        out = generate_text(prompt)
    except Exception as e:
        return CaptionDraft(
            None,
            f"The model could not draft a caption ({type(e).__name__}: {e}). Write the caption "
            "yourself; the record can still be saved.",
        )
    text = clean_model_caption(out or "")
    if not text:
        return CaptionDraft(None, "The model returned an empty caption. Write it yourself, or try again.")
    n = len([t for t in transcripts if t and t.strip()])
    return CaptionDraft(text, f"Caption drafted from {n} transcript{'s' if n != 1 else ''}; review and edit it.")


def clean_model_caption(text: str) -> str:
    """Strip a leading 'Caption:' label, surrounding quotes and extra whitespace.

    >>> clean_model_caption('  Caption: "A red car parked on a street."  ')
    'A red car parked on a street.'
    """
    t = text.strip()
    t = re.sub(r"^(caption|description)\s*:\s*", "", t, flags=re.IGNORECASE)
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1].strip()
    return _squash_keep_paragraphs(t)


def _squash(t: str) -> str:
    return re.sub(r"\s+", " ", t).strip()


def _squash_keep_paragraphs(t: str) -> str:
    paras = [re.sub(r"[ \t]+", " ", p).strip() for p in re.split(r"\n\s*\n", t)]
    return "\n\n".join(p for p in paras if p)
