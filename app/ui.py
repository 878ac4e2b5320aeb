"""`build_demo(service) -> gr.Blocks`: layout and wiring only. The work is in `handlers.py`.

Tabs: Model, Point & Count, Clock, Ask, Caption, Video (Molmo2), Annotate, Train, Eval, Review and Admin;
which ones a signed-in user sees, and which events they may run, is `app.access` (TAB_RULES, POLICY).
Every event has an `api_name`, so `gradio_client` can drive the app:
`/point`, `/count`, `/read_clock`, `/ask`, `/caption` (image + text -> answer text + parsed JSON),
`/point_multi`, `/count_multi` (several images + text, Molmo2 -> answer + points per image) and
`/render_point_multi`, `/render_count_multi` (one overlay per image, table with an image column),
`/load_model`, `/status`; the Eval tab's `/eval_start`, `/eval_status`, `/eval_stop`, `/eval_example`,
`/eval_prev`, `/eval_next`; the Video tab's `/video_*`, the Annotate tab's `/annotate_*`, the Review tab's
`/review_*` and the Admin tab's `/admin_*`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr
from molmo_core.prompts import DEFAULT_CAPTION_LENGTH_HINT

from .access import ADMIN, ANNOTATOR, TASKS, AccessControl, POLICY, current_user, guard_events
from .admin_tab import create_admin_tab
from .annotate_tab import create_annotate_tab
from .crops import MAX_CROPS_DEFAULT, MAX_CROPS_MAX, MAX_CROPS_MIN
from .eval_tab import create_eval_tab
from .handlers import MULTI_TABLE_HEADERS, POINT_TABLE_HEADERS, QUANTIZE_LABELS, Handlers
from .paths import Roots
from .review_tab import create_review_tab
from .service import MolmoService
from .tempfiles import GRADIO_DELETE_CACHE, temp_dir
from .train_tab import create_train_tab
from .video_tab import create_video_tab

log = logging.getLogger("molmo_studio")

ASSETS = Path(__file__).resolve().parent.parent / "assets"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TAB_IDS = ("model", "point", "clock", "ask", "caption", "video", "annotate", "train", "eval", "review", "admin")
# Who sees which tab (cosmetic: the guard in app.access enforces the same rules on every event).
TAB_RULES = {"model": ADMIN, "point": TASKS, "clock": TASKS, "ask": TASKS, "caption": TASKS, "video": TASKS,
             "annotate": ANNOTATOR, "train": ADMIN, "eval": ADMIN, "review": ADMIN, "admin": ADMIN}
HUB_CHOICES = ["allenai/Molmo-7B-D-0924", "allenai/Molmo-7B-O-0924", "allenai/MolmoE-1B-0924",
               "allenai/Molmo-72B-0924", "allenai/Molmo2-4B", "allenai/Molmo2-8B", "allenai/Molmo2-O-7B"]
# The multi-image events (model step, drawing step) per task. "point_multi" / "count_multi" would need their
# own entries in app.access.POLICY (it lists "point" and "count" as exact names); "ask*" and "render_*" are
# task rules already.
MULTI_EVENTS = {"point": ("point_multi", "render_point_multi"), "count": ("count_multi", "render_count_multi")}
# Browsers give a page the microphone only in a secure context (HTTPS, or a loopback address): say so
# in the Annotate tab instead of a Record button that silently does nothing.
INSECURE_MIC_HTML = """<div id="insecure-mic" style="display:none; padding:0.8em; border:2px solid #c0392b;
border-radius:6px; background:#fdecea; color:#611a15">
<b>No microphone here: this page was opened over plain HTTP (<span class="origin"></span>).</b>
Browsers only allow recording on secure pages. Open the app over <b>https://</b> (ask your admin to start it
with <code>--https</code>), or on this machine through http://127.0.0.1. Until then you can upload a recording
made with another program.</div>"""
INSECURE_MIC_JS = """() => {
  if (!window.isSecureContext) {
    const box = document.getElementById('insecure-mic');
    if (box) { box.style.display = 'block'; box.querySelector('.origin').textContent = window.location.origin; }
  }
}"""
# Gradio 6 takes CSS at launch: demo.launch(css=CSS).
# Phrases for the shipped example photos (assets/LICENSES.md); other files use their name.
EXAMPLE_PHRASES = {"chelsea": "the cat's eyes", "coffee": "the cup", "coins": "coins"}
CSS = """
#clock_time h1 { font-size: 4.5rem; line-height: 1.1; text-align: center; margin: 0.5rem 0; }
#pc_count_badge h3 { font-size: 1.8rem; }
"""


def _image_input(elem_id: str, label: str = "Image") -> gr.Image:
    """An image upload whose decoding errors (a non-image file, a decompression bomb) become a clear
    gr.Error instead of Gradio's generic "Error". type="filepath": the service checks the header's
    size before decoding, and composites transparency on white.

    (Wrapping the instance's preprocess rather than subclassing gr.Image: Gradio writes a .pyi stub
    next to the source file of every Component subclass.)"""
    image = gr.Image(label=label, type="filepath", sources=["upload", "clipboard"], elem_id=elem_id, height=420)
    stock_preprocess = image.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return stock_preprocess(payload)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            name = getattr(payload, "orig_name", None) or "The upload"
            raise gr.Error(f"{name} is not a readable image or is too large ({type(e).__name__}); "
                           "upload a JPEG, PNG or WebP photo of at most 100 megapixels.",
                           duration=15, print_exception=False) from None

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


# ---------------------------------------------------------------------------------------- examples


def example_images(folder: Path = ASSETS) -> tuple[list[list[str]], list[str]]:
    """(point/count examples as [path, phrase], clock image paths) from `assets/`.

    The phrase comes from `assets/examples.json` ({"file.png": "coins"}) when present, else from the
    file name ("coins.png" -> "coins"). Clock images are those whose name contains "clock"; when
    there are none, three are rendered with our own clock renderer into a temp folder.
    """
    import json

    phrases: dict[str, str] = {}
    manifest = folder / "examples.json"
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                phrases = {str(k): str(v) for k, v in data.items() if isinstance(v, str)}
        except (OSError, ValueError):
            log.warning("Ignoring unreadable %s", manifest)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    clocks = [str(p) for p in files if "clock" in p.name.lower()]
    points = []
    for p in files:
        if "clock" in p.name.lower():
            continue
        phrase = phrases.get(p.name) or EXAMPLE_PHRASES.get(p.stem.lower()) or " ".join(p.stem.replace("_", " ").replace("-", " ").split()) or "objects"
        points.append([str(p), phrase])
    if not clocks:
        clocks = _rendered_clocks()
    return points[:12], clocks[:8]


def _rendered_clocks(n: int = 3) -> list[str]:
    from molmo_core.synthetic.clocks import random_clock

    out = temp_dir("clock_examples")  # re-rendered below when pruned
    paths = []
    for seed in range(n):
        path = out / f"clock_{seed}.png"
        if not path.is_file():
            image, _ = random_clock(seed, size=384)
            image.save(path)
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------------------------------- tabs


def _model_tab(h: Handlers) -> list[gr.components.Component]:
    gr.Markdown("Load a Molmo v1 or Molmo2 checkpoint: a hub id or a local folder (the family is read from its "
                "config.json). Loading another model frees the current one first.")
    with gr.Row():
        with gr.Column(scale=3):
            source = gr.Dropdown(HUB_CHOICES, value=_model_source(h.service), allow_custom_value=True, label="Checkpoint (hub id or local folder)",
                                 elem_id="model_source")
            quantize = gr.Radio(list(QUANTIZE_LABELS), value=next(iter(QUANTIZE_LABELS)),
                                label="Precision / quantization", elem_id="model_quantize")
            max_crops = gr.Slider(MAX_CROPS_MIN, MAX_CROPS_MAX, value=MAX_CROPS_DEFAULT, step=1,
                                  label="Max crops (more = finer detail, more memory)", elem_id="model_max_crops")
            with gr.Row():
                load = gr.Button("Load", variant="primary", elem_id="model_load")
                refresh = gr.Button("Refresh status", elem_id="model_refresh")
        with gr.Column(scale=2):
            status_md = gr.Markdown(h.service.status().markdown(), elem_id="model_status")
            with gr.Accordion("Status details (JSON)", open=False):
                status_json = gr.JSON(elem_id="model_status_json")
    load.click(h.load_model, [source, quantize, max_crops], [status_md, status_json], api_name="load_model",
               concurrency_limit=1, concurrency_id="load")
    refresh.click(h.status, None, [status_md, status_json], api_name="status")
    # While a background load runs (e.g. the start-up model), poll its progress; idle otherwise.
    timer = gr.Timer(1.0, active=False)
    timer.tick(h.status_tick, None, [status_md, status_json, timer], api_name="status_tick",
               api_visibility="undocumented", show_progress="hidden", queue=False)
    return [status_md, status_json, timer]


def _point_tab(h: Handlers, examples: list[list[str]]) -> None:
    with gr.Row():
        with gr.Column():
            image = _image_input("pc_image")
            phrase = gr.Textbox(label="What to point at / count", placeholder="e.g. coins, the dogs, people",
                                elem_id="pc_phrase")
            with gr.Row():
                point_btn = gr.Button("Point", variant="primary", elem_id="pc_point")
                count_btn = gr.Button("Count", variant="primary", elem_id="pc_count")
            if examples:
                gr.Examples(examples, [image, phrase], label="Examples (click one)", examples_per_page=12)
        with gr.Column():
            overlay = gr.Image(label="Points", type="pil", interactive=False, elem_id="pc_overlay", height=420,
                               format="png")
            badge = gr.Markdown("", elem_id="pc_count_badge")
            answer = gr.Textbox(label="Model answer (raw)", interactive=False, lines=2, elem_id="pc_answer")
    with gr.Row():
        table = gr.Dataframe(headers=POINT_TABLE_HEADERS, datatype=["number", "str", "number", "number"],
                             label="Points in pixels", interactive=False, elem_id="pc_table")
        with gr.Column():
            download = gr.File(label="Download points (JSON)", interactive=False, elem_id="pc_download")
            with gr.Accordion("Parsed result (JSON)", open=False):
                result = gr.JSON(elem_id="pc_json")
    render_outputs = [overlay, badge, table, download]
    for btn, fn, name in ((point_btn, h.point, "point"), (count_btn, h.count, "count")):
        ev = btn.click(fn, [image, phrase], [answer, result], api_name=name)
        ev.success(h.render_points, [image, result], render_outputs, api_name=f"render_{name}",
                   api_visibility="undocumented")
    ev = phrase.submit(h.point, [image, phrase], [answer, result], api_name="point_submit",
                       api_visibility="undocumented")
    ev.success(h.render_points, [image, result], render_outputs, api_name="render_point_submit",
               api_visibility="undocumented")
    _multi_image(h, phrase)


def _multi_image(h: Handlers, phrase: gr.Textbox) -> None:
    """Several images with one question (Molmo2): points drawn on each image, a table with an image column.
    A Molmo v1 model takes one image per question and says so."""
    with gr.Accordion("Several images at once (Molmo2)", open=False, elem_id="pc_multi"):
        gr.Markdown("Upload up to 6 images: Molmo2 answers one question over all of them and says which image "
                    "each point is in. The phrase above is the question. A Molmo v1 model takes one image.")
        with gr.Row():
            with gr.Column():
                files = gr.File(label="Images", file_count="multiple", file_types=["image"], type="filepath",
                                elem_id="pc_multi_images")
                with gr.Row():
                    point_btn = gr.Button("Point in all images", variant="primary", elem_id="pc_multi_point")
                    count_btn = gr.Button("Count over all images", variant="primary", elem_id="pc_multi_count")
            with gr.Column():
                gallery = gr.Gallery(label="Points per image", columns=3, height=420, interactive=False,
                                     format="png", elem_id="pc_multi_gallery")
                badge = gr.Markdown("", elem_id="pc_multi_badge")
                answer = gr.Textbox(label="Model answer (raw)", interactive=False, lines=2, elem_id="pc_multi_answer")
        with gr.Row():
            table = gr.Dataframe(headers=MULTI_TABLE_HEADERS, datatype=["number", "number", "str", "number", "number"],
                                 label="Points in pixels of each image", interactive=False, elem_id="pc_multi_table")
            with gr.Column():
                download = gr.File(label="Download points (JSON)", interactive=False, elem_id="pc_multi_download")
                with gr.Accordion("Parsed result (JSON)", open=False):
                    result = gr.JSON(elem_id="pc_multi_json")
    for btn, fn, task in ((point_btn, h.point_multi, "point"), (count_btn, h.count_multi, "count")):
        ask_name, render_name = MULTI_EVENTS[task]
        ev = btn.click(fn, [files, phrase], [answer, result], api_name=ask_name)
        ev.success(h.render_points_multi, [files, result], [gallery, badge, table, download], api_name=render_name)


def _clock_tab(h: Handlers, examples: list[str]) -> None:
    gr.Markdown("Molmo reads the clock; the face on the right is drawn from the time it read, "
                "so you can compare the hands at a glance.")
    with gr.Row():
        with gr.Column():
            image = _image_input("clock_image", "Clock photo")
            read = gr.Button("Read the time", variant="primary", elem_id="clock_read")
            if examples:
                gr.Examples([[p] for p in examples], [image], label="Examples (rendered clocks)")
        with gr.Column():
            time_md = gr.Markdown("# --:--", elem_id="clock_time")
            face = gr.Image(label="The time read, drawn", interactive=False, elem_id="clock_face", height=320,
                            format="png")
            answer = gr.Textbox(label="Model answer (raw)", interactive=False, elem_id="clock_answer")
            with gr.Accordion("Parsed result (JSON)", open=False):
                result = gr.JSON(elem_id="clock_json")
    ev = read.click(h.read_clock, [image], [answer, result], api_name="read_clock")
    ev.success(h.render_clock, [result], [time_md, face], api_name="render_clock", api_visibility="undocumented")


def _ask_tab(h: Handlers, examples: list[list[str]]) -> None:
    history = gr.State([])
    with gr.Row():
        with gr.Column(scale=2):
            image = _image_input("ask_image")
            if examples:
                gr.Examples([[p] for p, _ in examples], [image], label="Examples")
        with gr.Column(scale=3):
            chat = gr.Chatbot(label="Chat about the image", height=460, elem_id="ask_chat")
            question = gr.Textbox(label="Question", placeholder="Ask anything about the image; press Enter",
                                  elem_id="ask_question")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="ask_send")
                clear = gr.Button("Clear chat", elem_id="ask_clear")
            answer = gr.Textbox(label="Last answer (raw)", interactive=False, visible=False, elem_id="ask_answer")
            with gr.Accordion("Parsed result (JSON)", open=False):
                result = gr.JSON(elem_id="ask_json")
    outputs = [chat, history, answer, result]
    ev = send.click(h.ask, [image, question, history], outputs, api_name="ask")
    ev.success(h.clear_text, None, question, api_name="ask_clear_question", api_visibility="undocumented")
    ev = question.submit(h.ask, [image, question, history], outputs, api_name="ask_submit",
                         api_visibility="undocumented")
    ev.success(h.clear_text, None, question, api_name="ask_submit_clear_question", api_visibility="undocumented")
    clear.click(h.clear_chat, None, [chat, history, answer], api_name="clear_chat")
    image.change(h.clear_chat, None, [chat, history, answer], api_name="new_image_clear_chat",
                 api_visibility="undocumented")


def _caption_tab(h: Handlers, examples: list[list[str]]) -> None:
    with gr.Row():
        with gr.Column():
            image = _image_input("caption_image")
            style = gr.Radio([("long caption", "long_caption"), ("transcript", "transcript")],
                             value="long_caption", label="Style", elem_id="caption_style")
            hint = gr.Slider(0, 200, value=DEFAULT_CAPTION_LENGTH_HINT, step=1, elem_id="caption_hint",
                             label="Length hint (x15 characters; 65 = about 975 characters; 0 = no hint)")
            chat_format = gr.Checkbox(False, label="Released chat model prompt (ignores the length hint)",
                                      elem_id="caption_chat_format")
            run = gr.Button("Caption", variant="primary", elem_id="caption_run")
            if examples:
                gr.Examples([[p] for p, _ in examples], [image], label="Examples")
        with gr.Column():
            answer = gr.Textbox(label="Caption", lines=14, interactive=False, elem_id="caption_answer")
            with gr.Accordion("Parsed result (JSON)", open=False):
                result = gr.JSON(elem_id="caption_json")
    run.click(h.caption, [image, style, hint, chat_format], [answer, result], api_name="caption")


def _visible(control: AccessControl, tab: str) -> bool:
    """A tab's starting visibility: with login, only the Annotate tab until the page load shows the rest."""
    return not control.login or TAB_RULES[tab] == ANNOTATOR


