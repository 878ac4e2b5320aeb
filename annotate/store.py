"""The annotation project store: SQLite (WAL) in the project folder.

A project is a folder of images (searched recursively), or a folder holding ``images.txt`` with
one image path (relative to the folder, or absolute) or http(s) URL per line. The folder gets:

    annotations.sqlite      the database (plus -wal / -shm while open)
    audio/<image id>/*.flac the audio receipts, one per annotation

Several annotators (by name) work at once, from several threads or processes. ``next_image``
hands out an image that still needs annotations, that this annotator has neither annotated nor
skipped, and that is not already claimed by enough other annotators (claims expire). Every write
is one ``BEGIN IMMEDIATE`` transaction, so two annotators never receive the last slot of an image.

Every annotation has a review state: ``pending`` when saved, then ``accepted`` or ``rejected`` by an
admin (``annotate.review``), once. A rejected annotation stops counting towards its image (it is not
"live"), so the image goes back to the queue for everyone, its own annotator included; the rejected
row, its audio receipt and the reviewer's reason are kept. A reviewer's edits are stored next to the
annotator's text (``reviewed_transcript``, ``reviewed_caption``), never over it.

A save is atomic: the audio receipt is written to a temporary name, fsynced and renamed, and only
then is the database row committed. A crash before the commit leaves at most an orphan audio file
with no row: harmless, and deleted by ``cleanup_orphans``. A file that is not an SQLite database,
or an SQLite database that is not ours, is reported with a clear error and never overwritten.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from .audio import Audio, AudioReceipt, receipt_name, sha256_file, write_flac_atomic

DB_NAME = "annotations.sqlite"
AUDIO_DIR = "audio"
LIST_FILE = "images.txt"
SCHEMA_VERSION = 3  # 2: annotations.asr_model_sha256; 3: review columns, no UNIQUE (image_id, annotator)
# (older databases are brought to this version on open, rows kept: see _migrate)
REVIEW_STATES = ("pending", "accepted", "rejected")
# An annotation counts towards its image unless rejected ("live"); SQL for that, on the alias a.
LIVE = "a.review_state != 'rejected'"
APP_ID = "molmo-studio-annotate"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_ANNOTATIONS_PER_IMAGE = 1
DEFAULT_CLAIM_SECONDS = 30 * 60
ORPHAN_MIN_AGE_SECONDS = 15 * 60
SQLITE_HEADER = b"SQLite format 3\x00"

# Test-only hook: MOLMO_ANNOTATE_TEST_PAUSE="<stage>:<marker file>" makes a save touch the marker
# file and stop at <stage> ("audio_written" or "before_commit") for up to 5 minutes, so a test can
# SIGKILL the process in the middle of a save deterministically.
PAUSE_ENV = "MOLMO_ANNOTATE_TEST_PAUSE"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id       INTEGER PRIMARY KEY,
    path     TEXT UNIQUE,                -- posix path relative to the project folder (absolute if outside)
    url      TEXT,                       -- original URL when known (URL list, pixmo-cap import)
    sha256   TEXT,                       -- of the image file's bytes (NULL for URL-only images)
    status   TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'flagged', 'missing')),
    flags    TEXT NOT NULL DEFAULT '[]', -- JSON list of {annotator, reason, at}
    skipped  INTEGER NOT NULL DEFAULT 0, -- how many annotators skipped it (details in skips)
    added_at TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS images_url_only ON images(url) WHERE path IS NULL;
CREATE TABLE IF NOT EXISTS annotations (
    id             INTEGER PRIMARY KEY,
    image_id       INTEGER NOT NULL REFERENCES images(id),
    annotator      TEXT NOT NULL,
    transcript_raw TEXT NOT NULL,        -- the ASR output as produced (never changed)
    transcript     TEXT NOT NULL,        -- as edited by the annotator (never changed by a review)
    segments       TEXT NOT NULL DEFAULT '[]',  -- JSON list of {start, end, text} (seconds)
    language       TEXT,
    asr_model      TEXT,                 -- the speech model that made transcript_raw (bundled:tiny.en, small.en ...)
    asr_model_sha256 TEXT,               -- sha256 of that model's model.bin
    audio_path     TEXT,                 -- relative to the project folder; NULL for imported text
    audio_sha256   TEXT,
    duration       REAL,
    sample_rate    INTEGER,
    channels       INTEGER,
    created_at     TEXT NOT NULL,
    review_state   TEXT NOT NULL DEFAULT 'pending' CHECK (review_state IN ('pending', 'accepted', 'rejected')),
    reviewer       TEXT,                 -- who accepted or rejected it
    reviewed_at    TEXT,
    review_reason  TEXT,                 -- why it was rejected
    reviewed_transcript TEXT,            -- the reviewer's edit of the transcript (NULL: accepted as written)
    reviewed_caption    TEXT             -- the image caption as the reviewer edited it when accepting (NULL: not edited)
);
CREATE TABLE IF NOT EXISTS captions (
    image_id   INTEGER PRIMARY KEY REFERENCES images(id),
    caption    TEXT NOT NULL,
    source     TEXT NOT NULL,            -- manual | model | model+edited | imported
    model      TEXT,
    annotator  TEXT,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    image_id   INTEGER NOT NULL REFERENCES images(id),
    annotator  TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (image_id, annotator)
);
CREATE TABLE IF NOT EXISTS skips (
    image_id   INTEGER NOT NULL REFERENCES images(id),
    annotator  TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    PRIMARY KEY (image_id, annotator)
);
"""
# Version 3 dropped UNIQUE (image_id, annotator), so that an annotator may describe an image again after
# a rejection; at most one live (not rejected) annotation per image and annotator is kept by this
# partial index, made by _migrate (it needs the review_state column, absent before version 3).
LIVE_INDEX = ("CREATE UNIQUE INDEX IF NOT EXISTS annotations_live ON annotations(image_id, annotator) "
              "WHERE review_state != 'rejected'")
