"""Policy loading, rollouts and log-probs on a tiny preset saved and loaded like a real model."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlbench.errors import RLBenchError
from rlbench.forward import completion_forward, completion_logprobs, decoder_trunk
from rlbench.policy import char_tokenizer, load_policy, resolve_model_path
from rlbench.prompting import encode_prompts
from rlbench.rollout import DecodeLoop, SamplingParams, completion_mask, derive_seed, filter_logits

ALPHABET = "0123456789+-*="


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory):
    path = resolve_model_path("tiny-llama", ALPHABET, 0, tmp_path_factory.mktemp("presets"))
    model, tokenizer = load_policy(path)
    return model.eval(), tokenizer


def sample(policy, texts: list[str], seeds: list[int], **params):
    model, tokenizer = policy
    ids, mask = encode_prompts(tokenizer, texts, torch.device("cpu"))
    backend = DecodeLoop(tokenizer.eos_token_id, tokenizer.pad_token_id)
    return (
        ids,
        mask,
        backend.generate(model, ids, mask, seeds, SamplingParams(**{"max_new_tokens": 12, **params})),
    )


PROMPTS = [
    "12+34=",
    "7+5=",
    "99+1=",
    "3*4=",
    "50-8=",
    "1+1=",
    "64+36=",
    "8-9=",
]  # mixed lengths: left padding
SEEDS = [derive_seed(0, 0, i) for i in range(len(PROMPTS))]


def test_preset_round_trips_through_save_pretrained(policy, tmp_path: Path):
    model, tokenizer = policy
    assert model.config.vocab_size == 32 and model.config.hidden_size == 128
    assert tokenizer.decode(tokenizer("12+34=")["input_ids"]) == "12+34="
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, _ = load_policy(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_missing_model_path_is_a_clear_error(tmp_path: Path):
    with pytest.raises(RLBenchError, match="no such directory"):
        resolve_model_path(str(tmp_path / "nope"), ALPHABET, 0, tmp_path)
    with pytest.raises(RLBenchError, match="the directory holds no model"):
        load_policy(str(tmp_path))  # exists, holds no model


GROUPED = [p for p in PROMPTS for _ in range(4)]  # G = 4 rows per prompt: one shared prefill


@pytest.mark.parametrize("texts", [PROMPTS, GROUPED], ids=["distinct", "grouped"])
def test_rollout_logprobs_match_teacher_forcing(policy, texts: list[str]):
    seeds = [derive_seed(0, 0, i) for i in range(len(texts))]
    ids, mask, rollout = sample(policy, texts, seeds, temperature=0.7)
    logprobs, entropy = completion_logprobs(
        policy[0],
        ids,
        mask,
        rollout.completion_ids,
        rollout.completion_mask,
        temperature=0.7,
        with_entropy=True,
    )
    m = rollout.completion_mask
    assert torch.allclose(logprobs * m, rollout.logprobs * m, atol=1e-5)
    assert entropy is not None and bool((entropy >= 0).all())
    assert float(entropy.max()) <= torch.log(torch.tensor(32.0)) + 1e-5  # at most log |V|
    if texts is GROUPED:  # rows of a group share the prompt, not the draws
        assert len({tuple(r) for r in rollout.completion_ids[:4].tolist()}) > 1


def test_rows_that_finish_leave_the_decoding_batch_without_changing_the_others(policy):
    """A row that emits EOS is dropped from the decoding batch (its KV cache rows with it), so
    later steps run only the rows still going. Every row must still get exactly the tokens and
    behaviour log-probs that decoding all rows to the end would give: its log-probs equal a
    teacher-forced pass over its own prompt and completion, and one row decoded alone
    matches its row in the batch."""
    texts, seeds = PROMPTS * 4, [derive_seed(2, i) for i in range(32)]
    ids, mask, rollout = sample(policy, texts, seeds, temperature=2.0)
    lengths = rollout.completion_mask.sum(1)
    assert len(set(lengths.tolist())) >= 4 and float(lengths.min()) < 6  # rows left at many steps
    logprobs, _ = completion_logprobs(
        policy[0], ids, mask, rollout.completion_ids, rollout.completion_mask, temperature=2.0
    )
    m = rollout.completion_mask
    assert torch.allclose(logprobs * m, rollout.logprobs * m, atol=1e-5)
    longest = int(lengths.argmax())
    alone = sample(policy, texts[longest : longest + 1], seeds[longest : longest + 1], temperature=2.0)[2]
    n = int(lengths[longest])
    assert alone.completion_ids[0, :n].tolist() == rollout.completion_ids[longest, :n].tolist()


def test_entropy_is_exact(policy):
    model, _ = policy
    ids, mask, rollout = sample(policy, PROMPTS[:2], SEEDS[:2])
    _, entropy = completion_logprobs(
        model, ids, mask, rollout.completion_ids, rollout.completion_mask, 1.0, True
    )
    full = torch.cat([ids, rollout.completion_ids], 1)
    full_mask = torch.cat([mask, rollout.completion_mask.long()], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=full, attention_mask=full_mask, position_ids=pos).logits[
        :, ids.shape[1] - 1 : -1
    ]
    p = torch.softmax(logits.double(), -1)
    expected = -(p * p.log()).sum(-1)
    assert torch.allclose(entropy.double(), expected, atol=1e-4)


def test_shared_prompt_forward_equals_one_forward_per_row(policy):
    """Rows that repeat a prompt run it once on a copied KV cache: log-probs, entropy, hidden
    states and gradients are those of separate full forwards, left padding included."""
    model, _ = policy
    ids, mask, rollout = sample(policy, [p for p in PROMPTS[:3] for _ in range(2)], SEEDS[:6])
    completions, completion_masks = rollout.completion_ids, rollout.completion_mask
    assert not bool(mask.all())  # mixed prompt lengths

    def forward(rows: slice):
        model.zero_grad()
        out = completion_forward(
            model, ids[rows], mask[rows], completions[rows], completion_masks[rows], 0.7, True, None, True
        )
        (out.logprobs * completion_masks[rows]).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        return out, grads

    shared, shared_grads = forward(slice(None))  # 3 distinct prompts, 6 rows: shared prefill
    alone = [forward(slice(i, i + 1)) for i in range(6)]  # one row: a single full forward
    m = completion_masks
    assert torch.allclose(shared.logprobs * m, torch.cat([a.logprobs for a, _ in alone]) * m, atol=1e-5)
    assert torch.allclose(shared.entropy * m, torch.cat([a.entropy for a, _ in alone]) * m, atol=1e-5)
    hidden = torch.cat([a.hidden for a, _ in alone]) * m[..., None]
    assert torch.allclose(shared.hidden * m[..., None], hidden, atol=1e-5)
    for got, *rows in zip(shared_grads, *(g for _, g in alone)):
        assert torch.allclose(got, sum(rows), atol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [1, 5, 4096])
def test_chunked_head_forward_equals_the_full_logits_forward(policy, chunk_tokens: int):
    """Log-probs through the trunk and the LM head a few tokens at a time (never ``[B, T, V]``
    logits) are the model's own full-logits numbers: values, entropy, hidden states, gradients."""
    model, _ = policy
    assert decoder_trunk(model) is not None  # the chunked path is taken
    ids, mask, rollout = sample(policy, [p for p in PROMPTS[:3] for _ in range(2)], SEEDS[:6])
    completions, m = rollout.completion_ids, rollout.completion_mask

    def forward(chunk: int):
        model.zero_grad()
        out = completion_forward(model, ids, mask, completions, m, 0.7, True, None, True, chunk_tokens=chunk)
        (out.logprobs * m).sum().backward()
        return out, [p.grad.clone() for p in model.parameters()]

    (chunked, chunked_grads), (full, full_grads) = forward(chunk_tokens), forward(0)
    assert torch.allclose(chunked.logprobs * m, full.logprobs * m, atol=1e-5)
    assert torch.allclose(chunked.entropy * m, full.entropy * m, atol=1e-5)
    assert torch.allclose(chunked.hidden * m[..., None], full.hidden * m[..., None], atol=1e-5)
    for got, expected in zip(chunked_grads, full_grads, strict=True):
        assert torch.allclose(got, expected, atol=1e-5)


