"""Tests of the multi-step arithmetic task: splits, left-to-right chains, outcome and step rewards."""

from __future__ import annotations

import re

import pytest

from rlbench.errors import ConfigError, RLBenchError
from rlbench.registry import TASKS
from rlbench.task import STEPS_NOT_WRITTEN, Prompt
from tasks.multistep import MultiStep, MultiStepConfig, Step, chain_steps, completion_lines, parse_step


def make(**overrides: object) -> MultiStep:
    return MultiStep(MultiStepConfig(**overrides))  # type: ignore[arg-type]


def left_to_right(text: str) -> int:
    """Independent check: the chain evaluated one operator at a time, with Python's eval."""
    assert re.fullmatch(r"\d+([+*-]\d+)+=", text), text
    tokens = re.findall(r"\d+|[+*-]", text[:-1])
    total = int(tokens[0])
    for op, x in zip(tokens[1::2], tokens[2::2], strict=True):
        total = eval(f"{total}{op}{x}")  # safe: integers and one operator
    return total


# 12+5-3= is answered 12+5=17, then 17-3=14.
PROMPT = Prompt(text="12+5-3=", answer="14", data=chain_steps((12, 5, 3), ("+", "-")))


def test_same_arguments_give_same_prompts() -> None:
    task = make(operators=("+", "-", "*"), operands=4)
    for split in ("train", "eval"):
        assert task.prompts(split, 100, seed=7) == task.prompts(split, 100, seed=7)
    # A fresh instance (fresh caches) agrees too: no hidden state.
    fresh = make(operators=("+", "-", "*"), operands=4)
    assert fresh.prompts("eval", 50, 3) == task.prompts("eval", 50, 3)
    assert fresh.demonstrations(20, 1) == task.demonstrations(20, 1)
    assert task.prompts("train", 50, seed=0) != task.prompts("train", 50, seed=1)


def test_eval_split_is_fixed_and_distinct() -> None:
    task = make(eval_size=200)
    full = task.prompts("eval", 200, seed=0)
    assert len({p.text for p in full}) == 200
    assert {p.text for p in task.prompts("eval", 200, seed=5)} == {p.text for p in full}
    assert {p.text for p in task.prompts("eval", 30, seed=9)} <= {p.text for p in full}
    assert {p.text for p in make(eval_size=200, split_seed=1).prompts("eval", 200, 0)} != {
        p.text for p in full
    }
    with pytest.raises(ValueError, match="eval_size=200"):
        task.prompts("eval", 201, seed=0)
    with pytest.raises(ValueError, match="valid splits: 'train', 'eval'"):
        task.prompts("test", 1, 0)  # type: ignore[arg-type]


def test_train_and_eval_never_share_a_problem() -> None:
    # Two 1-digit operands and two operators: 200 problems, half of them eval, so a leak shows.
    task = make(operands=2, eval_size=100)
    eval_texts = {p.text for p in task.prompts("eval", 100, seed=0)}
    train_texts = {p.text for p in task.prompts("train", 5000, seed=1)}
    assert not eval_texts & train_texts
    assert len(eval_texts | train_texts) == 200  # together the splits cover the whole space
    demo_texts = {text for text, _ in task.demonstrations(2000, seed=2)}
    assert not demo_texts & eval_texts


def test_chain_is_evaluated_left_to_right() -> None:
    assert chain_steps((2, 3, 4), ("+", "*")) == (Step(2, "+", 3, 5), Step(5, "*", 4, 20))  # not 14
    assert chain_steps((3, 8, 2), ("-", "-")) == (Step(3, "-", 8, -5), Step(-5, "-", 2, -7))
    assert str(Step(-5, "-", 2, -7)) == "-5-2=-7"
    task = make(digits=2, operands=4, operators=("+", "-", "*"))
    prompts = task.prompts("train", 300, seed=3) + task.prompts("eval", 200, seed=3)
    for prompt in prompts:
        steps = prompt.data
        assert len(steps) == 3 and prompt.answer == str(steps[-1].result)
        assert int(prompt.answer) == left_to_right(prompt.text)
        assert all(a.result == b.left for a, b in zip(steps, steps[1:]))  # a chain
        assert MultiStep.expected_steps(Prompt(prompt.text, prompt.answer)) == steps  # from the text
        assert all(10 <= int(x) <= 99 for x in re.findall(r"\d+", prompt.text))
    assert any(p.answer.startswith("-") for p in prompts)


