"""The Gradio app end to end through gradio_client (tiny random checkpoint), plus handlers called directly.

Every failure must reach the client as a clear message (never a traceback) and the server must keep
serving afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import gradio as gr
from app.handlers import Handlers, chat_messages, count_markdown
from app.render import PALETTE
from app.service import MolmoService

from app_helpers import *  # noqa: F401,F403
from app_helpers import (TEST_LIMITS, free_port, make_client, png_header_only, run_threads, running_app,
                         scripted_loader)

ROOT = Path(__file__).resolve().parent.parent
TASK_ENDPOINTS = ("/point", "/count", "/read_clock", "/ask", "/caption")


def _error_text(excinfo) -> str:
    return str(excinfo.value)


# ------------------------------------------------------------------------------------------ endpoints


def test_every_task_has_a_named_endpoint(tiny_app):
    _, url = tiny_app
    client = make_client(url)
    names = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in TASK_ENDPOINTS + ("/load_model", "/status"):
        assert name in names, sorted(names)
    client.close()


def test_task_endpoints_return_answer_and_parsed_json(tiny_app, images):
    service, url = tiny_app
    client = make_client(url)
    image = handle_file(str(images[0]))

    answer, result = client.predict(image, "coins", api_name="/point")
    assert answer == service.point(images[0], "coins").answer
    assert result["task"] == "point" and result["image_size"] == [96, 72] and isinstance(result["points"], list)

    answer, result = client.predict(image, "coins", api_name="/count")
    assert answer == service.count(images[0], "coins").answer
    assert result["task"] == "count" and result["answer"] == answer

    answer, result = client.predict(image, api_name="/read_clock")
    assert answer == service.read_clock(images[0]).answer
    assert result["task"] == "read_clock" and set(result) >= {"time", "hour", "minute", "second"}

    answer, result = client.predict(image, "transcript", 10, False, api_name="/caption")
    assert result["prompt"] == "transcript 10:" and result["chars"] == len(answer) and answer

    chat, answer, result = client.predict(image, "What is this?", api_name="/ask")
    assert result["partial"] is False and result["answer"] == answer and result["turn"] == 1
    assert chat[-1]["role"] == "assistant" and "What is this?" in str(chat[0]["content"])
    # a second turn in the same client session sees the first one
    chat, answer2, result = client.predict(image, "And what else?", api_name="/ask")
    assert result["turn"] == 2 and len(chat) == 4

    status = client.predict(api_name="/status")
    assert status[1]["loaded"] is True and status[1]["loads"] == 1
    client.close()


def test_ask_streams_partial_updates(tiny_app, images):
    _, url = tiny_app
    client = make_client(url)
    job = client.submit(handle_file(str(images[1])), "Describe this image.", api_name="/ask")
    partial_seen_while_running = 0
    for update in job:  # each yield of the handler arrives as one update
        _, text, result = update
        if result.get("partial") and not job.done():
            partial_seen_while_running += 1
    outputs = job.outputs()
    partial = [o for o in outputs if o[2].get("partial")]
    assert len(partial) >= 2, f"only {len(partial)} partial updates"
    assert partial_seen_while_running >= 2
    texts = [o[1] for o in partial]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "partial answers must grow"
    assert outputs[-1][2]["partial"] is False and outputs[-1][1].startswith(texts[0].strip())
    client.close()


def test_four_clients_at_once_get_their_own_answers(tiny_app, images):
    service, url = tiny_app
    clients = [make_client(url) for _ in images]
    sequential = [c.predict(handle_file(str(img)), "coins", api_name="/point")[0] for c, img in zip(clients, images)]
    assert len(set(sequential)) > 1, "different images should give different answers"
    concurrent = run_threads([
        lambda c=c, img=img: c.predict(handle_file(str(img)), "coins", api_name="/point")[0]
        for c, img in zip(clients, images)])
    assert concurrent == sequential
    assert service.loads == 1  # the model is loaded once, shared by every client
    for c in clients:
        c.close()


def test_annotate_caption_draft_is_the_loaded_models_text(tiny_app, tmp_path, monkeypatch):
    """With a model loaded, 'Draft caption' in the app's Annotate tab returns what that model writes for
    the prompt built from the image's stored transcript plus the one typed now, and saving records it
    as the model's caption."""
    import numpy as np

    from annotate.audio import Audio
    from annotate.caption import NO_MODEL_STATUS, build_caption_prompt, clean_model_caption
    from annotate.store import Store
    from app import annotate_tab

    from annotate_helpers import make_images

    monkeypatch.setattr(annotate_tab, "CAPTION_MAX_NEW_TOKENS", 24)  # the in-process server reads it per call
    service, url = tiny_app
    project = tmp_path / "proj"
    make_images(project, 1)
    tone = Audio((0.2 * 32767 * np.sin(np.arange(61 * 16000) * 2 * np.pi * 220 / 16000)).astype(np.int16)
                 .reshape(-1, 1), 16000)  # 61 s: past the default 60 s minimum
    store = Store(project, annotations_per_image=2)
    store.save_annotation(store.next_image("bob").image_id, "bob", tone, "", "uh a red car, parked")
    client = make_client(url)
    assert client.predict("alice", str(project), api_name="/annotate_next")[1].startswith("**img_000.png**")
    caption, status = client.predict("a red car next to a tree", str(project), api_name="/annotate_draft_caption")
    prompt = build_caption_prompt(["uh a red car, parked", "a red car next to a tree"])
    expected = clean_model_caption(service.runner.generate(None, prompt, max_new_tokens=24))
    assert expected and caption == expected, (caption, expected)
    assert status == "Caption drafted from 2 transcripts; review and edit it." and status != NO_MODEL_STATUS

    wav = tmp_path / "tone.wav"
    import soundfile as sf

    sf.write(wav, tone.samples, 16000)
    status, _ = client.predict("alice", str(project), handle_file(str(wav)), "a red car next to a tree", caption,
                               api_name="/annotate_save")
    assert status.startswith("Saved annotation 2 for image 1"), status
    row = Store(project, sync=False).caption(1)
    assert (row["caption"], row["source"], row["model"]) == (expected, "model", service.runner.name)
    client.close()


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # raised inside Gradio's upload check
def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(tiny_app, images, tmp_path):
    _, url = tiny_app
    client = make_client(url)
    not_image = tmp_path / "notes.txt"
    not_image.write_text("definitely not a picture")
    with pytest.raises(AppError) as e:
        client.predict(handle_file(str(not_image)), "coins", api_name="/point")
    assert "not a readable image" in _error_text(e) and "Traceback" not in _error_text(e)

    for w, h in ((20000, 20000), (12000, 10000)):  # above PIL's bomb limit, and above ours only
        with pytest.raises(AppError) as e:
            client.predict(handle_file(str(png_header_only(tmp_path / f"huge_{w}.png", w, h))), "coins",
                           api_name="/count")
        assert "megapixels" in _error_text(e) or "too large" in _error_text(e), _error_text(e)

    with pytest.raises(AppError) as e:
        client.predict(handle_file(str(images[0])), "   ", api_name="/point")
    assert "empty" in _error_text(e)

    with pytest.raises(AppError) as e:
        client.predict(None, "coins", api_name="/count")
    assert "No image" in _error_text(e)

    with pytest.raises(AppError) as e:
        client.predict(handle_file(str(images[0])), "", api_name="/ask")
    assert "empty" in _error_text(e)

    answer, result = client.predict(handle_file(str(images[0])), "coins", api_name="/point")  # still serving
    assert result["task"] == "point"
    client.close()


