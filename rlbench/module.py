"""RLModule: one Lightning module runs every algorithm, on-policy or from preference pairs.

A training step is: the step's experience from the source the algorithm declares (sampled,
verified and selected groups from the ``RolloutCollector``, or preference pairs from the
``PairSource``) -> the reference's log-probs if the algorithm needs them -> pi_old and the
algorithm's own scores (old values) when it needs them before ``prepare`` (a no-grad pass, or
pass 0's own forward when the batch is one micro-batch) -> ``algorithm.prepare`` (advantages,
returns) -> passes x minibatches optimiser steps on
``algorithm.loss`` -> ``algorithm.end_step`` (an adaptive KL coefficient). The module knows no
algorithm or task by name: what differs is a property or method of the plug-in
(``experience``, ``needs_reference``, ``needs_scores``, ``build_modules``...).

Steps are counted in *rollout steps* (batches of experience): ``trainer.max_steps``,
``trainer.checkpoint_every`` and ``eval.every_n_steps`` all count them, and every metric is
logged at the rollout step, however many optimiser steps a rollout step makes.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from rlbench.algorithm import LossScale, RolloutBatch
from rlbench.collectives import Collectives
from rlbench.config import RunConfig
from rlbench.data import PromptSource, minibatch_seed
from rlbench.evaluation import Evaluator
from rlbench.experience import ExperienceSource, RolloutCollector
from rlbench.forward import ForwardOutput, batch_forward
from rlbench.guard import NonFiniteError, SkippedUpdates, logprob_gap, non_finite_cause, non_finite_gradient
from rlbench.lora import AdapterReference, apply_lora
from rlbench.metrics import combine_micro_batches, reduce_passes
from rlbench.microbatch import Rows, merge, minibatches, plan, scatter, take
from rlbench.optim import optimizer_and_schedule
from rlbench.pair_source import PairSource
from rlbench.policy import (
    disable_dropout,
    frozen_copy,
    inference_mode,
    load_policy,
    real_vocab_size,
)
from rlbench.reference import FrozenReference
from rlbench.registry import ALGORITHMS, TASKS
from rlbench.rollout import BACKENDS, SamplingParams
from rlbench.tracking import flush_metrics

__all__ = ["FrozenReference", "NonFiniteError", "RLModule", "non_finite_gradient"]


def grad_norm(parameters: list[nn.Parameter]) -> float:
    """The global L2 norm of the parameters' gradients (0 for none)."""
    norms = [torch.linalg.vector_norm(p.grad) for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class RLModule(pl.LightningModule):
    def __init__(self, config: RunConfig, model_path: str) -> None:
        super().__init__()
        self.config = config
        #: Sums, maxima and gathers over the run's processes (identities in a single process).
        self.dist = Collectives(self)
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
        #: The algorithm's own trainable modules (a value head): submodules, so strategies,
        #: precision, checkpoints and the optimiser all cover them.
        self.algorithm_modules = nn.ModuleDict(self.algorithm.build_modules(self.policy))
        if self.algorithm.needs_reference:
            # with LoRA the reference is the base model: the same weights, adapters switched off
            self.reference = (
                AdapterReference(self.policy, self.vocab_size)
                if config.model.lora.r > 0
                else FrozenReference(frozen_copy(self.policy), self.vocab_size)
            )
        rollout = config.rollout
        #: Log-probs are scored at the sampling temperature unless the algorithm says otherwise
        #: (DPO scores its pairs at T = 1).
        self.temperature = self.algorithm.logprob_temperature or rollout.temperature
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
            noise=config.reward_noise,
        )
        #: Where each step's experience comes from, as the algorithm declares.
        self.experience: ExperienceSource = (
            self.rollouts
            if self.algorithm.experience == "rollouts"
            else PairSource(config, self.algorithm, self.rollouts, model_path, self.reference_scorer)
        )
        self.evaluator = Evaluator(
            self.task,
            self.tokenizer,
            self.backend,
            self.rollouts.source.eval_prompts(config.eval.num_prompts),
            self.rollouts.sampling,
            config.eval.samples,
            config.seed,
            self.dist,
        )
        self.automatic_optimization = False
        #: ``(rollout step, accuracy)`` of every evaluation of this process's run.
        self.eval_history: list[tuple[int, float]] = []
        self.last_eval: tuple[int, dict[str, float]] | None = None
        #: The latest step's metrics (what the loggers received), for callbacks.
        self.last_metrics: dict[str, float] = {}
        #: Per logger, the steps already logged per metric when a killed run resumes: those
        #: steps are recomputed identically and not written twice.
        self.logged_steps: list[dict[str, set[int]]] = []
        #: Rollout steps taken (it also counts skipped updates, so their prompts are not redrawn).
        self.rollout_step = 0
        #: Updates skipped for a non-finite loss or gradient; too many in a row stop the run.
        self.skipped = SkippedUpdates(config.train.max_bad_steps, Path(config.output_dir) / "checkpoints")

    @property
    def optimizer_steps_per_rollout_step(self) -> int:
        return self.algorithm.passes_per_batch * self.algorithm.minibatches_per_pass

    # ------------------------------------------------------------------ Lightning hooks

    def configure_optimizers(self) -> Any:
        optim = self.config.optim
        groups: list[dict[str, Any]] = [
            {"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": optim.lr}
        ]
        own = [p for p in self.algorithm_modules.parameters() if p.requires_grad]
        if own:
            groups.append({"params": own, "lr": self.algorithm.module_lr or optim.lr})
        total = self.config.trainer.max_steps * self.optimizer_steps_per_rollout_step
        return optimizer_and_schedule(groups, optim, total)

    def on_fit_start(self) -> None:
        if isinstance(self.reference, FrozenReference):
            # after Lightning placed and cast the policy (bf16-true casts the weights)
            weight = next(self.policy.parameters())
            self.reference.model.to(device=weight.device, dtype=weight.dtype)
        # in the numerics of training's forwards (bf16-mixed's autocast), as training_step runs:
        # what the source samples and scores here (DPO's pairs) is then what a step would compute
        with self.trainer.precision_plugin.forward_context():
            self.experience.setup(self.policy, self.rollout_step, self.global_rank, self.dist.world_size)

    def on_train_start(self) -> None:
        if self.rollout_step >= self.config.trainer.max_steps:  # a finished run, resumed
            self.trainer.should_stop = True

    def training_step(self, tick: Any, batch_idx: int) -> None:
        step = self.rollout_step
        evaluating = step % self.config.eval.every_n_steps == 0
        if evaluating:
            self.evaluate()
        started = time.perf_counter()
        batch, first, sampled = self.experience.collect(
            self.policy, step, self.global_rank, self.dist.world_size, self.dist.gather
        )
        updated, weight = self.update(batch, first)
        updated["perf/step_s"] = time.perf_counter() - started
        metrics = {**self.dist.reduce(sampled, 1.0), **self.dist.reduce(updated, weight)}
        if evaluating and not self.experience.on_policy:
            # what the policy now samples, on the eval schedule, so curves line up with on-policy runs
            metrics.update(self.sample_diagnostics(step))
        metrics.update(self.algorithm.end_step(metrics, int(self.dist.sum(len(batch)))))
        self.last_metrics = metrics
        self.log_metrics(metrics, step=step)
        self.rollout_step += 1
        if "train/reward_mean" in metrics:
            self.log("reward", metrics["train/reward_mean"], prog_bar=True, logger=False, on_step=True)
        if self.rollout_step >= self.config.trainer.max_steps:
            self.evaluate()
            self.trainer.should_stop = True

    def finish(self, reason: str) -> None:
        """Ends the run after the step that just finished (a spent budget): the final
        evaluation now, then Lightning stops and the checkpoint callback saves."""
        pl.utilities.rank_zero_info(f"stopping: {reason}")
        self.evaluate()
        self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        flush_metrics(self.loggers)
        checkpoint["rlbench_config"] = self.config.to_dict()
        checkpoint["rlbench_state"] = {
            "rollout_step": self.rollout_step,
            "skipped_steps": self.skipped.total,
            "bad_in_a_row": self.skipped.in_a_row,
            "eval_history": [list(item) for item in self.eval_history],
            "algorithm": self.algorithm.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["rlbench_state"]
        self.rollout_step = int(state["rollout_step"])
        self.skipped.total = int(state["skipped_steps"])
        self.skipped.in_a_row = int(state["bad_in_a_row"])
        self.eval_history = [(int(s), float(a)) for s, a in state["eval_history"]]
        self.algorithm.load_state_dict(state.get("algorithm", {}))

    # ------------------------------------------------------------------ the RL step

    def update(self, batch: RolloutBatch, first: RolloutBatch) -> tuple[dict[str, float], float]:
        """``passes x minibatches`` optimiser steps on the algorithm's loss over one batch.

        Returns the step's metrics and their weight (this process's completion tokens). Each
        optimiser step accumulates gradients over micro-batches of ``train.micro_batch_size``
        rows; the algorithm's loss uses step-wide denominators, so the summed micro-batch losses
        equal the whole batch's loss whatever the micro-batch size or number of processes.
        ``first`` (the step's first sample) supplies rows for padding micro-batches.
        """
        algorithm = self.algorithm
        if self.reference is not None and batch.ref_sequence_logprobs is None:
            batch.ref_logprobs = self.reference_logprobs(batch)
        # pi_old (and old values) before prepare when the algorithm needs them, or when later
        # minibatches would otherwise see a policy already moved by earlier ones
        scored = algorithm.needs_scores or algorithm.minibatches_per_pass > 1
        # With the whole batch in one micro-batch and one minibatch on every process, pass 0's
        # forward runs at pi_old's weights: its detached outputs are the scores, and prepare
        # runs between that forward and its backward -- no separate scoring forward. (Not with
        # dropout on: training forwards would then differ from the eval-mode sampler.)
        fused = (
            scored
            and algorithm.minibatches_per_pass == 1
            and self.config.train.micro_batch_size == 0
            and self.config.train.micro_batch_tokens == 0
            and self.config.model.disable_dropout
            and self.dist.min(len(batch)) > 0
        )
        entropy_sum, behaviour_gap = 0.0, -math.inf
        if scored and not fused:
            batch, entropy_sum, behaviour_gap = self.score(batch)
        if not fused:
            batch = algorithm.prepare(batch, self.dist.all_reduce_sum)
        filler: RolloutBatch | None = None
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        world = self.dist.world_size
        history: list[dict[str, float]] = []
        trains_policy = algorithm.trains_policy(self.rollout_step)
        shares = (0, None)  # one minibatch: no split to agree on, no collective
        if algorithm.minibatches_per_pass > 1:
            # this process's groups among the step's, numbered as one process would hold them
            counts = self.dist.gather(torch.tensor([len(batch) // algorithm.group_size])).tolist()
            shares = (int(sum(counts[: self.global_rank])), int(sum(counts)))
        old_logprobs: list[Tensor] = []
        cause: str | None = None  # what went non-finite, if anything
        for pass_index in range(algorithm.passes_per_batch):
            split_seed = minibatch_seed(self.config.seed, self.rollout_step, pass_index)
            split = minibatches(
                batch, algorithm.minibatches_per_pass, algorithm.group_size, split_seed, *shares
            )
            for minibatch in split:
                # pi_old is the policy that sampled: these very weights until the first optimiser
                # step, so pass 0's log-probs are pi_old (no extra forward)
                first_look = pass_index == 0 and (fused or not scored)
                chunks = self.micro_batches(minibatch)
                # Every backward is a DDP all-reduce: a process that kept fewer groups than
                # another makes up the difference with zero-weight micro-batches.
                padding = int(self.dist.max(len(chunks))) - len(chunks)
                if padding and filler is None:
                    filler = self.padding_chunk(first)
                # Denominators count the whole minibatch on every process, so the processes'
                # losses add up; DDP averages gradients, hence the factor world_size below.
                scale = LossScale(
                    int(self.dist.sum(len(minibatch))),
                    int(self.dist.sum(float(minibatch.completion_mask.sum()))),
                    self.config.rollout.max_new_tokens,
                )
                optimizer.zero_grad(set_to_none=True)
                parts: list[tuple[dict[str, Tensor], float]] = []
                for rows in chunks:
                    part = take(minibatch, rows)
                    # the entropy of what the policy sampled; pairs were not sampled by it
                    out = self.policy_forward(part, with_entropy=first_look and self.experience.on_policy)
                    if first_look:
                        current = out.logprobs.detach()
                        old_logprobs.append(current)
                        if out.entropy is not None:
                            entropy_sum += float((out.entropy * part.completion_mask).sum())
                        behaviour_gap = max(behaviour_gap, logprob_gap(part, current))
                    if fused and pass_index == 0:
                        with torch.no_grad():
                            hidden = None if out.hidden is None else out.hidden.detach()
                            part = algorithm.score(replace(part, old_logprobs=current), hidden)
                        part = batch = algorithm.prepare(part, self.dist.all_reduce_sum)
                    loss, metrics = algorithm.loss(out.logprobs, part, scale, out.hidden)
                    if cause is None and not bool(torch.isfinite(loss)):
                        cause = non_finite_cause(part, out.logprobs, loss)
                    # backward even then: every process must join DDP's gradient all-reduce
                    self.manual_backward(loss * world)
                    parts.append((metrics, float(part.completion_mask.sum())))
                for _ in range(padding):
                    assert filler is not None
                    out = self.policy_forward(filler)
                    loss, metrics = algorithm.loss(out.logprobs, filler, scale, out.hidden)  # names only
                    self.manual_backward(loss * 0.0)  # zero gradient, same all-reduce
                    parts.append((metrics, 0.0))
                if first_look and algorithm.passes_per_batch > 1:
                    batch.old_logprobs = scatter(old_logprobs, chunks, batch.completion_mask)
                metrics = combine_micro_batches(parts)
                metrics.update(self.clip_gradients(trains_policy))
                history.append(metrics)
                if not all(math.isfinite(v) for k, v in metrics.items() if k.endswith("grad_norm")):
                    # gradients are all-reduced, so every process takes the same decision here
                    cause = cause or non_finite_gradient(self)
                    optimizer.zero_grad(set_to_none=True)
                    break
                optimizer.step()
                scheduler.step()
            if cause is not None and not all(
                math.isfinite(v) for k, v in history[-1].items() if k.endswith("grad_norm")
            ):
                break
        self.skipped.record(cause, f"rollout step {self.rollout_step} (optimiser step {self.global_step})")
        out = {f"train/{name}": value for name, value in reduce_passes(history).items()}
        out["train/skipped_steps"] = float(self.skipped.total)
        if self.experience.on_policy:  # sampled by the policy: the entropy and gap are its own
            out["train/behaviour_logprob_gap"] = behaviour_gap
            tokens = self.dist.sum(float(batch.completion_mask.sum()))
            out["train/entropy"] = self.dist.sum(entropy_sum) / max(tokens, 1.0)
        out["train/lr"] = scheduler.get_last_lr()[0]
        # completion tokens through forward and backward, every pass (a cost axis)
        out["perf/tokens_trained"] = float(batch.completion_mask.sum()) * algorithm.passes_per_batch
        return out, float(batch.completion_mask.sum())

    def clip_gradients(self, trains_policy: bool) -> dict[str, float]:
        """Clips the gradient of every trainable parameter to ``optim.grad_clip`` (one global
        norm) and returns the norms before clipping, apart: ``grad_norm`` is the policy's alone
        for every algorithm (a critic's gradient would otherwise dominate it and its spikes),
        ``<modules_name>_grad_norm`` the algorithm's own modules'. Without ``trains_policy`` the
        policy's gradients are dropped (a critic warm-up) and no ``grad_norm`` is logged: no
        update reaches the policy (a logged 0 would also make the first real norm look a spike)."""
        clip = self.config.optim.grad_clip or math.inf
        policy = [p for p in self.policy.parameters() if p.requires_grad and p.grad is not None]
        own = [p for p in self.algorithm_modules.parameters() if p.requires_grad and p.grad is not None]
        norms: dict[str, float] = {}
        if trains_policy:
            norms["grad_norm"] = grad_norm(policy)
        else:
            for p in policy:
                p.grad = None
            policy = []
        if own:
            norms[f"{self.algorithm.modules_name}_grad_norm"] = grad_norm(own)
        torch.nn.utils.clip_grad_norm_(policy + own, clip)
        return norms

    def score(self, batch: RolloutBatch) -> tuple[RolloutBatch, float, float]:
        """One no-grad pass before ``prepare``: pi_old's log-probs and the algorithm's scores
        (``algorithm.score``: old values). Returns the scored batch, the summed token entropy
        and the behaviour log-prob gap (the pass sees the weights that sampled)."""
        parts: list[RolloutBatch] = []
        entropy_sum, gap = 0.0, -math.inf
        with inference_mode(self.policy):
            chunks = self.micro_batches(batch)
            for rows in chunks:
                part = take(batch, rows)
                out = self.policy_forward(part, with_entropy=True)
                part.old_logprobs = out.logprobs
                parts.append(self.algorithm.score(part, out.hidden))
                assert out.entropy is not None
                entropy_sum += float((out.entropy * part.completion_mask).sum())
                gap = max(gap, logprob_gap(part, out.logprobs))
        if not parts:
            return batch, entropy_sum, gap
        return merge(parts, chunks, batch), entropy_sum, gap

    def micro_batches(self, batch: RolloutBatch) -> list[Rows]:
        """The batch's micro-batches (``rlbench.microbatch.plan``): ``train.micro_batch_size``
        rows, or a ``train.micro_batch_tokens`` budget; an example (a pair) is never split."""
        train = self.config.train
        return plan(batch, self.experience.rows_per_example, train.micro_batch_size, train.micro_batch_tokens)

    def reference_logprobs(self, batch: RolloutBatch) -> Tensor:
        assert self.reference is not None
        chunks = self.micro_batches(batch)
        parts = [self.reference.logprobs(take(batch, rows), self.temperature) for rows in chunks]
        return scatter(parts, chunks, batch.completion_mask)

    def reference_scorer(self, batch: RolloutBatch) -> Tensor:
        """The reference's per-token log-probs of ``batch``: the loaded reference, or -- when
        none is loaded -- the policy itself, which is the reference until its first update
        (what preference pairs are scored with when they are built, before step 0)."""
        if self.reference is not None:
            return self.reference.logprobs(batch, self.temperature)
        assert self.rollout_step == 0, "without a loaded reference, only the starting policy can score"
        with inference_mode(self.policy):
            return self.policy_forward(batch).logprobs

    def padding_chunk(self, first: RolloutBatch) -> RolloutBatch:
        """One group of the step's first sample, prepared like a real micro-batch (its loss is
        weighted 0: it only keeps this process's backward passes in step with the others).
        Prepared without collectives: only the processes that pad get here."""
        group = first.rows(slice(0, self.algorithm.group_size))
        if self.reference is not None and group.ref_sequence_logprobs is None:
            group.ref_logprobs = self.reference.logprobs(group, self.temperature)
        if self.algorithm.needs_scores or self.algorithm.minibatches_per_pass > 1:
            group = self.score(group)[0]
        group = self.algorithm.prepare(group)
        return group.rows(slice(0, self.experience.rows_per_example))

    def policy_forward(self, batch: RolloutBatch, with_entropy: bool = False) -> ForwardOutput:
        """The policy's log-probs of ``batch`` (and entropy; hidden states when the algorithm
        reads them), at the algorithm's scoring temperature."""
        return batch_forward(
            self.policy,
            batch,
            self.temperature,
            with_entropy,
            self.vocab_size,
            with_hidden=self.algorithm.needs_hidden_states,
            chunk_tokens=self.config.train.logprob_chunk_tokens,
        )

    def policy_logprobs(
        self, batch: RolloutBatch, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        out = self.policy_forward(batch, with_entropy)
        return out.logprobs, out.entropy

    def sample_diagnostics(self, step: int) -> dict[str, float]:
        """Reward and exact entropy of a fresh sample of the step's prompts, for algorithms
        that do not sample to train (DPO): what on-policy runs log every step."""
        rank, world = self.global_rank, self.dist.world_size
        batch, metrics = self.rollouts.sample(self.policy, self.rollouts.source.batch(step, 0, rank, world))
        with inference_mode(self.policy):
            out = batch_forward(
                self.policy,
                batch,
                self.config.rollout.temperature,
                True,
                self.vocab_size,
                chunk_tokens=self.config.train.logprob_chunk_tokens,
            )
        assert out.entropy is not None
        tokens = self.dist.sum(float(batch.completion_mask.sum()))
        entropy = self.dist.sum(float((out.entropy * batch.completion_mask).sum())) / max(tokens, 1.0)
        return {**self.dist.reduce(metrics, 1.0), "train/entropy": entropy}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Hands one step's metrics straight to the loggers.

        ``self.log`` costs ~1 ms per metric per step (tensor conversion, result collection),
        as much as a tiny model's whole forward pass; the loggers need none of that.
        """
        if self.trainer.is_global_zero:
            for logger, logged in zip(self.loggers, self.logged_steps or [{}] * len(self.loggers)):
                fresh = {name: value for name, value in metrics.items() if step not in logged.get(name, ())}
                if fresh:
                    logger.log_metrics(fresh, step=step)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> float:
        """Greedy accuracy on the eval split (and pass@k, maj@k with ``eval.samples`` > 1),
        logged as ``eval/*`` at the rollout step.

        Every metric is logged at the rollout step (steps taken so far), so training and eval
        curves share one axis whatever ``mu`` is and however many updates were skipped.
        """
        step = self.rollout_step
        metrics = self.evaluator.metrics(self.policy, step, self.global_rank)
        self.last_eval = (step, metrics)  # what a sweep's pruner reads
        accuracy = metrics["eval/accuracy"]
        if not self.eval_history or self.eval_history[-1][0] != step:
            self.eval_history.append((step, accuracy))
        self.log_metrics(metrics, step=step)
        self.log("acc", accuracy, prog_bar=True, logger=False, on_step=True)
        pl.utilities.rank_zero_info(f"step {step}: eval accuracy {accuracy:.3f}")
        return accuracy
