"""The app with Molmo2: one loading entry for both families, prompts and parsing per family, Point & Count /
Clock / Ask / Caption / streaming / caption drafts on a tiny random Molmo2, several images at once (Molmo2
only), and the same through gradio_client (/load_model, /point, /point_multi, /render_point_multi)."""

from __future__ import annotations

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import molmo_core
from annotate.caption import draft_caption
from app import MolmoService
from app.handlers import MULTI_TABLE_HEADERS, Handlers, file_paths
from app.render import PALETTE
from app.service import ONE_IMAGE_MESSAGE, answer_count, answer_points
from app.ui import HUB_CHOICES, MULTI_EVENTS
from app_helpers import (TEST_LIMITS, ScriptedRunner, _gradio_temp, make_client, noise_image,  # noqa: F401
                         running_app)
from molmo_core import prompts
from molmo_core.api import MolmoRunner, family_of
from molmo_core.errors import CheckpointError, MolmoInputError
from molmo_core.molmo2 import Molmo2Runner
from molmo_core.molmo2.tiny import write_tiny_molmo2
from molmo_core.tiny import write_tiny_checkpoint

NO_QUANT = "none (bf16 on GPU, fp32 on CPU)"


@pytest.fixture(scope="module")
def m2(tmp_path_factory):
    return write_tiny_molmo2(tmp_path_factory.mktemp("m2app") / "tiny-m2", "a")


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("v1app") / "tiny-v1", "d")


@pytest.fixture(scope="module")
def m2_service(m2):
    service = MolmoService(device="cpu", limits=TEST_LIMITS)  # the default loader: molmo_core.load
    service.load(str(m2), wait=True)
    assert service.status().loaded, service.status().load
    yield service
    service.unload()


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m2pics")
    return [noise_image(folder / f"n{i}.png", seed=i, size=size)
            for i, size in enumerate([(96, 72), (64, 80), (80, 48)])]


def marker_pixels(image: Image.Image, x: int, y: int, r: int = 8) -> int:
    """Pixels of the first label's marker colour within r of (x, y)."""
    box = np.asarray(image.convert("RGB"))[max(0, y - r):y + r, max(0, x - r):x + r].reshape(-1, 3)
    return int((box == np.array(PALETTE[0])).all(axis=1).sum())


def rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


class ScriptedMolmo2(ScriptedRunner):
    """A Molmo2 stand-in with known answers in Molmo2's format (0-1000, image index first)."""

    family = "molmo2"
    ANSWERS = {
        "Point to": '<points coords="1 1 250 500 2 500 500 3 750 500" alt="coins">coins</points>',
        "How many": 'There are 3 <points coords="1 1 250 500 2 500 500 3 750 500" alt="coins">coins</points>.',
        "What time": "The clock shows 10:08.",
    }
    MULTI = {  # image 1: one coin, image 2: two, and one point on an image 3 that was not given
        "Point to": '<points coords="1 1 250 500;2 2 500 250 3 750 750;3 4 100 100" alt="coins">coins</points>',
        "How many": 'Counting the <points coords="1 1 250 500;2 2 500 250 3 750 750" alt="coins">coins</points> '
                    "shows a total of 3.",
    }

    def __init__(self):
        super().__init__()
        self.requests = []

    def stream(self, image, prompt, *, history=(), max_new_tokens=200, **kw):
        self.requests.append((image, prompt, kw))
        if isinstance(image, list):
            text = next(v for k, v in self.MULTI.items() if prompt.startswith(k))
            yield text
            return
        yield from super().stream(image, prompt, history=history, max_new_tokens=max_new_tokens, **kw)


# ----------------------------------------------------------------------------------------- loading


def test_one_loading_entry_for_both_families(m2, v1, tmp_path, monkeypatch):
    r2 = molmo_core.load(m2, device="cpu")
    r1 = molmo_core.load(v1, device="cpu")
    try:
        assert isinstance(r2, Molmo2Runner) and r2.family == "molmo2"
        assert isinstance(r1, MolmoRunner) and r1.family == "molmo"
    finally:
        r2.close()
        r1.close()
    assert family_of(m2) == "molmo2" and family_of(v1) == "molmo" and family_of(m2 / "config.json") == "molmo2"
    # hub ids that are not here: judged by name; loading them offline says what to download
    assert family_of("allenai/Molmo2-4B") == family_of("allenai/Molmo2-O-7B") == "molmo2"
    assert family_of("allenai/Molmo-7B-D-0924") == "molmo"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="hf download allenai/Molmo2-8B"):
        molmo_core.load("allenai/Molmo2-8B")
    assert {"allenai/Molmo2-4B", "allenai/Molmo2-8B", "allenai/Molmo2-O-7B"} <= set(HUB_CHOICES)


