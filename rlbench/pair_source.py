"""Preference pairs as experience: the ``ExperienceSource`` of algorithms that learn from pairs.

The pairs come from a user's JSONL file (``pairs_file``) or from the task's verifier: ``k``
samples per prompt from the starting policy -- the warm start, which is also the frozen
reference -- scored, and a rewarded completion paired with an unrewarded one
(``rlbench.pairs.build_pairs``). Either way they are written once, with the reference's
per-sequence log-probs, to ``<warmstart.cache_dir>/pairs/<key>/pairs.jsonl``; the key hashes
what shapes the pairs: starting model, task, sampling and pairing options, the seed of their
draws (``pairs_seed``, or the run's seed when it is null: each seed then trains on its own
pairs, as each seed of an on-policy algorithm samples its own experience) and the numerics the
reference scored them in (weights' dtype, precision, autocast, LoRA). The loss options are not
in it, so DPO variants of one seed share their pairs.

The pairs are sampled and scored under the precision training runs its forwards in (the module
calls ``setup`` inside the precision plugin's forward context): at step 0 the policy, which is
the reference, then gives the very log-probs cached for it, and every log-ratio is 0 there.

Step ``s`` takes ``rollout.prompts_per_step`` pairs, walking a seeded permutation of the pairs
epoch after epoch; each process takes a contiguous share. With ``refresh_every: N`` the pairs
are rebuilt from the current policy every ``N`` steps (scored by the loaded reference) and
saved under ``output_dir/pairs/``, so a resumed run reads the very pairs it trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlbench.algorithm import Algorithm, RolloutBatch, cat_padded
from rlbench.cache import build_once
from rlbench.config import RunConfig, config_hash
from rlbench.data import PromptSource
from rlbench.errors import RLBenchError
from rlbench.evaluation import read_completions
from rlbench.experience import Cost, Gather, RolloutCollector, micro_batches
from rlbench.pairs import PreferencePair, build_pairs, check_pairs, read_pairs, write_pairs
from rlbench.progress import counted
from rlbench.prompting import encode_prompts
from rlbench.rollout import derive_seed

PAIRS_FILE = "pairs.jsonl"
#: What sampling the cached pairs cost (completions, tokens): a run that reads them from the
#: cache still counts it, so DPO's cost axes do not depend on who built the cache.
COST_FILE = "cost.json"
_ORDER, _REFRESH = 21, 22  # seed salts: the pairs' order per epoch, refreshed pair sets

#: Per-token log-probs of a batch under the reference, ``[B, T]``.
ReferenceScorer = Callable[[RolloutBatch], Tensor]


def pairs_seed(config: RunConfig, options: Any) -> int:
    """The seed the pairs are drawn with (and refreshed pairs): ``pairs_seed``, or the run's
    when that is null."""
    return config.seed if options.pairs_seed is None else options.pairs_seed


def scoring_numerics(policy: nn.Module) -> dict[str, str | None]:
    """The floating-point regime live at this point: the weights' dtype and the autocast dtype
    on their device (None: no autocast). Read where the pairs are scored, so the cache tells
    apart the precisions a setting such as ``trainer.precision`` may resolve to on a machine."""
    weight = next(policy.parameters())
    device = weight.device.type
    autocast = str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
    return {"weights": str(weight.dtype), "autocast": autocast}


def pairs_cache_dir(
    config: RunConfig, model_path: str, options: Any, numerics: Mapping[str, str | None] | None = None
) -> Path:
    """Where the pairs of this starting model, task, pair options, seed and numerics are cached."""
    fields = ("num_prompts", "samples_per_prompt", "pairs_per_prompt")
    # a user's file by its content, so an edited file is never served from a stale cache
    pairs_file = options.pairs_file and hashlib.sha256(Path(options.pairs_file).read_bytes()).hexdigest()
    key = config_hash(
        model_path,
        config.task,
        {"pairs_file": pairs_file, **{name: getattr(options, name) for name in fields}},
        # the run's seed when pairs_seed is null; a user's file no seed draws
        {"seed": None if options.pairs_file else pairs_seed(config, options)},
        config.rollout.max_new_tokens,
        config.rollout.temperature,
        config.reward_noise,  # noisy labels make other pairs
        # the reference log-probs are exact only in the numerics training computes in
        {"dtype": config.model.dtype, "precision": config.trainer.precision, "lora": config.model.lora},
        dict(numerics or {}),
    )
    return Path(config.warmstart.cache_dir) / "pairs" / f"{config.task.name}-{key}"


class PairSource:
    """Serves each step's preference pairs as a ``RolloutBatch`` (row 2p chosen, 2p + 1 rejected)."""

    on_policy = False
    rows_per_example = 2

    def __init__(
        self,
        config: RunConfig,
        algorithm: Algorithm,
        sampler: RolloutCollector,
        model_path: str,
        reference: ReferenceScorer,
    ) -> None:
        self.config = config
        self.options = algorithm.config
        self.algorithm = algorithm
        self.sampler = sampler
        self.tokenizer = sampler.tokenizer
        self.reference = reference
        self.pairs: list[PreferencePair] = []
        self.pairs_from = 0  # the step the current pair set was built at (0, or a refresh)
        #: Sampling done for pairs and not yet reported in a step's ``perf/samples``.
        self.cost = Cost()
        self.rank = 0
        pairs_file = self.options.pairs_file
        # a bad file or setting fails now, before the run writes anything
        self.user_pairs = check_pairs(read_pairs(Path(pairs_file)), pairs_file) if pairs_file else None
        if self.user_pairs is None and not sampler.task.verifiable:
            raise RLBenchError(
                f"algorithm {config.algorithm.name!r} on task {config.task.name!r}: the task has no "
                f"verifier to build preference pairs from; give a JSONL of pairs in "
                f"algorithm.{config.algorithm.name}.pairs_file"
            )
        self.model_path = model_path
        #: The seed of the pair draws: ``pairs_seed``, or the run's when that is null.
        self.seed = pairs_seed(config, self.options)
        #: The cache entry; ``setup`` completes its key with the numerics it scores in.
        self.cache = pairs_cache_dir(config, model_path, self.options)

    # ------------------------------------------------------------------ set-up and refresh

    def setup(self, policy: nn.Module, step: int, rank: int, world: int) -> None:
        """Builds (once, under a lock) or reads the cached pairs; on resume, the latest refresh."""
        refresh = self.options.refresh_every
        self.cache = pairs_cache_dir(self.config, self.model_path, self.options, scoring_numerics(policy))
        if step > 0 and not (self.cache / PAIRS_FILE).is_file():
            raise RLBenchError(
                f"resuming at step {step}: the cached preference pairs {str(self.cache)!r} are gone "
                f"(or pairs_file changed since the run started), and the policy has moved since, so "
                f"they cannot be rebuilt as they were"
            )

        def build(tmp: Path) -> None:
            # only the process that builds gets here: its bars are the only ones
            pairs = self.user_pairs or self.sample_pairs(policy, self.seed, show=True)
            write_pairs(tmp / PAIRS_FILE, self.with_reference_logprobs(pairs, policy, show=True))
            (tmp / COST_FILE).write_text(json.dumps(dataclasses.asdict(self.cost)))

        self.rank = rank
        build_once(self.cache, build, complete=lambda d: (d / PAIRS_FILE).is_file())
        self.pairs = read_pairs(self.cache / PAIRS_FILE)
        self.cost = Cost()
        cost_file = self.cache / COST_FILE
        if step == 0 and rank == 0 and cost_file.is_file():  # counted once, by one process
            self.cost = Cost(**json.loads(cost_file.read_text()))
        self.pairs_from = 0
        # the refresh of step r happens as step r starts: a run resumed at step k (k steps done)
        # last refreshed at the largest multiple of refresh_every below k
        last_refresh = ((step - 1) // refresh) * refresh if refresh and step > 0 else 0
        if last_refresh > 0:
            saved = self.refresh_file(last_refresh)
            if not saved.is_file():
                raise RLBenchError(
                    f"resuming at step {step}: the pairs refreshed at step {last_refresh} "
                    f"({str(saved)!r}) are missing"
                )
            self.pairs, self.pairs_from = read_pairs(saved), last_refresh

    def refresh_file(self, step: int) -> Path:
        return Path(self.config.output_dir) / "pairs" / f"step-{step}.jsonl"

    def sample_pairs(self, policy: nn.Module, seed: int, show: bool) -> list[PreferencePair]:
        """Pairs from ``samples_per_prompt`` samples of ``num_prompts`` train prompts, scored
        by the task's verifier (a special token before EOS scores 0, as in training).

        The prompts are sampled a chunk at a time (``rollout.micro_batch_size`` rows, else a
        32nd of them, at least a step's prompts), so a progress bar can count them: on a real
        model this takes minutes.
        Each completion's seed depends on its prompt's position, not on the chunking."""
        opts = self.options
        k = opts.samples_per_prompt
        source = PromptSource(self.sampler.task, opts.num_prompts, seed)
        sampler = RolloutCollector(
            task=self.sampler.task,
            task_name=self.sampler.task_name,
            algorithm=self.algorithm,
            source=source,
            backend=self.sampler.backend,
            sampling=self.sampler.sampling,
            tokenizer=self.tokenizer,
            micro_batch_size=self.sampler.micro_batch_size,
            group_size=k,
            noise=self.sampler.noise,
        )
        prompts = source.batch(0)
        rows = self.sampler.micro_batch_size
        n = len(prompts.prompts)
        # without a micro-batch size, ~32 chunks: the bar moves, and big generate calls keep
        # a small model's per-call overhead low
        chunk = max(1, rows // k) if rows else max(self.config.rollout.prompts_per_step, -(-n // 32))
        parts: list[RolloutBatch] = []
        with counted(n * k, "sampling pairs", None if show else False) as bar:
            for start in range(0, n, chunk):
                part = replace(
                    prompts,
                    prompts=prompts.prompts[start : start + chunk],
                    positions=prompts.positions[start : start + chunk],
                )
                parts.append(sampler.sample(policy, part)[0])
                bar.update(len(part.prompts) * k)
        batch = RolloutBatch.concat(parts, self.tokenizer.pad_token_id)
        drawn = sampler.take_cost()
        if self.rank == 0:  # every process samples the same pairs; one pays for them
            self.cost.add(drawn.samples, drawn.tokens)
        texts, _ = read_completions(self.tokenizer, batch.completion_ids, batch.completion_mask)
        rewards = batch.rewards.view(-1, k).tolist()
        assert batch.clean_rewards is not None
        clean = batch.clean_rewards.view(-1, k).tolist()
        completions = [texts[i * k : (i + 1) * k] for i in range(len(prompts.prompts))]
        pairs = build_pairs(
            [p.text for p in prompts.prompts], completions, rewards, seed, opts.pairs_per_prompt, clean
        )
        if not pairs:
            raise RLBenchError(
                f"no preference pair in {len(prompts.prompts)} prompts x {k} samples: every prompt's "
                f"samples scored the same (all right or all wrong); raise algorithm.dpo.samples_per_prompt "
                f"or rollout.temperature, or start from a warm start that is neither hopeless nor perfect"
            )
        return pairs

    def with_reference_logprobs(
        self, pairs: list[PreferencePair], policy: nn.Module, show: bool
    ) -> list[PreferencePair]:
        """The pairs with the reference's summed log-probs of chosen and rejected (computed once)."""
        device = next(policy.parameters()).device
        out: list[PreferencePair] = []
        size = max(2, self.config.train.micro_batch_size or 256)
        with counted(len(pairs), "scoring pairs", None if show else False) as bar:
            for rows in micro_batches(len(pairs), size // 2):
                chunk = pairs[rows]
                batch = self.encode(chunk, device)
                sums = (self.reference(batch) * batch.completion_mask).sum(-1).tolist()
                for i, pair in enumerate(chunk):
                    out.append(replace(pair, ref_chosen_logp=sums[2 * i], ref_rejected_logp=sums[2 * i + 1]))
                bar.update(len(chunk))
        return out

    # ------------------------------------------------------------------ batches

    def collect(
        self, policy: nn.Module, step: int, rank: int = 0, world: int = 1, gather: Gather | None = None
    ) -> tuple[RolloutBatch, RolloutBatch, dict[str, float]]:
        refresh = self.options.refresh_every
        if refresh and step > 0 and step % refresh == 0 and self.pairs_from != step:
            self.refresh(policy, step, rank)
        per_step = self.config.rollout.prompts_per_step
        share = per_step // world
        start = (step - self.pairs_from) * per_step + rank * share
        chosen = [self.pair_at(i) for i in range(start, start + share)]
        device = next(policy.parameters()).device
        batch = self.encode(chosen, device)
        metrics = {"train/num_pairs": float(len(self.pairs)), **self.cost.metrics()}
        self.cost = Cost()
        labels = [pair.mislabelled for pair in self.pairs if pair.mislabelled is not None]
        if labels:  # pairs built from the verifier: how many reward noise mislabelled
            metrics["train/pair_noise_rate"] = sum(labels) / len(labels)
        return batch, batch, metrics

    def refresh(self, policy: nn.Module, step: int, rank: int) -> None:
        """Online DPO: new pairs sampled from the current policy, scored by the reference."""
        show = rank == 0  # every process draws the same pairs: one bar
        pairs = self.sample_pairs(policy, derive_seed(self.seed, _REFRESH, step), show)
        self.pairs, self.pairs_from = self.with_reference_logprobs(pairs, policy, show), step
        if rank == 0:
            write_pairs(self.refresh_file(step), self.pairs)

    def pair_at(self, position: int) -> PreferencePair:
        """The pair at ``position`` of the endless stream: epoch after epoch of seeded permutations."""
        epoch, index = divmod(position, len(self.pairs))
        generator = torch.Generator().manual_seed(
            derive_seed(self.config.seed, _ORDER, self.pairs_from, epoch)
        )
        order = torch.randperm(len(self.pairs), generator=generator)
        return self.pairs[int(order[index])]

    def encode(self, pairs: list[PreferencePair], device: torch.device) -> RolloutBatch:
        """Rows ``2p`` (chosen) and ``2p + 1`` (rejected): the prompt left-padded, the completion
        right-padded and closed with EOS, as the sampler would have ended it."""
        texts = [p.prompt for p in pairs for _ in range(2)]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, texts, device, self.sampler.task.config)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        completions = [c for p in pairs for c in (p.chosen, p.rejected)]
        encoded = self.tokenizer(completions, add_special_tokens=False)["input_ids"]
        ids = [torch.tensor([*row, eos], device=device) for row in encoded]
        completion_ids = cat_padded([t.unsqueeze(0) for t in ids], pad)
        completion_mask = cat_padded([torch.ones(1, len(t), device=device) for t in ids], 0.0)
        rewards = [
            r
            for p in pairs
            for r in (
                1.0 if p.chosen_reward is None else p.chosen_reward,
                0.0 if p.rejected_reward is None else p.rejected_reward,
            )
        ]
        ref = [x for p in pairs for x in (p.ref_chosen_logp, p.ref_rejected_logp)]
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            rewards=torch.tensor(rewards, dtype=torch.float32, device=device),
            group_size=2,
            ref_sequence_logprobs=None
            if any(x is None for x in ref)
            else torch.tensor(ref, dtype=torch.float32, device=device),
        )
