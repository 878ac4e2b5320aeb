"""Checkpoint folders with vocab.json + merges.txt but no tokenizer.json (public copies of the 7B-D folder)
load without a prompt and without remote code, and tokenize exactly as with tokenizer.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from molmo_core.preprocessing import MolmoTokenizer
from molmo_core.tiny import write_tiny_checkpoint

SHARED = Path(os.environ.get("MOLMO_PARITY_DIR", Path(__file__).parent.parent.parent / "shared" / "parity" /
                             "molmo_v1"))
TEXTS = [" User: Point to the 12 dogs' cups. Assistant:", "how many coins?\n\n  x",
         "<im_start><im_patch><im_col><im_end><|image|><|endoftext|>", " long_caption 65:"]

# In a fresh interpreter with stdin closed: a "run custom code? [y/N]" prompt would fail at once.
ENCODE = """
import json, sys
from pathlib import Path
import molmo_core
from molmo_core.preprocessing import MolmoTokenizer
folder, texts = Path(sys.argv[1]), json.loads(sys.argv[2])
tok = MolmoTokenizer.from_dir(folder)
out = {"ids": [tok.encode(t) for t in texts], "special": list(tok.special.__dict__.values())}
if (folder / "model.safetensors").is_file():
    out["prompt_ids"] = molmo_core.load(folder, device="cpu").process(None, texts[0]).input_ids.tolist()
print(json.dumps(out))
"""


def _encode_in_subprocess(folder: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", ENCODE, str(folder), json.dumps(TEXTS)], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "custom code" not in p.stdout + p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _split_tokenizer_json(folder: Path, tokenizer_class: str) -> None:
    """Replace tokenizer.json by the vocab.json + merges.txt + added_tokens.json it contains."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    (folder / "vocab.json").write_text(json.dumps(tok["model"]["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "added_tokens.json").write_text(json.dumps({t["content"]: t["id"] for t in tok["added_tokens"]}))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(cfg, tokenizer_class=tokenizer_class)))
    (folder / "tokenizer.json").unlink()


def test_tiny_checkpoint_without_tokenizer_json_loads_with_the_same_ids(tmp_path):
    full = write_tiny_checkpoint(tmp_path / "full", "d")
    split = Path(shutil.copytree(full, tmp_path / "split"))
    _split_tokenizer_json(split, "GPT2Tokenizer")  # the tiny tokenizer uses GPT-2's byte-level split
    assert "auto_map" in json.loads((split / "config.json").read_text())  # names remote code
    assert not (split / "tokenizer.json").exists()
    want, got = _encode_in_subprocess(full), _encode_in_subprocess(split)
    assert got == want
    assert len(set(map(tuple, got["ids"]))) == len(TEXTS) and got["prompt_ids"][0] == got["special"][-2]  # BOS


@pytest.mark.parametrize("variant", ["d", "e"])  # o's tokenizer_config names Qwen2Tokenizer for an OLMo split
def test_reference_folders_without_tokenizer_json(tmp_path, variant):
    src = SHARED / variant
    if not (src / "vocab.json").is_file():
        pytest.skip(f"reference tokenizer files not found at {src}")
    dst = tmp_path / variant
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in ("tokenizer.json", "model.safetensors", "logits_projection.npy"):
            shutil.copy(f, dst)
    want = MolmoTokenizer.from_dir(src)
    got = _encode_in_subprocess(dst)
    assert got["ids"] == [want.encode(t) for t in TEXTS]
    assert got["special"] == list(want.special.__dict__.values())


def test_unknown_tokenizer_class_says_what_to_do(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "ck", "d")
    _split_tokenizer_json(folder, "PreTrainedTokenizerFast")  # needs tokenizer.json: cannot be built
    with pytest.raises(ValueError, match=r"no tokenizer.json.*'PreTrainedTokenizerFast'.*Copy the checkpoint's "
                                         r"tokenizer.json"):
        MolmoTokenizer.from_dir(folder)