def test_mask_stops_after_eos(policy):
    _, tokenizer = policy
    _, _, rollout = sample(policy, PROMPTS * 4, [derive_seed(1, i) for i in range(32)], temperature=2.0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ended = 0
    for ids, m in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):
        if eos in ids:
            ended += 1
            first = ids.index(eos)
            assert m == [1.0] * (first + 1) + [0.0] * (len(ids) - first - 1)
            assert all(t == pad for t in ids[first + 1 :])
        else:
            assert all(v == 1.0 for v in m)
    assert ended > 0  # the check above ran on real EOS rows
    assert completion_mask(torch.tensor([[5, 2, 7, 2]]), 2).tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_same_seed_same_completions(policy):
    a = sample(policy, PROMPTS, SEEDS)[2].completion_ids
    b = sample(policy, PROMPTS, SEEDS)[2].completion_ids
    c = sample(policy, PROMPTS, [s + 1 for s in SEEDS])[2].completion_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_completions_do_not_depend_on_the_batch_split(policy):
    whole = sample(policy, PROMPTS, SEEDS)[2]
    for split in (1, 3, 5):
        parts = [sample(policy, PROMPTS[i : i + split], SEEDS[i : i + split])[2] for i in range(0, 8, split)]
        for row, (part, offset) in enumerate((p, r) for p in parts for r in range(len(p.completion_ids))):
            n = int(part.completion_mask[offset].sum())
            assert part.completion_ids[offset, :n].tolist() == whole.completion_ids[row, :n].tolist()
            assert int(whole.completion_mask[row].sum()) == n


