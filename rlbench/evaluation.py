"""Evaluation on a task's eval split: what ``eval/accuracy`` (greedy) and, with ``eval.samples``
k > 1, ``eval/pass@k``, ``eval/maj@k`` and the pass@j curve (k sampled completions per prompt)
mean everywhere."""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rlbench.collectives import Collectives
from rlbench.policy import inference_mode
from rlbench.progress import Counted, counted
from rlbench.prompting import encode_prompts
from rlbench.rollout import RolloutBackend, SamplingParams, derive_seed
from rlbench.task import Prompt, Task


def decode_completions(tokenizer: object, completion_ids: Tensor, completion_mask: Tensor) -> list[str]:
    """Completion texts without special tokens; tokens after EOS are ignored.

    Special tokens decode to nothing here, so a completion holding one before its EOS must not
    be scored on this text (``special_token_rows``): ``4<pad>5`` would read as ``45``.
    """
    ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)  # type: ignore[attr-defined]
    return tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)  # type: ignore[attr-defined]


def special_token_rows(tokenizer: object, completion_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """``[B]`` bool: completions holding a special token (pad, bos, unk, ...) before their EOS.

    They score 0 and never count as correct, whatever their decoded text says: the reward must
    judge exactly what was generated, and the decoded text drops these tokens silently.
    """
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    special = sorted(set(tokenizer.all_special_ids) - {eos})  # type: ignore[attr-defined]
    if not special:
        return torch.zeros(completion_ids.shape[0], dtype=torch.bool, device=completion_ids.device)
    is_special = torch.isin(completion_ids, torch.tensor(special, device=completion_ids.device))
    return (is_special & (completion_mask > 0)).any(-1)


def read_completions(
    tokenizer: object, completion_ids: Tensor, completion_mask: Tensor
) -> tuple[list[str], Tensor]:
    """``(texts, invalid)``: what a verifier reads, and which rows it must not credit.

    The one way rollouts are read for scoring (training rewards and eval alike), so no caller
    decodes a completion without flagging the special tokens its text hides.
    """
    texts = decode_completions(tokenizer, completion_ids, completion_mask)
    return texts, special_token_rows(tokenizer, completion_ids, completion_mask)


def greedy_accuracy(
    model: nn.Module,
    tokenizer: object,
    task: Task,
    prompts: list[Prompt],
    backend: RolloutBackend,
    max_new_tokens: int,
) -> float:
    """Fraction of ``prompts`` whose greedy completion the task's verifier accepts."""
    return greedy_correct(model, tokenizer, task, prompts, backend, max_new_tokens) / len(prompts)


def greedy_correct(
    model: nn.Module,
    tokenizer: object,
    task: Task,
    prompts: list[Prompt],
    backend: RolloutBackend,
    max_new_tokens: int,
    chunk: int = 256,
    bar: Counted | None = None,
) -> int:
    """How many of ``prompts`` the greedy completion solves (a count, so shards can be summed).

    A completion with a special token before its EOS is never correct (``special_token_rows``).
    ``bar`` (over prompts) advances as the completions are generated.
    """
    device = next(model.parameters()).device
    correct = 0
    with inference_mode(model):
        for start in range(0, len(prompts), chunk):
            part = prompts[start : start + chunk]
            ids, mask = encode_prompts(tokenizer, [p.text for p in part], device, task.config)
            params = SamplingParams(max_new_tokens, 0.0)
            with advancing(bar, model, len(part), max_new_tokens):
                rollout = backend.generate(model, ids, mask, [0] * len(part), params)
            texts, invalid = read_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)
            correct += sum(
                not bad and task.is_correct(p, t) for p, t, bad in zip(part, texts, invalid.tolist())
            )
    return correct


