"""The Annotate tab's handlers called directly: the annotator is the signed-in user (never a typed name),
progress shows others' counts to admins only, and projects are names under the data root when the tab
is given roots."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import soundfile as sf

from annotate.asr import Segment, Transcript
from annotate.protocol import TimerRules
from annotate.store import Store
from app import access
from app.access import User
from app.annotate_tab import AnnotateHandlers, _default_project, create_annotate_tab, get_store
from app.paths import Roots

from annotate_helpers import make_images

RULES = TimerRules(min_seconds=1.0, target_seconds=2.0)


class FakeTranscriber:
    model_name = "fake-asr"
    loaded = False
    note = ""

    def transcribe(self, path):
        return Transcript("spoken words", [Segment(0.0, 1.0, "spoken words")], "en", 1.5, 1.5, "fake-asr", None)

    def set_model(self, name):
        self.model_name = name


@contextmanager
def acting_as(user: User | None):
    """What the app's guard does around every handler call."""
    token = access._CURRENT.set(user)
    try:
        yield
    finally:
        access._CURRENT.reset(token)


def wav(path: Path, seconds: float = 1.5) -> str:
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, subtype="PCM_16")
    return str(path)


@pytest.fixture
def project(tmp_path):
    make_images(tmp_path / "proj", 3)
    return str(tmp_path / "proj")


def handlers(roots: Roots | None = None) -> AnnotateHandlers:
    return AnnotateHandlers(lambda: None, FakeTranscriber(), RULES, roots=roots)


def test_with_login_the_annotator_is_the_signed_in_user_whatever_is_typed(project, tmp_path):
    h = handlers()
    alice = User("alice", "annotator")
    with acting_as(alice):
        session, *_, status, progress = h.next_image("mallory", project, None)
        assert session.annotator == "alice" and progress.endswith("you (alice): 0")
        session = h.transcribe(wav(tmp_path / "a.wav"), session)[0]
        # the name box may say anything (or nothing): the session was given to alice, and alice saves
        session, status, progress = h.save("", project, wav(tmp_path / "a.wav"), "spoken words", "", session)
    assert status.startswith("Saved annotation 1 for image 1")
    (rec,) = Store(project, sync=False).annotations()
    assert rec.annotator == "alice"
    with acting_as(User("bob", "annotator")):  # bob cannot act on alice's session either
        s = h.next_image("alice", project, None)[0]
        assert s.annotator == "bob"
        with pytest.raises(gr.Error, match="the image was given to alice"):
            h.skip("bob", project, session.__class__(project=s.project, annotator="alice", image_id=2))


def test_progress_of_others_is_for_admins_only_and_a_typed_name_is_ignored(project):
    s = Store(project, annotations_per_image=2)
    for who in ("alice", "bob"):
        s.save_annotation(s.next_image(who).image_id, who, None, "", f"{who} words")
    h = handlers()
    with acting_as(User("alice", "annotator")):
        assert h.progress("bob", project) == "Images 1/3 complete; annotations 2/6 (2 per image); you (alice): 1"
        assert "bob" not in h.next_image("bob", project, None)[-1]
    with acting_as(User("root", "admin")):
        assert h.progress("bob", project).endswith("you (root): 0; others: alice 1, bob 1")
    with acting_as(None):  # no login: one person on loopback, who sees everything and types a name
        assert h.progress("bob", project).endswith("you (bob): 1; others: alice 1")
        assert h.next_image("carol", project, None)[0].annotator == "carol"
        with pytest.raises(gr.Error, match="Enter your annotator name"):
            h.next_image("  ", project, None)


def test_an_annotator_does_not_see_another_annotators_caption_or_transcripts(project, tmp_path):
    s = Store(project, annotations_per_image=3)
    s.save_annotation(s.next_image("bob").image_id, "bob", None, "", "bob's private words", caption="Bob's caption.")
    prompts = []

    class Runner:
        name = "tiny"

        def generate(self, image, prompt, **kw):
            prompts.append(prompt)
            return "A caption."

    h = AnnotateHandlers(lambda: Runner(), FakeTranscriber(), RULES)
    with acting_as(User("alice", "annotator")):
        session, _, _, caption, *_ = h.next_image("alice", project, None)
        assert session.image_id == 1 and caption == ""
        h.draft("alice's words", project, session)
    with acting_as(User("root", "admin")):
        session, _, _, caption, *_ = h.next_image("root", project, None)
        assert caption == "Bob's caption."
        h.draft("root's words", project, session)
    assert "bob's private words" not in prompts[0] and "bob's private words" in prompts[1]


