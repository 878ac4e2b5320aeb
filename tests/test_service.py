"""MolmoService on a tiny random checkpoint (real loader, processor and generation) and on a scripted
runner where known answers are needed (points in pixels, model switching)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from app.service import (ClockResult, CountResult, MolmoService, NoModelError, PointResult, ServiceBusyError,
                         prepare_image)
from molmo_core import prompts
from molmo_core.errors import CheckpointError, MolmoInputError

from app_helpers import *  # noqa: F401,F403
from app_helpers import TEST_LIMITS, ScriptedRunner, png_header_only, run_threads, scripted_loader


# ------------------------------------------------------------------------------------------ loading


def test_load_reports_progress_and_status(tiny_checkpoint):
    seen: list[tuple[float, str]] = []
    service = MolmoService(device="cpu", limits=TEST_LIMITS)
    assert not service.status().loaded and service.status().load.phase == "idle"
    thread = service.load(str(tiny_checkpoint), progress=lambda f, m: seen.append((f, m)))
    thread.join(60)
    st = service.status()
    assert st.loaded and st.load.phase == "ready" and st.load.fraction == 1.0
    assert st.name == str(tiny_checkpoint) and st.device == "cpu" and st.precision == "fp32"
    assert st.param_bytes and st.param_bytes > 0 and st.loads == 1 and st.max_crops == 12
    assert seen and seen[-1][0] == 1.0 and all(0.0 <= f <= 1.0 for f, _ in seen)
    assert "Model:" in st.markdown() and "fp32" in st.markdown()
    service.unload()
    assert not service.status().loaded


def test_tasks_without_a_model_say_what_to_do(images):
    service = MolmoService(limits=TEST_LIMITS)
    with pytest.raises(NoModelError, match="No model loaded: choose a checkpoint in the Model panel"):
        service.point(images[0], "coins")
    with pytest.raises(NoModelError, match="No model loaded"):
        service.ask_stream(images[0], "hi")


def test_failed_load_is_reported_and_the_service_recovers(tmp_path, tiny_checkpoint, images):
    service = MolmoService(device="cpu", limits=TEST_LIMITS)
    service.load(str(tmp_path / "missing"), wait=True)
    st = service.status()
    assert not st.loaded and st.load.phase == "error" and "missing" in st.load.error
    assert "failed to load" in st.markdown()
    with pytest.raises(NoModelError, match="failed to load"):
        service.read_clock(images[0])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    service.load(str(broken), wait=True)
    assert service.status().load.phase == "error"
    service.load(str(tiny_checkpoint), wait=True)  # the next load works
    assert service.status().loaded
    assert isinstance(service.read_clock(images[0]), ClockResult)
    service.unload()


def test_load_validates_arguments():
    service = MolmoService()
    with pytest.raises(ValueError, match="Choose a checkpoint"):
        service.load("  ")
    with pytest.raises(ValueError, match="quantization"):
        service.load("x", quantize="3bit")


def test_second_load_while_loading_is_refused():
    started, release = threading.Event(), threading.Event()

    def slow_loader(source, **kwargs):
        started.set()
        release.wait(10)
        return ScriptedRunner()

    service = MolmoService(loader=slow_loader)
    thread = service.load("first")
    started.wait(5)
    assert service.status().load.phase == "loading"
    with pytest.raises(NoModelError, match="still loading"):
        service.point(np.zeros((8, 8, 3), np.uint8), "x")
    with pytest.raises(ServiceBusyError, match="still loading"):
        service.load("second")
    release.set()
    thread.join(5)
    assert service.status().loaded


def test_switching_models_frees_the_old_one():
    runners: list[ScriptedRunner] = []

    def loader(source, **kwargs):
        runners.append(ScriptedRunner())
        return runners[-1]

    service = MolmoService(loader=loader)
    service.load("a", wait=True)
    service.load("b", wait=True)
    assert runners[0].closed and not runners[1].closed
    assert service.runner is runners[1] and service.loads == 2


def test_switching_real_models_closes_the_runner(tiny_checkpoint, images):
    service = MolmoService(device="cpu", limits=TEST_LIMITS)
    service.load(str(tiny_checkpoint), wait=True)
    old = service.runner
    service.load(str(tiny_checkpoint), max_crops=4, wait=True)
    assert old.model is None  # runner.close() dropped the weights
    assert service.status().max_crops == 4
    assert isinstance(service.point(images[0], "coins"), PointResult)
    service.unload()


# ------------------------------------------------------------------------------------------ tasks


def test_point_and_count_are_the_runner_answers_parsed(tiny_service, images):
    runner = tiny_service.runner
    rgb = np.asarray(Image.open(images[0]).convert("RGB"))
    result = tiny_service.point(images[0], "  the   coins ")
    assert isinstance(result, PointResult)
    assert result.answer == runner.generate(rgb, prompts.point_prompt("the coins"), max_new_tokens=TEST_LIMITS.point)
    assert result.answer  # the noise image gives text
    assert (result.width, result.height) == (96, 72) and result.phrase == "the coins"
    count = tiny_service.count(Image.open(images[1]), "coins")
    assert isinstance(count, CountResult)
    rgb = np.asarray(Image.open(images[1]).convert("RGB"))
    assert count.answer == runner.generate(rgb, prompts.count_prompt("coins"), max_new_tokens=TEST_LIMITS.count)
    assert count.to_json()["task"] == "count" and "count" in count.to_json()


def test_clock_caption_and_ask(tiny_service, images):
    runner = tiny_service.runner
    clock = tiny_service.read_clock(images[2])
    rgb = np.asarray(Image.open(images[2]).convert("RGB"))
    assert clock.answer == runner.generate(rgb, prompts.clock_prompt(), max_new_tokens=TEST_LIMITS.clock)
    assert clock.to_json()["task"] == "read_clock"
    cap = tiny_service.caption(images[2], "long caption", 10)
    assert cap.prompt == "long_caption 10:" and cap.style == "long_caption" and cap.answer
    chat = tiny_service.caption(images[2], "transcript", 10, chat_format=True)
    assert chat.prompt == "transcript: Describe this image."
    partial = list(tiny_service.ask_stream(images[3], "What is this?"))
    assert len(partial) >= 2 and all(b.startswith(a) for a, b in zip(partial, partial[1:]))
    history = [("What is this?", partial[-1])]
    second = list(tiny_service.ask_stream(images[3], "And then?", history))
    rgb = np.asarray(Image.open(images[3]).convert("RGB"))
    with_history = runner.generate(rgb, "And then?", history=history, max_new_tokens=TEST_LIMITS.ask)
    without = runner.generate(rgb, "And then?", max_new_tokens=TEST_LIMITS.ask)
    assert with_history != without  # this checkpoint answers differently, so the test sees the history
    assert second[-1].strip() == with_history  # the history reached the model


def test_stopping_a_stream_early_frees_the_runner(tiny_service, images):
    stream = tiny_service.ask_stream(images[0], "Describe this image.")
    next(stream)
    stream.close()
    assert tiny_service.point(images[1], "coins").answer  # the runner still answers


def test_points_come_back_in_pixels():
    service = MolmoService(loader=scripted_loader)
    service.load("scripted", wait=True)
    image = Image.new("RGB", (200, 100), "white")
    result = service.point(image, "coins")
    assert [(p.x, p.y, p.index) for p in result.points] == [(50.0, 50.0, 1), (100.0, 50.0, 2), (150.0, 50.0, 3)]
    count = service.count(image, "coins")
    assert count.count == 3 and len(count.points) == 3
    clock = service.read_clock(image)
    assert str(clock.time) == "10:08" and clock.to_json()["minute"] == 8


def test_four_concurrent_callers_get_their_own_answers(tiny_service, images):
    sequential = [tiny_service.point(img, "coins").answer for img in images]
    assert len(set(sequential)) > 1, "the test needs different answers for different images"
    concurrent = run_threads([lambda img=img: tiny_service.point(img, "coins").answer for img in images])
    assert concurrent == sequential
    assert tiny_service.loads == 1


# ------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors(tiny_service, images, tmp_path):
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    with pytest.raises(MolmoInputError, match="not a readable image"):
        tiny_service.point(text_file, "coins")
    with pytest.raises(MolmoInputError, match="megapixels"):
        tiny_service.point(png_header_only(tmp_path / "huge.png", 20000, 20000), "coins")
    with pytest.raises(MolmoInputError, match="empty"):
        tiny_service.point(images[0], "   ")
    with pytest.raises(MolmoInputError, match="No image"):
        tiny_service.count(None, "coins")
    with pytest.raises(MolmoInputError, match="empty"):
        tiny_service.ask_stream(images[0], "")
    with pytest.raises(MolmoInputError, match="uint8"):
        tiny_service.read_clock(np.zeros((4, 4, 3), np.float32))
    assert tiny_service.point(images[0], "coins").answer  # still serving


def test_transparent_images_are_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "t.png")
    for source in (rgba, np.asarray(rgba), tmp_path / "t.png", str(tmp_path / "t.png")):
        rgb = prepare_image(source)
        assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8
        assert tuple(rgb[5, 5]) == (255, 255, 255) and tuple(rgb[0, 0]) == (255, 0, 0)


def test_core_errors_are_the_documented_types():
    assert issubclass(MolmoInputError, ValueError) and issubclass(CheckpointError, RuntimeError)