def test_no_model_and_failed_load_then_recovery(tiny_checkpoint, images, tmp_path):
    service = MolmoService(device="cpu", limits=TEST_LIMITS)
    with running_app(service) as (_, url):
        client = make_client(url)
        with pytest.raises(AppError) as e:
            client.predict(handle_file(str(images[0])), "coins", api_name="/point")
        assert "No model loaded: choose a checkpoint in the Model panel" in _error_text(e)

        with pytest.raises(AppError) as e:
            client.predict(str(tmp_path / "no_such_folder"), "none (bf16 on GPU, fp32 on CPU)", 12,
                           api_name="/load_model")
        assert "Could not load" in _error_text(e) and "no_such_folder" in _error_text(e)
        with pytest.raises(AppError) as e:
            client.predict(handle_file(str(images[0])), api_name="/read_clock")
        assert "failed to load" in _error_text(e)

        markdown, status = client.predict(str(tiny_checkpoint), "none (bf16 on GPU, fp32 on CPU)", 6,
                                          api_name="/load_model")
        assert status["loaded"] and status["max_crops"] == 6 and "Model:" in markdown
        answer, result = client.predict(handle_file(str(images[0])), "coins", api_name="/point")
        assert result["task"] == "point"
        client.close()
    service.unload()


# ------------------------------------------------------------------------------------------ handlers


