"""The run configuration: one YAML file per run, typed dataclasses underneath.

Every field is validated when the file is loaded (type, range, known name), so a bad value
fails before any model is built, with a message that names the field, the value and what is
allowed. Field docs are the attribute docstrings below; ``config_help.describe`` turns them into the
CLI's help, so they are the single source of documentation for every option.

The ``task`` section holds a ``name`` plus the options of that task's own ``Config`` dataclass,
flat: ``task.name=arithmetic task.digits=3``. The ``algorithm`` section holds a ``name`` and one
sub-section per algorithm, each validated against that algorithm's ``Config`` whether or not it
is the one selected, so a comparison changes one word: ``algorithm.name=ppo``, and
``algorithm.ppo.gamma=0.99`` sets an option.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlbench.config_files import parse_scalar, read_yaml, set_dotted
from rlbench.errors import ConfigError, require
from rlbench.registry import ALGORITHMS, TASKS, RegistryError, did_you_mean
from rlbench.typecheck import build_dataclass, flatten


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank; 0 trains every weight (full fine-tune). With LoRA the reference policy is the
    same model with its adapters disabled, so no second copy of the weights is kept."""
    alpha: float = 16.0
    """LoRA scaling numerator (updates are scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch (only with ``model.disable_dropout: false``: RL zeroes dropout)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Names of the linear layers that get adapters (Llama/Qwen attention projections by default)."""

    def __post_init__(self) -> None:
        require(self.r >= 0, "r", self.r, "an integer >= 0 (0 disables LoRA)")
        require(self.alpha > 0, "alpha", self.alpha, "a number > 0")
        require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a number in [0, 1)")
        require(
            len(self.target_modules) > 0, "target_modules", self.target_modules, "at least one module name"
        )


