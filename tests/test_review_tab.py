"""The Review tab: its handlers called directly (queue, accept, edit & accept, reject, statistics, export,
temp copies of the receipts), and the tab behind the app's guard with two accounts through gradio_client."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import numpy as np
import pyarrow.parquet as pq
import pytest

from annotate import review
from annotate.audio import Audio
from annotate.store import Store
from app import access
from app.access import User
from app.review_tab import LOCAL_REVIEWER, ReviewHandlers, create_review_tab

from annotate_helpers import make_images


@contextmanager
def acting_as(user: User | None):
    token = access._CURRENT.set(user)
    try:
        yield
    finally:
        access._CURRENT.reset(token)


def tone(seconds: float = 1.0) -> Audio:
    t = np.arange(int(seconds * 16000)) / 16000
    return Audio((0.2 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16).reshape(-1, 1), 16000)


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A data root with project 'birds': 3 images, annotations by alice (1, 2) and bob (3)."""
    monkeypatch.setenv("MOLMO_STUDIO_TMP", str(tmp_path / "apptmp"))
    root = tmp_path / "data"
    make_images(root / "birds", 3)
    s = Store(root / "birds")
    for who, words, cap in (("alice", "a red square", "A red square."), ("alice", "two cups", None),
                            ("bob", "a yellow box", None)):
        t = s.next_image(who)
        s.save_annotation(t.image_id, who, tone(), f"raw {words}", words, caption=cap)
    make_images(root / "cats", 1)  # a project nobody annotated yet
    return root


def handlers(root: Path) -> ReviewHandlers:
    def project_path(name: str) -> Path:
        if name not in ("birds", "cats"):
            raise ValueError(f"Project {name!r} does not exist under {root}; pick one from the list.")
        return root / name
    return ReviewHandlers(lambda: ["birds", "cats"], project_path)


def test_review_one_by_one_through_the_handlers(data, tmp_path):
    h = handlers(data)
    store = Store(data / "birds", sync=False)
    with acting_as(User("root", "admin")):
        state, image, info, audio, raw, transcript, caption, reason, status = h.next("birds", None)
        assert state == {"project": str(data / "birds"), "annotation_id": 1}
        assert image.size == (64, 48) and "annotation 1 by **alice**" in info and "3 pending" in info
        assert (raw, transcript, caption, reason, status) == ("raw a red square", "a red square", "A red square.", "", "")
        receipt = store.abs(store.annotation(1).audio_path)
        assert Path(audio).read_bytes() == receipt.read_bytes()
        assert Path(audio).is_relative_to(tmp_path / "apptmp") and not Path(audio).is_relative_to(data)

        out = h.accept("birds", state)
        assert out[-1] == "Accepted annotation 1 by alice as it was." and out[0]["annotation_id"] == 2
        out = h.skip("birds", out[0])
        assert out[-1] == "Passed over annotation 2 for now." and out[0]["annotation_id"] == 3
        with pytest.raises(gr.Error, match="give a reason"):
            h.reject("birds", " ", out[0])
        out = h.reject("birds", "mostly silence", out[0])
        assert out[-1] == "Rejected annotation 3 by bob; image 3 is back in the queue." and out[0]["annotation_id"] == 2
        out = h.edit_accept("birds", "two cups and a spoon", "Two cups and a spoon.", out[0])
        assert out[-1] == ("Accepted annotation 2 by alice with your edited transcript and caption. "
                           "Nothing left to review in this project.")
        assert out[0] == {"project": None, "annotation_id": None} and out[2] == "No annotation pending review."
        assert h.next("birds", None)[-1] == "Nothing left to review in this project."
        with pytest.raises(gr.Error, match="No annotation shown: press 'Next' first"):
            h.accept("birds", out[0])

    recs = {r.id: r for r in store.annotations()}
    assert [(i, r.review_state, r.reviewer) for i, r in recs.items()] == [
        (1, "accepted", "root"), (2, "accepted", "root"), (3, "rejected", "root")]
    assert (recs[2].transcript, recs[2].reviewed_transcript, recs[2].reviewed_caption) == (
        "two cups", "two cups and a spoon", "Two cups and a spoon.")
    assert recs[3].review_reason == "mostly silence"
    assert store.next_image("carol").image_id == 3  # the rejected image is handed out again


def test_stats_and_export_through_the_handlers(data):
    h = handlers(data)
    store = Store(data / "birds", sync=False)
    review.accept(store, 1, "root", transcript="a red square on white")
    review.reject(store, 3, "root", "no")
    with acting_as(None):
        table = h.stats("birds")
        assert table == {"headers": review.STATS_HEADERS, "data": [s.row() for s in review.annotator_stats(store)]}
        assert [r[0] for r in table["data"]] == ["alice", "bob"] and table["data"][1][5:] == [1, 0, 1.0]
        path, summary = h.export("birds", False)
        assert Path(path).suffix == ".parquet" and not Path(path).is_relative_to(data)
        assert summary == ("Exported 1 images (1 accepted transcripts); 1 annotations awaiting review left out "
                           "(review them, or export everything not rejected with --all); 1 rejected annotations left out.")
        assert [r["transcripts"] for r in pq.read_table(path).to_pylist()] == [["a red square on white"]]
        path, summary = h.export("birds", True)
        assert [r["transcripts"] for r in pq.read_table(path).to_pylist()] == [["a red square on white"], ["two cups"]]
        assert summary.startswith("Exported 2 images (2 accepted and unreviewed transcripts)")


