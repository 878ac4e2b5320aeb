"""Review of annotations (annotate.review): the state machine, the queue, requeue after a rejection,
per-annotator statistics, export of accepted vs everything not rejected, and the version-2 -> 3 migration."""
from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from annotate import cli, review
from annotate.audio import Audio
from annotate.export import EXPORT_SCHEMA, export_pixmo_cap, import_pixmo_cap, write_pixmo_cap, PixmoCapRecord
from annotate.store import SCHEMA, SCHEMA_VERSION, Store, StoreError

from annotate_helpers import make_images

SR = 16000


def tone(seconds: float) -> Audio:
    t = np.arange(int(seconds * SR)) / SR
    return Audio((0.2 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16).reshape(-1, 1), SR)


@pytest.fixture
def store(tmp_path):
    make_images(tmp_path / "proj", 4)
    return Store(tmp_path / "proj")


def save(store: Store, who: str, words: str, seconds: float | None = 1.0, caption: str | None = None):
    t = store.next_image(who)
    assert t is not None, f"nothing left for {who}"
    return store.save_annotation(t.image_id, who, tone(seconds) if seconds else None, f"raw {words}", words,
                                 caption=caption)


# -- the state machine ----------------------------------------------------------------------------


def test_accept_reject_are_final_and_keep_the_annotators_text(store):
    a = save(store, "alice", "a red car", caption="A red car.")
    b = save(store, "bob", "two cups")
    c = save(store, "carol", "a dog")
    assert [r.review_state for r in store.annotations()] == ["pending"] * 3

    ok = review.accept(store, a.id, "admin")
    assert (ok.review_state, ok.reviewer, ok.reviewed_transcript, ok.reviewed_caption) == ("accepted", "admin", None, None)
    assert ok.reviewed_at and ok.final_transcript == "a red car"

    edited = review.accept(store, b.id, "admin", transcript="  two cups and a spoon ", caption="Two cups, a spoon.")
    assert (edited.transcript, edited.transcript_raw) == ("two cups", "raw two cups")  # untouched
    assert (edited.reviewed_transcript, edited.reviewed_caption) == ("two cups and a spoon", "Two cups, a spoon.")
    assert edited.final_transcript == "two cups and a spoon"
    assert store.current_caption(b.image_id)["caption"] == "Two cups, a spoon."
    assert store.current_caption(b.image_id)["source"] == "reviewed"

    with pytest.raises(review.ReviewError, match="give a reason"):
        review.reject(store, c.id, "admin", "   ")
    assert store.annotation(c.id).review_state == "pending"
    bad = review.reject(store, c.id, "admin", "describes another image")
    assert (bad.review_state, bad.review_reason, bad.transcript) == ("rejected", "describes another image", "a dog")

    for decide in (lambda i: review.accept(store, i, "other admin"),
                   lambda i: review.reject(store, i, "other admin", "changed my mind")):
        for rec in (ok, bad):
            with pytest.raises(review.ReviewError, match=f"already {rec.review_state} by admin .*final"):
                decide(rec.id)
    assert [(r.review_state, r.reviewer) for r in store.annotations()] == [
        ("accepted", "admin"), ("accepted", "admin"), ("rejected", "admin")]
    with pytest.raises(StoreError, match="No annotation with id 99"):
        review.accept(store, 99, "admin")


def test_edits_equal_to_the_original_are_not_edits_and_emptying_is_refused(store):
    a = save(store, "alice", "a red car", caption="A red car.")
    with pytest.raises(review.ReviewError, match="edited transcript of annotation 1 is empty"):
        review.accept(store, a.id, "admin", transcript="  ")
    with pytest.raises(review.ReviewError, match="caption of image 1 was emptied"):
        review.accept(store, a.id, "admin", caption="")
    assert store.annotation(a.id).review_state == "pending"
    rec = review.accept(store, a.id, "admin", transcript=" a red car ", caption="A red car. ")
    assert (rec.reviewed_transcript, rec.reviewed_caption) == (None, None)
    b = save(store, "alice", "no caption here")
    assert review.accept(store, b.id, "admin", caption="").reviewed_caption is None  # none before, none after


def test_two_reviewers_deciding_at_once_only_one_wins(store):
    a = save(store, "alice", "a red car")
    results: list[str] = []
    barrier = threading.Barrier(8)

    def decide(i: int) -> None:
        barrier.wait()
        try:
            if i % 2:
                review.accept(store, a.id, f"admin{i}")
            else:
                review.reject(store, a.id, f"admin{i}", "no")
            results.append("ok")
        except review.ReviewError:
            results.append("refused")

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] + ["refused"] * 7
    assert store.annotation(a.id).review_state in ("accepted", "rejected")


# -- the queue ------------------------------------------------------------------------------------