@dataclass
class ModelConfig:
    name_or_path: str = "tiny-llama"
    """Hugging Face hub name, local directory (``save_pretrained`` layout), a tiny preset
    (tiny-llama, small-llama, medium-llama) built from a config with a char tokenizer, or a real
    model a pip package ships (smollm2-135m-instruct; ``rlbench list`` says how to install it)."""
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    """Dtype the weights are loaded in; ``auto`` keeps the checkpoint's own."""
    trust_remote_code: bool = False
    """Allow model code shipped with a hub checkpoint."""
    disable_dropout: bool = True
    """Zero every dropout of the policy and reference (as TRL does): with dropout the policy that
    samples is not the ``pi_old`` the loss scores, and the importance ratio is noise. With false,
    dropout stays on in training forwards only (sampling and scoring run in eval mode), and
    ``train/behaviour_logprob_gap`` shows the mismatch."""
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class WarmStartConfig:
    enabled: bool = True
    """Start RL from a supervised warm start on the task's demonstrations (built and cached on
    first use, shared by every algorithm with the same model, task and warm-start settings)."""
    target_accuracy: float = 0.25
    """Stop the warm start once greedy accuracy on the validation slice reaches this (keep it
    clearly below 1)."""
    validation_prompts: int = 200
    """Size of the warm start's validation slice: fixed prompts of the *train* split, held out of
    the demonstrations, on which ``target_accuracy`` is checked. The eval split is only ever used
    for reporting (``eval/accuracy``), never to choose the starting point."""
    max_steps: int = 3000
    """Upper bound on supervised steps."""
    batch_size: int = 64
    """Demonstrations per supervised step."""
    lr: float = 1e-3
    """AdamW learning rate of the warm start."""
    eval_every: int = 10
    """Evaluate (and maybe stop) every this many supervised steps."""
    cache_dir: str = "runs/warmstart"
    """Where warm-start checkpoints are cached, one directory per config hash."""
    seed: int | None = None
    """Seed of the warm start (the tiny preset's initial weights, its demonstrations and
    validation slice); null: the run's seed. Fix it to start runs of different seeds from the
    same weights, so a comparison over seeds varies RL only."""

    def __post_init__(self) -> None:
        require(
            0.0 < self.target_accuracy < 1.0, "target_accuracy", self.target_accuracy, "a number in (0, 1)"
        )
        require(self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(self.lr > 0, "lr", self.lr, "a number > 0")
        require(self.eval_every >= 1, "eval_every", self.eval_every, "an integer >= 1")
        require(
            self.validation_prompts >= 1, "validation_prompts", self.validation_prompts, "an integer >= 1"
        )


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    """Prompts per step; each is sampled ``algorithm.<name>.group_size`` times (DPO: pairs per step)."""
    max_new_tokens: int = 8
    """Generation budget per completion (it also stops at EOS)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs and entropy are computed at this temperature too."""
    top_p: float = 1.0
    """Must stay 1: the loss, KL and entropy use the unfiltered ``softmax(logits / T)``, so
    nucleus-filtered samples would make the importance ratio wrong."""
    top_k: int = 0
    """Must stay 0, for the same reason as ``top_p``."""
    backend: Literal["decode_loop"] = "decode_loop"
    """Sampler: ``decode_loop`` is a batched KV-cache loop with per-completion seeded draws."""
    micro_batch_size: int = 0
    """Completions generated at once (bounds generation memory); 0, or any value at least the
    step's batch, generates the whole step at once (stored as 0). For pair-based algorithms
    (DPO) it also bounds the pair-building pass (``num_prompts x samples_per_prompt``
    completions), so there it is kept as set even above their step's batch."""

    def __post_init__(self) -> None:
        require(self.prompts_per_step >= 1, "prompts_per_step", self.prompts_per_step, "an integer >= 1")
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        require(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        # Filtered sampling draws from a distribution the loss never sees: the gap to the
        # unfiltered log-probs reaches 1.7 nats at top_k 5, so the ratio is wrong from pass 0.
        unfiltered = (
            "training rollouts sample the full softmax(logits / T) that the loss, KL and entropy "
            "use; a filter would make the importance ratio wrong. Sharpen sampling with "
            "rollout.temperature instead"
        )
        require(self.top_p == 1.0, "top_p", self.top_p, f"must be 1.0: {unfiltered}")
        require(self.top_k == 0, "top_k", self.top_k, f"must be 0: {unfiltered}")
        require(self.micro_batch_size >= 0, "micro_batch_size", self.micro_batch_size, "an integer >= 0")


@dataclass
class TrainConfig:
    micro_batch_size: int = 0
    """Completions per forward/backward; gradients are accumulated over a step's micro-batches
    (bounds training memory, same loss to float precision). 0, or any value at least the step's
    batch, uses the whole batch at once (stored as 0). For pair-based algorithms (DPO) it also
    bounds the reference's pass over all pairs, so there it is kept as set."""
    micro_batch_tokens: int = 0
    """Token budget of a micro-batch instead of (or besides) a row count: completions are sorted
    by length and packed so that ``rows x (prompt width + longest completion)`` stays within it,
    each micro-batch trimmed to its own longest completion, so short completions stop paying
    for the step's longest (same loss to float precision). 0: off. With uneven lengths it saves
    forward and backward work (docs/benchmarks.md); it also bounds memory by tokens, not rows."""

    max_bad_steps: int = 3
    """A step whose loss or gradient is not finite is skipped (``train/skipped_steps``); after this
    many in a row the run stops with an error naming the cause, keeping the last good checkpoint."""
    logprob_chunk_tokens: int = 1024
    """Tokens projected onto the vocabulary at a time for log-probs and entropy: the training
    forward never holds ``[B, T, V]`` logits (at a real vocabulary its largest tensors), same
    numbers. 0: the model's own forward computes all logits at once (for models outside
    ``rlbench.forward.PLAIN_HEAD_MODEL_TYPES`` it always does)."""

    def __post_init__(self) -> None:
        require(self.micro_batch_size >= 0, "micro_batch_size", self.micro_batch_size, "an integer >= 0")
        require(
            self.micro_batch_tokens >= 0,
            "micro_batch_tokens",
            self.micro_batch_tokens,
            "an integer >= 0 (0: off)",
        )
        require(
            self.logprob_chunk_tokens >= 0,
            "logprob_chunk_tokens",
            self.logprob_chunk_tokens,
            "an integer >= 0 (0: all logits at once)",
        )
        require(self.max_bad_steps >= 1, "max_bad_steps", self.max_bad_steps, "an integer >= 1")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """AdamW learning rate after warm-up (GRPO on tiny models collapses from about 3e-4 up)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, ...] = (0.9, 0.99)
    """AdamW betas."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up, in optimiser steps."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up (decays to 0 at ``trainer.max_steps``)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""

    def __post_init__(self) -> None:
        require(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a finite number > 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            self.betas,
            "two numbers in [0, 1)",
        )
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "a number >= 0 (0 disables)")


@dataclass
class TrainerConfig:
    max_steps: int = 200
    """Rollout steps (batches of rollouts) to train for; with ``mu`` passes per batch the
    optimiser steps ``mu`` times per rollout step."""
    devices: int | Literal["auto"] = 1
    """Lightning ``devices``: a count or ``auto``."""
    accelerator: str = "auto"
    """Lightning accelerator: ``auto`` (a GPU when there is one, else the CPU), ``cpu``, ``gpu``..."""
    strategy: str = "auto"
    """Lightning strategy: ``auto``, ``ddp``, ``fsdp``, ... (any Lightning strategy name)."""
    num_nodes: int = 1
    """Machines in a multi-node run (Lightning ``num_nodes``)."""
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed", "auto"] = "auto"
    """Lightning precision; log-probs, KL and entropy are computed in fp32 regardless. ``auto``
    picks ``bf16-mixed`` where the device runs bf16 natively (a CUDA GPU of compute capability
    8.0 or more, a CPU with AVX512-BF16 or AMX) and ``32-true`` elsewhere, where bf16 is
    emulated and many times slower; the run prints its choice and records the resolved value
    (``RLBENCH_AUTO_PRECISION`` pins what ``auto`` means, as the test suite does)."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many rollout steps (and at the last step), whatever ``mu``."""
    num_threads: int = 0
    """torch CPU threads (0 leaves torch's default)."""

    def __post_init__(self) -> None:
        require(self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1")
        require(
            self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1),
            "devices",
            self.devices,
            "an integer >= 1 or 'auto'",
        )
        require(self.num_nodes >= 1, "num_nodes", self.num_nodes, "an integer >= 1")
        require(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "an integer >= 1")
        require(self.num_threads >= 0, "num_threads", self.num_threads, "an integer >= 0")


@dataclass
class EvalConfig:
    every_n_steps: int = 25
    """Greedy eval accuracy every this many rollout steps (always before the first and after the last)."""
    num_prompts: int = 200
    """Prompts of the task's eval split used for ``eval/accuracy``."""
    samples: int = 1
    """``k``: with k > 1, each eval also samples k completions per prompt at
    ``rollout.temperature`` and logs the unbiased ``eval/pass@k`` and ``eval/maj@k`` (majority
    vote of the extracted answers) beside the greedy ``eval/accuracy``."""

    def __post_init__(self) -> None:
        require(self.every_n_steps >= 1, "every_n_steps", self.every_n_steps, "an integer >= 1")
        require(self.num_prompts >= 1, "num_prompts", self.num_prompts, "an integer >= 1")
        require(
            isinstance(self.samples, int) and self.samples >= 1, "samples", self.samples, "an integer >= 1"
        )


@dataclass
class RewardNoiseConfig:
    flip_prob: float = 0.0
    """Probability that a completion's reward is flipped, ``r -> 1 - r`` (binary rewards: correct
    <-> incorrect); 0 disables it."""
    gaussian_std: float = 0.0
    """Standard deviation of Gaussian noise added to every reward; 0 disables it."""

    def __post_init__(self) -> None:
        require(
            isinstance(self.flip_prob, (int, float)) and 0.0 <= self.flip_prob <= 1.0,
            "flip_prob",
            self.flip_prob,
            "a probability in [0, 1]",
        )
        require(
            isinstance(self.gaussian_std, (int, float))
            and math.isfinite(self.gaussian_std)
            and self.gaussian_std >= 0.0,
            "gaussian_std",
            self.gaussian_std,
            "a finite number >= 0",
        )

    @property
    def enabled(self) -> bool:
        return self.flip_prob > 0 or self.gaussian_std > 0


@dataclass
class DiagnosticsConfig:
    collapse_threshold: float = 0.1
    """Entropy collapse: the first step whose ``train/entropy_ratio`` (entropy over its value at
    the first step) falls below this is reported once, as a warning, ``train/collapse_step``
    and ``collapse_step`` in ``summary.json``."""
    window: int = 20
    """Trailing window, in steps, of the grad-norm spike counter and ``train/loss_std``."""
    spike_sigmas: float = 4.0
    """A grad-norm spike: a step whose grad norm exceeds the trailing window's mean by this many
    standard deviations (counted in ``train/grad_norm_spikes``)."""

    def __post_init__(self) -> None:
        require(
            0.0 < self.collapse_threshold < 1.0,
            "collapse_threshold",
            self.collapse_threshold,
            "a fraction in (0, 1) of the first step's entropy",
        )
        require(isinstance(self.window, int) and self.window >= 2, "window", self.window, "an integer >= 2")
        require(self.spike_sigmas > 0, "spike_sigmas", self.spike_sigmas, "a number > 0")


@dataclass
class BudgetConfig:
    samples: int | None = None
    """Stop once this many completions have been generated (``cost/samples``, pair building
    included); null: no limit."""
    tokens_generated: int | None = None
    """Stop once this many tokens have been generated (``cost/tokens_generated``); null: no limit."""
    wall_s: float | None = None
    """Stop once training has run this many seconds (``cost/wall_s``); null: no limit."""

    def __post_init__(self) -> None:
        for name in ("samples", "tokens_generated", "wall_s"):
            value = getattr(self, name)
            require(value is None or value > 0, name, value, "null (no limit) or a number > 0")

    def spent(self, costs: dict[str, float]) -> str | None:
        """Which limit ``costs`` (``cost/*`` totals) has reached, as ``"budget.samples=N"``; None
        while every limit has room."""
        for name in ("samples", "tokens_generated", "wall_s"):
            limit = getattr(self, name)
            if limit is not None and costs.get(f"cost/{name}", 0.0) >= limit:
                return f"budget.{name}={limit}"
        return None


@dataclass
class LoggingConfig:
    mlflow: bool = True
    """Log to MLflow (alongside the CSV log that is always written)."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI; default: an SQLite store ``mlflow.db`` next to ``output_dir``,
    shared by every run there, so runs appear side by side in ``mlflow ui``."""
    experiment: str = "rlbench"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow (and W&B) run name; default: the last component of ``output_dir``."""
    wandb: bool = False
    """Also log to Weights & Biases through Lightning's WandbLogger: offline (written under
    ``<output_dir>/wandb``, upload later with ``wandb sync``) unless ``WANDB_API_KEY`` is set;
    same metric names as MLflow. Needs ``pip install "rlbench[wandb]"``."""
    wandb_project: str = "rlbench"
    """W&B project the run is logged to."""
    wandb_group: str | None = None
    """W&B run group (runs of one comparison share a group, e.g. the comparison's name); null:
    no group."""
    tags: dict[str, str] = field(default_factory=dict)
    """Tags set on the run (MLflow tags, W&B config): ``rlbench compare`` writes each cell's
    coordinates here (``rlbench.cell``, ``rlbench.cell.algorithm``, ...)."""

    def __post_init__(self) -> None:
        require(
            self.wandb_project.strip() != "" and not any(c in self.wandb_project for c in "/\\#?%:"),
            "wandb_project",
            self.wandb_project,
            "a W&B project name: not empty, none of the characters / \\ # ? % :",
        )


@dataclass
class PluginConfig:
    """A ``task`` or ``algorithm`` section: the plug-in's name and its own options dataclass.

    ``sections`` (algorithms only) holds the options of every algorithm the file configures,
    by name, the selected one included (``options`` is ``sections[name]``).
    """

    name: str
    options: Any
    sections: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.sections is None:
            return {"name": self.name, **dataclasses.asdict(self.options)}
        return {"name": self.name, **{n: dataclasses.asdict(c) for n, c in self.sections.items()}}

    def selected(self) -> dict[str, Any]:
        """The name and the options that take effect (what a run logs as parameters)."""
        options = dataclasses.asdict(self.options)
        return {"name": self.name, **({self.name: options} if self.sections is not None else options)}


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Directory of this run: checkpoints, CSV metrics, final model, summary."""
    seed: int = 0
    """Seed of every random draw (prompts, sampling, initialisation)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: PluginConfig = field(default_factory=lambda: default_plugin(TASKS, "arithmetic"))
    algorithm: PluginConfig = field(default_factory=lambda: default_algorithm())
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward_noise: RewardNoiseConfig = field(default_factory=RewardNoiseConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def warmstart_seed(self) -> int:
        """The warm start's seed: ``warmstart.seed``, or the run's when that is null."""
        return self.seed if self.warmstart.seed is None else self.warmstart.seed

    def __post_init__(self) -> None:
        # Measured on an H100 (docs/gpu.md): rlbench's step calls backward inside
        # training_step (micro-batches, several optimiser steps per batch), and Lightning's
        # FSDP wraps training_step in the root unit's forward, so backward fails with
        # "Expects BACKWARD_PRE or BACKWARD_POST state" (Lightning issue #19685).
        require(
            not self.trainer.strategy.startswith("fsdp"),
            "trainer.strategy",
            self.trainer.strategy,
            "not fsdp: Lightning's FSDP does not support a backward pass inside training_step, "
            "which every rlbench step makes (Lightning issue #19685); use ddp, and to save memory "
            "model.lora.r > 0 or trainer.precision=bf16-true (docs/gpu.md)",
        )
        if isinstance(self.trainer.devices, int):
            processes = self.trainer.devices * self.trainer.num_nodes
            require(
                self.rollout.prompts_per_step % processes == 0,
                "rollout.prompts_per_step",
                self.rollout.prompts_per_step,
                f"a multiple of the {processes} processes (trainer.devices x trainer.num_nodes), "
                f"so that every process gets the same number of whole groups",
            )
        algorithm = ALGORITHMS.get(self.algorithm.name)(self.algorithm.options)
        if algorithm.needs_step_rewards and not TASKS.get(self.task.name).has_steps:
            raise ConfigError(
                "task.name",
                self.task.name,
                f"algorithm {self.algorithm.name!r} is set to use step rewards (process supervision), "
                f"which task {self.task.name!r} does not give; use a task with steps (multistep) "
                f"or outcome advantages",
            )
        # A micro-batch at least as large as the step's batch is the whole batch: making the step
        # smaller (rollout.prompts_per_step=2) must not be refused over a micro-batch the user
        # never touched. Stored as 0, so that every reader runs exactly the whole-batch path
        # (pass 0's forward doubling as the pi_old scores, the dry run's estimate). A
        # pair-based algorithm keeps both as set: they also bound passes far larger than its
        # step (sampling num_prompts x samples_per_prompt completions, the reference's
        # log-probs of every pair).
        if algorithm.experience == "rollouts":
            batch = self.rollout.prompts_per_step * algorithm.group_size
            if self.train.micro_batch_size >= batch:
                self.train.micro_batch_size = 0
            if self.rollout.micro_batch_size >= batch:
                self.rollout.micro_batch_size = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, PluginConfig):
                out[f.name] = value.to_dict()
            elif dataclasses.is_dataclass(value):
                out[f.name] = dataclasses.asdict(value)
            else:
                out[f.name] = value
        return out

    def flat(self) -> dict[str, Any]:
        """``{"algorithm.grpo.beta": 0.04, ...}``: every field that takes effect (what MLflow logs
        as params); the sections of algorithms not selected are left out."""
        data = self.to_dict()
        data["algorithm"] = self.algorithm.selected()
        data["logging"].pop("tags")  # tags, not parameters
        return dict(flatten(data))


def default_plugin(registry: Any, name: str) -> PluginConfig:
    return PluginConfig(name, registry.get(name).Config())


def default_algorithm(name: str = "grpo") -> PluginConfig:
    options = ALGORITHMS.get(name).Config()
    return PluginConfig(name, options, {name: options})


# ---------------------------------------------------------------- loading and validation


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:  # type: ignore[assignment]
    """Reads a YAML file (or nothing: all defaults), applies ``dotted.key=value`` overrides,
    and validates everything. Raises ``ConfigError`` naming the field on any bad value."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(Path(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                item, item, "overrides are written dotted.key=value, e.g. algorithm.grpo.beta=0.0"
            )
        set_dotted(data, key.strip(), parse_scalar(raw))
    return build(RunConfig, data, "")