def test_demonstrations_are_right_under_the_task_verifier() -> None:
    task = make(operators=("+", "-", "*"), operands=4)
    prompts = {p.text: p for p in task.prompts("train", 200, seed=2)}
    for text, completion in task.demonstrations(200, seed=2):
        prompt = prompts[text]
        assert completion == "\n".join(map(str, prompt.data))
        assert task.is_correct(prompt, completion) and task.reward(prompt, completion) == 1.0
        steps = task.step_rewards(prompt, completion)
        assert [r for _, r in steps] == [1.0, 1.0, 1.0]
        assert steps[-1][0] == len(completion)
        assert set(text + completion) <= set(MultiStep.alphabet)


def test_step_reward_offsets_on_hand_written_completions() -> None:
    task = make()
    # Right first step (ends at 7), wrong second step (ends at 15).
    assert task.step_rewards(PROMPT, "12+5=17\n17-3=15") == [(7, 1.0), (15, 0.0)]
    assert task.step_rewards(PROMPT, "12+5=17\n17-3=14") == [(7, 1.0), (15, 1.0)]
    # Wrong first step; a second step carrying the wrong value on is wrong too.
    assert task.step_rewards(PROMPT, "12+5=18\n18-3=15") == [(7, 0.0), (15, 0.0)]
    # A trailing newline and a blank line get no entry; offsets stay those of the text.
    assert task.step_rewards(PROMPT, "12+5=17\n\n17-3=14\n") == [(7, 1.0), (16, 1.0)]
    # Spaces are tolerated, numbers compare as numbers; the end excludes the newline only.
    assert task.step_rewards(PROMPT, " 12 + 5 = 17.0 \n17 − 3 = 14") == [(15, 1.0), (27, 1.0)]
    # Prose earns 0 and does not take a step's place; extra steps earn 0.
    chatty = "Let's go.\n12+5=17\n17-3=14\n14-0=14\nSo 14."
    assert task.step_rewards(PROMPT, chatty) == [(9, 0.0), (17, 1.0), (25, 1.0), (33, 0.0), (40, 0.0)]
    # Repeating a right step cannot farm reward: the repeat is compared with the next step.
    assert task.step_rewards(PROMPT, "12+5=17\n12+5=17\n12+5=17") == [(7, 1.0), (15, 0.0), (23, 0.0)]
    # Operands swapped is not the expected step; the step never written scores 0 at the end.
    assert task.step_rewards(PROMPT, "5+12=17") == [(7, 0.0), (STEPS_NOT_WRITTEN, 0.0)]
    # Stopping after a right first step: the missing second step is a step of reward 0, so a
    # policy cannot collect only positive step rewards by stopping early.
    assert task.step_rewards(PROMPT, "12+5=17") == [(7, 1.0), (STEPS_NOT_WRITTEN, 0.0)]
    assert task.step_rewards(PROMPT, "") == [(STEPS_NOT_WRITTEN, 0.0)]
    assert task.step_rewards(PROMPT, "\n \n") == [(STEPS_NOT_WRITTEN, 0.0)]
    # A prompt built without data (a hand-written one) gets its steps from its text.
    assert task.step_rewards(Prompt("12+5-3=", "14"), "12+5=17\n17-3=15") == [(7, 1.0), (15, 0.0)]
    with pytest.raises(RLBenchError, match="carries no expected steps"):
        task.step_rewards(Prompt("What is 2+2?", "4"), "2+2=4")
    assert MultiStep.has_steps


@pytest.mark.parametrize(
    ("completion", "plain", "shaped"),
    [
        ("12+5=17\n17-3=14", 1.0, 1.0),  # the demonstration
        ("12 + 5 = 17\n17 - 3 = 14\n", 1.0, 1.0),  # spaced, trailing newline
        ("14", 1.0, 1.0),  # the outcome reward checks the answer only
        ("12+5=17\n17-3=14\nThe answer is 14.", 1.0, 1.0),  # chatty instruct model
        ("First, 12 + 5 = 17. Then 17 - 3 = 14. So the answer is 14.", 1.0, 1.0),
        ("12+5=17\n17-3=15", 0.0, 0.1),  # wrong, but every line is a step
        ("12+5=18\n18-3=15", 0.0, 0.1),
        ("12+5=17\n17-3=14\n14+1=15", 0.0, 0.1),  # an extra step changes the last number
        ("12+5=17\nthen 17-3=15", 0.0, 0.0),  # wrong and not in step shape
        ("17\n15", 0.0, 0.0),  # wrong, lines are bare numbers
        ("The answer is fifteen.", 0.0, 0.0),
        ("", 0.0, 0.0),
        ("12+5=17\n17-3=", 0.0, 0.0),  # unfinished: last number is 3, not a step
        ("12+5=17\n17-3=-14", 0.0, 0.1),  # sign matters
    ],
)
def test_outcome_reward(completion: str, plain: float, shaped: float) -> None:
    assert make().reward(PROMPT, completion) == plain
    assert make(format_reward=0.1).reward(PROMPT, completion) == shaped
    assert make().is_correct(PROMPT, completion) == (plain == 1.0)


