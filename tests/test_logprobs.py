"""Chunked per-token log-probs and entropy (``rlbench.logprobs``) against the full-vocabulary
reference: values, gradients, frozen and tied heads, wrapped heads, bf16 autocast, and what
each keeps for backward."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from rlbench.logprobs import is_plain_linear, naive_token_logprobs, token_logprobs

B, T, H, ROWS = 3, 5, 16, 37  # ROWS: the head's rows; VOCAB of them are real tokens
VOCAB = 33
TEMPERATURE = 0.7
TOL = {"rtol": 1e-5, "atol": 1e-5}


def make_inputs(bias: bool = True, seed: int = 0) -> tuple[Tensor, nn.Linear, Tensor]:
    torch.manual_seed(seed)
    hidden = torch.randn(B, T, H, requires_grad=True)
    head = nn.Linear(H, ROWS, bias=bias)
    targets = torch.randint(0, VOCAB, (B, T))
    return hidden, head, targets


def both(hidden: Tensor, head: nn.Module, targets: Tensor, chunk_tokens: int = 4) -> tuple:
    """``(chunked, naive)`` outputs at the test temperature and vocabulary, with entropy."""
    args = (hidden, head, targets, TEMPERATURE, VOCAB, True)
    return token_logprobs(*args, chunk_tokens=chunk_tokens), naive_token_logprobs(*args)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 100])  # one token, uneven chunks, one chunk
def test_values_match_naive(chunk_tokens):
    hidden, head, targets = make_inputs()
    (logprobs, entropy), (naive_logprobs, naive_entropy) = both(hidden, head, targets, chunk_tokens)
    assert logprobs.shape == entropy.shape == (B, T)
    assert logprobs.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logprobs, naive_logprobs, **TOL)
    torch.testing.assert_close(entropy, naive_entropy, **TOL)
    assert logprobs.requires_grad and not entropy.requires_grad
    # with_entropy=False gives no entropy and the same log-probs
    alone, none = token_logprobs(hidden, head, targets, TEMPERATURE, VOCAB, chunk_tokens=chunk_tokens)
    assert none is None
    torch.testing.assert_close(alone, naive_logprobs, **TOL)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 100])
def test_gradients_match_naive(chunk_tokens):
    hidden, head, targets = make_inputs()
    (logprobs, _), (naive_logprobs, _) = both(hidden, head, targets, chunk_tokens)
    upstream = torch.randn(B, T)
    wrt = (hidden, head.weight, head.bias)
    grads = torch.autograd.grad(logprobs, wrt, upstream)
    naive_grads = torch.autograd.grad(naive_logprobs, wrt, upstream)
    for grad, naive_grad in zip(grads, naive_grads):
        torch.testing.assert_close(grad, naive_grad, **TOL)
    # the head's rows past the vocabulary never reach a log-prob
    assert grads[1][VOCAB:].abs().max() == 0 and grads[2][VOCAB:].abs().max() == 0


class MatmulCounter(TorchDispatchMode):
    """Counts the matrix products that run inside it, in-place accumulations included."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in ("mm", "addmm", "addmm_")
        return func(*args, **(kwargs or {}))


