"""Parity: our Molmo2 preprocessing (no torchvision) against transformers' own Molmo2Processor, and the model
given our inputs against transformers' processor + model + generate.

The reference processor runs in a subprocess (tests/molmo2_reference.py) with the test-only torchvision from
.ref/torchvision on PYTHONPATH (scripts/setup.sh --test installs it; it is never installed into .venv). It
loads the tiny checkpoints with `AutoProcessor.from_pretrained` and writes its tensors per case; the tests
compute ours in this process and compare key by key: same keys, dtypes and shapes, integer tensors equal,
pixel values within 1e-6 (they come out bit-identical). transformers' model needs no torchvision, so the
reference chain's model half (`Molmo2ForConditionalGeneration.from_pretrained` + `generate` on the reference
inputs) runs here: logits within 1e-4 (fp32, CPU) and the same greedy tokens as our loader + runner.

Ours is computed while the reference subprocess runs. Both sides preprocess with one torch thread: torch's
float bilinear interpolation is not bit-stable across thread counts (1-ulp differences flip a few x.5
roundings to the next uint8 level, 1/127.5 after normalization), for transformers' processor as for ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from molmo_core.molmo2.processing import Video

# one torch thread (conftest's one_thread): the tiny models gain nothing from two, and on two shared cores an
# oversubscribed second thread made these tests up to 10x slower
pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[1]
REF_TORCHVISION = ROOT / ".ref" / "torchvision"
PIXEL_TOL = 1e-6
LOGIT_TOL = 1e-4
# One torch thread on both sides: results do not depend on the machine's core count, and the two processes
# run side by side on two cores without oversubscribing them.
REF_THREADS = 1
MODEL_KEYS = ("rendered", "seconds")  # reference entries that are not processor outputs


# ----------------------------------------------------------------------------------------- inputs
# (name, width, height, mode, content)
IMAGES = [
    ("tiny_1x1", 1, 1, "RGB", "noise"),
    ("tiny_2x3", 2, 3, "RGB", "noise"),
    ("tiny_13x7", 13, 7, "RGB", "noise"),
    ("patch_14x14", 14, 14, "RGB", "noise"),
    ("small_100x60", 100, 60, "RGB", "blocks"),
    ("odd_123x457", 123, 457, "RGB", "noise"),
    ("crop_378x378", 378, 378, "RGB", "noise"),
    ("canvas_644x644", 644, 644, "RGB", "gradient"),
    ("vga_640x480", 640, 480, "RGB", "blocks"),
    ("odd_1000x700", 1000, 700, "RGB", "noise"),
    ("hd_1280x720", 1280, 720, "RGB", "gradient"),
    ("square_800x800", 800, 800, "RGB", "noise"),
    ("wide_1000x20", 1000, 20, "RGB", "noise"),
    ("very_wide_3000x40", 3000, 40, "RGB", "gradient"),
    ("pano_2400x300", 2400, 300, "RGB", "blocks"),
    ("tall_30x1500", 30, 1500, "RGB", "noise"),
    ("tall_200x1100", 200, 1100, "RGB", "gradient"),
    ("rgba_300x200", 300, 200, "RGBA", "noise"),
    ("rgba_cutout_50x400", 50, 400, "RGBA", "cutout"),
    ("l_256x256", 256, 256, "L", "noise"),
    ("la_100x90", 100, 90, "LA", "noise"),
    ("p_200x150", 200, 150, "P", "noise"),
    ("p_transparent_120x80", 120, 80, "P", "transparent"),
    ("cmyk_90x160", 90, 160, "CMYK", "noise"),
    ("bilevel_64x48", 64, 48, "1", "noise"),
    ("i16_70x50", 70, 50, "I;16", "noise"),
]
# MOLMO2_PARITY_EXTRA=N adds N random images (random size up to 2000 px, random mode) at both sizes: the
# exhaustive variant, not part of the default run.
EXTRA = int(os.environ.get("MOLMO2_PARITY_EXTRA", "0"))
MODES = ("RGB", "RGB", "RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I;16")
# Size a has the real 378-px geometry and up to 9 crops of 1.7 MB per image: a subset that still covers every
# kind of tiling (1x1, 2x1, 2x2, 2x4, 1x8, 4x1, sides shorter than the 112-px margins); size b (224 px) gets all.
SIZE_A_IMAGES = {"tiny_1x1", "tiny_2x3", "tiny_13x7", "patch_14x14", "odd_123x457", "crop_378x378", "canvas_644x644",
                 "vga_640x480", "odd_1000x700", "very_wide_3000x40", "tall_30x1500", "pano_2400x300",
                 "tall_200x1100", "rgba_cutout_50x400", "l_256x256"}
# (name, frames, height, width, fps): sampling at <= 2 fps, the frame cap, a non-integer rate, 1 fps
VIDEOS = {
    "a": [("v9_2fps", 9, 48, 64, 2.0), ("v19_7.5fps", 19, 50, 70, 7.5), ("v5_60fps", 5, 30, 20, 60.0)],
    "b": [("v3_30fps", 3, 40, 30, 30.0), ("v200_24fps", 200, 36, 48, 24.0), ("v100_29.97fps", 100, 20, 90, 29.97),
          ("v25_1fps", 25, 30, 30, 1.0), ("v70_cap", 70, 8, 8, 2.0)],
}


def make_image(w: int, h: int, mode: str, content: str, rng: np.random.Generator) -> Image.Image:
    if content == "gradient":
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)
    elif content == "blocks":
        rgb = np.kron(rng.integers(0, 256, (h // 7 + 1, w // 7 + 1, 3)), np.ones((7, 7, 1)))[:h, :w].astype(np.uint8)
    else:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
        if content == "cutout":
            alpha[:, : w // 2] = 0
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    img = Image.fromarray(rgb, "RGB")
    if mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        if content == "transparent":
            img.info["transparency"] = 3
        return img
    if mode == "LA":
        return Image.fromarray(np.dstack([rgb[..., 0], rng.integers(0, 256, (h, w), dtype=np.uint8)]), "LA")
    if mode == "I;16":
        return Image.fromarray((rgb[..., 0].astype(np.uint16) * 257), "I;16")
    return img.convert(mode)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Image files (PNG; TIFF for CMYK) and video .npy files, the same bytes for both sides."""
    root = tmp_path_factory.mktemp("m2media")
    rng = np.random.default_rng(20240611)
    images = {}
    for name, w, h, mode, content in IMAGES:
        path = root / (name + (".tiff" if mode == "CMYK" else ".png"))
        img = make_image(w, h, mode, content, rng)
        img.save(path, **({"transparency": img.info["transparency"]} if "transparency" in img.info else {}))
        images[name] = str(path)
    extra = np.random.default_rng(EXTRA)
    for k in range(EXTRA):
        w, h = (int(v) for v in np.exp(extra.uniform(0, np.log(2000), 2)))
        mode, content = MODES[k % len(MODES)], ("noise", "gradient", "blocks")[k % 3]
        path = root / f"extra_{k}_{w}x{h}_{mode.replace(';', '')}" f"{'.tiff' if mode == 'CMYK' else '.png'}"
        make_image(w, h, mode, content, rng).save(path)
        images[path.stem] = str(path)
    videos = {}
    for size, vids in VIDEOS.items():
        for name, t, h, w, fps in vids:
            frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
            path = root / f"{name}.npy"
            np.save(path, frames)
            videos[name] = {"npy": str(path), "fps": fps}
    frames = rng.integers(0, 256, (8, 24, 32, 3), dtype=np.uint8)  # 4 frames after sampling, for the model cases
    np.save(root / "model_video.npy", frames)
    videos["model_video"] = {"npy": str(root / "model_video.npy"), "fps": 4.0}
    return images, videos


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from molmo_core.molmo2.tiny import write_tiny_molmo2

    root = tmp_path_factory.mktemp("m2ckpt")
    paths = {s: str(write_tiny_molmo2(root / s, s)) for s in ("a", "b")}
    # b with a video config that does not set do_rescale / do_normalize (see the last test)
    silent = root / "b-silent"
    shutil.copytree(paths["b"], silent)
    cfg = json.loads((silent / "processor_config.json").read_text())
    for k in ("do_rescale", "do_normalize"):
        del cfg["video_processor"][k]
    (silent / "processor_config.json").write_text(json.dumps(cfg))
    return {**paths, "b-silent": str(silent)}


