"""Per-token log-probs and exact entropy from the LM head's input, a chunk of tokens at a time.

The plain way (``naive_token_logprobs``) projects every token onto the whole vocabulary and
keeps the fp32 ``log_softmax`` of it for backward: ``[B, T, V]`` floats, 2.5 GB at
``B=8, T=512, V=151936`` (Qwen2.5), several times that at the forward's peak (logits, their
log-softmax, the entropy's temporaries) and again in backward. Only two things per token are
wanted, the log-prob of the target token and the entropy, so ``token_logprobs`` works on
``chunk_tokens`` rows at a time and keeps none of their logits:

1. Forward, per chunk of flattened tokens: ``logits = (h @ W[:V].T + b[:V]).float() / T``,
   ``lse = logsumexp(logits)``, ``logprob = logits[target] - lse``, entropy
   ``-sum_v p_v log p_v`` with ``log p = logits - lse``. Kept for backward: the inputs (which
   exist anyway: the hidden states, the head's weight and bias, the targets) and ``lse``,
   one float per token.
2. Backward, per chunk: recompute the chunk's logits (one more ``[C, H] x [H, V]`` matmul),
   ``p = exp(logits - lse)``; the gradient of ``logprob`` w.r.t. the logits is
   ``onehot(target) - p``, times the upstream gradient and ``1 / T``; two matmuls give the
   chunk's gradient w.r.t. its hidden states and its share of the weight's gradient, which
   is only computed when the head is trained (a frozen head under LoRA costs nothing).

The matmuls run in the dtype the plain head call would use (the autocast dtype under
``torch.autocast``, else the hidden states' dtype); all softmax maths is fp32, and each
gradient comes back in its input's dtype (fp32 master weights get fp32 gradients).

A head that is not a plain ``nn.Linear`` (a PEFT LoRA wrapper, a custom forward, a head with
hooks) takes the generic path: the plain maths per chunk under activation checkpointing,
so backward recomputes that chunk's logits through the head's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from rlbench.errors import ConfigError


def naive_token_logprobs(
    hidden: Tensor,
    head: nn.Module,
    targets: Tensor,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    with_entropy: bool = False,
    chunk_tokens: int = 1024,
) -> tuple[Tensor, Tensor | None]:
    """The reference that ``token_logprobs`` equals: full ``[B, T, V]`` logits at once.
    ``chunk_tokens`` is unused; it is here so both functions take the same arguments."""
    return logits_logprobs(head(hidden), targets, temperature, vocab_size, with_entropy)


def logits_logprobs(
    logits: Tensor, targets: Tensor, temperature: float, vocab_size: int | None, with_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """``(logprobs, entropy)`` from full logits ``[B, T, V]``: fp32 ``log_softmax(logits / T)``
    over the first ``vocab_size`` rows, gathered at ``targets``; the entropy detached."""
    logits = logits[..., :vocab_size].float() / temperature
    logprobs_all = torch.log_softmax(logits, dim=-1)
    logprobs = logprobs_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)
    return logprobs, entropy


def token_logprobs(
    hidden: Tensor,
    head: nn.Module,
    targets: Tensor,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    with_entropy: bool = False,
    chunk_tokens: int = 1024,
) -> tuple[Tensor, Tensor | None]:
    """``(logprobs, entropy)`` of ``targets [B, T]`` given the LM head's input ``hidden
    [B, T, H]``, equal to ``naive_token_logprobs`` without its ``[B, T, V]`` tensors.

    ``logprobs`` is fp32 ``[B, T]`` and carries gradient to ``hidden`` and the head's
    parameters; ``entropy`` (when ``with_entropy``) is the exact fp32 entropy, detached. Both
    are over the first ``vocab_size`` rows of the head (all if None) at ``temperature``.
    ``chunk_tokens`` tokens are projected onto the vocabulary at a time: at the peak, forward
    or backward, about two ``[chunk_tokens, V]`` fp32 buffers live at once (plus the head's
    gradient when it is trained). Smaller chunks save memory; too small ones leave the
    matmuls too thin to run fast.
    """
    if not is_positive_int(chunk_tokens):
        raise ConfigError("chunk_tokens", chunk_tokens, "an int >= 1 (tokens per vocabulary projection)")
    if vocab_size is not None and not is_positive_int(vocab_size):
        raise ConfigError("vocab_size", vocab_size, "None (all rows of the LM head) or an int >= 1")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)}, hidden {tuple(hidden.shape)}: targets must "
            f"be hidden's shape without its last (hidden size) dimension"
        )
    if hidden.numel() == 0:  # nothing to chunk; the plain maths handles empty batches
        return naive_token_logprobs(hidden, head, targets, temperature, vocab_size, with_entropy)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    if is_plain_linear(head):
        num_rows = head.weight.shape[0]
        vocab_rows = num_rows if vocab_size is None else min(vocab_size, num_rows)  # as [..., :V]
        device_type = hidden.device.type
        # What ``head(hidden)`` would multiply in: autocast casts the operands of ``linear``.
        autocast = torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
        if not autocast and head.weight.dtype != hidden.dtype:  # as ``head(hidden)`` would refuse
            raise ValueError(
                f"hidden is {hidden.dtype} but the LM head's weight is {head.weight.dtype}: cast one "
                f"of them, or run under torch.autocast"
            )
        logprobs, entropy = ChunkedLinearLogprobs.apply(
            flat_hidden,
            head.weight,
            head.bias,
            flat_targets,
            float(temperature),
            vocab_rows,
            chunk_tokens,
            with_entropy,
            compute_dtype,
        )
    else:
        logprobs, entropy = checkpointed_logprobs(
            flat_hidden, head, flat_targets, temperature, vocab_size, with_entropy, chunk_tokens
        )
    return logprobs.view(targets.shape), entropy.view(targets.shape) if with_entropy else None


def is_positive_int(value: object) -> bool:
    """An int >= 1 and not a bool (``True`` is an int to Python, never a size here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_plain_linear(head: nn.Module) -> bool:
    """Whether ``head(x)`` is exactly ``F.linear(x, head.weight, head.bias)``, so the fused
    path may skip calling it. Hooks count as forward logic: FSDP gathers sharded weights in a
    pre-hook, and a capturing hook would miss the call."""
    return (
        isinstance(head, nn.Linear)
        and type(head).forward is nn.Linear.forward
        and not head._forward_pre_hooks
        and not head._forward_hooks
    )


def chunk_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, compute_dtype: torch.dtype
) -> Tensor:
    """fp32 ``[C, V]`` logits of one chunk. Forward and backward both call this, so backward's
    recomputed logits are the forward's, bit for bit."""
    logits = F.linear(hidden.to(compute_dtype), weight, bias).float()
    return logits.div_(temperature)


