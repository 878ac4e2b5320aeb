"""annotate.session without Gradio: the queue, transcription bookkeeping, caption source, stale
transcripts, save rules and the project / annotator consistency check."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from annotate import review
from annotate.asr import Segment, Transcript
from annotate.protocol import TimerRules
from annotate.session import AnnotationSession, SessionError, caption_to_save, progress_text, recording_check
from annotate.store import AlreadyAnnotatedError, Store, StoreError

from annotate_helpers import make_images

RULES = TimerRules(min_seconds=1.0, target_seconds=2.0)
ROOT = Path(__file__).resolve().parents[1]


class FakeTranscriber:
    """Stands in for annotate.asr.Transcriber: returns a fixed transcript, records what it was given."""

    def __init__(self, text: str = "a red car on a street") -> None:
        self.text = text
        self.calls: list[str] = []

    def transcribe(self, path):
        self.calls.append(str(path))
        return Transcript(self.text, [Segment(0.0, 1.2, self.text)], "en", 1.5, 1.5, "fake-asr", "ab" * 32)


def wav(path: Path, seconds: float = 1.5, amp: float = 0.3, freq: float = 220.0) -> str:
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(path, (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, subtype="PCM_16")
    return str(path)


@pytest.fixture
def project(tmp_path):
    make_images(tmp_path / "proj", 3)
    return tmp_path / "proj"


def opener():
    """open_store for the session: one Store per folder, like the tab's get_store."""
    cache: dict[str, Store] = {}

    def open_store(path: str) -> Store:
        if path not in cache:
            cache[path] = Store(path)
        return cache[path]
    return open_store


