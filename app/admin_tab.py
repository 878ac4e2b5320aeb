"""The Admin tab: accounts, what annotators may use, projects under the data root, and the audit log.

Layout and wiring only; accounts live in `app.access`, folders in `app.paths`. Every event is named
`admin_*`, which the guard (app.access.POLICY) lets only admins run; the handlers never trust a name
passed in as the caller, they read `current_user()`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import gradio as gr

from .access import AccessControl, AccountError, Accounts, current_user
from .handlers import user_errors
from .paths import IMAGE_SUFFIXES, PathRefused, Roots

MAX_PROJECT_UPLOAD = 2000  # images per upload


def _error(message: str) -> gr.Error:
    return gr.Error(message, duration=15, print_exception=False)


class AdminHandlers:
    def __init__(self, control: AccessControl, roots: Roots) -> None:
        self.control = control
        self.roots = roots

    def _accounts(self) -> Accounts:
        if not isinstance(self.control.accounts, Accounts):
            raise _error("Accounts are managed here only when the app runs with a users file "
                         "(`python launch.py --users add NAME --role admin`).")
        return self.control.accounts

    def _audit(self, action: str, **detail: Any) -> None:
        if self.control.audit is not None:
            user = current_user()
            self.control.audit.write(user.name if user else None, action, "ok", **detail)

    # -- accounts --------------------------------------------------------------------------------

    @user_errors("listing the accounts")
    def users(self) -> list[list[str]]:
        accounts = self.control.accounts
        if isinstance(accounts, Accounts):
            return [[u.name, u.role] for u in accounts.list()]
        if accounts is not None:
            return [[accounts.name, "admin"]]  # --auth
        return []

    @user_errors("adding the account")
    def add_user(self, name: str, role: str, password: str) -> tuple[list[list[str]], str, str]:
        try:
            self._accounts().add((name or "").strip(), role, password or "")
        except AccountError as e:
            raise _error(str(e)) from None
        self._audit("add user", target=name.strip(), role=role)
        return self.users(), "", f"Added {name.strip()} ({role})."

    @user_errors("removing the account")
    def remove_user(self, name: str) -> tuple[list[list[str]], str]:
        me = current_user()
        if me is not None and (name or "").strip() == me.name:
            raise _error("You cannot remove your own account here; another admin can, or use `--users remove`.")
        try:
            self._accounts().remove((name or "").strip())
        except AccountError as e:
            raise _error(str(e)) from None
        self._audit("remove user", target=name.strip())
        return self.users(), f"Removed {name.strip()}; their next action asks them to sign in again."

    @user_errors("resetting the password")
    def reset_password(self, name: str, password: str) -> tuple[str, str]:
        try:
            self._accounts().reset((name or "").strip(), password or "")
        except AccountError as e:
            raise _error(str(e)) from None
        self._audit("reset password", target=name.strip())
        return "", f"New password set for {name.strip()}."

    @user_errors("changing what annotators may use")
    def set_annotator_tasks(self, allowed: bool) -> str:
        self.control.set_annotators_use_tasks(bool(allowed))
        self._audit("annotators use task tabs", value=bool(allowed))
        return ("Annotators may now use Point & Count, Clock, Ask and Caption on the loaded model (after a reload "
                "of their page)." if allowed else "Annotators see only the Annotate tab.")

    # -- projects --------------------------------------------------------------------------------

    @user_errors("listing the projects")
    def projects(self) -> gr.Dropdown:
        names = self.roots.projects()
        return gr.Dropdown(choices=names, value=names[0] if names else None)

    @user_errors("creating the project")
    def create_from_upload(self, name: str, files: list[str] | None) -> tuple[str, gr.Dropdown]:
        """A new project `name` under the data root holding the uploaded images."""
        files = [f for f in (files or []) if f]
        if not files:
            raise _error("Upload the project's images (JPEG, PNG, WebP ...) first.")
        if len(files) > MAX_PROJECT_UPLOAD:
            raise _error(f"{len(files)} files in one upload; upload at most {MAX_PROJECT_UPLOAD} at a time.")
        bad = [Path(f).name for f in files if Path(f).suffix.lower() not in IMAGE_SUFFIXES]
        if bad:
            raise _error(f"Not images: {', '.join(bad[:5])}. Upload only {', '.join(sorted(IMAGE_SUFFIXES))} files.")
        folder = self._new_project(name)
        for f in files:
            target = folder / Path(f).name
            if target.exists():
                target = folder / f"{target.stem}-{len(list(folder.iterdir()))}{target.suffix}"
            shutil.copyfile(f, target)
        self._audit("create project", project=folder.name, images=len(files))
        return f"Created project {folder.name} with {len(files)} images.", self.projects()

    @user_errors("creating the project")
    def create_from_folder(self, name: str, folder_text: str) -> tuple[str, gr.Dropdown]:
        """A new project `name` whose images.txt lists the images of a folder under an allowed root."""
        try:
            source = self.roots.inside(folder_text, "Image folder")
        except PathRefused as e:
            raise _error(str(e)) from None
        if not source.is_dir():
            raise _error(f"{folder_text!r} is not a folder; name a folder of images.")
        images = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                        and p.resolve().is_relative_to(source))  # no symlink that leads out
        if not images:
            raise _error(f"No images in {source}; it should hold {', '.join(sorted(IMAGE_SUFFIXES))} files.")
        folder = self._new_project(name)
        (folder / "images.txt").write_text("".join(f"{p.resolve()}\n" for p in images), encoding="utf-8")
        self._audit("create project", project=folder.name, source=str(source), images=len(images))
        return f"Created project {folder.name} listing {len(images)} images of {source}.", self.projects()

    def _new_project(self, name: str) -> Path:
        try:
            folder = self.roots.project(name, create=True)  # checks the name, creates the folder
        except PathRefused as e:
            raise _error(str(e)) from None
        if any(folder.iterdir()):
            raise _error(f"Project {name.strip()} exists already and is not empty; pick another name.")
        return folder

    # -- audit -----------------------------------------------------------------------------------

    @user_errors("reading the audit log")
    def audit(self) -> list[list[str]]:
        if self.control.audit is None:
            return []
        rows = self.control.audit.tail(200)
        return [[r.get("time", ""), r.get("user") or "-", r.get("action", ""), r.get("outcome", ""),
                 ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("time", "user", "action", "outcome"))]
                for r in reversed(rows)]


def create_admin_tab(control: AccessControl, roots: Roots) -> dict[str, Any]:
    h = AdminHandlers(control, roots)
    c: dict[str, Any] = {"handlers": h}
    gr.Markdown(f"Data root: `{roots.data_root}` (projects, accounts, audit log). Read-only folders: "
                f"{', '.join(f'`{r}`' for r in roots.extra) or 'none'}.")
    with gr.Accordion("Accounts", open=True):
        c["users"] = gr.Dataframe(headers=["user", "role"], value=h.users(), interactive=False,
                                  elem_id="admin_users")
        with gr.Row():
            c["name"] = gr.Textbox(label="User name", elem_id="admin_user_name")
            c["role"] = gr.Radio(["annotator", "admin"], value="annotator", label="Role", elem_id="admin_user_role")
            c["password"] = gr.Textbox(label="Password (at least 8 characters)", type="password",
                                       elem_id="admin_user_password")
        with gr.Row():
            c["add"] = gr.Button("Add user", variant="primary", elem_id="admin_add_user")
            c["reset"] = gr.Button("Set new password", elem_id="admin_reset_password")
            c["remove"] = gr.Button("Remove user", variant="stop", elem_id="admin_remove_user")
        c["tasks"] = gr.Checkbox(control.annotators_use_tasks, elem_id="admin_annotator_tasks",
                                 label="Annotators may use Point & Count, Clock, Ask and Caption on the loaded model")
        c["status"] = gr.Markdown("", elem_id="admin_status")
    with gr.Accordion("Projects", open=True):
        c["projects"] = gr.Dropdown(roots.projects(), label="Projects under the data root", elem_id="admin_projects")
        c["project_name"] = gr.Textbox(label="New project name (letters, digits, . _ -)", elem_id="admin_project_name")
        with gr.Row():
            with gr.Column():
                c["upload"] = gr.File(label="Images", file_count="multiple", type="filepath",
                                      elem_id="admin_project_upload")
                c["create_upload"] = gr.Button("Create from upload", elem_id="admin_create_upload")
            with gr.Column():
                c["folder"] = gr.Textbox(label="Or: a folder of images under an allowed folder",
                                         elem_id="admin_project_folder")
                c["create_folder"] = gr.Button("Create from folder", elem_id="admin_create_folder")
        c["project_status"] = gr.Markdown("", elem_id="admin_project_status")
    with gr.Accordion("Audit log (latest first)", open=False):
        c["audit"] = gr.Dataframe(headers=["time", "user", "action", "outcome", "detail"], interactive=False,
                                  elem_id="admin_audit")
        c["audit_refresh"] = gr.Button("Refresh", elem_id="admin_audit_refresh")

    c["add"].click(h.add_user, [c["name"], c["role"], c["password"]], [c["users"], c["password"], c["status"]],
                   api_name="admin_add_user")
    c["remove"].click(h.remove_user, [c["name"]], [c["users"], c["status"]], api_name="admin_remove_user")
    c["reset"].click(h.reset_password, [c["name"], c["password"]], [c["password"], c["status"]],
                     api_name="admin_reset_password")
    c["tasks"].input(h.set_annotator_tasks, [c["tasks"]], [c["status"]], api_name="admin_annotator_tasks")
    c["create_upload"].click(h.create_from_upload, [c["project_name"], c["upload"]],
                             [c["project_status"], c["projects"]], api_name="admin_create_project_upload")
    c["create_folder"].click(h.create_from_folder, [c["project_name"], c["folder"]],
                             [c["project_status"], c["projects"]], api_name="admin_create_project_folder")
    c["audit_refresh"].click(h.audit, None, [c["audit"]], api_name="admin_audit")
    return c