def test_whoami_hides_the_name_box_with_login_and_the_model_box_from_annotators():
    h = handlers()
    with acting_as(None):
        name, signed_in, admin_box = h.whoami()
        assert name["visible"] is True and signed_in["visible"] is False and admin_box["visible"] is True
    with acting_as(User("alice", "annotator")):
        name, signed_in, admin_box = h.whoami()
        assert name["visible"] is False and signed_in == {"__type__": "update", "value": "Signed in as **alice**",
                                                          "visible": True}
        assert admin_box["visible"] is False
        with pytest.raises(gr.Error, match="alice may not switch the speech model"):
            h.pick_model("tiny")
    with acting_as(User("root", "admin")):
        assert h.whoami()[2]["visible"] is True
        assert h.pick_model("tiny").startswith("Speech model: tiny")


def test_with_roots_projects_are_names_under_the_data_root(tmp_path):
    data = tmp_path / "data"
    make_images(data / "birds", 2)
    make_images(data / "cats", 1)
    (data / "empty").mkdir()
    outside = tmp_path / "outside"
    make_images(outside, 1)
    roots = Roots(data_root=data)
    h = handlers(roots)
    assert h.projects("cats") == {"__type__": "update", "choices": ["birds", "cats"], "value": "cats"}
    session, *_, progress = h.next_image("alice", "birds", None)
    assert session.project == str(data / "birds") and progress.startswith("Images 0/2 complete")
    for bad, why in ((str(outside), "a project is named by letters"), ("../outside", "a project is named by letters"),
                     ("empty/../../outside", "a project is named by letters"),
                     ("no-such-project", "'no-such-project' does not exist under")):
        with pytest.raises(gr.Error, match=why):
            h.next_image("alice", bad, None)
    assert not (outside / "annotations.sqlite").exists()
    with pytest.raises(gr.Error, match="Pick a project from the list first"):
        h.next_image("alice", "", None)
    with pytest.raises(gr.Error, match="outside the folders this app may write"):
        get_store(str(outside), roots=roots)
    assert not (outside / "annotations.sqlite").exists()  # refused before anything was written
    assert get_store(str(data / "cats"), roots=roots).root == data / "cats"
    # saving checks the project the image came from by its resolved folder
    audio = wav(tmp_path / "a.wav")
    session = h.transcribe(audio, session)[0]
    with pytest.raises(gr.Error, match="the image was given to alice in .*birds, but the boxes now say alice in .*cats"):
        h.save("alice", "cats", audio, "words", "", session)
    assert h.save("alice", "birds", audio, "words", "", session)[1].startswith("Saved annotation 1 for image 1")


def test_the_tab_with_roots_has_a_project_list(tmp_path):
    data = tmp_path / "data"
    make_images(data / "birds", 1)
    roots = Roots(data_root=data)
    assert _default_project(str(data / "birds"), roots, ["birds"]) == "birds"
    assert _default_project("birds", roots, ["birds"]) == "birds"
    assert _default_project(str(tmp_path), roots, ["birds"]) is None
    with gr.Blocks(analytics_enabled=False) as demo:
        c = create_annotate_tab("birds", lambda: None, transcriber=FakeTranscriber(), rules=RULES, roots=roots)
    assert isinstance(c["project"], gr.Dropdown) and c["project"].value == "birds"
    assert [ch[0] for ch in c["project"].choices] == ["birds"]
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"annotate_whoami", "annotate_projects", "annotate_next", "annotate_save"} <= names
    assert all(n.startswith("annotate_") for n in names)
    with gr.Blocks(analytics_enabled=False):
        c = create_annotate_tab(str(tmp_path), lambda: None, transcriber=FakeTranscriber(), rules=RULES)
    assert isinstance(c["project"], gr.Textbox) and "projects_refresh" not in c
