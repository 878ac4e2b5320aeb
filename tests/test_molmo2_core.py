"""Molmo2 without the reference: tiny checkpoints, family detection, loading and its errors, the runner's
interface and behaviour (streaming, batching, stops, closing, bad input), prompts, settings files,
quantized loading. Parity with transformers' processor is in test_molmo2_parity.py."""

from __future__ import annotations

import inspect
import json
import shutil
import threading

import numpy as np
import pytest
import torch

from molmo_core.errors import CheckpointError, ModelUnloadedError, MolmoInputError
from molmo_core.molmo2 import Molmo2Runner, load_molmo2, model_family
from molmo_core.molmo2 import processing as P
from molmo_core.molmo2.tiny import CHAT_TEMPLATE, IMAGE_SPECIALS, TEXT_VOCAB, write_tiny_molmo2


# one torch thread (conftest's one_thread): the tiny models gain nothing from two, and on two shared cores an
# oversubscribed second thread made these tests up to 10x slower
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def m2(tmp_path_factory):
    root = tmp_path_factory.mktemp("m2core")
    return {s: write_tiny_molmo2(root / s, s) for s in ("a", "b")}


@pytest.fixture(scope="module")
def runner(m2):
    """Size b (224-px crops: cheaper than the real 378-px geometry, which the parity tests cover)."""
    return load_molmo2(m2["b"], device="cpu")  # tiny: no close() (a gc pass); test_close_unloads... tests it


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------- tiny checkpoints
def test_tiny_checkpoints_are_in_save_pretrained_format_and_differ(m2):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    for size, path in m2.items():
        names = {p.name for p in path.iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "processor_config.json", "chat_template.jinja"} <= names
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["model_type"] == "molmo2" and cfg["architectures"] == ["Molmo2ForConditionalGeneration"]
        tok = AutoTokenizer.from_pretrained(str(path))
        assert tok.convert_tokens_to_ids(list(IMAGE_SPECIALS)) == list(range(TEXT_VOCAB, TEXT_VOCAB + 10))
        assert tok.bos_token == tok.eos_token == "<|im_end|>"
        assert cfg["image_patch_id"] == tok.convert_tokens_to_ids("<im_patch>")
        model = AutoModelForImageTextToText.from_pretrained(str(path))
        assert type(model).__name__ == "Molmo2ForConditionalGeneration"
    a, b = (json.loads((m2[s] / "config.json").read_text()) for s in "ab")
    assert a["vision_config"]["hidden_size"] != b["vision_config"]["hidden_size"]
    assert a["text_config"]["hidden_size"] != b["text_config"]["hidden_size"]
    assert a["vision_config"]["image_size"] != b["vision_config"]["image_size"]


def test_tiny_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    from molmo_core.molmo2.tiny import main

    main(["--out", str(tmp_path / "x"), "--size", "b", "--seed", "3"])
    assert "size-b" in capsys.readouterr().out
    assert model_family(tmp_path / "x") == "molmo2"


# ----------------------------------------------------------------------------------------- family / loading
def test_model_family_tells_v1_from_molmo2(m2, tmp_path):
    from molmo_core.tiny import write_tiny_checkpoint

    v1 = write_tiny_checkpoint(tmp_path / "v1", "d")
    assert model_family(v1) == "molmo"
    assert model_family(v1 / "config.json") == "molmo"
    assert model_family(m2["b"]) == "molmo2"
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="neither a Molmo v1 nor a Molmo2"):
        model_family(other)
    with pytest.raises(CheckpointError, match="no config.json"):
        model_family(tmp_path)
    with pytest.raises(CheckpointError, match="not in the local hub cache"):
        model_family("allenai/Molmo2-4B-not-cached-here")
    with pytest.raises(CheckpointError, match="load it with molmo_core.load"):
        load_molmo2(v1)