def build(cls: type, data: Any, path: str) -> Any:
    """An instance of dataclass ``cls`` from a mapping, validating every field."""
    if cls is RunConfig and isinstance(data, Mapping):
        data = dict(data)
        plugins = {
            "task": _build_plugin(TASKS, data.pop("task", {}), "task"),
            "algorithm": _build_algorithm(data.pop("algorithm", {})),
        }
        return build_dataclass(cls, data, path, extra=plugins)
    return build_dataclass(cls, data, path)


def _build_algorithm(data: Any) -> PluginConfig:
    """The ``algorithm`` section: ``name`` and one validated sub-section per algorithm named."""
    if not isinstance(data, Mapping):
        raise ConfigError("algorithm", data, "a mapping with 'name' and one sub-section per algorithm")
    data = dict(data)
    name = data.pop("name", "grpo")
    names = ALGORITHMS.names()
    if not isinstance(name, str):
        raise ConfigError("algorithm.name", name, f"an algorithm name: {', '.join(names)}")
    try:
        ALGORITHMS.get(name)
    except RegistryError as err:
        raise ConfigError("algorithm.name", name, str(err)) from None
    sections: dict[str, Any] = {}
    for key, value in data.items():
        where = f"algorithm.{key}"
        if key not in names:
            # an option written flat: point at the section that has it, the selected one first
            owners = [
                n
                for n in (name, *names)
                if key in {f.name for f in dataclasses.fields(ALGORITHMS.get(n).Config)}
            ]
            hint = (
                f" (options go in the algorithm's own section: algorithm.{owners[0]}.{key})"
                if owners
                else did_you_mean(str(key), names)
            )
            raise ConfigError(
                where, value, f"unknown algorithm section{hint}; valid: name, {', '.join(names)}"
            )
        sections[key] = build_dataclass(ALGORITHMS.get(key).Config, value or {}, where)
    sections.setdefault(name, ALGORITHMS.get(name).Config())
    return PluginConfig(name, sections[name], sections)