def test_prompts_per_family():
    assert prompts.point_prompt("the boats", family="molmo2") == "Point to the boats"
    assert prompts.count_prompt("boats", family="molmo2") == "How many boats are there?"
    assert prompts.count_prompt("boats", point=False, family="molmo2") == "How many boats are there?"
    assert prompts.clock_prompt(family="molmo2") == prompts.MOLMO2_CLOCK_PROMPT != prompts.clock_prompt()
    assert prompts.caption_prompt("transcript", 40, family="molmo2") == "transcript: Describe this image."
    assert prompts.caption_prompt("transcript", 40) == "transcript 40:"
    assert prompts.family_of(ScriptedRunner()) == "molmo" and prompts.family_of(ScriptedMolmo2()) == "molmo2"
    with pytest.raises(ValueError, match="Unknown model family"):
        prompts.point_prompt("x", family="gpt")


# ----------------------------------------------------------------------------------------- the service


def test_service_tasks_on_a_tiny_molmo2(m2_service, pics):
    service, runner = m2_service, m2_service.runner
    st = service.status()
    assert st.family == "molmo2" and "Molmo2" in st.markdown() and st.to_json()["family"] == "molmo2"
    image = rgb(pics[0])
    h, w = image.shape[:2]

    point = service.point(pics[0], "the coins")
    assert point.answer == runner.generate(image, prompts.point_prompt("the coins", family="molmo2"),
                                           max_new_tokens=TEST_LIMITS.point)
    assert point.points == answer_points(point.answer, w, h, "molmo2") and (point.width, point.height) == (w, h)
    count = service.count(pics[0], "coins")
    assert count.answer == runner.generate(image, prompts.count_prompt("coins", family="molmo2"),
                                           max_new_tokens=TEST_LIMITS.count)
    assert count.count == answer_count(count.answer, "molmo2") and count.to_json()["task"] == "count"
    clock = service.read_clock(pics[0])
    assert clock.answer == runner.generate(image, prompts.MOLMO2_CLOCK_PROMPT, max_new_tokens=TEST_LIMITS.clock)
    assert clock.to_json()["task"] == "read_clock"

    caption = service.caption(pics[0], "long_caption", 65)
    assert caption.prompt == "long_caption: Describe this image."
    assert caption.answer == runner.generate(image, caption.prompt, max_new_tokens=TEST_LIMITS.caption(65))

    growing = list(service.ask_stream(pics[0], "What is this?"))
    assert growing and all(b.startswith(a) for a, b in zip(growing, growing[1:]))
    ask = service.ask(pics[0], "What is this?")
    assert ask.answer == growing[-1].strip() and ask.to_json()["image_size"] == [w, h]
    assert service.ask(None, "Say hello.").width is None  # text only

    # the Annotate tab's caption draft: text only through the same runner
    draft = draft_caption(["um a red car next to a tree"],
                          lambda p: service.runner.generate(None, p, max_new_tokens=16))
    assert "could not draft" not in draft.status


def test_several_images_in_one_question_on_a_tiny_molmo2(m2_service, pics):
    service, runner = m2_service, m2_service.runner
    result = service.point_multi(pics, "coins")
    images = [rgb(p) for p in pics]
    assert result.answer == runner.generate(images, prompts.point_prompt("coins", family="molmo2"),
                                            max_new_tokens=TEST_LIMITS.point)
    js = result.to_json()
    assert js["multi"] and js["family"] == "molmo2" and len(js["images"]) == 3
    assert [im["image_size"] for im in js["images"]] == [[96, 72], [64, 80], [80, 48]]
    for i, (im, arr) in enumerate(zip(result.images, images), start=1):
        assert im.points == answer_points(result.answer, arr.shape[1], arr.shape[0], "molmo2", image=i)
    single = service.count_multi(pics[:1], "coins")  # one image goes as a single image, not "Image 1"
    assert single.answer == service.count(pics[0], "coins").answer
    with pytest.raises(MolmoInputError, match="at most 6"):
        service.point_multi(pics * 3, "coins")
    with pytest.raises(MolmoInputError, match="No image"):
        service.point_multi([], "coins")


