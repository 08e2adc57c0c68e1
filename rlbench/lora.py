"""LoRA via peft: adapters on the policy, and the reference as the same model with them disabled.

What is trained: with ``model.lora.r > 0`` every weight of the loaded model is frozen and each
linear layer named in ``model.lora.target_modules`` gets a low-rank update
``W x + (alpha / r) * B A x`` (``A``: ``r x in``, random; ``B``: ``out x r``, zeros, so training
starts exactly at the base model). Only the ``A`` and ``B`` matrices ("lora_" parameters) get
gradients and optimiser state; the checkpoint still holds the whole module so a run resumes as is.

Why the reference is the adapter-disabled policy: the KL term needs ``pi_ref``, the model the
run started from. With LoRA that model is still inside the policy, untouched, so switching the
adapters off gives it back exactly; a full fine-tune instead needs a frozen deep copy
(``policy.frozen_copy``), a second set of weights. Sharing the weights is LoRA's memory saving
on top of the small optimiser state.

``export_model`` writes a plain ``AutoModelForCausalLM`` checkpoint (adapters merged into the
weights), so what a run produces loads without peft, like a full fine-tune's.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from rlbench.algorithm import RolloutBatch
from rlbench.config import LoraConfig
from rlbench.errors import ConfigError, RLBenchError
from rlbench.forward import batch_logprobs
from rlbench.policy import inference_mode


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wraps ``model`` with LoRA adapters; only adapter weights stay trainable.

    The result is a ``peft.PeftModel``: it takes the same ``forward`` arguments as ``model``
    (``logits_to_keep``, ``cache``...) and forwards attribute lookups
    (``generation_config``, ``config``) to it.
    """
    try:
        import peft
    except ImportError:
        raise RLBenchError('model.lora.r > 0 needs the peft package: pip install "rlbench[lora]"') from None
    check_target_modules(model, config.target_modules)
    lora = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated ``is_gradient_checkpointing``: not ours to act on
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, lora)


def check_target_modules(model: nn.Module, targets: tuple[str, ...]) -> None:
    """ConfigError unless every target names a module of ``model`` as peft matches them:
    the whole dotted name, or its last components (``q_proj``, ``self_attn.q_proj``)."""
    names = [name for name, _ in model.named_modules() if name]
    for target in targets:
        if target == "all-linear":  # peft's own shorthand
            continue
        if not any(name == target or name.endswith("." + target) for name in names):
            linear = dict.fromkeys(
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, nn.Linear)
            )
            raise ConfigError(
                "model.lora.target_modules",
                target,
                f"no module of this {type(model).__name__} is named {target!r}; give names of "
                f"linear layers in this model, e.g. {', '.join(list(linear)[:8])}",
            )


class AdapterReference:
    """The reference policy of a LoRA run: the policy itself, adapters disabled.

    Same interface as ``reference.FrozenReference``. Like the frozen copy it runs in eval mode
    (no dropout); the policy's train/eval flags are restored afterwards.
    """

    def __init__(self, model: nn.Module, vocab_size: int | None = None) -> None:
        self.model = model
        self.vocab_size = vocab_size

    def logprobs(self, batch: RolloutBatch, temperature: float) -> Tensor:
        with inference_mode(self.model), self.model.disable_adapter():
            return batch_logprobs(self.model, batch, temperature, vocab_size=self.vocab_size)[0]


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` carries peft adapters (without importing peft when it was never used)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def export_model(model: nn.Module, tokenizer: Any, directory: str | Path) -> None:
    """Saves a plain ``AutoModelForCausalLM`` checkpoint (adapters merged) plus the tokenizer.

    The merge happens on a copy, so ``model`` keeps its adapters (a run can go on training).
    """
    if is_peft_model(model):
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(directory)
        del merged
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


__all__ = ["apply_lora", "check_target_modules", "AdapterReference", "is_peft_model", "export_model"]