def _load_result(service: MolmoService, path: str) -> None:
    """Load a fine-tuned model with the precision and crops the current one was loaded with."""
    st = service.status()
    service.load(path, st.quantization if st.loaded else None, st.max_crops or 12)


def _model_source(service: MolmoService) -> str | None:
    st = service.status()
    return st.load.source if st.loaded or st.load.phase == "loading" else None


def build_demo(service: MolmoService, *, default_tab: str | None = None, annotate_dir: str | None = None,
               notice: str | None = None, control: AccessControl | None = None,
               roots: Roots | None = None) -> gr.Blocks:
    """The whole UI over one shared `service`.

    Args:
        service: owns the loaded model; shared by every browser session.
        default_tab: one of "model", "point", "clock", "ask", "caption", "annotate", "train", "eval"
            (default: "point" when a model is loaded or loading, else "model").
        annotate_dir: the project folder the Annotate tab opens with.
        notice: a banner shown above the tabs (e.g. "no GPU and no local weights: ...").
        control: logins and roles (default: no login, everything allowed: one person on loopback). Every
            event runs behind its rule in `app.access.POLICY`.
        roots: the folders user paths must stay in (default: not confined; `launch.py` always confines).
    """
    control = control or AccessControl()
    h = Handlers(service, roots)
    point_examples, clock_examples = example_images()
    if default_tab is None:
        default_tab = "point" if service.status().loaded or service.status().load.phase == "loading" else "model"
    if default_tab not in TAB_IDS:
        raise ValueError(f"default_tab must be one of {TAB_IDS}, got {default_tab!r}.")
    with gr.Blocks(title="Molmo Studio", analytics_enabled=False, delete_cache=GRADIO_DELETE_CACHE) as demo:
        gr.Markdown("## Molmo Studio\nPoint, count, read clocks, caption and chat with Molmo.")
        if notice:
            gr.Markdown(notice, elem_id="startup_notice")
        whoami = gr.Markdown("", elem_id="whoami")
        tabs: dict[str, gr.Tab] = {}
        with gr.Tabs(selected=default_tab) as tab_set:
            with gr.Tab("Model", id="model", visible=_visible(control, "model")) as tabs["model"]:
                model_outputs = _model_tab(h)
            with gr.Tab("Point & Count", id="point", visible=_visible(control, "point")) as tabs["point"]:
                _point_tab(h, point_examples)
            with gr.Tab("Clock", id="clock", visible=_visible(control, "clock")) as tabs["clock"]:
                _clock_tab(h, clock_examples)
            with gr.Tab("Ask", id="ask", visible=_visible(control, "ask")) as tabs["ask"]:
                _ask_tab(h, point_examples)
            with gr.Tab("Caption", id="caption", visible=_visible(control, "caption")) as tabs["caption"]:
                _caption_tab(h, point_examples)
            with gr.Tab("Video", id="video", visible=_visible(control, "video")) as tabs["video"]:
                create_video_tab(service.get_runner)
            with gr.Tab("Annotate", id="annotate") as tabs["annotate"]:
                gr.HTML(INSECURE_MIC_HTML, elem_id="annotate_insecure")
                create_annotate_tab(annotate_dir, service.get_runner, roots=roots)
            with gr.Tab("Train", id="train", visible=_visible(control, "train")) as tabs["train"]:
                create_train_tab(lambda: _model_source(service), lambda path: _load_result(service, path), roots=roots)
            with gr.Tab("Eval", id="eval", visible=_visible(control, "eval")) as tabs["eval"]:
                create_eval_tab(service, roots=roots if roots is not None else ())
            with gr.Tab("Review", id="review", visible=_visible(control, "review") and roots is not None) as tabs["review"]:
                if roots is not None:
                    create_review_tab(roots.projects, roots.project)
            with gr.Tab("Admin", id="admin", visible=_visible(control, "admin") and roots is not None) as tabs["admin"]:
                if roots is not None:
                    create_admin_tab(control, roots)

        def page_load():
            """The model status, and the tabs this caller may use (the guard enforces the same rules)."""
            user = current_user()
            shown = {tab: control.allows(user, rule) and (tab not in ("review", "admin") or roots is not None)
                     for tab, rule in TAB_RULES.items()}
            selected = default_tab if shown.get(default_tab) else "annotate"
            who = (f"Signed in as **{user.name}** ({user.role}) · [Sign out](/logout)" if user else "")
            return (*h.page_load(), who, gr.Tabs(selected=selected), *(gr.Tab(visible=shown[t]) for t in tabs))

        demo.load(page_load, None, [*model_outputs, whoami, tab_set, *tabs.values()], api_name="page_load",
                  api_visibility="undocumented", queue=False)
        demo.load(None, None, None, js=INSECURE_MIC_JS)  # runs in the browser only
    guard_events(demo, POLICY, control)
    return demo
