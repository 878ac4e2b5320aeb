"""PixMo-Cap parquet export and import.

Export writes one row per image that has at least one exported annotation, with exactly the public
``allenai/pixmo-cap`` columns first:

    image_url    string         the original URL when known, else the file's ``file://`` URI
    caption      string         the image's caption as it stands (a reviewer's edit when there is a
                                newer one; "" when none was written yet; see caption_source)
    transcripts  list<string>   the exported transcripts, oldest first: the reviewer's edit when the
                                admin edited one, else the annotator's edited transcript

Which annotations are exported (``annotate.review`` decides their state):

    default                  accepted ones only: what an admin approved
    include_unreviewed=True  (``--all``) everything not rejected: accepted and still pending
    rejected                 never

Imported PixMo-Cap rows are accepted on import (they come from a reviewed, published data set)
unless ``import_pixmo_cap(..., accept=False)``.

then our own columns (all prefixed-free and documented in ``EXTRA_COLUMNS``). Import reads any
parquet with (at least) ``image_url``, ``caption`` and ``transcripts``, resolves each image in a
local folder (by ``image_sha256`` when the parquet has it, else by the URL's file name) and
reports the images it could not find.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from .audio import sha256_file
from .store import IMAGE_EXTENSIONS, Store, check_annotator

PIXMO_CAP_SCHEMA = pa.schema(
    [
        pa.field("image_url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("transcripts", pa.list_(pa.string())),
    ]
)

EXTRA_COLUMNS = pa.schema(
    [
        pa.field("image_path", pa.string()),  # relative to the project folder (absolute if outside)
        pa.field("image_sha256", pa.string()),
        pa.field("caption_source", pa.string()),  # manual | model | model+edited | imported | reviewed | none
        pa.field("caption_model", pa.string()),
        pa.field("caption_updated_at", pa.string()),
        pa.field("transcripts_raw", pa.list_(pa.string())),  # ASR output before editing
        pa.field("annotators", pa.list_(pa.string())),
        pa.field("audio_paths", pa.list_(pa.string())),  # FLAC receipts, relative to the project
        pa.field("audio_sha256", pa.list_(pa.string())),
        pa.field("audio_durations", pa.list_(pa.float64())),  # seconds
        pa.field("audio_sample_rates", pa.list_(pa.int64())),
        pa.field("segments", pa.list_(pa.string())),  # per transcript: JSON [{start, end, text}]
        pa.field("created_at", pa.list_(pa.string())),  # per transcript, ISO 8601 UTC
        pa.field("asr_models", pa.list_(pa.string())),  # the speech model of each transcript
        pa.field("asr_model_sha256s", pa.list_(pa.string())),  # sha256 of that model's model.bin
        pa.field("image_status", pa.string()),  # active | flagged | missing
        pa.field("review_states", pa.list_(pa.string())),  # per transcript: accepted | pending
        pa.field("reviewers", pa.list_(pa.string())),  # per transcript: who accepted it (None: pending)
        pa.field("transcripts_annotator", pa.list_(pa.string())),  # the annotators' own text, before review edits
        pa.field("caption_annotator", pa.string()),  # the annotators' caption (differs when a reviewer edited it)
    ]
)

EXPORT_SCHEMA = pa.schema(list(PIXMO_CAP_SCHEMA) + list(EXTRA_COLUMNS))


@dataclass
class PixmoCapRecord:
    """One public PixMo-Cap row (the three ``allenai/pixmo-cap`` columns)."""

    image_url: str
    caption: str
    transcripts: list[str]

    def to_dict(self) -> dict:
        return {"image_url": self.image_url, "caption": self.caption, "transcripts": list(self.transcripts)}

    @classmethod
    def from_dict(cls, d: dict) -> "PixmoCapRecord":
        """Raises: ValueError when a column is missing or has the wrong type."""
        missing = [k for k in ("image_url", "caption", "transcripts") if k not in d]
        if missing:
            raise ValueError(f"PixMo-Cap record lacks {missing}; got keys {sorted(d)}")
        if not isinstance(d["transcripts"], (list, tuple)) or not all(isinstance(t, str) for t in d["transcripts"]):
            raise ValueError(f"'transcripts' must be a list of strings, got {d['transcripts']!r}")
        return cls(str(d["image_url"]), str(d["caption"]), list(d["transcripts"]))


def write_pixmo_cap(records: list[PixmoCapRecord], out_parquet: str | os.PathLike) -> Path:
    """Write records as a parquet with exactly the public PixMo-Cap schema."""
    out = Path(out_parquet)
    pq.write_table(pa.Table.from_pylist([r.to_dict() for r in records], schema=PIXMO_CAP_SCHEMA), out)
    return out


@dataclass
class ExportReport:
    path: Path
    rows: int
    annotations: int
    without_caption: int
    excluded_flagged: int
    include_unreviewed: bool = False
    left_out_pending: int = 0  # annotations awaiting review, not exported (default export only)
    left_out_rejected: int = 0

    def summary(self) -> str:
        what = "accepted and unreviewed" if self.include_unreviewed else "accepted"
        s = f"Exported {self.rows} images ({self.annotations} {what} transcripts) to {self.path}"
        if self.without_caption:
            s += f"; {self.without_caption} without a caption yet (caption is empty)"
        if self.excluded_flagged:
            s += f"; {self.excluded_flagged} flagged images left out"
        if self.left_out_pending:
            s += (f"; {self.left_out_pending} annotations awaiting review left out (review them, or export "
                  "everything not rejected with --all)")
        if self.left_out_rejected:
            s += f"; {self.left_out_rejected} rejected annotations left out"
        return s + "."


def export_pixmo_cap(
    project_dir: str | os.PathLike,
    out_parquet: str | os.PathLike,
    include_flagged: bool = False,
    include_unreviewed: bool = False,
) -> ExportReport:
    """Export a project's records as PixMo-Cap parquet.

    Args:
        project_dir: the project folder.
        out_parquet: the parquet file to write (written to a temporary name, then renamed).
        include_flagged: also export images flagged as bad.
        include_unreviewed: export every annotation that is not rejected (accepted and pending);
            by default only accepted ones are exported. Rejected annotations are never exported.

    Returns:
        What was written.

    Raises:
        FileNotFoundError: ``project_dir`` has no annotation database.
        CorruptStoreError: the database cannot be read.
    """
    from .store import DB_NAME

    root = Path(project_dir).expanduser()
    if not (root / DB_NAME).is_file():
        raise FileNotFoundError(
            f"No annotation project in {root}: {DB_NAME} not found. Open the folder in the "
            "Annotate tab (or `python launch.py --annotate <folder>`) first."
        )
    store = Store(root, sync=False)
    stored_captions = store.captions()
    captions = store.current_captions()
    wanted = ("accepted", "pending") if include_unreviewed else ("accepted",)
    by_image: dict[int, list] = {}
    left_pending = left_rejected = 0
    for a in store.annotations():
        if a.review_state in wanted:
            by_image.setdefault(a.image_id, []).append(a)
        elif a.review_state == "rejected":
            left_rejected += 1
        else:
            left_pending += 1
    cols: dict[str, list] = {f.name: [] for f in EXPORT_SCHEMA}
    excluded = 0
    n_ann = 0
    without_caption = 0
    for img in store.images():
        anns = by_image.get(img["id"])
        if not anns:
            continue
        if img["status"] == "flagged" and not include_flagged:
            excluded += 1
            continue
        cap = captions.get(img["id"])
        url = img["url"] or (store.abs(img["path"]).resolve().as_uri() if img["path"] else "")
        cols["image_url"].append(url)
        cols["caption"].append(cap["caption"] if cap else "")
        cols["transcripts"].append([a.final_transcript for a in anns])
        cols["image_path"].append(img["path"])
        cols["image_sha256"].append(img["sha256"])
        cols["caption_source"].append(cap["source"] if cap else "none")
        cols["caption_model"].append(cap["model"] if cap else None)
        cols["caption_updated_at"].append(cap["updated_at"] if cap else None)
        cols["transcripts_raw"].append([a.transcript_raw for a in anns])
        cols["annotators"].append([a.annotator for a in anns])
        cols["audio_paths"].append([a.audio_path for a in anns])
        cols["audio_sha256"].append([a.audio_sha256 for a in anns])
        cols["audio_durations"].append([a.duration for a in anns])
        cols["audio_sample_rates"].append([a.sample_rate for a in anns])
        cols["segments"].append([json.dumps(a.segments) for a in anns])
        cols["created_at"].append([a.created_at for a in anns])
        cols["asr_models"].append([a.asr_model for a in anns])
        cols["asr_model_sha256s"].append([a.asr_model_sha256 for a in anns])
        cols["image_status"].append(img["status"])
        cols["review_states"].append([a.review_state for a in anns])
        cols["reviewers"].append([a.reviewer for a in anns])
        cols["transcripts_annotator"].append([a.transcript for a in anns])
        stored = stored_captions.get(img["id"])
        cols["caption_annotator"].append(stored["caption"] if stored else None)
        n_ann += len(anns)
        without_caption += cap is None
    table = pa.table(cols, schema=EXPORT_SCHEMA)
    out = Path(out_parquet).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ExportReport(
        path=out, rows=table.num_rows, annotations=n_ann, without_caption=without_caption, excluded_flagged=excluded,
        include_unreviewed=include_unreviewed, left_out_pending=left_pending, left_out_rejected=left_rejected,
    )


@dataclass
class ImportReport:
    rows: int
    imported: int
    already_present: int
    missing: int
    missing_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"Read {self.rows} rows: {self.imported} imported, {self.already_present} already in the project"
        if self.missing:
            s += (
                f", {self.missing} images not found locally (kept as 'missing', e.g. "
                + ", ".join(self.missing_examples[:3])
                + ")"
            )
        return s + "."


IMPORT_ANNOTATOR = "pixmo-cap"
IMPORT_REVIEWER = "import"


def import_pixmo_cap(
    project_dir: str | os.PathLike,
    parquet: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    accept: bool = True,
) -> ImportReport:
    """Import ``allenai/pixmo-cap``-shaped parquet (``image_url``, ``caption``, ``transcripts``).

    Each row's image is looked up in ``images_dir`` (default: the project folder): by
    ``image_sha256`` when the parquet has that column, else by the file name at the end of the
    URL. Rows whose image is not found are still imported (status ``missing``, URL kept) and
    counted. Transcripts become annotations by ``pixmo-cap#1``, ``pixmo-cap#2``, ... with no
    audio; the caption becomes the image's caption with source ``imported``. With ``accept`` (the
    default) the imported annotations are recorded as accepted by reviewer ``IMPORT_REVIEWER`` (a
    published data set was reviewed by its makers); ``accept=False`` leaves them pending for the
    Review tab.

    Raises:
        FileNotFoundError: the parquet file does not exist.
        ValueError: the parquet lacks one of the three PixMo-Cap columns.
    """
    src = Path(parquet).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"Parquet file not found: {src}")
    table = pq.read_table(src)
    need = [f.name for f in PIXMO_CAP_SCHEMA]
    absent = [c for c in need if c not in table.column_names]
    if absent:
        raise ValueError(
            f"{src} is not PixMo-Cap shaped: missing column(s) {absent}; found {table.column_names}. "
            f"Expected at least {need}."
        )
    store = Store(project_dir, sync=False)
    folder = Path(images_dir).expanduser().resolve() if images_dir else store.root
    by_name: dict[str, Path] = {}
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and store.audio_dir not in p.parents:
            by_name.setdefault(p.name, p)
            files.append(p)
    has_sha = "image_sha256" in table.column_names
    by_sha: dict[str, Path] = {}
    if has_sha:
        for p in files:
            by_sha.setdefault(sha256_file(p), p)
    rows = table.to_pylist()
    if limit is not None:
        rows = rows[:limit]
    imported = present = missing = 0
    examples: list[str] = []
    for row in rows:
        url = row["image_url"]
        local = None
        if has_sha and row.get("image_sha256"):
            local = by_sha.get(row["image_sha256"])
        if local is None and url:
            name = unquote(Path(urlparse(url).path).name)
            local = by_name.get(name)
        if local is None:
            missing += 1
            if len(examples) < 10:
                examples.append(url)
        image_id, added = _ensure_image(store, local, url)
        if not added:
            present += 1
            continue
        imported += 1
        for i, t in enumerate(row.get("transcripts") or []):
            if t and t.strip():
                rec = store.save_annotation(
                    image_id, check_annotator(f"{IMPORT_ANNOTATOR}#{i + 1}"), None, t, t, asr_model=None
                )
                if accept:
                    store.set_review(rec.id, "accepted", IMPORT_REVIEWER)
        if row.get("caption") and row["caption"].strip():
            store.set_caption(image_id, row["caption"], IMPORT_ANNOTATOR, source="imported")
    return ImportReport(len(rows), imported, present, missing, examples)


def _ensure_image(store: Store, local: Path | None, url: str) -> tuple[int, bool]:
    """Add the image (local file and/or URL); returns (image id, newly added)."""
    if local is not None:
        added = store.add_image(path=local, url=url)
        key, val = "path", store.rel(local)
    else:
        added = store.add_image(url=url)
        key, val = "url", url
    with store._read() as con:
        if key == "path":
            row = con.execute("SELECT id FROM images WHERE path=?", (val,)).fetchone()
        else:
            row = con.execute("SELECT id FROM images WHERE path IS NULL AND url=?", (val,)).fetchone()
        if local is None and row is not None:
            con.execute("UPDATE images SET status='missing' WHERE id=?", (row["id"],))
    return row["id"], bool(added)