def test_greedy_is_argmax(policy):
    model, _ = policy
    ids, mask, rollout = sample(policy, PROMPTS[:1], [0], temperature=0.0, max_new_tokens=3)
    logits = model(input_ids=ids).logits[:, -1]
    assert int(rollout.completion_ids[0, 0]) == int(logits.argmax(-1))


def test_top_k_and_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # mass before token 3 is 0.95 >= 0.9: dropped; before token 2 it is 0.8 < 0.9: kept
    assert torch.isinf(filter_logits(logits, 0, 0.9)).tolist() == [[False, False, False, True]]


def test_char_tokenizer_is_left_padded():
    tokenizer = char_tokenizer(ALPHABET)
    enc = tokenizer(["1+1=", "12+34="], padding=True)
    assert enc["attention_mask"][0] == [0, 0, 1, 1, 1, 1]


class CountCasts(TorchDispatchMode):
    """Counts casts to bfloat16 (autocast's weight and activation casts)."""

    def __init__(self) -> None:
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
            self.casts += 1
        return func(*args, **kwargs)


def test_bf16_sampling_casts_each_weight_once_and_never_keeps_a_stale_cast(policy, monkeypatch):
    """Under Lightning's autocast (its cast cache off), the decode loop reuses one bf16 cast of
    each weight for the whole rollout: the same samples, far fewer casts, and a weight changed
    after a rollout (an optimiser step in the same training_step) is cast afresh."""
    lightning_autocast = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    model = policy[0]
    texts, seeds = PROMPTS * 2, [derive_seed(3, i) for i in range(16)]

    def rollout_and_casts():
        with CountCasts() as counter:
            out = sample(policy, texts, seeds, temperature=1.0)[2]
        return out, counter.casts

    with lightning_autocast:
        reused, reused_casts = rollout_and_casts()
        with monkeypatch.context() as patch:
            patch.setattr("rlbench.rollout.weights_cast_once", lambda device_type: contextlib.nullcontext())
            every_call, every_call_casts = rollout_and_casts()
        assert torch.equal(reused.completion_ids, every_call.completion_ids)
        assert torch.equal(reused.logprobs, every_call.logprobs)
        # every model call after the first (the prompts' prefill) re-cast each linear weight
        calls = reused.completion_ids.shape[1]
        linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert calls >= 8 and every_call_casts - reused_casts >= (calls - 1) * linears

        original = {name: p.detach().clone() for name, p in model.named_parameters()}
        try:
            with torch.no_grad():  # an optimiser step between two rollouts of one training_step
                for p in model.parameters():
                    p.mul_(-1.5)
            after, _ = rollout_and_casts()
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(original[name])
    assert not torch.equal(after.logprobs, reused.logprobs)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            fresh = sample(policy, texts, seeds, temperature=1.0)[2]  # a new region: nothing cached
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(original[name])
    assert torch.equal(after.completion_ids, fresh.completion_ids)
    assert torch.equal(after.logprobs, fresh.logprobs)
