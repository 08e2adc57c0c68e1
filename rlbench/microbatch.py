"""How a step's rows are split into micro-batches for forward and backward.

By row count (``train.micro_batch_size``) rows keep their order and the batch's full width. By
token budget (``train.micro_batch_tokens``) rows are sorted by completion length and packed
so that ``rows x (prompt width + longest completion)`` stays within the budget, and each
micro-batch is trimmed to its own longest completion: short completions no longer pay for the
step's longest one. The loss uses step-wide denominators (``LossScale``), so the split changes
nothing but float summation order; results computed per micro-batch go back to their rows
with ``scatter`` / ``merge``.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor

from rlbench.algorithm import RolloutBatch
from rlbench.experience import micro_batches

#: Which rows a micro-batch holds: a contiguous slice, or row indices (token-budget packing).
Rows = slice | Tensor


def completion_lengths(mask: Tensor) -> Tensor:
    """Per row, the position after its last unmasked completion token (0 for an empty row)."""
    if mask.shape[1] == 0:
        return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return ((mask > 0) * positions).amax(1)


def plan(batch: RolloutBatch, unit: int, max_rows: int, max_tokens: int) -> list[Rows]:
    """The micro-batches of ``batch``: examples of ``unit`` rows (a DPO pair) stay together.

    ``max_tokens`` 0 gives slices of ``max_rows`` rows (0: one slice of everything). Otherwise
    examples are taken shortest first, and a micro-batch closes when one more would make
    ``rows x (prompt width + longest completion)`` exceed ``max_tokens`` (or the rows exceed
    ``max_rows``); an example wider than the budget goes alone."""
    rows = len(batch)
    max_rows = -(-max_rows // unit) * unit if max_rows else 0
    if not max_tokens or rows == 0:
        return list(micro_batches(rows, max_rows))
    # on the host once: reading lengths one by one from a GPU would sync per example
    lengths = completion_lengths(batch.completion_mask).clamp(min=1).view(-1, unit).amax(1).cpu()
    order = torch.sort(lengths, stable=True).indices.tolist()
    prompt_width = batch.prompt_ids.shape[1]
    groups: list[list[int]] = [[]]
    for example in order:
        current = groups[-1]
        width = prompt_width + int(lengths[example])  # ascending: the newcomer is the widest
        wanted = (len(current) + 1) * unit
        if current and (wanted * width > max_tokens or (max_rows and wanted > max_rows)):
            groups.append(current := [])
        current.append(example)
    device = batch.completion_mask.device
    return [
        torch.tensor([e * unit + i for e in group for i in range(unit)], dtype=torch.long, device=device)
        for group in groups
    ]


def is_per_token(name: str, value: Tensor, width: int) -> bool:
    """Whether a ``RolloutBatch`` field runs over completion positions (``[B, T, ...]``)."""
    return not name.startswith("prompt_") and value.dim() >= 2 and value.shape[1] == width


def take(batch: RolloutBatch, rows: Rows) -> RolloutBatch:
    """The rows ``rows`` of ``batch``; from a token-budget plan (an index tensor), trimmed to
    their longest completion (the columns cut are padding in every one of these rows)."""
    part = batch.rows(rows)
    if isinstance(rows, slice) or len(part) == 0:
        return part
    width = part.completion_ids.shape[1]
    keep = max(int(completion_lengths(part.completion_mask).max()), 1)
    if keep == width:
        return part
    trimmed = {
        f.name: value[:, :keep]
        for f in fields(part)
        if isinstance(value := getattr(part, f.name), Tensor) and is_per_token(f.name, value, width)
    }
    return replace(part, **trimmed)


def scatter(parts: list[Tensor], plan_: list[Rows], like: Tensor) -> Tensor:
    """Per-micro-batch results ``[b, t, ...]`` put back at their rows of a ``[B, T, ...]``
    tensor (``like`` is ``[B, T]``); positions a micro-batch was trimmed of are 0."""
    if not parts:
        return torch.zeros_like(like)
    if all(isinstance(rows, slice) for rows in plan_):
        return torch.cat(parts)
    out = parts[0].new_zeros((*like.shape[:2], *parts[0].shape[2:]))
    for rows, part in zip(plan_, parts, strict=True):
        out[rows, : part.shape[1]] = part
    return out


def merge(parts: list[RolloutBatch], plan_: list[Rows], whole: RolloutBatch) -> RolloutBatch:
    """``RolloutBatch``es computed per micro-batch (``take(whole, rows)`` plus what a scoring
    pass added), put back in ``whole``'s row order and width. Positions a micro-batch was
    trimmed of keep ``whole``'s values, or 0 for a field only the parts have."""
    merged = {}
    for f in fields(RolloutBatch):
        values = [getattr(part, f.name) for part in parts]
        if not all(isinstance(v, Tensor) for v in values):
            continue
        per_token = [
            is_per_token(f.name, v, p.completion_ids.shape[1]) for v, p in zip(values, parts, strict=True)
        ]
        base = getattr(whole, f.name)
        if base is None:
            if all(per_token):
                shape = (len(whole), whole.completion_ids.shape[1], *values[0].shape[2:])
            else:
                shape = (len(whole), *values[0].shape[1:])
            base = values[0].new_zeros(shape)
        out = base.clone()
        for rows, value, token_field in zip(plan_, values, per_token, strict=True):
            if token_field:
                out[rows, : value.shape[1]] = value
            else:
                out[rows] = value
        merged[f.name] = out
    return replace(whole, **merged)


def minibatches(
    batch: RolloutBatch,
    k: int,
    group_size: int,
    seed: int | None = None,
    offset: int = 0,
    total: int | None = None,
) -> list[RolloutBatch]:
    """This process's share of the step's ``k`` minibatches (an optimiser step each), by group.

    Groups are numbered across the step's processes: this process holds groups ``offset ..
    offset + G_local - 1`` of ``total`` (the order one process would hold them in). With ``seed``
    those numbers are shuffled first (a fresh permutation each epoch, from a seed the caller
    derives from the run seed, step and epoch, so a resumed run splits alike); then the group
    at place ``p`` of the order goes to minibatch ``p mod k``. So every minibatch mixes prompts
    from the whole step, and holds the same groups however many processes share the step.
    """
    if k == 1:
        return [batch]
    groups = len(batch) // group_size
    total = groups if total is None else total
    order = list(range(total))
    if seed is not None:
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    parts = []
    for j in range(k):
        mine = [g - offset for g in order[j::k] if offset <= g < offset + groups]
        rows = [g * group_size + i for g in mine for i in range(group_size)]
        parts.append(batch.rows(torch.tensor(rows, dtype=torch.long, device=batch.rewards.device)))
    return parts
