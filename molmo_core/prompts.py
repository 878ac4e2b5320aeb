"""Task prompts for Molmo v1 checkpoints.

Every function here returns the *user text* only. The caller (preprocessing) wraps it
as the model was trained: ``" User: {prompt} Assistant:"`` for the released fine-tuned
checkpoints (``molmo_v1.md`` §6.2). The one exception is :func:`caption_prompt`, whose
length-hinted form belongs to the PixMo-Cap *captioner* pre-training format, which has
no "User:/Assistant:" wrapper at all (§8.1, §7.4).

Templates come from ``allenai/molmo`` ``olmo/data/data_formatter.py`` as summarised in
``molmo_v1.md`` §7:

* pointing: ``"Point to {label}"``
* counting: ``"How many {label} are there?"``; the fine-tuned models answer
  ``"Counting the <points ...>{label}</points> shows a total of N."`` (§7.2)
* clocks: ``"clocks: What time is being shown?"`` (the ``clocks`` style prefix, §7.3)
* captioner: ``"long_caption 65:"`` / ``"transcript 40:"`` / ``"long_caption :"`` (§8.1)

>>> point_prompt("the red mug")
'Point to the red mug'
>>> count_prompt("coins")
'How many coins are there?'
>>> clock_prompt()
'clocks: What time is being shown?'
>>> caption_prompt()
'long_caption 65:'
"""

from __future__ import annotations

__all__ = [
    "CAPTION_STYLES",
    "DEFAULT_CAPTION_LENGTH_HINT",
    "CHARS_PER_LENGTH_UNIT",
    "NO_POINT_PREFIX",
    "point_prompt",
    "count_prompt",
    "clock_prompt",
    "caption_prompt",
    "length_hint_for",
    "ask_prompt",
]

#: Caption styles of the captioner pre-training data (PixMo-Cap, ``molmo_v1.md`` §8.1):
#: the cleaned caption is ``long_caption``, a raw spoken transcript is ``transcript``.
CAPTION_STYLES: tuple[str, ...] = ("long_caption", "transcript")

#: The captioner's inference-time hint ("default_inference_len"), already in /15 units
#: (about 65 * 15 = 975 characters).
DEFAULT_CAPTION_LENGTH_HINT: int = 65

#: One length-hint unit is 15 characters of caption text.
CHARS_PER_LENGTH_UNIT: int = 15

#: One of the prefixes trained for "count without pointing" questions (§7.2).
NO_POINT_PREFIX: str = "No pointing: "


def _clean(value: object, what: str, example: str, *, collapse: bool = True) -> str:
    """Strip ``value`` and reject non-strings and blank text with a helpful message."""
    if not isinstance(value, str):
        raise TypeError(
            f"{what} must be a string, got {type(value).__name__} ({value!r}); "
            f"pass text such as {example!r}."
        )
    text = " ".join(value.split()) if collapse else value.strip()
    if not text:
        raise ValueError(
            f"{what} is empty (got {value!r}); expected a non-blank text such as "
            f"{example!r}. Type what you want the model to look for and try again."
        )
    return text


def point_prompt(phrase: str) -> str:
    """Prompt asking the model to point at ``phrase``.

    Args:
        phrase: what to point at, e.g. ``"the dogs"``; surrounding and repeated
            whitespace is collapsed.

    Returns:
        ``"Point to {phrase}"`` (the PixMo-Points template, no trailing period).

    Raises:
        ValueError: ``phrase`` is empty or only whitespace.
        TypeError: ``phrase`` is not a string.

    >>> point_prompt("  the   dogs ")
    'Point to the dogs'
    """
    return f"Point to {_clean(phrase, 'The phrase to point at', 'the dogs')}"


def count_prompt(phrase: str, *, point: bool = True) -> str:
    """Prompt asking the model to count ``phrase``.

    With ``point=True`` (default) this is the ``point_count`` template; the fine-tuned
    models answer by pointing first, then counting ("Counting the <points ...>coins
    </points> shows a total of 24."), i.e. pointing as chain-of-thought. With
    ``point=False`` the trained "No pointing: " prefix asks for a plain count.

    Args:
        phrase: plural noun phrase, e.g. ``"coins"``.
        point: whether the model should point before counting.

    Returns:
        ``"How many {phrase} are there?"``, optionally prefixed with ``"No pointing: "``.

    Raises:
        ValueError: ``phrase`` is empty or only whitespace.
        TypeError: ``phrase`` is not a string.

    >>> count_prompt("coins")
    'How many coins are there?'
    >>> count_prompt("coins", point=False)
    'No pointing: How many coins are there?'
    """
    question = f"How many {_clean(phrase, 'The phrase to count', 'coins')} are there?"
    return question if point else NO_POINT_PREFIX + question