def test_the_annotate_package_never_imports_gradio():
    code = ("import sys, annotate.session, annotate.review, annotate.export, annotate.cli, annotate.store; "
            "sys.exit(1 if 'gradio' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_flow_transcribe_draft_save_records_everything(project, tmp_path):
    open_store = opener()
    store = open_store(str(project.resolve()))
    s = AnnotationSession()
    nxt = s.start(store, "alice", guidance="Speak for a minute.")
    assert nxt.task.image_id == 1 and s.image_id == 1 and s.project == str(store.root) and s.annotator == "alice"
    assert nxt.info.startswith("**img_000.png** (image 1; 0 of 1 annotation so far)")
    assert nxt.status == "Describe the image aloud. Speak for a minute." and nxt.caption == ""
    take = wav(tmp_path / "take.wav")
    asr = FakeTranscriber()
    out = s.transcribe(asr, take, RULES)
    assert asr.calls == [take] and out.raw == s.raw == "a red car on a street"
    assert out.segments == [{"start": 0.0, "end": 1.2, "text": "a red car on a street"}]
    assert out.status.startswith("Transcribed 1.5 s into 1 segments")
    seen = []

    def generate(prompt):
        seen.append(prompt)
        return "Caption: A red car parked on a street."

    draft = s.draft(open_store, "a red car, parked on a street", generate, model_name="tiny-molmo")
    assert draft.ok and s.caption_draft == "A red car parked on a street." and s.caption_model == "tiny-molmo"
    assert "a red car, parked on a street" in seen[0]
    saved = s.save(open_store, str(store.root), "alice", take, "a red car, parked on a street",
                   "A red car parked on a street.", RULES)
    rec = saved.record
    assert saved.status.startswith(f"Saved annotation {rec.id} for image 1: 1.5 s of audio kept as audio/000001/")
    assert (rec.transcript_raw, rec.transcript, rec.asr_model, rec.asr_model_sha256, rec.language) == (
        "a red car on a street", "a red car, parked on a street", "fake-asr", "ab" * 32, "en")
    assert rec.segments == [{"start": 0.0, "end": 1.2, "text": "a red car on a street"}]
    cap = store.caption(1)
    assert (cap["caption"], cap["source"], cap["model"], cap["annotator"]) == (
        "A red car parked on a street.", "model", "tiny-molmo", "alice")
    assert s.image_id is None  # saved: nothing left to save twice
    with pytest.raises(SessionError, match="No image to save: press 'Next image' first"):
        s.save(open_store, str(store.root), "alice", take, "again", "", RULES)
    assert s.start(store, "alice").task.image_id == 2


def test_edited_draft_and_manual_caption_sources(project, tmp_path):
    open_store = opener()
    store = open_store(str(project.resolve()))
    take = wav(tmp_path / "take.wav")
    s = AnnotationSession()
    s.start(store, "alice")
    s.draft(open_store, "words", lambda p: "A draft.")
    s.save(open_store, str(store.root), "alice", take, "words", "A draft, edited.", RULES)
    assert (store.caption(1)["caption"], store.caption(1)["source"]) == ("A draft, edited.", "model+edited")
    s.start(store, "alice")
    s.save(open_store, str(store.root), "alice", take, "words", "Typed by hand.", RULES)
    assert (store.caption(2)["source"], store.caption(2)["model"]) == ("manual", None)
    assert caption_to_save("  ", None, None) == (None, "manual")
    assert caption_to_save("Same.", "Same.", "Draft.") == (None, "model+edited")


def test_a_caption_saved_as_shown_keeps_its_author(project, tmp_path):
    open_store = opener()
    store = Store(project, annotations_per_image=2)
    take = wav(tmp_path / "take.wav")
    bob = AnnotationSession()
    bob.start(store, "bob")
    bob.save(open_store, str(store.root), "bob", take, "bob's words", "Bob's caption.", RULES)
    alice = AnnotationSession()
    nxt = alice.start(store, "alice")
    assert nxt.task.image_id == 1 and nxt.caption == "Bob's caption."
    saved = alice.save(open_store, str(store.root), "alice", take, "alice's words", "Bob's caption.", RULES)
    assert "no caption yet" not in saved.status
    assert (store.caption(1)["annotator"], store.caption(1)["source"]) == ("bob", "manual")


def test_without_others_nothing_another_annotator_wrote_is_shown_or_drafted_from(project, tmp_path):
    open_store = opener()
    store = Store(project, annotations_per_image=2)
    take = wav(tmp_path / "take.wav")
    bob = AnnotationSession()
    bob.start(store, "bob")
    bob.save(open_store, str(store.root), "bob", take, "bob's private words", "Bob's caption.", RULES)
    alice = AnnotationSession()
    nxt = alice.start(store, "alice", others=False)
    assert nxt.task.image_id == 1 and nxt.caption == ""
    prompts = []
    alice.draft(open_store, "alice's words", lambda p: prompts.append(p) or "A caption.", others=False)
    assert "alice's words" in prompts[0] and "bob's private words" not in prompts[0]
    alice.draft(open_store, "alice's words", lambda p: prompts.append(p) or "A caption.")  # others=True (admins)
    assert "bob's private words" in prompts[1]
    alice.save(open_store, str(store.root), "alice", take, "alice's words", "", RULES)
    assert store.caption(1)["annotator"] == "bob"  # an empty box keeps the stored caption
    assert bob.start(store, "bob", others=False).task.image_id == 2
    store.set_caption(2, "Bob's own caption.", "bob")
    assert AnnotationSession().start(store, "bob", others=False).caption == "Bob's own caption."


def test_a_transcript_of_an_earlier_recording_is_refused_and_raw_goes_only_with_its_recording(project, tmp_path):
    open_store = opener()
    store = open_store(str(project.resolve()))
    first, second = wav(tmp_path / "first.wav"), wav(tmp_path / "second.wav", freq=330)
    s = AnnotationSession()
    s.start(store, "alice")
    raw = s.transcribe(FakeTranscriber(), first, RULES).raw
    with pytest.raises(SessionError, match="transcript is the one of an earlier recording"):
        s.save(open_store, str(store.root), "alice", second, raw + "  ", "", RULES)
    assert store.annotations() == []
    rec = s.save(open_store, str(store.root), "alice", second, "what I said the second time", "", RULES).record
    assert (rec.transcript_raw, rec.segments, rec.asr_model, rec.asr_model_sha256) == ("", [], None, None)


def test_refusals_leave_nothing_saved(project, tmp_path):
    open_store = opener()
    root = str(project.resolve())
    store = open_store(root)
    s = AnnotationSession()
    with pytest.raises(SessionError, match="No image to skip"):
        s.skip(open_store, root, "alice")
    with pytest.raises(SessionError, match="Enter your annotator name"):
        s.start(store, "  ")
    s.start(store, "alice")
    take = wav(tmp_path / "take.wav")
    with pytest.raises(SessionError, match=r"the image was given to alice in .*proj, but the boxes now say bob"):
        s.save(open_store, root, "bob", take, "words", "", RULES)
    with pytest.raises(SessionError, match=r"boxes now say alice in /elsewhere"):
        s.save(open_store, "/elsewhere", "alice", take, "words", "", RULES)
    with pytest.raises(SessionError, match="No recording yet"):
        s.save(open_store, root, "alice", None, "words", "", RULES)
    with pytest.raises(SessionError, match="Not saved. The recording is silent"):
        s.save(open_store, root, "alice", wav(tmp_path / "silent.wav", amp=0.0), "words", "", RULES)
    with pytest.raises(SessionError, match=r"too short: 0.5 s, the minimum is 1 s"):
        s.save(open_store, root, "alice", wav(tmp_path / "short.wav", seconds=0.5), "words", "", RULES)
    with pytest.raises(SessionError, match="transcript is empty"):
        s.save(open_store, root, "alice", take, " ", "", RULES)
    with pytest.raises(SessionError, match="Say why the image is bad"):
        s.flag(open_store, root, "alice", "  ")
    assert store.annotations() == [] and s.image_id == 1
    # the same image saved behind the session's back: the store's refusal passes through
    store.save_annotation(1, "alice", None, "", "saved elsewhere")
    with pytest.raises(AlreadyAnnotatedError, match="alice already saved an annotation for image 1"):
        s.save(open_store, root, "alice", take, "words", "", RULES)
    assert [a.transcript for a in store.annotations()] == ["saved elsewhere"]


def test_skip_and_flag_move_on(project):
    open_store = opener()
    root = str(project.resolve())
    store = open_store(root)
    s = AnnotationSession()
    s.start(store, "alice")
    assert s.skip(open_store, root, "alice") == 1 and s.image_id is None
    assert s.start(store, "alice").task.image_id == 2
    assert s.flag(open_store, root, "alice", "duplicate") == 2
    assert store.image(2)["status"] == "flagged"
    assert s.start(store, "alice").task.image_id == 3
    assert s.start(store, "bob").task.image_id == 1  # a skip is alice's own; bob still gets image 1


def test_a_rejected_image_comes_back_to_its_annotator_with_the_reason(project, tmp_path):
    open_store = opener()
    root = str(project.resolve())
    store = open_store(root)
    take = wav(tmp_path / "take.wav")
    s = AnnotationSession()
    s.start(store, "alice")
    rec = s.save(open_store, root, "alice", take, "not about this image", "", RULES).record
    review.reject(store, rec.id, "admin", "describes another image")
    nxt = s.start(store, "alice")
    assert nxt.task.image_id == 1
    assert nxt.notes == ["Your earlier description of this image was rejected in review (describes another image); "
                         "please describe it again."]
    assert nxt.status.startswith("Your earlier description")
    again = s.save(open_store, root, "alice", take, "a red square on white", "", RULES).record
    assert again.id != rec.id and [a.review_state for a in store.annotations(1)] == ["rejected", "pending"]
    with pytest.raises(StoreError):  # one live annotation per image and annotator, enforced by the database too
        store.save_annotation(1, "alice", None, "", "third")


def test_restore_copies_and_accepts_old_dict_sessions():
    s = AnnotationSession(project="/p", annotator="a", image_id=3, segments=[{"start": 0, "end": 1, "text": "x"}])
    c = AnnotationSession.restore(s)
    c.segments.append({})
    assert len(s.segments) == 1 and c.image_id == 3
    assert AnnotationSession.restore(None) == AnnotationSession()
    old = {"project": "/p", "annotator": "a", "image_id": 2, "raw": "r", "unknown_key": 1}
    assert AnnotationSession.restore(old) == AnnotationSession(project="/p", annotator="a", image_id=2, raw="r")


def test_recording_check_and_progress_text(project, tmp_path):
    assert recording_check(None, RULES) == ""
    assert recording_check(wav(tmp_path / "ok.wav", seconds=2.5), RULES) == "2.5 s at 16000 Hz. Good length."
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    assert recording_check(str(bad), RULES).startswith("Problem: 'bad.wav' is not an audio file")
    store = Store(project, annotations_per_image=2)
    for who in ("alice", "bob"):
        store.save_annotation(store.next_image(who).image_id, who, None, "", f"{who} words")
    assert progress_text(store, "alice") == "Images 1/3 complete; annotations 2/6 (2 per image); you (alice): 1; others: bob 1"
    assert progress_text(store, "alice", others=False) == "Images 1/3 complete; annotations 2/6 (2 per image); you (alice): 1"


def test_docstring_examples():
    import doctest

    import annotate.session

    result = doctest.testmod(annotate.session)
    assert result.failed == 0 and result.attempted > 0
