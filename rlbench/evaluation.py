"""Greedy evaluation on a task's eval split: what ``eval/accuracy`` means everywhere."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rlbench.rollout import RolloutBackend, SamplingParams
from rlbench.task import Prompt, Task


def encode_prompts(tokenizer: object, texts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of prompt texts."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)  # type: ignore[operator]
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def decode_completions(tokenizer: object, completion_ids: Tensor, completion_mask: Tensor) -> list[str]:
    """Completion texts without special tokens; tokens after EOS are ignored."""
    ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)  # type: ignore[attr-defined]
    return tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)  # type: ignore[attr-defined]


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


@torch.no_grad()
def greedy_correct(
    model: nn.Module,
    tokenizer: object,
    task: Task,
    prompts: list[Prompt],
    backend: RolloutBackend,
    max_new_tokens: int,
    chunk: int = 256,
) -> int:
    """How many of ``prompts`` the greedy completion solves (a count, so shards can be summed)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        ids, mask = encode_prompts(tokenizer, [p.text for p in part], device)
        rollout = backend.generate(model, ids, mask, [0] * len(part), SamplingParams(max_new_tokens, 0.0))
        texts = decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)
        correct += sum(task.is_correct(p, t) for p, t in zip(part, texts))
    model.train(was_training)
    return correct
