"""The Annotate tab: speak about an image, review the transcript, save a PixMo-Cap record.

Layout and wiring only; the work is done by ``annotate/`` (store, audio, ASR, caption). Handlers
are plain functions ``(inputs..., session) -> outputs`` so tests can call them directly, and every
event has an ``api_name`` starting with ``annotate_`` for gradio_client. User-facing failures are
``gr.Error`` with a message saying what to do, never a traceback.
"""
from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from annotate.asr import AsrError, AsrModelMissing, Transcriber, installed_models
from annotate.audio import (
    AudioDecodeError,
    AudioDeviceError,
    decode_audio,
    list_input_devices,
    record,
    write_wav,
)
from annotate.caption import draft_caption
from annotate.protocol import GUIDING_QUESTIONS, TimerRules, blocking, check_recording
from annotate.store import AlreadyAnnotatedError, Store, StoreError, check_annotator
from molmo_core.preprocessing import MAX_FILE_BYTES, MAX_IMAGE_PIXELS

from .handlers import USER_ERRORS, user_errors
from .tempfiles import new_temp_file

CAPTION_MAX_NEW_TOKENS = 400

_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


def _error(message: str) -> gr.Error:
    return gr.Error(message, duration=None, print_exception=False)


def _project_key(project_dir: str | None) -> str | None:
    """The project folder as typed -> its absolute path (one Store per key), None when empty."""
    folder = (project_dir or "").strip()
    return str(Path(folder).expanduser().resolve()) if folder else None


def get_store(project_dir: str | None, annotations_per_image: int | None = None) -> Store:
    """One ``Store`` per project folder per process (opened, and scanned, on first use)."""
    key = _project_key(project_dir)
    if key is None:
        raise _error("Enter a project folder (a folder of images, or one holding images.txt).")
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            if not Path(key).is_dir():
                raise _error(f"Project folder not found: {key}. Create it and put the images in it.")
            try:
                store = Store(key, annotations_per_image=annotations_per_image)
            except (StoreError, ValueError) as e:
                raise _error(str(e)) from None
            _stores[key] = store
    return store


DISPLAY_MAX_SIDE = 1600
DISPLAY_MAX_PIXELS = MAX_IMAGE_PIXELS  # the limits of images given to the model (molmo_core.preprocessing)


def _display_image(path: Path) -> tuple[Any, str]:
    """The image as the annotator should see it (EXIF rotation applied, downscaled for the browser).

    Returned as pixels, not a path, so a project folder anywhere on disk is shown (Gradio serves only
    files under its allowed folders). -> (PIL image or None, problem text)."""
    from PIL import Image, ImageOps

    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return None, (f"{path.name} is {size / 2**20:.0f} MB; images may be at most {MAX_FILE_BYTES // 2**20} MB. "
                          "Skip or flag it, or replace the file with a smaller copy.")
        with Image.open(path) as im:
            if im.width * im.height > DISPLAY_MAX_PIXELS:
                return None, f"{path.name} is {im.width}x{im.height} pixels, too large to show; skip or flag it."
            im.draft("RGB", (DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))  # JPEG: decode at a reduced scale
            shown = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return None, f"{path.name} could not be opened ({e}); flag it as broken."
    shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))
    return shown, ""


def new_session() -> dict[str, Any]:
    return {"project": None, "annotator": None, "image_id": None, "raw": "", "segments": [],
            "language": None, "asr_model": None, "asr_model_sha256": None, "asr_audio": None, "caption_draft": None,
            "caption_model": None}


