"""Who may do what: accounts with hashed passwords, two roles, and the guard every event runs through.

Hidden tabs and private API names are not access control: Gradio runs any event for any logged-in
caller who names it (gradio_client, or raw HTTP to /gradio_api/call/<name> and /queue/join). So
`guard_events(demo, ...)` wraps the function of every event of the built Blocks: before the handler
runs, the caller's account is looked up on the server (from `request.username`, which Gradio sets
from its login cookie) and checked against the event's rule in `POLICY`; an event with no rule makes
the build fail. Handlers read the caller with `current_user()`.

Modes:
- accounts configured (`python launch.py --users add ...`): login required, roles from the users file;
- `--auth user:password`: one account, role admin, kept in memory;
- neither, on a loopback address: no login; `current_user()` is None and everything is allowed
  (one person at their own machine).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import hashlib
import hmac
import inspect
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("molmo_studio")

ROLES = ("admin", "annotator")
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD = 8
# scrypt at OWASP's minimum (N=2^17, r=8, p=1: about 0.5 s and 128 MiB per login on 2 cores).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1

# Event rules: who may run an event.
ANYONE = "anyone"          # any logged-in caller (page load, model status)
ANNOTATOR = "annotator"    # annotators and admins (the Annotate tab)
TASKS = "tasks"            # admins; annotators too when the admin allows the task tabs
ADMIN = "admin"            # admins only


class AccessDenied(PermissionError):
    """The caller may not do this (the message says who may)."""


class AccountError(ValueError):
    """A bad user name, role or password, or a users file that cannot be read (the message says what to do)."""


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


_CURRENT: contextvars.ContextVar[User | None] = contextvars.ContextVar("molmo_studio_user", default=None)


def current_user() -> User | None:
    """The account of the event being handled; None when the app runs without login."""
    return _CURRENT.get()


@contextlib.contextmanager
def acting_as(user: User | None) -> Iterator[None]:
    """Run handlers as `user` (tests and the CLI call handlers directly, without the guard)."""
    token = _CURRENT.set(user)
    try:
        yield
    finally:
        _CURRENT.reset(token)


# ---------------------------------------------------------------------------------------- passwords


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """`scrypt$n$r$p$salt$hash` (self-describing, so the cost can be raised later)."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * r * n, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        n, r, p = int(n), int(r), int(p)
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=n, r=r, p=p,
                             maxmem=2 * 128 * r * n, dklen=32)
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"The password has {len(password)} characters; use at least {MIN_PASSWORD}.")


# ---------------------------------------------------------------------------------------- accounts


