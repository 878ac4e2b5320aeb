"""Accounts, roles and path confinement, tested from outside: the real `launch.main` server, called through
gradio_client and through raw HTTP to the event routes (Gradio runs hidden and private events for any
logged-in caller who names them, so each refusal here is the guard's, inside the server)."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.access import (ADMIN, ANNOTATOR, ANYONE, POLICY, TASKS, AccessControl, AccountError, Accounts, User,
                        hash_password, rule_for, verify_password)
from app.paths import PathRefused, Roots
from app_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22", "carol": "carol-secret-333"}
FAST_N = 2**12  # scrypt cost for test accounts (the stored hash names its cost; the default is 2**17)


# ------------------------------------------------------------------------------------------- units


def test_password_hash_is_salted_scrypt_and_verifies_only_the_right_password():
    h1, h2 = hash_password("pässword-1", n=FAST_N), hash_password("pässword-1", n=FAST_N)
    assert h1.startswith(f"scrypt${FAST_N}$8$1$") and h1 != h2 and "pässword" not in h1
    assert verify_password("pässword-1", h1) and verify_password("pässword-1", h2)
    assert not verify_password("pässword-2", h1) and not verify_password("", h1)
    assert not verify_password("x", "garbage") and not verify_password("x", "md5$1$2$3$4$5")


def test_accounts_file_roles_and_rules(tmp_path):
    acc = Accounts(tmp_path / ".studio" / "users.json", scrypt_n=FAST_N)
    assert not acc and acc.list() == []
    acc.add("alice", "admin", PASSWORDS["alice"])
    acc.add("bob", "annotator", PASSWORDS["bob"])
    assert acc.list() == [User("alice", "admin"), User("bob", "annotator")]
    assert stat.S_IMODE(acc.path.stat().st_mode) == 0o600
    text = acc.path.read_text()
    assert PASSWORDS["alice"] not in text and PASSWORDS["bob"] not in text
    assert acc.check("alice", PASSWORDS["alice"]) and not acc.check("alice", PASSWORDS["bob"])
    assert not acc.check("nobody", PASSWORDS["alice"])
    for bad in (lambda: acc.add("alice", "admin", "long-enough"), lambda: acc.add("eve", "root", "long-enough"),
                lambda: acc.add("../eve", "annotator", "long-enough"), lambda: acc.add("eve", "annotator", "short"),
                lambda: acc.remove("alice"), lambda: acc.remove("nobody"), lambda: acc.reset("bob", "short")):
        with pytest.raises(AccountError):
            bad()
    acc.reset("bob", "new-bob-password")
    assert acc.check("bob", "new-bob-password") and not acc.check("bob", PASSWORDS["bob"])
    acc.remove("bob")
    assert acc.get("bob") is None


def test_rules_allow_what_each_role_may_do():
    control = AccessControl(object())  # any accounts object: only the rules are used here
    admin, annotator = User("a", "admin"), User("b", "annotator")
    for rule in (ANYONE, ANNOTATOR, TASKS, ADMIN):
        assert control.allows(admin, rule)
    assert control.allows(annotator, ANNOTATOR) and not control.allows(annotator, ADMIN)
    assert not control.allows(annotator, TASKS)
    control.annotators_use_tasks = True
    assert control.allows(annotator, TASKS) and not control.allows(annotator, ADMIN)
    assert not control.allows(None, ANNOTATOR)
    assert AccessControl(None).allows(None, ADMIN)  # no login: one person at their own machine
    assert rule_for("annotate_pick_asr_model", POLICY) == ADMIN and rule_for("annotate_save", POLICY) == ANNOTATOR
    assert rule_for("render_point", POLICY) == TASKS and rule_for("nothing_like_it", POLICY) is None


def test_audit_log_keeps_admin_actions_and_refusals_not_polls(tmp_path):
    from types import SimpleNamespace

    from app.audit import AuditLog

    acc = Accounts(tmp_path / "users.json", scrypt_n=FAST_N)
    acc.add("ada", "admin", "ada-password-1")
    acc.add("ben", "annotator", "ben-password-1")
    control = AccessControl(acc, audit=AuditLog(tmp_path / "audit.jsonl"))
    ada, ben = SimpleNamespace(username="ada"), SimpleNamespace(username="ben")
    for event in ("train_poll", "eval_status", "load_model", "train_start"):
        control.check(ada, ADMIN, event)
    with pytest.raises(Exception):
        control.check(ben, ADMIN, "train_poll")
    with pytest.raises(Exception):
        control.check(SimpleNamespace(username=None), ANNOTATOR, "annotate_save")
    lines = [(a["user"], a["action"], a["outcome"]) for a in control.audit.tail()]
    assert lines == [("ada", "load_model", "allowed"), ("ada", "train_start", "allowed"),
                     ("ben", "train_poll", "refused"), (None, "annotate_save", "refused: not signed in")]
    assert "ada-password-1" not in (tmp_path / "audit.jsonl").read_text()


def test_roots_refuse_paths_that_lead_out(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "proj").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("x")
    (data / "link_dir").symlink_to(outside)
    (data / "link_file").symlink_to(outside / "secret.txt")
    (tmp_path / "data_evil").mkdir()
    roots = Roots(data)
    assert roots.inside("proj", "Project") == (data / "proj").resolve()
    for bad in (str(outside / "secret.txt"), "../outside/secret.txt", "proj/../../outside", "link_dir/secret.txt",
                "link_file", "../data_evil", "bad\0name", "/etc/passwd", ""):
        with pytest.raises(PathRefused):
            roots.inside(bad, "Path")
    with pytest.raises(PathRefused, match="outside"):  # outside first: nothing told about existence
        roots.inside(str(outside / "no-such-file"), "Path")
    for bad in ("../x", "a/b", ".studio", "", "x" * 65):
        with pytest.raises(PathRefused):
            roots.project(bad, create=True)
    assert not (tmp_path / "x").exists()
    assert roots.projects() == ["proj"] if any((data / "proj").iterdir()) else roots.projects() == []


# ------------------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app (launch.main) over a data root with three accounts; no model loaded."""
    import launch

    data = tmp_path_factory.mktemp("data")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "img.png").write_bytes(b"not really")
    (data / "proj").mkdir()
    (data / "link_out").symlink_to(outside)
    acc = Accounts(data / ".studio" / "users.json", scrypt_n=FAST_N)
    acc.add("alice", "admin", PASSWORDS["alice"])
    acc.add("bob", "annotator", PASSWORDS["bob"])
    acc.add("carol", "annotator", PASSWORDS["carol"])
    port = free_port()
    demo = launch.main(model=None, port=port, block=False, data_root=str(data))
    url = f"http://127.0.0.1:{port}/"
    yield {"demo": demo, "url": url, "data": data, "outside": outside}
    demo.close()


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != "audit.jsonl"}