def test_missing_or_incomplete_checkpoints_say_what_was_found_and_what_to_do(m2, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        load_molmo2("allenai/Molmo2-4B-not-cached")
    msg = str(e.value)
    assert "not on this machine" in msg and "offline" in msg
    assert "hf download allenai/Molmo2-4B-not-cached --local-dir ./checkpoints/Molmo2-4B-not-cached" in msg
    with pytest.raises(CheckpointError, match="neither an existing folder nor a hub id"):
        load_molmo2(str(tmp_path / "no" / "such" / "dir"))
    partial = tmp_path / "partial"
    shutil.copytree(m2["a"], partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"No weights.*found: .*config.json.*tokenizer.json"):
        load_molmo2(partial)
    shutil.copy(m2["a"] / "model.safetensors", partial)
    (partial / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_molmo2(partial)
    with pytest.raises(CheckpointError, match="quantize must be"):
        load_molmo2(m2["a"], quantize="3bit")


def test_load_defaults_fp32_on_cpu_and_reads_processor_settings(runner, m2):
    assert runner.device.type == "cpu" and runner.dtype == torch.float32
    assert runner.path == m2["b"] and runner.name == str(m2["b"]) and runner.quantize is None
    assert runner.family == "molmo2"
    assert runner.processor.chat_template == CHAT_TEMPLATE
    assert runner.memory_bytes() == sum(p.numel() * 4 for p in runner.model.parameters())
    b = runner.processor
    assert (b.image.crop_size, b.image.max_crops, b.image.overlap_margins) == (224, 6, (3, 2))
    assert (b.video.num_frames, b.video.pooling_size) == (16, (3, 3))
    a = P.Molmo2Preprocessor.from_pretrained(m2["a"])
    assert (a.image.crop_size, a.image.max_crops, a.image.overlap_margins) == (378, 8, (4, 4))
    assert a.video == P.VideoSettings()  # the real defaults, written out explicitly


def test_legacy_settings_layout_falls_back_like_transformers(m2, tmp_path):
    """Hub checkpoints use preprocessor_config.json (+ a flat processor_config.json); without a video config
    transformers builds the video processor from preprocessor_config.json, so the 2x2 image pooling applies."""
    legacy = tmp_path / "legacy"
    shutil.copytree(m2["b"], legacy)
    cfg = json.loads((legacy / "processor_config.json").read_text())
    (legacy / "preprocessor_config.json").write_text(json.dumps(cfg.pop("image_processor")))
    cfg.pop("video_processor")
    (legacy / "processor_config.json").write_text(json.dumps(cfg))
    image, video, tokens = P.read_processor_settings(legacy)
    assert image == P.read_processor_settings(m2["b"])[0]
    assert video.pooling_size == (2, 2) and video.crop_size == 224 and video.num_frames == 64
    assert tokens == P.TokenSettings()
    (legacy / "video_preprocessor_config.json").write_text(json.dumps({"pooling_size": [3, 3], "num_frames": 8}))
    assert P.read_processor_settings(legacy)[1].num_frames == 8
    assert P.read_processor_settings(tmp_path) == (P.ImageSettings(), P.VideoSettings(), P.TokenSettings())


def test_runs_without_torchvision(runner):
    """The point of this package: .venv, like a user's fresh CPU install, has no torchvision."""
    import importlib.util
    import sys

    assert runner.generate(rgb(40, 50), "hi", max_new_tokens=2) is not None
    assert "torchvision" not in sys.modules
    if importlib.util.find_spec("torchvision") is None:
        from transformers import Molmo2ImageProcessor

        with pytest.raises(ImportError, match="Torchvision"):
            Molmo2ImageProcessor()  # transformers' own processor cannot run here


# ----------------------------------------------------------------------------------------- interface
def test_runner_offers_the_v1_runner_methods_with_compatible_arguments():
    from molmo_core.api import MolmoRunner

    for name in ("process", "stream", "generate", "generate_batch", "memory_bytes", "close"):
        v1 = inspect.signature(getattr(MolmoRunner, name)).parameters
        m2 = inspect.signature(getattr(Molmo2Runner, name)).parameters
        for p in v1.values():
            if p.kind is p.VAR_KEYWORD:
                continue
            assert p.name in m2, f"{name}: no argument {p.name}"
            assert m2[p.name].kind == p.kind, f"{name}({p.name}) kind"
            assert m2[p.name].default == p.default, f"{name}({p.name}) default"
    for prop in ("config", "device", "dtype"):
        assert isinstance(getattr(Molmo2Runner, prop), property)


# ----------------------------------------------------------------------------------------- behaviour
def test_stream_generate_and_ids_agree(runner):
    img = rgb(90, 120)
    deltas = list(runner.stream(img, "Point to the cat.", max_new_tokens=10))
    text = runner.generate(img, "Point to the cat.", max_new_tokens=10)
    ids = runner.generate_ids(runner.process(img, "Point to the cat."), 10)
    assert "".join(deltas).strip() == text == runner.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert len(ids) == 10 and all(i < TEXT_VOCAB for i in ids)  # lm_head cannot emit image tokens


def test_inputs_change_the_answer(runner):
    """The image and the prompt reach the model: other inputs give other logits."""
    a = runner.process(rgb(90, 120, 1), "What is this?")
    b = runner.process(rgb(90, 120, 2), "What is this?")
    c = runner.process(rgb(90, 120, 1), "Where is this?")
    with torch.inference_mode():
        la, lb, lc = (runner.model(**x.tensors).logits[0, -1] for x in (a, b, c))
    assert float((la - lb).abs().max()) > 1e-3 and float((la - lc).abs().max()) > 1e-3


def test_batch_equals_one_by_one_across_images_text_and_video(runner):
    video = P.Video(rgb(40, 60, 5)[None].repeat(6, 0), 3.0)
    reqs = [(rgb(90, 120, 1), "a"), (None, "hello there, how are you"), ([rgb(30, 500, 2), rgb(64, 64, 3)], "b"),
            (video, "what happens"), (rgb(500, 40, 4), "c")]
    batch = runner.generate_batch(reqs, max_new_tokens=6)
    single = [runner.generate(image, prompt, max_new_tokens=6) for image, prompt in reqs]
    assert batch == single


def test_stop_strings_cut_the_answer(runner):
    img = rgb(90, 120)
    full = runner.generate(img, "Describe.", max_new_tokens=12)
    stop = full[3:5]
    assert stop and full.index(stop) == 3
    assert runner.generate(img, "Describe.", max_new_tokens=12, stop=[stop]) == full[:3].strip()
    assert runner.generate_batch([(img, "Describe.")], max_new_tokens=12, stop=[stop]) == [full[:3].strip()]


def test_sampling_with_a_seed_is_reproducible(runner):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert runner.generate(None, "Tell me more.", **kw) == runner.generate(None, "Tell me more.", **kw)


def test_closing_a_stream_early_stops_generation(runner):
    stream = runner.stream(None, "Count to a thousand.", max_new_tokens=500)
    next(stream)
    stream.close()
    assert not any(t.name == "molmo2-generate" for t in threading.enumerate())
    assert runner._lock.acquire(timeout=5)
    runner._lock.release()


def test_bad_input_is_refused_before_generating(runner):
    with pytest.raises(MolmoInputError, match="empty"):
        runner.generate(rgb(9, 9), "   ")
    with pytest.raises(MolmoInputError, match="reserved token"):
        runner.generate(None, "say <im_patch> please")
    with pytest.raises(MolmoInputError, match="reserved token"):
        runner.generate(None, "ok", history=[("<|image|>", "x")])
    with pytest.raises(MolmoInputError, match="not both"):
        runner.processor("x", images=[rgb(9, 9)], video=P.Video(rgb(9, 9)[None], 1.0))
    with pytest.raises(MolmoInputError, match="uint8"):
        runner.generate(P.Video(np.zeros((2, 8, 8, 3), np.float32), 2.0), "x")
    with pytest.raises(MolmoInputError, match="frame rate"):
        runner.generate(P.Video(rgb(8, 8)[None], 0), "x")
    with pytest.raises(MolmoInputError, match="must be uint8"):
        runner.generate(np.zeros((8, 8, 3), np.float64), "x")
    small = P.Molmo2Preprocessor(runner.tokenizer, max_length=50)
    with pytest.raises(MolmoInputError, match="tokens long"):
        small("x", images=rgb(64, 64))


def test_grey_video_and_video_dict_inputs(runner):
    grey = np.random.default_rng(0).integers(0, 256, (5, 30, 40), dtype=np.uint8)
    a = runner.process(P.Video(grey, 2.0), "what")
    b = runner.process({"frames": np.repeat(grey[..., None], 3, -1), "fps": 2.0}, "what")
    assert torch.equal(a["pixel_values_videos"], b["pixel_values_videos"])
    assert a.timestamps == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_close_unloads_and_later_calls_say_so(m2):
    r = load_molmo2(m2["a"], device="cpu")
    assert r.generate(None, "hi", max_new_tokens=2) is not None
    r.close()
    with pytest.raises(ModelUnloadedError):
        r.generate(None, "hi", max_new_tokens=2)
    with pytest.raises(ModelUnloadedError):
        r.memory_bytes()


# ----------------------------------------------------------------------------------------- prompts
CONVERSATIONS = [
    ("Point to the cat.", [], 1, False),
    ("Which is larger?", [], 3, False),
    ("What happens?", [], 0, True),
    ("And now?", [("How many?", "Two."), ("Where?", '<points coords="1 1 100 200">')], 2, False),
    ("Hello", [("hi", "hello")], 0, False),
]


@pytest.mark.parametrize("prompt,history,n_images,video", CONVERSATIONS)
def test_builtin_prompt_equals_the_checkpoint_template(runner, prompt, history, n_images, video):
    rendered = runner.processor.render(P.conversation(prompt, history, n_images, video))
    assert P.build_prompt(prompt, history, n_images, video) == rendered


def test_prompt_has_the_released_layout():
    """molmo2.md section 1.4 (checked against the released template's rendering)."""
    assert P.build_prompt("Q", [], 1) == "<|image|><|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert P.build_prompt("Q", [], 2).startswith("Image 1<|image|>Image 2<|image|><|im_start|>user\n")
    assert P.build_prompt("Q", [], 0, True).startswith("<|video|><|im_start|>user\nQ")
    assert P.build_prompt("Q2", [("Q1", "A1")]) == ("<|im_start|>user\nQ1<|im_end|>\n <|im_start|>assistant\nA1"
                                                    "<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
                                                    "<|im_start|>assistant\n")
    assert P.raw_prompt(" long_caption 65:", 1) == "<|image|> long_caption 65:"


def test_template_free_checkpoint_uses_the_builtin_prompt(runner):
    plain = P.Molmo2Preprocessor(runner.tokenizer, runner.processor.image, chat_template=None)
    x, y = plain("Hi", images=rgb(50, 50), history=[("a", "b")]), runner.process(rgb(50, 50), "Hi", [("a", "b")])
    assert torch.equal(x["input_ids"], y["input_ids"])
    assert x.prompt.startswith("<|im_end|><|image|><|im_start|>user\na")


# ----------------------------------------------------------------------------------------- geometry
def test_geometry_examples_from_the_reference_notes():
    """molmo2.md section 1.3: a 640x480 image -> 2x2 tiling, 5 crops, grid [14, 14, 23, 23], 725 tokens."""
    f = P.image_features(rgb(480, 640), P.ImageSettings())
    assert f.patches.shape == (5, 729, 588) and f.grid == (14, 14, 23, 23)
    assert len(f.pooling) == 14 * 14 + 23 * 23 == 725
    assert P.image_string(f.grid).count("<im_patch>") == 725
    lo = f.pooling[:196].reshape(14, 14, 4)
    assert (lo[-1, :, 2:] == -1).all() and (lo[:, -1, 1::2] == -1).all()  # odd 27-patch edge padded
    assert P.crop_geometry(480, 640, P.ImageSettings(), max_crops=1).tiling == (1, 1)


@pytest.mark.slow
def test_quantized_loads_keep_vision_and_adapter_unquantized(m2):
    pytest.importorskip("bitsandbytes")
    img = rgb(60, 80)
    for q, cls in (("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")):
        r = load_molmo2(m2["a"], quantize=q, device="cpu")
        try:
            m = r.model.model
            assert type(m.language_model.layers[0].self_attn.q_proj).__name__ == cls
            assert type(m.vision_tower.patch_embedding).__name__ == "Linear"
            assert type(m.multi_modal_projector.image_projector.gate_proj).__name__ == "Linear"
            assert type(r.model.lm_head).__name__ == "Linear"
            assert r.quantize == q
            if q == "4bit":
                assert len(r.generate_ids(r.process(img, "hi"), 3)) == 3
        finally:
            r.close()
