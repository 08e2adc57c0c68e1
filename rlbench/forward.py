"""Teacher-forced forwards: per-token log-probs, exact entropy and last hidden states of
completions under a causal LM, and the prompt prefill that sampling and scoring share.

Rows that share a prompt (a GRPO group's G samples, a DPO pair's chosen and rejected) run that
prompt once: its KV cache is computed for each distinct prompt and copied to the rows that hold
it, so the prompt's compute (and, in training, its backward) is paid once per prompt.

For the common decoder families the forward stops at the trunk's last hidden states and
``rlbench.logprobs`` runs the LM head over them a chunk of tokens at a time, so no
``[B, T, V]`` logits are ever held; any other causal LM goes through its own forward.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rlbench.algorithm import RolloutBatch
from rlbench.errors import RLBenchError
from rlbench.logprobs import logits_logprobs, token_logprobs


def forward_parameters(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    """The named parameters of ``model.forward`` (of the wrapped model under a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def cache_kwarg(model: nn.Module) -> str:
    """The name of the KV-cache argument of ``model.forward``: ``cache`` from transformers 5.23
    (``past_key_values`` is removed in 5.40), ``past_key_values`` before and in remote code."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def distinct_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's distinct prompts ``(ids, mask)`` and, for each row, the index of its own."""
    width = prompt_ids.shape[1]
    both = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], 1)
    distinct, row_of = torch.unique(both, dim=0, return_inverse=True)
    return distinct[:, :width], distinct[:, width:].to(prompt_mask.dtype), row_of


