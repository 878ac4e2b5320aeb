"""Molmo Studio: one command line.

    python launch.py                              # serve the UI; load the default model in the background
    python launch.py --model ./checkpoints/tiny-d # a local folder or a hub id
    python launch.py --model allenai/Molmo-7B-D-0924 --quantize 4bit --port 7860
    python launch.py --annotate ./my_project      # open on the Annotate tab with that project
    python launch.py --finetune ...               # the embedded trainer (molmo_core.train.cli)
    python launch.py --export-pixmo-cap ./my_project out.parquet
    python launch.py --eval --model A [--model B] --task point --data shapes:100 --out runs/eval

The server listens on 127.0.0.1 unless --host says otherwise; --share is off by default.
For a team (docs/teams.md):

    python launch.py --users add ada --role admin        # accounts (asks for the password)
    python launch.py --users add bob --role annotator
    python launch.py --host 0.0.0.0 --https              # login required; self-signed HTTPS so browsers record

With no accounts and no --auth, the app runs without login, and only on a loopback address.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HUB_MODEL = "allenai/Molmo-7B-D-0924"
SMALL_HUB_MODEL = "allenai/MolmoE-1B-0924"
CHECKPOINTS_DIR = Path("checkpoints")
DEFAULT_DATA_ROOT = "projects"
STUDIO_DIR = ".studio"  # under the data root: users.json, audit.jsonl, tls/


@dataclass(frozen=True)
class StartupChoice:
    """What to load at start-up (source None = nothing) and a notice for the UI, if any."""

    source: str | None
    quantize: str | None
    notice: str | None = None


def find_local(hub_id: str) -> str | None:
    """A local copy of `hub_id`: ./checkpoints/<name>, else the Hugging Face cache (no network)."""
    folder = CHECKPOINTS_DIR / hub_id.split("/")[-1]
    if (folder / "config.json").is_file():
        return str(folder)
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(hub_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or no huggingface_hub): no local copy
        return None
    return path if (Path(path) / "config.json").is_file() else None


def _offline() -> bool:
    """HF_HUB_OFFLINE as the hub library itself reads it."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def _download_hint(hub_id: str) -> str:
    from molmo_core.errors import download_hint

    folder = f"./{CHECKPOINTS_DIR / hub_id.split('/')[-1]}"
    return download_hint(hub_id, folder, f"start with `python launch.py --model {folder}`")


def choose_startup_model() -> StartupChoice:
    """The start-up rule (docs/design.md): Molmo-7B-D in bf16 on a large GPU, 4-bit on a small one; on CPU
    MolmoE-1B if its weights are already here, otherwise a clear "no GPU" notice (nothing loads)."""
    import torch

    if torch.cuda.is_available():
        total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        hub_id, quantize = ((DEFAULT_HUB_MODEL, None) if total_gib >= 40 else
                            (DEFAULT_HUB_MODEL, "4bit") if total_gib >= 10 else (SMALL_HUB_MODEL, "4bit"))
        local = find_local(hub_id)
        if local is None and _offline():
            return StartupChoice(None, None, f"**No local weights for {hub_id} and the hub is offline.** "
                                 + _download_hint(hub_id) + " Annotation and export work without a model.")
        return StartupChoice(local or hub_id, quantize)
    local = find_local(SMALL_HUB_MODEL)
    if local is not None:
        return StartupChoice(local, None, "**No GPU found:** running MolmoE-1B on the CPU; answers are slow.")
    return StartupChoice(None, None, (
        "**No GPU found and no local weights, so no model is loaded.** Molmo needs a GPU to be usable; "
        f"on CPU you can still run MolmoE-1B. {_download_hint(SMALL_HUB_MODEL)} "
        "For a quick test, make a tiny random checkpoint with "
        "`python -m molmo_core.tiny --variant d --out ./checkpoints/tiny-d` and load it in the Model tab. "
        "Annotation and export work without a model."))