def _build_plugin(registry: Any, data: Any, path: str) -> PluginConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(path, data, f"a mapping with 'name' and the {registry.kind}'s options")
    data = dict(data)
    default = RunConfig.__dataclass_fields__[path].default_factory()  # type: ignore[misc]
    name = data.pop("name", default.name)
    if not isinstance(name, str):
        raise ConfigError(f"{path}.name", name, f"a {registry.kind} name: {', '.join(registry.names())}")
    try:
        plugin = registry.get(name)
    except RegistryError as err:
        raise ConfigError(f"{path}.name", name, str(err)) from None
    return PluginConfig(name, build_dataclass(plugin.Config, data, path, reserved=("name",)))


def config_hash(*sections: Any) -> str:
    """Short stable hash of config sections (dataclasses or plain data), for cache keys."""

    def plain(x: Any) -> Any:
        if isinstance(x, PluginConfig):
            return x.to_dict()
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x  # type: ignore[arg-type]

    blob = json.dumps([plain(s) for s in sections], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(json.loads(json.dumps(config.to_dict(), default=list)), sort_keys=False)


# ---------------------------------------------------------------- precision


#: What ``trainer.precision: auto`` picks where bf16 is native: bf16 matmuls, fp32 weights,
#: gradients and optimiser state (``bf16-true`` halves memory too, but is a different recipe).
AUTO_BF16 = "bf16-mixed"
AUTO_FP32 = "32-true"
#: Pins what ``auto`` resolves to, whatever the device: results that must not depend on the
#: machine's kernels (the test suite, a cluster of mixed CPUs) set it to ``32-true``.
AUTO_PRECISION_ENV = "RLBENCH_AUTO_PRECISION"
#: oneDNN ISA caps below AVX512_CORE_BF16: bf16 matmuls go through oneDNN, and under these caps
#: it emulates them (a 512 x 512 bf16 matmul at ~1.7 GFLOP/s against ~60 in fp32, measured on an
#: AVX512-BF16 EPYC with ONEDNN_MAX_CPU_ISA=AVX2).
_ONEDNN_NO_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)
_CPUINFO = Path("/proc/cpuinfo")


