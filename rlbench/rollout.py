"""Rollouts: batched sampling with a KV cache, every draw seeded per completion.

Each completion owns a seed derived from ``(run seed, step, prompt index, sample index)``;
its uniform draws come from a generator with that seed and pick tokens by inverse-CDF
sampling. So a run is reproducible and resumable from any step, and a completion does not
depend on which other prompts share its batch or how many processes split the step.
"""

from __future__ import annotations

import abc
import hashlib
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlbench.algorithm import cat_padded
from rlbench.forward import cache_kwarg, distinct_prompts, position_ids, prefill


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class Rollout:
    """Sampled completions: ``[B, T]`` tensors, ``T <= max_new_tokens``."""

    completion_ids: Tensor  # pad after EOS
    completion_mask: Tensor  # float, 1 up to and including EOS
    logprobs: Tensor  # behaviour log-probs of the sampled tokens (0 where masked)


class RolloutBackend(abc.ABC):
    """Turns prompts into completions. A vLLM backend slots in here on GPUs."""

    @abc.abstractmethod
    def generate(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        seeds: list[int],
        params: SamplingParams,
    ) -> Rollout:
        """Samples one completion per row of ``prompt_ids`` (left padded), row ``i`` from ``seeds[i]``."""


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Sets logits outside the top-k / top-p (nucleus) set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(log_dist: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draws: for each row, the first token whose cumulative mass exceeds ``u * total``.

    ``log_dist [B, V]`` are log-probabilities (``-inf`` for excluded tokens), ``uniforms [B]`` in
    ``[0, 1)``. The right-side search skips zero-mass tokens even when ``u = 0``; when rounding
    puts ``u * total`` at or past the last cumulative value, the last token with mass is taken
    (never a zero-probability one).
    """
    probs = log_dist.exp()
    cdf = probs.cumsum(-1)
    token = torch.searchsorted(cdf, (uniforms.unsqueeze(-1) * cdf[:, -1:]).contiguous(), right=True)
    token = token.squeeze(-1)
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last_with_mass = torch.where(probs > 0, positions, -1).max(-1).values
    return torch.where(token >= probs.shape[-1], last_with_mass, token)


@contextmanager
def weights_cast_once(device_type: str) -> Iterator[None]:
    """Inside an autocast region (``bf16-mixed``), casts each trainable weight to the
    low-precision dtype once for the block instead of at every model call.

    Lightning's autocast turns autocast's cast cache off (a cached cast would outlive an
    optimiser step inside ``training_step``), so each decoding step would cast the whole model
    again. No weight changes while a block samples, so the cache is safe here, and it is
    emptied on the way out: no cast outlives the block. The casts are the same, so are the
    samples. Measured on the medium preset (64 rows, 32 new tokens, 2 CPU cores): sampling
    3-9% faster (docs/benchmarks.md). Frozen weights (a LoRA base model's) are never cached by
    autocast and are still cast per call.
    """
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=True):
        try:
            yield
        finally:
            torch.clear_autocast_cache()


class DecodeLoop(RolloutBackend):
    """A hand-written decode loop over a Hugging Face model's KV cache.

    Lighter than ``generate``: no logits processors, logits for the last position only, and
    per-row seeded draws. Stops when every row has emitted EOS.

    ``vocab_size`` is the number of real tokens: models pad their logit rows past the
    tokenizer (the tiny presets have 32 rows for 18 tokens, Qwen 151,936 for 151,665), and an
    id past the tokenizer decodes to nothing, so it could pad a right answer invisibly. Those
    rows are never sampled (nor chosen greedily); ``policy.completion_logprobs`` drops them too,
    so behaviour and training log-probs are over the same distribution.
    """

    def __init__(self, eos_token_id: int, pad_token_id: int, vocab_size: int | None = None) -> None:
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        seeds: list[int],
        params: SamplingParams,
    ) -> Rollout:
        with weights_cast_once(prompt_ids.device.type):
            return self.decode(model, prompt_ids, prompt_mask, seeds, params)

    def decode(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        seeds: list[int],
        params: SamplingParams,
    ) -> Rollout:
        rows, device = prompt_ids.shape[0], prompt_ids.device
        greedy = params.temperature == 0
        uniforms = None
        if not greedy:
            uniforms = torch.stack(
                [torch.rand(params.max_new_tokens, generator=torch.Generator().manual_seed(s)) for s in seeds]
            ).to(device)
        padded = not bool(prompt_mask.all())
        mask = prompt_mask.clone()
        # A group's G rows share one prompt: prefill each distinct prompt once, then copy its
        # KV cache to the group's rows (G times less prefill work).
        prompts, prompt_masks, row_of = distinct_prompts(prompt_ids, prompt_mask)
        out, cache = prefill(model, prompts, prompt_masks, row_of)
        cache_arg = {cache_kwarg(model): cache}
        vocab = slice(0, self.vocab_size)  # real tokens only
        logits = out.logits[row_of, -1, vocab].float()
        next_position = position_ids(mask)[:, -1:] + 1
        completion_ids = torch.full(
            (rows, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=device
        )
        logprobs = torch.zeros(rows, params.max_new_tokens, dtype=torch.float32, device=device)
        # Rows still decoding, as indices into the batch. A row that emits EOS leaves the
        # decoding batch (its KV cache rows are dropped), so later steps run only the rows
        # that still need tokens: with uneven lengths most of the decoding work.
        live = torch.arange(rows, device=device)
        width = params.max_new_tokens
        for t in range(params.max_new_tokens):
            if t > 0:
                logits = out.logits[:, -1, vocab].float()
            if greedy:
                token = logits.argmax(-1)
                logp = torch.zeros(len(live), dtype=torch.float32, device=device)
            else:
                logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
                log_dist = torch.log_softmax(logits, dim=-1)
                token = sample_tokens(log_dist, uniforms[:, t])
                logp = log_dist.gather(-1, token.unsqueeze(-1)).squeeze(-1)
            completion_ids[live, t] = token
            logprobs[live, t] = logp
            going = token != self.eos_token_id
            if not bool(going.any()) or t == params.max_new_tokens - 1:
                width = t + 1
                break
            if not bool(going.all()):
                keep = going.nonzero().squeeze(-1)
                live, token, mask, next_position = live[keep], token[keep], mask[keep], next_position[keep]
                uniforms = None if uniforms is None else uniforms[keep]
                cache.reorder_cache(keep)
            if padded:
                mask = torch.cat([mask, torch.ones(len(live), 1, dtype=mask.dtype, device=device)], dim=1)
            out = model(
                input_ids=token.unsqueeze(-1),
                attention_mask=mask if padded else None,
                position_ids=next_position if padded else None,
                use_cache=True,
                **cache_arg,
            )
            next_position = next_position + 1
        completion_ids = completion_ids[:, :width]
        return Rollout(
            completion_ids, completion_mask(completion_ids, self.eos_token_id), logprobs[:, :width]
        )


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Stacks rollouts of micro-batches, right-padding to the longest completion."""
    if len(parts) == 1:
        return parts[0]
    return Rollout(
        cat_padded([p.completion_ids for p in parts], pad_token_id),
        cat_padded([p.completion_mask for p in parts], 0.0),
        cat_padded([p.logprobs for p in parts], 0.0),
    )


def completion_mask(completion_ids: Tensor, eos_token_id: int) -> Tensor:
    """1.0 for every token up to and including the first EOS, 0.0 after it."""
    is_eos = (completion_ids == eos_token_id).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before position t
    return (eos_before == 0).float()


BACKENDS: dict[str, type[RolloutBackend]] = {"decode_loop": DecodeLoop}
