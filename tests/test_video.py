"""Video with Molmo2 (app/video.py, app/video_tab.py): decoding and sampling as the processor samples, prompts,
colours per object, the annotated MP4 (frame count, marker colours at the parsed coordinates), the JSON export,
every refusal with the next request working, a real tiny Molmo2 end to end, and the tab's events through
gradio_client.

The clip is made here with OpenCV: 3 s at 10 fps, 128x96, a green square moving left to right along the middle
at x = 100 + 400 t (Molmo2's 0-1000 units), so the scripted tracking answer below sits on the square."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
import pytest
import torch

from app import video as V
from app.render import PALETTE
from app.video_tab import COUNT_HEADERS, POINT_HEADERS, create_video_tab
from molmo_core.errors import MolmoInputError
from molmo_core.molmo2.processing import Video, VideoSettings, sample_frame_indices, video_features

W, H, FPS, N_FRAMES = 128, 96, 10.0, 30
TRACK_ANSWER = '<tracks coords="0.0 1 100 500;1.0 1 500 500;2.0 1 900 500">square</tracks>'
COUNT_ANSWER = 'Counting the <points coords="0.0 1 100 500;1.0 2 500 500">squares</points> shows a total of 2.'
POINT_ANSWER = '<points coords="0.5 1 300 500 2 700 250">the square</points>'
BACKGROUND_BGR = (80, 30, 20)  # dark blue
SQUARE_BGR = (0, 200, 0)


def square_x(t: float) -> float:
    return 100 + 400 * t  # leaves the frame after t = 2.2 s


def make_clip(path: Path, frames: int = N_FRAMES, fps: float = FPS, size: tuple[int, int] = (W, H)) -> Path:
    """The moving-square clip (written with the app's own MP4 writer: H.264 / VP9, browser-playable)."""
    w, h = size
    writer, _ = V.open_writer(path, fps, (w, h))
    for i in range(frames):
        frame = np.full((h, w, 3), BACKGROUND_BGR, np.uint8)
        cx = int(round(square_x(i / fps) / 1000 * w))
        cv2.rectangle(frame, (cx - 9, h // 2 - 9), (cx + 9, h // 2 + 9), SQUARE_BGR, -1)
        writer.write(frame)
    writer.release()
    return path


def read_all(path) -> list[np.ndarray]:
    """Every frame of a video file as RGB."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


def color_at(frame: np.ndarray, x: float, y: float) -> np.ndarray:
    """Mean RGB of the 3x3 pixels around (x, y)."""
    cx, cy = int(round(x)), int(round(y))
    return frame[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(axis=0)


def near(color, expected, tol: float = 45) -> bool:
    return bool(np.abs(np.asarray(color, float) - np.asarray(expected, float)).max() <= tol)


class FakeProcessor:
    def __init__(self, video: VideoSettings = VideoSettings(), max_length: int | None = None):
        self.video = video
        self.max_length = max_length


class FakeRunner:
    """A Molmo2 stand-in with scripted answers per task (by the prompt's first word)."""

    family = "molmo2"
    name = "fake-molmo2"

    def __init__(self, processor: FakeProcessor | None = None, answers: dict | None = None):
        self.processor = processor
        self.answers = answers or {"Track": TRACK_ANSWER, "How": COUNT_ANSWER, "Point": POINT_ANSWER}
        self.calls: list[tuple] = []

    def generate(self, image, prompt, max_new_tokens=200, **kw):
        self.calls.append((image, prompt, max_new_tokens))
        return self.answers[prompt.split()[0]]


class V1Runner:
    family = "molmo"
    name = "tiny-molmo-v1"

    def generate(self, *a, **k):  # pragma: no cover - must never be reached
        raise AssertionError("a v1 model was asked about a video")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("video") / "square.mp4")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    d = tmp_path_factory.mktemp("bad")
    text = d / "notes.mp4"
    text.write_text("this is not a video at all\n" * 20)
    empty = d / "empty.mp4"
    empty.write_bytes(b"")
    zero = d / "zero_frames.mp4"
    writer, _ = V.open_writer(zero, FPS, (W, H))
    writer.release()  # a container with no frames
    still = d / "photo.png"
    Image.new("RGB", (W, H), "red").save(still)
    return {"text": text, "empty": empty, "zero": zero, "still": still}


# ---------------------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("processor, max_frames, max_fps", [
    (None, None, None),  # Molmo2's defaults: 64 frames at <= 2 fps -> 6 frames
    (None, 4, None),  # fewer frames
    (None, 64, 1.5),  # a lower rate
    (FakeProcessor(VideoSettings(num_frames=64, max_fps=30)), 64, 20),  # every frame (the clip is 10 fps)
    (FakeProcessor(VideoSettings(num_frames=16, max_fps=8)), 64, 30),  # clamped to the model's limits
])
def test_decode_and_sample_as_the_processor(clip, processor, max_frames, max_fps):
    runner = FakeRunner(processor)
    settings = V.sampling_settings(runner, max_frames, max_fps)
    lim_frames, lim_fps = V.model_limits(V.model_video_settings(runner))
    assert settings.num_frames <= lim_frames and settings.max_fps <= lim_fps
    sample = V.decode_sampled(clip, settings, V.model_video_settings(runner))
    assert (sample.info.frames, sample.info.fps, sample.info.width, sample.info.height) == (N_FRAMES, FPS, W, H)
    expected = sample_frame_indices(N_FRAMES, FPS, settings).numpy()
    assert sample.indices.tolist() == expected.tolist()
    everything = read_all(clip)
    assert len(everything) == N_FRAMES
    assert sample.frames.dtype == np.uint8 and sample.frames.shape == (len(expected), H, W, 3)
    assert all(np.array_equal(sample.frames[k], everything[i]) for k, i in enumerate(expected))
    # the processor keeps every handed-over frame and prints the timestamps computed here
    assert sample.kept.tolist() == list(range(len(expected)))
    feats = video_features(Video(sample.frames, sample.model_fps), V.model_video_settings(runner))
    assert feats.grid[0] == len(expected) and feats.timestamps == sample.timestamps
    # ... which are within one frame of the sampled frames' times in the clip
    assert np.allclose(sample.timestamps, expected / FPS, atol=1 / FPS + 1e-6)


def test_probe_and_info_text(clip):
    info = V.probe_video(clip)
    assert (info.frames, info.fps, info.width, info.height) == (N_FRAMES, FPS, W, H)
    text = V.info_markdown(info, V.sampling_settings(None), V.model_video_settings(None), loaded=False)
    assert "30 frames at 10.00 fps" in text and "**6 frames**" in text and "64 frames at <= 2 fps" in text


def test_prompts_per_task():
    assert V.video_prompt("point", " the   red car ") == "Point to the red car"
    assert V.video_prompt("count", "cars") == "How many cars are there?"
    assert V.video_prompt("track", "the square") == "Track the square"
    with pytest.raises(V.VideoError, match="Type what to point at"):
        V.video_prompt("track", "   ")
    with pytest.raises(V.VideoError, match="Unknown task"):
        V.video_prompt("segment", "cars")


def test_colours_are_stable_per_object_id():
    assert [V.object_color(i) for i in (1, 2, 9)] == [PALETTE[0], PALETTE[1], PALETTE[0]]
    base = np.zeros((H, W, 3), np.uint8)
    a = V.draw_markers(base, [(30, 30, 1), (90, 60, 2)])
    b = V.draw_markers(base, [(90, 60, 2), (30, 30, 1)], labels=False)
    for frame in (a, b):
        assert tuple(frame[30, 30]) == PALETTE[0] and tuple(frame[60, 90]) == PALETTE[1]
    assert not base.any()  # the input frame is not modified
    label, no_label = a[50:70, 100:128], b[50:70, 100:128]  # "id 2", white on black, right of the disc
    assert label.max() > 150 and (label[..., 0] == label[..., 2]).all() and not no_label.any()


def test_markers_follow_tracks_and_points_stay_on_their_frame(clip):
    sample = V.decode_sampled(clip, V.sampling_settings(None))
    result = V.parse_video_answer(TRACK_ANSWER + " " + POINT_ANSWER.replace("0.5 1", "0.5 7").replace(" 2 ", " 8 "),
                                  sample, "track", "the square")
    interval = sample.interval_s
    assert interval == pytest.approx(0.5)
    at = {t: {oid: (x, y) for x, y, oid in V.markers_at(result.points, t, interval)} for t in (0.0, 0.5, 1.0, 2.4, 2.9)}
    assert at[0.0][1] == pytest.approx((0.1 * W, 0.5 * H))
    assert at[0.5][1] == pytest.approx((0.3 * W, 0.5 * H))  # between two tracked frames: interpolated
    assert at[2.4] == {} and at[2.9] == {}  # after the last tracked frame
    assert set(at[0.5]) == {1, 7, 8} and 7 not in at[1.0] and 7 not in at[0.0]  # points only near their frame


# ---------------------------------------------------------------------------------------------- the whole path


def test_tracking_with_a_scripted_molmo2_gives_an_mp4_with_the_markers_on_the_square(clip):
    runner = FakeRunner()
    result = V.run_video_task(runner, clip, "track", "the square", max_new_tokens=64)
    (video, prompt, max_new), = runner.calls
    assert prompt == "Track the square" and max_new == 64
    assert isinstance(video, Video) and video.frames.shape == (6, H, W, 3) and video.fps == pytest.approx(2.0)
    assert V.points_rows(result) == [[0.0, 0, 12.8, 48.0, 1], [1.0, 10, 64.0, 48.0, 1], [2.0, 20, 115.2, 48.0, 1]]
    assert [r[2] for r in V.count_rows(result)] == [1, 0, 1, 0, 1, 0]
    assert result.count == 1 and result.objects == [1]

    meta = result.video_meta
    assert meta["codec"] in V.FOURCCS and meta["frames"] == N_FRAMES and meta["fps"] == pytest.approx(FPS)
    assert Path(result.video_path).suffix == ".mp4" and "molmo_studio" in result.video_path
    frames = read_all(result.video_path)
    assert len(frames) == N_FRAMES and frames[0].shape == (H, W, 3)
    for f, t in ((0, 0.0), (10, 1.0), (20, 2.0)):
        x, y = square_x(t) / 1000 * W, 500 / 1000 * H
        assert near(color_at(frames[f], x, y), PALETTE[0]), (f, color_at(frames[f], x, y))
    x_end = 900 / 1000 * W
    assert near(color_at(frames[27], x_end, H / 2), (20, 30, 80)), "no marker after the track ends"
    assert near(color_at(frames[5], 0.3 * W, H / 2), PALETTE[0]), "the track is interpolated between samples"

    saved = json.loads(Path(result.json_path).read_text())
    assert saved == json.loads(json.dumps(result.to_json()))
    assert saved["video"]["frames"] == N_FRAMES and saved["sampling"]["frames"] == [0, 5, 10, 15, 20, 25]
    assert [(p["time_s"], p["frame"], p["x"], p["y"], p["object_id"]) for p in saved["points"]] == \
        [(0.0, 0, 12.8, 48.0, 1), (1.0, 10, 64.0, 48.0, 1), (2.0, 20, 115.2, 48.0, 1)]
    assert "1 object tracked" in V.summary_markdown(result)


def test_count_and_point_tasks(clip):
    runner = FakeRunner()
    counted = V.run_video_task(runner, clip, "count", "squares", max_new_tokens=32, draw=False)
    assert counted.count == 2 and [p.object_id for p in counted.points] == [1, 2]
    assert [p.frame for p in counted.points] == [0, 10] and counted.video_path is None
    assert "Count: 2 squares" in V.summary_markdown(counted)
    pointed = V.run_video_task(runner, clip, "point", "the square", max_new_tokens=32)
    assert pointed.count == 2 and {p.frame for p in pointed.points} == {5}
    frame5 = read_all(pointed.video_path)[5]
    assert near(color_at(frame5, 0.3 * W, 0.5 * H), PALETTE[0]) and near(color_at(frame5, 0.7 * W, 0.25 * H), PALETTE[1])


def test_every_refusal_has_a_clear_message_and_the_next_request_works(clip, bad_files, tmp_path):
    runner = FakeRunner()
    cases = [
        (None, clip, {}, "No model is loaded. Video needs a Molmo2 model"),
        (V1Runner(), clip, {}, "is a Molmo v1 model, which reads single images only. Video needs a Molmo2"),
        (runner, bad_files["text"], {}, "notes.mp4 is not a video that can be read"),
        (runner, bad_files["empty"], {}, "empty.mp4 is empty (0 bytes)"),
        (runner, bad_files["zero"], {}, "zero_frames.mp4 is a video file without readable frames"),
        (runner, bad_files["still"], {}, "photo.png is a still image (PNG), not a video"),
        (runner, None, {}, "No video yet"),
        (runner, clip, {"image": np.zeros((8, 8, 3), np.uint8)}, "An image and a video were given together"),
        (FakeRunner(FakeProcessor(max_length=300)), clip, {}, "Too long for the model's context"),
    ]
    for who, path, extra, message in cases:
        with pytest.raises(MolmoInputError) as e:
            V.run_video_task(who, path, "track", "the square", max_new_tokens=64, **extra)
        assert message in str(e.value), str(e.value)
        ok = V.run_video_task(runner, clip, "track", "the square", max_new_tokens=64, draw=False)
        assert len(ok.points) == 3
    assert not any(c[0] is None for c in runner.calls)

    # too long: the message says how many frames fit, and that many do
    small = FakeRunner(FakeProcessor(max_length=300))
    with pytest.raises(V.VideoError, match=r"use fewer frames: at most (\d+)") as e:
        V.run_video_task(small, clip, "track", "the square", max_new_tokens=64)
    fit = int(e.value.args[0].split("at most ")[1].split()[0])
    assert 1 <= fit < 6
    assert len(V.run_video_task(small, clip, "track", "the square", fit, max_new_tokens=64, draw=False).clip.kept) == fit

    # a clip longer than MAX_DURATION_S, judged from the container before decoding
    long_clip = make_clip(tmp_path / "long.mp4", frames=12, fps=0.01)
    with pytest.raises(V.VideoError, match="min long"):
        V.run_video_task(runner, long_clip, "track", "the square")


def test_the_tab_handlers_turn_refusals_into_gr_errors(clip, bad_files):
    holder = {"runner": None}
    with gr.Blocks():
        tab = create_video_tab(lambda: holder["runner"])
    h = tab["handlers"]
    with pytest.raises(gr.Error, match="No model is loaded"):
        h["run"](clip, "the square", "track", 64, 2, 64)
    holder["runner"] = V1Runner()
    with pytest.raises(gr.Error, match="Molmo v1 model"):
        h["run"](str(clip), "the square", "track", 64, 2, 64)
    assert "**6 frames**" in h["info"](str(clip), 64, 2)  # info works without a Molmo2 model
    holder["runner"] = FakeRunner()
    with pytest.raises(gr.Error, match="not a video that can be read"):
        h["info"](str(bad_files["text"]), 64, 2)
    assert h["info"](None, 64, 2) == ""
    path, summary, answer, counts, points, json_path, result = h["run"](str(clip), "the square", "track", 64, 2, 64)
    assert answer == TRACK_ANSWER and len(points) == 3 and len(counts) == 6 and result["task"] == "track"
    assert Path(path).is_file() and Path(json_path).is_file()
    assert h["defaults"](str(clip))[:2] == (64, 2.0)


def test_every_event_of_the_tab_is_named_video_and_has_the_task_rule():
    from app.access import POLICY, TASKS, AccessControl, guard_events

    with gr.Blocks() as demo:
        create_video_tab(lambda: None)
    names = {fn.api_name for fn in demo.fns.values()}
    assert names == {"video_info", "video_defaults", "video_run", "video_run_submit"}
    guard_events(demo, POLICY, AccessControl())  # raises for an event without a rule
    assert {fn.fn._molmo_rule for fn in demo.fns.values()} == {TASKS}


# ---------------------------------------------------------------------------------------------- a real Molmo2


@pytest.fixture(scope="module")
def tiny_runner(tmp_path_factory):
    from molmo_core.molmo2 import load_molmo2
    from molmo_core.molmo2.tiny import write_tiny_molmo2

    path = write_tiny_molmo2(tmp_path_factory.mktemp("m2video") / "tiny-m2", "a")
    runner = load_molmo2(str(path), device="cpu")
    yield runner
    runner.close()


def test_a_tiny_molmo2_runs_the_whole_path(tiny_runner, clip):
    torch.manual_seed(0)
    assert tiny_runner.family == "molmo2" and V.context_length(tiny_runner) == 8192
    result = V.run_video_task(tiny_runner, clip, "track", "the square", max_new_tokens=24)
    assert isinstance(result.answer, str) and result.video_meta["frames"] == N_FRAMES
    assert len(read_all(result.video_path)) == N_FRAMES
    seen = set(result.clip.model_frames.tolist())
    assert all(p.frame in seen and 0 <= p.x <= W and 0 <= p.y <= H for p in result.points)
    saved = json.loads(Path(result.json_path).read_text())
    assert saved["answer"] == result.answer and saved["sampling"]["frames_seen"] == 6
    # the exact token count (the processor's own tokenizer) agrees with what the processor builds
    inputs = tiny_runner.process(result.clip.video(), result.prompt)
    assert inputs.length == result.tokens["frame_tokens"] + result.tokens["prompt_tokens"]
    assert inputs.timestamps == result.clip.timestamps

    # too long for this model's context: refused before generating, with the frames that fit
    saved_max = tiny_runner.processor.max_length
    tiny_runner.processor.max_length = 400
    try:
        with pytest.raises(V.VideoError, match="use fewer frames: at most 3"):
            V.run_video_task(tiny_runner, clip, "track", "the square", max_new_tokens=24, draw=False)
    finally:
        tiny_runner.processor.max_length = saved_max
    # images and a video in one request: the processor refuses too
    with pytest.raises(MolmoInputError, match="either images or one video"):
        tiny_runner.processor("Track the square", images=[np.zeros((32, 32, 3), np.uint8)], video=result.clip.video())


# ---------------------------------------------------------------------------------------------- gradio_client


def test_the_video_events_through_gradio_client(clip, bad_files):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from app_helpers import free_port, make_client

    holder = {"runner": FakeRunner()}
    with gr.Blocks(analytics_enabled=False) as demo:
        create_video_tab(lambda: holder["runner"])
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = make_client(url)
        names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
        assert {"/video_info", "/video_defaults", "/video_run"} <= names
        assert all(n.startswith("/video_") for n in names)
        clip_file = handle_file(str(clip))
        assert "**6 frames**" in client.predict(clip_file, 64, 2, api_name="/video_info")
        frames, fps, text = client.predict(clip_file, api_name="/video_defaults")
        assert (frames, fps) == (64, 2) and "**6 frames**" in text

        video, summary, answer, counts, points, download, result = client.predict(
            clip_file, "the square", "track", 64, 2, 64, api_name="/video_run")
        assert answer == TRACK_ANSWER and "1 object tracked" in summary
        assert counts["headers"] == COUNT_HEADERS and [r[2] for r in counts["data"]] == [1, 0, 1, 0, 1, 0]
        assert points["headers"] == POINT_HEADERS and [r[1] for r in points["data"]] == [0, 10, 20]
        frames_out = read_all(video["path"])
        assert len(frames_out) == N_FRAMES
        assert near(color_at(frames_out[10], 0.5 * W, 0.5 * H), PALETTE[0])
        assert json.loads(Path(download["path"]).read_text())["points"] == result["points"]

        for bad, message in ((bad_files["text"], "not a video that can be read"),
                             (bad_files["zero"], "without readable frames"),
                             (bad_files["still"], "still image")):
            with pytest.raises(AppError, match=message):
                client.predict(handle_file(str(bad)), "the square", "track", 64, 2, 64, api_name="/video_run")
        holder["runner"] = V1Runner()
        with pytest.raises(AppError, match="Video needs a Molmo2 model"):
            client.predict(clip_file, "the square", "track", 64, 2, 64, api_name="/video_run")
        holder["runner"] = FakeRunner()
        *_, result = client.predict(clip_file, "squares", "count", 64, 2, 64, api_name="/video_run")
        assert result["count"] == 2
        client.close()
    finally:
        demo.close()