def resolve_precision(requested: str, device: str) -> tuple[str, str]:
    """The Lightning precision a run uses on ``device`` (``cpu``, ``cuda``, ...) and why.

    An explicit precision is kept as it is. ``auto`` becomes ``bf16-mixed`` only where bf16 is
    native (``bf16_support``), else ``32-true``; ``RLBENCH_AUTO_PRECISION`` overrides the probe.
    """
    import os
    import typing

    if requested != "auto":
        return requested, "set by trainer.precision"
    pinned = os.environ.get(AUTO_PRECISION_ENV, "").strip()
    if pinned:
        choices = typing.get_args(typing.get_type_hints(TrainerConfig)["precision"])
        allowed = [p for p in choices if p != "auto"]
        if pinned not in allowed:
            raise ConfigError(AUTO_PRECISION_ENV, pinned, "one of " + ", ".join(map(repr, allowed)))
        return pinned, f"auto, pinned by {AUTO_PRECISION_ENV}={pinned}"
    native, why = bf16_support(device)
    return (AUTO_BF16 if native else AUTO_FP32), f"auto: {why}"


def bf16_support(device: str) -> tuple[bool, str]:
    """Whether ``device`` runs bf16 matmuls natively, and a phrase that says why (or why not)."""
    if device == "cpu":
        return cpu_bf16_support()
    if device == "cuda":
        return cuda_bf16_support()
    return False, f"bf16 is only chosen where native support can be checked (CPU, CUDA), not on {device!r}"


