"""Reading answers out of completions, and comparing them: one home for every task's verifier.

A real instruct model answers in sentences ("So the total is 12 apples."), a GSM8K-style
solution ends in ``#### 12``, a maths model writes ``\\boxed{12}``, an R1-style prompt asks for
``<answer>12</answer>``. An extractor turns a completion into the answer string it states (or
None when it states none); ``answers_match`` then compares numbers as numbers (``12``,
``12.0`` and `` 12.`` are equal, so are ``1,200`` and ``1200``) and anything else as trimmed
text.

For GSM8K and MATH-style answers ``task.verifier: math_verify`` hands the comparison to Hugging
Face's math-verify (an extra: ``pip install "rlbench[math]"``), which reads LaTeX and compares
values: ``\\frac{3}{4}`` is 0.75, the last ``\\boxed{}`` is the answer whatever numbers follow it.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from rlbench.errors import ConfigError, RLBenchError
from rlbench.registry import did_you_mean

# A number as people write it: sign, thousands separators, decimals, a trailing full stop.
# A sign right after a letter, digit or closing bracket is a hyphen or a binary minus, not
# part of the number ("pages 10-20" ends in 20, "COVID-19" in 19); a thousands group must not
# run on into more digits ("1,2345" is 1 then 2345, not 1,234 then 5).
NUMBER = re.compile(r"(?:(?<![\w)\]}])[-+−])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?")
# Only blanks may separate "####" from its answer: an empty marker line does not take the next line.
HASH = re.compile(r"####[ \t]*(.+?)\s*$", re.MULTILINE)
# The content may not contain another opening tag, so a tag the text merely mentions ("I will
# answer in <answer> tags: <answer>5</answer>") does not swallow the real answer.
ANSWER_TAG = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


def last_number(text: str) -> str | None:
    """The last number in the text (``The answer is 12.`` -> ``12``)."""
    found = NUMBER.findall(text)
    return found[-1] if found else None


def after_hash(text: str) -> str | None:
    """What follows the last ``####`` marker on its line (GSM8K's final-answer line)."""
    found = HASH.findall(text)
    return found[-1].strip() if found and found[-1].strip() else None


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, nested braces included."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                content = text[i:j].strip()
                return content or None
    return None  # unclosed


def answer_tag(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` pair."""
    found = ANSWER_TAG.findall(text)
    return found[-1].strip() if found and found[-1].strip() else None


def exact(text: str) -> str | None:
    """The whole completion, trimmed (the tiny presets answer with the bare answer)."""
    return text.strip() or None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "last_number": last_number,
    "hash": after_hash,
    "boxed": boxed,
    "answer_tag": answer_tag,
    "exact": exact,
}


def extract(name: str, text: str) -> str | None:
    """The answer extractor ``name`` reads from ``text``; None when it finds none."""
    try:
        extractor = EXTRACTORS[name]
    except KeyError:
        raise RLBenchError(
            f"unknown answer extractor {name!r}{did_you_mean(name, list(EXTRACTORS))}; "
            f"valid extractors: {', '.join(sorted(EXTRACTORS))}"
        ) from None
    return extractor(text)


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number if it is one number (``12``, ``-3.50``, ``1,200``, `` 12.``,
    ``$12``, ``3/4``, ``50%`` as 50), else None."""
    cleaned = text.strip().replace("−", "-").rstrip(".").strip()
    cleaned = cleaned.removeprefix("$").removesuffix("%").strip()
    if not NUMBER.fullmatch(cleaned):
        return None
    cleaned = cleaned.replace(",", "")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def canonical(answer: str) -> str:
    """One spelling per answer: numbers normalised (``12.0`` -> ``12``), other text trimmed."""
    number = parse_number(answer)
    if number is None:
        return " ".join(answer.split())
    return str(number.numerator) if number.denominator == 1 else str(number)


def answers_match(extracted: str | None, expected: str) -> bool:
    """Whether an extracted answer equals the expected one: as numbers when both are numbers,
    else as whitespace-normalised text. No answer never matches."""
    if extracted is None:
        return False
    a, b = parse_number(extracted), parse_number(expected)
    if a is not None and b is not None:
        return a == b
    return " ".join(extracted.split()) == " ".join(expected.split())


# ---------------------------------------------------------------- math-verify

#: ``task.verifier`` values: ``extractor`` reads the answer with an extractor and compares it
#: with ``answers_match``; ``math_verify`` compares with Hugging Face's math-verify.
VERIFIERS = ("extractor", "math_verify")
MATH_VERIFY_INSTALL = 'pip install "rlbench[math]"'
#: Seconds math-verify may spend parsing or comparing one answer: a pathological completion
#: (a huge power, a deep nesting) must cost a reward of 0, not a stalled step.
MATH_VERIFY_TIMEOUT_S = 5


def require_math_verify(field: str) -> None:
    """Raise ``ConfigError`` on ``field`` unless math-verify can be imported."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        raise ConfigError(
            field,
            "math_verify",
            f"needs the math-verify package, which is not installed: {MATH_VERIFY_INSTALL} "
            "(or pip install math-verify)",
        ) from None


def _timeout() -> int | None:
    # math-verify's timeout is signal.alarm, which only the main thread may set; elsewhere it
    # raises, so a thread runs without one
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> tuple[Any, ...]:
    # cached: the reward, the format check and maj@k's vote read the same completion, and
    # every completion of a prompt is compared with the same expected answer
    from math_verify import parse

    return tuple(parse(text, parsing_timeout=_timeout()))


def math_answer(text: str | None) -> str | None:
    """The answer math-verify reads from ``text`` in one spelling per value (``\\frac{3}{4}`` and
    ``0.75`` are ``3/4``, so majority votes count them together); None when it reads none."""
    if text is None:
        return None
    parsed = _parse(text)
    if not parsed:
        return None
    return canonical(str(parsed[0]))  # sympy's Float 0.75 prints 0.750000000000000: canonical -> 3/4


def math_answers_match(text: str | None, expected: str) -> bool:
    """Whether math-verify finds ``text`` equal to ``expected`` (parsed too, as math-verify asks
    of its gold answers: ``"0.75"`` and ``"7"`` parse as plain numbers). No answer never matches."""
    if text is None:
        return False
    from math_verify import verify

    gold, answer = _parse(expected), _parse(text)
    return bool(gold and answer) and verify(list(gold), list(answer), timeout_seconds=_timeout())
