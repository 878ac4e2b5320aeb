"""The caption draft runs through a real (tiny, random) Molmo in text-only mode."""

from pathlib import Path

import numpy as np

import molmo_core
from annotate.caption import build_caption_prompt, draft_caption

PARITY_D = Path(__file__).parent / "data" / "parity" / "d"


def test_draft_caption_with_a_loaded_molmo_text_only():
    runner = molmo_core.load(PARITY_D, device="cpu")
    transcripts = ["um so this is a red car, uh, parked on a street", "a red car next to a tree"]
    prompt = build_caption_prompt(transcripts)
    inputs = runner.process(None, prompt)
    assert inputs.images is None  # text-only: no image tokens at all
    assert not np.isin(inputs.input_ids, [runner.tokenizer.special.im_patch, runner.tokenizer.special.im_start]).any()
    calls = []

    def generate_text(p: str) -> str:
        calls.append(p)
        return runner.generate(None, p, max_new_tokens=24)

    draft = draft_caption(transcripts, generate_text)
    assert calls == [prompt]
    expected = runner.generate(None, prompt, max_new_tokens=24).strip()
    assert draft.ok and draft.text and draft.text.split()[0] in expected
    assert "2 transcripts" in draft.status
