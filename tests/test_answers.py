"""Tests of the answer extractors and comparisons in ``rlbench.answers``.

Each extractor gets right, wrong, malformed and real-model-style verbose completions; the
expected value is what a person reading the completion would call its stated answer (None:
it states none).
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from rlbench.answers import (
    EXTRACTORS,
    after_hash,
    answer_tag,
    answers_match,
    boxed,
    canonical,
    exact,
    extract,
    last_number,
    parse_number,
)
from rlbench.errors import RLBenchError

VERBOSE = "Let me think step by step... 3 + 4 = 7, so the answer is **7**."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("46", "46"),
        ("The answer is 12.", "12"),  # the full stop ends the sentence, not a decimal
        (VERBOSE, "7"),
        ("So the total is 12 apples.", "12"),
        ("I first guessed 10 but it is 11", "11"),  # the last number wins
        ("x = -5", "-5"),
        ("3-10=-7", "-7"),  # a sign after '=' belongs to the number
        ("Total: $1,234.50.", "1,234.50"),
        ("1,234,567", "1,234,567"),
        ("It costs 3.25 dollars", "3.25"),
        ("half of it: 3/4", "3/4"),
        ("−7", "−7"),  # unicode minus, as typeset maths uses
        ("pages 10-20", "20"),  # a hyphen after a digit is not a sign
        ("COVID-19", "19"),
        ("(3+5)-2", "2"),  # a binary minus after ')' is not a sign either
        ("1,2345", "2345"),  # not a thousands group: 1 then 2345
        ("2,5,9", "9"),  # a list, not a thousands-separated number
        ("no numbers here", None),
        ("", None),
        ("- 7", "7"),  # a sign must touch its digits
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert last_number(text) == expected
    assert extract("last_number", text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 42", "42"),
        ("Natalia sold 48/2 = 24 clips in May.\n48 + 24 = 72\n#### 72", "72"),
        ("####72", "72"),
        ("#### 1,200  \n", "1,200"),
        ("#### -3", "-3"),
        ("#### 5\nsome trailing chatter", "5"),  # the answer is on the marker's line
        ("#### 3\n#### 4", "4"),  # the last marker wins
        ("#### 42 apples", "42 apples"),  # everything on the line (answers_match then fails)
        ("####", None),  # marker followed by nothing
        ("#### \n", None),
        ("####\n42", None),  # an empty marker line does not take the next line
        ("The answer is 42", None),  # no marker at all
        ("### 42", None),  # three hashes are a markdown heading, not the marker
    ],
)
def test_hash(text: str, expected: str | None) -> None:
    assert after_hash(text) == expected
    assert extract("hash", text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{42}", "42"),
        ("The final answer is $\\boxed{42}$.", "42"),
        ("\\boxed{ 4 }", "4"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces kept whole
        ("\\boxed{{3}}", "{3}"),
        ("First \\boxed{3}, no wait: \\boxed{5}", "5"),  # the last box wins
        ("\\boxed{-7}", "-7"),
        ("\\boxed{x^{2}+1} is the polynomial", "x^{2}+1"),
        ("\\boxed{}", None),  # empty box
        ("\\boxed{12", None),  # unclosed
        ("\\boxed{3} then \\boxed{4", None),  # the last box is unclosed: no answer
        ("\\boxed{\\frac{1}{2}", None),  # nested, outer box unclosed
        ("boxed{5}", None),  # no backslash: not the LaTeX command
        ("The answer is 42.", None),
    ],
)
def test_boxed(text: str, expected: str | None) -> None:
    assert boxed(text) == expected
    assert extract("boxed", text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>7</answer>", "7"),
        ("<think>3 + 4 = 7</think>\n<answer>7</answer>", "7"),
        ("<answer> 7 </answer>", "7"),
        ("<answer>\n 7\n</answer>", "7"),  # multi-line content, trimmed
        ("<answer>3</answer> hmm, actually <answer>4</answer>", "4"),  # the last pair wins
        ("I will answer in <answer> tags. <answer>5</answer>", "5"),  # a mention is not the answer
        ("<answer>(3+5)*2</answer>", "(3+5)*2"),
        ("<answer>2, 5, 9</answer>", "2, 5, 9"),
        ("<answer></answer>", None),  # empty
        ("<answer>  </answer>", None),  # blank
        ("<answer>5", None),  # unclosed
        ("5</answer>", None),  # never opened
        ("The answer is 5.", None),
    ],
)
def test_answer_tag(text: str, expected: str | None) -> None:
    assert answer_tag(text) == expected
    assert extract("answer_tag", text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("46", "46"),
        ("  46 \n", "46"),
        ("(3+5)*2", "(3+5)*2"),
        ("2,5,9", "2,5,9"),
        ("-7", "-7"),
        ("The answer is 7.", "The answer is 7."),  # exact reads everything, verbose or not
        (VERBOSE, VERBOSE),
        ("a\nb", "a\nb"),
        ("\t\n", None),
        ("", None),
    ],
)
def test_exact(text: str, expected: str | None) -> None:
    assert exact(text) == expected
    assert extract("exact", text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12", Fraction(12)),
        ("12.0", Fraction(12)),
        (" 12.", Fraction(12)),
        ("12..", Fraction(12)),
        ("-3.50", Fraction(-7, 2)),
        ("+5", Fraction(5)),
        ("−7", Fraction(-7)),
        ("1,200", Fraction(1200)),
        ("-1,200.5", Fraction(-2401, 2)),
        ("$12", Fraction(12)),
        ("50%", Fraction(50)),
        ("3/4", Fraction(3, 4)),
        ("007", Fraction(7)),
        ("1/0", None),  # no such number
        ("1,2", None),  # not a thousands group
        ("- 5", None),
        ("12 apples", None),
        ("twelve", None),
        ("", None),
        (".", None),
        ("1.2.3", None),
    ],
)
def test_parse_number(text: str, expected: Fraction | None) -> None:
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12.0", "12"),
        (" 12. ", "12"),
        ("1,200", "1200"),
        ("-0", "0"),
        ("0.5", "1/2"),
        ("6/4", "3/2"),
        ("  hello   world ", "hello world"),
        ("(3+5)*2", "(3+5)*2"),
    ],
)
def test_canonical(text: str, expected: str) -> None:
    assert canonical(text) == expected


@pytest.mark.parametrize(
    ("extracted", "expected", "match"),
    [
        ("12", "12", True),
        ("12.0", "12", True),
        (" 12.", "12", True),
        ("12", "12.0", True),
        ("1,200", "1200", True),
        ("$1,200", "1200", True),
        ("0.5", "1/2", True),
        ("-7", "−7", True),
        ("13", "12", False),
        ("-12", "12", False),
        ("12 apples", "12", False),  # text that is not one number compares as text
        ("  Paris ", "Paris", True),
        ("New   York", "New York", True),
        ("paris", "Paris", False),  # text comparison is case-sensitive
        ("(3+5)*2", "(3+5)*2", True),
        (None, "12", False),  # no answer never matches
        (None, "", False),
    ],
)
def test_answers_match(extracted: str | None, expected: str, match: bool) -> None:
    assert answers_match(extracted, expected) is match


def test_extractors_then_match_read_verbose_answers() -> None:
    assert answers_match(extract("last_number", VERBOSE), "7")
    assert answers_match(extract("boxed", "So $x = \\boxed{1,200.0}$."), "1200")
    assert answers_match(extract("hash", "48 + 24 = 72\n#### 72."), "72")
    assert answers_match(extract("answer_tag", "<think>...</think><answer> 12. </answer>"), "12")
    assert not answers_match(extract("boxed", "I cannot box this"), "12")


def test_unknown_extractor_names_the_valid_ones() -> None:
    with pytest.raises(RLBenchError) as excinfo:
        extract("boxxed", "\\boxed{1}")
    message = str(excinfo.value)
    assert "unknown answer extractor 'boxxed'" in message
    assert "did you mean 'boxed'?" in message
    assert "valid extractors: answer_tag, boxed, exact, hash, last_number" in message
    with pytest.raises(RLBenchError, match="valid extractors: answer_tag, boxed"):
        extract("nothing-like-it", "1")


def test_every_extractor_is_registered() -> None:
    assert set(EXTRACTORS) == {"last_number", "hash", "boxed", "answer_tag", "exact"}