class ChunkedLinearLogprobs(torch.autograd.Function):
    """Log-probs of targets (and detached entropy) through a linear head, chunk by chunk over
    tokens; saves the inputs and one log-sum-exp per token, recomputes logits in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        temperature: float,
        vocab_size: int,
        chunk_tokens: int,
        with_entropy: bool,
        compute_dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor]:
        num_tokens = hidden.shape[0]
        logprobs = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logprobs)
        # An empty tensor stands for "no entropy": a Function's outputs must all be tensors.
        entropy = torch.empty(num_tokens if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        # Autocast off: the casts to ``compute_dtype`` already do what it would, and it must not
        # recast the fp32 softmax maths.
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = cast_head(weight, bias, vocab_size, compute_dtype)
            for start in range(0, num_tokens, chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                lse[rows], logprobs[rows], chunk_entropy = forward_chunk(
                    hidden[rows], w, b, targets[rows], temperature, compute_dtype, with_entropy
                )
                if chunk_entropy is not None:
                    entropy[rows] = chunk_entropy
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.vocab_size = temperature, vocab_size
        ctx.chunk_tokens, ctx.compute_dtype = chunk_tokens, compute_dtype
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logprobs: Tensor, _grad_entropy: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        temperature, vocab_size, compute_dtype = ctx.temperature, ctx.vocab_size, ctx.compute_dtype
        num_tokens = hidden.shape[0]
        # Low-precision chunk products are summed in fp32, as one big matmul would accumulate.
        sum_dtype = torch.promote_types(compute_dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # Rows past ``vocab_size`` reach no log-prob: their gradient stays zero.
        grad_weight = torch.zeros_like(weight, dtype=sum_dtype) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
        # logits = z / T, so d logprob / dz = (onehot - p) / T: the 1/T joins the upstream grad
        scale = grad_logprobs.float() / temperature
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = cast_head(weight, bias, vocab_size, compute_dtype)
            for start in range(0, num_tokens, ctx.chunk_tokens):
                rows = slice(start, start + ctx.chunk_tokens)
                backward_chunk(
                    hidden[rows],
                    w,
                    b,
                    targets[rows],
                    lse[rows],
                    scale[rows],
                    temperature,
                    compute_dtype,
                    None if grad_hidden is None else grad_hidden[rows],
                    None if grad_weight is None else grad_weight[:vocab_size],
                    None if grad_bias is None else grad_bias[:vocab_size],
                )
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            *([None] * 6),
        )


# A chunk's work is a function of its own so that its [C, V] buffers are freed when it returns,
# before the next chunk allocates its own: in a loop body they would live one iteration more.
def forward_chunk(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    temperature: float,
    compute_dtype: torch.dtype,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(logsumexp, logprobs, entropy or None)`` of one chunk's logits."""
    logits = chunk_logits(hidden, weight, bias, temperature, compute_dtype)
    lse = torch.logsumexp(logits, dim=-1)
    logprobs_all = logits.sub_(lse[:, None])  # in place: one [C, V] buffer
    logprobs = logprobs_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -logprobs_all.exp().mul_(logprobs_all).sum(-1) if with_entropy else None
    return lse, logprobs, entropy


