"""Tests of the arithmetic task: determinism, disjoint splits, answers, rewards and config errors."""

from __future__ import annotations

import re
import time

import pytest

from rlbench.errors import ConfigError
from rlbench.registry import TASKS
from rlbench.task import Prompt
from tasks.arithmetic import Arithmetic, ArithmeticConfig, evaluate


def make(**overrides: object) -> Arithmetic:
    return Arithmetic(ArithmeticConfig(**overrides))  # type: ignore[arg-type]


def reference_answer(text: str) -> int:
    """Independent check: Python's own evaluation of the digits-and-operators expression."""
    assert re.fullmatch(r"\d+([+*-]\d+)*=", text), text
    return eval(text[:-1])  # safe: only digits and + - * (checked above)


def test_same_arguments_give_same_prompts() -> None:
    task = make(operators=("+", "-", "*"), operands=3)
    for split in ("train", "eval"):
        assert task.prompts(split, 100, seed=7) == task.prompts(split, 100, seed=7)
    # A fresh instance (fresh caches) agrees too: no hidden state.
    assert make(operators=("+", "-", "*"), operands=3).prompts("eval", 50, 3) == task.prompts("eval", 50, 3)


def test_different_seeds_give_different_train_prompts() -> None:
    task = make()
    assert task.prompts("train", 50, seed=0) != task.prompts("train", 50, seed=1)


def test_eval_split_is_fixed_and_distinct() -> None:
    task = make(eval_size=200)
    full = task.prompts("eval", 200, seed=0)
    assert len({p.text for p in full}) == 200
    # Any seed and n draws from the same 200 problems.
    assert {p.text for p in task.prompts("eval", 200, seed=5)} == {p.text for p in full}
    assert {p.text for p in task.prompts("eval", 30, seed=9)} <= {p.text for p in full}
    with pytest.raises(ValueError, match="eval_size=200"):
        task.prompts("eval", 201, seed=0)


def test_train_and_eval_never_share_a_problem() -> None:
    # 1-digit addition: 100 problems, half of them eval, so any leak would surely show up.
    task = make(digits=1, eval_size=50)
    eval_texts = {p.text for p in task.prompts("eval", 50, seed=0)}
    train_texts = {p.text for p in task.prompts("train", 5000, seed=1)}
    assert not eval_texts & train_texts
    assert len(eval_texts | train_texts) == 100  # together the splits cover the whole space
    big = make(operators=("+", "-", "*"), operands=3)
    big_eval = {p.text for p in big.prompts("eval", 200, seed=0)}
    assert not big_eval & {p.text for p in big.prompts("train", 5000, seed=4)}


def test_answers_are_correct_with_three_operands_and_all_operators() -> None:
    task = make(digits=2, digits_b=1, operands=3, operators=("+", "-", "*"))
    prompts = task.prompts("train", 500, seed=3) + task.prompts("eval", 200, seed=3)
    for prompt in prompts:
        assert int(prompt.answer) == reference_answer(prompt.text)
        assert str(int(prompt.answer)) == prompt.answer
        assert set(prompt.text + prompt.answer) <= set(Arithmetic.alphabet)
    assert any(p.answer.startswith("-") for p in prompts)  # '-' yields negative answers
    assert evaluate((2, 3, 4), ("+", "*")) == 14  # precedence: 2 + (3 * 4)
    assert evaluate((3, 15, 2), ("-", "*")) == -27  # 3 - (15 * 2)


def test_operand_digits() -> None:
    task = make(digits=3, digits_b=1, operands=2)
    for prompt in task.prompts("train", 300, seed=0):
        a, b = prompt.text[:-1].split("+")
        assert 100 <= int(a) <= 999 and len(a) == 3
        assert 0 <= int(b) <= 9 and len(b) == 1