def test_molmo2_answers_are_parsed_in_pixels_and_per_image(pics):
    service = MolmoService(loader=lambda source, **kw: ScriptedMolmo2())
    service.load("scripted-m2", wait=True)
    runner = service.runner
    point = service.point(pics[0], "coins")  # 96 x 72
    assert [(p.x, p.y, p.index, p.label) for p in point.points] == [(24.0, 36.0, 1, "coins"), (48.0, 36.0, 2, "coins"),
                                                                    (72.0, 36.0, 3, "coins")]
    assert runner.requests[-1][1] == "Point to coins"
    count = service.count(pics[0], "coins")
    assert count.count == 3 and len(count.points) == 3  # "There are 3 <points ...>.": v1 rules would find none
    clock = service.read_clock(pics[0])
    assert str(clock.time) == "10:08" and runner.requests[-1][1] == prompts.MOLMO2_CLOCK_PROMPT
    caption = service.caption(pics[0], "transcript", 40)
    assert runner.requests[-1][1] == "transcript: Describe this image."
    assert runner.requests[-1][2].get("template", "role") == "role" and caption.answer

    multi = service.point_multi(pics[:2], "coins")  # 96 x 72 and 64 x 80
    assert isinstance(runner.requests[-1][0], list) and len(runner.requests[-1][0]) == 2
    assert [[(p.x, p.y) for p in im.points] for im in multi.images] == [[(24.0, 36.0)], [(32.0, 20.0), (48.0, 60.0)]]
    assert multi.unplaced == 1 and multi.to_json()["count"] == 3
    counted = service.count_multi(pics[:2], "coins")
    assert counted.count == 3 and [len(im.points) for im in counted.images] == [1, 2]

    h = Handlers(service)
    answer, js = h.point_multi([str(p) for p in pics[:2]], "coins")
    gallery, badge, table, download = h.render_points_multi([{"path": str(p)} for p in pics[:2]], js)
    assert len(gallery) == 2 and gallery[1][1] == "Image 2: 2 points"
    assert gallery[1][0].size == (64, 80) and marker_pixels(gallery[1][0], 32, 20) > 30  # markers on image 2
    assert marker_pixels(gallery[0][0], 24, 36) > 30 and marker_pixels(gallery[0][0], 48, 36) == 0
    assert table == [[1, 1, "coins", 24.0, 36.0], [2, 1, "coins", 32.0, 20.0], [2, 2, "coins", 48.0, 60.0]]
    assert len(MULTI_TABLE_HEADERS) == len(table[0]) and "not drawn" in badge and download.endswith(".json")
    with pytest.raises(Exception, match="images changed"):
        h.render_points_multi([str(pics[0])], js)
    assert file_paths([(str(pics[0]), "caption")]) == [str(pics[0])]


def test_a_v1_model_refuses_several_images_but_takes_one(pics):
    service = MolmoService(loader=lambda source, **kw: ScriptedRunner())
    service.load("scripted-v1", wait=True)
    with pytest.raises(MolmoInputError) as e:
        service.point_multi(pics[:2], "coins")
    assert str(e.value) == ONE_IMAGE_MESSAGE.format(name="scripted", n=2)
    one = service.count_multi(pics[:1], "coins")
    assert one.family == "molmo" and one.count == 3 and len(one.images[0].points) == 3


# ----------------------------------------------------------------------------------------- the app


def test_app_loads_molmo2_then_points_in_one_and_several_images_and_v1_refuses(m2, v1, pics):
    service = MolmoService(device="cpu", limits=TEST_LIMITS)
    ask_point, render_point = MULTI_EVENTS["point"]
    with running_app(service) as (_, url):
        client = make_client(url)
        markdown, status = client.predict(str(m2), NO_QUANT, 4, api_name="/load_model")
        assert status["loaded"] and status["family"] == "molmo2" and "Molmo2" in markdown

        answer, result = client.predict(handle_file(str(pics[0])), "coins", api_name="/point")
        assert result["task"] == "point" and result["image_size"] == [96, 72] and result["answer"] == answer
        answer, result = client.predict(handle_file(str(pics[0])), "coins", api_name="/count")
        assert result["task"] == "count" and result["answer"] == answer

        files = [handle_file(str(p)) for p in pics[:2]]
        answer, result = client.predict(files, "coins", api_name=f"/{ask_point}")
        assert result["multi"] and result["family"] == "molmo2" and result["answer"] == answer
        assert [im["image_size"] for im in result["images"]] == [[96, 72], [64, 80]]
        gallery, badge, table, _ = client.predict(files, result, api_name=f"/{render_point}")
        assert len(gallery) == 2 and [g["caption"].split(":")[0] for g in gallery] == ["Image 1", "Image 2"]
        assert table["headers"] == MULTI_TABLE_HEADERS and "Count" in badge

        markdown, status = client.predict(str(v1), NO_QUANT, 4, api_name="/load_model")
        assert status["family"] == "molmo" and "Molmo v1" in markdown
        with pytest.raises(AppError) as e:
            client.predict(files, "coins", api_name=f"/{ask_point}")
        assert "Molmo v1 model, which takes one image per question; 2 images were given" in str(e.value)
        answer, result = client.predict(files[:1], "coins", api_name=f"/{ask_point}")
        assert result["family"] == "molmo" and len(result["images"]) == 1
        client.close()
    service.unload()


def test_more_images_than_allowed_or_than_fit_are_refused_and_the_next_request_works(m2_service, pics):
    from app.service import MAX_IMAGES

    service = m2_service
    with pytest.raises(MolmoInputError, match=f"at most {MAX_IMAGES}"):
        service.point_multi([str(pics[0])] * (MAX_IMAGES + 1), "dots")
    runner = service.get_runner()
    context = runner.processor.max_length
    one = runner.process([str(pics[0])], "Point to the dots.").length
    runner.processor.max_length = 2 * one  # a small context: three images do not fit, one does
    try:
        with pytest.raises(MolmoInputError, match="context holds"):
            service.point_multi([str(p) for p in pics[:3]], "dots")
        assert service.point_multi([str(pics[0])], "dots").answer is not None
    finally:
        runner.processor.max_length = context
    assert len(service.point_multi([str(p) for p in pics[:3]], "dots").images) == 3