def test_frozen_head_skips_weight_gradient():
    hidden, head, targets = make_inputs(bias=False)
    upstream = torch.randn(B, T)
    (_, _), (naive_logprobs, _) = both(hidden, head, targets)
    (naive_grad,) = torch.autograd.grad(naive_logprobs, hidden, upstream)

    def backward_matmuls(frozen: bool) -> int:
        head.requires_grad_(not frozen)
        hidden.grad = head.weight.grad = None
        logprobs, _ = token_logprobs(hidden, head, targets, TEMPERATURE, VOCAB, chunk_tokens=4)
        with MatmulCounter() as counter:
            logprobs.backward(upstream)
        torch.testing.assert_close(hidden.grad, naive_grad, **TOL)
        return counter.count

    chunks = -(-B * T // 4)
    # per chunk, trained: recompute the logits, grad of hidden, grad of weight; frozen: no
    # weight product
    assert backward_matmuls(frozen=False) == 3 * chunks
    assert backward_matmuls(frozen=True) == 2 * chunks
    assert head.weight.grad is None


def test_tied_embedding_gradient():
    torch.manual_seed(1)
    embedding = nn.Embedding(ROWS, H)
    head = nn.Linear(H, ROWS, bias=False)
    head.weight = embedding.weight  # tied: one parameter, used at both ends
    ids = torch.randint(0, VOCAB, (B, T))
    targets = torch.randint(0, VOCAB, (B, T))
    upstream = torch.randn(B, T)
    grads = []
    for fn in (token_logprobs, naive_token_logprobs):
        hidden = torch.tanh(embedding(ids))
        logprobs, _ = fn(hidden, head, targets, TEMPERATURE, VOCAB, chunk_tokens=4)
        grads.append(torch.autograd.grad(logprobs, embedding.weight, upstream)[0])
    torch.testing.assert_close(grads[0], grads[1], **TOL)


class Wrapped(nn.Module):
    """A LoRA-style head: a frozen base projection plus a scaled low-rank trained update."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(H, ROWS, bias=False).requires_grad_(False)
        self.lora_a = nn.Linear(H, 4, bias=False)
        self.lora_b = nn.Linear(4, ROWS, bias=False)
        nn.init.normal_(self.lora_b.weight)  # LoRA starts B at zero; a non-zero B tests its path
        self.scale = 2.0

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))


def test_generic_path_matches_naive():
    hidden, _, targets = make_inputs()
    head = Wrapped()
    assert not is_plain_linear(head)
    (logprobs, entropy), (naive_logprobs, naive_entropy) = both(hidden, head, targets, chunk_tokens=4)
    torch.testing.assert_close(logprobs, naive_logprobs, **TOL)
    torch.testing.assert_close(entropy, naive_entropy, **TOL)
    assert not entropy.requires_grad
    upstream = torch.randn(B, T)
    wrt = (hidden, head.lora_a.weight, head.lora_b.weight)
    grads = torch.autograd.grad(logprobs, wrt, upstream)
    naive_grads = torch.autograd.grad(naive_logprobs, wrt, upstream)
    for grad, naive_grad in zip(grads, naive_grads):
        torch.testing.assert_close(grad, naive_grad, **TOL)


def test_only_a_plain_linear_takes_the_fused_path():
    class Scaled(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    hooked = nn.Linear(H, ROWS)
    hooked.register_forward_hook(lambda _m, _args, out: out * 2)
    assert is_plain_linear(nn.Linear(H, ROWS))
    assert not is_plain_linear(Scaled(H, ROWS)) and not is_plain_linear(hooked)
    hidden, _, targets = make_inputs()
    for head in (Scaled(H, ROWS), hooked):  # their forward logic is kept
        (logprobs, _), (naive_logprobs, _) = both(hidden, head, targets)
        torch.testing.assert_close(logprobs, naive_logprobs, **TOL)


def test_no_grad_forward():
    hidden, head, targets = make_inputs()
    for module in (head, Wrapped()):
        with torch.no_grad():
            (logprobs, entropy), (naive_logprobs, naive_entropy) = both(hidden, module, targets)
        assert logprobs.grad_fn is None
        torch.testing.assert_close(logprobs, naive_logprobs, **TOL)
        torch.testing.assert_close(entropy, naive_entropy, **TOL)


def test_bf16_autocast_matches_naive_autocast():
    hidden, head, targets = make_inputs()
    upstream = torch.randn(B, T)
    wrt = (hidden, head.weight, head.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (logprobs, entropy), (naive_logprobs, naive_entropy) = both(hidden, head, targets)
    assert logprobs.dtype == entropy.dtype == torch.float32
    loose = {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(logprobs, naive_logprobs, **loose)
    torch.testing.assert_close(entropy, naive_entropy, **loose)
    # bf16 matmuls in both: the fp32 reference is off by far more than the two differ
    fp32_logprobs, _ = naive_token_logprobs(hidden, head, targets, TEMPERATURE, VOCAB)
    assert (fp32_logprobs - naive_logprobs).abs().max() > 10 * (logprobs - naive_logprobs).abs().max()
    grads = torch.autograd.grad(logprobs, wrt, upstream)
    naive_grads = torch.autograd.grad(naive_logprobs, wrt, upstream)
    for grad, naive_grad in zip(grads, naive_grads):
        assert grad.dtype == torch.float32  # fp32 master weights and inputs get fp32 gradients
        scale = naive_grad.abs().max().item()
        torch.testing.assert_close(grad, naive_grad, rtol=1e-2, atol=1e-2 * scale)


def saved_bytes(fn, hidden: Tensor, head: nn.Module, targets: Tensor) -> int:
    """Bytes of the distinct storages that ``fn``'s graph keeps for backward."""
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logprobs, _ = fn(hidden, head, targets, with_entropy=True, chunk_tokens=16)
    assert logprobs.requires_grad
    return sum(storages.values())


def test_saves_far_less_than_full_logits():
    torch.manual_seed(2)
    hidden = torch.randn(2, 64, 32, requires_grad=True)
    targets = torch.randint(0, 4096, (2, 64))
    head = nn.Linear(32, 4096, bias=False)
    naive = saved_bytes(naive_token_logprobs, hidden, head, targets)
    assert naive >= 2 * 64 * 4096 * 4  # the fp32 log-softmax over the vocabulary
    # what is left is mostly the weight and hidden states, which exist anyway
    assert saved_bytes(token_logprobs, hidden, head, targets) < naive / 4
    # the generic path (checkpointed chunks) keeps only each chunk's input
    wrapped = nn.Sequential(head)
    assert not is_plain_linear(wrapped)
    assert saved_bytes(token_logprobs, hidden, wrapped, targets) < naive / 4


@pytest.mark.parametrize("chunk_tokens", [0, -3, 2.5, True])
def test_bad_chunk_tokens(chunk_tokens):
    hidden, head, targets = make_inputs()
    with pytest.raises(ValueError, match="chunk_tokens"):
        token_logprobs(hidden, head, targets, chunk_tokens=chunk_tokens)


def test_bad_inputs_named():
    hidden, head, targets = make_inputs()
    with pytest.raises(ValueError, match="vocab_size"):
        token_logprobs(hidden, head, targets, vocab_size=0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, head, targets[:, :-1])
    # the plain head call refuses mixed dtypes outside autocast; so does the fused path
    with pytest.raises(ValueError, match="autocast"):
        token_logprobs(hidden, head.to(torch.bfloat16), targets)
