"""RLModule: one Lightning module runs every on-policy algorithm.

A training step is: prompts for this step -> ``G`` sampled completions each (KV-cache decode,
seeded per completion) -> task rewards -> ``algorithm.prepare`` (advantages) -> reference
log-probs if the algorithm needs them -> ``mu`` optimiser steps on ``algorithm.loss``. The
module knows no algorithm or task by name: what differs is a property or method of the
plug-in (``group_size``, ``needs_reference``, ``passes_per_batch``, ``keep_groups``...).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from rlbench.algorithm import LossScale, RolloutBatch
from rlbench.config import RunConfig
from rlbench.data import PromptBatch, PromptSource
from rlbench.errors import RewardError, RLBenchError
from rlbench.evaluation import decode_completions, encode_prompts, greedy_correct
from rlbench.lora import AdapterReference, apply_lora
from rlbench.policy import batch_logprobs, frozen_copy, load_policy
from rlbench.registry import ALGORITHMS, TASKS
from rlbench.rollout import BACKENDS, SamplingParams, cat_padded, concat_rollouts


class FrozenReference:
    """The reference policy, held outside the module's parameters (not checkpointed, not trained)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, temperature: float) -> Tensor:
        return batch_logprobs(self.model, batch, temperature)[0]


class RLModule(pl.LightningModule):
    def __init__(self, config: RunConfig, model_path: str) -> None:
        super().__init__()
        self.config = config
        self.task = TASKS.get(config.task.name)(config.task.options)
        self.algorithm = ALGORITHMS.get(config.algorithm.name)(config.algorithm.options)
        self.policy, self.tokenizer = load_policy(
            model_path, config.model.dtype, config.model.trust_remote_code
        )
        self.policy.train()
        self.reference: FrozenReference | AdapterReference | None = None
        if config.model.lora.r > 0:
            # the reference is the base model: the same weights with the adapters switched off
            self.policy = apply_lora(self.policy, config.model.lora)
            if self.algorithm.needs_reference:
                self.reference = AdapterReference(self.policy)
        elif self.algorithm.needs_reference:
            self.reference = FrozenReference(frozen_copy(self.policy))
        self.backend = BACKENDS[config.rollout.backend](
            self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        )
        self.source = PromptSource(self.task, config.rollout.prompts_per_step, config.seed)
        rollout = config.rollout
        self.sampling = SamplingParams(
            rollout.max_new_tokens, rollout.temperature, rollout.top_p, rollout.top_k
        )
        self.eval_prompts = self.source.eval_prompts(config.eval.num_prompts)
        self.automatic_optimization = False
        #: ``(optimiser step, accuracy)`` of every evaluation of this process's run.
        self.eval_history: list[tuple[int, float]] = []
        #: The latest step's metrics (what the loggers received), for callbacks.
        self.last_metrics: dict[str, float] = {}
        #: Per logger, the last step already logged per metric when a killed run resumes:
        #: those steps are recomputed identically and not written twice.
        self.logged_steps: list[dict[str, int]] = []
        #: Rollout steps taken (it also counts skipped updates, so their prompts are not redrawn).
        self.rollout_step = 0
        #: Updates skipped for a non-finite loss or gradient: in all, and in a row now.
        self.skipped_steps = 0
        self.bad_in_a_row = 0

    # ------------------------------------------------------------------ Lightning hooks

    def configure_optimizers(self) -> Any:
        optim = self.config.optim
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        # fused: one kernel for all parameters instead of a Python loop over them (CPU and CUDA)
        optimizer = torch.optim.AdamW(
            trainable, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, fused=True
        )
        total = self.config.trainer.max_steps

        def factor(step: int) -> float:
            if step < optim.warmup_steps:
                return (step + 1) / (optim.warmup_steps + 1)
            progress = (step - optim.warmup_steps) / max(1, total - optim.warmup_steps)
            if optim.schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            if optim.schedule == "linear":
                return max(0.0, 1 - progress)
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.model.to(self.device)

    def training_step(self, tick: Any, batch_idx: int) -> None:
        step = self.rollout_step
        if step % self.config.eval.every_n_steps == 0:
            self.evaluate()
        started = time.perf_counter()
        batch, metrics = self.collect(step)
        metrics.update(self.update(batch))
        metrics["perf/step_s"] = time.perf_counter() - started
        metrics = self.reduce_across_processes(metrics)
        self.last_metrics = metrics
        self.log_metrics(metrics, step=step)
        self.rollout_step += 1
        self.log("reward", metrics["train/reward_mean"], prog_bar=True, logger=False, on_step=True)
        if self.global_step >= self.trainer.max_steps:
            self.evaluate()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rlbench_config"] = self.config.to_dict()
        checkpoint["rlbench_state"] = {
            "rollout_step": self.rollout_step,
            "skipped_steps": self.skipped_steps,
            "bad_in_a_row": self.bad_in_a_row,
            "eval_history": [list(item) for item in self.eval_history],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["rlbench_state"]
        self.rollout_step = int(state["rollout_step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.bad_in_a_row = int(state["bad_in_a_row"])
        self.eval_history = [(int(s), float(a)) for s, a in state["eval_history"]]

    # ------------------------------------------------------------------ the RL step

    def collect(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """Samples and scores the step's groups; with resampling, replaces rejected groups."""
        G = self.algorithm.group_size
        rank, world = self.global_rank, self.world_size
        wanted = self.config.rollout.prompts_per_step // world
        first, metrics = self.sample(self.source.batch(step, 0, rank, world))
        kept: list[RolloutBatch] = []
        count = 0
        for round_ in range(self.algorithm.max_resample_rounds + 1):
            part = first if round_ == 0 else self.sample(self.source.batch(step, round_, rank, world))[0]
            keep = self.algorithm.keep_groups(part.rewards.view(-1, G).cpu())
            if bool(keep.any()):
                rows = keep.repeat_interleave(G).nonzero().squeeze(-1).to(part.rewards.device)
                kept.append(part.rows(rows))
                count += int(keep.sum())
            if count >= wanted:
                break
        # With no group left (e.g. every reward equal), train on the first sample as drawn:
        # its advantages are zero, so only regularisers (KL) move the policy.
        batch = (
            concat_batches(kept, self.tokenizer.pad_token_id).rows(slice(0, wanted * G)) if kept else first
        )
        metrics["train/kept_groups"] = len(batch) / G
        return batch, metrics

    def sample(self, prompts: PromptBatch) -> tuple[RolloutBatch, dict[str, float]]:
        """``G`` completions per prompt and their rewards; metrics describe this sample."""
        G = self.algorithm.group_size
        repeated = [p for p in prompts.prompts for _ in range(G)]  # row i * G + j: prompt i
        texts = [p.text for p in repeated]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, texts, self.device)
        seeds = self.source.completion_seeds(prompts, G)
        started = time.perf_counter()
        rollout = concat_rollouts(
            [
                self.backend.generate(
                    self.policy, prompt_ids[rows], prompt_mask[rows], seeds[rows], self.sampling
                )
                for rows in micro_batches(len(texts), self.config.rollout.micro_batch_size)
            ],
            self.tokenizer.pad_token_id,
        )
        generate_s = time.perf_counter() - started
        completions = decode_completions(self.tokenizer, rollout.completion_ids, rollout.completion_mask)
        rewards = self.score(repeated, completions)
        grouped = rewards.view(-1, G)
        lengths = rollout.completion_mask.sum(-1)
        distinct = [len(set(completions[i : i + G])) / G for i in range(0, len(completions), G)]
        metrics = {
            "train/reward_mean": rewards.mean().item(),
            "train/reward_std": rewards.std(unbiased=False).item(),
            "train/reward_group_std": grouped.std(-1, unbiased=False).mean().item(),
            "train/frac_zero_std_groups": (grouped.max(-1).values == grouped.min(-1).values)
            .float()
            .mean()
            .item(),
            "train/completion_len": lengths.mean().item(),
            "train/distinct_completions": sum(distinct) / len(distinct),
            "perf/rollout_tokens_per_s": lengths.sum().item() / max(generate_s, 1e-9),
            "perf/rollout_s": generate_s,
        }
        batch = RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=rollout.completion_ids,
            completion_mask=rollout.completion_mask,
            behaviour_logprobs=rollout.logprobs,
            rewards=rewards,
            group_size=G,
        )
        return batch, metrics

    def score(self, prompts: list[Any], completions: list[str]) -> Tensor:
        rewards = self.task.rewards(prompts, completions)
        name = self.config.task.name
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
        return torch.tensor(rewards, dtype=torch.float32, device=self.device)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """``mu`` optimiser steps on the algorithm's loss over one batch of rollouts.

        Each step accumulates gradients over micro-batches of ``train.micro_batch_size`` rows;
        the algorithm's loss uses step-wide denominators, so the summed micro-batch losses equal
        the whole batch's loss whatever the micro-batch size.
        """
        temperature = self.config.rollout.temperature
        batch = self.algorithm.prepare(batch)
        chunks = micro_batches(len(batch), self.config.train.micro_batch_size)
        if self.reference is not None:
            batch.ref_logprobs = torch.cat(
                [self.reference.logprobs(batch.rows(c), temperature) for c in chunks]
            )
        if self.algorithm.passes_per_batch > 1:  # pi_old: the policy that sampled, before any update
            with torch.no_grad():
                batch.old_logprobs = torch.cat([self.policy_logprobs(batch.rows(c))[0] for c in chunks])
        # Denominators count the whole step on every process, so the processes' losses add up
        # to the step's loss; DDP averages gradients, hence the factor world_size below.
        scale = LossScale(
            int(self.global_sum(len(batch))),
            int(self.global_sum(float(batch.completion_mask.sum()))),
            self.config.rollout.max_new_tokens,
        )
        world = self.world_size
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        history: list[dict[str, float]] = []
        entropy_sum = 0.0
        cause: str | None = None  # what went non-finite, if anything
        for pass_index in range(self.algorithm.passes_per_batch):
            optimizer.zero_grad(set_to_none=True)
            parts: list[tuple[dict[str, Tensor], float]] = []
            for rows in chunks:
                part = batch.rows(rows)
                logprobs, token_entropy = self.policy_logprobs(part, with_entropy=pass_index == 0)
                if token_entropy is not None:
                    entropy_sum += float((token_entropy * part.completion_mask).sum())
                loss, metrics = self.algorithm.loss(logprobs, part, scale)
                if cause is None and not bool(torch.isfinite(loss)):
                    cause = non_finite_cause(part, logprobs, loss)
                # backward even then: every process must join DDP's gradient all-reduce
                self.manual_backward(loss * world)
                parts.append((metrics, float(part.completion_mask.sum())))
            metrics = combine_micro_batches(parts)
            clip = self.config.optim.grad_clip or math.inf
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), clip))
            if not math.isfinite(metrics["grad_norm"]):
                # gradients are all-reduced, so every process takes the same decision here
                cause = cause or non_finite_gradient(self.policy)
                optimizer.zero_grad(set_to_none=True)
                history.append(metrics)
                break
            optimizer.step()
            scheduler.step()
            history.append(metrics)
        self.guard(cause)
        out = {f"train/{name}": value for name, value in reduce_metrics(history).items()}
        out["train/skipped_steps"] = float(self.skipped_steps)
        out["train/entropy"] = self.global_sum(entropy_sum) / max(scale.num_tokens, 1)
        out["train/lr"] = scheduler.get_last_lr()[0]
        return out

    def guard(self, cause: str | None) -> None:
        """Counts skipped updates; stops the run after ``train.max_bad_steps`` in a row."""
        if cause is None:
            self.bad_in_a_row = 0
            return
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        where = f"rollout step {self.rollout_step} (optimiser step {self.global_step})"
        pl.utilities.rank_zero_warn(f"skipped the update of {where}: non-finite {cause}")
        if self.bad_in_a_row >= self.config.train.max_bad_steps:
            checkpoints = Path(self.config.output_dir) / "checkpoints"
            kept = (
                f"the last good checkpoint is kept in {checkpoints}"
                if any(checkpoints.glob("*.ckpt"))
                else "no checkpoint had been written yet"
            )
            raise NonFiniteError(
                f"stopped at {where}: {self.bad_in_a_row} consecutive updates had a non-finite "
                f"{cause}; {kept} (train.max_bad_steps={self.config.train.max_bad_steps})"
            )

    def policy_logprobs(
        self, batch: RolloutBatch, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        return batch_logprobs(self.policy, batch, self.config.rollout.temperature, with_entropy)

    @property
    def world_size(self) -> int:
        """Processes sharing each step (1 when not attached to a Trainer, e.g. in tests)."""
        return self._trainer.world_size if self._trainer is not None else 1

    def global_sum(self, value: float) -> float:
        """``value`` summed over all processes (itself in a single-process run)."""
        if self.world_size == 1:
            return value
        return float(
            self.trainer.strategy.reduce(torch.tensor(float(value), device=self.device), reduce_op="sum")
        )

    def reduce_across_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """Global figures from per-process metrics: one all-gather for the whole dict.

        The loss and throughput add up over processes, ``_min``/``_max`` and timings take the
        extreme, every other metric (means over equal shares of the batch) is averaged.
        """
        if self.world_size == 1:
            return metrics
        names = sorted(metrics)
        gathered = self.all_gather(torch.tensor([metrics[n] for n in names], device=self.device))
        gathered = gathered.reshape(-1, len(names)).double()
        out = {}
        for i, name in enumerate(names):
            column = gathered[:, i]
            if name in ("train/loss", "perf/rollout_tokens_per_s", "train/kept_groups"):
                out[name] = float(column.sum())
            elif name.endswith("_min"):
                out[name] = float(column.min())
            elif name.endswith(("_max", "_s")):
                out[name] = float(column.max())
            else:
                out[name] = float(column.mean())
        return out

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Hands one step's metrics straight to the loggers.

        ``self.log`` costs ~1 ms per metric per step (tensor conversion, result collection),
        as much as a tiny model's whole forward pass; the loggers need none of that.
        """
        if self.trainer.is_global_zero:
            for logger, logged in zip(self.loggers, self.logged_steps or [{}] * len(self.loggers)):
                fresh = {name: value for name, value in metrics.items() if step > logged.get(name, -1)}
                if fresh:
                    logger.log_metrics(fresh, step=step)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> float:
        """Greedy accuracy on the eval split, logged as ``eval/accuracy`` at the rollout step.

        Every metric is logged at the rollout step (steps taken so far), so training and eval
        curves share one axis whatever ``mu`` is and however many updates were skipped.
        """
        # each process scores its share of the eval prompts; the counts add up
        rank, world = self.global_rank, self.world_size
        correct = greedy_correct(
            self.policy,
            self.tokenizer,
            self.task,
            self.eval_prompts[rank::world],
            self.backend,
            self.config.rollout.max_new_tokens,
        )
        accuracy = self.global_sum(correct) / len(self.eval_prompts)
        step = self.rollout_step
        if not self.eval_history or self.eval_history[-1][0] != step:
            self.eval_history.append((step, accuracy))
        self.log_metrics({"eval/accuracy": accuracy}, step=step)
        self.log("acc", accuracy, prog_bar=True, logger=False, on_step=True)
        pl.utilities.rank_zero_info(f"step {step}: eval accuracy {accuracy:.3f}")
        return accuracy


class NonFiniteError(RLBenchError):
    """Too many consecutive updates with a non-finite loss or gradient."""


def non_finite_cause(batch: RolloutBatch, logprobs: Tensor, loss: Tensor) -> str:
    """Names the first non-finite input of a non-finite loss, in the order the step computes them."""
    for name in ("rewards", "advantages", "behaviour_logprobs", "old_logprobs", "ref_logprobs"):
        value = getattr(batch, name)
        if value is not None and not bool(torch.isfinite(value).all()):
            rows = (~torch.isfinite(value)).reshape(len(value), -1).any(-1).nonzero().flatten().tolist()
            source = " from the task's rewards()" if name == "rewards" else ""
            return f"{name}{source} (rows {rows[:8]} of the micro-batch)"
    if not bool(torch.isfinite(logprobs).all()):
        return "policy log-probs"
    return f"loss ({float(loss)})"


def non_finite_gradient(model: nn.Module) -> str:
    for name, param in model.named_parameters():
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            return f"gradient of {name}"
    return "gradient norm"


def micro_batches(rows: int, size: int) -> list[slice]:
    """Row slices of at most ``size`` rows (``size`` 0: one slice of everything)."""
    size = size or rows
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def combine_micro_batches(parts: list[tuple[dict[str, Tensor], float]]) -> dict[str, float]:
    """One step's metrics from its micro-batches' ``(metrics, token count)``.

    ``loss`` adds up (each part is its share of the step's loss); ``_min``/``_max`` reduce by
    min/max; every other metric is a per-token mean, so it is weighted by token counts.
    """
    total = sum(tokens for _, tokens in parts) or 1.0
    out: dict[str, float] = {}
    for name in parts[0][0]:
        values = [float(metrics[name]) for metrics, _ in parts]
        if name == "loss":
            out[name] = sum(values)
        elif name.endswith("_min"):
            out[name] = min(values)
        elif name.endswith("_max"):
            out[name] = max(values)
        else:
            out[name] = sum(v * tokens for v, (_, tokens) in zip(values, parts)) / total
    return out


def reduce_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """Combines per-pass metrics: ``_min``/``_max`` by min/max, the rest by their mean over passes."""
    out: dict[str, float] = {}
    for name in history[0]:
        values = [h[name] for h in history]
        if name.endswith("_min"):
            out[name] = min(values)
        elif name.endswith("_max"):
            out[name] = max(values)
        else:
            out[name] = sum(values) / len(values)
    return out


def concat_batches(batches: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
    """Stacks rollout batches, left-padding prompts and right-padding completions to a common width."""
    if len(batches) == 1:
        return batches[0]
    return RolloutBatch(
        prompt_ids=cat_padded([b.prompt_ids for b in batches], pad_token_id, left=True),
        prompt_mask=cat_padded([b.prompt_mask for b in batches], 0, left=True),
        completion_ids=cat_padded([b.completion_ids for b in batches], pad_token_id),
        completion_mask=cat_padded([b.completion_mask for b in batches], 0),
        behaviour_logprobs=cat_padded([b.behaviour_logprobs for b in batches], 0),
        rewards=torch.cat([b.rewards for b in batches]),
        group_size=batches[0].group_size,
    )
