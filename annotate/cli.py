"""Command-line entry points for the annotation mode (wired into ``launch.py``).

    python launch.py --export-pixmo-cap <folder> <out.parquet> [--all]  -> main_export(folder, out, ...)
    python launch.py --annotate <folder>                         -> the UI on the Annotate tab
    python -m annotate.cli export <folder> <out.parquet> [--all] [--include-flagged]
    python -m annotate.cli import <folder> <pixmo-cap.parquet> [--images-dir DIR] [--limit N] [--pending]
    python -m annotate.cli status <folder>
    python -m annotate.cli stats <folder>

An export holds the annotations an admin accepted in the Review tab; ``--all`` exports everything
that is not rejected (accepted and still unreviewed). Rejected annotations are never exported.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .export import export_pixmo_cap, import_pixmo_cap
from .review import STATS_HEADERS, annotator_stats
from .store import Store, StoreError


def main_export(folder: str | Path, out: str | Path, include_flagged: bool = False,
                include_unreviewed: bool = False) -> int:
    """Export project ``folder`` as PixMo-Cap parquet at ``out``; prints a summary, returns an exit code.

    Accepted annotations only, unless ``include_unreviewed`` (``--all``): everything not rejected."""
    print(f"export: project={folder} out={out} include_flagged={include_flagged} "
          f"{'all not rejected (--all)' if include_unreviewed else 'accepted only'}")
    try:
        report = export_pixmo_cap(folder, out, include_flagged=include_flagged, include_unreviewed=include_unreviewed)
    except (FileNotFoundError, StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def main_import(folder: str | Path, parquet: str | Path, images_dir: str | Path | None = None, limit: int | None = None,
                accept: bool = True) -> int:
    """Import PixMo-Cap-shaped parquet into project ``folder``; returns an exit code."""
    print(f"import: project={folder} parquet={parquet} images_dir={images_dir} limit={limit} "
          f"{'accepted' if accept else 'pending review'}")
    try:
        report = import_pixmo_cap(folder, parquet, images_dir=images_dir, limit=limit, accept=accept)
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


def main_stats(folder: str | Path) -> int:
    """Print the per-annotator statistics of a project (tab separated); returns an exit code."""
    try:
        store = Store(folder, sync=False)
    except (StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\t".join(STATS_HEADERS))
    for st in annotator_stats(store):
        print("\t".join("-" if v is None else str(v) for v in st.row()))
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
    e.add_argument("--all", action="store_true", dest="include_unreviewed",
                   help="export every annotation not rejected (default: accepted ones only)")
    i = sub.add_parser("import", help="import allenai/pixmo-cap-shaped parquet")
    i.add_argument("folder")
    i.add_argument("parquet")
    i.add_argument("--images-dir")
    i.add_argument("--limit", type=int)
    i.add_argument("--pending", action="store_true", help="leave the imported annotations pending review "
                   "(default: accepted on import)")
    s = sub.add_parser("status", help="print a project's progress")
    s.add_argument("folder")
    t = sub.add_parser("stats", help="print per-annotator statistics")
    t.add_argument("folder")
    a = ap.parse_args(argv)
    if a.cmd == "export":
        return main_export(folder=a.folder, out=a.out, include_flagged=a.include_flagged,
                           include_unreviewed=a.include_unreviewed)
    if a.cmd == "import":
        return main_import(folder=a.folder, parquet=a.parquet, images_dir=a.images_dir, limit=a.limit,
                           accept=not a.pending)
    if a.cmd == "stats":
        return main_stats(folder=a.folder)
    return main_status(folder=a.folder)


if __name__ == "__main__":
    sys.exit(main())
