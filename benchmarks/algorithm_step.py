"""Seconds per step and per optimisation pass of GRPO, PPO, RLOO and DPO, side by side.

    python benchmarks/algorithm_step.py                      # tiny16 and medium, fp32
    python benchmarks/algorithm_step.py --shape tiny4 --steps 20
    python benchmarks/algorithm_step.py --shape all --precision bf16-mixed
    python benchmarks/algorithm_step.py --shape qwen2.5-0.5b --accelerator gpu --precision bf16-mixed

Shapes are ``grpo_step.py``'s (random-weight Llama presets, no warm start, 2-digit addition)
and ``qwen2.5-0.5b``: Qwen2.5-0.5B's published architecture (494M parameters, grouped-query
attention, tied embeddings, 151,936 vocabulary rows) with random weights, built from a config
by this script (nothing is downloaded). Its tokenizer is the char tokenizer padded with filler
tokens to Qwen's 151,665 real tokens, so sampling and log-probs run over a real vocabulary's
width; a random model's completions are filler, so they run to ``max_new_tokens``.

Every algorithm trains on the same batch of 64 rows per step: GRPO, RLOO and PPO sample 8
prompts x 8 completions (``group_size=8``; GRPO and RLOO beta 0.04, PPO its default
``kl_ctl`` and value head on the policy's trunk); DPO takes 32 preference pairs (64 rows)
from a pairs file this script writes. The pairs' completions are padded to
``rollout.max_new_tokens`` tokens (EOS included), the longest a sampled completion can be, so
DPO is not cheaper merely for scoring shorter sequences (``--dpo-length answer`` keeps the bare
answers). DPO's pairs and their reference log-probs are built in ``on_fit_start``, before the
first step, so they are not timed.

A *step* is timed from Lightning's batch start to batch end, as in ``grpo_step.py``. A *pass*
is ``RLModule.update`` (timed by wrapping it) divided by the algorithm's passes per batch (1 by
default for all four): everything after the experience is collected -- the frozen reference's
forward (GRPO, RLOO, PPO; DPO's reference log-probs are cached with the pairs), then forward +
backward + optimiser step over the whole batch. None makes a separate pi_old forward: pass 0's
own log-probs are pi_old (PPO also takes V_old from that forward, as the batch is one
micro-batch). Medians over
``--steps`` steps, after 2 warm-up steps (the first also evaluates); one more step runs the
final evaluation and is not counted. Targets of the issue: a PPO pass at most 1.2x a GRPO pass,
a DPO step at most 0.5x a GRPO step. Run with nothing else busy on the machine. On a GPU the
table adds each algorithm's peak GPU memory (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from grpo_step import SHAPES, TIMED, StepTimer  # benchmarks/ is on sys.path when this runs as a script

from rlbench.config import cpu_summary, load_config
from rlbench.policy import char_tokenizer
from rlbench.run import train
from tasks.arithmetic import Arithmetic

ALGORITHMS = ("grpo", "ppo", "rloo", "dpo")
#: Per algorithm: the options that make its batch 64 rows.
OPTIONS = {
    "grpo": ["algorithm.grpo.group_size=8", "algorithm.grpo.beta=0.04", "rollout.prompts_per_step=8"],
    "rloo": ["algorithm.rloo.group_size=8", "algorithm.rloo.beta=0.04", "rollout.prompts_per_step=8"],
    "ppo": ["algorithm.ppo.group_size=8", "rollout.prompts_per_step=8"],
    "dpo": ["rollout.prompts_per_step=32"],  # 32 pairs = 64 rows
}
WARMUP = 2
QWEN = "qwen2.5-0.5b"
#: Qwen2.5-0.5B's published config.json, less its token ids (the tokenizer's are used).
QWEN_SHAPE: dict[str, Any] = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
QWEN_REAL_TOKENS = 151665
ALL_SHAPES = {**SHAPES, QWEN: (QWEN, 16)}
PPO_PASS_TARGET, DPO_STEP_TARGET = 1.2, 0.5


class AlgorithmTimer(StepTimer):
    """``StepTimer``'s step and generation seconds, plus the seconds in ``RLModule.update``."""

    def __init__(self) -> None:
        super().__init__()
        self.updates: list[float] = []
        self.tokens_per_row: list[float] = []
        self.passes = 1

    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        self.passes = module.algorithm.passes_per_batch
        update: Callable[..., Any] = module.update

        def timed_update(batch: Any, first: Any) -> Any:
            started = time.perf_counter()
            out = update(batch, first)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.updates.append(time.perf_counter() - started)
            self.tokens_per_row.append(float(batch.completion_mask.sum()) / max(len(batch), 1))
            return out

        module.update = timed_update


def write_pairs(path: Path, count: int, length: int | None) -> None:
    """``count`` pairs of train prompts: the answer over answer + 1, each padded with ``0`` to
    ``length`` characters (one token each) unless ``length`` is None."""
    task = Arithmetic(Arithmetic.Config())
    with path.open("w") as f:
        for prompt in task.prompts("train", count, seed=0):
            chosen, rejected = prompt.answer, str(int(prompt.answer) + 1)
            if length is not None:
                chosen, rejected = chosen.ljust(length, "0"), rejected.ljust(length, "0")
            f.write(json.dumps({"prompt": prompt.text, "chosen": chosen, "rejected": rejected}) + "\n")