def clock_prompt() -> str:
    """The ClockBench prompt with its ``clocks`` style prefix (``molmo_v1.md`` §7.3).

    The answer is expected as ``H:MM`` (sometimes ``H:MM:SS``); parse it with
    :func:`molmo_core.outputs.parse_clock`.

    >>> clock_prompt()
    'clocks: What time is being shown?'
    """
    return "clocks: What time is being shown?"


def length_hint_for(text_or_chars: str | int) -> int:
    """Caption length hint for a text (or a character count): ``chars // 15``.

    This is the captioner's training hint without its random jitter
    (``molmo_v1.md`` §8.1: ``(len(text) + int(N(0, 25))) // 15``).

    Args:
        text_or_chars: the caption text, or its length in characters (>= 0).

    Returns:
        The hint in 15-character units.

    Raises:
        ValueError: a negative character count.
        TypeError: neither a string nor an int.

    >>> length_hint_for("x" * 975)
    65
    >>> length_hint_for(29)
    1
    """
    if isinstance(text_or_chars, str):
        n_chars = len(text_or_chars)
    elif isinstance(text_or_chars, int) and not isinstance(text_or_chars, bool):
        n_chars = text_or_chars
        if n_chars < 0:
            raise ValueError(
                f"Character count must be >= 0, got {n_chars}; pass the caption text "
                "or its length in characters."
            )
    else:
        raise TypeError(
            f"Expected caption text (str) or a character count (int), got "
            f"{type(text_or_chars).__name__}."
        )
    return n_chars // CHARS_PER_LENGTH_UNIT


def caption_prompt(
    style: str = "long_caption", length_hint: int | None = DEFAULT_CAPTION_LENGTH_HINT
) -> str:
    """Length-hinted caption prompt in the PixMo-Cap captioner format (§8.1).

    The captioner was trained on ``" {style} {hint}:"`` followed by ``" {text}"`` and
    EOS, with *no* "User:/Assistant:" wrapper (``prompt_type="none"``,
    ``message_formatting="none"``, ``system_prompt_kind="style_and_length"``). The leading
    space is added by the tokenization step, so it is not part of the returned string.
    10 % of training examples carried no number: ``"{style} :"`` (note the space before
    the colon); pass ``length_hint=None`` for that form. The released fine-tuned models
    were not trained on this format; ask them with :func:`ask_prompt` instead (e.g.
    ``"Describe this image."``).

    Args:
        style: ``"long_caption"`` (a cleaned caption) or ``"transcript"`` (a spoken,
            raw description). ``"long caption"`` (with a space) is accepted as well.
        length_hint: target length in 15-character units (see :func:`length_hint_for`);
            default 65, the captioner's inference value; ``None`` for no hint.

    Returns:
        e.g. ``"long_caption 65:"``, ``"transcript 40:"``, ``"long_caption :"``.

    Raises:
        ValueError: unknown style or a negative hint.

    >>> caption_prompt("transcript", 40)
    'transcript 40:'
    >>> caption_prompt("long caption", None)
    'long_caption :'
    """
    key = "_".join(str(style).strip().lower().split())
    if key not in CAPTION_STYLES:
        raise ValueError(
            f"Unknown caption style {style!r}; expected one of {list(CAPTION_STYLES)} "
            "('long caption' is also accepted)."
        )
    if length_hint is None:
        return f"{key} :"
    if isinstance(length_hint, bool) or not isinstance(length_hint, int):
        raise TypeError(
            f"length_hint must be an int or None, got {type(length_hint).__name__}; "
            "use length_hint_for(text) to compute one."
        )
    if length_hint < 0:
        raise ValueError(
            f"length_hint must be >= 0, got {length_hint}; it counts 15-character units "
            f"(the default {DEFAULT_CAPTION_LENGTH_HINT} is about 975 characters)."
        )
    return f"{key} {length_hint}:"


def ask_prompt(question: str) -> str:
    """A free-form question with surrounding whitespace removed.

    Inner newlines are kept: the multiple-choice format is
    ``"{question}\nA: opt1\nB: opt2\n"`` (``molmo_v1.md`` §7.4).

    Args:
        question: anything to ask about the image, e.g. ``"Describe this image."``.

    Returns:
        The question with surrounding whitespace removed.

    Raises:
        ValueError: ``question`` is empty or only whitespace.
        TypeError: ``question`` is not a string.

    >>> ask_prompt("  What is on the table?\\n")
    'What is on the table?'
    """
    return _clean(question, "The question", "Describe this image.", collapse=False)
