"""Preference pairs for DPO and IPO: built from a verifier's rewards, kept on disk as JSONL.

On a verifiable-reward task the pairs come from the task itself (THEORY section 4): sample
``k`` completions per prompt, score them, and pair a completion with the group's highest
reward (chosen) with one with its lowest (rejected), for prompts where the two differ.

On disk a pairs file holds one JSON object per line::

    {"prompt": "2+3=", "chosen": "5", "rejected": "6", "chosen_reward": 1.0, "rejected_reward": 0.0}

``prompt``, ``chosen`` and ``rejected`` are required strings (the prompt non-empty; a completion
may be empty: EOS at once); the rewards and the
reference's per-sequence log-probs (``ref_chosen_logp``, ``ref_rejected_logp``, cached so a
run need not recompute them) are optional numbers. Blank lines are skipped.

Pure Python, no torch: the file format and the pairing rule are testable without a model.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rlbench.errors import RLBenchError
from rlbench.registry import did_you_mean


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) completion."""

    prompt: str
    chosen: str
    rejected: str
    chosen_reward: float | None = None
    """The verifier's reward of ``chosen``, when the pair was built from one."""
    rejected_reward: float | None = None
    """The verifier's reward of ``rejected``."""
    ref_chosen_logp: float | None = None
    """The reference's log-prob of ``chosen`` given ``prompt``, summed over its tokens."""
    ref_rejected_logp: float | None = None
    """The reference's log-prob of ``rejected`` given ``prompt``, summed over its tokens."""
    chosen_clean_reward: float | None = None
    """The verifier's reward of ``chosen`` before reward noise (``reward_noise``)."""
    rejected_clean_reward: float | None = None
    """The verifier's reward of ``rejected`` before reward noise."""

    @property
    def mislabelled(self) -> bool | None:
        """Whether noise made this pair prefer a completion the clean verifier does not rank
        higher (None: the clean rewards are unknown)."""
        if self.chosen_clean_reward is None or self.rejected_clean_reward is None:
            return None
        return not self.chosen_clean_reward > self.rejected_clean_reward


_TEXT_FIELDS = ("prompt", "chosen", "rejected")
_NUMBER_FIELDS = (
    "chosen_reward",
    "rejected_reward",
    "ref_chosen_logp",
    "ref_rejected_logp",
    "chosen_clean_reward",
    "rejected_clean_reward",
)
_FIELDS = tuple(f.name for f in fields(PreferencePair))


def build_pairs(
    prompts: list[str],
    completions: list[list[str]],
    rewards: list[list[float]],
    seed: int,
    pairs_per_prompt: int = 1,
    clean_rewards: list[list[float]] | None = None,
) -> list[PreferencePair]:
    """Pairs from ``k`` scored completions per prompt: a maximal-reward one over a minimal one.

    ``completions[i]`` and ``rewards[i]`` are prompt ``i``'s completions and their rewards. A
    prompt yields pairs only when its maximal reward is strictly greater than its minimal one;
    up to ``pairs_per_prompt`` distinct ``(chosen, rejected)`` texts are drawn from the
    maximal-reward completions crossed with the minimal-reward ones, never with equal texts.
    ``clean_rewards`` (same shape as ``rewards``), when the rewards carry injected noise, are
    the verifier's own, recorded in each pair so its label noise can be measured.
    Every pair therefore has ``chosen_reward > rejected_reward``. The draw for prompt ``i``
    depends only on ``(seed, i)`` and that prompt's inputs, so the result is deterministic.
    """
    if not len(prompts) == len(completions) == len(rewards):
        raise ValueError(
            f"prompts, completions and rewards must have one entry per prompt, got "
            f"{len(prompts)}, {len(completions)} and {len(rewards)}"
        )
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    pairs: list[PreferencePair] = []
    for index, (prompt, texts, scores) in enumerate(zip(prompts, completions, rewards)):
        if len(texts) != len(scores):
            raise ValueError(
                f"prompt {index} has {len(texts)} completions but {len(scores)} rewards; need one each"
            )
        if not all(math.isfinite(score) for score in scores):
            raise ValueError(f"prompt {index} has a non-finite reward: {list(scores)}")
        if not texts:
            continue
        best, worst = max(scores), min(scores)
        if not best > worst:
            continue  # all rewards equal: nothing to prefer
        # dict.fromkeys dedupes repeated samples while keeping a fixed order for the draw.
        winners = list(dict.fromkeys(t for t, r in zip(texts, scores) if r == best))
        losers = list(dict.fromkeys(t for t, r in zip(texts, scores) if r == worst))
        candidates = [(w, lo) for w in winners for lo in losers if w != lo]
        # A string seed is hashed with SHA-512, so the stream is stable across processes.
        rng = random.Random(f"rlbench.pairs:{seed}:{index}")
        clean = dict(zip(texts, clean_rewards[index])) if clean_rewards is not None else {}
        for chosen, rejected in rng.sample(candidates, min(pairs_per_prompt, len(candidates))):
            pairs.append(
                PreferencePair(
                    prompt,
                    chosen,
                    rejected,
                    chosen_reward=best,
                    rejected_reward=worst,
                    chosen_clean_reward=clean.get(chosen),
                    rejected_clean_reward=clean.get(rejected),
                )
            )
    return pairs


