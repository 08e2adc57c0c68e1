"""``task.verifier: math_verify``: GSM8K and MATH-style answers checked by Hugging Face's
math-verify, where the extractors miss LaTeX, a ``\\boxed{}`` followed by other numbers and
percentages; and the default verifier of the integer tasks, unchanged."""

from __future__ import annotations

import sys

import pytest

from rlbench.cli import main
from rlbench.config import load_config
from rlbench.errors import ConfigError
from rlbench.registry import TASKS
from rlbench.task import Prompt, Task, TaskOptions


def build_task(*overrides: str) -> Task:
    config = load_config(None, list(overrides))
    return TASKS.get(config.task.name)(config.task.options)


@pytest.fixture(scope="module")
def math_task() -> Task:
    pytest.importorskip("math_verify", reason='math-verify is needed: pip install "rlbench[math]"')
    return build_task("task.name=jsonl", "task.verifier=math_verify")


@pytest.fixture(scope="module")
def default_task() -> Task:
    return build_task("task.name=jsonl")


# completion, expected answer (as a task's Prompt holds it), math-verify's verdict, the default's
CASES = [
    (r"Three of four is $\frac{3}{4}$.", "0.75", True, False),  # last_number reads 4
    (r"\frac{3}{4}", "0.75", True, False),
    (r"So the answer is \boxed{7} and 8 other apples are left.", "7", True, False),  # reads 8
    ("The discount is 25%", "0.25", True, False),  # the extractor reads 25
    ("The answer is 0.75.", "0.75", True, True),
    ("1,200 apples in all.", "1200", True, True),
    # wrong answers stay wrong
    (r"It is $\frac{2}{3}$.", "0.75", False, False),
    (r"\boxed{8}, not 7", "7", False, True),  # math-verify takes the box; last_number the 7
    ("The answer is 13.", "12", False, False),
    ("The discount is 25%", "0.5", False, False),
    ("I do not know.", "3", False, False),
    ("", "3", False, False),
]


@pytest.mark.parametrize(("completion", "expected", "math_verdict", "default_verdict"), CASES)
def test_math_verify_reads_what_the_extractor_misses(
    math_task, default_task, completion, expected, math_verdict, default_verdict
):
    prompt = Prompt("q", expected)
    assert math_task.is_correct(prompt, completion) is math_verdict
    assert default_task.is_correct(prompt, completion) is default_verdict


def test_a_percentage_is_also_its_percent_value(math_task):
    """math-verify accepts ``25%`` for 0.25 and for 25 alike (it reads a percentage either way):
    a lenience of the package, kept as it is."""
    assert math_task.is_correct(Prompt("q", "0.25"), "25%")
    assert math_task.is_correct(Prompt("q", "25"), "25%")
    assert not math_task.is_correct(Prompt("q", "2.5"), "25%")


def test_rewards_and_votes_under_math_verify():
    pytest.importorskip("math_verify")
    task = build_task("task.name=jsonl", "task.verifier=math_verify", "task.format_reward=0.1")
    prompt = Prompt("q", "0.75")
    assert task.reward(prompt, r"$\frac{3}{4}$") == 1.0
    assert task.reward(prompt, r"$\frac{2}{3}$") == 0.1  # an answer was read: well formed
    assert task.reward(prompt, "no idea") == 0.0
    # maj@k votes on one spelling per value
    assert task.answer_key(r"$\frac{3}{4}$") == task.answer_key("0.75") == "3/4"
    assert task.answer_key(r"\boxed{7} and 8 more") == "7"
    assert task.answer_key("no idea") is None


def test_an_explicit_extractor_cuts_out_what_math_verify_reads():
    pytest.importorskip("math_verify")
    task = build_task("task.name=jsonl", "task.verifier=math_verify", "task.extractor=answer_tag")
    prompt = Prompt("q", "0.75")
    assert task.is_correct(prompt, r"Working: 1/2 + 1/4. <answer>\frac{3}{4}</answer> (checked 5 times)")
    assert not task.is_correct(prompt, r"$\frac{3}{4}$")  # no tag: no answer
    assert task.reward(prompt, r"$\frac{3}{4}$") == 0.0


def test_the_integer_tasks_keep_their_extractor_by_default():
    assert TaskOptions().verifier == "extractor"
    config = load_config(None)  # arithmetic, the default task
    assert config.task.options.verifier == "extractor"
    task = TASKS.get("arithmetic")(config.task.options)
    assert task.verifier == "extractor" and task.extractor == "last_number"
    prompt = Prompt("12+34=", "46")
    assert task.is_correct(prompt, "46") and task.is_correct(prompt, "The answer is 46.")
    assert task.extract("12+34=46") == "46"
    assert not task.is_correct(prompt, r"\boxed{46} and 47")  # as before: the last number


def test_math_verify_serves_the_arithmetic_and_multistep_tasks():
    pytest.importorskip("math_verify")
    arithmetic = build_task("task.verifier=math_verify")
    assert arithmetic.is_correct(Prompt("12+34=", "46"), "12+34=46")
    multistep = build_task("task.name=multistep", "task.verifier=math_verify")
    assert multistep.is_correct(Prompt("12+5-3=", "14"), "12+5=17\n17-3=14")


@pytest.mark.parametrize("name", ["countdown", "sort", "reverse"])
def test_a_task_with_its_own_check_refuses_math_verify(name):
    pytest.importorskip("math_verify")
    with pytest.raises(ConfigError) as err:
        build_task(f"task.name={name}", "task.verifier=math_verify")
    assert str(err.value).startswith(
        f"task.verifier='math_verify' is invalid: task {type_name(name)} checks its answers its own way, "
        "so it cannot use math-verify"
    )


def type_name(task: str) -> str:
    return TASKS.get(task).__name__


MISSING = (
    "task.verifier='math_verify' is invalid: needs the math-verify package, which is not "
    'installed: pip install "rlbench[math]" (or pip install math-verify)'
)


def test_without_the_package_choosing_it_is_a_config_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # `import math_verify` raises ImportError
    with pytest.raises(ConfigError) as err:
        load_config(None, ["task.name=jsonl", "task.verifier=math_verify"])
    assert str(err.value) == MISSING
    assert main(["config", "--show", "task.name=jsonl", "task.verifier=math_verify"]) == 2
    assert capsys.readouterr().err.strip() == f"rlbench config: error: {MISSING}"
    load_config(None, ["task.name=jsonl"])  # the default verifier never needs it
