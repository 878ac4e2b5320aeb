"""The Annotate tab: speak about an image, review the transcript, save a PixMo-Cap record.

Layout and wiring only: the session and its rules (next image, transcription bookkeeping, caption
source, stale transcripts, save) are ``annotate.session``'s, the rest ``annotate/``'s. Handlers are
plain methods ``(inputs..., session) -> outputs`` so tests can call them directly, and every event has
an ``api_name`` starting with ``annotate_`` for gradio_client. User-facing failures are ``gr.Error``
(through ``user_errors``) with a message saying what to do, never a traceback.

Identity: with login the annotator is the signed-in account (``app.access.current_user``); the name
box is hidden and any name sent is ignored. An annotator who is not an admin never sees what another
annotator wrote: progress without others' names and counts, no caption of someone else in the caption
box, caption drafts from their own transcript only. Without login (one person on loopback) the typed
name is used and everything is shown.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from annotate.asr import Transcriber, installed_models
from annotate.audio import AudioDeviceError, list_input_devices, record, write_wav
from annotate.protocol import GUIDING_QUESTIONS, TimerRules
from annotate.session import AnnotationSession, annotator_name, progress_text, recording_check
from annotate.store import Store, StoreError
from molmo_core.preprocessing import MAX_FILE_BYTES, MAX_IMAGE_PIXELS

from .access import current_user
from .handlers import USER_ERRORS, user_errors
from .paths import PathRefused, Roots
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


def get_store(project_dir: str | None, annotations_per_image: int | None = None, roots: Roots | None = None) -> Store:
    """One ``Store`` per project folder per process (opened, and scanned, on first use).

    With ``roots``, a folder outside the data root is refused (a store writes into its folder)."""
    key = _project_key(project_dir)
    if key is None:
        raise _error("Pick a project first." if roots is not None else
                     "Enter a project folder (a folder of images, or one holding images.txt).")
    if roots is not None:
        try:
            key = str(roots.inside(key, "Project folder", write=True))
        except PathRefused as e:
            raise _error(str(e)) from None
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


def new_session() -> AnnotationSession:
    return AnnotationSession()


def _caller(typed_name: str | None) -> tuple[str | None, bool]:
    """(the annotator name to use, whether the caller may see what other annotators wrote and did).

    With login the name is the signed-in account's, whatever was typed; only admins see others. Without
    login (one person on loopback) it is the typed name, and everything is visible."""
    user = current_user()
    if user is not None:
        return user.name, user.is_admin
    return typed_name, True


# ---------------------------------------------------------------------------------------------
# Handlers


class AnnotateHandlers:
    """The tab's handlers: Gradio values in, ``annotate.session`` does the work, Gradio values out.

    Bound to a transcriber, timer rules, the runner getter and, when given, the data roots (projects
    are then names under the data root)."""

    def __init__(self, get_runner: Callable[[], Any], transcriber: Transcriber, rules: TimerRules,
                 annotations_per_image: int | None = None, roots: Roots | None = None) -> None:
        self.get_runner = get_runner
        self.transcriber = transcriber
        self.rules = rules
        self.annotations_per_image = annotations_per_image
        self.roots = roots

    def _project_path(self, project: str | None) -> str | None:
        """The project box's value -> the project folder's absolute path (None when empty).

        With roots the value is a project name under the data root (anything else is refused)."""
        if self.roots is None:
            return _project_key(project)
        if not (project or "").strip():
            return None
        try:
            return str(self.roots.project(project))
        except PathRefused as e:
            raise _error(str(e)) from None

    def _open(self, path: str | None) -> Store:
        return get_store(path, self.annotations_per_image, self.roots)

    def _store(self, project: str | None) -> Store:
        if self.roots is not None and not (project or "").strip():
            raise _error("Pick a project from the list first.")
        return self._open(self._project_path(project))

    # -- identity and projects -------------------------------------------------------------------

    @user_errors("reading who is signed in")
    def whoami(self):
        """On page load: the name box without login; 'Signed in as ...' with it (admin box for admins)."""
        user = current_user()
        if user is None:
            return gr.update(visible=True), gr.update(value="", visible=False), gr.update(visible=True)
        return (gr.update(visible=False), gr.update(value=f"Signed in as **{user.name}**", visible=True),
                gr.update(visible=user.is_admin))

    @user_errors("listing the projects")
    def projects(self, current=None):
        names = self.roots.projects() if self.roots is not None else []
        return gr.update(choices=names, value=current if current in names else None)

    # -- queue -----------------------------------------------------------------------------------

    @user_errors("getting the next image")
    def next_image(self, annotator, project, session):
        """-> session, image, image info, caption, audio, raw, transcript, check, status, progress."""
        who, see_all = _caller(annotator)
        annotator_name(who)  # a missing name is said before anything about the project
        store = self._store(project)
        s = AnnotationSession()
        nxt = s.start(store, who, self.rules.guidance(), others=see_all)
        image_value = None
        if nxt.task is not None and nxt.task.abs_path:
            image_value, problem = _display_image(nxt.task.abs_path)
            if problem:
                nxt.notes.append(problem)
        progress = progress_text(store, s.annotator, others=see_all)
        return (s, image_value, nxt.info, nxt.caption, None, "", "", "", nxt.status, progress)

    @user_errors("skipping the image")
    def skip(self, annotator, project, session):
        s = AnnotationSession.restore(session)
        who, _ = _caller(annotator)
        image_id = s.skip(self._open, self._project_path(project), who)
        out = self.next_image(annotator, project, s)
        return out[:8] + (f"Skipped image {image_id}. " + out[8], out[9])

    @user_errors("flagging the image")
    def flag(self, annotator, project, reason, session):
        s = AnnotationSession.restore(session)
        who, _ = _caller(annotator)
        image_id = s.flag(self._open, self._project_path(project), who, reason)
        out = self.next_image(annotator, project, s)
        return out[:8] + (f"Flagged image {image_id} ({reason.strip()}). " + out[8], out[9])

    # -- recording -------------------------------------------------------------------------------

    @user_errors("checking the recording")
    def check(self, audio_path):
        """Recording check text for the box under the recorder."""
        return recording_check(audio_path, self.rules)

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

    # -- transcription, caption, save ------------------------------------------------------------

    @user_errors("transcribing")
    def transcribe(self, audio_path, session):
        """-> session, raw ASR, transcript, segments, status."""
        s = AnnotationSession.restore(session)
        out = s.transcribe(self.transcriber, audio_path, self.rules)
        return s, out.raw, out.raw, out.segments, out.status

    @user_errors("drafting the caption")
    def draft(self, transcript, project, session):
        """-> session, caption, status."""
        s = AnnotationSession.restore(session)
        _, see_all = _caller(None)
        runner = self.get_runner() if self.get_runner else None
        failures: list[Exception] = []

        def generate(prompt: str) -> str:
            try:
                return runner.generate(None, prompt, max_new_tokens=CAPTION_MAX_NEW_TOKENS)
            except Exception as e:
                failures.append(e)
                raise
        result = s.draft(self._open, transcript, generate if runner is not None else None,
                         getattr(runner, "name", None), others=see_all)
        if failures and not isinstance(failures[0], USER_ERRORS):
            raise failures[0]  # a bug, not a model message: user_errors logs it with a ref
        if not result.ok:
            return s, gr.update(), result.status
        return s, result.text, result.status

    @user_errors("saving the annotation")
    def save(self, annotator, project, audio_path, transcript, caption, session):
        """-> session, status, progress."""
        s = AnnotationSession.restore(session)
        who, see_all = _caller(annotator)
        saved = s.save(self._open, self._project_path(project), who, audio_path, transcript, caption, self.rules)
        return s, saved.status, progress_text(self._open(s.project), saved.record.annotator, others=see_all)

    def model_status(self) -> str:
        t = self.transcriber
        running = f"; loaded: {t.active_model}" if t.loaded else " (loads on the first transcription)"
        return f"Speech model: {t.model_name}{running}. {t.note}".strip()

    @user_errors("switching the speech model")
    def pick_model(self, name):
        """Admin: use another installed speech model from the next transcription on."""
        user = current_user()
        if user is not None and not user.is_admin:
            raise _error(f"{user.name} may not switch the speech model: only admins may.")
        try:
            self.transcriber.set_model(name)
        except ValueError as e:
            raise _error(str(e)) from None
        return self.model_status()

    @user_errors("reading the progress")
    def progress(self, annotator, project):
        """The progress line: with login, for the caller (others' counts for admins only)."""
        store = self._store(project)
        who, see_all = _caller(annotator)
        return progress_text(store, (who or "").strip() or None, others=see_all)


def _default_project(default: str | None, roots: Roots, names: list[str]) -> str | None:
    """The project name to preselect: ``default`` when it names a listed project (or is its folder)."""
    text = (default or "").strip()
    if not text:
        return None
    if text in names:
        return text
    folder = Path(text).expanduser().resolve()
    return folder.name if folder.parent == roots.data_root and folder.name in names else None


# ---------------------------------------------------------------------------------------------
# Layout


def create_annotate_tab(
    project_dir_default: str | None,
    get_runner: Callable[[], Any],
    transcriber: Transcriber | None = None,
    rules: TimerRules | None = None,
    annotations_per_image: int | None = None,
    roots: Roots | None = None,
) -> dict[str, gr.components.Component]:
    """Build the Annotate tab's components inside the current ``gr.Blocks`` / ``gr.Tab`` context.

    Args:
        project_dir_default: the project shown at start (``launch.py --annotate <folder>``): a folder,
            or with ``roots`` a project name (or a folder directly under the data root).
        get_runner: returns the loaded molmo_core runner, or None when no model is loaded.
        transcriber: the speech recogniser (default: ``Transcriber()``, i.e. $MOLMO_WHISPER_MODEL
            or small.en, loaded on first use).
        rules: timer rules (default: from $MOLMO_ANNOTATE_MIN_SECONDS / _TARGET_SECONDS, else 60/90 s).
        annotations_per_image: N for new projects (None keeps a project's stored value; default 1).
        roots: the data roots. Given, the project is picked from a (refreshable) list of the projects
            under the data root and resolved with ``roots.project(name)``; None, it is a free folder box.

    Returns:
        The components by name (for the caller's own wiring and for tests).
    """
    rules = rules or TimerRules.from_env()
    h = AnnotateHandlers(get_runner, transcriber or Transcriber(), rules, annotations_per_image, roots)
    session = gr.State(new_session())
    rec_started = gr.State(None)
    c: dict[str, Any] = {}
    with gr.Row():
        c["annotator"] = gr.Textbox(label="Annotator name", elem_id="annotate_annotator", scale=1)
        c["signed_in"] = gr.Markdown("", visible=False, elem_id="annotate_signed_in")
        if roots is None:
            c["project"] = gr.Textbox(label="Project folder", value=project_dir_default or "",
                                      elem_id="annotate_project", scale=3)
        else:
            names = roots.projects()
            c["project"] = gr.Dropdown(names, value=_default_project(project_dir_default, roots, names),
                                       label="Project", elem_id="annotate_project", scale=3,
                                       allow_custom_value=True)  # checked by roots.project on the server
            c["projects_refresh"] = gr.Button("Refresh list", elem_id="annotate_projects_refresh", scale=0,
                                              min_width=100)
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
    with gr.Accordion("Speech model (admin)", open=False) as c["asr_admin"]:
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
    gr.on(None, h.whoami, [], [c["annotator"], c["signed_in"], c["asr_admin"]], api_name="annotate_whoami",
          api_visibility="undocumented", queue=False)
    if roots is not None:
        c["projects_refresh"].click(h.projects, [c["project"]], [c["project"]], api_name="annotate_projects")
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
