"""Tests of the shared train/eval splits of generated tasks (rlbench.splits.DrawnSplits)."""

from __future__ import annotations

import random

import pytest

from rlbench.splits import DrawnSplits
from rlbench.task import Prompt


def draw_pair(rng: random.Random) -> tuple[int, int]:
    return rng.randint(0, 9), rng.randint(0, 9)  # 100 distinct problems


def make(eval_size: int = 20, split_seed: int = 1234) -> DrawnSplits[tuple[int, int], tuple[int, int]]:
    return DrawnSplits(draw_pair, eval_size, split_seed)


def test_eval_split_is_the_first_distinct_draws_of_split_seed() -> None:
    rng, expected = random.Random(7), []
    while len(expected) < 30:
        problem = draw_pair(rng)
        if problem not in expected:
            expected.append(problem)
    assert make(30, split_seed=7).eval_problems == expected
    # growing eval_size extends the split, keeping the earlier problems
    assert make(50, split_seed=7).eval_problems[:30] == expected
    assert make(30, split_seed=8).eval_problems != expected


def test_same_seed_same_problems_and_different_seeds_differ() -> None:
    splits = make()
    for split in ("train", "eval"):
        assert make().problems(split, 15, 3) == splits.problems(split, 15, 3)
        assert splits.problems(split, 15, 3) != splits.problems(split, 15, 4)


def test_train_never_draws_an_eval_problem_and_eval_samples_are_distinct() -> None:
    splits = make(eval_size=50)  # half of the space
    eval_set = set(splits.eval_problems)
    train = splits.train(2000, 0)
    assert len(train) == 2000 and not eval_set & set(train)
    assert len(set(train)) == 50  # the whole rest of the space, with replacement
    assert not any(splits.is_eval(p) for p in train) and all(map(splits.is_eval, eval_set))
    sample = splits.eval(50, 1)
    assert len(set(sample)) == 50 and set(sample) == eval_set


def test_asking_for_more_eval_problems_than_the_split_holds_is_an_error() -> None:
    assert len(make(eval_size=20).eval(20, 0)) == 20
    with pytest.raises(ValueError, match=r"asked for 21 eval prompts .* task.eval_size=20 problems"):
        make(eval_size=20).eval(21, 0)
    lists = DrawnSplits(draw_pair, 20, 0, noun="lists")
    with pytest.raises(ValueError, match="task.eval_size=20 lists; raise eval_size"):
        lists.problems("eval", 21, 0)


@pytest.mark.parametrize("split", ["test", "validation", ""])
def test_an_unknown_split_is_an_error(split: str) -> None:
    with pytest.raises(ValueError, match=r"unknown split .*; valid splits: 'train', 'eval'"):
        make().problems(split, 1, 0)  # type: ignore[arg-type]


def test_key_identifies_problems_and_complete_runs_only_for_kept_draws() -> None:
    """Keyed by the sorted pair, (3, 5) and (5, 3) are one problem; ``complete`` draws more
    from the same generator, and only for draws that are kept."""
    completed: list[tuple[int, int]] = []

    def complete(pair: tuple[int, int], rng: random.Random) -> tuple[tuple[int, int], int]:
        completed.append(pair)
        return pair, rng.randint(0, 99)

    def key(pair: tuple[int, int]) -> tuple[int, ...]:
        return tuple(sorted(pair))

    splits = DrawnSplits(draw_pair, 25, 5, key=key, complete=complete)
    eval_keys = {key(pair) for pair, _ in splits.eval_problems}
    assert len(eval_keys) == 25 and len(completed) == 25
    assert all(splits.is_eval(pair[::-1]) for pair, _ in splits.eval_problems)
    train = splits.train(500, 0)
    assert len(completed) == 525 and not eval_keys & {key(pair) for pair, _ in train}
    # a rejected draw takes nothing more from the generator: replay the stream by hand
    rng, expected = random.Random(0), []
    while len(expected) < 500:
        pair = draw_pair(rng)
        if key(pair) not in eval_keys:
            expected.append((pair, rng.randint(0, 99)))
    assert train == expected


def test_prompts_maps_the_problems() -> None:
    splits = make()

    def to_prompt(problem: tuple[int, int]) -> Prompt:
        return Prompt(text=f"{problem[0]}+{problem[1]}=", answer=str(sum(problem)))

    assert splits.prompts("eval", 5, 2, to_prompt) == [to_prompt(p) for p in splits.eval(5, 2)]
    assert splits.prompts("train", 5, 2, to_prompt) == [to_prompt(p) for p in splits.train(5, 2)]
