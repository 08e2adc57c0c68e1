"""On-policy experience: a step's prompts -> sampled groups -> verified rewards -> a rollout batch.

The Lightning module is handed a ``RolloutCollector`` and asks it for one step's batch. The
collector owns everything about where experience comes from: which prompts a step sees, the
sampler and its seeds, scoring with the task's verifier, and the algorithm's choice of which
groups to keep (DAPO's dynamic sampling).

Under data parallelism every process samples its share of the prompts, but the choice of
groups is global: the processes exchange their keep decisions and each trains on its own
share of exactly the groups a single process would keep. So a run's result does not depend
on the number of processes, even when the processes end up with different numbers of groups
(the module then pads the short ones with zero-weight micro-batches, so every process makes
the same number of backward passes and DDP's all-reduces stay matched).
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rlbench.algorithm import Algorithm, RolloutBatch
from rlbench.config import RewardNoiseConfig
from rlbench.data import PromptBatch, PromptSource
from rlbench.errors import RewardError
from rlbench.evaluation import read_completions
from rlbench.noise import add_noise
from rlbench.policy import inference_mode
from rlbench.prompting import encode_prompts
from rlbench.rollout import RolloutBackend, SamplingParams, concat_rollouts
from rlbench.task import STEPS_NOT_WRITTEN, Task

#: ``gather(t)``: the ``[n]`` tensors of every process stacked in rank order, ``[world * n]``.
Gather = Callable[[Tensor], Tensor]


class ExperienceSource(Protocol):
    """Where a step's training batch comes from; the module asks nothing else of it."""

    #: Whether batches are sampled from the current policy (their entropy is the policy's).
    on_policy: bool
    #: Rows that belong together in one micro-batch (2: a preference pair's chosen and rejected).
    rows_per_example: int

    def setup(self, policy: nn.Module, step: int, rank: int, world: int) -> None:
        """Called once the policy is on its device, before step ``step`` (0, or a resume's)."""

    def collect(
        self, policy: nn.Module, step: int, rank: int = 0, world: int = 1, gather: Gather | None = None
    ) -> tuple[RolloutBatch, RolloutBatch, dict[str, float]]:
        """``(batch, first, metrics)``: this process's batch for ``step``, a batch to take
        padding rows from (never empty), and metrics describing the experience."""
        ...