def build_cases(ckpts: dict, media) -> list[dict]:
    images, videos = media
    cases = [dict(name="b-silent-video", group="silent", size="b-silent", checkpoint=ckpts["b-silent"],
                  prompt="What?", video=videos["v3_30fps"])]
    for size in ("a", "b"):
        ck = ckpts[size]
        for name in images:
            if size == "a" and name not in SIZE_A_IMAGES and not name.startswith("extra_"):
                continue
            cases.append(dict(name=f"{size}-one-{name}", group="one", size=size, checkpoint=ck,
                              prompt="Point to the brightest spot.", images=[images[name]]))
        sets = [["vga_640x480", "tiny_13x7", "very_wide_3000x40"], ["rgba_300x200", "l_256x256", "p_200x150"],
                ["tall_30x1500", "crop_378x378", "tall_30x1500"]]
        for k, names in enumerate(sets):
            cases.append(dict(name=f"{size}-three-{k}", group="three", size=size, checkpoint=ck,
                              prompt="Which image shows more red?", images=[images[n] for n in names]))
        for name, *_ in VIDEOS[size]:
            cases.append(dict(name=f"{size}-video-{name}", group="video", size=size, checkpoint=ck,
                              prompt="What happens in this video?", video=videos[name]))
        # prompts: history, raw template, text only, max_crops overrides
        cases += [
            dict(name=f"{size}-prompt-history", group="prompt", size=size, checkpoint=ck, prompt="And now?",
                 history=[["How many dogs?", "There are 2."], ["Point to them.", '<points coords="1 1 100 200">']],
                 images=[images["odd_123x457"]]),
            dict(name=f"{size}-prompt-raw", group="prompt", size=size, checkpoint=ck, prompt=" long_caption 65:",
                 images=[images["small_100x60"]], template="none"),
            dict(name=f"{size}-prompt-text", group="prompt", size=size, checkpoint=ck,
                 prompt="Write one sentence about clocks. Ünïcödé ✓", history=[["hi", "hello"]]),
            dict(name=f"{size}-prompt-crops2", group="prompt", size=size, checkpoint=ck, prompt="Count the boats.",
                 images=[images["hd_1280x720"]], max_crops=2),
            dict(name=f"{size}-prompt-crops12", group="prompt", size=size, checkpoint=ck, prompt="Count the boats.",
                 images=[images["pano_2400x300"]], max_crops=12),
        ]
        # the model, on our inputs vs on transformers' inputs
        # (small inputs: the processor cases above cover the large ones; these cover the model given them)
        model_cases = [
            dict(prompt="Point to the cat.", images=[images["odd_123x457"]]),
            dict(prompt="Compare them.", images=[images["small_100x60"], images["rgba_cutout_50x400"],
                                                 images["tiny_13x7"]], history=[["First?", "A boat."]]),
            dict(prompt="What happens?", video=videos["model_video"]),
            dict(prompt="Tell me a story.", history=[["hi", "hello"]]),
        ]
        for k, extra in enumerate(model_cases):
            cases.append(dict(name=f"{size}-model-{k}", group="model", size=size, checkpoint=ck,
                              max_new_tokens=8, **extra))
    return cases


