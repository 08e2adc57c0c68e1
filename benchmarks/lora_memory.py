"""Peak memory and step time of a short GRPO run: LoRA against a full fine-tune, same shape.

    python benchmarks/lora_memory.py                       # medium-llama, 3 steps, LoRA r=8
    python benchmarks/lora_memory.py --preset tiny-llama --steps 5 --rank 4

Default shape: preset ``medium-llama`` (33.6M parameters), 8 prompts x G = 8 completions,
8 new tokens, beta 0.04 (so a reference policy is needed), no warm start, MLflow off. Each
variant runs in a fresh Python process, so one's peak cannot hide the other's; an
"imports only" process gives the baseline that every process pays.

What the figures mean:

- ``peak RSS`` is the process's resident-set high-water mark (``getrusage ru_maxrss``), read
  at the end of the last training step, i.e. before the final checkpoint and model export
  (the LoRA export merges on a copy of the model, which would otherwise dominate the peak).
  It includes the Python/torch/Lightning baseline (hundreds of MiB, shown in the first row),
  so the ratio of the *extra* memory over that baseline is also printed. The full fine-tune's
  extra is roughly 4 copies of the weights (policy, frozen reference, AdamW's two moments)
  plus gradients and activations; LoRA's is one copy plus small adapter state, since its
  reference is the policy with the adapters disabled.
- On a GPU the figure that matters is the allocator's peak, ``torch.cuda.max_memory_allocated``,
  printed as ``peak CUDA MiB`` when the run uses CUDA (``--accelerator gpu``).
- ``median step s`` is the median of ``perf/step_s`` (rollout + reward + reference + update,
  evaluation excluded); the first step includes warm-up, so use more steps for timing.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

VARIANTS = ("imports", "full", "lora")


def run_overrides(args: argparse.Namespace, tmp: Path, variant: str) -> list[str]:
    overrides = [
        f"output_dir={tmp / variant}",
        f"warmstart.cache_dir={tmp / 'cache'}",
        "warmstart.enabled=false",
        f"model.name_or_path={args.preset}",
        "task.name=arithmetic",
        "algorithm.name=grpo",
        f"algorithm.grpo.group_size={args.group_size}",
        f"algorithm.grpo.beta={args.beta}",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.max_new_tokens={args.new_tokens}",
        f"trainer.max_steps={args.steps}",
        f"trainer.accelerator={args.accelerator}",
        f"trainer.num_threads={args.threads}",
        "trainer.checkpoint_every=100000",
        "eval.every_n_steps=100000",
        "eval.num_prompts=8",
        "logging.mlflow=false",
    ]
    if variant == "lora":
        overrides.append(f"model.lora.r={args.rank}")
    return overrides


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args: argparse.Namespace, tmp: Path, variant: str) -> dict[str, Any]:
    """Runs one variant in this process (a fresh one, started by ``main``)."""
    import lightning.pytorch as pl
    import torch

    from rlbench.config import load_config
    from rlbench.run import train

    if variant == "imports":
        import transformers  # noqa: F401  (what every run loads before its model)

        import rlbench.module  # noqa: F401

        return {"peak_rss_mib": peak_rss_mib()}

    class Probe(pl.Callback):
        """Step times, trainable parameters, and the memory peaks as of each step's end."""

        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.result: dict[str, Any] = {}

        def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            params = list(module.policy.parameters())
            self.result["trainable_params"] = sum(p.numel() for p in params if p.requires_grad)
            self.result["total_params"] = sum(p.numel() for p in params)

        def on_train_batch_end(
            self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, idx: int
        ) -> None:
            self.step_s.append(module.last_metrics["perf/step_s"])
            self.result["peak_rss_mib"] = peak_rss_mib()
            if module.device.type == "cuda":
                self.result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(module.device) / 2**20

    probe = Probe()
    config = load_config(None, run_overrides(args, tmp, variant))
    train(config, progress_bar=False, callbacks=[probe])
    return {**probe.result, "median_step_s": statistics.median(probe.step_s), "steps": len(probe.step_s)}


def run_variant(args: argparse.Namespace, tmp: Path, variant: str) -> dict[str, Any]:
    """``measure(variant)`` in a fresh interpreter; its result comes back as a JSON file."""
    result = tmp / f"{variant}.json"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("variant", "tmp")]
    subprocess.run(
        [sys.executable, __file__, *flags, f"--variant={variant}", f"--tmp={tmp}"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(result.read_text())


def build_preset(args: argparse.Namespace, tmp: Path) -> None:
    """Builds the preset once, outside the measured processes (building it costs memory too)."""
    from rlbench.config import load_config
    from rlbench.registry import TASKS
    from rlbench.run import quiet_libraries
    from rlbench.warmstart import base_model_path

    quiet_libraries()
    config = load_config(None, run_overrides(args, tmp, "full"))
    base_model_path(config, TASKS.get(config.task.name)(config.task.options))


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    from rlbench.config import cpu_summary  # here: the measured children ran without this import

    cuda = "peak_cuda_mib" in results["full"]
    print(cpu_summary())  # every figure below was measured on this CPU's kernels
    print(
        f"{args.preset}: {args.prompts} prompts x G={args.group_size}, {args.new_tokens} new tokens, "
        f"{args.steps} steps, beta {args.beta}, LoRA r={args.rank}, accelerator {args.accelerator}"
    )
    header = f"{'variant':<14}{'peak RSS MiB':>14}{'trainable params':>18}{'median step s':>15}"
    print(header + (f"{'peak CUDA MiB':>15}" if cuda else ""))
    for variant in VARIANTS:
        r = results[variant]
        name = "imports only" if variant == "imports" else variant
        params = f"{r['trainable_params']:,}" if "trainable_params" in r else "-"
        step = f"{r['median_step_s']:.3f}" if "median_step_s" in r else "-"
        line = f"{name:<14}{r['peak_rss_mib']:>14.0f}{params:>18}{step:>15}"
        print(line + (f"{r['peak_cuda_mib']:>15.0f}" if cuda and "peak_cuda_mib" in r else ""))
    full, lora, base = results["full"], results["lora"], results["imports"]["peak_rss_mib"]
    print(
        f"LoRA/full: peak RSS {lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}, "
        f"RSS above imports {(lora['peak_rss_mib'] - base) / (full['peak_rss_mib'] - base):.2f}, "
        f"trainable params {lora['trainable_params'] / full['trainable_params']:.4f}, "
        f"median step {lora['median_step_s'] / full['median_step_s']:.2f}"
        + (f", peak CUDA {lora['peak_cuda_mib'] / full['peak_cuda_mib']:.2f}" if cuda else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="medium-llama")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (attention projections)")
    parser.add_argument("--accelerator", default="cpu", help="cpu, or gpu to report CUDA memory")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        tmp = Path(args.tmp)
        (tmp / f"{args.variant}.json").write_text(json.dumps(measure(args, tmp, args.variant)))
        return
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        build_preset(args, tmp)
        results = {variant: run_variant(args, tmp, variant) for variant in VARIANTS}
    report(args, results)


if __name__ == "__main__":
    main()