def test_parse_step_and_lines() -> None:
    assert parse_step("12+5=17") == (12, "+", 5, 17)
    assert parse_step(" -5 - 2 = -7 ") == (-5, "-", 2, -7)
    assert parse_step("3 × 4 = 12") == (3, "*", 4, 12)
    assert parse_step("1,200+5=1,205") == (1200, "+", 5, 1205)
    assert parse_step("12+5=17.") is None  # a full stop makes it prose
    assert parse_step("12+5") is None and parse_step("x+5=7") is None and parse_step("") is None
    assert completion_lines("ab\n\ncd\n") == [(2, "ab"), (6, "cd")]


def test_hash_extractor_option() -> None:
    task = make(extractor="hash")
    assert task.reward(PROMPT, "12+5=17\n17-3=14\n#### 14") == 1.0
    assert task.reward(PROMPT, "12+5=17\n17-3=14") == 0.0  # no #### line


@pytest.mark.parametrize(
    ("overrides", "text"),
    [
        ({"operands": 1}, "operands=1"),
        ({"digits": 0}, "digits=0"),
        ({"digits": 10}, "digits=10"),
        ({"operators": ("/",)}, "operators=('/',)"),
        ({"operators": ()}, "operators=()"),
        ({"operators": ("+", "+")}, "operators=('+', '+')"),
        ({"format_reward": 1.0}, "format_reward=1.0"),
        ({"eval_size": 0}, "eval_size=0"),
        ({"operands": 2, "eval_size": 200}, "eval_size=200"),  # only 200 problems: at most 100
        ({"split_seed": "a"}, "split_seed='a'"),
    ],
)
def test_config_errors_name_field_and_value(overrides: dict[str, object], text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        MultiStepConfig(**overrides)  # type: ignore[arg-type]
    assert str(excinfo.value).startswith(text + " is invalid")


def test_small_space_error_says_how_many_problems() -> None:
    with pytest.raises(ConfigError, match="half of the 200 distinct problems"):
        MultiStepConfig(operands=2, eval_size=101)
    assert MultiStepConfig().problem_count() == 10**3 * 2**2


def test_registry_and_metadata() -> None:
    assert TASKS.get("multistep") is MultiStep
    assert MultiStep.Config is MultiStepConfig
    assert MultiStep.__doc__ and MultiStep.__doc__.strip().splitlines()[0]
    from rlbench.config_help import field_docs

    docs = field_docs(MultiStepConfig)
    assert all(docs.get(name) for name in ("operands", "digits", "operators", "eval_size", "split_seed"))
    assert "left to right" in docs["operators"]


def test_step_rewards_land_on_the_token_that_ends_each_step() -> None:
    """The collector's tensors: a step's reward on its last character's token; a step never
    written on the completion's EOS token."""
    import torch

    from rlbench.experience import step_tensors
    from rlbench.policy import char_tokenizer

    tokenizer = char_tokenizer(MultiStep.alphabet)
    eos = tokenizer.eos_token_id
    completions = ["12+5=17\n17-3=14", "12+5=17"]
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + [eos] for c in completions]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])
    rewards, ends = step_tensors(make(), tokenizer, [PROMPT, PROMPT], completions, ids, mask, torch.zeros(2))
    # row 0: steps end at characters 7 and 15 -> tokens 6 and 14 (one char per token)
    assert ends[0].nonzero().flatten().tolist() == [6, 14] and rewards[0, [6, 14]].tolist() == [1.0, 1.0]
    # row 1: its one step ends at token 6; the missing second step sits on its EOS (token 7)
    assert ends[1].nonzero().flatten().tolist() == [6, 7] and rewards[1, [6, 7]].tolist() == [1.0, 0.0]
    # a completion with a hidden special token gets no steps
    _, none = step_tensors(make(), tokenizer, [PROMPT, PROMPT], completions, ids, mask, torch.tensor([1, 0]))
    assert none[0].sum() == 0 and none[1].sum() == 2
