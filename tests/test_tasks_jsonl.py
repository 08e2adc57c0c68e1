"""Tests of the JSONL (GSM8K-format) task: the shipped file, its generator, splits, the verifier
and every malformed-file error."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlbench.errors import ConfigError, RLBenchError
from rlbench.registry import TASKS
from rlbench.task import Prompt
from tasks.jsonl import SAMPLE_FILE, JsonlConfig, JsonlTask, read_problems

GENERATOR = Path(__file__).parents[1] / "tasks" / "data" / "make_word_problems.py"


def make(**overrides: object) -> JsonlTask:
    return JsonlTask(JsonlConfig(**overrides))  # type: ignore[arg-type]


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def record(question: str, answer: str) -> str:
    return json.dumps({"question": question, "answer": answer})


def numbered(n: int) -> list[str]:
    """``n`` well-formed lines: 'What is i+1?' answered 'i+1=...\\n#### ...'."""
    return [record(f"What is {i}+1?", f"{i}+1={i + 1}\n#### {i + 1}") for i in range(n)]


def test_shipped_file_loads_with_300_problems() -> None:
    problems = read_problems(SAMPLE_FILE)
    assert len(problems) == 300
    task = make()
    assert task.path == SAMPLE_FILE
    assert len(task.eval_split) == 50 and len(task.train_split) == 250
    for p in problems:
        assert len(p.question) <= 70 and p.solution.endswith(f"#### {p.answer}")
        assert set(p.question + p.solution) <= set(JsonlTask.alphabet)
        assert len(p.solution.split("\n")) in (2, 3)  # one or two lines of arithmetic, then ####


def test_generator_is_deterministic_and_made_the_shipped_file(tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        subprocess.run([sys.executable, str(GENERATOR), str(tmp_path / name)], check=True)
    first = (tmp_path / "a.jsonl").read_bytes()
    assert first == (tmp_path / "b.jsonl").read_bytes()
    assert first == SAMPLE_FILE.read_bytes()


def test_same_arguments_give_same_prompts() -> None:
    task = make()
    for split in ("train", "eval"):
        assert task.prompts(split, 40, seed=7) == task.prompts(split, 40, seed=7)
    fresh = make()
    assert fresh.prompts("eval", 50, 3) == task.prompts("eval", 50, 3)
    assert fresh.demonstrations(20, 1) == task.demonstrations(20, 1)
    assert task.prompts("train", 40, seed=0) != task.prompts("train", 40, seed=1)


def test_splits_are_disjoint_fixed_and_cover_the_file() -> None:
    task = make(eval_size=100)
    eval_texts = {p.text for p in task.prompts("eval", 100, seed=0)}
    assert len(eval_texts) == 100
    assert {p.text for p in task.prompts("eval", 30, seed=9)} <= eval_texts
    train_texts = {p.text for p in task.prompts("train", 3000, seed=1)}
    assert not eval_texts & train_texts
    assert len(eval_texts | train_texts) == 300  # 3000 draws reach every train question
    assert not {text for text, _ in task.demonstrations(500, seed=2)} & eval_texts
    other_seed = {p.text for p in make(eval_size=100, split_seed=1).prompts("eval", 100, 0)}
    assert other_seed != eval_texts
    with pytest.raises(ValueError, match="eval_size=100"):
        task.prompts("eval", 101, seed=0)
    with pytest.raises(ValueError, match="valid splits: 'train', 'eval'"):
        task.prompts("test", 1, 0)  # type: ignore[arg-type]


def test_split_does_not_depend_on_line_order(tmp_path: Path) -> None:
    lines = numbered(20)
    forward = make(path=write_lines(tmp_path / "f.jsonl", lines), eval_size=5)
    backward = make(path=write_lines(tmp_path / "b.jsonl", lines[::-1]), eval_size=5)
    assert forward.eval_split == backward.eval_split


def test_repeated_questions_keep_the_first_line(tmp_path: Path) -> None:
    lines = [*numbered(4), record("What is 0+1?", "0+1=2\n#### 2")]
    problems = read_problems(Path(write_lines(tmp_path / "d.jsonl", lines)))
    assert len(problems) == 4 and problems[0].answer == "1"


def test_demonstrations_are_right_under_the_task_verifier() -> None:
    task = make()
    prompts = {p.text: p for p in task.prompts("train", 300, seed=4)}
    demos = task.demonstrations(300, seed=4)
    assert [text for text, _ in demos] == [p.text for p in task.prompts("train", 300, seed=4)]
    for text, solution in demos:
        prompt = prompts[text]
        assert task.is_correct(prompt, solution) and task.reward(prompt, solution) == 1.0
        assert solution.endswith(f"#### {prompt.answer}")


# "Ann has 7 pens and buys 5 more." expects 12; real models answer in many ways.
PROMPT = Prompt(text="Ann has 7 pens and buys 5 more. How many pens does she have?", answer="12")


@pytest.mark.parametrize(
    ("completion", "plain", "shaped"),
    [
        ("7+5=12\n#### 12", 1.0, 1.0),  # GSM8K style
        ("12", 1.0, 1.0),
        ("Ann starts with 7 pens. She buys 5 more, so 7 + 5 = 12. She has 12 pens.", 1.0, 1.0),
        ("The answer is 12.", 1.0, 1.0),
        ("She has 12.0 pens", 1.0, 1.0),  # numbers compare as numbers
        ("**Answer:** $12", 1.0, 1.0),
        ("7+5=13\n#### 13", 0.0, 0.1),  # wrong, but an answer is stated
        ("She has 12 pens... no wait, 13.", 0.0, 0.1),  # the last number counts
        ("7+5=12\n#### 12\nThat took 2 steps.", 0.0, 0.1),  # trailing chatter changes it
        ("I am not sure.", 0.0, 0.0),  # no number at all
        ("", 0.0, 0.0),
        ("twelve", 0.0, 0.0),
    ],
)
def test_verifier(completion: str, plain: float, shaped: float) -> None:
    assert make().reward(PROMPT, completion) == plain
    assert make(format_reward=0.1).reward(PROMPT, completion) == shaped
    assert make().is_correct(PROMPT, completion) == (plain == 1.0)


def test_hash_extractor_and_canonical_answers(tmp_path: Path) -> None:
    assert make(extractor="hash").reward(PROMPT, "7+5=12\n#### 12\nThat took 2 steps.") == 1.0
    path = write_lines(
        tmp_path / "c.jsonl",
        [*numbered(2), record("How much?", "It costs $1,200.\n#### 1,200"), record("Half?", "#### 0.50")],
    )
    answers = {p.question: p.answer for p in read_problems(Path(path))}
    assert answers["How much?"] == "1200" and answers["Half?"] == "1/2"
    task = make(path=path, eval_size=1)
    assert task.is_correct(Prompt("How much?", "1200"), "The total is 1,200 dollars.")


def test_relative_path_is_read_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_lines(tmp_path / "mine.jsonl", numbered(6))
    monkeypatch.chdir(tmp_path)
    assert len(make(path="mine.jsonl", eval_size=3).train_split) == 3
    with pytest.raises(
        RLBenchError, match=r"'missing\.jsonl' \(relative to the working directory .*\) does not"
    ):
        make(path="missing.jsonl")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(RLBenchError, match=re.escape(f"task.path: {str(missing)!r} does not exist")):
        make(path=str(missing))
    with pytest.raises(RLBenchError, match="is not a file"):
        make(path=str(tmp_path))


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (
            '{"question": "Hi?", "answer": "#### 1"',
            r"line 3: not valid JSON \(Expecting ',' delimiter at column \d+\)",
        ),
        ("not json", "line 3: not valid JSON"),
        ('["Hi?", "#### 1"]', "line 3: expected a JSON object with fields 'question' and 'answer', got list"),
        ('"Hi?"', "line 3: expected a JSON object .* got str"),
        ('{"answer": "#### 1"}', "line 3: field 'question' is missing"),
        ('{"question": "Hi?"}', "line 3: field 'answer' is missing"),
        ('{"question": 7, "answer": "#### 1"}', "line 3: field 'question' must be a string, got int"),
        ('{"question": "Hi?", "answer": 1}', "line 3: field 'answer' must be a string, got int"),
        ('{"question": " ", "answer": "#### 1"}', "line 3: field 'question' is empty"),
        (
            '{"question": "Hi?", "answer": "1+0=1"}',
            "line 3: field 'answer' must end in a line '#### <number>'",
        ),
        ('{"question": "Hi?", "answer": "#### 1\\nok"}', "line 3: field 'answer' .* its last line is 'ok'"),
        (
            '{"question": "Hi?", "answer": "#### one"}',
            "line 3: field 'answer' must end in a line '#### <number>'",
        ),
        ('{"question": "Hi?", "answer": "####"}', "line 3: field 'answer' must end in a line"),
    ],
)
def test_malformed_lines_name_file_line_and_field(tmp_path: Path, bad_line: str, message: str) -> None:
    # A blank line 2 still counts: line numbers are those an editor shows.
    path = write_lines(tmp_path / "bad.jsonl", [numbered(1)[0], "", bad_line, *numbered(5)[1:]])
    with pytest.raises(RLBenchError, match=message) as excinfo:
        make(path=path, eval_size=1)
    assert str(excinfo.value).startswith(f"{path} line 3: ")


def test_empty_file_and_too_few_questions(tmp_path: Path) -> None:
    for text in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(RLBenchError, match="empty.jsonl: the file holds no problems"):
            make(path=str(tmp_path / "empty.jsonl"))
    path = write_lines(tmp_path / "small.jsonl", numbered(9))
    with pytest.raises(ConfigError) as excinfo:
        make(path=path, eval_size=5)
    assert str(excinfo.value) == (
        f"task.eval_size=5 is invalid: at most 4: {path} holds 9 distinct questions and at least "
        "half stay for train; lower eval_size or use a larger file"
    )
    with pytest.raises(ConfigError, match="at most 150: .* holds 300 distinct questions"):
        make(eval_size=151)
    assert len(make(path=path, eval_size=4).eval_split) == 4


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "latin.jsonl").write_bytes(b'{"question": "caf\xe9?", "answer": "#### 1"}\n')
    with pytest.raises(RLBenchError, match="latin.jsonl: not UTF-8 text"):
        make(path=str(tmp_path / "latin.jsonl"))


@pytest.mark.parametrize(
    ("overrides", "text"),
    [
        ({"path": ""}, "path=''"),
        ({"path": 3}, "path=3"),
        ({"eval_size": 0}, "eval_size=0"),
        ({"eval_size": "10"}, "eval_size='10'"),
        ({"split_seed": 1.5}, "split_seed=1.5"),
        ({"extractor": "lastnumber"}, "extractor='lastnumber'"),
    ],
)
def test_config_errors_name_field_and_value(overrides: dict[str, object], text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        JsonlConfig(**overrides)  # type: ignore[arg-type]
    assert str(excinfo.value).startswith(text + " is invalid")


def test_registry_and_metadata() -> None:
    assert TASKS.get("jsonl") is JsonlTask
    assert JsonlTask.Config is JsonlConfig and not JsonlTask.has_steps
    assert JsonlTask.__doc__ and JsonlTask.__doc__.strip().splitlines()[0]
    from rlbench.config_help import field_docs

    docs = field_docs(JsonlConfig)
    assert all(docs.get(name) for name in ("path", "eval_size", "split_seed"))
