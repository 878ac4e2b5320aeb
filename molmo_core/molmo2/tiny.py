"""Write tiny random Molmo2 checkpoints in the format `save_pretrained` writes (transformers 5.23).

    python -m molmo_core.molmo2.tiny --out /tmp/tiny-m2a             # size a: the real 378-px crop geometry
    python -m molmo_core.molmo2.tiny --out /tmp/tiny-m2b --size b    # size b: 224-px crops, other margins

The folder holds what `Molmo2ForConditionalGeneration.save_pretrained` plus `Molmo2Processor.save_pretrained`
write: config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
processor_config.json (with the image and video processor settings nested, the v5 layout) and
chat_template.jinja. transformers' `AutoProcessor` / `AutoModelForImageTextToText` load it unchanged (the
parity tests do exactly that); no torchvision is needed to write it.

The tokenizer is built offline (molmo2.md section 1.6, option 1): a byte-level BPE without merges (256 byte
symbols), the chat specials `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` padded with `<|extra_i|>` to
TEXT_VOCAB ids, then the 10 image/video specials at TEXT_VOCAB + 0..9, the same relative layout as the real
vocabulary (specials at `vocab_size + 0..9`). bos = eos = `<|im_end|>`, as in the real checkpoints.

The chat template is our own Jinja, written to render what the released Molmo2 template renders for text,
image and video turns (image placeholders before the first turn, `Image 1<|image|>Image 2<|image|>` for
several images, `<|video|>`, `<|im_end|>\\n` opening every later user turn, and the released template's
space before an assistant turn taken from the history). `processing.build_prompt` is the Python twin.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

TEXT_VOCAB = 272
CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# In the order of the real vocabulary (ids vocab_size + 0..9; molmo2.md section 1.2).
IMAGE_SPECIALS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<|image|>",
                  "<im_low>", "<frame_start>", "<frame_end>", "<|video|>")

CHAT_TEMPLATE = (
    "{%- set ns = namespace(images=0, videos=0) -%}"
    "{%- for message in messages -%}{%- if message['content'] is not string -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set ns.images = ns.images + 1 -%}"
    "{%- elif item['type'] == 'video' or 'video' in item or 'video_url' in item -%}"
    "{%- set ns.videos = ns.videos + 1 -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{%- if ns.images == 1 -%}{{ '<|image|>' }}"
    "{%- elif ns.images > 1 -%}{%- for i in range(ns.images) -%}{{ 'Image ' ~ (i + 1) ~ '<|image|>' }}"
    "{%- endfor -%}{%- endif -%}"
    "{%- for _ in range(ns.videos) -%}{{ '<|video|>' }}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if (loop.index % 2 == 1) != (message['role'] == 'user') -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- else -%}"
    "{%- set t = namespace(s='') -%}{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}"
    "{%- set t.s = t.s ~ (' ' if t.s else '') ~ item['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- set text = t.s -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if not loop.first -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>user\\n' ~ text ~ '<|im_end|>\\n' }}"
    "{%- else -%}{{ ' <|im_start|>assistant\\n' ~ text }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# fmt: off
SIZES: dict[str, dict] = {
    # The real image geometry (378-px crops, 4-patch margins, up to 8 crops, 2x2 / 3x3 pooling).
    "a": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=4, head_dim=8, image_size=[378, 378], patch_size=14),
        adapter=dict(vision_feature_layer=[-1, -3], hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                     head_dim=8, intermediate_size=64),
        text=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                  intermediate_size=128),
        image=dict(size=378, max_crops=8, overlap_margins=[4, 4], pooling_size=[2, 2]),
        video=dict(size=378, pooling_size=[3, 3], num_frames=64, max_fps=2),
    ),
    # Other sizes everywhere: 224-px crops (16x16 patches: 3x3 video pooling pads both sides), asymmetric
    # margins, 6 crops, OLMo-style QK-norm, scaled RoPE on some layers only, positive ViT layer indices.
    "b": dict(
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
                    num_key_value_heads=6, head_dim=8, image_size=[224, 224], patch_size=14),
        adapter=dict(vision_feature_layer=[3, 1], hidden_size=48, num_attention_heads=6, num_key_value_heads=6,
                     head_dim=8, intermediate_size=80),
        text=dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=16, num_hidden_layers=3,
                  intermediate_size=160, qk_norm_type="olmo", rope_scaling_layers=[0, 2],
                  rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}),
        image=dict(size=224, max_crops=6, overlap_margins=[3, 2], pooling_size=[2, 2]),
        video=dict(size=224, pooling_size=[3, 3], num_frames=16, max_fps=2),
    ),
}
# fmt: on


def build_tokenizer():
    """The tiny tokenizer as a transformers `PreTrainedTokenizerFast` (`TokenizersBackend` in v5)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    fillers = [f"<|extra_{i}|>" for i in range(TEXT_VOCAB - len(alphabet) - len(CHAT_SPECIALS))]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in (*CHAT_SPECIALS, *fillers, *IMAGE_SPECIALS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_end|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", extra_special_tokens=list(IMAGE_SPECIALS))
    ids = tok.convert_tokens_to_ids(list(IMAGE_SPECIALS))
    assert ids == list(range(TEXT_VOCAB, TEXT_VOCAB + len(IMAGE_SPECIALS))), ids
    return tok


def build_config(size: str = "a"):
    from transformers import Molmo2Config

    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; valid: {', '.join(SIZES)}")
    s = SIZES[size]
    ids = {t: TEXT_VOCAB + i for i, t in enumerate(IMAGE_SPECIALS)}
    text = dict(vocab_size=TEXT_VOCAB, additional_vocab_size=128, max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    text.update(s["text"])
    return Molmo2Config(
        vision_config=dict(s["vision"]),
        adapter_config=dict(s["adapter"], text_hidden_size=text["hidden_size"]),
        text_config=text,
        image_start_token_id=ids["<im_start>"], low_res_image_start_token_id=ids["<low_res_im_start>"],
        image_end_token_id=ids["<im_end>"], image_patch_id=ids["<im_patch>"],
        frame_start_token_id=ids["<frame_start>"], frame_end_token_id=ids["<frame_end>"],
    )


def processor_config(size: str = "a") -> dict:
    """processor_config.json as `Molmo2Processor.save_pretrained` writes it in transformers 5.23."""
    s = SIZES[size]
    common = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], patch_size=14, resample=2,
                  rescale_factor=1 / 255)
    image = dict(common, do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                 image_processor_type="Molmo2ImageProcessor", max_crops=s["image"]["max_crops"],
                 overlap_margins=s["image"]["overlap_margins"], pooling_size=s["image"]["pooling_size"],
                 size={"height": s["image"]["size"], "width": s["image"]["size"]})
    # transformers 5.23's Molmo2VideoProcessor has no do_rescale / do_normalize defaults: a config without them
    # gives raw 0-255 frames to the ViT. Real checkpoints should say so explicitly; these do.
    video = dict(common, do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                 do_sample_frames=True, max_fps=s["video"]["max_fps"], num_frames=s["video"]["num_frames"],
                 pooling_size=s["video"]["pooling_size"], return_metadata=False,
                 size={"height": s["video"]["size"], "width": s["video"]["size"]},
                 video_processor_type="Molmo2VideoProcessor")
    return {"image_processor": dict(sorted(image.items())), "image_use_col_tokens": True,
            "processor_class": "Molmo2Processor", "use_frame_special_tokens": True,
            "use_single_crop_col_tokens": None, "use_single_crop_start_token": True,
            "video_processor": dict(sorted(video.items())), "video_use_col_tokens": False}


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights with unit-scale activations (fan-in scaled), so that logits differ clearly between tokens and a
    changed input changes the answer; norms near 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "norm" in name:
            p.copy_(1 + 0.1 * r if name.endswith("weight") else 0.05 * r)
        elif name.endswith("bias"):
            p.copy_(0.05 * r)
        elif "embed_tokens" in name or "positional_embedding" in name:
            p.copy_(r)
        elif p.ndim == 2:
            p.copy_(r * math.sqrt((4.0 if name == "lm_head.weight" else 1.0) / p.shape[1]))
        else:
            p.copy_(0.5 * r)


def write_tiny_molmo2(out_dir: str | Path, size: str = "a", seed: int = 0) -> Path:
    """Write a random Molmo2 checkpoint of `size` ("a" or "b") to `out_dir` and return the folder."""
    from transformers import Molmo2ForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(size)
    torch.manual_seed(seed)
    model = Molmo2ForConditionalGeneration(config).eval()
    init_random_(model, seed)
    tok = build_tokenizer()
    im_end, pad = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.generation_config.bos_token_id = im_end
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out)
    tok.save_pretrained(out)
    cfg_file = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    tok_cfg["processor_class"] = "Molmo2Processor"
    cfg_file.write_text(json.dumps(dict(sorted(tok_cfg.items())), indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps(processor_config(size), indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="a", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = write_tiny_molmo2(a.out, a.size, a.seed)
    print(f"wrote a random size-{a.size} Molmo2 checkpoint to {path}")


if __name__ == "__main__":
    main()