def backward_chunk(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    scale: Tensor,
    temperature: float,
    compute_dtype: torch.dtype,
    grad_hidden: Tensor | None,
    weight_sum: Tensor | None,
    bias_sum: Tensor | None,
) -> None:
    """Writes one chunk's gradient w.r.t. its hidden states into ``grad_hidden`` and adds its
    share of the head's into ``weight_sum`` and ``bias_sum``, each only where given."""
    hidden = hidden.to(compute_dtype)
    # dL/dz = g / T * (onehot(target) - p), built in the recomputed logits' buffer
    grad_logits = chunk_logits(hidden, weight, bias, temperature, compute_dtype)
    grad_logits.sub_(lse[:, None]).exp_().mul_(-scale[:, None])
    grad_logits.scatter_add_(1, targets[:, None], scale[:, None])
    if bias_sum is not None:
        bias_sum += grad_logits.sum(0)
    grad_logits = grad_logits.to(compute_dtype)  # drops the fp32 buffer when this copies
    if grad_hidden is not None:
        grad_hidden.copy_(grad_logits @ weight)
    if weight_sum is not None:
        if weight_sum.dtype == compute_dtype:
            weight_sum.addmm_(grad_logits.T, hidden)
        else:  # addmm_ takes one dtype: the low-precision [V, H] product is a temporary
            weight_sum += grad_logits.T @ hidden


def cast_head(
    weight: Tensor, bias: Tensor | None, vocab_size: int, compute_dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """The head's first ``vocab_size`` rows in the matmul dtype (no copy when it already is)."""
    rows = weight[:vocab_size].to(compute_dtype)
    return rows, None if bias is None else bias[:vocab_size].to(compute_dtype)


def checkpointed_logprobs(
    hidden: Tensor,
    head: nn.Module,
    targets: Tensor,
    temperature: float,
    vocab_size: int | None,
    with_entropy: bool,
    chunk_tokens: int,
) -> tuple[Tensor, Tensor]:
    """The generic path over flat ``hidden [N, H]``: ``naive_token_logprobs`` per chunk, each
    chunk checkpointed so backward recomputes its logits through ``head`` instead of keeping
    them. Returns an empty entropy when ``with_entropy`` is false."""
    logprobs: list[Tensor] = []
    entropy_slots: list[list[Tensor]] = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk = (hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        entropy_slot: list[Tensor] | None = [] if with_entropy else None
        if entropy_slot is not None:
            entropy_slots.append(entropy_slot)
        if torch.is_grad_enabled():
            lp = checkpoint(
                chunk_logprobs, *chunk, head, temperature, vocab_size, entropy_slot, use_reentrant=False
            )
        else:  # nothing to recompute for
            lp = chunk_logprobs(*chunk, head, temperature, vocab_size, entropy_slot)
        logprobs.append(lp)
    entropy = torch.cat([slot[0] for slot in entropy_slots]) if with_entropy else logprobs[0].new_empty(0)
    return torch.cat(logprobs), entropy


def chunk_logprobs(
    hidden: Tensor,
    targets: Tensor,
    head: nn.Module,
    temperature: float,
    vocab_size: int | None,
    entropy_slot: list[Tensor] | None,
) -> Tensor:
    """One chunk of the generic path: its log-probs; its entropy goes into ``entropy_slot``
    (when given) on the first call only. Checkpointing calls this again in backward, where the
    entropy is not wanted; no-grad maths saves nothing, so skipping it there leaves the
    recomputation identical to the forward."""
    first_call = entropy_slot is not None and not entropy_slot
    logprobs, entropy = naive_token_logprobs(hidden, head, targets, temperature, vocab_size, first_call)
    if first_call:
        entropy_slot.append(entropy)
    return logprobs