@pytest.fixture()
def scripted_handlers() -> Handlers:
    service = MolmoService(loader=scripted_loader)
    service.load("scripted", wait=True)
    return Handlers(service)


def test_render_points_draws_numbered_markers_and_badge(scripted_handlers, tmp_path):
    path = tmp_path / "white.png"
    Image.new("RGB", (200, 100), "white").save(path)
    answer, result = scripted_handlers.count(str(path), "coins")
    assert result["count"] == 3
    overlay, badge, table, download = scripted_handlers.render_points(str(path), result)
    assert overlay.size == (200, 100)
    assert overlay.getpixel((100, 50)) != (255, 255, 255)  # a marker at the 2nd point
    assert overlay.getpixel((100, 5)) == (255, 255, 255)  # untouched elsewhere
    assert any(overlay.getpixel((100 + dx, 50 + dy)) == PALETTE[0] for dx in range(-8, 9) for dy in range(-8, 9))
    assert badge == "### Count: 3 coins"
    assert table == [[1, "coins", 50.0, 50.0], [2, "coins", 100.0, 50.0], [3, "coins", 150.0, 50.0]]
    assert json.loads(Path(download).read_text())["count"] == 3


def test_render_clock_shows_the_time_and_a_face(scripted_handlers, tmp_path):
    path = tmp_path / "clock.png"
    Image.new("RGB", (64, 64), "white").save(path)
    answer, result = scripted_handlers.read_clock(str(path))
    big, face = scripted_handlers.render_clock(result)
    assert answer == "10:08" and big == "# 10:08" and face.size == (320, 320)
    big, face = scripted_handlers.render_clock({"time": None})
    assert "no valid time" in big and face is None


def test_handlers_turn_failures_into_gr_error(tmp_path):
    h = Handlers(MolmoService())
    with pytest.raises(gr.Error, match="No model loaded"):
        h.point(None, "x")
    with pytest.raises(gr.Error, match="Nothing to draw"):
        h.render_points(None, None)

    class Exploding(MolmoService):
        def read_clock(self, image):
            raise ZeroDivisionError("boom")

    with pytest.raises(gr.Error, match=r"Something went wrong on our side while reading the clock \(ref [0-9a-f]{8}\)"):
        Handlers(Exploding()).read_clock(None)


def test_small_helpers():
    assert count_markdown(None).startswith("### Count: ?")
    assert chat_messages([("q", 'See <point x="1.0" y="2.0" alt="a">a</point>')]) == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "See a"}]


# ------------------------------------------------------------------------------------------ launch.py


@pytest.mark.slow
def test_launch_py_starts_and_answers(tiny_checkpoint, images):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--model", str(tiny_checkpoint),
                             "--port", str(port), "--max-crops", "4"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "precision:" in line:
                break
        text = "".join(lines)
        assert f"http://127.0.0.1:{port}" in text and "model:" in text and "device: cpu" in text, text
        client = make_client(f"http://127.0.0.1:{port}/")
        for _ in range(100):  # the model loads in the background
            if client.predict(api_name="/status")[1]["loaded"]:
                break
            time.sleep(0.1)
        answer, result = client.predict(handle_file(str(images[0])), api_name="/read_clock")
        assert result["task"] == "read_clock"
        client.close()
    finally:
        proc.terminate()
        proc.wait(20)


def test_startup_rule_without_gpu_or_weights_gives_a_notice(monkeypatch, tmp_path):
    import launch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    choice = launch.choose_startup_model()
    assert choice.source is None and "No GPU found and no local weights" in choice.notice
    (tmp_path / "checkpoints" / "MolmoE-1B-0924").mkdir(parents=True)
    (tmp_path / "checkpoints" / "MolmoE-1B-0924" / "config.json").write_text("{}")
    choice = launch.choose_startup_model()
    assert choice.source == str(Path("checkpoints") / "MolmoE-1B-0924")


def test_cli_rejects_bad_auth():
    import launch

    with pytest.raises(SystemExit, match="user:password"):
        launch.main(model=None, auth="nopassword", block=False)
