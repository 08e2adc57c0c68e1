"""DPO: Direct Preference Optimization (Rafailov et al. 2023), with IPO (Azar et al. 2023).

No sampling during training: the policy learns from fixed preference pairs ``(x, y_w, y_l)``
(chosen, rejected) against a frozen reference ``pi_ref``. With the log-ratio
``h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))``::

    sigmoid (DPO)   loss = -(1 - s) * log sigmoid(beta * h) - s * log sigmoid(-beta * h)
    ipo             loss = (h' - 1 / (2 * beta))^2,   h' the per-token-averaged log-ratios

(``s``: label smoothing; the maths is ``rlbench.preference.preference_loss``, re-exported here.)

On a task with a verifier the pairs come from the task itself (``rlbench.pair_source``): ``k``
samples per prompt from the warm-start policy -- the reference -- scored by the verifier, a
rewarded completion paired with an unrewarded one. They are built once per seed into the cache
with the reference's log-probs: the run's seed draws the pair prompts and samples, as it draws
every on-policy algorithm's experience (``pairs_seed: N`` shares one pair set across seeds
instead); or ``pairs_file`` gives a JSONL of your own. ``refresh_every: N`` rebuilds the pairs from the
current policy every ``N`` steps (online / iterative DPO). Log-probs are scored at T = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from rlbench.algorithm import Algorithm, AllReduceSum, LossScale, RolloutBatch, single_process
from rlbench.errors import require
from rlbench.preference import LOSS_TYPES, preference_loss
from rlbench.registry import ALGORITHMS, did_you_mean

__all__ = ["DPO", "DPOConfig", "LOSS_TYPES", "preference_loss"]


@dataclass
class DPOConfig:
    """Options of DPO (``algorithm.dpo``); ``rollout.prompts_per_step`` is the pairs per step."""

    beta: float = 0.1
    """Strength of the implicit KL to the reference (higher: stay closer)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) or ipo (squared loss on per-token-averaged log-ratios)."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed probability that a pair's preference is flipped (sigmoid only)."""
    pairs_file: str | None = None
    """A JSONL of your own pairs ({"prompt", "chosen", "rejected"} per line); null builds them
    from the task's verifier."""
    num_prompts: int = 512
    """Train prompts sampled to build pairs from (each gives at most pairs_per_prompt pairs)."""
    samples_per_prompt: int = 8
    """Completions sampled per prompt from the reference; a pair needs a rewarded and an unrewarded one."""
    pairs_per_prompt: int = 1
    """Distinct (chosen, rejected) pairs kept per prompt."""
    pairs_seed: int | None = None
    """Seed of the pair-building draws (prompts, samples, reward noise); null: the run's seed,
    so each seed trains on its own pairs, as on-policy algorithms draw their own experience. An
    integer shares one pair set across seeds (then a seed varies only the order pairs come in)."""
    refresh_every: int = 0
    """Online (iterative) DPO: rebuild the pairs from the current policy every this many steps; 0: offline."""

    def __post_init__(self) -> None:
        require(self.beta > 0 and math.isfinite(self.beta), "beta", self.beta, "a finite number > 0")
        require(
            self.loss_type in LOSS_TYPES,
            "loss_type",
            self.loss_type,
            f"one of {', '.join(LOSS_TYPES)}{did_you_mean(str(self.loss_type), list(LOSS_TYPES))}",
        )
        require(
            0.0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "a number in [0, 0.5)"
        )
        require(
            self.label_smoothing == 0.0 or self.loss_type == "sigmoid",
            "label_smoothing",
            self.label_smoothing,
            "0 with loss_type ipo (label smoothing is defined for the sigmoid loss only)",
        )
        require(
            self.pairs_file is None or bool(self.pairs_file), "pairs_file", self.pairs_file, "a path or null"
        )
        require(self.num_prompts >= 1, "num_prompts", self.num_prompts, "an integer >= 1")
        require(
            self.samples_per_prompt >= 2, "samples_per_prompt", self.samples_per_prompt, "an integer >= 2"
        )
        require(self.pairs_per_prompt >= 1, "pairs_per_prompt", self.pairs_per_prompt, "an integer >= 1")
        require(self.refresh_every >= 0, "refresh_every", self.refresh_every, "an integer >= 0 (0: offline)")


@ALGORITHMS.register("dpo")
class DPO(Algorithm):
    """Direct Preference Optimization on preference pairs (sigmoid or IPO loss)."""

    Config = DPOConfig
    config: DPOConfig
    experience = "pairs"

    @property
    def group_size(self) -> int:
        return 2  # a pair's chosen and rejected completions

    @property
    def seed_varies(self) -> str:
        cfg = self.config
        refreshed = "; refreshed pairs follow the policy" if cfg.refresh_every else ""
        if cfg.pairs_file is not None:
            return f"only the order of the pairs from pairs_file{refreshed}"
        if cfg.pairs_seed is not None:
            return f"only the order of one shared pair set (pairs_seed={cfg.pairs_seed}){refreshed}"
        return "pair prompts, samples and reward noise, and the order pairs are served in"

    @property
    def needs_reference(self) -> bool:
        # offline pairs carry the reference's log-probs; refreshed pairs need it loaded
        return self.config.refresh_every > 0

    @property
    def logprob_temperature(self) -> float | None:
        return 1.0

    def prepare(self, batch: RolloutBatch, all_reduce_sum: AllReduceSum = single_process) -> RolloutBatch:
        if batch.ref_sequence_logprobs is None:
            raise ValueError("DPO needs batch.ref_sequence_logprobs (the pairs' cached reference log-probs)")
        return batch

    def loss(
        self, logprobs: Tensor, batch: RolloutBatch, scale: LossScale, hidden: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The preference loss of the micro-batch's pairs (rows 2p chosen, 2p + 1 rejected)."""
        cfg = self.config
        mask, ref = batch.completion_mask, batch.ref_sequence_logprobs
        assert ref is not None
        loss, metrics = preference_loss(
            logprobs[0::2],
            mask[0::2],
            logprobs[1::2],
            mask[1::2],
            ref[0::2],
            ref[1::2],
            cfg.beta,
            cfg.loss_type,
            cfg.label_smoothing,
            num_pairs=max(scale.num_sequences // 2, 1),
        )
        metrics["loss"] = loss.detach()
        return loss, metrics