def prefill(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, row_of: Tensor) -> tuple[Any, Any]:
    """Runs distinct prompts once with a KV cache and copies the cache to the rows: row ``i``
    gets prompt ``row_of[i]``'s. Returns the model output (logits of the last position, one
    row per distinct prompt) and the cache (one row per batch row). Under autograd the copy
    is an ``index_select``, so each prompt's gradient is the sum over its rows, as if every
    row had run the prompt itself."""
    from transformers import DynamicCache

    padded = not bool(prompt_mask.all())
    cache = DynamicCache()
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask if padded else None,
        position_ids=position_ids(prompt_mask) if padded else None,
        use_cache=True,
        # a causal LM computes logits for the last position only; a trunk has no logits
        **({"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}),
        # transformers >= 5.23 names it ``cache`` (``past_key_values`` goes in 5.40); older
        # releases and remote-code models only know ``past_key_values``
        **{cache_kwarg(model): cache},
    )
    cache.reorder_cache(row_of)
    return out, cache


@dataclass
class ForwardOutput:
    """What one teacher-forced forward over a batch's completions gives, per completion token."""

    logprobs: Tensor  # [B, T], fp32, with gradient when the forward had one
    entropy: Tensor | None = None  # [B, T], exact, detached
    hidden: Tensor | None = None  # [B, T, H], the last hidden state that predicts token t


def output_head(model: nn.Module) -> nn.Module:
    """The module that maps the last hidden state to logits (the LM head), LoRA wrapper or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        raise RLBenchError(
            f"{type(base).__name__} exposes no output embeddings (get_output_embeddings), so its "
            f"trunk gives no hidden states to a value head; use a causal LM with an LM head"
        )
    return head


def hidden_size(model: nn.Module) -> int:
    """Width of the last hidden state (what a value head reads)."""
    weight = getattr(output_head(model), "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise RLBenchError(f"{type(model).__name__}: its LM head has no [vocab, hidden] weight")
    return int(weight.shape[1])


@contextlib.contextmanager
def capture_head_input(model: nn.Module) -> Iterator[list[Tensor]]:
    """Records the input of the LM head during a forward: the last hidden states, exactly the
    positions the logits are computed for, at no cost (``output_hidden_states=True`` would keep
    every layer's activations). The captured tensor carries the forward's gradient."""
    captured: list[Tensor] = []
    handle = output_head(model).register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


#: Model types whose logits are exactly ``lm_head(trunk's last hidden state)``, with nothing
#: after the head (no soft-capping as in Gemma 2, no logit scale as in Cohere or Granite): for
#: them the log-probs can be computed from the trunk's output, chunk by chunk, never holding
#: ``[B, T, V]`` logits. Other models keep the plain path (their own forward, full logits).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "smollm3", "olmo2"})


def decoder_trunk(model: nn.Module) -> nn.Module | None:
    """The decoder stack under the LM head (``LlamaModel`` of ``LlamaForCausalLM``), LoRA
    wrapper or not, when the model is one of ``PLAIN_HEAD_MODEL_TYPES``; else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    trunk = getattr(base, "base_model", None)
    return trunk if isinstance(trunk, nn.Module) and trunk is not base else None


def completion_forward(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    vocab_size: int | None = None,
    with_hidden: bool = False,
    chunk_tokens: int = 1024,
) -> ForwardOutput:
    """Per-token log-probs of ``completion_ids`` under ``model`` in fp32, and optionally the
    exact entropy and the last hidden states.

    A teacher-forced forward over prompt + completion, in two calls: each distinct prompt runs
    once (``prefill``: a GRPO group's G rows or a DPO pair's two share one), then the
    completions run on its copied KV cache. Log-probs and entropy are at the sampling
    ``temperature``: ``softmax(logits / T)`` over the first ``vocab_size`` rows (the real
    tokens, as the sampler draws them; all rows if None). The entropy is the exact
    ``-sum_v p_v log p_v`` over that vocabulary, detached. The hidden state at position t is
    the one that predicts completion token t (the state ``s_t`` a value head scores).

    With ``chunk_tokens`` > 0 and a model whose trunk is reachable (``decoder_trunk``), the
    trunk's hidden states go through the LM head ``chunk_tokens`` tokens at a time
    (``rlbench.logprobs.token_logprobs``): the same numbers without ``[B, T, V]`` logits, which
    at a real vocabulary are the largest tensors of the step. Otherwise (or with 0) the
    model's own forward computes the completion positions' logits at once.
    """
    trunk = decoder_trunk(model) if chunk_tokens > 0 else None
    if trunk is None:
        return full_logits_forward(
            model,
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            temperature,
            with_entropy,
            vocab_size,
            with_hidden,
        )
    hidden = teacher_forced(trunk, prompt_ids, prompt_mask, completion_ids, completion_mask)
    logprobs, entropy = token_logprobs(
        hidden, output_head(model), completion_ids, temperature, vocab_size, with_entropy, chunk_tokens
    )
    return ForwardOutput(logprobs, entropy, hidden if with_hidden else None)


def teacher_forced(
    net: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
) -> Tensor:
    """``net``'s output ``[B, T, ...]`` at the positions that predict each completion token:
    the prefill's last position (token 0), then the completion's own (token t - 1 predicts t).

    ``net`` is a causal LM (its logits are returned) or a decoder trunk (its last hidden
    states). One code path whether or not rows repeat a prompt, so a row's numbers do not
    depend on which rows share its micro-batch (micro-batching must not change the result).
    """
    num_completion = completion_ids.shape[1]
    mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    padded = not bool(prompt_mask.all())
    prompts, prompt_masks, row_of = distinct_prompts(prompt_ids, prompt_mask)
    first, cache = prefill(net, prompts, prompt_masks, row_of)
    outputs = [main_output(first)[row_of, -1:]]
    if num_completion > 1:
        rest = net(
            input_ids=completion_ids[:, :-1],
            attention_mask=mask[:, :-1] if padded else None,
            position_ids=position_ids(mask)[:, prompt_ids.shape[1] : -1] if padded else None,
            use_cache=True,
            **{cache_kwarg(net): cache},
        )
        outputs.append(main_output(rest))
    return torch.cat(outputs, dim=1)[:, :num_completion]


def main_output(out: Any) -> Tensor:
    """A causal LM's logits, or a decoder trunk's last hidden state."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def full_logits_forward(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float,
    with_entropy: bool,
    vocab_size: int | None,
    with_hidden: bool,
) -> ForwardOutput:
    """``completion_forward`` through the model's own forward: logits of every completion
    position at once (any causal LM, whatever it does after its head)."""
    hooks = capture_head_input(model) if with_hidden else contextlib.nullcontext([])
    with hooks as captured:
        logits = teacher_forced(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    logprobs, entropy = logits_logprobs(logits, completion_ids, temperature, vocab_size, with_entropy)
    hidden = None
    if with_hidden:  # the LM head's inputs: the prefill's last position, then the completion's
        _, _, row_of = distinct_prompts(prompt_ids, prompt_mask)
        hidden = torch.cat([captured[0][row_of, -1:], *captured[1:]], dim=1)[:, : completion_ids.shape[1]]
    return ForwardOutput(logprobs, entropy, hidden)


def completion_logprobs(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(logprobs, entropy)`` of ``completion_forward``."""
    out = completion_forward(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, with_entropy, vocab_size
    )
    return out.logprobs, out.entropy


def batch_forward(
    model: nn.Module,
    batch: RolloutBatch,
    temperature: float,
    with_entropy: bool = False,
    vocab_size: int | None = None,
    with_hidden: bool = False,
    chunk_tokens: int = 1024,
) -> ForwardOutput:
    """``completion_forward`` of a rollout batch's completions (policy, reference, critic)."""
    return completion_forward(
        model,
        batch.prompt_ids,
        batch.prompt_mask,
        batch.completion_ids,
        batch.completion_mask,
        temperature,
        with_entropy=with_entropy,
        vocab_size=vocab_size,
        with_hidden=with_hidden,
        chunk_tokens=chunk_tokens,
    )


def batch_logprobs(
    model: nn.Module,
    batch: RolloutBatch,
    temperature: float,
    with_entropy: bool = False,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(logprobs, entropy)`` of ``batch_forward``."""
    out = batch_forward(model, batch, temperature, with_entropy, vocab_size)
    return out.logprobs, out.entropy