@contextlib.contextmanager
def advancing(bar: Counted | None, model: nn.Module, prompts: int, max_new_tokens: int) -> Iterator[None]:
    """Moves ``bar`` over a batch of ``prompts`` while it generates, done when the block ends.

    One batch can be a whole evaluation (256 prompts), so a bar advanced only between batches
    would sit at 0 and then jump. Generation calls the model once to prefill and once per new
    token, so each call counts as ``1 / max_new_tokens`` of the batch (a batch that stops early,
    every row at EOS, jumps to its end): a count and an ETA that move during the batch, without
    the backend knowing about bars. Nothing is hooked when the bar is off.
    """
    if bar is None or bar.bar is None:
        yield
        return
    shown, calls = 0, 0

    def count_call(*_: object) -> None:
        nonlocal shown, calls
        calls += 1
        reached = min(prompts - 1, prompts * calls // max(1, max_new_tokens))  # scored: at the end
        if reached > shown:
            bar.update(reached - shown)
            shown = reached

    handle = model.register_forward_hook(count_call)
    try:
        yield
    finally:
        handle.remove()
    bar.update(prompts - shown)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021):
    ``1 - C(n - c, k) / C(n, k)``, the chance that ``k`` of the samples drawn without
    replacement hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_curve_ks(k: int) -> list[int]:
    """The ``j`` of the pass@j curve an evaluation with ``eval.samples = k`` logs, all from the
    same ``k`` samples: 1, the powers of two strictly between 1 and ``k``, and ``k``
    (``[1, 2, 4, 6]`` for ``k = 6``). ``[1]`` for ``k = 1``, where nothing is sampled."""
    if k < 1:
        raise ValueError(f"the pass@j curve needs k >= 1 samples, got k={k}")
    ks = [1]
    while ks[-1] * 2 < k:
        ks.append(ks[-1] * 2)
    return ks + [k] if k > 1 else ks


def pass_metric(j: int, k: int) -> str:
    """The name pass@j is logged under when ``eval.samples = k``: ``eval/pass@1``, ``eval/pass@k``
    for ``j = k``, else ``eval/pass@{j}`` (``j`` in ``pass_curve_ks(k)``)."""
    if j not in pass_curve_ks(k):
        raise ValueError(f"pass@{j} is not logged with eval.samples={k}; it logs j in {pass_curve_ks(k)}")
    if j == k and k > 1:
        return "eval/pass@k"
    return f"eval/pass@{j}"


def majority_correct(task: Task, prompt: Prompt, completions: list[str], invalid: list[bool]) -> bool:
    """maj@k: whether the most frequent extracted answer (canonical form; ties go to the answer
    reached first) is correct. Completions without an answer, or with a special token, do not vote."""
    votes: Counter[str] = Counter()
    first: dict[str, str] = {}
    for text, bad in zip(completions, invalid, strict=True):
        key = None if bad else task.answer_key(text)
        if key is not None:
            votes[key] += 1
            first.setdefault(key, text)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(key for key in first if votes[key] == top)  # insertion order: reached first
    return task.is_correct(prompt, first[winner])


@dataclass
class SampledEval:
    """Sums over prompts (so shards add up): pass@k, maj@k hits, the fraction correct and, per
    ``j`` strictly between 1 and k on the curve (``pass_curve_ks``), pass@j."""

    pass_at_k: float = 0.0
    maj_at_k: float = 0.0
    pass_at_1: float = 0.0
    pass_at_j: dict[int, float] = field(default_factory=dict)


def sampled_eval(
    model: nn.Module,
    tokenizer: object,
    task: Task,
    prompts: list[Prompt],
    backend: RolloutBackend,
    params: SamplingParams,
    k: int,
    seeds: list[list[int]],
    rows: int = 256,
    bar: Counted | None = None,
) -> SampledEval:
    """``k`` sampled completions per prompt (``seeds[i]``: prompt ``i``'s ``k`` sampling seeds),
    generated ``rows`` at a time. Every pass@j of the curve comes from the same samples.
    ``bar`` (over prompts) advances as the completions are generated."""
    device = next(model.parameters()).device
    # every j present even on a shard without prompts, so all processes sum the same keys
    out = SampledEval(pass_at_j={j: 0.0 for j in pass_curve_ks(k)[1:-1]})
    per_chunk = max(1, rows // k)
    with inference_mode(model):
        for start in range(0, len(prompts), per_chunk):
            part = prompts[start : start + per_chunk]
            texts_in = [p.text for p in part for _ in range(k)]  # prompt i's samples: rows i*k ..
            ids, mask = encode_prompts(tokenizer, texts_in, device, task.config)
            row_seeds = [s for i in range(start, start + len(part)) for s in seeds[i]]
            with advancing(bar, model, len(part), params.max_new_tokens):
                rollout = backend.generate(model, ids, mask, row_seeds, params)
            texts, invalid = read_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)
            flags = invalid.tolist()
            for i, prompt in enumerate(part):
                mine, bad = texts[i * k : (i + 1) * k], flags[i * k : (i + 1) * k]
                correct = sum(not b and task.is_correct(prompt, t) for t, b in zip(mine, bad))
                out.pass_at_k += pass_at_k(k, correct, k)
                for j in out.pass_at_j:
                    out.pass_at_j[j] += pass_at_k(k, correct, j)
                out.maj_at_k += majority_correct(task, prompt, mine, bad)
                out.pass_at_1 += correct / k
    return out