@pytest.fixture(scope="module")
def runners(ckpts):
    from molmo_core.molmo2 import load_molmo2

    return {s: load_molmo2(ckpts[s], device="cpu") for s in ("a", "b")}  # tiny: no close() (a gc pass each)


@contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def ours(runner, case: dict):
    """Our processor on a case, single-threaded like the reference subprocess."""
    with threads(REF_THREADS):
        return _ours(runner, case)


def _ours(runner, case: dict):
    images = [Image.open(p) for p in case.get("images", [])]
    video = case.get("video")
    video = Video(np.load(video["npy"]), video["fps"]) if video else None
    return runner.processor(case["prompt"], images=images or None, video=video,
                            history=[tuple(t) for t in case.get("history", [])], max_crops=case.get("max_crops"),
                            template=case.get("template", "role"))


@pytest.fixture(scope="module")
def reference(ckpts, media, runners, tmp_path_factory):
    """Run transformers' processor on every case in one subprocess (tests/molmo2_reference.py) and, while it
    runs, ours on the same cases in this process (both with the same thread count); returns the cases and
    the folders of per-case results."""
    if not (REF_TORCHVISION / "torchvision").is_dir():
        pytest.skip(f"the test-only torchvision is not in {REF_TORCHVISION}: run `scripts/setup.sh --test` "
                    "(it installs torchvision==0.28.0 there with --no-deps --target, never into .venv)")
    cases = build_cases(ckpts, media)
    out = tmp_path_factory.mktemp("m2ref")
    mine = out / "ours"
    mine.mkdir()
    spec = out / "spec.json"
    spec.write_text(json.dumps({"cases": cases, "threads": REF_THREADS}))
    env = dict(os.environ, PYTHONPATH=str(REF_TORCHVISION), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = out / "reference.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "molmo2_reference.py"), str(spec), str(out)],
                                env=env, cwd=str(out), stdout=err, stderr=subprocess.STDOUT)
        try:
            for case in cases:
                if case["size"] in runners:
                    x = ours(runners[case["size"]], case)
                    torch.save({"tensors": x.tensors, "prompt": x.prompt, "text": x.text,
                                "timestamps": x.timestamps}, mine / f"{case['name']}.pt")
        finally:
            rc = proc.wait(timeout=600)
    assert rc == 0, f"reference subprocess failed:\n{log.read_text()[-4000:]}"
    done = json.loads((out / "done.json").read_text())
    assert done == {"cases": len(cases), "processor": "Molmo2Processor"}
    return {"cases": cases, "dir": out, "ours": mine}