def cpu_bf16_support() -> tuple[bool, str]:
    """AVX512-BF16 or AMX, and nothing in the environment forcing kernels without them.

    ``torch.backends.cpu.get_cpu_capability()`` says ``AVX512`` with or without bf16, so the bf16
    instructions are probed separately. ``ATEN_CPU_CAPABILITY=avx2`` (torch's AVX2 kernels) and a
    oneDNN cap below AVX512_CORE_BF16 (``ONEDNN_MAX_CPU_ISA``, which is where bf16 matmuls run)
    count as no native bf16: the user asked for kernels without it.
    """
    import os

    import torch

    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip()
    if aten and not aten.lower().startswith("avx512"):
        return False, f"ATEN_CPU_CAPABILITY={aten} forces kernels without native bf16"
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        cap = os.environ.get(name, "").strip()
        if cap.upper() in _ONEDNN_NO_BF16:
            return False, f"{name}={cap} caps oneDNN (bf16 matmuls) below AVX512_CORE_BF16"
    capability = torch.backends.cpu.get_cpu_capability()
    found = [name for name, present in _cpu_bf16_instructions().items() if present]
    if found and capability.startswith("AVX512"):
        return True, f"this CPU has {' and '.join(found)}"
    if found:
        return False, f"torch runs {capability} kernels here, without bf16 ones"
    return False, "this CPU has no AVX512-BF16 or AMX, so bf16 would be emulated"


