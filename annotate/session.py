"""One annotator's work on one image, and the rules it follows, without any UI.

The Annotate tab (``app/annotate_tab.py``) keeps an ``AnnotationSession`` per browser and only wires
buttons to it; scripts and tests use it the same way:

    s = AnnotationSession()
    nxt = s.start(store, "alice")                     # claims the next image (nxt.task None: nothing left)
    s.transcribe(transcriber, "take1.wav", rules)     # raw ASR kept in the session
    s.draft(open_store, edited_transcript, generate)  # optional caption draft from the transcripts
    saved = s.save(open_store, project, "alice", "take1.wav", edited_transcript, caption, rules)

``open_store(path) -> Store`` opens the project the image came from (the tab passes its cached
``get_store``; a script passes ``Store``). ``project`` and the annotator name are what the caller's
boxes say now: an image is only ever saved, skipped or flagged in the project it was drawn from, by
the annotator it was given to.

Rules kept here:

* Next image: the store's queue (``Store.next_image``); the caption shown is the image's current
  one; an annotator who gets back an image whose annotation by them was rejected is told the
  reviewer's reason.
* A transcript made for an earlier recording is stale: saving a different recording with that
  transcript unedited is refused (press Transcribe again, or edit it).
* The raw ASR, its segments and model are saved only with the recording they were made from.
* Caption source: ``manual`` without a draft, ``model`` when the draft is saved unchanged,
  ``model+edited`` otherwise; a caption saved exactly as it is shown (already stored) keeps its
  author and source (not saved again).
* Blocking recording problems (too short, silent) refuse the save.
* Privacy (``others=False``, for a signed-in annotator who is not an admin): nothing another annotator
  wrote is shown, directly or through the model: the caption box starts empty unless the caption is
  the annotator's own, and a caption draft uses only the annotator's own transcript.

Every refusal is a ``SessionError`` (a ``StoreError``) whose message is written for the annotator.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from .audio import Audio, AudioDecodeError, decode_audio
from .caption import CaptionDraft, draft_caption
from .protocol import TimerRules, blocking, check_recording
from .store import AlreadyAnnotatedError, Store, StoreError, Task, check_annotator


class SessionError(StoreError):
    """An annotation step was refused; the message says what to do (nothing was saved)."""


def annotator_name(name: str | None) -> str:
    """A checked annotator name. Raises SessionError with the rule when it is empty or not allowed."""
    try:
        return check_annotator(name)
    except ValueError as e:
        raise SessionError(str(e)) from None


def decode_recording(audio_path: str | None) -> Audio:
    """The recording at ``audio_path``. Raises SessionError when there is none or it cannot be read."""
    if not audio_path:
        raise SessionError("No recording yet: record with the microphone (or upload a file) first.")
    try:
        return decode_audio(audio_path)
    except (AudioDecodeError, FileNotFoundError) as e:
        raise SessionError(str(e)) from None


def recording_check(audio_path: str | None, rules: TimerRules) -> str:
    """The text for the box under the recorder (never raises): length, sample rate, problems."""
    if not audio_path:
        return ""
    try:
        audio = decode_audio(audio_path)
    except (AudioDecodeError, FileNotFoundError) as e:
        return f"Problem: {e}"
    warnings = check_recording(audio.samples, audio.sample_rate, rules)
    head = f"{audio.duration:.1f} s at {audio.sample_rate} Hz."
    if not warnings:
        return f"{head} Good length."
    return head + " " + " ".join(str(w) for w in warnings)


def progress_text(store: Store, annotator: str | None, others: bool = True) -> str:
    """The project's progress line for ``annotator``; ``others=False`` hides other annotators' names
    and counts (an annotator who is not an admin sees the project totals and their own count)."""
    return store.progress().summary(annotator, others=others)


def caption_to_save(caption: str | None, shown: str | None, draft: str | None) -> tuple[str | None, str]:
    """(caption to store or None, its source) under the caption rules (see the module docstring).

    >>> caption_to_save("A red car.", None, "A red car.")
    ('A red car.', 'model')
    >>> caption_to_save("A red car, parked.", None, "A red car.")
    ('A red car, parked.', 'model+edited')
    >>> caption_to_save("Stored.", "Stored.", None)
    (None, 'manual')
    """
    cap = (caption or "").strip() or None
    if cap and shown and cap == shown.strip():
        cap = None  # saved as it is shown: keep its author and source
    source = "manual" if not draft else ("model" if cap == draft else "model+edited")
    return cap, source


@dataclass
class NextImage:
    """What ``AnnotationSession.start`` handed out."""

    task: Task | None  # None: nothing left for this annotator
    caption: str  # the image's current caption ("" when none)
    notes: list[str]  # missing files passed over, a reviewer's reason; a caller may add its own
    guidance: str = ""  # what to do, shown after the notes when an image was handed out
    missing_files: bool = False  # some image files of the project are missing

    @property
    def status(self) -> str:
        """The status line for the annotator."""
        if self.task is None:
            last = ("Nothing left for you in this project: every image has its annotations, or you did or skipped "
                    "the rest." + (" Some image files are missing (see progress)." if self.missing_files else ""))
        else:
            last = f"Describe the image aloud. {self.guidance}".strip()
        return " ".join(self.notes + [last])

    @property
    def info(self) -> str:
        """Markdown naming the image (or saying there is none)."""
        t = self.task
        if t is None:
            return "No image."
        text = (f"**{t.display_name}** (image {t.image_id}; {t.done} of {t.needed} "
                f"annotation{'s' if t.needed != 1 else ''} so far)")
        if t.abs_path is None and t.url:
            text += f"\n\nRemote image, open it here: {t.url}"
        return text


@dataclass
class Transcribed:
    raw: str
    segments: list[dict[str, Any]]
    status: str


@dataclass
class Saved:
    record: Any  # annotate.store.AnnotationRecord
    status: str


@dataclass
class AnnotationSession:
    """One annotator's work in progress: plain data (kept per browser in ``gr.State``), and the rules.

    Methods that change the session change it in place; callers holding a shared copy use
    ``restore`` first (the tab does, so a refused step leaves the browser's session as it was)."""

    project: str | None = None  # the store root (absolute path) the image was drawn from
    annotator: str | None = None  # who the image was given to
    image_id: int | None = None
    raw: str = ""  # the ASR output of the last transcription
    segments: list[dict[str, Any]] = field(default_factory=list)
    language: str | None = None
    asr_model: str | None = None
    asr_model_sha256: str | None = None
    asr_audio: str | None = None  # the recording ``raw`` was made from
    caption_draft: str | None = None
    caption_model: str | None = None

    @classmethod
    def restore(cls, value: "AnnotationSession | dict | None") -> "AnnotationSession":
        """A private copy of a session held elsewhere (None -> a new session)."""
        if value is None:
            return cls()
        if isinstance(value, dict):
            names = {f.name for f in fields(cls)}
            return cls(**copy.deepcopy({k: v for k, v in value.items() if k in names}))
        return copy.deepcopy(value)

    # -- queue -----------------------------------------------------------------------------------

    def start(self, store: Store, annotator: str | None, guidance: str = "", others: bool = True) -> NextImage:
        """Forget the current image and take the next one for ``annotator`` from ``store``.

        ``guidance`` is appended to the status line when an image is handed out. ``others=False``: the
        image's caption is shown only when this annotator wrote it."""
        who = annotator_name(annotator)
        fresh = AnnotationSession(project=str(store.root), annotator=who)
        self.__dict__.update(fresh.__dict__)
        notes: list[str] = []
        try:
            task = store.next_image(who, notes=notes)
        except ValueError as e:
            raise SessionError(str(e)) from None
        if task is None:
            return NextImage(None, "", notes, guidance, missing_files=bool(store.progress().missing))
        self.image_id = task.image_id
        for a in store.annotations(task.image_id):
            if a.annotator == who and a.review_state == "rejected":
                notes.append(f"Your earlier description of this image was rejected in review ({a.review_reason}); "
                             "please describe it again.")
        cap = store.current_caption(task.image_id)
        if cap and not others and cap["author"] != who:
            cap = None
        return NextImage(task, cap["caption"] if cap else "", notes, guidance)

    def require_image(self, project: str | None, annotator: str | None, verb: str) -> str:
        """The annotator name, once sure the session holds an image and the caller still means it.

        ``project`` (the project path the caller's box resolves to) and ``annotator`` must be the ones the
        image was handed out with: an image id only means something in the project it was drawn from.
        Raises SessionError otherwise."""
        if self.image_id is None or not self.project:
            raise SessionError(f"No image to {verb}: press 'Next image' first.")
        who = annotator_name(annotator)
        if project != self.project or who != self.annotator:
            raise SessionError(
                f"Not done: the image was given to {self.annotator} in {self.project}, but the boxes now say "
                f"{who} in {project or '(no folder)'}. Put them back, or press 'Next image' to start over.")
        return who

    def skip(self, open_store: Callable[[str], Store], project: str | None, annotator: str | None) -> int:
        """This annotator will not get the image again. Returns the skipped image id."""
        who = self.require_image(project, annotator, "skip")
        image_id = self.image_id
        open_store(self.project).skip(image_id, who)
        self.image_id = None
        return image_id

    def flag(self, open_store: Callable[[str], Store], project: str | None, annotator: str | None,
             reason: str | None) -> int:
        """Flag the image as bad (it leaves the queue for everyone); a reason is required."""
        who = self.require_image(project, annotator, "flag")
        if not (reason or "").strip():
            raise SessionError("Say why the image is bad (broken, offensive, duplicate, unreadable ...) in the flag "
                               "reason box.")
        image_id = self.image_id
        open_store(self.project).flag(image_id, who, reason)
        self.image_id = None
        return image_id

    # -- transcription and caption ---------------------------------------------------------------

    def transcribe(self, transcriber: Any, audio_path: str | None, rules: TimerRules) -> Transcribed:
        """Transcribe the recording and remember the result with the recording it came from.

        ``transcriber.transcribe(path)`` returns an ``annotate.asr.TranscriptionResult``; its own
        errors (no model, a failing model) are user errors and pass through."""
        audio = decode_recording(audio_path)
        warnings = check_recording(audio.samples, audio.sample_rate, rules)
        result = transcriber.transcribe(audio_path)
        segments = result.segments_as_dicts()
        self.raw, self.segments, self.language = result.text, segments, result.language
        self.asr_model, self.asr_model_sha256, self.asr_audio = result.model, result.model_sha256, str(audio_path)
        status = f"Transcribed {result.duration:.1f} s into {len(result.segments)} segments; edit the transcript if needed."
        if warnings:
            status += " " + " ".join(str(w) for w in warnings)
        if not result.segments:
            status += " No speech was recognised."
        if result.note:
            status += " " + result.note
        return Transcribed(result.text, segments, status)

    def draft(self, open_store: Callable[[str], Store], transcript: str | None,
              generate_text: Callable[[str], str] | None, model_name: str | None = None,
              others: bool = True) -> CaptionDraft:
        """Draft a caption from the image's live transcripts plus ``transcript`` (``annotate.caption``);
        with ``others=False`` from ``transcript`` alone.

        The draft is remembered (it decides the caption source at save time) when one was made."""
        texts: list[str] = []
        if others and self.image_id is not None and self.project:
            texts = open_store(self.project).transcripts(self.image_id)
        if (transcript or "").strip():
            texts.append(transcript)
        result = draft_caption(texts, generate_text)
        if result.ok:
            self.caption_draft, self.caption_model = result.text, model_name
        return result

    # -- save ------------------------------------------------------------------------------------

    def save(self, open_store: Callable[[str], Store], project: str | None, annotator: str | None,
             audio_path: str | None, transcript: str | None, caption: str | None, rules: TimerRules) -> Saved:
        """Save the annotation of the session's image (atomically, audio receipt first).

        Raises:
            SessionError: no image, another project or name than the image was given with, no or an
                unreadable recording, a blocking recording problem, an empty or stale transcript, an
                annotation of this image by this annotator already saved, or the receipt could not be
                written. Nothing is saved then.
            StoreError: the database refused the write.
        """
        who = self.require_image(project, annotator, "save")
        store = open_store(self.project)
        audio = decode_recording(audio_path)
        problems = blocking(check_recording(audio.samples, audio.sample_rate, rules))
        if problems:
            raise SessionError("Not saved. " + " ".join(str(w) for w in problems))
        if not (transcript or "").strip():
            raise SessionError("Not saved: the transcript is empty. Press 'Transcribe' (or type what you said) first.")
        same_audio = self.asr_audio == str(audio_path)
        if self.asr_audio and not same_audio and transcript.strip() == (self.raw or "").strip():
            raise SessionError("Not saved: the transcript is the one of an earlier recording. Press 'Transcribe' for "
                               "this recording (or edit the transcript to match it).")
        raw = self.raw if same_audio else ""
        shown = store.current_caption(self.image_id)
        cap, source = caption_to_save(caption, shown["caption"] if shown else None, self.caption_draft)
        try:
            rec = store.save_annotation(
                self.image_id, who, audio, raw, transcript,
                segments=self.segments if raw else [],
                language=self.language, asr_model=self.asr_model if raw else None,
                caption=cap, caption_source=source, caption_model=self.caption_model if self.caption_draft else None,
                asr_model_sha256=self.asr_model_sha256 if raw else None,
            )
        except AlreadyAnnotatedError:
            raise
        except ValueError as e:
            raise SessionError(str(e)) from None
        except OSError as e:
            raise SessionError(f"Not saved: could not write the audio receipt ({e}). Free some disk space and save "
                               "again.") from None
        status = (f"Saved annotation {rec.id} for image {rec.image_id}: {rec.duration:.1f} s of audio "
                  f"kept as {rec.audio_path} (sha256 {rec.audio_sha256[:12]}...)"
                  + ("" if cap or shown else "; no caption yet") + ". Press 'Next image' to continue.")
        self.image_id = None
        return Saved(rec, status)