@dataclass
class Cost:
    """Sampling work: completions generated and their tokens (EOS included)."""

    samples: int = 0
    tokens: int = 0

    def add(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    def metrics(self) -> dict[str, float]:
        """This process's share, summed over processes (``metrics.SUMMED_OVER_PROCESSES``)."""
        return {"perf/samples": float(self.samples), "perf/tokens_generated": float(self.tokens)}


class RolloutCollector:
    """Samples, scores and selects the groups of one rollout step (this process's share)."""

    on_policy = True
    rows_per_example = 1

    def __init__(
        self,
        task: Task,
        task_name: str,
        algorithm: Algorithm,
        source: PromptSource,
        backend: RolloutBackend,
        sampling: SamplingParams,
        tokenizer: Any,
        micro_batch_size: int,
        group_size: int | None = None,
        noise: RewardNoiseConfig | None = None,
    ) -> None:
        #: Completions per prompt: the algorithm's group size unless told otherwise (DPO's pair
        #: builder samples k per prompt to find a rewarded and an unrewarded one).
        self.group_size = group_size or algorithm.group_size
        self.task = task
        self.task_name = task_name
        self.algorithm = algorithm
        self.source = source
        self.backend = backend
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        #: Reward noise injected before the algorithm sees a reward (None or disabled: none).
        self.noise = noise
        #: Completions and tokens sampled since the last ``take_cost`` (the run's cost axes).
        self.cost = Cost()

    def setup(self, policy: nn.Module, step: int, rank: int, world: int) -> None:
        """Nothing to prepare: rollouts are sampled fresh every step."""

    def collect(
        self, policy: nn.Module, step: int, rank: int = 0, world: int = 1, gather: Gather | None = None
    ) -> tuple[RolloutBatch, RolloutBatch, dict[str, float]]:
        """``(batch, first, metrics)``: the groups to train on, the step's first sample as drawn
        (metrics describe it), and those metrics.

        With resampling, rejected groups are replaced by groups of fresh prompts, round after
        round, until ``prompts_per_step`` groups are kept over all processes: the first ones in
        (round, prompt position) order, as one process would keep them. ``batch`` may hold any
        number of this process's groups, none included.
        """
        G = self.group_size
        wanted = self.source.prompts_per_step
        first, metrics = self.sample(policy, self.source.batch(step, 0, rank, world))
        kept: list[RolloutBatch] = []
        total = 0  # groups kept so far by all processes
        for round_ in range(self.algorithm.max_resample_rounds + 1):
            prompts = self.source.batch(step, round_, rank, world)
            part = first if round_ == 0 else self.sample(policy, prompts)[0]
            keep = self.algorithm.keep_groups(part.rewards.view(-1, G).cpu()).bool()
            everyone = keep if gather is None or world == 1 else gather(keep.long()).cpu().bool()
            ahead = total + int(everyone[: rank * len(keep)].sum())  # kept by lower ranks this round
            # a kept group's place among all kept groups; only the first ``wanted`` are used
            place = ahead + keep.long().cumsum(0)
            mine = keep & (place <= wanted)
            if bool(mine.any()):
                rows = mine.repeat_interleave(G).nonzero().squeeze(-1).to(part.rewards.device)
                kept.append(part.rows(rows))
            total += int(everyone.sum())
            if total >= wanted:
                break
        if total == 0:
            # No group left anywhere (e.g. every reward equal): train on the first sample as
            # drawn; its advantages are zero, so only regularisers (KL) move the policy.
            batch = first
        elif kept:
            batch = RolloutBatch.concat(kept, self.tokenizer.pad_token_id)
        else:
            batch = first.rows(slice(0, 0))
        metrics["train/kept_groups"] = len(batch) / G
        metrics.update(self.take_cost().metrics())
        return batch, first, metrics

    def take_cost(self) -> Cost:
        """What was sampled since the last call (resampling rounds included), and a fresh count."""
        cost, self.cost = self.cost, Cost()
        return cost

    def sample(self, policy: nn.Module, prompts: PromptBatch) -> tuple[RolloutBatch, dict[str, float]]:
        """``G`` completions per prompt and their rewards; metrics describe this sample."""
        G = self.group_size
        repeated = [p for p in prompts.prompts for _ in range(G)]  # row i * G + j: prompt i
        texts = [p.text for p in repeated]
        device = next(policy.parameters()).device
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, texts, device, self.task.config)
        seeds = self.source.completion_seeds(prompts, G)
        started = time.perf_counter()
        # eval mode: the sampling policy is the one the loss scores as pi_old (no dropout)
        with inference_mode(policy):
            rollout = concat_rollouts(
                [
                    self.backend.generate(
                        policy, prompt_ids[rows], prompt_mask[rows], seeds[rows], self.sampling
                    )
                    for rows in micro_batches(len(texts), self.micro_batch_size)
                ],
                self.tokenizer.pad_token_id,
            )
        generate_s = time.perf_counter() - started
        ids, mask = rollout.completion_ids, rollout.completion_mask
        self.cost.add(len(texts), int(mask.sum()))
        completions, invalid = read_completions(self.tokenizer, ids, mask)
        clean = self.score(repeated, completions, device).masked_fill(invalid.to(device), 0.0)
        flipped = torch.zeros_like(clean, dtype=torch.bool)
        rewards = clean
        if self.noise is not None and self.noise.enabled:
            rewards, flipped = add_noise(clean, seeds, self.noise)
        step_rewards = step_ends = None
        if self.algorithm.needs_step_rewards:
            step_rewards, step_ends = step_tensors(
                self.task, self.tokenizer, repeated, completions, ids, mask, invalid
            )
        grouped = rewards.view(-1, G)
        lengths = mask.sum(-1)
        distinct = [len(set(completions[i : i + G])) / G for i in range(0, len(completions), G)]
        metrics = {
            "train/reward_mean": rewards.mean().item(),
            "train/reward_clean_mean": clean.mean().item(),
            "train/reward_noise_rate": flipped.float().mean().item(),
            "train/reward_std": rewards.std(unbiased=False).item(),
            "train/reward_group_std": grouped.std(-1, unbiased=False).mean().item(),
            "train/frac_zero_std_groups": (grouped.max(-1).values == grouped.min(-1).values)
            .float()
            .mean()
            .item(),
            "train/special_token_frac": invalid.float().mean().item(),
            "train/completion_len": lengths.mean().item(),
            "train/distinct_completions": sum(distinct) / len(distinct),
            "perf/rollout_tokens_per_s": lengths.sum().item() / max(generate_s, 1e-9),
            "perf/rollout_s": generate_s,
        }
        batch = RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=ids,
            completion_mask=mask,
            behaviour_logprobs=rollout.logprobs,
            rewards=rewards,
            group_size=G,
            clean_rewards=clean,
            step_rewards=step_rewards,
            step_ends=step_ends,
        )
        return batch, metrics

    def score(self, prompts: list[Any], completions: list[str], device: torch.device) -> Tensor:
        """The task's rewards as a ``[B]`` float tensor; a malformed answer is a ``RewardError``."""
        rewards = self.task.rewards(prompts, completions)
        name = self.task_name
        if not isinstance(rewards, (list, tuple)):
            raise RewardError(
                f"task {name!r}: rewards() returned a {type(rewards).__name__}; it must return a list "
                f"of {len(completions)} floats, one per completion"
            )
        if len(rewards) != len(completions):
            raise RewardError(
                f"task {name!r}: rewards() returned {len(rewards)} values for {len(completions)} completions"
            )
        bad = [r for r in rewards if isinstance(r, bool) or not isinstance(r, (int, float))]
        if bad:
            raise RewardError(
                f"task {name!r}: rewards() returned a non-number {bad[0]!r}; rewards must be floats"
            )
        return torch.tensor(rewards, dtype=torch.float32, device=device)