def access_control(data_root: str | Path, auth: str | None, host: str, share: bool):
    """The login mode: the users file under the data root, or --auth's single admin, or (loopback only)
    no login. Raises SystemExit with what to do when the combination is unsafe."""
    from app.access import AccessControl, Accounts, SingleAccount
    from app.audit import AuditLog
    from app.paths import is_loopback

    studio = Path(data_root) / STUDIO_DIR
    accounts = Accounts(studio / "users.json")
    audit = AuditLog(studio / "audit.jsonl")
    settings = studio / "settings.json"
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise SystemExit("--auth must look like user:password")
        if accounts:
            raise SystemExit(f"--auth and the accounts in {accounts.path} both configure logins; drop --auth.")
        return AccessControl(SingleAccount(user, password), audit=audit, settings_path=settings)
    if accounts:
        return AccessControl(accounts, audit=audit, settings_path=settings)
    if share or not is_loopback(host):
        where = "a share link" if share else f"{host}"
        raise SystemExit(f"Serving on {where} needs a login: add accounts first, e.g. `python launch.py "
                         f"--data-root {data_root} --users add NAME --role admin` (or use --auth user:password).")
    return AccessControl(None, audit=audit)


def tls_files(data_root: str | Path, host: str, https: bool, certfile: str | None,
              keyfile: str | None) -> tuple[str | None, str | None, bool]:
    """(certfile, keyfile, self_signed) for launch; --https makes or reuses a self-signed certificate."""
    if bool(certfile) != bool(keyfile):
        raise SystemExit("--ssl-certfile and --ssl-keyfile go together.")
    if certfile:
        return certfile, keyfile, False
    if not https:
        return None, None, False
    from app.tls import fingerprint, self_signed

    cert, key = self_signed(Path(data_root) / STUDIO_DIR / "tls", host=host)
    print(f"HTTPS with a self-signed certificate {cert}\n  SHA-256 fingerprint {fingerprint(cert)}\n"
          "  annotators' browsers warn about it once: compare this fingerprint before accepting.", flush=True)
    return str(cert), str(key), True


def main(model: str | None = None, quantize: str | None = None, max_crops: int = 12, host: str = "127.0.0.1",
         port: int | None = None, share: bool = False, auth: str | None = None, queue_size: int = 64,
         annotate: str | None = None, block: bool = True, data_root: str = "projects", https: bool = False,
         ssl_certfile: str | None = None, ssl_keyfile: str | None = None):
    """Serve the UI. Returns the Blocks (already launched; with `block=False` the call returns at once).

    Args:
        model: a local checkpoint folder or a hub id; None applies the start-up rule above.
        quantize: None, "8bit" or "4bit".
        max_crops: image crops per image (12 as trained; more for fine detail).
        host: interface to listen on (127.0.0.1: this machine only).
        port: port (None: the first free one from 7860).
        share: create a public gradio.live link (explicit opt-in).
        auth: "user:password": one admin login (accounts under the data root are the team way).
        queue_size: requests that may wait in the queue before new ones are refused.
        annotate: a project folder to open on the Annotate tab.
        block: keep serving until interrupted (False: return after launch; for tests).
        data_root: projects, accounts, the audit log and the certificate live here.
        https: serve HTTPS with a self-signed certificate (made once, kept under the data root).
        ssl_certfile, ssl_keyfile: serve HTTPS with this certificate instead.
    """
    from app import CSS, MolmoService, build_demo
    from molmo_core.preprocessing import MAX_FILE_BYTES

    # Unexpected errors in handlers are logged with their traceback and a reference the user sees.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from app.paths import Roots, is_loopback

    roots = Roots(data_root)
    control = access_control(roots.data_root, auth, host, share)
    certfile, keyfile, self_signed = tls_files(roots.data_root, host, https, ssl_certfile, ssl_keyfile)
    if not certfile and not is_loopback(host):
        print(f"note: serving plain HTTP on {host}: browsers on other machines give the page no microphone, so "
              "annotators there cannot record. Add --https (or --ssl-certfile/--ssl-keyfile).", file=sys.stderr)

    service = MolmoService()
    if model:
        choice = StartupChoice(model, quantize)
    else:
        choice = choose_startup_model()
        if quantize:
            choice = StartupChoice(choice.source, quantize, choice.notice)
    if choice.source:
        service.load(choice.source, choice.quantize, max_crops)  # background thread; UI opens at once

    demo = build_demo(service, default_tab="annotate" if annotate else None, annotate_dir=annotate,
                      notice=choice.notice, control=control, roots=roots)
    # Up to 8 handlers run at once: the runner groups their generations into one batch (molmo_core.serving).
    demo.queue(max_size=queue_size, default_concurrency_limit=8)
    _, local_url, share_url = demo.launch(
        server_name=host, server_port=port, share=share, auth=control.accounts.check if control.login else None,
        auth_message="Molmo Studio: sign in with the account your admin made for you.",
        prevent_thread_lock=True, css=CSS, show_error=False, quiet=True,
        max_file_size=MAX_FILE_BYTES,  # uploads: images and recordings
        blocked_paths=[str(roots.data_root / STUDIO_DIR)],  # accounts, audit log, TLS key: never served
        ssl_certfile=certfile, ssl_keyfile=keyfile, ssl_verify=not self_signed)
    _print_startup(service, choice, local_url, share_url)
    if block:
        try:
            demo.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            service.unload()
    return demo


