"""Peak memory and time of per-token log-probs with entropy, forward + backward: the
full-vocabulary reference (``naive_token_logprobs``) against the chunked kernel
(``token_logprobs``), from the LM head's input as ``rlbench.logprobs`` computes them.

    python benchmarks/logprob_memory.py                    # the issue's shapes (see below)
    python benchmarks/logprob_memory.py --quick            # small shapes: a smoke check, ~20 s
    python benchmarks/logprob_memory.py --threads 8 --chunk-tokens 512 --repeats 5

Default shapes: B=8 completions x T=512 tokens, fp32 on the CPU, hidden states requiring
grad, a bias-free head ``nn.Linear(H, V)``, one call of each function with entropy, then
``logprobs.backward(upstream)`` with a fixed random upstream gradient. Cases:

- ``smollm2-135m``: V=49152, H=576 (SmolLM2-135M's vocabulary and width), head trained;
- ``qwen2.5-0.5b``: V=151936, H=896 (Qwen2.5-0.5B), head trained;
- ``qwen2.5-0.5b frozen``: the same with the head frozen (LoRA): no weight gradient.

The naive Qwen case needs roughly 10 GB of RAM above its inputs: each ``[B, T, V]`` fp32
tensor is 2.5 GB and the reference holds four at once at its forward's peak (the scaled
logits, their log-softmax, the entropy's two temporaries), three in backward. ``--quick``
keeps B and T and shrinks V and H (V=2048 and 4096), so the number of chunks is the same.

How memory is measured: each (case, function) runs in a fresh interpreter, so one's peak
cannot hide the other's. The child builds its inputs, makes one untimed call (one-time costs
such as kernels paged in on first use and BLAS buffers, tens of MB, belong to neither
function), reads its current resident set (``/proc/self/statm``), makes the ``--repeats``
timed calls, and reports its resident-set high-water mark (``getrusage ru_maxrss``) minus
that resident set: the memory a call adds at its peak, the head's weight gradient included
(both functions produce it), the inputs and the Python/torch baseline excluded. The untimed
call's peak is no higher than a timed call's, so it does not mask them. RSS counts pages
touched, not allocations; both functions write all they allocate.

The children run with glibc's mmap threshold fixed at its default 128 KiB
(``MALLOC_MMAP_THRESHOLD_``), so every freed buffer above it goes back to the OS at once. By
default glibc raises the threshold after each free (up to 32 MB) and keeps freed buffers
below it in its heap, which would make the small shapes' peaks depend on fragmentation and
would keep the untimed call's memory resident; the full shapes' big buffers, far above
32 MB, behave the same either way. On a GPU the figure that matters
is ``torch.cuda.max_memory_allocated``; this script measures the CPU.

Time is the median wall time of the timed calls. The chunked kernel multiplies once more
than the reference (it recomputes each chunk's logits in backward) and skips the passes over
full ``[B, T, V]`` tensors. The targets from the issue: chunked peak <= 1/4 of naive,
chunked time <= 1.2 x naive; the last column says whether a case meets both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEMORY_TARGET = 0.25  # chunked peak / naive peak, at most
TIME_TARGET = 1.2  # chunked time / naive time, at most
METHODS = ("naive", "chunked")


@dataclass(frozen=True)
class Case:
    name: str
    vocab: int
    hidden: int
    frozen_head: bool = False


FULL_CASES = (
    Case("smollm2-135m", 49152, 576),
    Case("qwen2.5-0.5b", 151936, 896),
    Case("qwen2.5-0.5b frozen", 151936, 896, frozen_head=True),
)
QUICK_CASES = (  # same structure, small enough for seconds on one core
    Case("tiny", 2048, 64),
    Case("small", 4096, 96),
    Case("small frozen", 4096, 96, frozen_head=True),
)
SHAPE = (8, 512)  # B, T, with --quick too: the same number of chunks as the real run


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mib() -> float:
    """The resident set now; the high-water mark where ``/proc`` is missing (not Linux)."""
    statm = Path("/proc/self/statm")
    if not statm.exists():
        return peak_rss_mib()
    resident_pages = int(statm.read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(args: argparse.Namespace, case: Case, method: str) -> dict[str, Any]:
    """Runs ``method`` on ``case`` in this process (a fresh one, started by ``run_child``)."""
    import torch
    from torch import Tensor, nn

    from rlbench.logprobs import naive_token_logprobs, token_logprobs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the same inputs in every process, so their results can be compared
    batch, tokens = SHAPE
    hidden = torch.randn(batch, tokens, case.hidden, requires_grad=True)
    head = nn.Linear(case.hidden, case.vocab, bias=False).requires_grad_(not case.frozen_head)
    targets = torch.randint(0, case.vocab, (batch, tokens))
    upstream = torch.randn(batch, tokens)
    fn = token_logprobs if method == "chunked" else naive_token_logprobs

    def call() -> tuple[Tensor, Tensor]:
        hidden.grad = head.weight.grad = None  # each call's gradients are fresh
        logprobs, entropy = fn(hidden, head, targets, with_entropy=True, chunk_tokens=args.chunk_tokens)
        logprobs.backward(upstream)
        return logprobs, entropy

    # An untimed call first: one-time costs (kernels paged in on first use, BLAS buffers, tens
    # of MB) belong to neither method, and its buffers are unmapped when freed (see run_child).
    call()
    hidden.grad = head.weight.grad = None  # the timed calls' gradients count, not this one's
    baseline = current_rss_mib()
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        logprobs, entropy = call()
        seconds.append(time.perf_counter() - start)
    # Sums that the other process's results must match, to show both computed the same thing.
    checks = {"logprobs": logprobs.sum().item(), "entropy": entropy.sum().item()}
    checks["hidden_grad"] = hidden.grad.norm().item()
    if head.weight.grad is not None:
        checks["weight_grad"] = head.weight.grad.norm().item()
    return {"peak_mib": peak_rss_mib() - baseline, "seconds": statistics.median(seconds), "checks": checks}


def run_child(args: argparse.Namespace, index: int, method: str) -> dict[str, Any]:
    """``measure`` in a fresh interpreter; its result comes back as the last line of stdout."""
    flags = [f"--threads={args.threads}", f"--chunk-tokens={args.chunk_tokens}", f"--repeats={args.repeats}"]
    flags += ["--quick"] if args.quick else []
    done = subprocess.run(
        [sys.executable, __file__, *flags, f"--child={index}:{method}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        # glibc's default threshold, fixed: freed buffers over 128 KiB go back to the OS at once
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def disagreement(naive: dict[str, float], chunked: dict[str, float]) -> float:
    """Largest relative difference between the two processes' check sums."""
    return max(abs(chunked[k] - naive[k]) / max(abs(naive[k]), 1e-12) for k in naive)