class Accounts:
    """The users file (JSON, mode 0600, written atomically): name -> role and password hash.

    Read on every check, so a role change or a removal applies to the next event of a logged-in user."""

    def __init__(self, path: str | Path, *, scrypt_n: int = SCRYPT_N) -> None:
        self.path = Path(path)
        self.scrypt_n = scrypt_n
        self._lock = threading.Lock()
        self._dummy = hash_password(secrets.token_hex(8), n=scrypt_n)  # for unknown names: same time

    def _load(self) -> dict[str, dict[str, str]]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            users = data["users"]
            assert isinstance(users, dict)
            return users
        except (OSError, ValueError, KeyError, AssertionError) as e:
            raise AccountError(f"The users file {self.path} cannot be read ({type(e).__name__}); restore it from a "
                               "backup or remove it and add the users again.") from None

    def _save(self, users: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".users.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "users": users}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __bool__(self) -> bool:
        return bool(self._load())

    def list(self) -> list[User]:
        return [User(name, u["role"]) for name, u in sorted(self._load().items())]

    def get(self, name: str | None) -> User | None:
        u = self._load().get(name or "")
        return User(name, u["role"]) if u else None  # type: ignore[arg-type]

    def add(self, name: str, role: str, password: str) -> User:
        if not USERNAME.match(name or ""):
            raise AccountError(f"User name {name!r}: use letters, digits, '_', '.', '@' or '-' (at most 64).")
        if role not in ROLES:
            raise AccountError(f"Role {role!r}: use one of {', '.join(ROLES)}.")
        check_password_rules(password)
        with self._lock:
            users = self._load()
            if name in users:
                raise AccountError(f"User {name!r} exists already; use reset to change the password.")
            users[name] = {"role": role, "password": hash_password(password, n=self.scrypt_n),
                           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            self._save(users)
        return User(name, role)

    def remove(self, name: str) -> None:
        with self._lock:
            users = self._load()
            if name not in users:
                raise AccountError(f"No user {name!r}; `--users list` shows who exists.")
            if users[name]["role"] == "admin" and sum(u["role"] == "admin" for u in users.values()) == 1:
                raise AccountError(f"{name!r} is the last admin; add another admin first.")
            del users[name]
            self._save(users)

    def reset(self, name: str, password: str) -> None:
        check_password_rules(password)
        with self._lock:
            users = self._load()
            if name not in users:
                raise AccountError(f"No user {name!r}; `--users list` shows who exists.")
            users[name]["password"] = hash_password(password, n=self.scrypt_n)
            self._save(users)

    def check(self, name: str, password: str) -> bool:
        """Gradio's auth callable: True for a known name with the right password (constant work otherwise)."""
        try:
            u = self._load().get(name)
        except AccountError:
            log.error("login refused: the users file %s cannot be read", self.path)
            return False
        ok = verify_password(password, u["password"] if u else self._dummy)
        if not (u and ok):
            log.warning("login refused for %r", name)  # never the password
        return bool(u and ok)


class SingleAccount:
    """`--auth user:password`: one admin, the password kept only as a hash in memory."""

    def __init__(self, name: str, password: str, *, scrypt_n: int = 2**14) -> None:
        self.name = name
        self._hash = hash_password(password, n=scrypt_n)

    def __bool__(self) -> bool:
        return True

    def get(self, name: str | None) -> User | None:
        return User(self.name, "admin") if name == self.name else None

    def check(self, name: str, password: str) -> bool:
        ok = verify_password(password, self._hash)
        return name == self.name and ok


# ---------------------------------------------------------------------------------------- the guard


@dataclass
class AccessControl:
    """The rules the guard applies. `accounts` None: no login (loopback, one person)."""

    accounts: Accounts | SingleAccount | None = None
    annotators_use_tasks: bool = False  # admins may let annotators use the task tabs on the loaded model
    audit: Any = None  # app.audit.AuditLog: admin actions and refusals
    settings_path: Path | None = None  # where admins' choices (annotators_use_tasks) are kept across restarts

    def __post_init__(self) -> None:
        if self.settings_path is not None and self.settings_path.is_file():
            try:
                saved = json.loads(self.settings_path.read_text(encoding="utf-8"))
                self.annotators_use_tasks = bool(saved.get("annotators_use_tasks", self.annotators_use_tasks))
            except (OSError, ValueError, AttributeError):
                log.warning("ignoring unreadable settings file %s", self.settings_path)

    def set_annotators_use_tasks(self, allowed: bool) -> None:
        self.annotators_use_tasks = bool(allowed)
        if self.settings_path is not None:
            self.settings_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.settings_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"annotators_use_tasks": self.annotators_use_tasks}), encoding="utf-8")
            os.replace(tmp, self.settings_path)

    @property
    def login(self) -> bool:
        return self.accounts is not None

    def user(self, request: Any) -> User | None:
        """The caller's account, from the login Gradio checked. Raises AccessDenied when there is none."""
        if self.accounts is None:
            return None
        name = getattr(request, "username", None) if request is not None else None
        user = self.accounts.get(name) if name else None
        if user is None:
            raise AccessDenied("Not signed in (or the account was removed): sign in again.")
        return user

    def allows(self, user: User | None, rule: str) -> bool:
        if self.accounts is None or rule == ANYONE:
            return True
        if user is None:
            return False
        if user.is_admin:
            return True
        return rule == ANNOTATOR or (rule == TASKS and self.annotators_use_tasks)

    def check(self, request: Any, rule: str, event: str) -> User | None:
        try:
            user = self.user(request)
        except AccessDenied:
            self._audit(None, event, "refused: not signed in")
            raise
        if not self.allows(user, rule):
            log.warning("refused %s for %s (%s)", event, user.name if user else "nobody", user.role if user else "-")
            self._audit(user, event, "refused")
            who = "admins" if rule == ADMIN else "admins (and annotators, when an admin allows the task tabs)"
            raise AccessDenied(f"{user.name if user else 'You'} may not do this ({event}): only {who} may.")
        if rule == ADMIN and not _reads_only(event):
            self._audit(user, event, "allowed")
        return user

    def _audit(self, user: User | None, event: str, outcome: str) -> None:
        if self.audit is not None:
            self.audit.write(user.name if user else None, event, outcome)