def test_queue_is_oldest_pending_first_and_can_pass_over_one(store):
    assert review.next_pending(store) is None
    recs = [save(store, who, f"{who} words") for who in ("alice", "bob", "carol")]
    first = review.next_pending(store)
    assert first.record.id == recs[0].id and first.pending == 3 and first.display_name == "img_000.png"
    assert first.abs_path == store.root / "img_000.png" and first.image_status == "active"
    assert review.next_pending(store, after_id=recs[0].id).record.id == recs[1].id
    assert review.next_pending(store, after_id=recs[2].id).record.id == recs[0].id  # wraps around
    review.accept(store, recs[0].id, "admin")
    review.reject(store, recs[1].id, "admin", "no")
    item = review.next_pending(store)
    assert item.record.id == recs[2].id and item.pending == 1
    review.accept(store, recs[2].id, "admin")
    assert review.next_pending(store) is None and review.next_pending(store, after_id=1) is None


def test_a_rejected_image_goes_back_to_the_queue_for_others_too(tmp_path):
    make_images(tmp_path / "p", 2)
    s = Store(tmp_path / "p", annotations_per_image=1)
    a = save(s, "alice", "first image")
    b = save(s, "bob", "second image")
    assert (a.image_id, b.image_id) == (1, 2)
    assert s.next_image("carol") is None and s.progress().complete_images == 2
    review.reject(s, a.id, "admin", "mumbled")
    p = s.progress()
    assert (p.complete_images, p.annotations, p.rejected, p.pending_review) == (1, 1, 1, 1)
    assert "rejected in review 1" in p.summary()
    t = s.next_image("carol")  # another annotator gets it ...
    assert t.image_id == 1 and t.done == 0
    s.save_annotation(1, "carol", tone(1), "", "carol's take")
    assert s.next_image("alice") is None  # ... and once it is done again, nobody does
    assert s.transcripts(1) == ["carol's take"]  # the rejected text no longer feeds caption drafts
    assert s.progress().complete_images == 2


def test_the_same_annotator_may_redo_a_rejected_image(tmp_path):
    make_images(tmp_path / "p", 1)
    s = Store(tmp_path / "p")
    a = save(s, "alice", "bad take")
    review.reject(s, a.id, "admin", "too short a description")
    assert s.next_image("alice").image_id == 1
    again = s.save_annotation(1, "alice", tone(1), "", "good take")
    assert [(r.id, r.review_state) for r in s.annotations(1)] == [(a.id, "rejected"), (again.id, "pending")]
    assert s.abs(a.audio_path).is_file() and s.verify() == []  # the rejected receipt is kept


# -- statistics -----------------------------------------------------------------------------------


def test_statistics_equal_the_values_computed_from_the_rows(store):
    save(store, "alice", "one two three four five six", seconds=2.0)
    a2 = save(store, "alice", "seven eight nine", seconds=1.5)
    b1 = save(store, "bob", "ten eleven", seconds=0.5)
    save(store, "carol", "imported words without audio", seconds=None)
    review.accept(store, 1, "admin", transcript="one two three")  # the reviewer's edit is not the annotator's speech
    review.reject(store, a2.id, "admin", "no")
    review.accept(store, b1.id, "admin")

    with sqlite3.connect(store.db_path) as con:
        rows = con.execute("SELECT annotator, transcript, duration, review_state FROM annotations").fetchall()
    expected = {}
    for name in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == name]
        with_audio = [r for r in mine if r[2]]
        seconds = sum(r[2] for r in with_audio)
        words = sum(len(r[1].split()) for r in with_audio)
        acc = sum(r[3] == "accepted" for r in mine)
        rej = sum(r[3] == "rejected" for r in mine)
        expected[name] = (len(mine), pytest.approx(seconds), words / (seconds / 60) if seconds else None, acc, rej,
                          sum(r[3] == "pending" for r in mine), rej / (acc + rej) if acc + rej else None)
    got = {s.annotator: (s.records, s.speaking_seconds, s.words_per_minute, s.accepted, s.rejected, s.pending,
                         s.rejection_rate) for s in review.annotator_stats(store)}
    assert got == expected
    assert got["alice"][2] == pytest.approx(9 / (3.5 / 60)) and got["alice"][6] == 0.5
    assert got["carol"][2] is None and got["carol"][6] is None
    rows_shown = [s.row() for s in review.annotator_stats(store)]
    assert rows_shown[0] == ["alice", 2, 3.5, round(9 / (3.5 / 60), 1), 1, 1, 0, 0.5]
    assert len(review.STATS_HEADERS) == len(rows_shown[0])