def _raw_call(session: httpx.Client, url: str, name: str, data: list) -> str:
    """POST /gradio_api/call/<name> then read its event stream; returns the stream text."""
    r = session.post(f"{url}gradio_api/call/{name}", json={"data": data})
    if r.status_code != 200:
        return f"HTTP {r.status_code}"
    event_id = r.json()["event_id"]
    return session.get(f"{url}gradio_api/call/{name}/{event_id}", timeout=60).text


def _inputs(config: dict, api_name: str) -> list:
    """The event's inputs at their components' start values (Gradio checks them before any handler runs)."""
    dep = next(d for d in config["dependencies"] if d.get("api_name") == api_name)
    comps = {c["id"]: c for c in config["components"]}
    return [comps[i].get("props", {}).get("value") for i in dep["inputs"]]


def _login(url: str, name: str) -> httpx.Client:
    s = httpx.Client(timeout=30)
    r = s.post(f"{url}login", data={"username": name, "password": PASSWORDS[name]})
    assert r.status_code == 200, r.text
    return s


ADMIN_EVENTS = ("load_model", "train_start", "train_poll", "train_load", "eval_start", "eval_status",
                "admin_add_user", "admin_remove_user", "admin_reset_password", "admin_annotator_tasks",
                "admin_create_project_folder", "admin_create_project_upload", "admin_audit",
                "annotate_pick_asr_model", "review_next", "review_accept", "review_edit_accept", "review_reject",
                "review_stats", "review_export")
TASK_EVENTS = ("point", "count", "read_clock", "caption", "ask", "point_multi", "count_multi", "video_run")


def test_every_event_runs_behind_the_guard(server):
    demo = server["demo"]
    names = set()
    for fn in demo.fns.values():
        if fn.fn is None:
            continue  # browser-only (js) events
        assert getattr(fn.fn, "_molmo_guarded", False), fn.api_name
        names.add(fn.api_name)
        assert fn.fn._molmo_rule == rule_for(fn.api_name, POLICY)
    assert set(ADMIN_EVENTS) <= names and set(TASK_EVENTS) <= names
    for name in ADMIN_EVENTS:
        assert rule_for(name, POLICY) == ADMIN


