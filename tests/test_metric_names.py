"""One metric naming scheme: every algorithm logs exactly what the glossary gives it, and the
README's glossary is the table in ``rlbench.glossary``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rlbench.glossary import ALL, BY_NAME, logged_by, readme_with_glossary, table_name
from rlbench.run import train
from tasks.arithmetic import Arithmetic

#: Logged only when something happens that these short runs do not provoke.
EVENTS = {"train/collapse_step"}


def logged_names(output_dir: Path) -> set[str]:
    """The table names (``table_name``: ``eval/pass@2`` is ``eval/pass@<j>``) of what a run logged."""
    path = next(output_dir.rglob("metrics.csv"))
    names: set[str] = set()
    for row in csv.DictReader(path.open()):
        names |= {table_name(name) for name, value in row.items() if value and name != "step"}
    return names


@pytest.mark.parametrize("algorithm", ALL)
def test_every_algorithm_logs_the_glossary_names(algorithm: str, make_config, monkeypatch):
    # a reward a random-weight model earns about half the time: DPO can build pairs from the
    # verifier, and every algorithm has a learning signal without a warm start
    monkeypatch.setattr(
        Arithmetic, "reward", lambda self, prompt, completion: float(completion[:1] in "13579")
    )
    config = make_config(
        f"algorithm.name={algorithm}",
        "algorithm.ppo.group_size=4",
        "algorithm.rloo.group_size=4",
        "algorithm.dpo.num_prompts=32",
        "reward_noise.flip_prob=0.2",
        "eval.samples=4",  # pass@1, pass@2 (the eval/pass@<j> family), pass@k
        "eval.num_prompts=4",
        "logging.mlflow=false",
    )
    summary = train(config, progress_bar=False)
    names = logged_names(Path(config.output_dir))
    expected = logged_by(algorithm) - EVENTS
    assert names - expected == set(), "logged but not in the glossary (rlbench/glossary.py)"
    assert expected - names == set(), "in the glossary but not logged"
    saved = json.loads((Path(config.output_dir) / "summary.json").read_text())
    assert saved["collapse_step"] is None and summary["collapse_step"] is None
    assert saved["cost"]["cost/samples"] > 0 and saved["cost"]["cost/tokens_trained"] > 0


def test_the_readme_glossary_is_generated_from_the_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert readme_with_glossary(readme) == readme, "run: python -m rlbench.glossary"
    assert all(f"`{name}`" in readme for name in BY_NAME)


def test_a_family_entry_stands_for_its_numbered_names():
    assert table_name("eval/pass@2") == table_name("eval/pass@16") == "eval/pass@<j>"
    assert (table_name("eval/pass@1"), table_name("eval/pass@k")) == ("eval/pass@1", "eval/pass@k")
    assert table_name("eval/pass@x") == "eval/pass@x"  # not a number: not in the table