def _print_startup(service, choice: StartupChoice, local_url: str, share_url: str | None) -> None:
    import torch

    device = (f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu")
    precision = choice.quantize or ("bf16" if torch.cuda.is_available() else "fp32")
    print(f"Molmo Studio at {local_url}" + (f"  (public: {share_url})" if share_url else ""), flush=True)
    print(f"  model: {choice.source or 'none'} · device: {device} · precision: {precision}", flush=True)
    if service.status().load.phase == "loading":
        print("  loading in the background; progress is shown in the Model tab", flush=True)
    if choice.notice:
        print("  " + choice.notice.replace("**", ""), flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description="Molmo Studio: serve the UI (default) or run a verb.")
    p.add_argument("--model", help="checkpoint: local folder or hub id (default: the start-up rule)")
    p.add_argument("--quantize", choices=["8bit", "4bit"], help="load weights quantized with bitsandbytes")
    p.add_argument("--max-crops", type=int, default=12, help="image crops per image (default 12, as trained)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: first free from 7860)")
    p.add_argument("--share", action="store_true", help="create a public share link (off by default)")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="one admin login (for a team, use --users)")
    p.add_argument("--data-root", default=None,
                   help="projects, accounts, audit log and certificate live here (default ./projects)")
    p.add_argument("--https", action="store_true",
                   help="serve HTTPS with a self-signed certificate (made once, kept under the data root)")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
    p.add_argument("--queue-size", type=int, default=64, help="max waiting requests (default 64)")
    # Other verbs: each takes over the command line.
    p.add_argument("--annotate", metavar="PROJECT", help="open on the Annotate tab with this project (a name under "
                   "the data root, or a folder: its parent becomes the data root)")
    p.add_argument("--finetune", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="run the trainer: everything after --finetune goes to molmo_core.train.cli")
    p.add_argument("--eval", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="evaluate models or saved answers: everything after --eval goes to molmo_core.eval.cli")
    p.add_argument("--export-pixmo-cap", nargs=2, metavar=("FOLDER", "OUT_PARQUET"),
                   help="export an annotation project as PixMo-Cap parquet")
    p.add_argument("--all", action="store_true",
                   help="with --export-pixmo-cap: every annotation not rejected (default: accepted ones only)")
    p.add_argument("--users", nargs="+", metavar="ACTION",
                   help="manage accounts: list | add NAME --role admin|annotator | remove NAME | reset NAME "
                        "(passwords are asked for, or read from stdin with --password-stdin)")
    p.add_argument("--role", choices=["admin", "annotator"], help="with --users add")
    p.add_argument("--password-stdin", action="store_true", help="with --users add/reset: read the password from stdin")
    return p