def load_ref(reference, case) -> dict:
    return torch.load(reference["dir"] / f"{case['name']}.pt", weights_only=False)


def compare(mine: dict, ref: dict) -> dict[str, float]:
    """Same keys, dtypes, shapes; integers equal; floats within PIXEL_TOL. Returns the max |diff| per float key.
    Raises AssertionError naming the first difference."""
    ref_keys = {k for k in ref if k not in MODEL_KEYS}
    assert set(mine) == ref_keys, f"keys differ: ours-only {set(mine) - ref_keys}, ref-only {ref_keys - set(mine)}"
    diffs = {}
    for k in sorted(ref_keys):
        a, b = mine[k], ref[k]
        assert a.dtype == b.dtype, f"{k}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if a.dtype.is_floating_point:
            d = 0.0 if torch.equal(a, b) else float((a.double() - b.double()).abs().max())
            assert d <= PIXEL_TOL, f"{k}: max |diff| {d:.3g} > {PIXEL_TOL}"
            diffs[k] = d
        else:
            bad = (a != b).nonzero()
            assert len(bad) == 0, f"{k}: {len(bad)} element(s) differ, first at {bad[0].tolist()}"
    return diffs


def check_group(reference, runners, group: str, size: str) -> list[dict]:
    results, failures = [], []
    for case in reference["cases"]:
        if case["group"] != group or case["size"] != size:
            continue
        x = torch.load(reference["ours"] / f"{case['name']}.pt", weights_only=False)
        ref = load_ref(reference, case)
        try:
            results.append({"case": case["name"], **compare(x["tensors"], ref), "prompt": x["prompt"],
                            "text": x["text"], "timestamps": x["timestamps"], "rendered": ref["rendered"],
                            "frames": int(ref["video_grids"][0, 0]) if "video_grids" in ref else None})
        except AssertionError as e:
            failures.append(f"{case['name']}: {e}")
    assert results or failures, f"no {group} cases for size {size}"
    assert not failures, "\n".join(failures)
    worst = {k: max(r.get(k, 0.0) for r in results) for k in ("pixel_values", "pixel_values_videos")
             if any(k in r for r in results)}
    print(f"{group}[{size}]: {len(results)} cases equal; max |diff| {worst}")  # shown with pytest -s
    return results


