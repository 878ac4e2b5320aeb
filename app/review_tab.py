"""The Review tab (admins): judge saved annotations one by one, per-annotator statistics, export.

Layout and wiring only; the rules are ``annotate.review``'s (a pending annotation is accepted, accepted
with the reviewer's edits, or rejected with a reason, once; a rejected one sends its image back to the
queue) and the export ``annotate.export``'s (accepted annotations by default, everything not rejected
when asked). Every event has an ``api_name`` starting with ``review_`` (admin-only under the app's
guard) and its handler is wrapped in ``user_errors``. The audio receipt is copied to the app's temp
folder before it is given to Gradio: no path inside a project folder is ever handed out.

    create_review_tab(roots.projects, roots.project)   # project names under the data root
    create_review_tab(lambda: ["/data/birds"])          # or folders, taken as they are
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr

from annotate import review
from annotate.export import export_pixmo_cap
from annotate.store import DB_NAME, Store

from .access import current_user
from .annotate_tab import _display_image, get_store
from .handlers import user_errors
from .tempfiles import new_temp_file

LOCAL_REVIEWER = "local"  # the reviewer's name when the app runs without login (one person on loopback)


def _error(message: str) -> gr.Error:
    return gr.Error(message, duration=None, print_exception=False)


def _new_state() -> dict[str, Any]:
    return {"project": None, "annotation_id": None}


class ReviewHandlers:
    """The tab's handlers, bound to the project list and the name -> folder resolver.

    Args:
        projects: returns the project names (or folders) to offer.
        project_path: a listed name -> its folder; raises ValueError (e.g. ``app.paths.PathRefused``)
            for a name it refuses. None: the names are folders.
    """

    def __init__(self, projects: Callable[[], Sequence[str]],
                 project_path: Callable[[str], str | Path] | None = None) -> None:
        self.projects = projects
        self.project_path = project_path

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _reviewer() -> str:
        """The signed-in admin's name (refusing anyone else), or LOCAL_REVIEWER without login."""
        user = current_user()
        if user is None:
            return LOCAL_REVIEWER
        if not user.is_admin:
            raise _error(f"{user.name} may not review annotations: only admins may.")
        return user.name

    def _folder(self, project: str | None) -> str:
        name = (project or "").strip()
        if not name:
            raise _error("Pick a project first.")
        if self.project_path is None and name not in self.projects():
            raise _error(f"{name!r} is not one of the projects offered; pick one from the list.")
        try:
            folder = self.project_path(name) if self.project_path is not None else name
        except ValueError as e:  # PathRefused and other refusals of a name
            raise _error(str(e)) from None
        return str(Path(folder).expanduser().resolve())

    def _store(self, project: str | None) -> Store:
        folder = self._folder(project)
        if not (Path(folder) / DB_NAME).is_file():
            raise _error(f"Project {project} has no annotations yet: nothing to review or export.")
        return get_store(folder)

    def _current(self, project: str | None, state: dict | None) -> tuple[Store, int]:
        """The store and annotation id shown, refusing a project changed since it was loaded."""
        st = state or _new_state()
        if st.get("annotation_id") is None or not st.get("project"):
            raise _error("No annotation shown: press 'Next' first.")
        if self._folder(project) != st["project"]:
            raise _error(f"The annotation shown is from {st['project']}, but the project box now says {project}. "
                         "Put it back, or press 'Next' to review this project.")
        return get_store(st["project"]), int(st["annotation_id"])

    def _show(self, store: Store, item: review.ReviewItem | None, status: str) -> tuple:
        """-> state, image, info, audio, raw, transcript, caption, reason, status."""
        if item is None:
            done = status + (" " if status else "") + "Nothing left to review in this project."
            return (_new_state(), None, "No annotation pending review.", None, "", "", "", "", done)
        rec = item.record
        notes: list[str] = []
        image = None
        if item.abs_path is not None:
            image, problem = _display_image(item.abs_path)
            if problem:
                notes.append(problem)
        audio = None
        if rec.audio_path:
            receipt = store.abs(rec.audio_path)
            if receipt.is_file():
                audio = new_temp_file("review", f"annotation-{rec.id}", receipt.suffix or ".flac")
                shutil.copyfile(receipt, audio)  # Gradio gets a temp copy, never the project's file
                audio = str(audio)
            else:
                notes.append(f"The audio receipt {rec.audio_path} is missing.")
        seconds = f"{rec.duration:.1f} s of audio" if rec.duration else "no audio (imported text)"
        info = (f"**{item.display_name}** (image {rec.image_id}): annotation {rec.id} by **{rec.annotator}**, "
                f"saved {rec.created_at}, {seconds}; {item.pending} pending in this project.")
        if item.image_status != "active":
            info += f"\n\nThe image is {item.image_status}."
        if item.abs_path is None and item.image_url:
            info += f"\n\nRemote image, open it here: {item.image_url}"
        cap = item.caption
        if cap:
            info += f"\n\nCaption by {cap['author'] or 'unknown'} ({cap['source']})."
        state = {"project": str(store.root), "annotation_id": rec.id}
        text = " ".join([status] + notes if status else notes)
        return (state, image, info, audio, rec.transcript_raw, rec.transcript, cap["caption"] if cap else "", "",
                text)

    # -- events --------------------------------------------------------------------------------

    @user_errors("listing the projects")
    def list_projects(self, current=None):
        self._reviewer()
        names = list(self.projects())
        return gr.update(choices=names, value=current if current in names else None)

    @user_errors("loading the next annotation")
    def next(self, project, state):
        self._reviewer()
        store = self._store(project)
        return self._show(store, review.next_pending(store), "")

    @user_errors("passing over the annotation")
    def skip(self, project, state):
        self._reviewer()
        store, annotation_id = self._current(project, state)
        return self._show(store, review.next_pending(store, after_id=annotation_id),
                          f"Passed over annotation {annotation_id} for now.")

    @user_errors("accepting the annotation")
    def accept(self, project, state):
        who = self._reviewer()
        store, annotation_id = self._current(project, state)
        rec = review.accept(store, annotation_id, who)
        return self._show(store, review.next_pending(store),
                          f"Accepted annotation {rec.id} by {rec.annotator} as it was.")

    @user_errors("accepting the edited annotation")
    def edit_accept(self, project, transcript, caption, state):
        who = self._reviewer()
        store, annotation_id = self._current(project, state)
        rec = review.accept(store, annotation_id, who, transcript=transcript, caption=caption)
        edits = [w for w, v in (("transcript", rec.reviewed_transcript), ("caption", rec.reviewed_caption)) if v]
        what = f"with your edited {' and '.join(edits)}" if edits else "(nothing was changed, so as it was)"
        return self._show(store, review.next_pending(store), f"Accepted annotation {rec.id} by {rec.annotator} {what}.")

    @user_errors("rejecting the annotation")
    def reject(self, project, reason, state):
        who = self._reviewer()
        store, annotation_id = self._current(project, state)
        rec = review.reject(store, annotation_id, who, reason)
        return self._show(store, review.next_pending(store),
                          f"Rejected annotation {rec.id} by {rec.annotator}; image {rec.image_id} is back in the queue.")

    @user_errors("computing the statistics")
    def stats(self, project):
        self._reviewer()
        store = self._store(project)
        return {"headers": review.STATS_HEADERS, "data": [s.row() for s in review.annotator_stats(store)]}

    @user_errors("exporting")
    def export(self, project, include_all):
        self._reviewer()
        store = self._store(project)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(store.root).name) or "project"
        out = new_temp_file("downloads", f"{stem}-pixmo-cap", ".parquet")
        report = export_pixmo_cap(store.root, out, include_unreviewed=bool(include_all))
        return str(out), report.summary().replace(f" to {out}", "")


