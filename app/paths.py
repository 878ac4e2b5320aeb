"""Where the app may read and write: the data root and the other allowed folders.

Every path a user types or picks goes through `inside(...)` before anything touches the disk: the
path is resolved (symlinks followed, `..` removed) and must then lie inside one of the allowed roots
(`Path.is_relative_to`, never a string prefix). Projects are the folders directly under the data root.

    roots = Roots(data_root="./projects")            # + ./checkpoints, $MOLMO_STUDIO_DATA_DIRS
    folder = roots.inside(user_text, "Project folder")   # PathRefused when outside
    roots.projects()                                 # ["birds", "kitchen"]
    roots.project("birds")                           # <data root>/birds, name checked
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

DATA_DIRS_ENV = "MOLMO_STUDIO_DATA_DIRS"  # extra folders the app may read (os.pathsep separated)
DEFAULT_DATA_ROOT = Path("projects")
CHECKPOINTS_DIR = Path("checkpoints")
PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PROJECT_MARKERS = ("annotations.sqlite", "images.txt")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class PathRefused(ValueError):
    """A user-supplied path outside the allowed folders, or a bad project name (the message says what to do)."""


def _resolve(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()


@dataclass
class Roots:
    """The data root (projects, runs, exports) and the extra folders the app may read.

    `data_root` is created on first use. `extra` are read roots: `./checkpoints` and the folders in
    `$MOLMO_STUDIO_DATA_DIRS` (read when the object is made)."""

    data_root: Path = DEFAULT_DATA_ROOT
    extra: Sequence[Path] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.data_root = _resolve(self.data_root)
        env = [p for p in os.environ.get(DATA_DIRS_ENV, "").split(os.pathsep) if p.strip()]
        extra: list[Path] = []
        for r in [CHECKPOINTS_DIR, *self.extra, *env]:
            r = _resolve(r)
            if r != self.data_root and r not in extra:
                extra.append(r)
        self.extra = tuple(extra)

    @property
    def all(self) -> list[Path]:
        return [self.data_root, *self.extra]

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.all)

    def inside(self, text: str | os.PathLike | None, what: str, *, write: bool = False,
               must_exist: bool = True) -> Path:
        """`text` resolved, checked to lie inside an allowed root (the data root only when `write`).

        Relative paths are taken relative to the data root. Raises PathRefused for an empty path, a
        path outside (absolute, `..`, a symlink that leads out), a path that cannot be resolved (NUL
        byte, loop), or (with `must_exist`) one that does not exist; the outside check comes first,
        so nothing about the existence of outside paths is told."""
        raw = str(text or "").strip()
        if not raw:
            raise PathRefused(f"{what}: no path given; pick one under {self.data_root}.")
        try:
            p = Path(raw).expanduser()
            resolved = (p if p.is_absolute() else self.data_root / p).resolve()
        except (OSError, ValueError, RuntimeError):
            raise PathRefused(f"{what} {raw!r} is not a usable path; pick one under {self.data_root}.") from None
        roots = [self.data_root] if write else self.all
        if not any(resolved.is_relative_to(r) for r in roots):
            where = str(self.data_root) if write else self.describe()
            raise PathRefused(f"{what} {raw!r} is outside the folders this app may {'write' if write else 'read'} "
                              f"({where}). Use a folder under the data root, or ask the admin to start the app "
                              f"with --data-root or {DATA_DIRS_ENV}=<folder> to allow it.")
        if must_exist and not resolved.exists():
            raise PathRefused(f"{what} {raw!r} does not exist (looked for {resolved}); check the name.")
        return resolved

    # -- projects --------------------------------------------------------------------------------

    def projects(self) -> list[str]:
        """Names of the project folders under the data root (folders with images, images.txt or a store)."""
        if not self.data_root.is_dir():
            return []
        out = []
        for d in sorted(self.data_root.iterdir()):
            if not d.is_dir() or d.is_symlink() or not PROJECT_NAME.match(d.name):
                continue
            if any((d / m).exists() for m in PROJECT_MARKERS) or any(
                    f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir() if f.is_file()):
                out.append(d.name)
        return out

    def project(self, name: str | None, *, create: bool = False) -> Path:
        """The folder of project `name` (a plain name, not a path) under the data root."""
        name = (name or "").strip()
        if not PROJECT_NAME.match(name):
            raise PathRefused(f"Project {name!r}: a project is named by letters, digits, '.', '_' or '-' (at most "
                              "64, not starting with '.'); pick one from the list.")
        folder = self.inside(name, "Project", write=True, must_exist=False)
        if folder.parent != self.data_root:
            raise PathRefused(f"Project {name!r} is not a folder directly under the data root {self.data_root}.")
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            raise PathRefused(f"Project {name!r} does not exist under {self.data_root}; pick one from the list "
                              "or ask an admin to create it.")
        return folder


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