REVIEW_INDEX = "CREATE INDEX IF NOT EXISTS annotations_review ON annotations(review_state, id)"


class StoreError(RuntimeError):
    """A store operation failed; the message is fit to show a user."""


class CorruptStoreError(StoreError):
    """The database file is not a readable Molmo Studio annotation database."""


class AlreadyAnnotatedError(StoreError):
    """This annotator already saved an annotation for this image."""


class AlreadyReviewedError(StoreError):
    """The annotation was already accepted or rejected; review decisions are final."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


_ANNOTATOR_RE = re.compile(r"^[\w .@#'-]{1,64}$")


def check_annotator(name: str | None) -> str:
    """Normalise an annotator name.

    Raises:
        ValueError: empty, longer than 64 characters, or with characters other than letters,
            digits, space, ``_ . @ # ' -``.
    """
    n = (name or "").strip()
    if not n:
        raise ValueError("Enter your annotator name first (it is stored with every record).")
    if not _ANNOTATOR_RE.match(n):
        raise ValueError(
            f"Annotator name {n!r} is not allowed: use up to 64 letters, digits, spaces or _ . @ # ' -"
        )
    return n


@dataclass
class Task:
    """An image handed to an annotator."""

    image_id: int
    path: str | None  # as stored (relative to the project folder, or absolute)
    url: str | None
    abs_path: Path | None
    sha256: str | None
    done: int  # annotations saved so far (all annotators)
    needed: int  # annotations wanted per image
    notes: list[str] = field(default_factory=list)

    @property
    def display_name(self) -> str:
        return self.path or self.url or f"image {self.image_id}"


@dataclass
class Progress:
    total_images: int
    complete_images: int
    annotations: int
    annotations_needed: int
    per_image: int
    per_annotator: dict[str, int]
    skipped: int
    flagged: int
    missing: int
    missing_paths: list[str]
    rejected: int = 0  # annotations rejected in review (their images went back to the queue)
    pending_review: int = 0  # live annotations no admin has reviewed yet

    def summary(self, annotator: str | None = None, others: bool = True) -> str:
        """One line, e.g. 'Images 3/10 complete; 4/20 annotations; you: 2; ...'.

        Counts are of live annotations (rejected ones excluded). ``others=False`` leaves out the
        other annotators' names and counts (what an annotator who is not an admin may see)."""
        parts = [
            f"Images {self.complete_images}/{self.total_images} complete",
            f"annotations {self.annotations}/{self.annotations_needed} ({self.per_image} per image)",
        ]
        if annotator:
            parts.append(f"you ({annotator}): {self.per_annotator.get(annotator, 0)}")
        rest = {k: v for k, v in self.per_annotator.items() if k != annotator} if others else {}
        if rest:
            parts.append("others: " + ", ".join(f"{k} {v}" for k, v in sorted(rest.items())))
        if self.rejected:
            parts.append(f"rejected in review {self.rejected}")
        if self.skipped:
            parts.append(f"skips {self.skipped}")
        if self.flagged:
            parts.append(f"flagged {self.flagged}")
        if self.missing:
            shown = ", ".join(self.missing_paths[:3]) + (" ..." if self.missing > 3 else "")
            parts.append(f"missing files {self.missing} ({shown})")
        return "; ".join(parts)


@dataclass
class AnnotationRecord:
    id: int
    image_id: int
    annotator: str
    transcript_raw: str
    transcript: str
    segments: list[dict[str, Any]]
    language: str | None
    asr_model: str | None
    audio_path: str | None
    audio_sha256: str | None
    duration: float | None
    sample_rate: int | None
    channels: int | None
    created_at: str
    asr_model_sha256: str | None = None
    review_state: str = "pending"  # pending | accepted | rejected
    reviewer: str | None = None
    reviewed_at: str | None = None
    review_reason: str | None = None  # why it was rejected
    reviewed_transcript: str | None = None  # the reviewer's edit; the annotator's text stays in `transcript`
    reviewed_caption: str | None = None  # the image caption as the reviewer edited it when accepting

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "AnnotationRecord":
        d = dict(row)
        d["segments"] = json.loads(d["segments"] or "[]")
        return cls(**d)

    @property
    def live(self) -> bool:
        """Counts towards its image (not rejected)."""
        return self.review_state != "rejected"

    @property
    def final_transcript(self) -> str:
        """The transcript as approved: the reviewer's edit when there is one, else the annotator's."""
        return self.reviewed_transcript if self.reviewed_transcript is not None else self.transcript