def create_review_tab(projects: Callable[[], Sequence[str]],
                      project_path: Callable[[str], str | Path] | None = None) -> dict[str, Any]:
    """Build the Review tab's components inside the current ``gr.Blocks`` / ``gr.Tab`` context.

    Args:
        projects: returns the project names to offer (e.g. ``roots.projects``).
        project_path: a name -> its folder (e.g. ``roots.project``); None when the names are folders.

    Returns:
        The components by name, and the handlers under ``"handlers"``.
    """
    h = ReviewHandlers(projects, project_path)
    state = gr.State(_new_state())
    c: dict[str, Any] = {"state": state, "handlers": h}
    with gr.Row():
        c["project"] = gr.Dropdown(list(projects()), value=None, label="Project", elem_id="review_project", scale=3,
                                   allow_custom_value=True)  # a name is checked by project_path on the server
        c["refresh"] = gr.Button("Refresh list", elem_id="review_refresh", scale=0, min_width=100)
        c["next"] = gr.Button("Next pending", variant="primary", elem_id="review_next", scale=1)
    with gr.Row():
        with gr.Column(scale=3):
            c["image"] = gr.Image(label="Image", type="pil", interactive=False, elem_id="review_image", height=420)
            c["info"] = gr.Markdown("Pick a project and press **Next pending**.", elem_id="review_info")
        with gr.Column(scale=2):
            c["audio"] = gr.Audio(label="Audio receipt", type="filepath", interactive=False, elem_id="review_audio")
            c["raw"] = gr.Textbox(label="Speech recognition (raw)", interactive=False, lines=4, elem_id="review_raw")
            c["transcript"] = gr.Textbox(label="Transcript (the annotator's; edit, then 'Save edit & accept')",
                                         lines=5, elem_id="review_transcript")
            c["caption"] = gr.Textbox(label="Caption of the image (editable)", lines=4, elem_id="review_caption")
    with gr.Row():
        c["accept"] = gr.Button("Accept", variant="primary", elem_id="review_accept")
        c["edit_accept"] = gr.Button("Save edit & accept", elem_id="review_edit_accept")
        c["skip"] = gr.Button("Pass over for now", elem_id="review_skip")
    with gr.Row():
        c["reason"] = gr.Textbox(label="Reason (required to reject; the annotator sees it)", scale=3,
                                 elem_id="review_reason")
        c["reject"] = gr.Button("Reject", variant="stop", elem_id="review_reject", scale=1)
    c["status"] = gr.Textbox(label="Status", interactive=False, elem_id="review_status")
    with gr.Accordion("Statistics per annotator", open=False):
        c["stats_refresh"] = gr.Button("Compute", elem_id="review_stats_refresh")
        c["stats"] = gr.Dataframe(headers=review.STATS_HEADERS, interactive=False, elem_id="review_stats")
    with gr.Accordion("Export (PixMo-Cap parquet)", open=False):
        with gr.Row():
            c["export_all"] = gr.Checkbox(False, label="Everything not rejected (also annotations not reviewed yet)",
                                          elem_id="review_export_all")
            c["export"] = gr.Button("Export", elem_id="review_export")
        c["export_file"] = gr.File(label="Parquet", interactive=False, elem_id="review_export_file")
        c["export_status"] = gr.Markdown("", elem_id="review_export_status")

    shown = [state, c["image"], c["info"], c["audio"], c["raw"], c["transcript"], c["caption"], c["reason"],
             c["status"]]
    c["refresh"].click(h.list_projects, [c["project"]], [c["project"]], api_name="review_projects")
    c["next"].click(h.next, [c["project"], state], shown, api_name="review_next")
    c["skip"].click(h.skip, [c["project"], state], shown, api_name="review_skip")
    c["accept"].click(h.accept, [c["project"], state], shown, api_name="review_accept")
    c["edit_accept"].click(h.edit_accept, [c["project"], c["transcript"], c["caption"], state], shown,
                           api_name="review_edit_accept")
    c["reject"].click(h.reject, [c["project"], c["reason"], state], shown, api_name="review_reject")
    c["stats_refresh"].click(h.stats, [c["project"]], [c["stats"]], api_name="review_stats")
    c["export"].click(h.export, [c["project"], c["export_all"]], [c["export_file"], c["export_status"]],
                      api_name="review_export")
    return c
