"""Annotation mode without a browser: protocol, audio receipts, store, caption, export/import."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sqlite3
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from annotate import cli, review
from annotate.audio import Audio, AudioDecodeError, decode_audio, list_input_devices, write_flac_atomic
from annotate.caption import NO_MODEL_STATUS, build_caption_prompt, clean_model_caption, draft_caption
from annotate.export import EXPORT_SCHEMA, PIXMO_CAP_SCHEMA, import_pixmo_cap
from annotate.protocol import GUIDING_QUESTIONS, TimerRules, blocking, check_recording
from annotate.store import AlreadyAnnotatedError, CorruptStoreError, Store, check_annotator

from annotate_helpers import make_images

SR = 16000


def tone(seconds: float, amp: float = 0.2, sr: int = SR) -> Audio:
    t = np.arange(int(seconds * sr)) / sr
    x = (amp * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    return Audio(x.reshape(-1, 1), sr)


# -- protocol -------------------------------------------------------------------------------


def test_seven_guiding_questions():
    assert len(GUIDING_QUESTIONS) == 7
    assert GUIDING_QUESTIONS[0] == "What is the image at first glance?"
    assert GUIDING_QUESTIONS[-1] == "What is the style and color?"


@pytest.mark.parametrize(
    "seconds, amp, codes",
    [
        (61, 0.2, ["short_of_target"]),
        (95, 0.2, []),
        (2, 0.2, ["too_short"]),
        (2, 0.0, ["too_short", "silent"]),
        (70, 0.0001, ["short_of_target", "silent"]),
    ],
)
def test_check_recording(seconds, amp, codes):
    a = tone(seconds, amp)
    assert [w.code for w in check_recording(a.samples, SR)] == codes


def test_check_recording_messages_and_rules():
    w = check_recording(np.zeros(2 * SR, np.int16), SR)
    assert "too short: 2.0 s, the minimum is 60 s" in w[0].message
    assert "silent" in w[1].message and all(x.blocking for x in w)
    assert check_recording(np.zeros(0), SR)[0].code == "empty"
    assert check_recording(tone(2).samples, SR, TimerRules(min_seconds=1, target_seconds=2)) == []
    assert TimerRules.from_env({"MOLMO_ANNOTATE_MIN_SECONDS": "5"}) == TimerRules(5, 90)
    with pytest.raises(ValueError, match="must be a number"):
        TimerRules.from_env({"MOLMO_ANNOTATE_MIN_SECONDS": "soon"})
    with pytest.raises(ValueError, match="target_seconds"):
        TimerRules(min_seconds=90, target_seconds=60)
    assert TimerRules().timer_text(12.4) == "0:12 / 1:30 - keep going: 48 s to the 60 s minimum"
    assert blocking(check_recording(tone(70).samples, SR)) == []


# -- audio ----------------------------------------------------------------------------------


def test_flac_receipt_is_lossless(tmp_path):
    a = tone(1.5)
    r = write_flac_atomic(a, tmp_path / "x" / "r.flac")
    back, sr = sf.read(r.path, dtype="int16", always_2d=True)
    assert sr == SR and np.array_equal(back, a.samples)
    assert r.duration == pytest.approx(1.5) and r.sample_rate == SR and len(r.sha256) == 64
    assert [p.name for p in r.path.parent.iterdir()] == ["r.flac"]  # no temp file left
    with pytest.raises(FileExistsError):
        write_flac_atomic(a, r.path)


def test_decode_falls_back_to_av_and_rejects_non_audio(tmp_path):
    wav = tmp_path / "a.wav"
    sf.write(wav, tone(1.0).samples, SR)
    mp3 = tmp_path / "a.mp3"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(wav), str(mp3)], check=True)
    a = decode_audio(mp3)
    assert a.sample_rate == SR and 0.9 < a.duration < 1.2
    txt = tmp_path / "notes.wav"
    txt.write_text("this is not audio at all")
    with pytest.raises(AudioDecodeError, match="'notes.wav' is not an audio file we can read"):
        decode_audio(txt)


def test_list_input_devices_never_raises():
    devices, reason = list_input_devices()
    assert isinstance(devices, list)
    assert (reason is None) == bool(devices)


# -- caption --------------------------------------------------------------------------------


def test_caption_prompt_and_draft():
    p = build_caption_prompt(["um so a  red car", "a red car on a street"])
    assert "Transcript 1:\num so a red car" in p and "Transcript 2:" in p and p.endswith("Caption:")
    assert draft_caption(["a red car"], None) == type(draft_caption(["x"], None))(None, NO_MODEL_STATUS)
    seen = []
    d = draft_caption(["a red car"], lambda prompt: seen.append(prompt) or 'Caption: "A red car."')
    assert d.text == "A red car." and "review" in d.status and seen[0].startswith("Below are spoken")
    d = draft_caption(["a red car"], lambda prompt: 1 / 0)
    assert d.text is None and "ZeroDivisionError" in d.status
    assert draft_caption(["  "], lambda p: "x").text is None
    assert clean_model_caption("Description:  two  cats ") == "two cats"


# -- store ----------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path):
    make_images(tmp_path / "proj", 4)
    (tmp_path / "proj" / "sub").mkdir()
    make_images(tmp_path / "proj" / "sub", 1)
    return tmp_path / "proj"


def test_queue_claims_skip_flag_progress(project):
    s = Store(project, annotations_per_image=2)
    assert [r["path"] for r in s.images()] == [f"img_{i:03d}.png" for i in range(4)] + ["sub/img_000.png"]
    with sqlite3.connect(s.db_path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    a1 = s.next_image("alice")
    assert s.next_image("alice").image_id == a1.image_id  # resumes her claim
    b1 = s.next_image("bob")
    assert b1.image_id == a1.image_id  # N=2: two people may hold the same image
    c1 = s.next_image("carol")
    assert c1.image_id != a1.image_id  # ... but not three
    s.save_annotation(a1.image_id, "alice", tone(1), "raw", "alice says", [{"start": 0, "end": 1, "text": "x"}])
    with pytest.raises(AlreadyAnnotatedError):
        s.save_annotation(a1.image_id, "alice", tone(1), "raw", "again")
    assert s.next_image("alice").image_id not in (a1.image_id,)
    s.skip(c1.image_id, "carol")
    assert s.next_image("carol").image_id != c1.image_id
    s.flag(b1.image_id, "bob", "duplicate")
    assert s.next_image("bob").image_id != b1.image_id
    p = s.progress()
    assert (p.total_images, p.annotations, p.per_annotator, p.skipped, p.flagged) == (5, 1, {"alice": 1}, 1, 1)
    assert "alice" in p.summary("alice")
    with pytest.raises(ValueError, match="annotator name"):
        check_annotator("  ")
    with pytest.raises(ValueError, match="not allowed"):
        check_annotator("x" * 65)


def test_claims_expire(project):
    s = Store(project, annotations_per_image=1, claim_seconds=0.05)
    first = s.next_image("alice")
    import time

    time.sleep(0.1)
    assert s.next_image("bob").image_id == first.image_id


def test_missing_image_file_is_reported_and_passed_over(project):
    s = Store(project)
    s.save_annotation(s.next_image("alice").image_id, "alice", tone(1), "r", "confirmed")
    (project / "img_001.png").unlink()
    t = s.next_image("alice")
    assert t.path == "img_002.png"
    assert any("img_001.png" in n and "missing" in n for n in t.notes)
    p = s.progress()
    assert p.missing == 1 and "missing files 1 (img_001.png)" in p.summary()
    assert s.transcripts(1) == ["confirmed"]  # nothing confirmed lost
    s2 = Store(project)  # reopening re-syncs
    assert s2.sync_images().missing == ["img_001.png"]


def test_corrupt_database_is_reported_and_left_untouched(project):
    s = Store(project)
    s.save_annotation(s.next_image("alice").image_id, "alice", tone(1), "r", "t")
    db = s.db_path
    for suffix in ("-wal", "-shm"):
        if os.path.exists(str(db) + suffix):
            os.unlink(str(db) + suffix)
    garbage = b"this is not a database" * 100
    db.write_bytes(garbage)
    with pytest.raises(CorruptStoreError, match="cannot be read.*left untouched.*rename it to annotations.sqlite.corrupt"):
        Store(project)
    assert db.read_bytes() == garbage
    # an SQLite file that is not ours
    db.unlink()
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE other (x)")
    with pytest.raises(CorruptStoreError, match="not a Molmo Studio annotation database"):
        Store(project)
    # a truncated database (header kept, pages lost)
    db.unlink()
    s = Store(project)
    for i in range(3):
        s.save_annotation(s.next_image(f"a{i}").image_id, f"a{i}", tone(1), "r", "t" * 5000)
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = db.read_bytes()
    db.write_bytes(data[:100] + b"\xff" * (len(data) - 100))
    with pytest.raises(CorruptStoreError):
        Store(project)


def test_orphan_audio_is_cleaned_up(project):
    s = Store(project)
    rec = s.save_annotation(s.next_image("alice").image_id, "alice", tone(1), "r", "t")
    orphan = s.audio_dir / "000002" / "deadbeef.flac"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"fLaC")
    assert s.cleanup_orphans() == []  # too recent: might be a save in progress elsewhere
    assert s.cleanup_orphans(min_age_seconds=0) == [orphan]
    assert s.abs(rec.audio_path).is_file() and s.verify() == []


def test_failed_commit_leaves_no_audio(project, monkeypatch):
    s = Store(project)
    t = s.next_image("alice")
    import annotate.store as store_mod

    def boom(stage):
        if stage == "before_commit":
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(store_mod, "_pause_hook", boom)
    with pytest.raises(OSError, match="disk full"):
        s.save_annotation(t.image_id, "alice", tone(1), "r", "t")
    assert s.annotations() == [] and list(s.audio_dir.rglob("*.flac")) == []


def _annotate_all(project_dir: str, annotator: str) -> list[int]:
    st = Store(project_dir, sync=False)
    done = []
    while (t := st.next_image(annotator)) is not None:
        st.save_annotation(t.image_id, annotator, tone(0.3), "raw", f"{annotator} on {t.image_id}")
        done.append(t.image_id)
    return done


@pytest.mark.parametrize("n_per_image", [1, 2])
def test_concurrent_annotators_lose_and_duplicate_nothing(tmp_path, n_per_image):
    make_images(tmp_path / "p", 12)
    Store(tmp_path / "p", annotations_per_image=n_per_image)
    names = ["alice", "bob", "carol"]
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_annotate_all, [(str(tmp_path / "p"), n) for n in names])
    s = Store(tmp_path / "p", sync=False)
    anns = s.annotations()
    assert sum(len(r) for r in results) == len(anns) == 12 * n_per_image
    per_image = {}
    for a in anns:
        per_image.setdefault(a.image_id, []).append(a.annotator)
    assert all(len(v) == n_per_image == len(set(v)) for v in per_image.values())
    assert len(per_image) == 12
    assert s.verify() == [] and s.progress().complete_images == 12


# -- export / import ------------------------------------------------------------------------


def test_export_schema_loads_with_datasets_and_roundtrips(project, tmp_path):
    s = Store(project, annotations_per_image=2)
    for who in ("alice", "bob"):
        t = s.next_image(who)
        rec = s.save_annotation(t.image_id, who, tone(1), f"raw {who}", f"edited {who}",
                                [{"start": 0.0, "end": 0.9, "text": "x"}], asr_model="tiny")
        review.accept(s, rec.id, "admin")  # the export holds accepted annotations (default)
    s.set_caption(t.image_id, "A picture.", "bob", source="model+edited", model="Molmo-tiny")
    out = tmp_path / "out" / "cap.parquet"
    assert cli.main_export(project, out) == 0
    table = pq.read_table(out)
    assert table.schema.names[:3] == ["image_url", "caption", "transcripts"]
    assert table.schema == EXPORT_SCHEMA
    for f in PIXMO_CAP_SCHEMA:
        assert table.schema.field(f.name).type == f.type
    row = table.to_pylist()[0]
    assert row["caption"] == "A picture." and row["transcripts"] == ["edited alice", "edited bob"]
    assert row["transcripts_raw"] == ["raw alice", "raw bob"] and row["annotators"] == ["alice", "bob"]
    assert row["image_url"].startswith("file://") and row["image_path"] == "img_000.png"
    assert all((project / p).is_file() for p in row["audio_paths"])
    assert json.loads(row["segments"][0])[0]["end"] == 0.9

    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert ds.num_rows == 1 and ds[0]["transcripts"] == ["edited alice", "edited bob"]
    assert str(ds.features["image_url"].dtype) == "string"

    # import into a new project: one image found locally, one missing
    pix = tmp_path / "pixmo.parquet"
    import pyarrow as pa

    pq.write_table(pa.table({
        "image_url": ["https://example.org/a/img_000.png", "https://example.org/gone.jpg"],
        "caption": ["cap a", "cap b"],
        "transcripts": [["t1", "t2"], ["t3"]],
    }, schema=PIXMO_CAP_SCHEMA), pix)
    new = tmp_path / "new"
    make_images(new, 1)
    rep = import_pixmo_cap(new, pix)
    assert (rep.rows, rep.imported, rep.missing) == (2, 2, 1) and "gone.jpg" in rep.summary()
    assert import_pixmo_cap(new, pix).already_present == 2
    assert cli.main_export(new, tmp_path / "re.parquet") == 0
    back = pq.read_table(tmp_path / "re.parquet").to_pylist()
    assert [(r["image_url"], r["caption"], r["transcripts"]) for r in back] == [
        ("https://example.org/a/img_000.png", "cap a", ["t1", "t2"]),
        ("https://example.org/gone.jpg", "cap b", ["t3"]),
    ]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image_url": ["x"]}), bad)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['caption', 'transcripts'\]"):
        import_pixmo_cap(new, bad)
    assert cli.main_export(tmp_path / "nothing-here", tmp_path / "x.parquet") == 1


def test_pixmo_cap_record_fixture_roundtrip_and_import(tmp_path):
    from pathlib import Path

    from annotate.export import PixmoCapRecord, write_pixmo_cap

    fixture = Path(__file__).parent / "fixtures" / "annotate" / "pixmo_cap_sample.jsonl"
    lines = [json.loads(l) for l in fixture.read_text().splitlines() if l.strip()]
    records = [PixmoCapRecord.from_dict(d) for d in lines]
    assert [r.to_dict() for r in records] == lines
    with pytest.raises(ValueError, match="lacks \\['caption'\\]"):
        PixmoCapRecord.from_dict({"image_url": "x", "transcripts": []})
    pq_path = write_pixmo_cap(records, tmp_path / "sample.parquet")
    images = tmp_path / "downloaded"
    make_images(images, 2)
    rep = import_pixmo_cap(tmp_path / "proj", pq_path, images_dir=images)
    assert (rep.imported, rep.missing, rep.missing_examples) == (3, 1, ["https://example.org/images/not_downloaded.jpg"])
    s = Store(tmp_path / "proj", sync=False)
    assert s.transcripts(2) == lines[1]["transcripts"]
    assert s.progress().missing == 1


@pytest.mark.parametrize("module", ["annotate.protocol", "annotate.caption"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0