#: Makes eval's bars: ``(total, desc, enabled) -> bar`` shaped like ``rlbench.progress.Counted``.
BarFactory = Callable[[int, str, "bool | None"], Any]

_EVAL_SAMPLES = 0x65766B  # seeds of eval sampling (pass@k), apart from every training draw


class Evaluator:
    """A policy's scores on the task's eval split: greedy ``eval/accuracy`` and, with
    ``eval.samples`` k > 1, ``eval/pass@k``, ``eval/maj@k``, the sampled ``eval/pass@1`` and
    ``eval/pass@{j}`` for the powers of two ``j`` between them (the curve, ``pass_curve_ks``).

    Each process scores its share of the prompts (``prompts[rank::world]``); the sums add up
    over processes (``dist.sum``), so every process returns the global figures.
    """

    def __init__(
        self,
        task: Task,
        tokenizer: object,
        backend: RolloutBackend,
        prompts: list[Prompt],
        params: SamplingParams,
        samples: int,
        seed: int,
        dist: Collectives,
        progress: bool | None = None,
    ) -> None:
        self.task, self.tokenizer, self.backend, self.prompts = task, tokenizer, backend, prompts
        self.params, self.samples, self.seed, self.dist = params, samples, seed, dist
        #: Rank 0's progress bar over the prompts: None shows it on a terminal only (logs and
        #: ``rlbench compare``'s workers stay quiet), False never (``--no-progress``).
        self.progress = progress
        #: What draws it: a bar of its own by default; ``rlbench.run`` swaps in a row of
        #: Lightning's live bar, which holds the terminal while training runs.
        self.bars: BarFactory = counted

    def metrics(self, model: nn.Module, step: int, rank: int) -> dict[str, float]:
        """The ``eval/*`` metrics of ``model`` at rollout step ``step`` (which seeds the samples)."""
        world, n = self.dist.world_size, len(self.prompts)
        mine = self.prompts[rank::world]
        # one bar, on rank 0 only: the other ranks score their shares in step with it
        enabled = self.progress if rank == 0 else False
        share = f", rank 0's {len(mine)} of {n} prompts" if world > 1 else ""
        with self.bars(len(mine), f"eval at step {step} (greedy{share})", enabled) as bar:
            correct = greedy_correct(
                model, self.tokenizer, self.task, mine, self.backend, self.params.max_new_tokens, bar=bar
            )
        out = {"eval/accuracy": self.dist.sum(correct) / n}
        k = self.samples
        if k > 1:
            seeds = [
                [derive_seed(self.seed, _EVAL_SAMPLES, step, i, j) for j in range(k)]
                for i in range(rank, n, world)
            ]
            with self.bars(len(mine), f"eval at step {step} ({k} samples each{share})", enabled) as bar:
                sums = sampled_eval(
                    model, self.tokenizer, self.task, mine, self.backend, self.params, k, seeds, bar=bar
                )
            out["eval/pass@k"] = self.dist.sum(sums.pass_at_k) / n
            out["eval/maj@k"] = self.dist.sum(sums.maj_at_k) / n
            out["eval/pass@1"] = self.dist.sum(sums.pass_at_1) / n
            for j in pass_curve_ks(k)[1:-1]:  # the same js, in the same order, on every process
                out[pass_metric(j, k)] = self.dist.sum(sums.pass_at_j[j]) / n
        return out