@dataclass
class SyncReport:
    added: int
    total: int
    missing: list[str]


class Store:
    """One annotation project. Safe to use from several threads and processes at once.

    Args:
        project_dir: the project folder (created if absent).
        annotations_per_image: N, how many annotators describe each image (PixMo used 1-3).
            None keeps the project's stored value (default 1 for a new project).
        claim_seconds: how long a handed-out image stays reserved for its annotator.
        sync: scan the folder (or ``images.txt``) for new images when opening.

    Raises:
        CorruptStoreError: the database file exists but cannot be used (left untouched).
        ValueError: ``annotations_per_image`` < 1.
    """

    def __init__(
        self,
        project_dir: str | os.PathLike,
        annotations_per_image: int | None = None,
        claim_seconds: float = DEFAULT_CLAIM_SECONDS,
        sync: bool = True,
    ) -> None:
        self.root = Path(project_dir).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"Project path {self.root} is a file; a project is a folder of images.")
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / DB_NAME
        self.audio_dir = self.root / AUDIO_DIR
        self.claim_seconds = float(claim_seconds)
        if annotations_per_image is not None and int(annotations_per_image) < 1:
            raise ValueError(f"annotations_per_image must be >= 1, got {annotations_per_image}")
        self._check_file()
        self._init_schema(annotations_per_image)
        if sync:
            self.sync_images()

    # -- connection ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(str(self.db_path), timeout=60.0, isolation_level=None)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA busy_timeout = 60000")
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as e:
            raise self._corrupt(str(e)) from None
        return con

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            yield con
        except sqlite3.DatabaseError as e:
            if _is_corruption(e):
                raise self._corrupt(str(e)) from None
            raise
        finally:
            con.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); rolled back on any exception."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                if con.in_transaction:  # SQLite may have rolled back already (e.g. on SQLITE_FULL)
                    con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            if _is_corruption(e):
                raise self._corrupt(str(e)) from None
            if isinstance(e, sqlite3.OperationalError):  # locked too long, disk full, read-only folder
                raise StoreError(f"Nothing was saved: the annotation database {self.db_path} refused the write "
                                 f"({e}). Check free disk space and write permission, then try again.") from None
            raise
        finally:
            con.close()

    def _corrupt(self, detail: str) -> CorruptStoreError:
        return CorruptStoreError(
            f"The annotation database {self.db_path} cannot be read ({detail}). It was left "
            f"untouched. Restore it from a backup, or move it aside (for example rename it to "
            f"{DB_NAME}.corrupt) to start a new database; the audio receipts in "
            f"{self.audio_dir} are kept."
        )

    def _check_file(self) -> None:
        if not self.db_path.exists():
            return
        if self.db_path.is_dir():
            raise self._corrupt("it is a folder, not a file")
        with open(self.db_path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
        if head and head != SQLITE_HEADER:
            raise self._corrupt("file is not an SQLite database")
        if not head:
            return  # a 0-byte file is an empty database: SQLite initialises it
        with self._read() as con:
            try:
                result = con.execute("PRAGMA quick_check").fetchone()[0]
            except sqlite3.DatabaseError as e:
                raise self._corrupt(str(e)) from None
            if result != "ok":
                raise self._corrupt(f"integrity check: {result}")
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "meta" not in tables:
                raise self._corrupt(
                    f"it is an SQLite database but not a Molmo Studio annotation database "
                    f"(tables: {', '.join(sorted(tables))})"
                )
            if "meta" in tables:
                app = con.execute("SELECT value FROM meta WHERE key='app'").fetchone()
                if app is None or app[0] != APP_ID:
                    raise self._corrupt("its meta table does not belong to Molmo Studio")
                ver = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if ver is not None and int(ver[0]) > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.db_path} was written by a newer Molmo Studio (schema {ver[0]}, "
                        f"this version reads {SCHEMA_VERSION}). Update Molmo Studio."
                    )

    def _init_schema(self, annotations_per_image: int | None) -> None:
        con = self._connect()
        try:
            mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"Could not switch {self.db_path} to WAL mode (got {mode!r}); the folder "
                    "must be on a local file system that supports shared memory."
                )
            con.executescript(SCHEMA)  # idempotent (IF NOT EXISTS)
        except sqlite3.DatabaseError as e:
            raise self._corrupt(str(e)) from None
        finally:
            con.close()
        with self._write() as con:
            _migrate(con)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('app', ?)", (APP_ID,))
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            con.execute("INSERT OR IGNORE INTO meta VALUES ('created_at', ?)", (now_iso(),))
            con.execute(
                "INSERT OR IGNORE INTO meta VALUES ('annotations_per_image', ?)",
                (str(annotations_per_image or DEFAULT_ANNOTATIONS_PER_IMAGE),),
            )
            if annotations_per_image is not None:
                con.execute(
                    "UPDATE meta SET value=? WHERE key='annotations_per_image'",
                    (str(int(annotations_per_image)),),
                )

    # -- settings --------------------------------------------------------------------------

    @property
    def annotations_per_image(self) -> int:
        with self._read() as con:
            return int(con.execute("SELECT value FROM meta WHERE key='annotations_per_image'").fetchone()[0])

    # -- images ----------------------------------------------------------------------------

    def rel(self, path: str | os.PathLike) -> str:
        """How a local file is referenced: posix path relative to the project, else absolute."""
        p = Path(path).expanduser().resolve()
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return p.as_posix()

    def abs(self, stored_path: str) -> Path:
        p = Path(stored_path)
        return p if p.is_absolute() else self.root / p

    def scan(self) -> list[str]:
        """Image references of the project: lines of ``images.txt`` if present, else image files."""
        listing = self.root / LIST_FILE
        if listing.is_file():
            out = []
            for line in listing.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(line)
            return out
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = Path(dirpath).relative_to(self.root)
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and not (rel_dir == Path(".") and d == AUDIO_DIR)
            )
            for name in sorted(filenames):
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                    found.append((Path(dirpath) / name).relative_to(self.root).as_posix())
        return found

    def sync_images(self) -> SyncReport:
        """Add new images found by ``scan``; mark vanished files missing, reappeared ones active."""
        refs = self.scan()
        added = 0
        for ref in refs:
            if is_url(ref):
                added += self.add_image(url=ref)
            else:
                added += self.add_image(path=ref)
        missing = []
        with self._read() as con:
            rows = con.execute("SELECT id, path, status FROM images WHERE path IS NOT NULL").fetchall()
        for r in rows:
            exists = self.abs(r["path"]).is_file()
            if not exists and r["status"] == "active":
                self._set_status(r["id"], "missing")
            elif exists and r["status"] == "missing":
                self._set_status(r["id"], "active")
            if not exists:
                missing.append(r["path"])
        with self._read() as con:
            total = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        return SyncReport(added=added, total=total, missing=missing)

    def add_image(self, path: str | os.PathLike | None = None, url: str | None = None) -> int:
        """Add one image by local path and/or URL. Returns 1 if added, 0 if already present."""
        if path is None and url is None:
            raise ValueError("add_image needs a path or a url")
        stored = None
        digest = None
        status = "active"
        if path is not None:
            p = Path(path)
            absolute = p if p.is_absolute() else self.root / p
            stored = self.rel(absolute)
            if absolute.is_file():
                with self._read() as con:
                    if con.execute("SELECT 1 FROM images WHERE path=?", (stored,)).fetchone():
                        return 0
                digest = sha256_file(absolute)
            else:
                status = "missing"
        with self._write() as con:
            if stored is not None:
                row = con.execute("SELECT id, url FROM images WHERE path=?", (stored,)).fetchone()
                if row:
                    if url and not row["url"]:
                        con.execute("UPDATE images SET url=? WHERE id=?", (url, row["id"]))
                    return 0
            else:
                if con.execute("SELECT 1 FROM images WHERE path IS NULL AND url=?", (url,)).fetchone():
                    return 0
            con.execute(
                "INSERT INTO images (path, url, sha256, status, added_at) VALUES (?, ?, ?, ?, ?)",
                (stored, url, digest, status, now_iso()),
            )
        return 1

    def image(self, image_id: int) -> sqlite3.Row:
        with self._read() as con:
            row = con.execute("SELECT * FROM images WHERE id=?", (image_id,)).fetchone()
        if row is None:
            raise StoreError(f"No image with id {image_id} in project {self.root}.")
        return row

    def images(self) -> list[sqlite3.Row]:
        with self._read() as con:
            return con.execute("SELECT * FROM images ORDER BY id").fetchall()

    def _set_status(self, image_id: int, status: str) -> None:
        with self._write() as con:
            con.execute("UPDATE images SET status=? WHERE id=?", (status, image_id))

    # -- queue -----------------------------------------------------------------------------

    def next_image(self, annotator: str, notes: list[str] | None = None) -> Task | None:
        """Hand out (and claim) the next image for ``annotator``; None when nothing is left.

        An image needs annotations while it has fewer than N live (not rejected) ones, so an image
        whose annotation was rejected in review is handed out again, to anyone who has no live
        annotation of it: its own annotator may describe it again. An image the annotator already
        holds a live claim on comes back first (a page reload resumes it). Images whose file has vanished are marked ``missing``, named in
        ``Task.notes`` (and appended to ``notes`` when given, useful when None is returned),
        and passed over.

        Raises:
            ValueError: bad annotator name.
        """
        who = check_annotator(annotator)
        notes = [] if notes is None else notes
        while True:
            now = time.time()
            with self._write() as con:
                n = int(con.execute("SELECT value FROM meta WHERE key='annotations_per_image'").fetchone()[0])
                con.execute("DELETE FROM claims WHERE expires_at < ?", (now,))
                row = con.execute(
                    f"""
                    SELECT i.* FROM images i JOIN claims c ON c.image_id = i.id
                    WHERE c.annotator = ? AND i.status = 'active'
                      AND NOT EXISTS (SELECT 1 FROM annotations a WHERE a.image_id = i.id AND a.annotator = ?
                                      AND {LIVE})
                    ORDER BY i.id LIMIT 1
                    """,
                    (who, who),
                ).fetchone()
                if row is None:
                    row = con.execute(
                        f"""
                        SELECT i.* FROM images i
                        WHERE i.status = 'active'
                          AND NOT EXISTS (SELECT 1 FROM annotations a WHERE a.image_id = i.id AND a.annotator = ?
                                          AND {LIVE})
                          AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.image_id = i.id AND s.annotator = ?)
                          AND (SELECT COUNT(*) FROM annotations a WHERE a.image_id = i.id AND {LIVE})
                            + (SELECT COUNT(*) FROM claims c WHERE c.image_id = i.id AND c.annotator != ?) < ?
                        ORDER BY i.id LIMIT 1
                        """,
                        (who, who, who, n),
                    ).fetchone()
                if row is None:
                    return None
                if row["path"] is not None and not self.abs(row["path"]).is_file():
                    con.execute("UPDATE images SET status='missing' WHERE id=?", (row["id"],))
                    con.execute("DELETE FROM claims WHERE image_id=?", (row["id"],))
                    notes.append(
                        f"Image file missing, skipped for everyone until it is back: {row['path']} "
                        f"(expected at {self.abs(row['path'])})."
                    )
                    continue
                con.execute(
                    "INSERT OR REPLACE INTO claims (image_id, annotator, expires_at) VALUES (?, ?, ?)",
                    (row["id"], who, now + self.claim_seconds),
                )
                done = con.execute(
                    f"SELECT COUNT(*) FROM annotations a WHERE a.image_id=? AND {LIVE}", (row["id"],)
                ).fetchone()[0]
            return Task(
                image_id=row["id"],
                path=row["path"],
                url=row["url"],
                abs_path=self.abs(row["path"]) if row["path"] else None,
                sha256=row["sha256"],
                done=done,
                needed=n,
                notes=notes,
            )

    def release(self, image_id: int, annotator: str) -> None:
        """Give a claimed image back to the queue."""
        with self._write() as con:
            con.execute("DELETE FROM claims WHERE image_id=? AND annotator=?", (image_id, annotator))

    def skip(self, image_id: int, annotator: str, reason: str = "") -> None:
        """This annotator will not get this image again; others still can."""
        who = check_annotator(annotator)
        self.image(image_id)
        with self._write() as con:
            cur = con.execute(
                "INSERT OR IGNORE INTO skips (image_id, annotator, reason, created_at) VALUES (?, ?, ?, ?)",
                (image_id, who, reason or "", now_iso()),
            )
            if cur.rowcount:
                con.execute("UPDATE images SET skipped = skipped + 1 WHERE id=?", (image_id,))
            con.execute("DELETE FROM claims WHERE image_id=? AND annotator=?", (image_id, who))

    def flag(self, image_id: int, annotator: str, reason: str) -> None:
        """Flag a bad image (broken, offensive, duplicate ...): it leaves the queue for everyone."""
        who = check_annotator(annotator)
        reason = (reason or "").strip() or "flagged without a reason"
        with self._write() as con:
            row = con.execute("SELECT flags FROM images WHERE id=?", (image_id,)).fetchone()
            if row is None:
                raise StoreError(f"No image with id {image_id} in project {self.root}.")
            flags = json.loads(row["flags"] or "[]")
            flags.append({"annotator": who, "reason": reason, "at": now_iso()})
            con.execute(
                "UPDATE images SET status='flagged', flags=? WHERE id=?", (json.dumps(flags), image_id)
            )
            con.execute("DELETE FROM claims WHERE image_id=?", (image_id,))

    def unflag(self, image_id: int) -> None:
        with self._write() as con:
            con.execute("UPDATE images SET status='active' WHERE id=? AND status='flagged'", (image_id,))

    # -- saving ----------------------------------------------------------------------------

    def save_annotation(
        self,
        image_id: int,
        annotator: str,
        audio: Audio | None,
        transcript_raw: str,
        transcript: str,
        segments: Sequence[dict[str, Any]] = (),
        language: str | None = None,
        asr_model: str | None = None,
        caption: str | None = None,
        caption_source: str = "manual",
        caption_model: str | None = None,
        asr_model_sha256: str | None = None,
    ) -> AnnotationRecord:
        """Save one annotation atomically: audio receipt first, then one committed transaction.

        Args:
            image_id: the image described.
            annotator: who spoke.
            audio: the recording (saved as a FLAC receipt); None only for imported text.
            transcript_raw: the ASR output as produced.
            transcript: the annotator's edited transcript (must not be empty).
            segments: ASR segments, ``[{"start": s, "end": s, "text": str}, ...]``.
            caption: when given, stored as the image's caption in the same transaction.

        Returns:
            The committed record.

        Raises:
            ValueError: bad annotator name or empty transcript.
            AlreadyAnnotatedError: this annotator already has a live (not rejected) annotation of this
                image (nothing changed).
            StoreError: unknown image id.
            OSError: the receipt could not be written (e.g. disk full); nothing was saved.
        """
        who = check_annotator(annotator)
        if not (transcript or "").strip():
            raise ValueError("The transcript is empty: transcribe the recording (or type what was said) before saving.")
        self.image(image_id)
        with self._read() as con:
            if con.execute(
                f"SELECT 1 FROM annotations a WHERE a.image_id=? AND a.annotator=? AND {LIVE}", (image_id, who)
            ).fetchone():
                raise AlreadyAnnotatedError(
                    f"{who} already saved an annotation for image {image_id}; nothing was changed."
                )
        receipt: AudioReceipt | None = None
        if audio is not None:
            receipt = write_flac_atomic(audio, self.audio_dir / f"{image_id:06d}" / receipt_name())
        try:
            _pause_hook("audio_written")
            with self._write() as con:
                if con.execute(
                    f"SELECT 1 FROM annotations a WHERE a.image_id=? AND a.annotator=? AND {LIVE}", (image_id, who)
                ).fetchone():
                    raise AlreadyAnnotatedError(
                        f"{who} already saved an annotation for image {image_id}; nothing was changed."
                    )
                cur = con.execute(
                    """INSERT INTO annotations (image_id, annotator, transcript_raw, transcript, segments,
                           language, asr_model, audio_path, audio_sha256, duration, sample_rate, channels,
                           created_at, asr_model_sha256)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        image_id,
                        who,
                        transcript_raw or "",
                        transcript.strip(),
                        json.dumps([_clean_segment(s) for s in segments]),
                        language,
                        asr_model,
                        self.rel(receipt.path) if receipt else None,
                        receipt.sha256 if receipt else None,
                        receipt.duration if receipt else None,
                        receipt.sample_rate if receipt else None,
                        receipt.channels if receipt else None,
                        now_iso(),
                        asr_model_sha256 if asr_model else None,
                    ),
                )
                new_id = cur.lastrowid
                if caption is not None and caption.strip():
                    _upsert_caption(con, image_id, caption.strip(), caption_source, caption_model, who)
                con.execute("DELETE FROM claims WHERE image_id=? AND annotator=?", (image_id, who))
                _pause_hook("before_commit")
                row = con.execute("SELECT * FROM annotations WHERE id=?", (new_id,)).fetchone()
        except BaseException:
            if receipt is not None:
                try:
                    receipt.path.unlink()
                except FileNotFoundError:
                    pass
            raise
        return AnnotationRecord.from_row(row)

    def set_caption(
        self, image_id: int, caption: str, annotator: str | None, source: str = "manual", model: str | None = None
    ) -> None:
        """Store (or replace) the image's caption."""
        if not (caption or "").strip():
            raise ValueError("The caption is empty.")
        self.image(image_id)
        with self._write() as con:
            _upsert_caption(con, image_id, caption.strip(), source, model, annotator)

    # -- reading ---------------------------------------------------------------------------

    def annotations(self, image_id: int | None = None) -> list[AnnotationRecord]:
        with self._read() as con:
            if image_id is None:
                rows = con.execute("SELECT * FROM annotations ORDER BY image_id, id").fetchall()
            else:
                rows = con.execute(
                    "SELECT * FROM annotations WHERE image_id=? ORDER BY id", (image_id,)
                ).fetchall()
        return [AnnotationRecord.from_row(r) for r in rows]

    def transcripts(self, image_id: int) -> list[str]:
        """The live (not rejected) transcripts of an image, oldest first, as approved (a reviewer's
        edit when there is one, else the annotator's)."""
        return [a.final_transcript for a in self.annotations(image_id) if a.live]

    def annotation(self, annotation_id: int) -> AnnotationRecord:
        """Raises: StoreError when there is no such annotation."""
        with self._read() as con:
            row = con.execute("SELECT * FROM annotations WHERE id=?", (annotation_id,)).fetchone()
        if row is None:
            raise StoreError(f"No annotation with id {annotation_id} in project {self.root}.")
        return AnnotationRecord.from_row(row)

    def current_caption(self, image_id: int) -> dict[str, Any] | None:
        """The image's caption as it stands: the newer of the stored caption (written by annotators)
        and the last caption a reviewer edited while accepting one of its annotations.

        Returns:
            ``{"caption", "source", "model", "author", "updated_at"}`` (source ``reviewed`` for a
            reviewer's edit), or None when the image has no caption.
        """
        return self.current_captions(image_id).get(image_id)

    def current_captions(self, image_id: int | None = None) -> dict[int, dict[str, Any]]:
        """``current_caption`` of every image that has one (or of ``image_id`` only)."""
        out: dict[int, dict[str, Any]] = {}
        where = "" if image_id is None else " AND image_id=?"
        args = () if image_id is None else (image_id,)
        with self._read() as con:
            for r in con.execute("SELECT * FROM captions WHERE 1=1" + where, args):
                out[r["image_id"]] = {"caption": r["caption"], "source": r["source"], "model": r["model"],
                                      "author": r["annotator"], "updated_at": r["updated_at"]}
            for r in con.execute(
                "SELECT image_id, reviewed_caption, reviewer, reviewed_at FROM annotations WHERE review_state='accepted' "
                "AND reviewed_caption IS NOT NULL" + where + " ORDER BY reviewed_at, id", args
            ):
                cur = out.get(r["image_id"])
                if cur is None or r["reviewed_at"] >= cur["updated_at"]:
                    out[r["image_id"]] = {"caption": r["reviewed_caption"], "source": "reviewed", "model": None,
                                          "author": r["reviewer"], "updated_at": r["reviewed_at"]}
        return out

    # -- review ----------------------------------------------------------------------------

    def set_review(
        self,
        annotation_id: int,
        state: str,
        reviewer: str,
        reason: str | None = None,
        transcript: str | None = None,
        caption: str | None = None,
    ) -> AnnotationRecord:
        """Record an admin's decision on a pending annotation, in one transaction.

        The rules (what may be edited, what a rejection needs) are ``annotate.review``'s; this only
        writes, and only when the annotation is still pending, so two reviewers deciding at once never
        both succeed.

        Raises:
            AlreadyReviewedError: it was already reviewed (the message says by whom); nothing changed.
            StoreError: no such annotation.
            ValueError: ``state`` is not accepted / rejected.
        """
        if state not in ("accepted", "rejected"):
            raise ValueError(f"review state must be 'accepted' or 'rejected', got {state!r}")
        with self._write() as con:
            cur = con.execute(
                """UPDATE annotations SET review_state=?, reviewer=?, reviewed_at=?, review_reason=?,
                       reviewed_transcript=?, reviewed_caption=?
                   WHERE id=? AND review_state='pending'""",
                (state, reviewer, now_iso(), reason, transcript, caption, annotation_id),
            )
            row = con.execute("SELECT * FROM annotations WHERE id=?", (annotation_id,)).fetchone()
            if row is None:
                raise StoreError(f"No annotation with id {annotation_id} in project {self.root}.")
            if not cur.rowcount:
                raise AlreadyReviewedError(
                    f"Annotation {annotation_id} was already {row['review_state']} by {row['reviewer']} at "
                    f"{row['reviewed_at']}; a review decision is final. Nothing was changed."
                )
        return AnnotationRecord.from_row(row)

    def pending_reviews(self, after_id: int | None = None, limit: int | None = None) -> list[AnnotationRecord]:
        """Pending annotations, oldest first (by id), optionally only those after ``after_id``."""
        sql = "SELECT * FROM annotations WHERE review_state='pending' AND id > ? ORDER BY id"
        args: tuple = (after_id or 0,)
        if limit is not None:
            sql += " LIMIT ?"
            args += (int(limit),)
        with self._read() as con:
            return [AnnotationRecord.from_row(r) for r in con.execute(sql, args)]

    def review_counts(self) -> dict[str, int]:
        """``{"pending": n, "accepted": n, "rejected": n}`` over all annotations."""
        out = dict.fromkeys(REVIEW_STATES, 0)
        with self._read() as con:
            for state, n in con.execute("SELECT review_state, COUNT(*) FROM annotations GROUP BY review_state"):
                out[state] = n
        return out

    def caption(self, image_id: int) -> sqlite3.Row | None:
        with self._read() as con:
            return con.execute("SELECT * FROM captions WHERE image_id=?", (image_id,)).fetchone()

    def captions(self) -> dict[int, sqlite3.Row]:
        with self._read() as con:
            return {r["image_id"]: r for r in con.execute("SELECT * FROM captions")}

    def progress(self) -> Progress:
        with self._read() as con:
            n = int(con.execute("SELECT value FROM meta WHERE key='annotations_per_image'").fetchone()[0])
            total = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
            active = con.execute("SELECT COUNT(*) FROM images WHERE status='active'").fetchone()[0]
            complete = con.execute(
                f"""SELECT COUNT(*) FROM images i
                   WHERE (SELECT COUNT(*) FROM annotations a WHERE a.image_id=i.id AND {LIVE}) >= ?""",
                (n,),
            ).fetchone()[0]
            annotations = con.execute(f"SELECT COUNT(*) FROM annotations a WHERE {LIVE}").fetchone()[0]
            per = {
                r[0]: r[1]
                for r in con.execute(f"SELECT annotator, COUNT(*) FROM annotations a WHERE {LIVE} GROUP BY annotator")
            }
            reviews = dict(con.execute("SELECT review_state, COUNT(*) FROM annotations GROUP BY review_state").fetchall())
            skipped = con.execute("SELECT COUNT(*) FROM skips").fetchone()[0]
            flagged = con.execute("SELECT COUNT(*) FROM images WHERE status='flagged'").fetchone()[0]
            missing_rows = con.execute("SELECT path FROM images WHERE status='missing' ORDER BY id").fetchall()
            done_on_inactive = con.execute(
                f"""SELECT COUNT(*) FROM annotations a JOIN images i ON i.id=a.image_id
                   WHERE i.status != 'active' AND {LIVE}"""
            ).fetchone()[0]
        return Progress(
            total_images=total,
            complete_images=complete,
            annotations=annotations,
            annotations_needed=active * n + done_on_inactive,
            per_image=n,
            per_annotator=per,
            skipped=skipped,
            flagged=flagged,
            missing=len(missing_rows),
            missing_paths=[r[0] for r in missing_rows],
            rejected=reviews.get("rejected", 0),
            pending_review=reviews.get("pending", 0),
        )

    # -- maintenance -----------------------------------------------------------------------

    def cleanup_orphans(self, min_age_seconds: float = ORPHAN_MIN_AGE_SECONDS) -> list[Path]:
        """Delete audio files that no committed row references (left by a crash mid-save).

        Only files older than ``min_age_seconds`` are touched, so a save in progress in another
        process (file written, row not yet committed) is never disturbed.

        Returns:
            The deleted paths.
        """
        if not self.audio_dir.is_dir():
            return []
        with self._read() as con:
            referenced = {
                r[0] for r in con.execute("SELECT audio_path FROM annotations WHERE audio_path IS NOT NULL")
            }
        removed = []
        cutoff = time.time() - min_age_seconds
        for p in sorted(self.audio_dir.rglob("*")):
            if not p.is_file():
                continue
            if self.rel(p) in referenced:
                continue
            if p.suffix.lower() != ".flac":
                continue  # only our own receipts and their temporary files (.tmp-*.flac)
            try:
                if p.stat().st_mtime <= cutoff:
                    p.unlink()
                    removed.append(p)
            except FileNotFoundError:
                pass
        return removed

    def verify(self) -> list[str]:
        """Consistency problems: rows whose audio receipt is missing or altered (empty when fine)."""
        problems = []
        with self._read() as con:
            result = con.execute("PRAGMA integrity_check").fetchone()[0]
            if result != "ok":
                problems.append(f"database integrity check: {result}")
        for a in self.annotations():
            if a.audio_path is None:
                continue
            p = self.abs(a.audio_path)
            if not p.is_file():
                problems.append(f"annotation {a.id}: audio receipt missing: {a.audio_path}")
            elif sha256_file(p) != a.audio_sha256:
                problems.append(f"annotation {a.id}: audio receipt altered (sha256 mismatch): {a.audio_path}")
        return problems


def _migrate(con: sqlite3.Connection) -> None:
    """Bring a version-1 or -2 database to SCHEMA_VERSION inside the caller's write transaction (rows kept).

    1 -> 2: add annotations.asr_model_sha256. 2 -> 3: rebuild the annotations table (SQLite cannot drop
    a UNIQUE constraint in place) with the review columns, every row copied as it is and marked pending,
    ids kept; then the indexes of version 3. Runs in the caller's BEGIN IMMEDIATE transaction, so two
    processes opening an old database at once migrate it once, and a failure leaves it as it was."""
    columns = {r[1] for r in con.execute("PRAGMA table_info(annotations)")}
    if "asr_model_sha256" not in columns:
        con.execute("ALTER TABLE annotations ADD COLUMN asr_model_sha256 TEXT")
        columns.add("asr_model_sha256")
    if "review_state" not in columns:
        start = SCHEMA.index("CREATE TABLE IF NOT EXISTS annotations (")
        ddl = SCHEMA[start:SCHEMA.index("\n);", start) + 2]
        con.execute(ddl.replace("IF NOT EXISTS annotations (", "annotations_v3 (", 1))
        keep = ", ".join(c for c in (r[1] for r in con.execute("PRAGMA table_info(annotations_v3)")) if c in columns)
        con.execute(f"INSERT INTO annotations_v3 ({keep}) SELECT {keep} FROM annotations")
        con.execute("DROP TABLE annotations")
        con.execute("ALTER TABLE annotations_v3 RENAME TO annotations")
    con.execute(LIVE_INDEX)
    con.execute(REVIEW_INDEX)
    con.execute("UPDATE meta SET value=? WHERE key='schema_version' AND CAST(value AS INTEGER) < ?",
                (str(SCHEMA_VERSION), SCHEMA_VERSION))


def _upsert_caption(con, image_id, caption, source, model, annotator) -> None:
    con.execute(
        """INSERT INTO captions (image_id, caption, source, model, annotator, updated_at)
           VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT(image_id) DO UPDATE SET caption=excluded.caption, source=excluded.source,
               model=excluded.model, annotator=excluded.annotator, updated_at=excluded.updated_at""",
        (image_id, caption, source, model, annotator, now_iso()),
    )


def _clean_segment(s: Any) -> dict[str, Any]:
    if not isinstance(s, dict):
        s = {"start": getattr(s, "start"), "end": getattr(s, "end"), "text": getattr(s, "text")}
    return {"start": round(float(s["start"]), 3), "end": round(float(s["end"]), 3), "text": str(s["text"])}


def _is_corruption(e: sqlite3.DatabaseError) -> bool:
    msg = str(e).lower()
    return "malformed" in msg or "not a database" in msg or "file is encrypted" in msg


def is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


def _pause_hook(stage: str) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    want, _, marker = spec.partition(":")
    if want != stage:
        return
    if marker:
        Path(marker).write_text(f"{os.getpid()} paused at {stage}\n")
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.05)
