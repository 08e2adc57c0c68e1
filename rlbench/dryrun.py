"""``rlbench train --dry-run``: parameter counts and a per-device memory estimate, before launch.

The model is built on the meta device from its config alone: no weights are loaded or
downloaded, and nothing is written (a hub name fetches its ``config.json`` into the Hugging
Face cache, as ``AutoConfig`` always does). The memory figures are an **estimate** of what one
device holds at the peak of a step. Per device:

- weights: parameters x bytes of the weight dtype (``model.dtype``; ``auto`` is the
  checkpoint's ``dtype``, else 4). Under ``trainer.precision=bf16-true`` Lightning casts the
  policy to bf16, so 2 bytes. ``trainer.precision: auto`` is resolved as a run on this machine
  would resolve it (a note says what it chose: a GPU config checked on a CPU-only login node
  is estimated at fp32).
- gradients: trainable parameters x bytes of their dtype (the weight dtype; LoRA adapters are
  fp32 unless bf16-true, as peft upcasts adapters of a half-precision model).
- optimizer: torch AdamW keeps two moments per trainable parameter in that same dtype; there
  is no separate fp32 master copy (under bf16-true the update itself is done in bf16).
- reference: the frozen reference is a second copy of the weights as loaded (held outside the
  Lightning module, so neither cast by bf16-true nor sharded), only when the algorithm needs
  one and LoRA is off; with LoRA the reference is the policy with its adapters disabled: 0.
- activations of one training micro-batch: rows x tokens x hidden x layers x 34 x act_bytes / 2
  (Korthikanti et al. 2022, per layer without recomputation, written for 2-byte activations),
  plus the fp32 logits and log-softmax of the completion positions (rows x (new + 1) x vocab
  x 4 x 2; ``logits_to_keep`` skips prompt positions), of at most ``train.logprob_chunk_tokens``
  of them at a time for the models ``rlbench.logprobs`` serves chunk by chunk. act_bytes is 2
  under bf16/16-mixed precision or 2-byte weights, else 4.
- KV cache of generation: 2 x layers x kv_heads x head_dim x tokens x rows x act_bytes, rows
  being the larger of a rollout micro-batch and an eval chunk.

tokens = ``rollout.max_new_tokens`` + a prompt length: the task's longest prompt for a preset
(char tokenizer, one token per character), else a flat 64 tokens. A process trains on
``prompts_per_step x group_size / world`` completions, split into micro-batches. Sharding
divides by the world size: DeepSpeed stage 3 weights, gradients and optimizer state; stage 2
gradients and optimizer state; stage 1 optimizer state (``fsdp`` is refused at load time, see
``RunConfig``). Training
activations and the KV cache are never alive together, so the total is the static memory plus
the larger of them. Not counted: the CUDA context, allocator fragmentation, temporary buffers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlbench.config import RunConfig, with_resolved_precision
from rlbench.errors import RLBenchError
from rlbench.forward import PLAIN_HEAD_MODEL_TYPES
from rlbench.registry import ALGORITHMS, TASKS

#: Prompt length assumed for real tokenizers (prompts of these tasks are short).
PROMPT_TOKENS_ESTIMATE = 64
#: Train prompts whose longest one sets a preset's prompt length.
PROMPT_SAMPLE = 256
#: Korthikanti et al. (2022): activation bytes per token, hidden unit and layer, 2-byte activations.
ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER = 34
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes one device holds at the peak of a step (see the module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    reference: int
    activations: int
    kv_cache: int

    @property
    def total(self) -> int:
        """Static memory plus the larger of training activations and the generation KV cache."""
        static = self.weights + self.gradients + self.optimizer + self.reference
        return static + max(self.activations, self.kv_cache)


@dataclass(frozen=True)
class DryRunReport:
    model: str
    """``model.name_or_path`` as configured."""
    architecture: str
    """Model class built on the meta device, e.g. ``Qwen2ForCausalLM``."""
    total_params: int
    """Parameters of the model (tied weights counted once; LoRA adapters not included)."""
    trainable_params: int
    """Parameters the optimiser updates: all of them, or the LoRA adapters only."""
    lora_params: int
    """LoRA adapter parameters (0 without LoRA)."""
    memory: MemoryEstimate
    """Estimated bytes per device."""
    world_size: int
    """Processes of the run: ``trainer.devices x trainer.num_nodes`` (devices ``auto`` counts 1)."""
    devices_assumed: bool
    """True when ``trainer.devices`` is ``auto`` and 1 device per node was assumed."""
    strategy: str
    precision: str
    weight_bytes: int
    """Bytes per weight element on the device."""
    sharded: tuple[str, ...]
    """Components divided by the world size under the strategy (weights, gradients, optimizer)."""
    train_rows: int
    """Completions per training forward/backward on one device."""
    generation_rows: int
    """Completions generated at once on one device (rollout micro-batch or eval chunk)."""
    prompt_tokens: int
    """Prompt length assumed (the task's longest prompt for a preset, else an estimate)."""
    completion_tokens: int
    """``rollout.max_new_tokens``."""
    notes: tuple[str, ...] = field(default_factory=tuple)


def dry_run(config: RunConfig) -> DryRunReport:
    """Counts parameters and estimates memory per device for ``config`` without loading weights."""
    task = TASKS.get(config.task.name)(config.task.options)
    algorithm = ALGORITHMS.get(config.algorithm.name)(config.algorithm.options)
    hf_config, prompt_tokens = _model_config(config, task)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=config.model.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    lora = config.model.lora
    lora_params = lora_parameter_count(model, lora.r, lora.target_modules) if lora.r > 0 else 0
    if lora.r > 0 and lora_params == 0:
        raise RLBenchError(
            f"model.lora.target_modules={list(lora.target_modules)!r} matches no linear layer of "
            f"{type(model).__name__}; name layers such as q_proj, v_proj"
        )
    trainable = lora_params if lora.r > 0 else total

    notes: list[str] = []
    # the precision the run would resolve on this machine (the report says if "auto" chose it)
    resolved, chosen = with_resolved_precision(config)
    trainer = resolved.trainer
    if config.trainer.precision == "auto":
        notes.append(f"trainer.precision is 'auto': {chosen}; a run on other hardware may choose otherwise")
    devices_assumed = trainer.devices == "auto"
    per_node = 1 if devices_assumed else int(trainer.devices)
    world = per_node * trainer.num_nodes
    if devices_assumed:
        notes.append("trainer.devices is 'auto': the estimate assumes 1 device per node")
    sharded = sharded_components(trainer.strategy)
    shards = {name: world if name in sharded else 1 for name in ("weights", "gradients", "optimizer")}

    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    loaded_bytes = _loaded_dtype_bytes(config.model.dtype, hf_config)
    bf16_true = trainer.precision == "bf16-true"
    weight_bytes = 2 if bf16_true else loaded_bytes
    trainable_bytes = weight_bytes if lora.r == 0 else (2 if bf16_true else 4)
    half = trainer.precision in ("bf16-mixed", "bf16-true", "16-mixed") or weight_bytes == 2
    act_bytes = 2 if half else 4

    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    completion_tokens = config.rollout.max_new_tokens
    tokens = prompt_tokens + completion_tokens

    per_device_batch = -(-config.rollout.prompts_per_step // world) * algorithm.group_size
    train_rows = _rows(config.train.micro_batch_size, per_device_batch)
    rollout_rows = _rows(config.rollout.micro_batch_size, per_device_batch)
    eval_rows = min(-(-config.eval.num_prompts // world), _eval_chunk())
    generation_rows = max(rollout_rows, eval_rows)

    train_tokens = train_rows * tokens
    if config.train.micro_batch_tokens:  # packed by a token budget: a row wider than it goes alone
        train_tokens = min(train_tokens, max(config.train.micro_batch_tokens, tokens))
    activations = train_tokens * hidden * layers * ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER
    logit_rows = train_tokens * (completion_tokens + 1) // tokens
    if config.train.logprob_chunk_tokens and getattr(text, "model_type", None) in PLAIN_HEAD_MODEL_TYPES:
        logit_rows = min(logit_rows, config.train.logprob_chunk_tokens)  # rlbench.logprobs: by chunks
    activations = activations * act_bytes // 2 + logit_rows * vocab * 4 * 2
    memory = MemoryEstimate(
        weights=(total * weight_bytes + lora_params * trainable_bytes) // shards["weights"],
        gradients=trainable * trainable_bytes // shards["gradients"],
        optimizer=2 * trainable * trainable_bytes // shards["optimizer"],
        reference=total * loaded_bytes if algorithm.needs_reference and lora.r == 0 else 0,
        activations=activations,
        kv_cache=2 * layers * kv_heads * head_dim * tokens * generation_rows * act_bytes,
    )
    if trainer.strategy.endswith("offload"):
        notes.append(f"{trainer.strategy} offloads state to the CPU; the estimate ignores the offload")
    return DryRunReport(
        model=config.model.name_or_path,
        architecture=type(model).__name__,
        total_params=total,
        trainable_params=trainable,
        lora_params=lora_params,
        memory=memory,
        world_size=world,
        devices_assumed=devices_assumed,
        strategy=trainer.strategy,
        precision=trainer.precision,
        weight_bytes=weight_bytes,
        sharded=sharded,
        train_rows=train_rows,
        generation_rows=generation_rows,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        notes=tuple(notes),
    )


def lora_parameter_count(model: nn.Module, r: int, target_modules: tuple[str, ...]) -> int:
    """Adapter parameters LoRA adds: ``r x (in + out)`` per targeted ``nn.Linear`` (A and B, no bias).

    A layer is targeted when its dotted name is a target or ends with ``.target``, as in peft.
    """
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in target_modules):
            count += r * (module.in_features + module.out_features)
    return count


def sharded_components(strategy: str) -> tuple[str, ...]:
    """What the strategy divides across processes (DeepSpeed's ZeRO stages)."""
    if strategy.startswith("deepspeed_stage_3"):
        return ("weights", "gradients", "optimizer")
    if strategy.startswith("deepspeed_stage_2"):
        return ("gradients", "optimizer")
    if strategy.startswith("deepspeed_stage_1"):
        return ("optimizer",)
    return ()


def format_report(report: DryRunReport) -> str:
    """The report as aligned lines (what ``rlbench train --dry-run`` prints)."""
    m = report.memory
    if report.lora_params:
        trainable = f"{human_count(report.trainable_params)} (LoRA adapters only)"
    else:
        trainable = f"{human_count(report.trainable_params)} (full fine-tune)"
    world = f"{report.world_size}" + (
        " (trainer.devices 'auto' counted as 1)" if report.devices_assumed else ""
    )
    sharding = f", sharding {', '.join(report.sharded)}" if report.sharded else ""
    tokens = f"{report.prompt_tokens} prompt + {report.completion_tokens} new tokens"
    rows = [
        ("model", f"{report.model} ({report.architecture})"),
        ("parameters", human_count(report.total_params)),
        ("trainable", trainable),
        ("world size", f"{world}; strategy {report.strategy}{sharding}; precision {report.precision}"),
        ("", ""),
        ("memory per device", "ESTIMATE (see rlbench/dryrun.py for the formulas)"),
        ("  weights", f"{gib(m.weights)} ({report.weight_bytes} bytes per weight)"),
        ("  gradients", gib(m.gradients)),
        ("  optimizer", f"{gib(m.optimizer)} (AdamW, two moments)"),
        ("  reference", f"{gib(m.reference)}"),
        ("  activations", f"{gib(m.activations)} (train micro-batch: {report.train_rows} rows x {tokens})"),
        ("  kv cache", f"{gib(m.kv_cache)} (generation: {report.generation_rows} rows x {tokens})"),
        (
            "  total",
            f"{gib(m.total)} (weights + gradients + optimizer + reference + max(activations, kv cache))",
        ),
    ]
    lines = [f"{name:<18} {value}".rstrip() for name, value in rows]
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def human_count(n: int) -> str:
    """``494032768`` -> ``494.0M``."""
    for size, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.{2 if suffix == 'B' else 1}f}{suffix}"
    return str(n)


def gib(n: int) -> str:
    """Bytes in GiB: two decimals, or two significant digits below 0.1 GiB (tiny presets)."""
    value = n / GIB
    return f"{value:.2f} GiB" if value >= 0.1 or value == 0 else f"{value:.2g} GiB"


def _rows(micro_batch_size: int, batch: int) -> int:
    return min(micro_batch_size, batch) if micro_batch_size else batch


def _eval_chunk() -> int:
    """Prompts ``greedy_correct`` generates at once (its ``chunk`` default)."""
    from rlbench.evaluation import greedy_correct

    return int(inspect.signature(greedy_correct).parameters["chunk"].default)


def _model_config(config: RunConfig, task: Any) -> tuple[Any, int]:
    """The model's Hugging Face config and the prompt length (tokens) the estimate assumes."""
    from transformers import AutoConfig

    from rlbench.policy import PRESETS, preset_config, preset_names
    from rlbench.pretrained import PACKAGED, packaged_config

    name = config.model.name_or_path
    if name in PRESETS and not Path(name).is_dir():
        longest = max(len(p.text) for p in task.prompts("train", PROMPT_SAMPLE, config.seed))
        return preset_config(name, task.alphabet), longest
    if name in PACKAGED and not Path(name).is_dir():
        return packaged_config(name, Path(config.warmstart.cache_dir)), PROMPT_TOKENS_ESTIMATE
    if not Path(name).is_dir() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise RLBenchError(
            f"model.name_or_path={name!r}: no such directory; give a local save_pretrained "
            f"directory, a hub name, or a preset ({', '.join(preset_names())})"
        )
    try:
        hf_config = AutoConfig.from_pretrained(name, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RLBenchError(
            f"model.name_or_path={name!r}: its config could not be read: {first_line}"
        ) from err
    return hf_config, PROMPT_TOKENS_ESTIMATE


def _loaded_dtype_bytes(dtype: str, hf_config: Any) -> int:
    """Bytes per weight as loaded: ``model.dtype``, or for ``auto`` the checkpoint's own (else 4)."""
    if dtype != "auto":
        return getattr(torch, dtype).itemsize
    own = getattr(hf_config, "dtype", None)
    if own is None and "torch_dtype" in vars(hf_config):  # transformers < 5
        own = hf_config.torch_dtype
    if isinstance(own, str):
        own = getattr(torch, own, None)
    return own.itemsize if isinstance(own, torch.dtype) else 4