# ----------------------------------------------------------------------------------------- processor parity
@pytest.mark.parametrize("size", ["a", "b"])
def test_single_images_match_transformers_processor(reference, runners, size):
    results = check_group(reference, runners, "one", size)
    assert len(results) == (len(SIZE_A_IMAGES) if size == "a" else len(IMAGES)) + EXTRA
    assert max(r["pixel_values"] for r in results) <= PIXEL_TOL


@pytest.mark.parametrize("size", ["a", "b"])
def test_three_images_match_transformers_processor(reference, runners, size):
    results = check_group(reference, runners, "three", size)
    assert len(results) == 3


# the sampled frames and the last timestamp written into the prompt: 9 frames at 2 fps: all; 70 at 2 fps: capped
# by num_frames (16 for size b); 200 at 24 fps: 2 per second up to the cap; 3 or 5 frames at 30 / 60 fps: 1
VIDEO_EXPECT = {"a-video-v9_2fps": (9, "4.0"), "a-video-v5_60fps": (1, "0.0"), "b-video-v70_cap": (16, "32.5"),
                "b-video-v200_24fps": (16, "7.8"), "b-video-v3_30fps": (1, "0.0")}


@pytest.mark.parametrize("size", ["a", "b"])
def test_videos_match_transformers_processor(reference, runners, size):
    results = check_group(reference, runners, "video", size)
    assert len(results) == len(VIDEOS[size])
    assert all("pixel_values_videos" in r for r in results)
    for r in results:
        assert len(r["timestamps"]) == r["frames"] == r["text"].count("<frame_start>")
        assert r["timestamps"] == sorted(r["timestamps"])
        if r["case"] in VIDEO_EXPECT:
            frames, last = VIDEO_EXPECT[r["case"]]
            assert (r["frames"], f"{r['timestamps'][-1]:.1f}") == (frames, last)
            assert r["text"].count(f"{last} <frame_start>") >= 1


@pytest.mark.parametrize("size", ["a", "b"])
def test_prompts_history_raw_text_only_and_max_crops_match(reference, runners, size):
    """Also the prompt before expansion: bos + the chat template as transformers renders it."""
    bos = runners[size].processor.bos
    for r in check_group(reference, runners, "prompt", size):
        assert r["prompt"] == (r["rendered"] if r["rendered"].startswith(bos) else bos + r["rendered"])


# ----------------------------------------------------------------------------------------- model parity
@pytest.fixture(scope="module")
def reference_models(ckpts):
    """transformers' model loaded plainly (`from_pretrained`, fp32), independent of our loader; it needs no
    torchvision, so it runs here on the reference inputs."""
    from transformers import Molmo2ForConditionalGeneration

    return {s: Molmo2ForConditionalGeneration.from_pretrained(ckpts[s], dtype=torch.float32).eval() for s in "ab"}


@pytest.mark.parametrize("size", ["a", "b"])
def test_model_logits_and_greedy_tokens_match(reference, runners, reference_models, size):
    """Our inputs through our loader's model vs transformers' processor -> transformers' model -> `generate`
    (fp32, CPU): logits within 1e-4, and the same greedy answer through our `generate_ids` and through the
    streaming `generate`."""
    runner, ref_model = runners[size], reference_models[size]
    cases = [c for c in reference["cases"] if c["group"] == "model" and c["size"] == size]
    assert len(cases) == 4
    worst = 0.0
    for case in cases:
        x = ours(runner, case)
        ref = load_ref(reference, case)
        compare(x.tensors, ref)
        ref_inputs = {k: v for k, v in ref.items() if k not in MODEL_KEYS}
        with torch.inference_mode():
            ref_logits = ref_model(**ref_inputs).logits[0]
            gen = ref_model.generate(**ref_inputs, max_new_tokens=case["max_new_tokens"], do_sample=False)
            logits = runner.model(**x.tensors).logits[0]
        d = float((logits - ref_logits).abs().max())
        worst = max(worst, d)
        assert d <= LOGIT_TOL, f"{case['name']}: max |logit diff| {d:.3g}"
        want = gen[0, ref["input_ids"].shape[1]:].tolist()
        want = want[:next((k for k, t in enumerate(want) if t in runner.eos_ids), len(want))]
        assert runner.generate_ids(x, case["max_new_tokens"]) == want, case["name"]
        if case["name"].endswith(("-1", "-3")):
            continue  # the streaming path once with images and once with a video is enough
        image = ([Image.open(p) for p in case["images"]] if case.get("images") else
                 Video(np.load(case["video"]["npy"]), case["video"]["fps"]) if case.get("video") else None)
        text = runner.generate(image, case["prompt"], history=[tuple(t) for t in case.get("history", [])],
                               max_new_tokens=case["max_new_tokens"])
        assert text == runner.tokenizer.decode(want, skip_special_tokens=True).strip(), case["name"]
    print(f"model[{size}]: {len(cases)} cases, max |logit diff| {worst:.3g}, same greedy tokens")
    assert worst <= LOGIT_TOL


