"""The caption draft runs through a real (tiny, random) Molmo in text-only mode."""

from pathlib import Path

import numpy as np

import molmo_core
from annotate.caption import build_caption_prompt, clean_model_caption, draft_caption

PARITY_D = Path(__file__).parent / "data" / "parity" / "d"


def test_draft_caption_with_a_loaded_molmo_text_only():
    runner = molmo_core.load(PARITY_D, device="cpu")
    transcripts = ["um so this is a red car, uh, parked on a street", "a red car next to a tree"]
    prompt = build_caption_prompt(transcripts)
    # the prompt carries every transcript, fillers and all: the model, not the prompt builder, cleans them
    assert "Transcript 1:\num so this is a red car, uh, parked on a street" in prompt
    assert "Transcript 2:\na red car next to a tree" in prompt and "spoken by 2 people" in prompt
    inputs = runner.process(None, prompt)
    assert inputs.images is None  # text-only: no image tokens at all
    assert not np.isin(inputs.input_ids, [runner.tokenizer.special.im_patch, runner.tokenizer.special.im_start]).any()
    calls = []

    def generate_text(p: str) -> str:
        calls.append(p)
        return runner.generate(None, p, max_new_tokens=24)

    draft = draft_caption(transcripts, generate_text)
    assert calls == [prompt]
    expected = clean_model_caption(runner.generate(None, prompt, max_new_tokens=24))
    assert expected  # the random model says something, so the comparison below means something
    assert draft.ok and draft.text == expected  # the draft is the model's answer to exactly that prompt
    assert draft.status == "Caption drafted from 2 transcripts; review and edit it."