def test_annotator_is_refused_every_admin_and_task_event_over_raw_http(server):
    url, data = server["url"], server["data"]
    before = _tree(data)
    bob = _login(url, "bob")
    config = bob.get(f"{url}config").json()
    for name in ADMIN_EVENTS + TASK_EVENTS:
        text = _raw_call(bob, url, name, _inputs(config, name))
        assert "event: error" in text and "bob may not do this" in text, (name, text[:300])
    assert _tree(data) == before  # no user, project, run or checkpoint appeared
    audit = [json.loads(line) for line in (data / ".studio" / "audit.jsonl").read_text().splitlines()]
    assert {(a["user"], a["action"], a["outcome"]) for a in audit} >= {("bob", "load_model", "refused"),
                                                                       ("bob", "admin_add_user", "refused")}


def test_annotator_is_refused_through_gradio_client(server):
    from gradio_client import Client

    url, data = server["url"], server["data"]
    before = _tree(data)
    client = Client(url, auth=("bob", PASSWORDS["bob"]), verbose=False, download_files=False)
    calls = {
        "/load_model": (str(data / "proj"), "8bit", 4),
        "/admin_add_user": ("mallory", "admin", "mallory-password"),
        "/admin_create_project_folder": ("stolen", str(server["outside"])),
    }
    for api, args in calls.items():
        with pytest.raises(Exception, match="bob may not do this"):
            client.predict(*args, api_name=api)
    client.close()
    assert _tree(data) == before
    assert Accounts(data / ".studio" / "users.json").get("mallory") is None
    assert server["demo"] is not None


def test_not_signed_in_and_wrong_passwords_are_refused(server):
    from gradio_client import Client

    url = server["url"]
    anon = httpx.Client(timeout=30)
    assert anon.get(f"{url}config").status_code == 401
    for name in ADMIN_EVENTS + TASK_EVENTS + ("annotate_next", "annotate_save"):
        assert anon.post(f"{url}gradio_api/call/{name}", json={"data": []}).status_code == 401, name
    assert anon.post(f"{url}gradio_api/queue/join", json={"fn_index": 0, "data": [], "session_hash": "x"}
                     ).status_code == 401
    with pytest.raises(Exception):
        Client(url, verbose=False)  # no credentials: the client cannot even read the app
    users_file = server["data"] / ".studio" / "users.json"
    assert anon.get(f"{url}gradio_api/file={users_file}").status_code in (401, 403)
    r = anon.post(f"{url}login", data={"username": "alice", "password": PASSWORDS["bob"]})
    assert r.status_code >= 400
    with pytest.raises(ValueError, match="Could not login"):
        Client(url, auth=("alice", "wrong-password"), verbose=False)


def test_annotator_cannot_open_a_project_outside_the_data_root(server):
    url, data, outside = server["url"], server["data"], server["outside"]
    bob = _login(url, "bob")
    config = bob.get(f"{url}config").json()
    dep = next(d for d in config["dependencies"] if d.get("api_name") == "annotate_next")
    comps = {c["id"]: c for c in config["components"]}
    project_index = next(k for k, i in enumerate(dep["inputs"])
                         if comps[i].get("props", {}).get("elem_id") == "annotate_project")
    before = _tree(data)
    for project in (str(outside), "../" + outside.name, "link_out", "/etc", "proj/../../" + outside.name):
        args = _inputs(config, "annotate_next")
        args[project_index] = project
        text = _raw_call(bob, url, "annotate_next", args)
        assert "event: error" in text and "project" in text.lower(), (project, text[:300])
    assert _tree(data) == before and not (outside / "annotations.sqlite").exists()


def test_gradio_serves_no_file_of_the_data_root(server):
    url, data = server["url"], server["data"]
    alice = _login(url, "alice")
    (data / "proj" / "a.png").write_bytes(b"\x89PNG fake")
    for path in (data / ".studio" / "users.json", data / "proj" / "a.png", Path("/etc/passwd"),
                 server["outside"] / "img.png"):
        assert alice.get(f"{url}gradio_api/file={path}").status_code == 403, path


def test_admin_paths_outside_the_roots_are_refused_in_every_tab(server):
    url, data, outside = server["url"], server["data"], server["outside"]
    alice = _login(url, "alice")
    config = alice.get(f"{url}config").json()
    before = _tree(data)
    attempts = {
        "load_model": [str(outside), "8bit", 4],
        "admin_create_project_folder": ["stolen", "link_out"],
        "train_start": ["tiny", str(outside / "data.jsonl"), "", "", "lora", "", "", 1, 1, 4, 8, False, 0.0],
        "eval_start": None,
    }
    for name, args in attempts.items():
        if args is None:
            continue
        text = _raw_call(alice, url, name, args)
        assert "event: error" in text and "outside the folders" in text, (name, text[:400])
    text = _raw_call(alice, url, "train_start", ["tiny", "clocks:4", "", "../escape", "lora", "", "", 1, 1, 4,
                                                  8, False, 0.0])
    assert "outside the folders this app may write" in text, text[:400]
    for outside_path in (str(outside), "../", "link_out"):
        text = _raw_call(alice, url, "eval_start", _eval_args(config, outside_path))
        assert "outside the folders" in text, (outside_path, text[:400])
    assert _tree(data) == before
    assert not (data.parent / "escape").exists()