def write_pairs(path: Path, pairs: list[PreferencePair]) -> None:
    """Write ``pairs`` to ``path`` as JSONL, atomically (a temp file, then ``os.replace``).

    Optional fields that are ``None`` are left out of the line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            for pair in pairs:
                record = {key: value for key, value in asdict(pair).items() if value is not None}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_pair(record: Any, where: str) -> PreferencePair:
    """One line's object as a pair; ``where`` (``"<file>: line <n>"``) prefixes every error."""
    if not isinstance(record, dict):
        raise RLBenchError(
            f"{where}: expected a JSON object with fields {', '.join(_TEXT_FIELDS)}, got {_type_name(record)}"
        )
    for key in record:
        if key not in _FIELDS:
            raise RLBenchError(
                f"{where}: unknown field {key!r}{did_you_mean(key, list(_FIELDS))}; "
                f"valid fields: {', '.join(_FIELDS)}"
            )
    for key in _TEXT_FIELDS:
        if key not in record:
            raise RLBenchError(f"{where}: missing field {key!r}")
        value = record[key]
        if not isinstance(value, str):
            raise RLBenchError(f"{where}: field {key!r} must be a string, got {_type_name(value)}")
        # a completion may be empty (EOS at once: a common rejected sample); a prompt may not
        if key == "prompt" and not value:
            raise RLBenchError(f"{where}: field {key!r} is an empty string")
    for key in _NUMBER_FIELDS:
        value = record.get(key)
        if value is None:
            continue
        # bool is an int in Python, but `true` is not a reward.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RLBenchError(f"{where}: field {key!r} must be a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise RLBenchError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    return PreferencePair(
        **{key: record[key] for key in _TEXT_FIELDS},
        **{key: None if record.get(key) is None else float(record[key]) for key in _NUMBER_FIELDS},
    )


def read_pairs(path: Path) -> list[PreferencePair]:
    """Every pair of the JSONL file ``path``, in order (see ``check_pairs`` for filtering).

    Raises ``RLBenchError`` naming the file, the 1-based line and the field for a malformed
    line, and for a missing file or one that holds no pairs.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RLBenchError(f"{path}: no such preference-pairs file") from None
    except OSError as exc:
        raise RLBenchError(f"{path}: cannot read preference-pairs file: {exc.strerror or exc}") from None
    pairs: list[PreferencePair] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}: line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RLBenchError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RLBenchError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        pairs.append(_parse_pair(record, where))
    if not pairs:
        raise RLBenchError(f"{path}: holds no preference pairs (expected one JSON object per line)")
    return pairs


def check_pairs(pairs: list[PreferencePair], source: str) -> list[PreferencePair]:
    """The pairs whose chosen and rejected texts differ; raises when none remain.

    ``source`` (a file name, say) prefixes the error. In a pair with ``chosen == rejected`` the
    two log-ratios cancel, so under DPO and IPO alike its gradient is zero: it only dilutes the
    batch, and is dropped.
    """
    if not pairs:
        raise RLBenchError(f"{source}: holds no preference pairs")
    kept = [pair for pair in pairs if pair.chosen != pair.rejected]
    if not kept:
        raise RLBenchError(
            f"{source}: every pair has chosen == rejected ({len(pairs)} pairs): nothing to prefer"
        )
    return kept
