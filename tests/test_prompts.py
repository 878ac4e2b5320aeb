"""Prompt builders: exact strings (molmo_v1.md §6.2, §7, §8.1) and input validation."""
import doctest

import pytest

from molmo_core import prompts
from molmo_core.prompts import (
    ask_prompt,
    caption_prompt,
    clock_prompt,
    count_prompt,
    length_hint_for,
    point_prompt,
)


@pytest.mark.parametrize(
    "phrase, expected",
    [
        ("dogs", "Point to dogs"),
        ("  the red mug ", "Point to the red mug"),
        ("the\n  two\tcats", "Point to the two cats"),
        ("Ünïcode ☕", "Point to Ünïcode ☕"),
    ],
)
def test_point_prompt(phrase, expected):
    assert point_prompt(phrase) == expected


@pytest.mark.parametrize(
    "phrase, point, expected",
    [
        ("coins", True, "How many coins are there?"),
        (" people  ", True, "How many people are there?"),
        ("coins", False, "No pointing: How many coins are there?"),
    ],
)
def test_count_prompt(phrase, point, expected):
    assert count_prompt(phrase, point=point) == expected


def test_clock_prompt_is_the_clockbench_prompt_with_style_prefix():
    assert clock_prompt() == "clocks: What time is being shown?"


@pytest.mark.parametrize(
    "style, hint, expected",
    [
        ("long_caption", 65, "long_caption 65:"),
        ("long caption", 65, "long_caption 65:"),
        ("transcript", 40, "transcript 40:"),
        ("Transcript", 0, "transcript 0:"),
        ("long_caption", None, "long_caption :"),
        ("transcript", None, "transcript :"),
    ],
)
def test_caption_prompt(style, hint, expected):
    assert caption_prompt(style, hint) == expected


def test_caption_prompt_default_is_captioner_inference_length():
    assert caption_prompt() == "long_caption 65:"
    assert prompts.DEFAULT_CAPTION_LENGTH_HINT == 65


@pytest.mark.parametrize(
    "value, expected",
    [("", 0), ("x" * 14, 0), ("x" * 15, 1), ("x" * 975, 65), (29, 1), (30, 2), (0, 0)],
)
def test_length_hint_for(value, expected):
    assert length_hint_for(value) == expected


def test_length_hint_round_trips_into_caption_prompt():
    text = "A black puppy sits on a wooden deck. " * 20  # 740 chars
    assert caption_prompt("transcript", length_hint_for(text)) == f"transcript {len(text) // 15}:"


@pytest.mark.parametrize("fn", [point_prompt, count_prompt, ask_prompt])
@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_blank_text_is_rejected_with_guidance(fn, bad):
    with pytest.raises(ValueError, match=r"empty.*expected.*try again"):
        fn(bad)


@pytest.mark.parametrize("fn", [point_prompt, count_prompt, ask_prompt])
def test_non_string_is_rejected(fn):
    with pytest.raises(TypeError, match="must be a string"):
        fn(None)


def test_caption_prompt_rejects_unknown_style_and_bad_hint():
    with pytest.raises(ValueError, match=r"Unknown caption style 'short'.*long_caption"):
        caption_prompt("short")
    with pytest.raises(ValueError, match="must be >= 0"):
        caption_prompt("transcript", -1)
    with pytest.raises(TypeError, match="int or None"):
        caption_prompt("transcript", 6.5)
    with pytest.raises(ValueError, match=">= 0"):
        length_hint_for(-3)
    with pytest.raises(TypeError):
        length_hint_for(True)


def test_ask_prompt_keeps_inner_newlines_for_multiple_choice():
    q = "  Which animal?\nA: cat\nB: dog\n "
    assert ask_prompt(q) == "Which animal?\nA: cat\nB: dog"


def test_doctests():
    result = doctest.testmod(prompts)
    assert result.attempted > 0 and result.failed == 0