def test_refusals(data, tmp_path):
    h = handlers(data)
    with acting_as(User("alice", "annotator")):  # the guard refuses review_* to annotators; the handlers do too
        for call in (lambda: h.next("birds", None), lambda: h.stats("birds"), lambda: h.export("birds", False),
                     lambda: h.list_projects(None)):
            with pytest.raises(gr.Error, match="alice may not review annotations: only admins may"):
                call()
    with acting_as(None):
        with pytest.raises(gr.Error, match="Pick a project first"):
            h.next("", None)
        with pytest.raises(gr.Error, match="'../etc' does not exist under"):
            h.next("../etc", None)
        with pytest.raises(gr.Error, match="Project cats has no annotations yet"):
            h.next("cats", None)
        assert not (data / "cats" / "annotations.sqlite").exists()
        state = h.next("birds", None)[0]
        with pytest.raises(gr.Error, match="The annotation shown is from .*birds, but the project box now says cats"):
            h.accept("cats", state)
        assert h.accept("birds", state)[-1].startswith("Accepted annotation 1")
        assert Store(data / "birds", sync=False).annotation(1).reviewer == LOCAL_REVIEWER
        with pytest.raises(gr.Error, match="already accepted by local"):
            h.reject("birds", "late", state)
        assert h.list_projects("cats") == {"__type__": "update", "choices": ["birds", "cats"], "value": "cats"}
    folders = ReviewHandlers(lambda: [str(data / "birds")])  # no resolver: only the listed folders
    with acting_as(None), pytest.raises(gr.Error, match="is not one of the projects offered"):
        folders.next(str(tmp_path), None)


def test_missing_receipt_and_remote_image_are_said(data):
    store = Store(data / "birds", sync=False)
    store.abs(store.annotation(1).audio_path).unlink()
    with acting_as(None):
        out = handlers(data).next("birds", None)
    assert out[3] is None and out[-1] == f"The audio receipt {store.annotation(1).audio_path} is missing."


def test_the_tab_names_every_event_review_and_wraps_every_handler(data):
    with gr.Blocks(analytics_enabled=False) as demo:
        c = create_review_tab(lambda: ["birds"], lambda n: data / n)
    names = sorted(fn.api_name for fn in demo.fns.values())
    assert names == ["review_accept", "review_edit_accept", "review_export", "review_next", "review_projects",
                     "review_reject", "review_skip", "review_stats"]
    for fn in demo.fns.values():
        assert hasattr(fn.fn, "__wrapped__"), fn.api_name  # user_errors
    assert [ch[0] for ch in c["project"].choices] == ["birds"]


# -- behind the guard, with logins ---------------------------------------------------------------------


def test_behind_the_guard_annotators_annotate_as_themselves_and_only_admins_review(data, tmp_path, monkeypatch):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    import soundfile as sf

    from annotate.protocol import TimerRules
    from app.access import POLICY, AccessControl, Accounts, guard_events
    from app.annotate_tab import create_annotate_tab
    from app.paths import Roots

    class FakeTranscriber:
        model_name, loaded, note = "fake", False, ""

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio_tmp"))
    accounts = Accounts(tmp_path / "users.json", scrypt_n=2**10)
    accounts.add("alice", "annotator", "alice-password")
    accounts.add("root", "admin", "root-password")
    roots = Roots(data_root=data)
    with gr.Blocks(analytics_enabled=False) as demo:
        with gr.Tab("Annotate"):
            create_annotate_tab("birds", lambda: None, transcriber=FakeTranscriber(),
                                rules=TimerRules(min_seconds=1.0, target_seconds=2.0), roots=roots)
        with gr.Tab("Review"):
            create_review_tab(roots.projects, roots.project)
    guard_events(demo, POLICY, AccessControl(accounts))
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                        auth=accounts.check)
    try:
        alice = Client(demo.local_url, auth=("alice", "alice-password"), verbose=False, download_files=False)
        root = Client(demo.local_url, auth=("root", "root-password"), verbose=False, download_files=False)
        # alice types bob's name: she is alice all the same, and sees no one else's count
        out = alice.predict("bob", "birds", api_name="/annotate_next")
        assert out[-1] == "Images 3/3 complete; annotations 3/3 (1 per image); you (alice): 2"  # no "others: bob 1"
        with pytest.raises(AppError, match="alice may not do this \\(review_next\\): only admins may"):
            alice.predict("birds", api_name="/review_next")
        with pytest.raises(AppError, match="only admins may"):
            alice.predict("birds", True, api_name="/review_export")
        out = root.predict("birds", api_name="/review_next")
        assert "annotation 1 by **alice**" in out[1]
        out = root.predict("birds", "describes another image", api_name="/review_reject")
        assert out[-1].startswith("Rejected annotation 1 by alice")
        assert Store(data / "birds", sync=False).annotation(1).reviewer == "root"
        # alice gets image 1 back, told why, and saves it as herself
        out = alice.predict("bob", "birds", api_name="/annotate_next")
        assert out[1].startswith("**img_000.png**") and "rejected in review (describes another image)" in out[-2]
        wav = tmp_path / "take.wav"
        t = np.arange(24000) / 16000
        sf.write(wav, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, subtype="PCM_16")
        status, progress = alice.predict("bob", "birds", handle_file(str(wav)), "a red square again", "",
                                         api_name="/annotate_save")
        assert status.startswith("Saved annotation 4 for image 1") and "others" not in progress
        assert Store(data / "birds", sync=False).annotation(4).annotator == "alice"
        alice.close()
        root.close()
    finally:
        demo.close()