def report(args: argparse.Namespace, cases: tuple[Case, ...], results: list[dict[str, Any]]) -> None:
    from rlbench.config import cpu_summary  # here: the measured children ran without this import

    batch, tokens = SHAPE
    print(cpu_summary())  # every figure below was measured on this CPU's kernels
    print(
        f"log-probs + entropy, forward + backward: B={batch} T={tokens} fp32 CPU, threads={args.threads}, "
        f"chunk_tokens={args.chunk_tokens}, median of {args.repeats}; peak = RSS high-water mark "
        f"above the inputs"
    )
    if args.quick:
        print("--quick: a smoke check at small shapes; the targets are for the full shapes")
    print(f"targets: chunked peak <= {MEMORY_TARGET:g} x naive, chunked time <= {TIME_TARGET:g} x naive")
    header = (
        f"{'case':<22}{'V':>8}{'H':>6}{'naive MB':>11}{'chunked MB':>12}{'ratio':>7}"
        f"{'naive s':>10}{'chunked s':>11}{'ratio':>7}{'max rel diff':>14}  targets"
    )
    print(header)
    for case, result in zip(cases, results):
        naive, chunked = result["naive"], result["chunked"]
        memory_ratio = chunked["peak_mib"] / max(naive["peak_mib"], 1e-9)
        time_ratio = chunked["seconds"] / naive["seconds"]
        met = memory_ratio <= MEMORY_TARGET and time_ratio <= TIME_TARGET
        print(
            f"{case.name:<22}{case.vocab:>8}{case.hidden:>6}{naive['peak_mib']:>11.0f}"
            f"{chunked['peak_mib']:>12.0f}{memory_ratio:>7.2f}{naive['seconds']:>10.3f}"
            f"{chunked['seconds']:>11.3f}{time_ratio:>7.2f}"
            f"{disagreement(naive['checks'], chunked['checks']):>14.1e}  {'met' if met else 'missed'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small V and H, a smoke check in ~20 s")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in each measured process")
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="token_logprobs' chunk_tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case and function")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # "CASE_INDEX:METHOD", a measured process
    args = parser.parse_args()
    if args.threads < 1 or args.chunk_tokens < 1 or args.repeats < 1:
        parser.error("--threads, --chunk-tokens and --repeats must each be >= 1")
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.child:
        index, method = args.child.split(":")
        print(json.dumps(measure(args, cases[int(index)], method)))
        return
    results = [{method: run_child(args, i, method) for method in METHODS} for i in range(len(cases))]
    report(args, cases, results)


if __name__ == "__main__":
    main()