def _cpu_bf16_instructions() -> dict[str, bool]:
    """``{"AVX512-BF16": ..., "AMX": ...}`` from torch's probes, else from /proc/cpuinfo's flags."""
    import torch

    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if avx512_bf16 is not None and amx is not None:
        return {"AVX512-BF16": bool(avx512_bf16()), "AMX": bool(amx())}
    flags: set[str] = set()
    if _CPUINFO.is_file():
        for line in _CPUINFO.read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
    return {"AVX512-BF16": "avx512_bf16" in flags, "AMX": "amx_bf16" in flags}


def cuda_bf16_support() -> tuple[bool, str]:
    """A CUDA GPU of compute capability 8.0 or more (Ampere on) has bf16 tensor cores; older ones
    only emulate it (``is_bf16_supported()``'s default counts emulation: not what is meant here)."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device is visible here to check for bf16"
    name = torch.cuda.get_device_name()
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return True, f"{name} has native bf16"
    return False, f"{name} has no native bf16 (compute capability below 8.0)"


def accelerator_device(accelerator: str) -> str:
    """The device type a Lightning ``accelerator`` setting lands on here: ``auto`` takes a CUDA
    GPU when one is visible, as Lightning does; ``gpu`` is CUDA (MPS where only MPS exists)."""
    import torch

    name = accelerator.lower()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name == "gpu":
        return "mps" if mps and not torch.cuda.is_available() else "cuda"
    return name


def with_resolved_precision(config: RunConfig) -> tuple[RunConfig, str]:
    """``config`` with ``trainer.precision`` resolved for its accelerator, and a line saying
    which precision was chosen and why (so the run's config.yaml and MLflow params hold it)."""
    device = accelerator_device(config.trainer.accelerator)
    precision, why = resolve_precision(config.trainer.precision, device)
    trainer = dataclasses.replace(config.trainer, precision=precision)
    return dataclasses.replace(config, trainer=trainer), f"precision: {precision} ({why})"


def cpu_summary() -> str:
    """The CPU facts a speed figure depends on, for benchmark output: torch's kernel capability
    and whether bf16 is native (a bf16 figure from a CPU with it says nothing of one without)."""
    import torch

    native, why = cpu_bf16_support()
    return (
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"native bf16 {'yes' if native else 'no'} ({why})"
    )
