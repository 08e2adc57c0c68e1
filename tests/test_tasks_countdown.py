"""Tests of the countdown task: its expression parser, verifier, splits and config errors."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from rlbench.errors import ConfigError
from rlbench.registry import TASKS
from rlbench.task import Prompt
from tasks.countdown import (
    Countdown,
    CountdownConfig,
    ExpressionError,
    check_numbers,
    judge,
    parse_expression,
    random_solution,
    split_claim,
)


def make(**overrides: object) -> Countdown:
    return Countdown(CountdownConfig(**overrides))  # type: ignore[arg-type]


# A hand-made problem: numbers 2 3 5, target 16, solved by (3+5)*2.
PROMPT = Prompt(text="2 3 5 -> 16:", answer="(3+5)*2")


# --- the parser ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value", "used"),
    [
        ("(3+5)*2", 16, [3, 5, 2]),
        ("3+5*2", 13, [3, 5, 2]),  # * before +
        ("2*5+3", 13, [2, 5, 3]),
        ("(3+5)*(2)", 16, [3, 5, 2]),
        ("((3))", 3, [3]),
        ("8-3-2", 3, [8, 3, 2]),  # left to right: (8-3)-2, not 8-(3-2)
        ("8-(3-2)", 7, [8, 3, 2]),
        ("8/2/2", 2, [8, 2, 2]),  # (8/2)/2
        ("7/2*2", 7, [7, 2, 2]),  # exact: 7/2 is 3.5, not 3
        ("1/3+1/3+1/3", 1, [1, 3, 1, 3, 1, 3]),  # no floating-point rounding
        ("2-5", -3, [2, 5]),  # negative results are fine; only unary signs are not
        (" ( 3 + 5 ) * 2 ", 16, [3, 5, 2]),
        ("3 \\times 4 \\div 2", 6, [3, 4, 2]),  # LaTeX operators
        ("3×4÷2 − 1", 5, [3, 4, 2, 1]),  # unicode operators
        ("007", 7, [7]),
    ],
)
def test_parse_expression_values(text: str, value: int, used: list[int]) -> None:
    assert parse_expression(text) == (Fraction(value), used)


def test_parse_expression_returns_exact_fractions() -> None:
    assert parse_expression("7/2") == (Fraction(7, 2), [7, 2])
    assert parse_expression("1/3*3")[0] == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1/0", "division by zero at position 1"),
        ("5/(3-3)", "division by zero"),
        ("-3+5", "unary '-' at position 0 is not allowed"),  # unary minus policy: refused
        ("2*-3", "unary '-' at position 2 is not allowed"),
        ("+3", "unary '+' at position 0 is not allowed"),
        ("2(3+5)", "unexpected '(' at position 1: expected an operator"),  # no implicit *
        ("3 5", "unexpected '5' at position 2: expected an operator"),
        ("(1+2", "expected ')' to close the '(' at position 0, found the end"),
        ("1+2)", "unexpected ')' at position 3"),
        ("()", "expected a number or '(' at position 1, found ')'"),
        ("1+", "ends where a number or '(' was expected"),
        ("", "empty expression"),
        ("   ", "empty expression"),
        ("1.5*2", "unexpected '.' at position 1"),
        ("2**3", "expected a number or '(' at position 2, found '*'"),
        ("2^3", "unexpected '^'"),
        ("x+1", "found 'x'"),
        ("__import__('os')", "expected a number or '(' at position 0, found '_'"),
        ("(" * 40 + "1" + ")" * 40, "nested deeper than 32"),
        ("1+" * 150 + "1", "longer than 200 characters"),
    ],
)
def test_parse_expression_rejects_malformed_input(text: str, message: str) -> None:
    with pytest.raises(ExpressionError, match=re.escape(message)):
        parse_expression(text)


def test_garbage_is_never_evaluated(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the parser must not evaluate its input")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    for text in ("__import__('os').system('true')", "open('x')", "(lambda: 1)()", "1;2", "[1]"):
        with pytest.raises(ExpressionError):
            parse_expression(text)
    assert issubclass(ExpressionError, ValueError)


def test_check_numbers_counts_multiplicity() -> None:
    check_numbers([3, 5, 2], [2, 3, 5])
    check_numbers([3], [2, 3, 5])  # not every number need be used
    check_numbers([5, 5], [5, 5, 2])  # given twice, usable twice
    with pytest.raises(ExpressionError, match=r"uses 5 2 times but it is given 1 time\(s\)"):
        check_numbers([5, 5], [2, 3, 5])
    with pytest.raises(ExpressionError, match=r"uses 7, which is not one of the given numbers \[2, 3, 5\]"):
        check_numbers([7], [2, 3, 5])
    with pytest.raises(ExpressionError, match="uses 35, which is not"):
        check_numbers([35], [2, 3, 5])  # digits of two numbers run together make another number


def test_split_claim() -> None:
    assert split_claim("(3+5)*2") == ("(3+5)*2", None)
    assert split_claim(" (3+5)*2 = 16. ") == ("(3+5)*2 ", Fraction(16))
    assert split_claim("(3+5)*2.") == ("(3+5)*2", None)
    with pytest.raises(ExpressionError, match="more than one '='"):
        split_claim("3+5=8=8")
    with pytest.raises(ExpressionError, match="'sixteen' after '=' is not a number"):
        split_claim("(3+5)*2 = sixteen")


# --- the verifier --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "verdict"),
    [
        ("(3+5)*2", "correct"),
        ("2*(5+3)", "correct"),  # any expression reaching the target
        (" (3 + 5) * 2 \n", "correct"),
        ("(3+5)*2 = 16", "correct"),  # a stated result that is the target
        ("(3+5)*2=16.", "correct"),
        ("(5+3)×2", "correct"),
        ("3+5*2", "wrong"),  # 13: valid, misses
        ("3+5", "wrong"),  # 8: valid, misses
        ("(3+5)*2 = 17", "wrong"),  # reaches 16 but states a false result
        ("3+5 = 16", "wrong"),  # states the target without reaching it
        ("(3+5)*2*1", "invalid"),  # 1 is not given
        ("(3+3)*2+4", "invalid"),  # 3 used twice, given once
        ("16", "invalid"),  # the target itself is not a given number
        ("(3+5)*", "invalid"),
        ("-2+3*5+3", "invalid"),  # unary minus
        ("Let me think. (3+5)*2 = 16", "invalid"),  # exact reads the whole text: not an expression
        ("", "invalid"),
    ],
)
def test_verifier_cases(completion: str, verdict: str) -> None:
    task, shaped = make(), make(format_reward=0.2)
    assert task.judge(PROMPT, completion) == verdict
    assert task.is_correct(PROMPT, completion) is (verdict == "correct")
    assert task.reward(PROMPT, completion) == (1.0 if verdict == "correct" else 0.0)
    assert shaped.reward(PROMPT, completion) == {"correct": 1.0, "wrong": 0.2, "invalid": 0.0}[verdict]


@pytest.mark.parametrize(
    ("completion", "verdict"),
    [
        ("<think>3+5 is 8, times 2 is 16.</think>\n<answer>(3+5)*2</answer>", "correct"),
        ("<answer>(3 + 5) × 2 = 16</answer>", "correct"),
        ("I'll answer in <answer> tags.\n<answer>3*5+2</answer>", "wrong"),  # 17
        ("<answer>(3+5)*2", "invalid"),  # unclosed: nothing extracted
        ("The answer is (3+5)*2", "invalid"),  # no tag at all
    ],
)
def test_answer_tag_extractor_then_parse(completion: str, verdict: str) -> None:
    assert make(extractor="answer_tag").judge(PROMPT, completion) == verdict


def test_boxed_extractor_with_latex_operators() -> None:
    task = make(extractor="boxed")
    assert task.is_correct(PROMPT, "So we get $\\boxed{(3+5) \\times 2}$.")
    assert task.judge(PROMPT, "\\boxed{(3+5) \\cdot 2 = 16}") == "correct"
    assert task.judge(PROMPT, "\\boxed{16}") == "invalid"


def test_repeated_numbers_may_be_used_as_often_as_given() -> None:
    assert judge("5*5-3", [3, 5, 5], 22) == "correct"
    assert judge("5*5*5", [3, 5, 5], 125) == "invalid"
    assert judge(None, [3, 5, 5], 22) == "invalid"


def test_prompt_without_data_is_read_from_its_text() -> None:
    task = make()
    assert task.problem_of(PROMPT) == ((2, 3, 5), 16)
    generated = task.prompts("train", 1, seed=0)[0]
    assert task.problem_of(Prompt(generated.text, generated.answer)) == task.problem_of(generated)
    with pytest.raises(ValueError, match="not a countdown prompt"):
        task.problem_of(Prompt("12+34=", "46"))


def test_answer_key_ignores_blanks_and_stated_result() -> None:
    task = make()
    assert task.answer_key("(3 + 5) * 2 = 16") == task.answer_key("(3+5)*2") == "(3+5)*2"
    assert task.answer_key("(3+5") is None


# --- problems and splits -------------------------------------------------------------------


def test_same_arguments_give_same_prompts() -> None:
    task = make()
    for split in ("train", "eval"):
        assert task.prompts(split, 100, seed=7) == task.prompts(split, 100, seed=7)
    assert make().prompts("eval", 50, 3) == task.prompts("eval", 50, 3)  # fresh caches agree
    assert task.prompts("train", 50, seed=0) != task.prompts("train", 50, seed=1)


def test_train_and_eval_never_share_numbers() -> None:
    # 1..8, 2 numbers: 36 multisets, half of them eval, so a leak would surely show.
    task = make(count=2, min_number=1, max_number=8, eval_size=18)
    eval_prompts = task.prompts("eval", 18, seed=0)
    train_prompts = task.prompts("train", 2000, seed=1)
    eval_numbers = {p.data.numbers for p in eval_prompts}
    train_numbers = {p.data.numbers for p in train_prompts}
    assert len(eval_numbers) == 18
    assert not eval_numbers & train_numbers
    assert len(eval_numbers | train_numbers) == 36  # together they cover every multiset
    assert not {p.text for p in eval_prompts} & {p.text for p in train_prompts}


def test_eval_split_is_fixed() -> None:
    task = make(eval_size=100)
    full = {p.text for p in task.prompts("eval", 100, seed=0)}
    assert len(full) == 100
    assert {p.text for p in task.prompts("eval", 30, seed=9)} <= full
    assert {p.text for p in make(eval_size=100, split_seed=1).prompts("eval", 100, 0)} != full
    with pytest.raises(ValueError, match="eval_size=100"):
        task.prompts("eval", 101, seed=0)
    with pytest.raises(ValueError, match="valid splits: 'train', 'eval'"):
        task.prompts("test", 1, 0)  # type: ignore[arg-type]


def test_problems_are_well_formed_and_solvable() -> None:
    task = make(count=4, min_number=1, max_number=12)
    prompts = task.prompts("train", 300, seed=3) + task.prompts("eval", 200, seed=3)
    for prompt in prompts:
        numbers, target = prompt.data.numbers, prompt.data.target
        assert len(numbers) == 4 and list(numbers) == sorted(numbers)
        assert all(1 <= n <= 12 for n in numbers) and target >= 1
        assert prompt.text == " ".join(map(str, numbers)) + f" -> {target}:"
        value, used = parse_expression(prompt.answer)
        assert value == target and sorted(used) == list(numbers)  # the solution uses every number
        assert set(prompt.text + prompt.answer) <= set(Countdown.alphabet)
    # The generator mixes operators, and parenthesises when precedence needs it.
    answers = "".join(p.answer for p in prompts)
    assert all(op in answers for op in "+-*/()")


def test_demonstrations_are_correct_under_the_verifier() -> None:
    task = make(format_reward=0.1)
    eval_texts = {p.text for p in task.prompts("eval", task.config.eval_size, 0)}
    demos = task.demonstrations(300, seed=2)
    assert len(demos) == 300
    for text, completion in demos:
        assert text not in eval_texts
        prompt = Prompt(text, completion)  # no data: numbers and target read from the text
        assert task.is_correct(prompt, completion)
        assert task.reward(prompt, completion) == 1.0
        assert len(text) < 30 and len(completion) < 20


def test_random_solution_keeps_intermediates_positive_integers() -> None:
    import random

    rng = random.Random(0)
    for _ in range(500):
        numbers = [rng.randint(1, 20) for _ in range(5)]
        value, text = random_solution(numbers, rng)
        assert isinstance(value, int) and value >= 1
        parsed, used = parse_expression(text)
        assert parsed == value and sorted(used) == sorted(numbers)


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "text"),
    [
        ({"count": 1}, "count=1"),
        ({"count": 7}, "count=7"),
        ({"min_number": 0}, "min_number=0"),
        ({"min_number": 5, "max_number": 4}, "max_number=4"),
        ({"eval_size": 0}, "eval_size=0"),
        ({"count": 2, "max_number": 5, "eval_size": 8}, "eval_size=8"),  # 15 multisets: 7 at most
        ({"extractor": "last_number"}, "extractor='last_number'"),
        ({"extractor": "nope"}, "extractor='nope'"),
        ({"format_reward": 1.0}, "format_reward=1.0"),
    ],
)
def test_config_errors_name_field_and_value(overrides: dict[str, object], text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        CountdownConfig(**overrides)  # type: ignore[arg-type]
    assert str(excinfo.value).startswith(text + " is invalid")


def test_small_space_error_says_how_many_problems() -> None:
    with pytest.raises(ConfigError, match="an integer from 1 to 7 \\(half of the 15 distinct multisets"):
        CountdownConfig(count=2, max_number=5, eval_size=8)
    assert len(make(count=2, max_number=5, eval_size=7).prompts("eval", 7, 0)) == 7


def test_registry_and_metadata() -> None:
    assert TASKS.get("countdown") is Countdown
    assert Countdown.Config is CountdownConfig
    assert Countdown.default_extractor == "exact"
    assert Countdown.__doc__ and Countdown.__doc__.strip().splitlines()[0]
    for name in ("count", "min_number", "max_number", "eval_size", "split_seed"):
        assert name in CountdownConfig.__dataclass_fields__