def _annotator(name: str | None) -> str:
    try:
        return check_annotator(name)
    except ValueError as e:
        raise _error(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Handlers


class AnnotateHandlers:
    """The tab's handlers, bound to a transcriber, timer rules and the runner getter."""

    def __init__(self, get_runner: Callable[[], Any], transcriber: Transcriber, rules: TimerRules,
                 annotations_per_image: int | None = None) -> None:
        self.get_runner = get_runner
        self.transcriber = transcriber
        self.rules = rules
        self.annotations_per_image = annotations_per_image

    def _store(self, project: str | None) -> Store:
        return get_store(project, self.annotations_per_image)

    def _current(self, session, annotator, project, verb: str) -> tuple[dict, str, Store]:
        """The session's image, annotator and the store the image came from.

        The image id only means something in the project it was drawn from: a project folder or name
        edited since 'Next image' is refused instead of writing to another image."""
        s = copy.deepcopy(session or new_session())
        if s.get("image_id") is None or not s.get("project"):
            raise _error(f"No image to {verb}: press 'Next image' first.")
        who = _annotator(annotator)
        typed = _project_key(project)
        if typed != s["project"] or who != s["annotator"]:
            raise _error(f"Not done: the image was given to {s['annotator']} in {s['project']}, but the boxes now say "
                         f"{who} in {typed or '(no folder)'}. Put them back, or press 'Next image' to start over.")
        return s, who, get_store(s["project"], self.annotations_per_image)

    # -- queue ---------------------------------------------------------------------------------

    @user_errors("getting the next image")
    def next_image(self, annotator, project, session):
        """-> session, image, image info, caption, audio, raw, transcript, check, status, progress."""
        who = _annotator(annotator)
        store = self._store(project)
        s = new_session()
        s["project"], s["annotator"] = str(store.root), who
        note_list: list[str] = []
        try:
            task = store.next_image(who, notes=note_list)
        except (StoreError, ValueError) as e:
            raise _error(str(e)) from None
        progress = store.progress().summary(who)
        notes = " ".join(note_list)
        if task is None:
            status = "Nothing left for you in this project: every image has its annotations, or you did or skipped the rest."
            if store.progress().missing:
                status += " Some image files are missing (see progress)."
            return (s, None, "No image.", "", None, "", "", "", (notes + " " + status).strip(), progress)
        s["image_id"] = task.image_id
        cap = store.caption(task.image_id)
        image_value, problem = _display_image(task.abs_path) if task.abs_path else (None, "")
        if problem:
            notes = (notes + " " + problem).strip()
        info = (f"**{task.display_name}** (image {task.image_id}; {task.done} of {task.needed} "
                f"annotation{'s' if task.needed != 1 else ''} so far)")
        if task.abs_path is None and task.url:
            info += f"\n\nRemote image, open it here: {task.url}"
        status = (notes + " " if notes else "") + f"Describe the image aloud. {self.rules.guidance()}"
        return (s, image_value, info, cap["caption"] if cap else "", None, "", "", "", status, progress)

    @user_errors("skipping the image")
    def skip(self, annotator, project, session):
        s, who, store = self._current(session, annotator, project, "skip")
        store.skip(s["image_id"], who)
        out = self.next_image(annotator, project, s)
        return out[:8] + (f"Skipped image {s['image_id']}. " + out[8], out[9])

    @user_errors("flagging the image")
    def flag(self, annotator, project, reason, session):
        s, who, store = self._current(session, annotator, project, "flag")
        if not (reason or "").strip():
            raise _error("Say why the image is bad (broken, offensive, duplicate, unreadable ...) in the flag reason box.")
        store.flag(s["image_id"], who, reason)
        out = self.next_image(annotator, project, s)
        return out[:8] + (f"Flagged image {s['image_id']} ({reason.strip()}). " + out[8], out[9])

    # -- recording -----------------------------------------------------------------------------

    def _decode(self, audio_path):
        if not audio_path:
            raise _error("No recording yet: record with the microphone (or upload a file) first.")
        try:
            return decode_audio(audio_path)
        except (AudioDecodeError, FileNotFoundError) as e:
            raise _error(str(e)) from None

    @user_errors("checking the recording")
    def check(self, audio_path):
        """Recording check text for the box under the recorder."""
        if not audio_path:
            return ""
        try:
            audio = decode_audio(audio_path)
        except (AudioDecodeError, FileNotFoundError) as e:
            return f"Problem: {e}"
        warnings = check_recording(audio.samples, audio.sample_rate, self.rules)
        head = f"{audio.duration:.1f} s at {audio.sample_rate} Hz."
        if not warnings:
            return f"{head} Good length."
        return head + " " + " ".join(str(w) for w in warnings)

    def timer_start(self):
        return time.time(), gr.Timer(active=True), self.rules.timer_text(0)

    def timer_tick(self, started):
        if not started:
            return self.rules.timer_text(0)
        return self.rules.timer_text(time.time() - started)

    def timer_stop(self, audio_path):
        return None, gr.Timer(active=False), self.check(audio_path)

    @user_errors("recording from the local microphone")
    def record_local(self, device_label, seconds):
        if not device_label:
            raise _error("Pick a local input device first.")
        try:
            index = int(str(device_label).split(":", 1)[0])
            audio = record(float(seconds), device=index)
        except (AudioDeviceError, ValueError) as e:
            raise _error(str(e)) from None
        out = new_temp_file("recordings", "local-mic", ".wav")  # pruned after a day
        write_wav(audio, out)
        return str(out), self.check(str(out))

    # -- transcription, caption, save ----------------------------------------------------------

    @user_errors("transcribing")
    def transcribe(self, audio_path, session):
        """-> session, raw ASR, transcript, segments, status."""
        s = copy.deepcopy(session or new_session())
        audio = self._decode(audio_path)
        warnings = check_recording(audio.samples, audio.sample_rate, self.rules)
        try:
            result = self.transcriber.transcribe(audio_path)
        except (AsrModelMissing, AsrError) as e:
            raise _error(str(e)) from None
        s.update(raw=result.text, segments=result.segments_as_dicts(), language=result.language,
                 asr_model=result.model, asr_model_sha256=result.model_sha256, asr_audio=str(audio_path))
        status = f"Transcribed {result.duration:.1f} s into {len(result.segments)} segments; edit the transcript if needed."
        if warnings:
            status += " " + " ".join(str(w) for w in warnings)
        if not result.segments:
            status += " No speech was recognised."
        if result.note:
            status += " " + result.note
        return s, result.text, result.text, result.segments_as_dicts(), status

    @user_errors("drafting the caption")
    def draft(self, transcript, project, session):
        """-> session, caption, status."""
        s = copy.deepcopy(session or new_session())
        texts: list[str] = []
        if s.get("image_id") is not None and s.get("project"):
            texts = get_store(s["project"], self.annotations_per_image).transcripts(s["image_id"])
        if (transcript or "").strip():
            texts.append(transcript)
        runner = self.get_runner() if self.get_runner else None
        gen, failures = None, []
        if runner is not None:
            def gen(prompt: str) -> str:
                try:
                    return runner.generate(None, prompt, max_new_tokens=CAPTION_MAX_NEW_TOKENS)
                except Exception as e:
                    failures.append(e)
                    raise
        result = draft_caption(texts, gen)
        if failures and not isinstance(failures[0], USER_ERRORS):
            raise failures[0]  # a bug, not a model message: user_errors logs it with a ref
        if not result.ok:
            return s, gr.update(), result.status
        s["caption_draft"] = result.text
        s["caption_model"] = getattr(runner, "name", None)
        return s, result.text, result.status

    @user_errors("saving the annotation")
    def save(self, annotator, project, audio_path, transcript, caption, session):
        """-> session, status, progress."""
        s, who, store = self._current(session, annotator, project, "save")
        audio = self._decode(audio_path)
        problems = blocking(check_recording(audio.samples, audio.sample_rate, self.rules))
        if problems:
            raise _error("Not saved. " + " ".join(str(w) for w in problems))
        if not (transcript or "").strip():
            raise _error("Not saved: the transcript is empty. Press 'Transcribe' (or type what you said) first.")
        if s.get("asr_audio") and s["asr_audio"] != str(audio_path) and transcript.strip() == s.get("raw", "").strip():
            raise _error("Not saved: the transcript is the one of an earlier recording. Press 'Transcribe' for this "
                         "recording (or edit the transcript to match it).")
        raw = s.get("raw", "") if s.get("asr_audio") == str(audio_path) else ""
        cap = (caption or "").strip() or None
        stored = store.caption(s["image_id"])
        if cap and stored and cap == stored["caption"]:
            cap = None  # shown as it is stored: keep its author and source
        draft = s.get("caption_draft")
        source = "manual" if not draft else ("model" if cap == draft else "model+edited")
        try:
            rec = store.save_annotation(
                s["image_id"], who, audio, raw, transcript,
                segments=s.get("segments", []) if raw else [],
                language=s.get("language"), asr_model=s.get("asr_model") if raw else None,
                caption=cap, caption_source=source, caption_model=s.get("caption_model") if draft else None,
                asr_model_sha256=s.get("asr_model_sha256") if raw else None,
            )
        except (AlreadyAnnotatedError, StoreError, ValueError) as e:
            raise _error(str(e)) from None
        except OSError as e:
            raise _error(f"Not saved: could not write the audio receipt ({e}). Free some disk space and save again.") from None
        status = (f"Saved annotation {rec.id} for image {rec.image_id}: {rec.duration:.1f} s of audio "
                  f"kept as {rec.audio_path} (sha256 {rec.audio_sha256[:12]}...)"
                  + ("" if cap or stored else "; no caption yet") + ". Press 'Next image' to continue.")
        s["image_id"] = None
        return s, status, store.progress().summary(who)

    def model_status(self) -> str:
        t = self.transcriber
        running = f"; loaded: {t.active_model}" if t.loaded else " (loads on the first transcription)"
        return f"Speech model: {t.model_name}{running}. {t.note}".strip()

    @user_errors("switching the speech model")
    def pick_model(self, name):
        """Admin: use another installed speech model from the next transcription on."""
        try:
            self.transcriber.set_model(name)
        except ValueError as e:
            raise _error(str(e)) from None
        return self.model_status()

    @user_errors("reading the progress")
    def progress(self, annotator, project):
        store = self._store(project)
        name = (annotator or "").strip() or None
        return store.progress().summary(name)


# ---------------------------------------------------------------------------------------------
# Layout


def create_annotate_tab(
    project_dir_default: str | None,
    get_runner: Callable[[], Any],
    transcriber: Transcriber | None = None,
    rules: TimerRules | None = None,
    annotations_per_image: int | None = None,
) -> dict[str, gr.components.Component]:
    """Build the Annotate tab's components inside the current ``gr.Blocks`` / ``gr.Tab`` context.

    Args:
        project_dir_default: the project folder shown at start (``launch.py --annotate <folder>``).
        get_runner: returns the loaded molmo_core runner, or None when no model is loaded.
        transcriber: the speech recogniser (default: ``Transcriber()``, i.e. $MOLMO_WHISPER_MODEL
            or small.en, loaded on first use).
        rules: timer rules (default: from $MOLMO_ANNOTATE_MIN_SECONDS / _TARGET_SECONDS, else 60/90 s).
        annotations_per_image: N for new projects (None keeps a project's stored value; default 1).

    Returns:
        The components by name (for the caller's own wiring and for tests).
    """
    rules = rules or TimerRules.from_env()
    h = AnnotateHandlers(get_runner, transcriber or Transcriber(), rules, annotations_per_image)
    session = gr.State(new_session())
    rec_started = gr.State(None)
    c: dict[str, Any] = {}
    with gr.Row():
        c["annotator"] = gr.Textbox(label="Annotator name", elem_id="annotate_annotator", scale=1)
        c["project"] = gr.Textbox(label="Project folder", value=project_dir_default or "",
                                  elem_id="annotate_project", scale=3)
        c["next"] = gr.Button("Next image", variant="primary", elem_id="annotate_next", scale=1)
    c["progress"] = gr.Textbox(label="Progress", interactive=False, elem_id="annotate_progress")
    with gr.Row():
        with gr.Column(scale=3):
            c["image"] = gr.Image(label="Image", type="filepath", interactive=False, elem_id="annotate_image",
                                  height=480)
            c["image_info"] = gr.Markdown("Enter your name and press **Next image**.", elem_id="annotate_image_info")
        with gr.Column(scale=2):
            gr.Markdown("#### Describe the image aloud\n" + "\n".join(
                f"{i + 1}. {q}" for i, q in enumerate(GUIDING_QUESTIONS)) + f"\n\n{rules.guidance()}")
            c["timer"] = gr.Markdown(rules.timer_text(0), elem_id="annotate_timer")
            c["audio"] = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Recording",
                                  elem_id="annotate_audio")
            c["check"] = gr.Textbox(label="Recording check", interactive=False, elem_id="annotate_check")
            devices, reason = list_input_devices()
            with gr.Accordion("Local microphone (desktop)", open=False, visible=True):
                if devices:
                    with gr.Row():
                        c["device"] = gr.Dropdown([d.label for d in devices], label="Input device",
                                                  value=next((d.label for d in devices if d.is_default), devices[0].label),
                                                  elem_id="annotate_device")
                        c["seconds"] = gr.Number(value=rules.target_seconds, label="Seconds", minimum=1,
                                                 elem_id="annotate_seconds")
                    c["record_local"] = gr.Button("Record from local microphone", elem_id="annotate_record_local")
                else:
                    c["local_note"] = gr.Markdown(f"Local microphone not available: {reason}",
                                                  elem_id="annotate_local_note")
    with gr.Row():
        c["transcribe"] = gr.Button("Transcribe", elem_id="annotate_transcribe")
        c["draft"] = gr.Button("Draft caption", elem_id="annotate_draft")
        c["save"] = gr.Button("Save", variant="primary", elem_id="annotate_save")
    with gr.Row():
        c["raw"] = gr.Textbox(label="Speech recognition (raw, kept as is)", interactive=False, lines=4,
                              elem_id="annotate_raw")
        c["transcript"] = gr.Textbox(label="Transcript (edit me)", lines=4, elem_id="annotate_transcript")
    with gr.Accordion("Segments with timestamps", open=False):
        c["segments"] = gr.JSON(label="Segments (timestamps)", elem_id="annotate_segments")
    c["caption"] = gr.Textbox(label="Caption (edit the draft)", lines=5, elem_id="annotate_caption")
    with gr.Row():
        c["skip"] = gr.Button("Skip image", elem_id="annotate_skip")
        c["flag_reason"] = gr.Textbox(label="Flag reason", placeholder="broken, offensive, duplicate ...",
                                      elem_id="annotate_flag_reason", scale=3)
        c["flag"] = gr.Button("Flag bad image", variant="stop", elem_id="annotate_flag")
    c["status"] = gr.Textbox(label="Status", interactive=False, elem_id="annotate_status")
    with gr.Accordion("Speech model (admin)", open=False):
        choices = [(m.label, m.name) for m in installed_models()]
        with gr.Row():
            c["asr_model"] = gr.Dropdown(choices, value=None, label="Installed speech models",
                                         elem_id="annotate_asr_model", scale=3)
            c["asr_pick"] = gr.Button("Use this model", elem_id="annotate_asr_pick", scale=1)
        c["asr_status"] = gr.Markdown(h.model_status(), elem_id="annotate_asr_status")
    timer = gr.Timer(1.0, active=False)
    c["session"], c["timer_tick"] = session, timer

    next_outputs = [session, c["image"], c["image_info"], c["caption"], c["audio"], c["raw"],
                    c["transcript"], c["check"], c["status"], c["progress"]]
    c["next"].click(h.next_image, [c["annotator"], c["project"], session], next_outputs, api_name="annotate_next")
    c["skip"].click(h.skip, [c["annotator"], c["project"], session], next_outputs, api_name="annotate_skip")
    c["flag"].click(h.flag, [c["annotator"], c["project"], c["flag_reason"], session], next_outputs,
                    api_name="annotate_flag")
    c["audio"].start_recording(h.timer_start, None, [rec_started, timer, c["timer"]],
                               api_name="annotate_recording_started")
    timer.tick(h.timer_tick, [rec_started], [c["timer"]], api_name="annotate_timer_tick", show_progress="hidden")
    c["audio"].stop_recording(h.timer_stop, [c["audio"]], [rec_started, timer, c["check"]],
                              api_name="annotate_recording_stopped")
    c["audio"].upload(h.check, [c["audio"]], [c["check"]], api_name="annotate_check_upload")
    c["transcribe"].click(h.transcribe, [c["audio"], session],
                          [session, c["raw"], c["transcript"], c["segments"], c["status"]],
                          api_name="annotate_transcribe")
    c["draft"].click(h.draft, [c["transcript"], c["project"], session], [session, c["caption"], c["status"]],
                     api_name="annotate_draft_caption")
    c["save"].click(h.save, [c["annotator"], c["project"], c["audio"], c["transcript"], c["caption"], session],
                    [session, c["status"], c["progress"]], api_name="annotate_save")
    c["asr_pick"].click(h.pick_model, [c["asr_model"]], [c["asr_status"]], api_name="annotate_pick_asr_model")
    if "record_local" in c:
        c["record_local"].click(h.record_local, [c["device"], c["seconds"]], [c["audio"], c["check"]],
                                api_name="annotate_record_local")
    c["handlers"] = h
    return c
