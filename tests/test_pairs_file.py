"""Preference pairs: building them from rewards, and the JSONL file's round trip and errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rlbench.errors import RLBenchError
from rlbench.pairs import PreferencePair, build_pairs, check_pairs, read_pairs, write_pairs

GOOD = '{"prompt": "2+3=", "chosen": "5", "rejected": "6"}'


def test_every_chosen_reward_beats_its_rejected_reward() -> None:
    rng = random.Random(0)
    prompts = [f"p{i}" for i in range(200)]
    completions = [[f"c{j}" for j in range(6)] for _ in prompts]
    rewards = [[rng.choice([0.0, 0.5, 1.0]) for _ in range(6)] for _ in prompts]
    pairs = build_pairs(prompts, completions, rewards, seed=3, pairs_per_prompt=2)
    assert pairs
    for pair in pairs:
        i = prompts.index(pair.prompt)
        by_text = dict(zip(completions[i], rewards[i]))
        assert by_text[pair.chosen] > by_text[pair.rejected]
        assert pair.chosen_reward == max(rewards[i]) == by_text[pair.chosen]
        assert pair.rejected_reward == min(rewards[i]) == by_text[pair.rejected]


def test_build_pairs_is_deterministic_given_the_seed() -> None:
    # Three correct and three wrong completions per prompt: 9 possible pairs each.
    prompts = [f"p{i}" for i in range(20)]
    completions = [["a", "b", "c", "x", "y", "z"] for _ in prompts]
    rewards = [[1.0, 1.0, 1.0, 0.0, 0.0, 0.0] for _ in prompts]
    first = build_pairs(prompts, completions, rewards, seed=7)
    assert first == build_pairs(prompts, completions, rewards, seed=7)
    assert len(first) == 20
    # With ties a different seed picks differently (all 20 equal has chance (1/9)^20).
    assert first != build_pairs(prompts, completions, rewards, seed=8)


def test_equal_rewards_give_no_pair() -> None:
    pairs = build_pairs(
        ["all right", "all wrong", "mixed"],
        [["a", "b"], ["c", "d"], ["e", "f"]],
        [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]],
        seed=0,
    )
    assert pairs == [PreferencePair("mixed", "f", "e", chosen_reward=1.0, rejected_reward=0.0)]


def test_pairs_per_prompt_gives_distinct_pairs_and_skips_equal_texts() -> None:
    # Winners {a, b} (a sampled twice), losers {x, a}: a-over-a is not a pair, leaving 3.
    pairs = build_pairs(
        ["p"], [["a", "b", "a", "x", "a"]], [[1.0, 1.0, 1.0, 0.0, 0.0]], seed=0, pairs_per_prompt=10
    )
    assert sorted((p.chosen, p.rejected) for p in pairs) == [("a", "x"), ("b", "a"), ("b", "x")]
    one = build_pairs(["p"], [["a", "a"]], [[1.0, 0.0]], seed=0)
    assert one == []


def test_build_pairs_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="prompt 0 has 2 completions but 1 rewards"):
        build_pairs(["p"], [["a", "b"]], [[1.0]], seed=0)
    with pytest.raises(ValueError, match="one entry per prompt"):
        build_pairs(["p", "q"], [["a"]], [[1.0]], seed=0)


def test_write_read_round_trip(tmp_path: Path) -> None:
    pairs = [
        PreferencePair("2+3=", "5", "6", chosen_reward=1.0, rejected_reward=0.0),
        PreferencePair("ünï\ncode", "a\tb", "c", ref_chosen_logp=-3.25, ref_rejected_logp=-7.5),
        PreferencePair("p", "x", "y"),
    ]
    path = tmp_path / "sub" / "pairs.jsonl"
    write_pairs(path, pairs)
    assert read_pairs(path) == pairs
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert json.loads(lines[2]) == {"prompt": "p", "chosen": "x", "rejected": "y"}  # None left out
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.jsonl"]  # no temp file left


def test_write_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, [PreferencePair("p", "x", "y")] * 3)
    write_pairs(path, [PreferencePair("q", "x", "y")])
    assert read_pairs(path) == [PreferencePair("q", "x", "y")]


def test_blank_lines_are_skipped_and_ints_read_as_floats(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        f"\n{GOOD}\n   \n" + '{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_reward": 1}\n'
    )
    pairs = read_pairs(path)
    assert [p.prompt for p in pairs] == ["2+3=", "p"]
    assert pairs[1].chosen_reward == 1.0 and isinstance(pairs[1].chosen_reward, float)


# Each bad line is written after GOOD and a blank line, so it is line 3.
@pytest.mark.parametrize(
    ("bad_line", "fragments"),
    [
        ('{"prompt": "p", "chosen": "a",', ["line 3: not valid JSON"]),
        ('["p", "a", "b"]', ["line 3: expected a JSON object", "got list"]),
        ('{"prompt": "p", "chosen": "a"}', ["line 3: missing field 'rejected'"]),
        (
            '{"prompt": "p", "chosen": 5, "rejected": "b"}',
            ["line 3: field 'chosen' must be a string, got int"],
        ),
        (
            '{"prompt": null, "chosen": "a", "rejected": "b"}',
            ["line 3: field 'prompt' must be a string, got null"],
        ),
        ('{"prompt": "", "chosen": "a", "rejected": "b"}', ["line 3: field 'prompt' is an empty string"]),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_reward": "1.0"}',
            ["line 3: field 'chosen_reward' must be a number, got str"],
        ),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b", "rejected_reward": true}',
            ["line 3: field 'rejected_reward' must be a number, got bool"],
        ),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b", "ref_chosen_logp": NaN}',
            ["line 3: field 'ref_chosen_logp' must be a finite number"],
        ),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_rewards": 1.0}',
            [
                "line 3: unknown field 'chosen_rewards'",
                "did you mean 'chosen_reward'?",
                "valid fields: prompt, chosen, rejected, chosen_reward, rejected_reward, "
                "ref_chosen_logp, ref_rejected_logp",
            ],
        ),
    ],
)
def test_malformed_line_names_file_line_and_field(
    tmp_path: Path, bad_line: str, fragments: list[str]
) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{GOOD}\n\n{bad_line}\n{GOOD}\n")
    with pytest.raises(RLBenchError) as info:
        read_pairs(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"prompt": "\xff"}\n')
    with pytest.raises(RLBenchError, match="line 2: not valid UTF-8"):
        read_pairs(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(RLBenchError) as info:
        read_pairs(path)
    assert str(path) in str(info.value)
    assert "no such preference-pairs file" in str(info.value)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n\n")
    with pytest.raises(RLBenchError, match="holds no preference pairs"):
        read_pairs(path)


def test_all_identical_pairs_is_an_error() -> None:
    pairs = [PreferencePair("p", "same", "same"), PreferencePair("q", "x", "x")]
    with pytest.raises(RLBenchError) as info:
        check_pairs(pairs, "pairs.jsonl")
    assert str(info.value) == "pairs.jsonl: every pair has chosen == rejected (2 pairs): nothing to prefer"


def test_check_pairs_drops_identical_pairs(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    pairs = [
        PreferencePair("p", "same", "same"),
        PreferencePair("q", "x", "y"),
        PreferencePair("r", "z", "z"),
    ]
    write_pairs(path, pairs)
    assert check_pairs(read_pairs(path), str(path)) == [PreferencePair("q", "x", "y")]