def test_stats_cli(store, capsys):
    save(store, "alice", "a b c", seconds=1.0)
    assert cli.main(["stats", str(store.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == review.STATS_HEADERS
    assert lines[1].split("\t") == ["alice", "1", "1.0", "180.0", "0", "0", "1", "-"]


# -- export ---------------------------------------------------------------------------------------


def test_export_default_is_accepted_only_and_all_is_everything_not_rejected(tmp_path):
    make_images(tmp_path / "p", 3)
    s = Store(tmp_path / "p", annotations_per_image=2)
    acc = save(s, "alice", "alice on one", caption="Annotator caption.")
    pend = save(s, "bob", "bob on one")
    rej = save(s, "carol", "carol on two")
    review.accept(s, acc.id, "admin", transcript="alice on one, edited", caption="Reviewer caption.")
    review.reject(s, rej.id, "admin", "wrong image")
    assert (acc.image_id, pend.image_id, rej.image_id) == (1, 1, 2)

    default = tmp_path / "accepted.parquet"
    report = export_pixmo_cap(s.root, default)
    assert (report.rows, report.annotations, report.left_out_pending, report.left_out_rejected) == (1, 1, 1, 1)
    assert "1 annotations awaiting review left out" in report.summary() and "1 rejected" in report.summary()
    table = pq.read_table(default)
    assert table.schema == EXPORT_SCHEMA
    (row,) = table.to_pylist()
    assert (row["caption"], row["transcripts"], row["caption_source"]) == (
        "Reviewer caption.", ["alice on one, edited"], "reviewed")
    assert (row["transcripts_annotator"], row["transcripts_raw"], row["caption_annotator"]) == (
        ["alice on one"], ["raw alice on one"], "Annotator caption.")
    assert (row["review_states"], row["reviewers"], row["annotators"]) == (["accepted"], ["admin"], ["alice"])

    everything = tmp_path / "all.parquet"
    assert cli.main(["export", str(s.root), str(everything), "--all"]) == 0
    (row,) = pq.read_table(everything).to_pylist()  # image 2's only annotation is rejected: never exported
    assert row["transcripts"] == ["alice on one, edited", "bob on one"]
    assert row["review_states"] == ["accepted", "pending"] and row["reviewers"] == ["admin", None]
    assert cli.main_export(s.root, tmp_path / "again.parquet", include_unreviewed=True) == 0
    assert pq.read_table(tmp_path / "again.parquet").to_pylist() == [row]
    assert cli.main_export(s.root, default) == 0
    assert len(pq.read_table(default).to_pylist()) == 1


def test_a_caption_written_after_the_reviewers_edit_is_the_current_one(tmp_path):
    make_images(tmp_path / "p", 1)
    s = Store(tmp_path / "p", annotations_per_image=2)
    a = save(s, "alice", "alice words", caption="Alice's caption.")
    review.accept(s, a.id, "admin", caption="Admin's caption.")
    assert s.current_caption(1)["caption"] == "Admin's caption."
    save(s, "bob", "bob words", caption="Bob's later caption.")
    cur = s.current_caption(1)
    assert (cur["caption"], cur["source"], cur["author"]) == ("Bob's later caption.", "manual", "bob")


def test_import_accepts_by_default_and_can_leave_rows_pending(tmp_path):
    images = tmp_path / "imgs"
    make_images(images, 1)
    pq_path = write_pixmo_cap([PixmoCapRecord("https://x.org/img_000.png", "cap", ["t1", "t2"])], tmp_path / "in.parquet")
    rep = import_pixmo_cap(tmp_path / "a", pq_path, images_dir=images)
    assert rep.imported == 1
    assert [(r.review_state, r.reviewer) for r in Store(tmp_path / "a", sync=False).annotations()] == [
        ("accepted", "import"), ("accepted", "import")]
    assert cli.main_import(tmp_path / "b", pq_path, images_dir=images, accept=False) == 0
    assert {r.review_state for r in Store(tmp_path / "b", sync=False).annotations()} == {"pending"}
    assert cli.main_export(tmp_path / "b", tmp_path / "b.parquet") == 0
    assert pq.read_table(tmp_path / "b.parquet").num_rows == 0


# -- migration ------------------------------------------------------------------------------------

V2_ANNOTATIONS = """CREATE TABLE annotations (
    id INTEGER PRIMARY KEY, image_id INTEGER NOT NULL REFERENCES images(id), annotator TEXT NOT NULL,
    transcript_raw TEXT NOT NULL, transcript TEXT NOT NULL, segments TEXT NOT NULL DEFAULT '[]', language TEXT,
    asr_model TEXT, asr_model_sha256 TEXT, audio_path TEXT, audio_sha256 TEXT, duration REAL, sample_rate INTEGER,
    channels INTEGER, created_at TEXT NOT NULL, UNIQUE (image_id, annotator))"""


def _v2_database(project) -> None:
    """A database as version 2 wrote it: the annotations table with UNIQUE (image_id, annotator), no review."""
    con = sqlite3.connect(project / "annotations.sqlite")
    con.executescript(SCHEMA.replace(SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS annotations"):
                                            SCHEMA.index("CREATE TABLE IF NOT EXISTS captions")], V2_ANNOTATIONS + ";\n"))
    con.executescript("""INSERT INTO meta VALUES ('app', 'molmo-studio-annotate'), ('schema_version', '2'),
                             ('created_at', 'x'), ('annotations_per_image', '1');
                         INSERT INTO images (id, path, status, added_at) VALUES (1, 'img_000.png', 'active', 'x'),
                             (2, 'img_001.png', 'active', 'x');
                         INSERT INTO annotations (id, image_id, annotator, transcript_raw, transcript, segments,
                                                  asr_model, asr_model_sha256, duration, created_at)
                             VALUES (7, 1, 'ann', 'old raw', 'old words', '[{"start": 0, "end": 1, "text": "x"}]',
                                     'small.en', 'cafe', 2.5, '2025-01-01'),
                                    (9, 2, 'bob', 'raw 2', 'words 2', '[]', NULL, NULL, NULL, '2025-01-02');
                         INSERT INTO captions VALUES (1, 'Old caption.', 'manual', NULL, 'ann', '2025-01-01');""")
    con.commit()
    con.close()


def test_version_2_database_is_migrated_with_its_rows_pending_review(tmp_path):
    project = tmp_path / "p"
    make_images(project, 2)
    _v2_database(project)
    with sqlite3.connect(project / "annotations.sqlite") as con:
        before = con.execute("SELECT * FROM annotations ORDER BY id").fetchall()
        assert "UNIQUE (image_id, annotator)" in con.execute(
            "SELECT sql FROM sqlite_master WHERE name='annotations'").fetchone()[0]

    s = Store(project)
    assert SCHEMA_VERSION == 3
    with sqlite3.connect(project / "annotations.sqlite") as con:
        assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "3"
        after = con.execute("SELECT * FROM annotations ORDER BY id").fetchall()
        ddl = con.execute("SELECT sql FROM sqlite_master WHERE name='annotations'").fetchone()[0]
        indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
    assert [r[:15] for r in after] == before  # every v2 column kept as it was, ids too
    assert [r[15:] for r in after] == [("pending", None, None, None, None, None)] * 2
    assert "UNIQUE (image_id, annotator)" not in ddl and {"annotations_live", "annotations_review"} <= indexes
    recs = s.annotations()
    assert [(r.id, r.transcript, r.segments, r.asr_model_sha256, r.review_state) for r in recs] == [
        (7, "old words", [{"start": 0, "end": 1, "text": "x"}], "cafe", "pending"), (9, "words 2", [], None, "pending")]
    assert Store(project).annotations() == recs  # reopening a migrated database changes nothing

    # the migrated project works as a version-3 one: review, requeue, redo by the same annotator, export
    assert review.next_pending(s).record.id == 7
    review.reject(s, 7, "admin", "too vague")
    review.accept(s, 9, "admin")
    assert s.next_image("ann").image_id == 1
    redo = s.save_annotation(1, "ann", tone(1), "", "new words")
    assert redo.id == 10 and s.transcripts(1) == ["new words"]
    out = tmp_path / "out.parquet"
    assert export_pixmo_cap(project, out).rows == 1
    assert [r["transcripts"] for r in pq.read_table(out).to_pylist()] == [["words 2"]]


def test_a_failed_migration_leaves_the_version_2_database_as_it_was(tmp_path, monkeypatch):
    project = tmp_path / "p"
    make_images(project, 2)
    _v2_database(project)
    import annotate.store as store_mod

    monkeypatch.setattr(store_mod, "REVIEW_INDEX", "CREATE INDEX broken ON no_such_table(x)")
    with pytest.raises(StoreError):
        Store(project)
    with sqlite3.connect(project / "annotations.sqlite") as con:
        assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "2"
        assert "UNIQUE (image_id, annotator)" in con.execute(
            "SELECT sql FROM sqlite_master WHERE name='annotations'").fetchone()[0]
        assert [r[0] for r in con.execute("SELECT id FROM annotations ORDER BY id")] == [7, 9]
    monkeypatch.undo()
    assert [r.id for r in Store(project).annotations()] == [7, 9]


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    make_images(tmp_path / "p", 1)
    s = Store(tmp_path / "p")
    with sqlite3.connect(s.db_path) as con:
        con.execute("UPDATE meta SET value='4' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="written by a newer Molmo Studio \\(schema 4, this version reads 3\\)"):
        Store(tmp_path / "p")