def test_reward() -> None:
    """The last number the completion states is the answer; numbers compare as numbers."""
    prompt = Prompt(text="12+34=", answer="46")
    task, shaped = make(), make(format_reward=0.1)
    assert task.reward(prompt, "46") == 1.0
    assert task.reward(prompt, " 46 \n") == 1.0
    assert task.reward(prompt, "12+34=46") == 1.0  # the last number counts
    assert task.reward(prompt, "The answer is 46.") == 1.0  # a real model's sentence
    assert task.reward(prompt, "46.0") == 1.0 and task.reward(prompt, "046") == 1.0
    assert task.reward(prompt, "47") == 0.0
    assert task.reward(prompt, "46 or 47") == 0.0
    assert shaped.reward(prompt, "47") == 0.1
    assert shaped.reward(prompt, "-7") == 0.1
    assert shaped.reward(prompt, "=") == 0.0  # no number: no answer
    assert shaped.reward(prompt, "") == 0.0
    assert shaped.reward(prompt, "46") == 1.0
    assert not task.is_correct(prompt, "4 6")  # two numbers, the last is 6
    assert task.rewards([prompt, prompt], ["46", "x"]) == [1.0, 0.0]
    negative = Prompt(text="3-10=", answer="-7")
    assert task.reward(negative, "-7") == 1.0 and task.reward(negative, "7") == 0.0


def test_a_chosen_extractor_reads_the_answer() -> None:
    prompt = Prompt(text="12+34=", answer="46")
    tagged = make(extractor="answer_tag", format_reward=0.1)
    assert tagged.reward(prompt, "I add them. <answer>46</answer>") == 1.0
    assert tagged.reward(prompt, "46") == 0.0  # no tag: no answer, no format reward
    assert tagged.reward(prompt, "<answer>45</answer>") == 0.1
    with pytest.raises(ConfigError, match="extractor='lastnumber'.*last_number"):
        make(extractor="lastnumber")


@pytest.mark.parametrize(
    ("overrides", "text"),
    [
        ({"digits": 0}, "digits=0"),
        ({"digits_b": 10}, "digits_b=10"),
        ({"operands": 1}, "operands=1"),
        ({"operators": ("/",)}, "operators=('/',)"),
        ({"operators": ()}, "operators=()"),
        ({"format_reward": 1.5}, "format_reward=1.5"),
        ({"eval_size": 0}, "eval_size=0"),
        ({"digits": 1, "eval_size": 200}, "eval_size=200"),  # 1-digit addition: only 100 problems
    ],
)
def test_config_errors_name_field_and_value(overrides: dict[str, object], text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        ArithmeticConfig(**overrides)  # type: ignore[arg-type]
    assert str(excinfo.value).startswith(text + " is invalid")


def test_small_space_error_says_how_many_problems() -> None:
    with pytest.raises(ConfigError, match="half of the 100 distinct problems"):
        ArithmeticConfig(digits=1, eval_size=51)
    assert len(make(digits=1, eval_size=50).prompts("eval", 50, 0)) == 50


def test_demonstrations_are_correct_train_problems() -> None:
    task = make(operators=("+", "-", "*"), operands=3)
    eval_texts = {p.text for p in task.prompts("eval", task.config.eval_size, 0)}
    demos = task.demonstrations(300, seed=2)
    assert len(demos) == 300
    for text, answer in demos:
        assert text not in eval_texts
        assert int(answer) == reference_answer(text)
        assert task.reward(Prompt(text, answer), answer) == 1.0


def test_bad_split_names_valid_splits() -> None:
    with pytest.raises(ValueError, match="valid splits: 'train', 'eval'"):
        make().prompts("test", 1, 0)  # type: ignore[arg-type]


def test_registry_and_metadata() -> None:
    import tasks.arithmetic

    assert TASKS.get("arithmetic") is tasks.arithmetic.Arithmetic is Arithmetic
    assert Arithmetic.Config is ArithmeticConfig
    assert Arithmetic.__doc__ and Arithmetic.__doc__.strip().splitlines()[0]


def test_prompts_are_fast() -> None:
    task = make(operators=("+", "-", "*"), operands=3)
    task.prompts("eval", 10, 0)  # build the eval split once
    start = time.perf_counter()
    task.prompts("train", 1000, seed=0)
    assert time.perf_counter() - start < 0.05
