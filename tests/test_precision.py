"""``trainer.precision: auto``: bf16 only where the device has it natively, resolved once and
recorded; and the progress bars of evaluation and the GGUF conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import rlbench.config
from rlbench.config import (
    AUTO_PRECISION_ENV,
    TrainerConfig,
    accelerator_device,
    load_config,
    resolve_precision,
    with_resolved_precision,
)
from rlbench.errors import ConfigError

ROOT = Path(__file__).parents[1]
EXPLICIT = ["32-true", "bf16-mixed", "bf16-true", "16-mixed"]
OVERRIDES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Sets what the CPU probes report: ``cpu(avx512_bf16=..., amx=..., capability=...)``.
    The suite's pin of ``auto`` and the kernel overrides are cleared, so the probes decide."""
    monkeypatch.delenv(AUTO_PRECISION_ENV, raising=False)
    for name in OVERRIDES:
        monkeypatch.delenv(name, raising=False)

    def set_cpu(avx512_bf16: bool = False, amx: bool = False, capability: str = "AVX512") -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)

    return set_cpu


def no_probe(*_: object, **__: object) -> bool:
    raise AssertionError("the device was probed")


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("precision", EXPLICIT)
def test_an_explicit_precision_is_kept_without_probing_the_device(
    precision: str, device: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(AUTO_PRECISION_ENV, "bf16-true")  # pins auto only, never an explicit value
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", no_probe)
    monkeypatch.setattr(torch.cuda, "is_available", no_probe)
    assert resolve_precision(precision, device) == (precision, "set by trainer.precision")


def test_auto_is_the_default_and_every_explicit_precision_is_allowed():
    assert TrainerConfig().precision == "auto"
    for precision in [*EXPLICIT, "auto"]:
        assert load_config(None, [f"trainer.precision={precision}"]).trainer.precision == precision


@pytest.mark.parametrize(
    "avx512_bf16, amx, named", [(True, False, "AVX512-BF16"), (False, True, "AMX"), (True, True, "AMX")]
)
def test_auto_picks_bf16_mixed_on_a_cpu_with_native_bf16(cpu: Any, avx512_bf16: bool, amx: bool, named: str):
    cpu(avx512_bf16=avx512_bf16, amx=amx)
    precision, why = resolve_precision("auto", "cpu")
    assert precision == "bf16-mixed"
    assert why.startswith("auto: ") and named in why


def test_auto_keeps_fp32_on_an_avx512_cpu_without_bf16(cpu: Any):
    # get_cpu_capability says AVX512 with or without bf16: it alone would have chosen bf16 here
    cpu(avx512_bf16=False, amx=False, capability="AVX512")
    precision, why = resolve_precision("auto", "cpu")
    assert precision == "32-true"
    assert "no AVX512-BF16 or AMX" in why


def test_auto_keeps_fp32_on_an_avx2_cpu(cpu: Any):
    cpu(avx512_bf16=False, amx=False, capability="AVX2")
    assert resolve_precision("auto", "cpu")[0] == "32-true"


def test_auto_keeps_fp32_when_torch_runs_kernels_without_bf16(cpu: Any):
    cpu(avx512_bf16=True, capability="AVX2")  # the instructions exist, torch's kernels do not use them
    assert resolve_precision("auto", "cpu") == (
        "32-true",
        "auto: torch runs AVX2 kernels here, without bf16 ones",
    )


@pytest.mark.parametrize(
    "variable, value",
    [("ATEN_CPU_CAPABILITY", "avx2"), ("ATEN_CPU_CAPABILITY", "default"), ("ONEDNN_MAX_CPU_ISA", "AVX2"),
     ("ONEDNN_MAX_CPU_ISA", "avx512_core"), ("DNNL_MAX_CPU_ISA", "AVX2")],
)  # fmt: skip
def test_kernels_forced_below_bf16_count_as_no_native_bf16(
    cpu: Any, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
):
    cpu(avx512_bf16=True, amx=True)  # the hardware has it; the environment asked for kernels without
    monkeypatch.setenv(variable, value)
    precision, why = resolve_precision("auto", "cpu")
    assert precision == "32-true"
    assert f"{variable}={value}" in why


@pytest.mark.parametrize(
    "variable, value", [("ATEN_CPU_CAPABILITY", "avx512"), ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")]
)
def test_kernel_settings_that_keep_bf16_keep_it(
    cpu: Any, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
):
    cpu(avx512_bf16=True)
    monkeypatch.setenv(variable, value)
    assert resolve_precision("auto", "cpu")[0] == "bf16-mixed"


@pytest.mark.parametrize("flags, expected", [("fpu avx2 avx512f avx512_bf16", "bf16-mixed"),
                                             ("fpu avx2 amx_tile amx_bf16", "bf16-mixed"),
                                             ("fpu avx2 avx512f", "32-true")])  # fmt: skip
def test_without_torchs_probes_cpuinfo_flags_decide(
    cpu: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flags: str, expected: str
):
    cpu()
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(rlbench.config, "_CPUINFO", cpuinfo)
    assert resolve_precision("auto", "cpu")[0] == expected


def fake_gpu(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.delenv(AUTO_PRECISION_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA TEST")
    # torch's default counts emulation (True on a V100 too): only native support may choose bf16
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation
    )


def test_auto_picks_bf16_mixed_on_a_gpu_with_native_bf16(monkeypatch: pytest.MonkeyPatch):
    fake_gpu(monkeypatch, native=True)
    assert resolve_precision("auto", "cuda") == ("bf16-mixed", "auto: NVIDIA TEST has native bf16")


def test_auto_keeps_fp32_on_a_gpu_that_only_emulates_bf16(monkeypatch: pytest.MonkeyPatch):
    fake_gpu(monkeypatch, native=False)
    precision, why = resolve_precision("auto", "cuda")
    assert precision == "32-true" and "no native bf16" in why


def test_auto_keeps_fp32_where_nothing_can_be_checked(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(AUTO_PRECISION_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "cuda")[0] == "32-true"  # a GPU config checked on a login node
    assert resolve_precision("auto", "mps")[0] == "32-true"


def test_the_environment_pins_what_auto_means(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", no_probe)
    monkeypatch.setenv(AUTO_PRECISION_ENV, "bf16-true")
    assert resolve_precision("auto", "cpu") == (
        "bf16-true",
        f"auto, pinned by {AUTO_PRECISION_ENV}=bf16-true",
    )
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp8")
    with pytest.raises(
        ConfigError, match=f"{AUTO_PRECISION_ENV}='fp8' is invalid: one of '32-true', 'bf16-mixed'"
    ):
        resolve_precision("auto", "cpu")


def test_accelerator_names_map_to_device_types(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert [accelerator_device(a) for a in ("cpu", "auto", "gpu", "cuda", "tpu")] == [
        "cpu", "cpu", "cuda", "cuda", "tpu"
    ]  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert accelerator_device("auto") == "cuda"


def test_the_resolved_config_is_a_copy_with_the_choice_and_a_line_saying_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(AUTO_PRECISION_ENV, "bf16-mixed")
    config = load_config(None, ["trainer.accelerator=cpu"])
    resolved, line = with_resolved_precision(config)
    assert config.trainer.precision == "auto"  # the caller's config is left as it was
    assert resolved.trainer.precision == "bf16-mixed"
    assert resolved.flat()["trainer.precision"] == "bf16-mixed"  # what MLflow logs as a param
    assert line == f"precision: bf16-mixed (auto, pinned by {AUTO_PRECISION_ENV}=bf16-mixed)"


def test_shipped_configs_pin_fp32_and_the_cpu_example_uses_auto():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert load_config(path).trainer.precision == "32-true", path.name
    assert load_config(ROOT / "examples" / "smollm2_addition.yaml").trainer.precision == "auto"
    for name in ("gpu_1x_qwen2.5-0.5b.yaml", "gpu_8x_qwen2.5-1.5b.yaml"):  # bf16 GPUs' recipes, as measured
        assert load_config(ROOT / "examples" / name).trainer.precision == "bf16-mixed", name


def test_the_tiny_test_config_is_pinned_to_fp32(make_config: Any):
    assert make_config().trainer.precision == "32-true"


def test_the_warm_start_is_cached_per_resolved_precision(make_config: Any, monkeypatch: pytest.MonkeyPatch):
    from rlbench.warmstart import warmstart_dir

    fp32, bf16 = warmstart_dir(make_config()), warmstart_dir(make_config("trainer.precision=bf16-mixed"))
    assert fp32 != bf16  # weights trained in either precision are not interchangeable
    monkeypatch.setenv(AUTO_PRECISION_ENV, "bf16-mixed")
    assert warmstart_dir(make_config("trainer.precision=auto")) == bf16  # auto is keyed by its choice


def test_the_dry_run_resolves_auto_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from rlbench.dryrun import dry_run

    overrides = [f"output_dir={tmp_path / 'run'}", "model.name_or_path=tiny-llama", "trainer.accelerator=cpu"]
    fp32 = dry_run(load_config(None, [*overrides, "trainer.precision=32-true"]))
    monkeypatch.setenv(AUTO_PRECISION_ENV, "bf16-mixed")
    auto = dry_run(load_config(None, [*overrides, "trainer.precision=auto"]))
    assert auto.precision == "bf16-mixed"
    assert any("trainer.precision is 'auto': precision: bf16-mixed" in note for note in auto.notes)
    assert auto.memory.kv_cache * 2 == fp32.memory.kv_cache  # estimated with bf16's 2-byte activations
    assert not any("auto" in note for note in fp32.notes)


def test_a_run_records_the_precision_auto_chose(make_config: Any, capsys: pytest.CaptureFixture[str]):
    from rlbench.run import train

    config = make_config(
        "trainer.precision=auto", "trainer.max_steps=1", "logging.mlflow=false", "eval.num_prompts=4"
    )
    train(config, progress_bar=False)
    saved = yaml.safe_load((Path(config.output_dir) / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == "32-true"  # the suite pins auto (conftest)
    assert f"precision: 32-true (auto, pinned by {AUTO_PRECISION_ENV}=32-true)" in capsys.readouterr().out


# ---------------------------------------------------------------- progress


class RecordingBar:
    """A stand-in for an enabled ``Counted``: records its updates."""

    def __init__(self) -> None:
        self.bar = object()  # "on"
        self.updates: list[int] = []

    def update(self, n: int = 1) -> None:
        self.updates.append(n)


def test_the_eval_bar_moves_during_a_batch_and_ends_at_its_size():
    from rlbench.evaluation import advancing

    model, bar = nn.Linear(2, 2), RecordingBar()
    with advancing(bar, model, prompts=10, max_new_tokens=4):  # type: ignore[arg-type]
        for calls in range(1, 5):  # a prefill, then one call per new token
            model(torch.zeros(1, 2))
            assert 0 < sum(bar.updates) < 10, calls  # moving, not done before it is scored
    # 10 x 1/4, 2/4, 3/4 = 2, 5, 7; the last call is capped at 9 until the batch returns
    assert bar.updates == [2, 3, 2, 2, 1] and sum(bar.updates) == 10
    assert not model._forward_hooks  # nothing left hooked on the policy


def test_a_batch_that_stops_early_jumps_to_its_end():
    from rlbench.evaluation import advancing

    model, bar = nn.Linear(2, 2), RecordingBar()
    with advancing(bar, model, prompts=8, max_new_tokens=16):  # type: ignore[arg-type]
        model(torch.zeros(1, 2))  # every row at EOS after the prefill's token
    assert sum(bar.updates) == 8


def test_nothing_is_hooked_when_the_bar_is_off():
    from rlbench.evaluation import advancing
    from rlbench.progress import counted

    model = nn.Linear(2, 2)
    with counted(5, "eval", enabled=False) as bar, advancing(bar, model, 5, 4):
        assert not model._forward_hooks


@pytest.mark.parametrize("rank, progress, enabled", [(0, None, None), (1, None, False), (0, False, False)])
def test_only_rank_0_shows_the_eval_bar_and_no_progress_turns_it_off(
    monkeypatch: pytest.MonkeyPatch, rank: int, progress: bool | None, enabled: bool | None
):
    import rlbench.evaluation as evaluation
    from rlbench.rollout import SamplingParams

    asked: list[tuple[int, str, bool | None]] = []
    real = evaluation.counted

    def recording(total: int, desc: str, enabled: bool | None = None) -> Any:
        asked.append((total, desc, enabled))
        return real(total, desc, False)

    class TwoProcesses:
        world_size = 2

        def sum(self, value: float) -> float:
            return 2 * value

    monkeypatch.setattr(evaluation, "counted", recording)
    monkeypatch.setattr(evaluation, "greedy_correct", lambda *args, **kwargs: 1)
    prompts = [object()] * 6
    params = SamplingParams(4, 0.0)
    evaluator = evaluation.Evaluator(None, None, None, prompts, params, 1, 0, TwoProcesses(), progress)  # type: ignore[arg-type]
    assert evaluator.metrics(nn.Linear(1, 1), step=4, rank=rank) == {"eval/accuracy": 2 / 6}
    assert asked == [(3, "eval at step 4 (greedy, rank 0's 3 of 6 prompts)", enabled)]


def test_the_gguf_conversion_counts_its_stages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import transformers

    import rlbench.pretrained as pretrained

    bars: list[RecordingBar] = []

    class Bar(RecordingBar):
        def __init__(self, total: int, desc: str, enabled: bool | None) -> None:
            super().__init__()
            self.total, self.desc, self.enabled = total, desc, enabled
            bars.append(self)

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    class Saves:
        def save_pretrained(self, directory: Path) -> None:
            assert sum(bars[0].updates) == 3  # tokenizer, weights and the plain copy are done
            (directory / type(self).__name__).touch()

    monkeypatch.setattr(pretrained, "counted", Bar)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Saves())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(pretrained, "plain_copy", lambda model: Saves())
    pretrained.convert_gguf(tmp_path / "model.gguf", tmp_path)
    (bar,) = bars
    assert bar.total == len(pretrained.CONVERSION_STAGES) == sum(bar.updates)
    assert bar.enabled is None and "model.gguf" in bar.desc  # on a terminal only


@pytest.mark.parametrize("terminal", [True, False])
def test_eval_bars_during_training_are_rows_of_lightnings_live_display(terminal: bool):
    """Lightning's rich bar owns the terminal while it trains (a bar of our own would never
    show): eval's bar is a counted row of that display there, and nothing on a log file."""
    import io

    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.callbacks.progress.rich_progress import CustomProgress
    from rich.console import Console

    from rlbench.run import LiveRow, bars_beside

    callback = RichProgressBar()  # its display, as on_train_start makes it (not started: nothing drawn)
    callback.progress = CustomProgress(console=Console(file=io.StringIO(), force_terminal=terminal))

    class Trainer:
        progress_bar_callback = callback

    make = bars_beside(Trainer())
    with make(10, "eval at step 3 (greedy)", None) as bar:
        if not terminal:
            assert bar.bar is None  # off: the Counted helper's quiet bar
            return
        assert isinstance(bar, LiveRow)
        (task,) = callback.progress.tasks
        assert (task.description, task.total) == ("eval at step 3 (greedy)", 10)
        bar.update(4)
        assert task.completed == 4
    assert not callback.progress.tasks  # the row goes when the eval ends
    assert make(10, "eval", False).bar is None  # --no-progress, or a rank other than 0


def test_eval_bars_without_a_live_display_are_the_shared_helpers():
    from rlbench.progress import Counted
    from rlbench.run import bars_beside

    class Trainer:
        progress_bar_callback = None  # progress_bar=False, or before Lightning's bar starts

    bar = bars_beside(Trainer())(5, "eval", None)
    assert isinstance(bar, Counted) and bar.bar is None  # pytest's stderr is no terminal: quiet
