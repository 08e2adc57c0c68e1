"""Supervised warm start: a shared starting checkpoint for every algorithm of a comparison.

A tiny model from scratch solves nothing, so RL has no signal. The warm start fine-tunes the
configured model on the task's demonstrations (a Lightning run) until its greedy accuracy on a
*validation slice of the train split* reaches ``warmstart.target_accuracy`` -- non-zero but
clearly imperfect -- and saves it with ``save_pretrained``. The validation prompts are held out
of the demonstrations, and the eval split is never looked at: it is only ever used to report
accuracy, so the starting point is not selected on the test set. The result is cached under a
hash of everything that shapes it (built once even when several processes ask at the same
time), so every algorithm, seed sweep and rerun with the same model and task starts from the
same weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from rlbench.cache import build_once
from rlbench.config import RunConfig, config_hash, with_resolved_precision
from rlbench.data import StepTicks
from rlbench.errors import RLBenchError
from rlbench.evaluation import greedy_accuracy
from rlbench.forward import position_ids
from rlbench.policy import load_policy, real_vocab_size, resolve_model_path
from rlbench.prompting import prompt_token_ids
from rlbench.registry import TASKS
from rlbench.rollout import BACKENDS, derive_seed
from rlbench.task import Prompt, Task

_DEMOS, _VALIDATION = 7, 8  # seed salts of the demonstration stream and the validation slice
INFO_FILE = "warmstart.json"


def warmstart_dir(config: RunConfig) -> Path:
    ws = config.warmstart
    # the precision it trains in, resolved: with "auto" a bf16 machine and an fp32 one build
    # different weights, and a cache shared between them must not hand one the other's
    precision = with_resolved_precision(config)[0].trainer.precision
    key = config_hash(
        config.model,
        config.task,
        {k: v for k, v in vars(ws).items() if k not in ("cache_dir", "seed")},
        config.warmstart_seed,
        config.rollout.max_new_tokens,
        {"precision": precision},
    )
    return Path(ws.cache_dir) / f"{config.task.name}-{config.model.name_or_path.replace('/', '_')}-{key}"


def base_model_path(config: RunConfig, task: Task) -> str:
    return resolve_model_path(
        config.model.name_or_path, task.alphabet, config.warmstart_seed, Path(config.warmstart.cache_dir)
    )


def warm_start(config: RunConfig, quiet: bool = False) -> tuple[str, dict[str, Any]]:
    """The warm-start checkpoint's directory and its info (accuracy, steps), built if not cached.

    Building shows Lightning's bar (steps, ETA up to ``warmstart.max_steps``; it stops earlier
    once the target is reached) on a terminal, and one line saying what it does either way
    unless ``quiet``.
    """
    # a no-op when the run already resolved it; `rlbench warmstart` and benchmarks come here directly
    config = with_resolved_precision(config)[0]
    directory = warmstart_dir(config)

    def build(tmp: Path) -> None:
        ws = config.warmstart
        if not quiet:
            print(
                f"warm start: training {config.model.name_or_path} on {config.task.name} "
                f"demonstrations until validation accuracy {ws.target_accuracy} (at most "
                f"{ws.max_steps} steps, {config.trainer.precision}); cached in {directory}"
            )
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
            # a bar only on a terminal: written to a log it is a line per refresh
            enable_progress_bar=not quiet and sys.stderr.isatty(),
            enable_model_summary=False,
        )
        trainer.fit(module, train_dataloaders=StepTicks())
        step, accuracy = module.history[-1]
        info = {
            "accuracy": accuracy,  # on the validation slice of the train split
            "validation_prompts": len(module.validation_prompts),
            "steps": step,
            "history": module.history,
            "base_model": config.model.name_or_path,
        }
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))

    build_once(directory, build, complete=lambda d: (d / INFO_FILE).is_file())
    return str(directory), json.loads((directory / INFO_FILE).read_text())


def validation_prompts(task: Task, config: RunConfig) -> list[Prompt]:
    """The warm start's validation slice: fixed prompts of the *train* split, by seed."""
    n = config.warmstart.validation_prompts
    return task.prompts("train", n, derive_seed(config.warmstart_seed, _VALIDATION))


def held_out_demonstrations(task: Task, n: int, seed: int, held_out: set[str]) -> list[tuple[str, str]]:
    """``n`` demonstrations whose prompts are not in ``held_out`` (the validation slice)."""
    demos: list[tuple[str, str]] = []
    for attempt in range(64):
        draw = task.demonstrations(n, seed if attempt == 0 else derive_seed(seed, attempt))
        demos += [demo for demo in draw if demo[0] not in held_out]
        if len(demos) >= n:
            return demos[:n]
    raise RLBenchError(
        f"warmstart.validation_prompts: the validation slice holds {len(held_out)} distinct train "
        f"prompts, leaving too few others to draw {n} demonstrations from; lower "
        f"warmstart.validation_prompts (or use a larger task)"
    )


class WarmStartModule(pl.LightningModule):
    """Next-token loss on the completion tokens of demonstrations; stops when greedy accuracy on
    the validation slice (held out of the demonstrations) reaches the target."""

    def __init__(self, model: Any, tokenizer: Any, task: Task, config: RunConfig) -> None:
        super().__init__()
        self.model, self.tokenizer, self.task, self.config = model.train(), tokenizer, task, config
        self.validation_prompts = validation_prompts(task, config)
        self.held_out = {p.text for p in self.validation_prompts}
        self.backend = BACKENDS[config.rollout.backend](
            tokenizer.eos_token_id, tokenizer.pad_token_id, real_vocab_size(tokenizer, model)
        )
        self.history: list[tuple[int, float]] = []

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.model.parameters(), lr=self.config.warmstart.lr)

    def training_step(self, tick: Any, batch_idx: int) -> torch.Tensor:
        ws = self.config.warmstart
        demos = held_out_demonstrations(
            self.task,
            ws.batch_size,
            derive_seed(self.config.warmstart_seed, _DEMOS, self.global_step),
            self.held_out,
        )
        input_ids, mask, labels = encode_demonstrations(self.tokenizer, demos, self.device, self.task.config)
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
            self.validation_prompts,
            self.backend,
            self.config.rollout.max_new_tokens,
        )
        self.history.append((step, accuracy))
        self.log("acc", accuracy, prog_bar=True)
        if accuracy >= self.config.warmstart.target_accuracy:
            self.trainer.should_stop = True


def encode_demonstrations(
    tokenizer: Any, demos: list[tuple[str, str]], device: torch.device, options: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``prompt + completion + EOS`` with labels on the completion and EOS only;
    prompts rendered as in sampling (``task.prompt_format``)."""
    rows, targets = [], []
    for prompt, completion in demos:
        prompt_ids = prompt_token_ids(tokenizer, prompt, options)
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