def step_tensors(
    task: Task,
    tokenizer: Any,
    prompts: list[Any],
    completions: list[str],
    ids: Tensor,
    mask: Tensor,
    invalid: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(step_rewards, step_ends)``, ``[B, T]``: each step's reward from the task's
    ``step_rewards``, placed at the completion token where the step's text ends. A completion
    with a special token before its EOS has no steps (it scores 0)."""
    rewards = torch.zeros(ids.shape, dtype=torch.float32)
    ends = torch.zeros(ids.shape, dtype=torch.float32)
    lengths = mask.sum(-1).long().tolist()
    for i, (prompt, text) in enumerate(zip(prompts, completions, strict=True)):
        if bool(invalid[i]) or lengths[i] == 0:
            continue
        offsets = token_end_offsets(tokenizer, ids[i, : lengths[i]].tolist())
        last = lengths[i] - 1
        for end, reward in task.step_rewards(prompt, text):
            # the first token whose text reaches the step's last character; steps never
            # written go on the final token (EOS), unless a written step already ends there
            if end == STEPS_NOT_WRITTEN:
                if ends[i, last] > 0:
                    continue
                t = last
            else:
                t = min(bisect.bisect_left(offsets, end), last)
            rewards[i, t], ends[i, t] = float(reward), 1.0
    return rewards.to(ids.device), ends.to(ids.device)


def token_end_offsets(tokenizer: Any, ids: list[int]) -> list[int]:
    """For each token, the length of the decoded text up to and including it (special tokens
    decode to nothing), so a character offset in the completion maps to its token."""
    pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
    return list(itertools.accumulate(len(p) for p in pieces))


def micro_batches(rows: int, size: int) -> list[slice]:
    """Row slices of at most ``size`` rows (``size`` 0: one slice of everything; none if no rows)."""
    size = size or rows
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)] if rows else []
