"""Task prompts for Molmo v1 and Molmo2 checkpoints.

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

Molmo2 (``family="molmo2"``; ``molmo2.md`` §1.4-1.5, the Molmo2 model cards):

* pointing and counting use the same templates (the model cards ask ``"Point to the boats"``); Molmo2
  answers with ``<points coords="1 1 073 160 ...">`` on a 0-1000 scale and counts by pointing
  (``"Counting the <points ...> shows a total of N."`` or ``"There are N <points ...>."``);
  several images are numbered by the chat template (``"Image 1<|image|>Image 2<|image|>"``), so the same
  prompt covers a multi-image request and each point names its image;
* Molmo2 has no captioner format and no trained length hint: captions are asked inside the chat
  template with the style written as Molmo2's template writes a ``style`` (``"long_caption: Describe this
  image."``);
* clocks: no Molmo2 clock prompt is documented; we ask the plain question and name the answer format
  (``"What time is being shown? Answer with the time as H:MM."``).

>>> point_prompt("the boats", family="molmo2")
'Point to the boats'
>>> caption_prompt("long_caption", 65, family="molmo2")
'long_caption: Describe this image.'
"""

from __future__ import annotations

__all__ = [
    "FAMILIES",
    "family_of",
    "check_family",
    "CAPTION_STYLES",
    "DEFAULT_CAPTION_LENGTH_HINT",
    "CHARS_PER_LENGTH_UNIT",
    "NO_POINT_PREFIX",
    "point_prompt",
    "count_prompt",
    "clock_prompt",
    "caption_prompt",
    "chat_caption_prompt",
    "MOLMO2_CLOCK_PROMPT",
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

#: Model families: Molmo v1 ("molmo", `molmo_core.MolmoRunner`) and Molmo2 ("molmo2", `Molmo2Runner`).
FAMILIES: tuple[str, ...] = ("molmo", "molmo2")

#: Molmo2's clock question (our choice: no Molmo2 clock prompt is documented).
MOLMO2_CLOCK_PROMPT: str = "What time is being shown? Answer with the time as H:MM."


def check_family(family: str) -> str:
    """``family`` if it is one of :data:`FAMILIES` (``"v1"`` is accepted for ``"molmo"``).

    Raises:
        ValueError: an unknown family.

    >>> check_family("v1"), check_family("molmo2")
    ('molmo', 'molmo2')
    """
    family = "molmo" if family == "v1" else family
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; expected one of {list(FAMILIES)}.")
    return family


def family_of(runner: object) -> str:
    """The family of a loaded runner: its ``family`` attribute ("molmo" or "molmo2"); "molmo" when it has
    none (stand-ins written for Molmo v1).

    >>> class R: family = "molmo2"
    >>> family_of(R()), family_of(object())
    ('molmo2', 'molmo')
    """
    family = getattr(runner, "family", None)
    return check_family(family) if isinstance(family, str) else "molmo"


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


def point_prompt(phrase: str, *, family: str = "molmo") -> str:
    """Prompt asking the model to point at ``phrase``.

    Args:
        phrase: what to point at, e.g. ``"the dogs"``; surrounding and repeated
            whitespace is collapsed.
        family: "molmo" or "molmo2": the same template for both (the Molmo2 model
            cards ask "Point to the boats").

    Returns:
        ``"Point to {phrase}"`` (the PixMo-Points template, no trailing period).

    Raises:
        ValueError: ``phrase`` is empty or only whitespace.
        TypeError: ``phrase`` is not a string.

    >>> point_prompt("  the   dogs ")
    'Point to the dogs'
    """
    check_family(family)
    return f"Point to {_clean(phrase, 'The phrase to point at', 'the dogs')}"


def count_prompt(phrase: str, *, point: bool = True, family: str = "molmo") -> str:
    """Prompt asking the model to count ``phrase``.

    With ``point=True`` (default) this is the ``point_count`` template; the fine-tuned
    models answer by pointing first, then counting ("Counting the <points ...>coins
    </points> shows a total of 24."), i.e. pointing as chain-of-thought. With
    ``point=False`` the trained "No pointing: " prefix asks for a plain count.

    Args:
        phrase: plural noun phrase, e.g. ``"coins"``.
        point: whether the model should point before counting.
        family: "molmo" or "molmo2". Molmo2 counts by pointing with the same question; it
            has no trained "No pointing: " prefix, so ``point=False`` asks the plain question.

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
    family = check_family(family)
    question = f"How many {_clean(phrase, 'The phrase to count', 'coins')} are there?"
    return question if point or family == "molmo2" else NO_POINT_PREFIX + question


def clock_prompt(*, family: str = "molmo") -> str:
    """The ClockBench prompt with its ``clocks`` style prefix (``molmo_v1.md`` §7.3); for Molmo2
    :data:`MOLMO2_CLOCK_PROMPT`.

    The answer is expected as ``H:MM`` (sometimes ``H:MM:SS``); parse it with
    :func:`molmo_core.outputs.parse_clock`.

    >>> clock_prompt()
    'clocks: What time is being shown?'
    >>> clock_prompt(family="molmo2")
    'What time is being shown? Answer with the time as H:MM.'
    """
    if check_family(family) == "molmo2":
        return MOLMO2_CLOCK_PROMPT
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
    style: str = "long_caption", length_hint: int | None = DEFAULT_CAPTION_LENGTH_HINT, *, family: str = "molmo"
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
        family: "molmo", or "molmo2": Molmo2 has no captioner format, so the prompt is a chat
            question with the style written as its chat template writes a style
            (``"long_caption: Describe this image."``), to send inside the chat template;
            the length hint is not part of it (it only sizes the answer budget).

    Returns:
        e.g. ``"long_caption 65:"``, ``"transcript 40:"``, ``"long_caption :"``;
        Molmo2: ``"long_caption: Describe this image."``.

    Raises:
        ValueError: unknown style or a negative hint.

    >>> caption_prompt("transcript", 40)
    'transcript 40:'
    >>> caption_prompt("long caption", None)
    'long_caption :'
    >>> caption_prompt("transcript", 40, family="molmo2")
    'transcript: Describe this image.'
    """
    family = check_family(family)
    key = "_".join(str(style).strip().lower().split())
    if key not in CAPTION_STYLES:
        raise ValueError(
            f"Unknown caption style {style!r}; expected one of {list(CAPTION_STYLES)} "
            "('long caption' is also accepted)."
        )
    if family == "molmo2":
        return chat_caption_prompt(key)
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


def chat_caption_prompt(style: str = "long_caption") -> str:
    """A caption question for chat models: ``"{style}: Describe this image."`` (the released Molmo v1 chat
    models, and every Molmo2 caption).

    Raises:
        ValueError: unknown style.

    >>> chat_caption_prompt("long caption")
    'long_caption: Describe this image.'
    """
    key = "_".join(str(style).strip().lower().split())
    if key not in CAPTION_STYLES:
        raise ValueError(
            f"Unknown caption style {style!r}; expected one of {list(CAPTION_STYLES)} "
            "('long caption' is also accepted)."
        )
    return f"{key}: Describe this image."


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
