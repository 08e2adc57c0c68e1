"""LoRA: adapters only are trained, the reference is the base model, the export is a plain model."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlbench.algorithm import RolloutBatch
from rlbench.config import LoraConfig
from rlbench.errors import ConfigError, RLBenchError
from rlbench.forward import completion_logprobs
from rlbench.lora import AdapterReference, apply_lora, export_model
from rlbench.module import RLModule
from rlbench.policy import load_policy
from rlbench.registry import TASKS
from rlbench.rollout import DecodeLoop, SamplingParams
from rlbench.run import train
from rlbench.task import Prompt
from rlbench.warmstart import base_model_path
from tasks.arithmetic import Arithmetic


@TASKS.register("test-lora-coin")
class Coin(Arithmetic):
    """Arithmetic prompts, reward a fair coin per completion (hashed, so deterministic): a random
    model then gets non-zero advantages, so its adapters move."""

    def reward(self, prompt: Prompt, completion: str) -> float:
        return float(hashlib.sha256(f"{prompt.text}|{completion}".encode()).digest()[0] % 2)


def module_for(config) -> RLModule:
    task = TASKS.get(config.task.name)(config.task.options)
    return RLModule(config, base_model_path(config, task))


def preset_path(make_config) -> str:
    config = make_config()
    return base_model_path(config, TASKS.get(config.task.name)(config.task.options))


def perturb_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """lora_B starts at zero (adapters a no-op); random values make them change the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def random_batch(vocab: int, seed: int = 0) -> RolloutBatch:
    """4 rows, left-padded prompts of different lengths (the padded code path), 5 completion tokens."""
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, vocab, (4, 7), generator=generator)
    prompt_mask = torch.ones(4, 7, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_mask[3, :4] = 0
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    completion_ids = torch.randint(4, vocab, (4, 5), generator=generator)
    completion_mask = torch.ones(4, 5)
    completion_mask[2, 3:] = 0
    return RolloutBatch(
        prompt_ids, prompt_mask, completion_ids, completion_mask, torch.zeros(4, 5), torch.zeros(4), 2
    )


def test_reference_is_the_base_model_while_adapters_change_the_policy(make_config):
    path = preset_path(make_config)
    base, _ = load_policy(path)
    base.eval()
    torch.manual_seed(0)
    policy = apply_lora(load_policy(path)[0], LoraConfig(r=4)).train()
    perturb_adapters(policy)
    batch = random_batch(base.config.vocab_size)
    with torch.no_grad():
        expected, _ = completion_logprobs(
            base, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, 0.7
        )
        adapted, _ = completion_logprobs(
            policy, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, 0.7
        )
    reference = AdapterReference(policy).logprobs(batch, temperature=0.7)
    torch.testing.assert_close(reference, expected, atol=1e-6, rtol=0)
    assert (adapted - expected).abs().max() > 1e-3  # the adapters are not a no-op
    assert policy.training and all(m.training for m in policy.modules())  # train mode restored
    assert all(p.requires_grad == ("lora_" in n) for n, p in policy.named_parameters())


def test_kv_cache_decode_and_teacher_forcing_agree_through_the_adapters(make_config):
    path = preset_path(make_config)
    torch.manual_seed(0)
    policy, tokenizer = load_policy(path)
    policy = apply_lora(policy, LoraConfig(r=4))
    perturb_adapters(policy, seed=1)
    assert policy.generation_config.pad_token_id == tokenizer.pad_token_id  # attributes pass through
    batch = random_batch(policy.config.vocab_size, seed=1)
    loop = DecodeLoop(tokenizer.eos_token_id, tokenizer.pad_token_id)
    rollout = loop.generate(policy, batch.prompt_ids, batch.prompt_mask, [1, 2, 3, 4], SamplingParams(6))
    with torch.no_grad():
        teacher_forced, _ = completion_logprobs(
            policy, batch.prompt_ids, batch.prompt_mask, rollout.completion_ids, rollout.completion_mask
        )
    torch.testing.assert_close(teacher_forced * rollout.completion_mask, rollout.logprobs, atol=1e-5, rtol=0)


def test_export_merges_adapters_into_a_plain_checkpoint_and_keeps_them_on_the_policy(
    make_config, tmp_path: Path
):
    path = preset_path(make_config)
    torch.manual_seed(0)
    policy, tokenizer = load_policy(path)
    policy = apply_lora(policy, LoraConfig(r=4))
    perturb_adapters(policy)
    ids = torch.randint(4, policy.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = policy(input_ids=ids).logits
    export_model(policy, tokenizer, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert not any("lora" in name for name in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, before, atol=1e-5, rtol=0)
        torch.testing.assert_close(policy(input_ids=ids).logits, before, atol=0, rtol=0)  # unmerged
    assert any("lora_B" in name for name, _ in policy.named_parameters())


def test_lora_run_trains_only_the_adapters(make_config):
    config = make_config(
        "model.lora.r=4", "trainer.max_steps=2", "logging.mlflow=false", "task.name=test-lora-coin"
    )
    pl.seed_everything(config.seed, verbose=False)  # as train() does: same adapter initialisation
    initial = {k: v.clone() for k, v in module_for(config).state_dict().items()}
    train(config, progress_bar=False)
    out = Path(config.output_dir)
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    final = checkpoint["state_dict"]
    assert final.keys() == initial.keys()
    changed = [k for k in final if not torch.equal(final[k], initial[k])]
    assert changed and all("lora_" in k for k in changed), changed
    # B starts at zero, so a changed B is a real update; A moves once B is non-zero (step 2)
    assert any("lora_B" in k for k in changed) and any("lora_A" in k for k in changed)

    lora_shapes = sorted(tuple(v.shape) for k, v in initial.items() if "lora_" in k)
    (group,) = checkpoint["optimizer_states"][0]["param_groups"]
    state = checkpoint["optimizer_states"][0]["state"]
    assert len(group["params"]) == len(lora_shapes)
    assert sorted(tuple(s["exp_avg"].shape) for s in state.values()) == lora_shapes

    prefix = "policy.base_model.model.model.layers.0.self_attn.q_proj."
    scale = config.model.lora.alpha / config.model.lora.r
    merged = final[prefix + "base_layer.weight"] + scale * (
        final[prefix + "lora_B.default.weight"] @ final[prefix + "lora_A.default.weight"]
    )
    plain = AutoModelForCausalLM.from_pretrained(out / "final_model").state_dict()
    torch.testing.assert_close(plain["model.layers.0.self_attn.q_proj.weight"], merged, atol=1e-5, rtol=0)
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(plain[untouched], initial["policy.base_model.model." + untouched])


def test_lora_reference_shares_the_policy_weights(make_config):
    module = module_for(make_config("model.lora.r=4"))
    assert isinstance(module.reference, AdapterReference)
    assert module.reference.model is module.policy  # no second copy of the weights
    trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert module_for(make_config("model.lora.r=4", "algorithm.grpo.beta=0")).reference is None


def test_unknown_target_module_names_the_field_and_real_layer_names(make_config):
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules='qkv' is invalid: .*q_proj") as err:
        module_for(make_config("model.lora.r=4", "model.lora.target_modules=[q_proj, qkv]"))
    assert err.value.field == "model.lora.target_modules"


def test_missing_peft_says_what_to_install(make_config, monkeypatch):
    model, _ = load_policy(preset_path(make_config))
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(RLBenchError, match=r'pip install "rlbench\[lora\]"'):
        apply_lora(model, LoraConfig(r=4))
