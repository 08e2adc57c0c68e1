"""Policies: any Hugging Face causal LM, tiny presets, a frozen reference, log-probs and entropy.

A policy is loaded from a hub name or a local ``save_pretrained`` directory with the
``Auto*`` classes. Tiny presets (for tests and CPU demos) are built from a ``LlamaConfig``
and a char-level tokenizer, saved with ``save_pretrained`` and then loaded through the very
same path, so the loading code that real models take is the code the tests run. Packaged
models (``rlbench.pretrained``: a real instruct model that a pip package ships) are converted
once into such a directory too.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rlbench.cache import build_once
from rlbench.errors import RLBenchError
from rlbench.pretrained import PACKAGED, packaged_model_path
from rlbench.registry import did_you_mean

if TYPE_CHECKING:
    from transformers import LlamaConfig

#: Tiny Llama shapes; ``medium-llama`` is the medium benchmark shape of ``../shared/peers``.
PRESETS: dict[str, dict[str, int]] = {
    "tiny-llama": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    "small-llama": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    "medium-llama": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8),
}
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def char_tokenizer(alphabet: str) -> Any:
    """A fast tokenizer with one token per character of ``alphabet`` plus pad/bos/eos/unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in dict.fromkeys(alphabet):  # keeps first occurrences, in order
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # newlines too
    core.decoder = decoders.Fuse()  # decode "4","6" as "46", not "4 6"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def preset_config(name: str, alphabet: str) -> LlamaConfig:
    """The ``LlamaConfig`` of preset ``name`` for a char tokenizer over ``alphabet``.

    The one place a preset's architecture is defined: ``build_preset`` builds its weights from
    it and ``rlbench train --dry-run`` sizes it without building anything.
    """
    from transformers import LlamaConfig

    tokenizer = char_tokenizer(alphabet)
    vocab_size = -(-len(tokenizer) // 32) * 32  # round up: matmul-friendly and as in the peers
    shape = PRESETS[name]
    return LlamaConfig(
        vocab_size=vocab_size,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **shape,
    )


def build_preset(name: str, alphabet: str, seed: int, directory: Path) -> Path:
    """Creates preset ``name`` (random weights from ``seed``) and saves model + tokenizer.

    Built once even when several processes ask at the same time (``cache.build_once``).
    """
    from transformers import LlamaForCausalLM

    def build(tmp: Path) -> None:
        tokenizer = char_tokenizer(alphabet)
        config = preset_config(name, alphabet)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_once(directory, build, complete=Path.is_dir)


def resolve_model_path(name_or_path: str, alphabet: str | None, seed: int, cache_dir: Path) -> str:
    """A loadable name: a local directory, a preset (built into ``cache_dir`` once), or a hub name.
    A preset's char tokenizer covers ``alphabet`` (the task's characters; None: the task has
    none, and only real tokenizers can read it)."""
    if Path(name_or_path).is_dir():
        return name_or_path
    if name_or_path in PACKAGED:
        return packaged_model_path(name_or_path, cache_dir)
    if name_or_path in PRESETS:
        if not alphabet:
            raise RLBenchError(
                f"model.name_or_path={name_or_path!r} is a tiny char-tokenizer preset, but the task "
                f"declares no alphabet for it to cover; use a real model (a hub name or local directory)"
            )
        from rlbench.config import config_hash

        directory = cache_dir / "presets" / f"{name_or_path}-{config_hash(alphabet, seed)}"
        return str(build_preset(name_or_path, alphabet, seed, directory))
    near = did_you_mean(name_or_path, preset_names())
    if near:
        raise RLBenchError(
            f"model.name_or_path={name_or_path!r} is not a local directory or a preset{near}; "
            f"presets: {', '.join(preset_names())}"
        )
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise RLBenchError(
            f"model.name_or_path={name_or_path!r}: no such directory; give a local save_pretrained "
            f"directory, a hub name, or a preset ({', '.join(preset_names())})"
        )
    return name_or_path


def preset_names() -> list[str]:
    """Every model name that is neither a directory nor a hub name: tiny presets, packaged models."""
    return [*PRESETS, *PACKAGED]


def load_policy(
    name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a hub name or a local directory, tokenizer left-padded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype)
    check_model_dir(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RLBenchError(f"model.name_or_path={name_or_path!r} could not be loaded: {first_line}") from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise RLBenchError(f"model.name_or_path={name_or_path!r}: the tokenizer has no EOS token")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def real_vocab_size(tokenizer: Any, model: nn.Module) -> int:
    """How many logit rows are real tokens: the tokenizer's size, capped by the model's rows.

    Models round their embedding up (tiny presets: 32 rows for 18 tokens; Qwen2.5: 151,936 for
    151,665); the extra rows are ids no tokenizer maps, which decode to nothing.
    """
    rows = model.get_output_embeddings().weight.shape[0]
    return min(len(tokenizer), rows)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Zeroes every dropout of ``model``, as TRL does for RL: with dropout, the policy that
    samples is not the one that scores (``pi_old``) and the importance ratio is noise.

    ``nn.Dropout`` modules (GPT-2's, LoRA's) get ``p = 0``; attention implementations that
    apply dropout functionally read a float attribute (Llama/Qwen ``attention_dropout``), so
    those are zeroed too.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


@contextlib.contextmanager
def inference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no dropout) and no gradients for a forward that only scores or samples;
    every module's train/eval flag is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


def check_model_dir(name_or_path: str) -> None:
    """A local directory must hold a transformers model config; say so before loading fails obscurely."""
    directory = Path(name_or_path)
    if not directory.is_dir():
        return
    config_file = directory / "config.json"
    field = f"model.name_or_path={name_or_path!r}"
    if not config_file.is_file():
        raise RLBenchError(
            f"{field}: the directory holds no model (no config.json); give a save_pretrained directory"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise RLBenchError(f"{field}: {config_file} is not a JSON model config") from None
    if not model_type:
        raise RLBenchError(
            f"{field}: {config_file} has no 'model_type', so it is not a transformers model config"
        )


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen reference policy: same weights, eval mode, no dropout, no gradients."""
    return disable_dropout(copy.deepcopy(model).eval().requires_grad_(False))
