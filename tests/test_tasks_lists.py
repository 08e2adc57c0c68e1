"""Tests of the list tasks (sort, reverse): list parsing, verifier, dense reward, splits, config."""

from __future__ import annotations

import re

import pytest

from rlbench.errors import ConfigError
from rlbench.registry import TASKS
from rlbench.task import Prompt
from tasks.lists import ListConfig, ListFormatError, ListTask, format_list, parse_list, positions_right
from tasks.reverse import Reverse
from tasks.sort import Sort

TASK_CLASSES = [Sort, Reverse]


def make(cls: type[ListTask], **overrides: object) -> ListTask:
    return cls(ListConfig(**overrides))  # type: ignore[arg-type]


SORT_PROMPT = Prompt(text="sort 5,2,9:", answer="2,5,9")
REVERSE_PROMPT = Prompt(text="reverse 5,2,9:", answer="9,2,5")


# --- reading lists -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("2,5,9", (2, 5, 9)),
        ("2, 5, 9", (2, 5, 9)),
        (" 2 , 5 ,9 \n", (2, 5, 9)),
        ("2 5 9", (2, 5, 9)),  # blanks alone separate too
        ("[2, 5, 9]", (2, 5, 9)),
        ("(2,5,9)", (2, 5, 9)),
        ("[2, 5, 9].", (2, 5, 9)),  # a final full stop
        ("-3,0,+4,−7", (-3, 0, 4, -7)),  # signs, unicode minus
        ("7", (7,)),
        ("[]", ()),
        ("007,10", (7, 10)),
    ],
)
def test_parse_list(text: str, values: tuple[int, ...]) -> None:
    assert parse_list(text) == values


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty answer"),
        (".", "empty answer"),
        ("2,,5", "'' is not an integer"),
        ("2,5,", "'' is not an integer"),  # a trailing comma leaves an empty item
        ("[2,5", "unclosed '['"),
        ("[2,5)", "unclosed '['"),
        ("[", "unclosed '['"),
        ("2.5,3", "'2.5' is not an integer"),
        ("two, five", "'two' is not an integer"),
        ("The list is 2,5,9", "'The' is not an integer"),
        ("[[2,5]]", "'[2' is not an integer"),
        ("- 3", "'-' is not an integer"),
    ],
)
def test_parse_list_rejects(text: str, message: str) -> None:
    with pytest.raises(ListFormatError, match=re.escape(message)):
        parse_list(text)
    assert issubclass(ListFormatError, ValueError)


def test_format_list_and_positions_right() -> None:
    assert format_list((2, -5, 9)) == "2,-5,9"
    assert parse_list(format_list((2, -5, 9))) == (2, -5, 9)
    assert positions_right((2, 5, 9), (2, 5, 9)) == 1.0
    assert positions_right((2, 5, 9), (2, 9, 5)) == pytest.approx(1 / 3)
    assert positions_right((2, 5, 9), (2, 5)) == pytest.approx(2 / 3)  # missing item: a wrong position
    assert positions_right((2, 5, 9), (2, 5, 9, 9)) == 0.75  # extra item: over the longer length
    assert positions_right((2, 5, 9), ()) == 0.0
    assert positions_right((), ()) == 1.0


