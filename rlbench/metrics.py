"""How a step's metrics combine over micro-batches, optimisation passes and processes.

One naming rule decides the reduction everywhere: names ending in ``_min`` take the minimum,
``_max`` and ``_gap`` the maximum (a gap is a worst case), losses (``loss`` and any name
ending in ``_loss``: PPO's policy and value shares) add up (each micro-batch and each process
holds its share of the step's loss), and every other metric is a mean weighted by what it
averages over (completion tokens for loss-side metrics).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

#: Metrics besides losses that add up over processes (each process holds a share of the total).
SUMMED_OVER_PROCESSES = frozenset(
    {
        "perf/rollout_tokens_per_s",
        "train/kept_groups",
        "perf/samples",
        "perf/tokens_generated",
        "perf/tokens_trained",
    }
)


def is_loss(name: str) -> bool:
    """Whether ``name`` is a loss (or a share of one), which adds up over micro-batches and
    processes: ``loss``, ``train/loss``, ``value_loss``, ``train/policy_loss``..."""
    leaf = name.rsplit("/", 1)[-1]
    return leaf == "loss" or leaf.endswith("_loss")


def extreme(name: str) -> str | None:
    """``"min"`` or ``"max"`` for metrics reduced by an extreme, else None."""
    if name.endswith("_min"):
        return "min"
    if name.endswith(("_max", "_gap")):
        return "max"
    return None


def combine_micro_batches(parts: list[tuple[dict[str, Tensor], float]]) -> dict[str, float]:
    """One step's metrics from its micro-batches' ``(metrics, token count)``.

    ``loss`` adds up, extremes reduce by min/max, every other metric is a per-token mean, so it
    is weighted by token counts. Parts of weight 0 (padding micro-batches) do not count; with
    nothing else, the result holds neutral values (0, or +-inf for extremes) of weight 0.
    """
    real = [part for part in parts if part[1] > 0]
    total = sum(tokens for _, tokens in real)
    out: dict[str, float] = {}
    for name in parts[0][0]:
        values = [float(metrics[name]) for metrics, _ in real]
        kind = extreme(name)
        if kind == "min":
            out[name] = min(values, default=math.inf)
        elif kind == "max":
            out[name] = max(values, default=-math.inf)
        elif is_loss(name):
            out[name] = sum(values)
        else:
            out[name] = sum(v * t for v, (_, t) in zip(values, real)) / total if total else 0.0
    return out


def reduce_passes(history: list[dict[str, float]]) -> dict[str, float]:
    """Combines per-pass metrics: extremes by min/max, the rest by their mean over passes."""
    out: dict[str, float] = {}
    for name in history[0]:
        values = [h[name] for h in history]
        kind = extreme(name)
        if kind == "min":
            out[name] = min(values)
        elif kind == "max":
            out[name] = max(values)
        else:
            out[name] = sum(values) / len(values)
    return out


def reduce_over_processes(
    metrics: dict[str, float], weight: float, gather: Callable[[Tensor], Tensor]
) -> dict[str, float]:
    """Global figures from per-process metrics: one all-gather for the whole dict.

    Shares (the loss, throughput, kept groups) add up, extremes and timings take the extreme
    (a timing's maximum is the step's wall time), every other metric is the mean weighted by
    ``weight`` (what the process's figure averages over; equal weights give a plain mean).
    """
    names = sorted(metrics)
    row = torch.tensor([*(metrics[n] for n in names), weight], dtype=torch.float64)
    gathered = gather(row).reshape(-1, len(names) + 1).double().cpu()
    weights = gathered[:, -1]
    if float(weights.sum()) <= 0:
        weights = torch.ones_like(weights)
    out = {}
    for i, name in enumerate(names):
        column = gathered[:, i]
        kind = extreme(name) or ("max" if name.startswith("perf/") and name.endswith("_s") else None)
        if name in SUMMED_OVER_PROCESSES or is_loss(name):
            out[name] = float(column.sum())
        elif kind == "min":
            out[name] = float(column.min())
        elif kind == "max":
            out[name] = float(column.max())
        else:
            used = weights > 0
            out[name] = float((column[used] * weights[used]).sum() / weights[used].sum())
    return out
