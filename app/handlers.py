"""Thin event handlers: (inputs, state) -> outputs. They call the service and render; no layout here.

Every handler is wrapped in `user_errors(action)`: input errors (`USER_ERRORS`: bad images, empty
prompts, no model, a busy loader, unreadable audio, a refused database write ...) reach the user
verbatim as `gr.Error`; anything else is a bug, logged with its traceback and a short reference id,
and shown as an apology quoting that id, so the server keeps serving, the browser never sees a
traceback and the log line can be found from what the user reports.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import gradio as gr
from PIL import Image

from annotate.asr import AsrError, AsrModelMissing
from annotate.audio import AudioDecodeError, AudioDeviceError
from annotate.store import StoreError
from molmo_core.errors import CheckpointError, ModelUnloadedError, MolmoInputError
from molmo_core.outputs import Point, strip_tags

from .paths import PathRefused, Roots
from .render import draw_clock_face, draw_count_badge, draw_points
from .service import MolmoService, NoModelError, ServiceBusyError, answer_points, prepare_image
from .tempfiles import new_temp_file

log = logging.getLogger("molmo_studio")

# Errors whose message is written for the user (what was found, what was expected, what to do).
# Plain ValueError / TypeError are not here: raised deep inside a handler they are bugs, not input errors.
USER_ERRORS: tuple[type[Exception], ...] = (
    MolmoInputError, ModelUnloadedError, NoModelError, ServiceBusyError, CheckpointError,  # model side
    StoreError, AsrModelMissing, AsrError, AudioDecodeError, AudioDeviceError,  # annotation side
    PathRefused,  # a path outside the allowed folders
)
POINT_TABLE_HEADERS = ["#", "label", "x (px)", "y (px)"]
MULTI_TABLE_HEADERS = ["image", "#", "label", "x (px)", "y (px)"]
QUANTIZE_LABELS = {"none (bf16 on GPU, fp32 on CPU)": None, "8bit": "8bit", "4bit": "4bit"}


def _error(message: str) -> gr.Error:
    return gr.Error(message, duration=15, print_exception=False)


def _as_user_error(e: Exception, action: str, handler: str) -> gr.Error:
    """`e` -> the gr.Error the user sees. Call from inside the `except` block (the log takes the traceback)."""
    if isinstance(e, gr.Error):
        return e
    if isinstance(e, USER_ERRORS):
        return _error(str(e) or f"{type(e).__name__} while {action}; check the input and try again.")
    ref = uuid.uuid4().hex[:8]
    log.exception("Unexpected error in %s while %s (ref %s)", handler, action, ref)
    return _error(f"Something went wrong on our side while {action} (ref {ref}); the details are in the "
                  "server log. The server is still running: try again, and quote the ref if it keeps happening.")


def user_errors(action: str) -> Callable:
    """Decorator for every UI handler (plain function or generator): exceptions become gr.Error.

    `action` completes "... while {action}" in the messages, e.g. "pointing". Input errors
    (`USER_ERRORS`) and a handler's own gr.Error are shown as they are; any other exception is
    logged with its traceback and a reference id, and the user gets an apology quoting that id.
    """

    def wrap(fn: Callable) -> Callable:
        name = getattr(fn, "__qualname__", repr(fn))
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator:
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 -- sorted into user error / bug right here
                    raise _as_user_error(e, action, name) from None
            return gen_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 -- sorted into user error / bug right here
                raise _as_user_error(e, action, name) from None
        return wrapper

    return wrap


# ---------------------------------------------------------------------------------------- pure helpers


def points_from_json(result: dict | None) -> list[Point]:
    if not result:
        return []
    return [Point(float(p["x"]), float(p["y"]), str(p.get("label", "")), int(p["index"]))
            for p in result.get("points", [])]


def points_table(points: Sequence[Point]) -> list[list]:
    return [[p.index, p.label, round(p.x, 1), round(p.y, 1)] for p in points]


def multi_points_table(result: dict) -> list[list]:
    """A multi-image result -> rows [image, #, label, x, y] (image 1-based)."""
    return [[im["image"], p["index"], p.get("label", ""), round(float(p["x"]), 1), round(float(p["y"]), 1)]
            for im in result.get("images", []) for p in im.get("points", [])]


def file_paths(files: Any) -> list[str]:
    """Uploaded files (a gr.File with file_count="multiple", or a gallery) -> their paths, in order.

    Accepts paths, {"path": ...} / FileData objects with `.path`, and gallery (path, caption) pairs."""
    if files is None:
        return []
    if isinstance(files, (str, Path)) or isinstance(files, dict) or hasattr(files, "path"):
        files = [files]
    out = []
    for f in files:
        if isinstance(f, (tuple, list)) and f:
            f = f[0]
        if isinstance(f, dict):
            f = f.get("path") or f.get("name")
        elif hasattr(f, "path"):
            f = f.path
        if f:
            out.append(str(f))
    return out


def count_markdown(n: int | None, phrase: str = "") -> str:
    if n is None:
        return "### Count: ? (the answer states no count)"
    return f"### Count: {n}" + (f" {phrase}" if phrase else "")


def write_json(result: dict, stem: str) -> str:
    """Write `result` to a fresh temp file (for the download button) and return its path."""
    path = new_temp_file("downloads", stem, ".json")  # in the app's temp folder, pruned after a day
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return str(path)


def overlay(image: Any, points: Sequence[Point], count: int | None) -> Image.Image:
    """Numbered markers per label plus a count badge, on the image as the user gave it."""
    base = Image.fromarray(prepare_image(image))
    out = draw_points(base, points)
    if count is not None:
        out = draw_count_badge(out, count)
    return out


def chat_messages(history: Sequence[Sequence[str]]) -> list[dict]:
    """[(question, answer), ...] -> Chatbot messages; point tags shown as their labels."""
    messages: list[dict] = []
    for q, a in history:
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": strip_tags(a)})
    return messages


# ---------------------------------------------------------------------------------------- handlers


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def checkpoint_source(text: str | None, roots: Roots | None) -> str:
    """A hub id as typed, or a local checkpoint folder checked to lie inside the allowed roots.

    A name that looks like a hub id ("allenai/Molmo-7B-D-0924") but exists as a local folder is a folder,
    and checked like one."""
    source = (text or "").strip()
    if not source or roots is None:  # nothing typed: the service says what to choose
        return source
    p = Path(source).expanduser()
    if HUB_ID.match(source) and not p.is_absolute() and not p.exists():
        return source
    try:
        return str(roots.inside(source, "Checkpoint folder"))
    except PathRefused as e:
        raise _error(str(e)) from None


class Handlers:
    """The app's handlers, bound to the shared service (and the allowed folders, when confined)."""

    def __init__(self, service: MolmoService, roots: Roots | None = None):
        self.service = service
        self.roots = roots

    # ------------------------------------------------------------------ model panel

    @user_errors("reading the model status")
    def status(self) -> tuple[str, dict]:
        st = self.service.status()
        return st.markdown(), st.to_json()

    @user_errors("reading the model status")
    def status_tick(self) -> tuple[str, dict, gr.Timer]:
        """Status for the polling timer, which stops itself once no load is running."""
        st = self.service.status()
        return st.markdown(), st.to_json(), gr.Timer(active=st.load.phase == "loading")

    def page_load(self) -> tuple[str, dict, gr.Timer]:
        """On page load: the current status, and poll only while a model is loading."""
        return self.status_tick()

    @user_errors("loading the model")
    def load_model(self, source: str, quantize: str | None, max_crops: float,
                   progress: gr.Progress = gr.Progress()) -> tuple[str, dict]:
        quant = QUANTIZE_LABELS.get(quantize, quantize) if quantize else None
        thread = self.service.load(checkpoint_source(source, self.roots), quant, int(max_crops or 12))
        while thread.is_alive():
            st = self.service.status().load
            progress(st.fraction, desc=st.message)
            thread.join(0.25)
        st = self.service.status()
        if st.load.phase == "error":
            raise _error(f"Could not load {st.load.source}: {st.load.error}")
        return st.markdown(), st.to_json()

    # ------------------------------------------------------------------ point & count

    @user_errors("pointing")
    def point(self, image: Any, phrase: str) -> tuple[str, dict]:
        result = self.service.point(image, phrase)
        return result.answer, result.to_json()

    @user_errors("counting")
    def count(self, image: Any, phrase: str) -> tuple[str, dict]:
        result = self.service.count(image, phrase)
        return result.answer, result.to_json()

    @user_errors("drawing the points")
    def render_points(self, image: Any, result: dict | None) -> tuple[Image.Image, str, list[list], str]:
        """(image, parsed result) -> overlay, count badge text, points table, JSON file to download."""
        if not result:
            raise _error("Nothing to draw yet: press Point or Count first.")
        points = points_from_json(result)
        n = result.get("count") if result.get("task") == "count" else len(points)
        image_out = overlay(image, points, n)
        return (image_out, count_markdown(n, result.get("phrase", "")), points_table(points),
                write_json(result, result.get("task", "points")))

    # ------------------------------------------------------------------ several images (Molmo2)

    @user_errors("pointing")
    def point_multi(self, files: Any, phrase: str) -> tuple[str, dict]:
        """One question over all uploaded images -> (answer, parsed result with points per image)."""
        result = self.service.point_multi(file_paths(files), phrase)
        return result.answer, result.to_json()

    @user_errors("counting")
    def count_multi(self, files: Any, phrase: str) -> tuple[str, dict]:
        result = self.service.count_multi(file_paths(files), phrase)
        return result.answer, result.to_json()

    @user_errors("drawing the points")
    def render_points_multi(self, files: Any, result: dict | None) -> tuple[list, str, list[list], str]:
        """(images, multi-image result) -> one overlay per image for a gallery (with captions), the count
        text, a points table with an image column, and the JSON file to download."""
        if not result or not result.get("multi"):
            raise _error("Nothing to draw yet: press Point in all images or Count over all images first.")
        paths = file_paths(files)
        images = result.get("images", [])
        if len(paths) != len(images):
            raise _error(f"The images changed since the answer ({len(images)} answered, {len(paths)} now); "
                         "ask again.")
        phrase = result.get("phrase", "")
        gallery = []
        for path, im in zip(paths, images):
            points = points_from_json(im)
            gallery.append((overlay(path, points, len(points)),
                            f"Image {im['image']}: {len(points)} point{'s' if len(points) != 1 else ''}"))
        total = result.get("count")
        text = count_markdown(total, phrase)
        if result.get("task") == "count" and total is not None:
            n_points = sum(len(im.get("points", [])) for im in images)
            if n_points != total:
                text += f"  \n({n_points} points drawn)"
        if result.get("unplaced"):
            text += f"  \n{result['unplaced']} point(s) named an image that was not given; not drawn."
        return gallery, text, multi_points_table(result), write_json(result, f"{result.get('task', 'points')}_multi")

    # ------------------------------------------------------------------ clock

    @user_errors("reading the clock")
    def read_clock(self, image: Any) -> tuple[str, dict]:
        result = self.service.read_clock(image)
        return result.answer, result.to_json()

    @user_errors("drawing the clock face")
    def render_clock(self, result: dict | None) -> tuple[str, Image.Image | None]:
        """Parsed time -> the time shown large and an analog face drawn from it."""
        if not result or result.get("time") is None:
            return "# --:--\nThe answer contains no valid time (H:MM or H:MM:SS).", None
        face = draw_clock_face(result["hour"], result["minute"], result.get("second"), size=320)
        return f"# {result['time']}", face

    # ------------------------------------------------------------------ caption

    @user_errors("captioning")
    def caption(self, image: Any, style: str, length_hint: float, chat_format: bool = False) -> tuple[str, dict]:
        hint = None if length_hint is None or int(length_hint) <= 0 else int(length_hint)
        result = self.service.caption(image, style or "long_caption", hint, chat_format=bool(chat_format))
        return result.answer, result.to_json()

    # ------------------------------------------------------------------ ask

    @user_errors("answering")
    def ask(self, image: Any, question: str, history: list | None) -> Iterator[tuple[list, list, str, dict]]:
        """Stream the answer: yields (chat messages, history, answer so far, parsed result)."""
        history = [tuple(turn) for turn in (history or [])]
        stream = self.service.ask_stream(image, question, history)
        question = question.strip()
        text = ""
        for text in stream:
            yield chat_messages(history + [(question, text)]), history, text, {"task": "ask", "partial": True}
        text = text.strip()
        new_history = [list(t) for t in history] + [[question, text]]
        points = []
        if image is not None:
            rgb = prepare_image(image)
            points = answer_points(text, rgb.shape[1], rgb.shape[0], self.service.family or "molmo")
        result = {"task": "ask", "partial": False, "answer": text, "turn": len(new_history),
                  "points": [{"index": p.index, "x": round(p.x, 1), "y": round(p.y, 1), "label": p.label}
                             for p in points]}
        yield chat_messages(new_history), new_history, text, result

    def clear_chat(self) -> tuple[list, list, str]:
        return [], [], ""

    def clear_text(self) -> str:
        return ""
