"""Command-line entry points for the annotation mode (wired into ``launch.py``).

    python launch.py --export-pixmo-cap <folder> <out.parquet>  -> main_export(folder, out)
    python launch.py --annotate <folder>                         -> the UI on the Annotate tab
    python -m annotate.cli export <folder> <out.parquet> [--include-flagged]
    python -m annotate.cli import <folder> <pixmo-cap.parquet> [--images-dir DIR] [--limit N]
    python -m annotate.cli status <folder>
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .export import export_pixmo_cap, import_pixmo_cap
from .store import Store, StoreError


def main_export(folder: str | Path, out: str | Path, include_flagged: bool = False) -> int:
    """Export project ``folder`` as PixMo-Cap parquet at ``out``; prints a summary, returns an exit code."""
    print(f"export: project={folder} out={out} include_flagged={include_flagged}")
    try:
        report = export_pixmo_cap(folder, out, include_flagged=include_flagged)
    except (FileNotFoundError, StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def main_import(folder: str | Path, parquet: str | Path, images_dir: str | Path | None = None, limit: int | None = None) -> int:
    """Import PixMo-Cap-shaped parquet into project ``folder``; returns an exit code."""
    print(f"import: project={folder} parquet={parquet} images_dir={images_dir} limit={limit}")
    try:
        report = import_pixmo_cap(folder, parquet, images_dir=images_dir, limit=limit)
    except (FileNotFoundError, StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def main_status(folder: str | Path) -> int:
    """Print a project's progress; returns an exit code."""
    try:
        store = Store(folder)
    except (StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(store.progress().summary())
    return 0


def check_project(folder: str | Path) -> str:
    """Open (creating if needed) a project for ``launch.py --annotate``; returns its progress line.

    Raises:
        StoreError: the folder is a file, or its database is corrupt (message says what to do).
    """
    return Store(folder).progress().summary()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m annotate.cli", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="export a project as PixMo-Cap parquet")
    e.add_argument("folder")
    e.add_argument("out")
    e.add_argument("--include-flagged", action="store_true")
    i = sub.add_parser("import", help="import allenai/pixmo-cap-shaped parquet")
    i.add_argument("folder")
    i.add_argument("parquet")
    i.add_argument("--images-dir")
    i.add_argument("--limit", type=int)
    s = sub.add_parser("status", help="print a project's progress")
    s.add_argument("folder")
    a = ap.parse_args(argv)
    if a.cmd == "export":
        return main_export(folder=a.folder, out=a.out, include_flagged=a.include_flagged)
    if a.cmd == "import":
        return main_import(folder=a.folder, parquet=a.parquet, images_dir=a.images_dir, limit=a.limit)
    return main_status(folder=a.folder)


if __name__ == "__main__":
    sys.exit(main())
