"""The Video tab (Molmo2): upload a clip, see how many frames the model will see, point / count / track.

Layout and thin handlers only; the work is in `app/video.py`. Events (all callable through gradio_client,
all behind the "video_*" rule of `app.access.POLICY`):

    /video_info       (clip, max frames, max fps) -> markdown: frames, fps, size, the frames the model will see
    /video_defaults   (clip) -> max frames, max fps (the loaded model's), and the info again
    /video_run        (clip, phrase, task, max frames, max fps, max new tokens) -> annotated MP4, summary, raw
                      answer, per-frame counts, points table, JSON file, parsed result
    /video_run_submit the same, from Enter in the phrase box (undocumented in the API page)

Wire it into a Blocks with `create_video_tab(service.get_runner)` inside a `gr.Tab`.
"""

from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from .handlers import user_errors
from .video import (DEFAULT_MAX_FPS, DEFAULT_MAX_FRAMES, HARD_MAX_FPS, HARD_MAX_FRAMES, TASKS, count_rows,
                    info_markdown, model_limits, model_video_settings, points_rows, probe_video, run_video_task,
                    sampling_settings, summary_markdown)

COUNT_HEADERS = ["time (s)", "frame", "count"]
POINT_HEADERS = ["time (s)", "frame", "x (px)", "y (px)", "object id"]
TASK_LABELS = [("point", "point"), ("count", "count"), ("track", "track")]
DEFAULT_MAX_NEW_TOKENS = 1024
INTRO = ("Upload a short clip and ask Molmo2 to **point** at, **count** or **track** something in it. The model "
         "sees a sample of the frames (Molmo2: at most 64 frames at <= 2 per second); the annotated video shows "
         "every frame with one colour per object. Video needs a Molmo2 model (e.g. allenai/Molmo2-4B).")


def _path(video: Any) -> str | None:
    """gr.Video's value (a path) or a {"path"/"video"} payload from an API caller -> a path or None."""
    if video is None:
        return None
    if isinstance(video, dict):
        inner = video.get("video", video)
        video = inner.get("path") if isinstance(inner, dict) else inner
    return str(video) if video else None


def _is_molmo2(runner: Any) -> bool:
    return runner is not None and getattr(runner, "family", "molmo") == "molmo2"


def create_video_tab(get_runner: Callable[[], Any]) -> dict:
    """Build the Video tab in the current Blocks context (call it inside `with gr.Tab(...)`).

    Args:
        get_runner: returns the loaded runner, or None (e.g. `MolmoService.get_runner`).

    Returns:
        The components by name and the handlers ("handlers": {"info", "defaults", "run"}), for tests and
        for wiring other events to them.
    """

    def model_runner() -> Any:
        runner = get_runner()
        return runner if _is_molmo2(runner) else None  # a v1 model's settings are not video settings

    start_frames, start_fps = model_limits(model_video_settings(model_runner()))

    @user_errors("reading the video")
    def info(video: Any, max_frames: float, max_fps: float) -> str:
        path = _path(video)
        if path is None:
            return ""
        runner = model_runner()
        settings = sampling_settings(runner, max_frames, max_fps)
        return info_markdown(probe_video(path), settings, model_video_settings(runner), runner is not None)

    @user_errors("reading the model's video settings")
    def defaults(video: Any) -> tuple[float, float, str]:
        frames, fps = model_limits(model_video_settings(model_runner()))
        return frames, fps, info(video, frames, fps)

    @user_errors("running the video task")
    def run(video: Any, phrase: str, task: str, max_frames: float, max_fps: float, max_new_tokens: float,
            progress: gr.Progress = gr.Progress()) -> tuple:
        result = run_video_task(get_runner(), _path(video), task or "track", phrase or "", max_frames, max_fps,
                                int(max_new_tokens or DEFAULT_MAX_NEW_TOKENS),
                                progress=lambda f, m: progress(f, desc=m))
        return (result.video_path, summary_markdown(result), result.answer, count_rows(result),
                points_rows(result), result.json_path, result.to_json())

    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column():
            video = gr.Video(label="Clip", sources=["upload"], elem_id="video_input", height=320)
            info_md = gr.Markdown("", elem_id="video_info")
            with gr.Row():
                max_frames = gr.Slider(1, HARD_MAX_FRAMES, value=start_frames or DEFAULT_MAX_FRAMES, step=1,
                                       label="Max frames the model sees", elem_id="video_max_frames")
                max_fps = gr.Slider(0.1, HARD_MAX_FPS, value=start_fps or DEFAULT_MAX_FPS, step=0.1,
                                    label="Max frames per second", elem_id="video_max_fps")
            defaults_btn = gr.Button("Use the model's frame settings", size="sm", elem_id="video_defaults")
            phrase = gr.Textbox(label="What to point at / count / track", placeholder="e.g. the red car",
                                elem_id="video_phrase")
            task = gr.Radio(TASK_LABELS, value="track", label="Task", elem_id="video_task")
            max_new_tokens = gr.Slider(16, 4096, value=DEFAULT_MAX_NEW_TOKENS, step=16, label="Max new tokens",
                                       elem_id="video_max_new_tokens")
            run_btn = gr.Button("Run", variant="primary", elem_id="video_run")
        with gr.Column():
            video_out = gr.Video(label="Annotated clip", interactive=False, elem_id="video_output", height=320,
                                 loop=True)
            summary = gr.Markdown("", elem_id="video_summary")
            answer = gr.Textbox(label="Model answer (raw)", interactive=False, lines=3, elem_id="video_answer")
    with gr.Row():
        counts = gr.Dataframe(headers=COUNT_HEADERS, datatype=["number", "number", "number"], interactive=False,
                              label="Per frame the model saw", elem_id="video_counts")
        points = gr.Dataframe(headers=POINT_HEADERS, datatype=["number"] * 5, interactive=False,
                              label="Points in pixels of the clip", elem_id="video_points")
    with gr.Row():
        download = gr.File(label="Download the result (JSON)", interactive=False, elem_id="video_download")
        with gr.Accordion("Parsed result (JSON)", open=False):
            result_json = gr.JSON(elem_id="video_json")

    gr.on([video.change, max_frames.release, max_fps.release], info, [video, max_frames, max_fps], info_md,
          api_name="video_info", show_progress="minimal")
    defaults_btn.click(defaults, [video], [max_frames, max_fps, info_md], api_name="video_defaults")
    run_inputs = [video, phrase, task, max_frames, max_fps, max_new_tokens]
    run_outputs = [video_out, summary, answer, counts, points, download, result_json]
    run_btn.click(run, run_inputs, run_outputs, api_name="video_run", concurrency_limit=1, concurrency_id="video_run")
    phrase.submit(run, run_inputs, run_outputs, api_name="video_run_submit", api_visibility="undocumented",
                  concurrency_limit=1, concurrency_id="video_run")
    return {"video": video, "info": info_md, "max_frames": max_frames, "max_fps": max_fps, "defaults": defaults_btn,
            "phrase": phrase, "task": task, "max_new_tokens": max_new_tokens, "run": run_btn,
            "video_out": video_out, "summary": summary, "answer": answer, "counts": counts, "points": points,
            "download": download, "result": result_json,
            "handlers": {"info": info, "defaults": defaults, "run": run}}


__all__ = ["create_video_tab", "COUNT_HEADERS", "POINT_HEADERS", "TASKS"]
