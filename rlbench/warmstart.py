"""Supervised warm start: a shared starting checkpoint for every algorithm of a comparison.

A tiny model from scratch solves nothing, so RL has no signal. The warm start fine-tunes the
configured model on the task's demonstrations (a Lightning run) until its greedy eval accuracy
reaches ``warmstart.target_accuracy`` -- non-zero but clearly imperfect -- and saves it with
``save_pretrained``. The result is cached under a hash of everything that shapes it, so every
algorithm, seed sweep and rerun with the same model and task starts from the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from rlbench.config import RunConfig, config_hash
from rlbench.data import PromptSource, StepTicks
from rlbench.evaluation import greedy_accuracy
from rlbench.policy import load_policy, position_ids, resolve_model_path
from rlbench.registry import TASKS
from rlbench.rollout import BACKENDS, derive_seed
from rlbench.task import Task

_DEMOS = 7  # seed salt of the demonstration stream
INFO_FILE = "warmstart.json"


def warmstart_dir(config: RunConfig) -> Path:
    ws = config.warmstart
    key = config_hash(
        config.model,
        config.task,
        {k: v for k, v in vars(ws).items() if k != "cache_dir"},
        config.seed,
        config.eval.num_prompts,
        config.rollout.max_new_tokens,
    )
    return Path(ws.cache_dir) / f"{config.task.name}-{config.model.name_or_path.replace('/', '_')}-{key}"


def base_model_path(config: RunConfig, task: Task) -> str:
    return resolve_model_path(
        config.model.name_or_path, task.alphabet, config.seed, Path(config.warmstart.cache_dir)
    )


def warm_start(config: RunConfig, quiet: bool = False) -> tuple[str, dict[str, Any]]:
    """The warm-start checkpoint's directory and its info (accuracy, steps), built if not cached."""
    directory = warmstart_dir(config)
    info_file = directory / INFO_FILE
    if info_file.is_file():
        return str(directory), json.loads(info_file.read_text())
    task = TASKS.get(config.task.name)(config.task.options)
    model, tokenizer = load_policy(
        base_model_path(config, task), config.model.dtype, config.model.trust_remote_code
    )
    module = WarmStartModule(model, tokenizer, task, config)
    trainer = pl.Trainer(
        max_steps=config.warmstart.max_steps,
        accelerator=config.trainer.accelerator,
        devices=1,
        precision=config.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not quiet,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=StepTicks())
    step, accuracy = module.history[-1]
    info = {
        "accuracy": accuracy,
        "steps": step,
        "history": module.history,
        "base_model": config.model.name_or_path,
    }
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    tmp.replace(directory)  # the cache entry appears whole or not at all
    return str(directory), info


class WarmStartModule(pl.LightningModule):
    """Next-token loss on the completion tokens of demonstrations; stops at the target accuracy."""

    def __init__(self, model: Any, tokenizer: Any, task: Task, config: RunConfig) -> None:
        super().__init__()
        self.model, self.tokenizer, self.task, self.config = model.train(), tokenizer, task, config
        self.eval_prompts = PromptSource(task, config.rollout.prompts_per_step, config.seed).eval_prompts(
            config.eval.num_prompts
        )
        self.backend = BACKENDS[config.rollout.backend](tokenizer.eos_token_id, tokenizer.pad_token_id)
        self.history: list[tuple[int, float]] = []

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.model.parameters(), lr=self.config.warmstart.lr)

    def training_step(self, tick: Any, batch_idx: int) -> torch.Tensor:
        ws = self.config.warmstart
        demos = self.task.demonstrations(
            ws.batch_size, derive_seed(self.config.seed, _DEMOS, self.global_step)
        )
        input_ids, mask, labels = encode_demonstrations(self.tokenizer, demos, self.device)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask), labels=labels
        )
        self.log("warmstart/loss", out.loss, prog_bar=True, on_step=True)
        return out.loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        if step % self.config.warmstart.eval_every and step < self.config.warmstart.max_steps:
            return
        accuracy = greedy_accuracy(
            self.model,
            self.tokenizer,
            self.task,
            self.eval_prompts,
            self.backend,
            self.config.rollout.max_new_tokens,
        )
        self.history.append((step, accuracy))
        self.log("acc", accuracy, prog_bar=True)
        if accuracy >= self.config.warmstart.target_accuracy:
            self.trainer.should_stop = True


def encode_demonstrations(
    tokenizer: Any, demos: list[tuple[str, str]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``prompt + completion + EOS`` with labels on the completion and EOS only."""
    rows, targets = [], []
    for prompt, completion in demos:
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        rows.append(prompt_ids + completion_ids)
        targets.append([-100] * len(prompt_ids) + completion_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    labels = torch.tensor([[-100] * (width - len(t)) + t for t in targets], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return input_ids, mask, labels
