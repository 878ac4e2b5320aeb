"""The app's one temp folder, kept from growing forever.

Everything the app writes for the browser (result downloads, local-microphone recordings, rendered example
clocks) goes in a sub-folder of `<system temp>/molmo_studio/` (`$MOLMO_STUDIO_TMP` overrides it). Each time a
file is made in a sub-folder, files there older than `MAX_AGE_S` are deleted: the browser has long fetched
them (Gradio serves its own copy from its cache, which `build_demo` cleans with `gr.Blocks(delete_cache=...)`).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

ROOT_ENV = "MOLMO_STUDIO_TMP"
MAX_AGE_S = 24 * 3600
GRADIO_DELETE_CACHE = (3600, MAX_AGE_S)  # gr.Blocks(delete_cache=(every, older_than)) in seconds


def temp_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or Path(tempfile.gettempdir()) / "molmo_studio")


def prune(folder: Path, max_age_s: float = MAX_AGE_S) -> list[Path]:
    """Delete the files in `folder` (and its sub-folders) last modified more than `max_age_s` ago, then the
    sub-folders left empty. Files that vanish or cannot be removed meanwhile are skipped. Returns what went."""
    cutoff = time.time() - max_age_s
    removed = []
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # deepest first
        try:
            if path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()
            elif path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def temp_dir(sub: str, max_age_s: float = MAX_AGE_S) -> Path:
    """`<root>/<sub>`, created, with its files older than `max_age_s` deleted."""
    folder = temp_root() / sub
    folder.mkdir(parents=True, exist_ok=True)
    prune(folder, max_age_s)
    return folder


def new_temp_file(sub: str, stem: str, suffix: str) -> Path:
    """A new, empty, uniquely named file `<root>/<sub>/<stem>-<time>-<random><suffix>` (old ones pruned)."""
    folder = temp_dir(sub)
    fd, name = tempfile.mkstemp(prefix=f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=suffix, dir=folder)
    os.close(fd)
    return Path(name)