def qwen_shaped_model(directory: Path) -> Path:
    """A random-weight model of Qwen2.5-0.5B's shape, saved with a tokenizer of its width."""
    from tokenizers import models
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (directory / "config.json").is_file():
        return directory
    tokenizer = char_tokenizer(Arithmetic(Arithmetic.Config()).alphabet)
    core = tokenizer.backend_tokenizer
    vocab = core.get_vocab()
    for i in range(QWEN_REAL_TOKENS - len(vocab)):
        vocab[f"<filler{i}>"] = len(vocab)
    core.model = models.WordLevel(vocab, unk_token="<unk>")
    config = Qwen2Config(
        **QWEN_SHAPE,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def measure(
    algorithm: str,
    shape: str,
    precision: str,
    steps: int,
    tmp: Path,
    dpo_length: str,
    device: list[str],
) -> dict:
    preset, new_tokens = ALL_SHAPES[shape]
    if shape == QWEN:
        preset = str(qwen_shaped_model(tmp / QWEN))
    overrides = [
        f"output_dir={tmp}/{algorithm}",
        f"warmstart.cache_dir={tmp}/cache",  # shared: one preset (same weights) for all four
        "warmstart.enabled=false",
        f"model.name_or_path={preset}",
        "task.name=arithmetic",
        f"algorithm.name={algorithm}",
        *OPTIONS[algorithm],
        f"rollout.max_new_tokens={new_tokens}",
        f"trainer.max_steps={WARMUP + steps + 1}",
        f"trainer.precision={precision}",
        *TIMED,
        "optim.lr=1e-4",
        *device,
    ]
    if algorithm == "dpo":
        pairs = tmp / "pairs.jsonl"
        write_pairs(pairs, 64, new_tokens - 1 if dpo_length == "max" else None)  # + EOS
        overrides.append(f"algorithm.dpo.pairs_file={pairs}")
    timer = AlgorithmTimer()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train(load_config(None, overrides), progress_bar=False, callbacks=[timer])
    window = slice(WARMUP, WARMUP + steps)
    return {
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "step_s": statistics.median(timer.steps[window]),
        "gen_s": statistics.median(timer.rollouts[window]),
        "pass_s": statistics.median(timer.updates[window]) / timer.passes,
        "tokens_per_row": statistics.mean(timer.tokens_per_row[window]),
    }


def report(shape: str, results: dict[str, dict]) -> None:
    grpo = results["grpo"]
    print(f"\n{shape}")
    print(
        f"{'algorithm':<9} {'tokens/row':>10} {'step_s':>9} {'gen_s':>9} {'pass_s':>9} "
        f"{'step/grpo':>9} {'pass/grpo':>9} {'peak_gib':>9}"
    )
    for name, r in results.items():
        print(
            f"{name:<9} {r['tokens_per_row']:>10.1f} {r['step_s']:>9.4f} {r['gen_s']:>9.4f} "
            f"{r['pass_s']:>9.4f} {r['step_s'] / grpo['step_s']:>9.2f} {r['pass_s'] / grpo['pass_s']:>9.2f} "
            f"{r['peak_gib']:>9.2f}",
            flush=True,
        )
    if "ppo" in results:
        ppo = results["ppo"]["pass_s"] / grpo["pass_s"]
        print(f"{'PASS' if ppo <= PPO_PASS_TARGET else 'FAIL'}: ppo pass / grpo pass = {ppo:.2f} <= 1.2")
    if "dpo" in results:
        dpo = results["dpo"]["step_s"] / grpo["step_s"]
        print(f"{'PASS' if dpo <= DPO_STEP_TARGET else 'FAIL'}: dpo step / grpo step = {dpo:.2f} <= 0.5")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=[*ALL_SHAPES, "all"], help="default: tiny16 and medium")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per algorithm (after warm-up)")
    parser.add_argument(
        "--dpo-length",
        choices=["max", "answer"],
        default="max",
        help="DPO completions padded to max_new_tokens (default) or the bare answers",
    )
    parser.add_argument("--accelerator", default="cpu", help="trainer.accelerator (cpu, gpu, auto)")
    parser.add_argument("--strategy", default="auto", help="trainer.strategy (auto, ddp, fsdp, ...)")
    parser.add_argument(
        "--algorithms", default=",".join(ALGORITHMS), help="comma-separated, grpo first (the baseline)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run, e.g. --set model.lora.r=16 (repeatable)",
    )
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    algorithms = args.algorithms.split(",")
    if algorithms[0] != "grpo" or not set(algorithms) <= set(ALGORITHMS):
        parser.error(f"--algorithms: grpo first, then any of {', '.join(ALGORITHMS)}")
    device = [
        f"trainer.accelerator={args.accelerator}",
        "trainer.devices=1",
        f"trainer.strategy={args.strategy}",
        *args.set,
    ]
    shapes = {None: ["tiny16", "medium"], "all": list(SHAPES)}.get(args.shape, [args.shape])
    print(cpu_summary())  # every figure below was measured on this CPU's kernels
    print(
        f"rlbench algorithms side by side: 64 rows per step (8 prompts x 8 for grpo/ppo/rloo, "
        f"32 pairs for dpo), {args.precision}, threads={torch.get_num_threads()}, "
        f"medians of {args.steps} steps after {WARMUP} warm-up steps\n"
        f"step_s: whole step (batch start to end); gen_s: sampling (perf/rollout_s);\n"
        f"pass_s: RLModule.update / passes: reference forward (not dpo) + forward, backward and "
        f"optimiser step over the batch (pi_old, and ppo's V_old, come from pass 0's own forward)"
    )
    for shape in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            results = {
                name: measure(name, shape, args.precision, args.steps, Path(tmp), args.dpo_length, device)
                for name in algorithms
            }
        report(shape, results)


if __name__ == "__main__":
    main()