# --- the verifier --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "completion", "correct", "dense"),
    [
        (SORT_PROMPT, "2,5,9", True, 1.0),
        (SORT_PROMPT, "[2, 5, 9]", True, 1.0),
        (SORT_PROMPT, " 2 5 9.\n", True, 1.0),
        (SORT_PROMPT, "2,9,5", False, 1 / 3),
        (SORT_PROMPT, "9,5,2", False, 1 / 3),  # descending: only the middle is right
        (SORT_PROMPT, "2,5", False, 2 / 3),  # one short
        (SORT_PROMPT, "2,5,9,9", False, 3 / 4),  # one too many
        (SORT_PROMPT, "5,2,9", False, 1 / 3),  # the prompt echoed back
        (SORT_PROMPT, "1,2,3", False, 0.0),
        (SORT_PROMPT, "2,5,9,", False, None),  # malformed: no credit, even dense
        (SORT_PROMPT, "The sorted list is [2, 5, 9].", False, None),  # verbose, read whole by exact
        (SORT_PROMPT, "", False, None),
        (REVERSE_PROMPT, "9,2,5", True, 1.0),
        (REVERSE_PROMPT, "[9, 2, 5]", True, 1.0),
        (REVERSE_PROMPT, "2,5,9", False, 0.0),  # sorted instead of reversed
        (REVERSE_PROMPT, "9,5,2", False, 1 / 3),
        (REVERSE_PROMPT, "9,2", False, 2 / 3),
        (REVERSE_PROMPT, "9;2;5", False, None),
    ],
)
def test_verifier_cases(prompt: Prompt, completion: str, correct: bool, dense: float | None) -> None:
    cls = Sort if prompt.text.startswith("sort") else Reverse
    exact, partial, shaped = make(cls), make(cls, dense=True), make(cls, format_reward=0.1)
    assert exact.is_correct(prompt, completion) is correct
    assert exact.reward(prompt, completion) == (1.0 if correct else 0.0)
    if dense is None:  # malformed: 0 whatever the options
        assert partial.reward(prompt, completion) == shaped.reward(prompt, completion) == 0.0
    else:
        assert partial.reward(prompt, completion) == pytest.approx(dense)
        assert shaped.reward(prompt, completion) == (1.0 if correct else 0.1)
    assert (partial.reward(prompt, completion) == 1.0) is correct  # 1 only when fully right


def test_dense_reward_is_at_least_the_format_reward() -> None:
    task = make(Sort, dense=True, format_reward=0.5)
    assert task.reward(SORT_PROMPT, "1,2,3") == 0.5  # 0 positions right, but well formed
    assert task.reward(SORT_PROMPT, "2,5,8") == pytest.approx(2 / 3)
    assert task.reward(SORT_PROMPT, "nonsense") == 0.0


@pytest.mark.parametrize(
    ("extractor", "completion", "correct"),
    [
        ("answer_tag", "<think>2 < 5 < 9</think>\n<answer>[2, 5, 9]</answer>", True),
        ("answer_tag", "I answer in <answer> tags: <answer>2,5,9</answer>", True),
        ("answer_tag", "<answer>2,9,5</answer>", False),
        ("answer_tag", "The sorted list is 2,5,9", False),  # no tag
        ("boxed", "Sorting gives $\\boxed{2, 5, 9}$.", True),
        ("boxed", "\\boxed{[2,5,9]}", True),
        ("hash", "5 > 2, so 2 comes first.\n#### 2, 5, 9", True),
    ],
)
def test_verbose_answers_with_an_extractor(extractor: str, completion: str, correct: bool) -> None:
    assert make(Sort, extractor=extractor).is_correct(SORT_PROMPT, completion) is correct


def test_answer_key_normalises_the_list() -> None:
    task = make(Sort)
    assert task.answer_key("[2, 5, 9]") == task.answer_key("2,5,9") == "2,5,9"
    assert task.answer_key("2,,9") is None


# --- problems and splits -------------------------------------------------------------------


@pytest.mark.parametrize("cls", TASK_CLASSES)
def test_same_arguments_give_same_prompts(cls: type[ListTask]) -> None:
    task = make(cls)
    for split in ("train", "eval"):
        assert task.prompts(split, 100, seed=7) == task.prompts(split, 100, seed=7)
    assert make(cls).prompts("eval", 50, 3) == task.prompts("eval", 50, 3)  # fresh caches agree
    assert task.prompts("train", 50, seed=0) != task.prompts("train", 50, seed=1)


@pytest.mark.parametrize("cls", TASK_CLASSES)
def test_train_and_eval_never_share_a_list(cls: type[ListTask]) -> None:
    # Length 2, values 0-4: 25 lists, 12 of them eval, so a leak would surely show.
    task = make(cls, min_length=2, max_length=2, max_value=4, eval_size=12)
    eval_texts = {p.text for p in task.prompts("eval", 12, seed=0)}
    train_texts = {p.text for p in task.prompts("train", 2000, seed=1)}
    assert len(eval_texts) == 12
    assert not eval_texts & train_texts
    assert len(eval_texts | train_texts) == 25


