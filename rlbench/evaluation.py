"""Greedy evaluation on a task's eval split: what ``eval/accuracy`` means everywhere."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rlbench.policy import inference_mode
from rlbench.prompting import encode_prompts
from rlbench.rollout import RolloutBackend, SamplingParams
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
) -> int:
    """How many of ``prompts`` the greedy completion solves (a count, so shards can be summed).

    A completion with a special token before its EOS is never correct (``special_token_rows``).
    """
    device = next(model.parameters()).device
    correct = 0
    with inference_mode(model):
        for start in range(0, len(prompts), chunk):
            part = prompts[start : start + chunk]
            ids, mask = encode_prompts(tokenizer, [p.text for p in part], device, task.config)
            params = SamplingParams(max_new_tokens, 0.0)
            rollout = backend.generate(model, ids, mask, [0] * len(part), params)
            texts, invalid = read_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)
            correct += sum(
                not bad and task.is_correct(p, t) for p, t, bad in zip(part, texts, invalid.tolist())
            )
    return correct