# ----------------------------------------------------------------------------------------- the tests can fail
def test_comparison_catches_small_differences(reference, runners):
    """compare() fails on a 1e-5 change of one pixel value, a changed pooling index, one changed token."""
    case = next(c for c in reference["cases"] if c["name"] == "a-three-0")
    x = ours(runners["a"], case).tensors
    ref = load_ref(reference, case)
    compare(x, ref)
    for key, change in [("pixel_values", lambda t: t.view(-1)[12345].add_(1e-5)),
                        ("image_token_pooling", lambda t: t.__setitem__([3, 4], t[[4, 3]].clone())),
                        ("input_ids", lambda t: t[0, 7].add_(1)),
                        ("image_grids", lambda t: t[1, 2].add_(1))]:
        bad = {k: v.clone() for k, v in x.items()}
        change(bad[key])
        with pytest.raises(AssertionError, match=key):
            compare(bad, ref)


def test_wrong_resize_or_layout_would_be_caught(reference, runners, reference_models, monkeypatch):
    """Plausible wrong implementations differ measurably: an antialiased resize moves pixel values far beyond
    the tolerance, and the model's logits (not only the inputs) react to such a change far beyond 1e-4."""
    import molmo_core.molmo2.processing as P

    case = next(c for c in reference["cases"] if c["name"] == "a-model-0")
    ref = load_ref(reference, case)
    real = P.F.interpolate

    def antialiased(x, **kw):
        return real(x, **dict(kw, antialias=True))

    monkeypatch.setattr(P.F, "interpolate", antialiased)
    x = ours(runners["a"], case)
    monkeypatch.setattr(P.F, "interpolate", real)
    d_pix = float((x["pixel_values"] - ref["pixel_values"]).abs().max())
    assert d_pix > 100 * PIXEL_TOL
    with torch.inference_mode():
        logits = runners["a"].model(**x.tensors).logits[0]
        ref_logits = reference_models["a"](**{k: v for k, v in ref.items() if k not in MODEL_KEYS}).logits[0]
    assert float((logits - ref_logits).abs().max()) > 10 * LOGIT_TOL
    with pytest.raises(AssertionError, match="pixel_values"):
        compare(x.tensors, ref)


def test_reference_video_config_without_normalize_gives_raw_frames(reference, ckpts):
    """The one deliberate difference (processing.VideoSettings): a checkpoint whose video config does not set
    do_rescale / do_normalize gets raw 0-255 frames from transformers 5.23; ours normalizes them like images.
    Same pixels otherwise: ref == ours * 127.5 + 127.5 exactly, same tokens."""
    from molmo_core.molmo2.processing import Molmo2Preprocessor

    case = next(c for c in reference["cases"] if c["group"] == "silent")
    ref = load_ref(reference, case)
    assert ref["pixel_values_videos"].dtype == torch.uint8
    x = ours(type("R", (), {"processor": Molmo2Preprocessor.from_pretrained(ckpts["b-silent"])}), case)
    assert x["pixel_values_videos"].dtype == torch.float32
    assert torch.equal(x["pixel_values_videos"] * 127.5 + 127.5, ref["pixel_values_videos"].float())
    with pytest.raises(AssertionError, match="pixel_values_videos: dtype"):
        compare(x.tensors, ref)
    for k in ("input_ids", "video_token_pooling", "video_grids", "mm_token_type_ids"):
        assert torch.equal(x[k], ref[k])