@pytest.mark.parametrize("cls", TASK_CLASSES)
def test_eval_split_is_fixed(cls: type[ListTask]) -> None:
    task = make(cls, eval_size=100)
    full = {p.text for p in task.prompts("eval", 100, seed=0)}
    assert len(full) == 100
    assert {p.text for p in task.prompts("eval", 30, seed=9)} <= full
    with pytest.raises(ValueError, match="eval_size=100"):
        task.prompts("eval", 101, seed=0)
    with pytest.raises(ValueError, match="valid splits: 'train', 'eval'"):
        task.prompts("test", 1, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", TASK_CLASSES)
def test_prompts_follow_the_config(cls: type[ListTask]) -> None:
    task = make(cls, min_length=2, max_length=4, min_value=-5, max_value=12)
    prompts = task.prompts("train", 500, seed=3) + task.prompts("eval", 200, seed=3)
    verb = "sort" if cls is Sort else "reverse"
    for prompt in prompts:
        assert prompt.text == f"{verb} {format_list(prompt.data)}:"
        assert 2 <= len(prompt.data) <= 4 and all(-5 <= v <= 12 for v in prompt.data)
        assert parse_list(prompt.answer) == cls.transform(prompt.data)
        assert set(prompt.text + prompt.answer) <= set(cls.alphabet)
    assert {len(p.data) for p in prompts} == {2, 4, 3}
    assert any(v < 0 for p in prompts for v in p.data)


def test_transforms() -> None:
    assert Sort.transform((5, 2, 9, 2)) == (2, 2, 5, 9)
    assert Reverse.transform((5, 2, 9, 2)) == (2, 9, 2, 5)


@pytest.mark.parametrize("cls", TASK_CLASSES)
def test_demonstrations_are_correct_under_the_verifier(cls: type[ListTask]) -> None:
    task = make(cls, dense=True, format_reward=0.1)
    eval_texts = {p.text for p in task.prompts("eval", task.config.eval_size, 0)}
    demos = task.demonstrations(300, seed=2)
    assert len(demos) == 300
    for text, completion in demos:
        assert text not in eval_texts
        listed = parse_list(text.split(" ", 1)[1].removesuffix(":"))
        expected = sorted(listed) if cls is Sort else listed[::-1]  # independent of transform
        assert parse_list(completion) == tuple(expected)
        prompt = Prompt(text, completion)
        assert task.is_correct(prompt, completion) and task.reward(prompt, completion) == 1.0
        assert len(text) < 30 and len(completion) < 20


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "text"),
    [
        ({"min_length": 0}, "min_length=0"),
        ({"min_length": 4, "max_length": 3}, "max_length=3"),
        ({"min_value": 1.5}, "min_value=1.5"),
        ({"min_value": 5, "max_value": 4}, "max_value=4"),
        ({"dense": "yes"}, "dense='yes'"),
        ({"eval_size": 0}, "eval_size=0"),
        ({"min_length": 1, "max_length": 1, "eval_size": 6}, "eval_size=6"),  # 10 lists: 5 at most
        ({"extractor": "last_number"}, "extractor='last_number'"),
        ({"prompt_format": "html"}, "prompt_format='html'"),
    ],
)
def test_config_errors_name_field_and_value(overrides: dict[str, object], text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        ListConfig(**overrides)  # type: ignore[arg-type]
    assert str(excinfo.value).startswith(text + " is invalid")


def test_small_space_error_says_how_many_lists() -> None:
    with pytest.raises(ConfigError, match="an integer from 1 to 5 \\(half of the 10 distinct lists"):
        ListConfig(min_length=1, max_length=1, eval_size=6)
    assert ListConfig().problem_count() == 10**3 + 10**4 + 10**5


@pytest.mark.parametrize(("name", "cls"), [("sort", Sort), ("reverse", Reverse)])
def test_registry_and_metadata(name: str, cls: type[ListTask]) -> None:
    assert TASKS.get(name) is cls
    assert cls.Config is ListConfig
    assert cls.default_extractor == "exact"
    assert cls.__doc__ and cls.__doc__.strip().splitlines()[0]
