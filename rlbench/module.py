"""RLModule: one Lightning module runs every on-policy algorithm.

A training step is: the step's groups from the ``RolloutCollector`` (sampled, verified,
selected) -> ``algorithm.prepare`` (advantages) -> reference log-probs if the algorithm needs
them -> ``mu`` optimiser steps on ``algorithm.loss``. The module knows no algorithm or task by
name: what differs is a property or method of the plug-in (``group_size``,
``needs_reference``, ``passes_per_batch``, ``keep_groups``...).

Steps are counted in *rollout steps* (batches of rollouts): ``trainer.max_steps``,
``trainer.checkpoint_every`` and ``eval.every_n_steps`` all count them, and every metric is
logged at the rollout step, whatever ``mu`` (optimiser steps per rollout step) is.
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
from rlbench.data import PromptSource
from rlbench.errors import RLBenchError
from rlbench.evaluation import greedy_correct
from rlbench.experience import RolloutCollector, micro_batches
from rlbench.lora import AdapterReference, apply_lora
from rlbench.metrics import combine_micro_batches, reduce_over_processes, reduce_passes
from rlbench.policy import (
    batch_logprobs,
    disable_dropout,
    frozen_copy,
    inference_mode,
    load_policy,
    real_vocab_size,
)
from rlbench.registry import ALGORITHMS, TASKS
from rlbench.rollout import BACKENDS, SamplingParams


class FrozenReference:
    """The reference policy, held outside the module's parameters (not checkpointed, not trained).

    Lightning neither moves nor casts it: ``RLModule.on_fit_start`` gives it the policy's
    device and dtype (under ``bf16-true`` an fp32 reference would make KL non-zero at step 0
    and cost twice the memory).
    """

    def __init__(self, model: nn.Module, vocab_size: int | None = None) -> None:
        self.model = model
        self.vocab_size = vocab_size

    def logprobs(self, batch: RolloutBatch, temperature: float) -> Tensor:
        with inference_mode(self.model):
            return batch_logprobs(self.model, batch, temperature, vocab_size=self.vocab_size)[0]


class RLModule(pl.LightningModule):
    def __init__(self, config: RunConfig, model_path: str) -> None:
        super().__init__()
        self.config = config
        self.task = TASKS.get(config.task.name)(config.task.options)
        self.algorithm = ALGORITHMS.get(config.algorithm.name)(config.algorithm.options)
        self.policy, self.tokenizer = load_policy(
            model_path, config.model.dtype, config.model.trust_remote_code
        )
        #: Logit rows that are real tokens: the only ones sampled and scored.
        self.vocab_size = real_vocab_size(self.tokenizer, self.policy)
        self.reference: FrozenReference | AdapterReference | None = None
        if config.model.lora.r > 0:
            self.policy = apply_lora(self.policy, config.model.lora)
        if config.model.disable_dropout:
            disable_dropout(self.policy)
        self.policy.train()
        if self.algorithm.needs_reference:
            # with LoRA the reference is the base model: the same weights, adapters switched off
            self.reference = (
                AdapterReference(self.policy, self.vocab_size)
                if config.model.lora.r > 0
                else FrozenReference(frozen_copy(self.policy), self.vocab_size)
            )
        rollout = config.rollout
        self.backend = BACKENDS[rollout.backend](
            self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.vocab_size
        )
        self.rollouts = RolloutCollector(
            task=self.task,
            task_name=config.task.name,
            algorithm=self.algorithm,
            source=PromptSource(self.task, rollout.prompts_per_step, config.seed),
            backend=self.backend,
            sampling=SamplingParams(
                rollout.max_new_tokens, rollout.temperature, rollout.top_p, rollout.top_k
            ),
            tokenizer=self.tokenizer,
            micro_batch_size=rollout.micro_batch_size,
        )
        self.eval_prompts = self.rollouts.source.eval_prompts(config.eval.num_prompts)
        self.automatic_optimization = False
        #: ``(rollout step, accuracy)`` of every evaluation of this process's run.
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
        # the scheduler steps once per optimiser step: mu per rollout step
        total = self.config.trainer.max_steps * self.algorithm.passes_per_batch

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
        if isinstance(self.reference, FrozenReference):
            # after Lightning placed and cast the policy (bf16-true casts the weights)
            weight = next(self.policy.parameters())
            self.reference.model.to(device=weight.device, dtype=weight.dtype)

    def on_train_start(self) -> None:
        if self.rollout_step >= self.config.trainer.max_steps:  # a finished run, resumed
            self.trainer.should_stop = True

    def training_step(self, tick: Any, batch_idx: int) -> None:
        step = self.rollout_step
        if step % self.config.eval.every_n_steps == 0:
            self.evaluate()
        started = time.perf_counter()
        batch, first, sampled = self.rollouts.collect(
            self.policy, step, self.global_rank, self.world_size, self.gather
        )
        updated, weight = self.update(batch, first)
        updated["perf/step_s"] = time.perf_counter() - started
        metrics = {**self.reduce(sampled, 1.0), **self.reduce(updated, weight)}
        self.last_metrics = metrics
        self.log_metrics(metrics, step=step)
        self.rollout_step += 1
        self.log("reward", metrics["train/reward_mean"], prog_bar=True, logger=False, on_step=True)
        if self.rollout_step >= self.config.trainer.max_steps:
            self.evaluate()
            self.trainer.should_stop = True

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

    def update(self, batch: RolloutBatch, first: RolloutBatch) -> tuple[dict[str, float], float]:
        """``mu`` optimiser steps on the algorithm's loss over one batch of rollouts.

        Returns the step's metrics and their weight (this process's completion tokens). Each
        optimiser step accumulates gradients over micro-batches of ``train.micro_batch_size``
        rows; the algorithm's loss uses step-wide denominators, so the summed micro-batch losses
        equal the whole batch's loss whatever the micro-batch size or number of processes.
        ``first`` (the step's first sample) supplies rows for padding micro-batches.
        """
        batch = self.algorithm.prepare(batch)
        chunks = micro_batches(len(batch), self.config.train.micro_batch_size)
        # Every backward is a DDP all-reduce: a process that kept fewer groups than another
        # makes up the difference with zero-weight micro-batches, so the collectives match.
        padding = int(self.global_max(len(chunks))) - len(chunks)
        filler = self.padding_chunk(first) if padding else None
        if self.reference is not None:
            batch.ref_logprobs = self.reference_logprobs(batch, chunks)
        # Denominators count the whole step on every process, so the processes' losses add up
        # to the step's loss; DDP averages gradients, hence the factor world_size below.
        scale = LossScale(
            int(self.global_sum(len(batch))),
            int(self.global_sum(float(batch.completion_mask.sum()))),
            self.config.rollout.max_new_tokens,
        )
        world = self.world_size
        passes = self.algorithm.passes_per_batch
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        history: list[dict[str, float]] = []
        old_logprobs: list[Tensor] = []
        entropy_sum, behaviour_gap = 0.0, -math.inf
        cause: str | None = None  # what went non-finite, if anything
        for pass_index in range(passes):
            optimizer.zero_grad(set_to_none=True)
            parts: list[tuple[dict[str, Tensor], float]] = []
            for rows in chunks:
                part = batch.rows(rows)
                logprobs, token_entropy = self.policy_logprobs(part, with_entropy=pass_index == 0)
                if pass_index == 0:
                    # pi_old is the policy that sampled: these very weights until the first
                    # optimiser step, so pass 0's log-probs are pi_old (no extra forward)
                    current = logprobs.detach()
                    if passes > 1:
                        old_logprobs.append(current)
                    entropy_sum += float((token_entropy * part.completion_mask).sum())
                    behaviour_gap = max(behaviour_gap, logprob_gap(part, current))
                loss, metrics = self.algorithm.loss(logprobs, part, scale)
                if cause is None and not bool(torch.isfinite(loss)):
                    cause = non_finite_cause(part, logprobs, loss)
                # backward even then: every process must join DDP's gradient all-reduce
                self.manual_backward(loss * world)
                parts.append((metrics, float(part.completion_mask.sum())))
            for _ in range(padding):
                assert filler is not None
                logprobs, _ = self.policy_logprobs(filler)
                _, metrics = self.algorithm.loss(logprobs, filler, scale)  # names only: weight 0
                self.manual_backward(logprobs.sum() * 0.0)  # zero gradient, same all-reduce
                parts.append((metrics, 0.0))
            if old_logprobs and batch.old_logprobs is None:
                batch.old_logprobs = torch.cat(old_logprobs)
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
        out = {f"train/{name}": value for name, value in reduce_passes(history).items()}
        out["train/behaviour_logprob_gap"] = behaviour_gap
        out["train/skipped_steps"] = float(self.skipped_steps)
        out["train/entropy"] = self.global_sum(entropy_sum) / max(scale.num_tokens, 1)
        out["train/lr"] = scheduler.get_last_lr()[0]
        return out, float(batch.completion_mask.sum())

    def reference_logprobs(self, batch: RolloutBatch, chunks: list[slice]) -> Tensor:
        assert self.reference is not None
        temperature = self.config.rollout.temperature
        if not chunks:
            return torch.zeros_like(batch.completion_mask)
        return torch.cat([self.reference.logprobs(batch.rows(c), temperature) for c in chunks])

    def padding_chunk(self, first: RolloutBatch) -> RolloutBatch:
        """One row of the step's first sample, prepared like a real micro-batch (its loss is
        weighted 0: it only keeps this process's backward passes in step with the others)."""
        group = self.algorithm.prepare(first.rows(slice(0, self.algorithm.group_size)))
        if self.reference is not None:
            group.ref_logprobs = self.reference.logprobs(group, self.config.rollout.temperature)
        return group.rows(slice(0, 1))

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
        temperature = self.config.rollout.temperature
        return batch_logprobs(self.policy, batch, temperature, with_entropy, self.vocab_size)

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

    def global_max(self, value: float) -> float:
        """``value``'s maximum over all processes."""
        if self.world_size == 1:
            return value
        return float(
            self.trainer.strategy.reduce(torch.tensor(float(value), device=self.device), reduce_op="max")
        )

    def gather(self, tensor: Tensor) -> Tensor:
        """Every process's ``tensor`` stacked in rank order and flattened (one all-gather)."""
        if self.world_size == 1:
            return tensor
        return self.all_gather(tensor.to(self.device)).reshape(-1)

    def reduce(self, metrics: dict[str, float], weight: float) -> dict[str, float]:
        """Global figures from this process's metrics (``metrics.reduce_over_processes``)."""
        if self.world_size == 1:
            return metrics
        return reduce_over_processes(metrics, weight, self.gather)

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


def logprob_gap(batch: RolloutBatch, logprobs: Tensor) -> float:
    """max |behaviour - current| log-prob over the completion tokens of ``batch`` (-inf if none).

    Sampled at pass 0, before any update, this must be 0 up to float error: anything more means
    the sampler and the loss see different distributions (dropout, filtering, precision).
    """
    mask = batch.completion_mask > 0
    if not bool(mask.any()):
        return -math.inf
    return float((batch.behaviour_logprobs - logprobs).abs()[mask].max())
