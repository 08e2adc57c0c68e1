#!/usr/bin/env bash
# The GPU checks recorded in docs/gpu.md, in one go, on one CUDA GPU:
#
#   bash benchmarks/gpu_checks.sh [LOG_DIR [CHECK ...]]   # logs in LOG_DIR (default gpu-checks/)
#
# Runs and caches go to $WORK_DIR (default /tmp/rlbench-gpu-checks), so LOG_DIR holds only
# the few log files.
#
# - cli_bf16: the real CLI end to end on CUDA in bf16-mixed: warm start, GRPO, eval, checkpoints;
# - qwen_bf16: GRPO, PPO, RLOO and DPO on a Qwen2.5-0.5B-shaped model (random weights, built
#   from its published config: nothing is downloaded), bf16-mixed: seconds per step, peak memory;
# - qwen_fp32, qwen_bf16_true, qwen_lora: the same model in fp32, in bf16-true (bf16 weights),
#   and with LoRA r=16 (bf16-mixed; the reference is the policy with adapters off);
# - fsdp_refused: trainer.strategy=fsdp fails at load time with its reason (docs/gpu.md).
# CHECK names pick some of them (default: all).
# Each check runs in its own process under a time limit, and a failure does not stop the
# others. Needs torch with CUDA, lightning, transformers; rlbench is installed without deps.
set -u
out=${1:-gpu-checks}
work=${WORK_DIR:-/tmp/rlbench-gpu-checks}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1 ||
    echo "pip install -e . failed: see $out/install.txt"

python3 - <<'EOF' 2>&1 | tee "$out/env.txt"
import lightning, torch, transformers
print(f"date {__import__('datetime').date.today()}; torch {torch.__version__}; "
      f"lightning {lightning.__version__}; transformers {transformers.__version__}")
print(f"cuda {torch.version.cuda}; device {torch.cuda.get_device_name(0)}; "
      f"bf16 {torch.cuda.is_bf16_supported()}")
EOF

checks=("${@:2}")
run() {  # name, seconds, command...
    local name=$1 seconds=$2
    shift 2
    if ((${#checks[@]})) && [[ ! " ${checks[*]} " =~ " $name " ]]; then return; fi
    echo "=== $name: $*" | tee "$out/$name.txt"
    local started=$SECONDS
    timeout "$seconds" "$@" >>"$out/$name.txt" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$out/$name.txt"
    grep -v -i "warn" "$out/$name.txt" | tail -n 25
}

run cli_bf16 120 rlbench train --config configs/grpo_addition.yaml \
    output_dir="$work/cli_run" warmstart.cache_dir="$work/cache" logging.mlflow=false \
    trainer.accelerator=gpu trainer.devices=1 trainer.precision=bf16-mixed \
    trainer.max_steps=40 trainer.checkpoint_every=20 eval.every_n_steps=20

run qwen_bf16 270 python3 benchmarks/algorithm_step.py --shape qwen2.5-0.5b \
    --accelerator gpu --precision bf16-mixed --steps 5

qwen=(python3 benchmarks/algorithm_step.py --shape qwen2.5-0.5b --accelerator gpu --steps 5)
run qwen_fp32 150 "${qwen[@]}" --precision 32-true --algorithms grpo
run qwen_bf16_true 150 "${qwen[@]}" --precision bf16-true --set model.dtype=bfloat16 --algorithms grpo
run qwen_lora 200 "${qwen[@]}" --precision bf16-mixed --set model.lora.r=16 --algorithms grpo,dpo

run fsdp_refused 60 rlbench train --config configs/grpo_addition.yaml output_dir="$work/fsdp" \
    logging.mlflow=false trainer.accelerator=gpu trainer.strategy=fsdp

cp "$work"/cli_run/summary.json "$out/cli_summary.json" 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$out/env.txt" 2>&1