def users_cli(data_root: str, action: list[str], role: str | None, password_stdin: bool) -> int:
    """`--users list|add|remove|reset`: the accounts file under the data root; changes go to the audit log."""
    import getpass

    from app.access import AccountError, Accounts
    from app.audit import AuditLog

    studio = Path(data_root).resolve() / STUDIO_DIR
    accounts, audit = Accounts(studio / "users.json"), AuditLog(studio / "audit.jsonl")
    verb, names = action[0], action[1:]

    def password() -> str:
        if password_stdin:
            return sys.stdin.readline().rstrip("\n")
        first = getpass.getpass("Password: ")
        if getpass.getpass("Repeat it: ") != first:
            raise AccountError("The two passwords differ; nothing changed.")
        return first

    try:
        if verb == "list" and not names:
            users = accounts.list()
            for u in users:
                print(f"{u.name}\t{u.role}")
            if not users:
                print(f"no accounts in {accounts.path}")
            return 0
        if verb in ("add", "remove", "reset") and len(names) == 1:
            name = names[0]
            if verb == "add":
                if not role:
                    raise AccountError("--users add needs --role admin or --role annotator.")
                accounts.add(name, role, password())
            elif verb == "remove":
                accounts.remove(name)
            else:
                accounts.reset(name, password())
            audit.write(None, f"cli users {verb}", "ok", target=name, **({"role": role} if verb == "add" else {}))
            print(f"{verb}: {name} ({accounts.path})")
            return 0
    except AccountError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("usage: --users list | add NAME --role admin|annotator | remove NAME | reset NAME", file=sys.stderr)
    return 2


def annotate_project(annotate: str, data_root: str, explicit_root: bool) -> tuple[str, str]:
    """(data root, project name) for `--annotate X`: X is a project under the data root, or a folder
    elsewhere, whose parent then becomes the data root (unless --data-root was given: then it must be
    under it)."""
    folder = Path(annotate).expanduser()
    root = Path(data_root).expanduser().resolve()
    candidate = folder.resolve() if (folder.is_absolute() or folder.is_dir()) else (root / folder).resolve()
    if candidate.parent == root:
        return data_root, candidate.name
    if explicit_root or not candidate.is_dir():
        raise SystemExit(f"--annotate {annotate}: no project folder {candidate.name!r} directly under the data root "
                         f"{root}. Give a project under it, or start with --data-root {candidate.parent}.")
    print(f"data root: {candidate.parent} (the folder holding {candidate.name})", flush=True)
    return str(candidate.parent), candidate.name


def cli(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.finetune is not None:
        from molmo_core.train.cli import main as train_main

        return int(train_main(args.finetune) or 0)
    if args.eval is not None:
        from molmo_core.eval.cli import main as eval_main

        return int(eval_main(args.eval) or 0)
    if args.users:
        return users_cli(args.data_root or DEFAULT_DATA_ROOT, args.users, args.role, args.password_stdin)
    if args.export_pixmo_cap:
        from annotate.cli import main_export

        return int(main_export(*args.export_pixmo_cap, include_unreviewed=args.all) or 0)
    if args.max_crops < 1:
        print(f"--max-crops must be at least 1, got {args.max_crops}", file=sys.stderr)
        return 2
    # Default verb: serve the UI (--annotate opens the Annotate tab).
    explicit_root = args.data_root is not None
    args.data_root = args.data_root or DEFAULT_DATA_ROOT
    if args.annotate:
        args.data_root, args.annotate = annotate_project(args.annotate, args.data_root, explicit_root)
    main(model=args.model, quantize=args.quantize, max_crops=args.max_crops, host=args.host, port=args.port,
         share=args.share, auth=args.auth, queue_size=args.queue_size, annotate=args.annotate,
         data_root=args.data_root, https=args.https, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