def _eval_args(config: dict, path: str) -> list:
    """eval_start's inputs with a file path as the data (task point, kind file)."""
    dep = next(d for d in config["dependencies"] if d.get("api_name") == "eval_start")
    comps = {c["id"]: c for c in config["components"]}
    args = []
    for i in dep["inputs"]:
        props = comps[i].get("props", {})
        elem = props.get("elem_id") or ""
        value = props.get("value")
        if "kind" in elem:
            value = "file"
        elif "path" in elem and "images" not in elem:
            value = path
        args.append(value)
    return args


def test_users_cli_adds_lists_resets_and_removes_without_echoing_passwords(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")

    def run(*args, stdin=""):
        return subprocess.run([sys.executable, str(ROOT / "launch.py"), "--data-root", str(tmp_path), "--users",
                               *args], input=stdin, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)

    r = run("add", "ada", "--role", "admin", "--password-stdin", stdin="ada-password-1\n")
    assert r.returncode == 0, r.stderr
    assert run("add", "ben", "--role", "annotator", "--password-stdin", stdin="ben-password-1\n").returncode == 0
    assert run("add", "ben", "--role", "annotator", "--password-stdin", stdin="x\n").returncode == 2
    r = run("list")
    assert r.stdout.split("\n")[:2] == ["ada\tadmin", "ben\tannotator"]
    assert run("reset", "ben", "--password-stdin", stdin="ben-password-2\n").returncode == 0
    acc = Accounts(tmp_path / ".studio" / "users.json")
    assert acc.check("ben", "ben-password-2") and not acc.check("ben", "ben-password-1")
    r = run("remove", "ada")
    assert r.returncode == 2 and "last admin" in r.stderr
    assert run("remove", "ben").returncode == 0
    everything = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert "ada-password-1" not in everything and "ben-password" not in everything
    assert "cli users add" in (tmp_path / ".studio" / "audit.jsonl").read_text()


def test_serving_beyond_loopback_without_accounts_is_refused(tmp_path):
    import launch

    with pytest.raises(SystemExit, match="needs a login"):
        launch.main(model=None, host="0.0.0.0", block=False, data_root=str(tmp_path))
    with pytest.raises(SystemExit, match="needs a login"):
        launch.main(model=None, share=True, block=False, data_root=str(tmp_path))


def test_no_password_reaches_the_log(server, caplog):
    from gradio_client import Client

    caplog.set_level(logging.DEBUG)
    with pytest.raises(ValueError):
        Client(server["url"], auth=("carol", "not-carols-password-x"), verbose=False)
    Client(server["url"], auth=("carol", PASSWORDS["carol"]), verbose=False).close()
    text = caplog.text + "".join(p.read_text(errors="replace") for p in server["data"].rglob("*") if p.is_file()
                                 and p.suffix in (".json", ".jsonl", ".log", ".txt"))
    assert "login refused for 'carol'" in caplog.text
    for pw in (*PASSWORDS.values(), "not-carols-password-x"):
        assert pw not in text


def test_admin_lets_annotators_use_the_task_tabs_and_the_choice_is_kept(server):
    url, data = server["url"], server["data"]
    alice, bob = _login(url, "alice"), _login(url, "bob")
    config = alice.get(f"{url}config").json()
    point_args = _inputs(config, "point")
    assert "bob may not do this" in _raw_call(bob, url, "point", point_args)
    try:
        assert "event: complete" in _raw_call(alice, url, "admin_annotator_tasks", [True])
        text = _raw_call(bob, url, "point", point_args)
        assert "may not" not in text and "event: error" in text  # allowed now; fails only for want of an image
        assert "bob may not do this" in _raw_call(bob, url, "load_model", _inputs(config, "load_model"))
        assert AccessControl(None, settings_path=data / ".studio" / "settings.json").annotators_use_tasks
    finally:
        _raw_call(alice, url, "admin_annotator_tasks", [False])
    assert "bob may not do this" in _raw_call(bob, url, "point", point_args)
    assert not AccessControl(None, settings_path=data / ".studio" / "settings.json").annotators_use_tasks