# Admin events that only read (timers polling a run, browsing results): not worth an audit line each.
READ_ONLY = re.compile(r"(poll|status|refresh|example|prev|next|stats|audit|projects|skip|defaults|info)")


def _reads_only(event: str) -> bool:
    return bool(READ_ONLY.search(event))


def _denied(message: str) -> Exception:
    import gradio as gr

    return gr.Error(message, duration=15, print_exception=False)


def _guarded(fn: Callable, rule: str, event: str, control: AccessControl) -> Callable:
    """`fn` behind the rule. The wrapper takes the request first (Gradio inserts it: `_named` annotates it
    gr.Request) and passes the remaining inputs on; the handler reads the caller with current_user()."""
    if inspect.isgeneratorfunction(fn):
        def gen(request: Any, *args: Any) -> Iterator:
            try:
                user = control.check(request, rule, event)
            except AccessDenied as e:
                raise _denied(str(e)) from None
            it = fn(*args)
            while True:
                token = _CURRENT.set(user)
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    _CURRENT.reset(token)
                yield item
        return _named(gen, fn)

    def call(request: Any, *args: Any) -> Any:
        try:
            user = control.check(request, rule, event)
        except AccessDenied as e:
            raise _denied(str(e)) from None
        token = _CURRENT.set(user)
        try:
            return fn(*args)
        finally:
            _CURRENT.reset(token)
    return _named(call, fn)


def _named(wrapper: Callable, fn: Callable) -> Callable:
    """`wrapper` dressed as `fn` with the request parameter in front: Gradio inserts the request there and
    the handler's own special parameters (gr.Progress defaults, ...) where the handler has them."""
    import gradio as gr
    from gradio.utils import get_type_hints

    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        if hasattr(fn, attr):
            setattr(wrapper, attr, getattr(fn, attr))
    sig = inspect.signature(fn)
    request = inspect.Parameter("request__", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)
    wrapper.__signature__ = sig.replace(parameters=[request, *sig.parameters.values()])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**get_type_hints(fn), "request__": gr.Request}
    return wrapper


def rule_for(api_name: str | None, policy: dict[str, str]) -> str | None:
    """The rule of an event: exact name first, then the longest matching `prefix*` entry."""
    name = api_name or ""
    if name in policy:
        return policy[name]
    best = None
    for key, rule in policy.items():
        if key.endswith("*") and name.startswith(key[:-1]) and (best is None or len(key) > len(best[0])):
            best = (key, rule)
    return best[1] if best else None


def guard_events(demo: Any, policy: dict[str, str], control: AccessControl) -> None:
    """Wrap every event of the built `demo` with its rule. An event with no rule is a build error:
    a new event must be given a rule in POLICY before the app starts."""
    missing = []
    for block_fn in demo.fns.values():
        if block_fn.fn is None or getattr(block_fn.fn, "_molmo_guarded", False):
            continue
        rule = rule_for(block_fn.api_name, policy)
        if rule is None:
            missing.append(block_fn.api_name or block_fn.name)
            continue
        guarded = _guarded(block_fn.fn, rule, block_fn.api_name or block_fn.name, control)
        guarded._molmo_guarded = True  # type: ignore[attr-defined]
        guarded._molmo_rule = rule  # type: ignore[attr-defined]
        block_fn.fn = guarded
    if missing:
        raise RuntimeError(f"events without an access rule: {', '.join(sorted(missing))}; add them to app.access.POLICY")


# Every event of the app and its rule (a trailing * matches a prefix).
POLICY: dict[str, str] = {
    # model and page
    "page_load": ANYONE, "status": ANYONE, "status_tick": ANYONE, "whoami": ANYONE,
    "load_model": ADMIN,
    # the task tabs on the loaded model
    "point": TASKS, "count": TASKS, "point_multi": TASKS, "count_multi": TASKS, "render_*": TASKS,
    "point_submit": TASKS, "read_clock": TASKS,
    "ask*": TASKS, "clear_chat": TASKS, "new_image_clear_chat": TASKS, "caption": TASKS, "load_example*": TASKS,
    "video_*": TASKS,
    # annotation; the speech-model choice is an admin's
    "annotate_*": ANNOTATOR, "annotate_pick_asr_model": ADMIN,
    # admin tabs
    "train_*": ADMIN, "eval_*": ADMIN, "review_*": ADMIN, "admin_*": ADMIN,
}
