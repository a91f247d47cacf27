"""compile.enabled: torch.compile per block in every layout, compiled once; MFU against a measured peak; the
GPU check's dry mode."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import FAST, STEPS, assert_same_curve, read_metric, run_train

from curry_train.cli import gpu_check
from curry_train.config import ConfigError, compose
from curry_train.config.checks import check
from curry_train.validation.compile_bench import compile_bench
from curry_train.validation.peak_flops import matmul_flops
from curry_train.validation.throughput import bench

MATRIX = pytest.mark.matrix  # runs with --matrix


def test_gpu_check_without_a_gpu_lists_its_checks_and_exits_0(capsys):
    assert gpu_check.main([] if not torch.cuda.is_available() else ["--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in gpu_check.CHECKS:
        assert f"``{name}``" in out
    assert set(gpu_check.RUNNERS) == set(gpu_check.CHECKS)
    assert gpu_check.hardware_of("NVIDIA H200") == "h200" and gpu_check.hardware_of("NVIDIA H100 80GB HBM3") == (
        "h100_80gb"
    )


def test_matmul_probe_measures_the_device():
    """2 n^3 FLOPs over the fastest round: a CPU core does at least a GFLOP/s of fp32 matmul, and a product
    twice as wide takes longer (the probe times real work, not a constant)."""
    rate = matmul_flops(torch.device("cpu"), torch.float32, size=256, seconds=0.05)
    assert 1e9 < rate < 1e14


def test_bench_reports_mfu_against_the_measured_peak(capsys):
    result = bench([*FAST, "trainer.max_steps=3"], steps=1, warmup=1, repeats=1, loggers="none")
    assert result.measured_peak > 1e9 and result.flops_per_token > 0
    expected = result.tokens_per_s("curry") * result.flops_per_token / result.measured_peak
    assert result.mfu() == pytest.approx(expected) and 0 < result.mfu() < 1
    assert result.mfu("curry", result.table_peak) == pytest.approx(expected * result.measured_peak / result.table_peak)
    assert "of the measured fp32 matmul peak" in result.table()


@pytest.mark.slow
def test_compiled_loop_compiles_once_and_matches_eager():
    """The debug model compiled by inductor (C++ on this CPU): no graph compiled after the first step, and
    the per-step losses of eager within 1e-5 relative (inductor fuses and reorders fp32 sums)."""
    result = compile_bench([*FAST], steps=3, warmup=2, models=["debug"])
    compiled, eager = result.row("debug", "compiled"), result.row("debug", "eager")
    assert compiled.graphs > 0 and eager.graphs == 0, result.table()  # the counter sees compilation
    assert compiled.recompiles == 0, result.table()
    assert compiled.max_loss_rel_diff <= 1e-5, result.table()
    assert compiled.run.tokens_per_s > 0 and eager.run.tokens_per_s > 0
    assert "recompiles" in result.table()


def _curve(tmp_path, layout: list[str], backend: str) -> dict[int, float]:
    args = [*FAST, f"trainer.max_steps={STEPS}", *layout, "compile.enabled=true", f"compile.backend={backend}"]
    run_train([*args, "checkpoint.save_on_end=false", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    return read_metric(tmp_path)


# Each layout compiled against one eager process (the layouts match it to 1e-5 eagerly). aot_eager:
# dynamo's graphs and AOT autograd's joint graph run by eager kernels, composition with the layout's hooks
# and collectives; inductor: its fused C++ kernels, which reorder fp32 sums (measured: 1e-7).
RECOMPUTE = ["parallel=fsdp", "trainer.devices=2", "parallel.recompute=selective"]
SP = ["parallel=tp", "trainer.devices=2", "parallel.tp.sequence_parallel=true"]
CP = ["parallel=cp", "trainer.devices=2"]
ZERO1_RECOMPUTE = ["parallel=fsdp", "trainer.devices=2", "parallel.fsdp.sharding=optimizer", "parallel.recompute=full"]
THREE_D = ["parallel=fsdp+tp+pp", "trainer.devices=8", "data.micro_batch_size=2"]
CP4_DOUBLE_RING = ["parallel=cp", "trainer.devices=4", "parallel.cp.size=4", "parallel.cp.pattern=double_ring"]
LAYOUTS = [
    pytest.param(["parallel=fsdp", "trainer.devices=2"], "inductor", id="fsdp2-inductor"),
    pytest.param(CP, "aot_eager", id="cp2-ring-graph-break"),
    # DTensor linears, sequence-sharded norms and the vocabulary-parallel embedding and loss in the graphs
    pytest.param(SP, "aot_eager", id="tp2-sp-loss-parallel"),
    pytest.param(["parallel=tp", "trainer.devices=2"], "aot_eager", id="tp2", marks=MATRIX),
    pytest.param(["parallel=fsdp+tp", "trainer.devices=4"], "inductor", id="fsdp+tp-inductor", marks=MATRIX),
    pytest.param(["parallel=dp", "trainer.devices=2"], "aot_eager", id="ddp2", marks=MATRIX),
    pytest.param(RECOMPUTE, "inductor", id="fsdp2-selective-recompute-inductor", marks=MATRIX),
    # ZeRO-1 swaps each block's full parameters in around its compiled call
    pytest.param(ZERO1_RECOMPUTE[:-1], "aot_eager", id="zero1", marks=MATRIX),
    pytest.param(ZERO1_RECOMPUTE, "aot_eager", id="zero1-full-recompute"),
    *(
        pytest.param(
            ["parallel=fsdp", "trainer.devices=4", f"parallel.fsdp.sharding={mode}"], "aot_eager", id=mode, marks=MATRIX
        )
        for mode in ("shard_grad_op", "no_shard", "hybrid")
    ),
    pytest.param(["parallel=fsdp+pp", "trainer.devices=4"], "inductor", id="fsdp+pp-inductor", marks=MATRIX),
    # Each schedule; the zero-bubble kinds run each compiled backward in two passes (input, then weights).
    *(
        pytest.param(
            ["parallel=pp", "trainer.devices=2", f"parallel.pp.schedule={kind}"],
            "aot_eager",
            id=f"pp2-{kind}",
            marks=() if kind == "interleaved_zb" else MATRIX,
        )
        for kind in ("gpipe", "1F1B", "interleaved", "interleaved_zb", "zbv", "dualpipev")
    ),
    pytest.param([*CP, "parallel.cp.pattern=alltoall"], "aot_eager", id="cp2-alltoall", marks=MATRIX),
    pytest.param(THREE_D, "aot_eager", id="fsdp+tp+pp-2x2x2", marks=MATRIX),
    pytest.param(["parallel=fsdp+tp+pp+cp", "trainer.devices=8"], "aot_eager", id="fsdp+tp+pp+cp-8", marks=MATRIX),
    pytest.param(CP4_DOUBLE_RING, "aot_eager", id="cp4-double-ring", marks=MATRIX),
]


@pytest.mark.slow
@pytest.mark.parametrize("layout, backend", LAYOUTS)
def test_compiled_training_matches_eager_in_each_layout(tmp_path, single_process_curve, layout, backend):
    assert_same_curve(_curve(tmp_path, layout, backend), single_process_curve)


@pytest.mark.slow
@pytest.mark.matrix
def test_compiled_moe_under_expert_parallelism_matches_eager(tmp_path):
    """moe_debug under ep 2, compiled (graph breaks at the routing counts): the eager run's curve."""
    layout = ["model=moe_debug", "parallel=ep", "trainer.devices=2"]
    (tmp_path / "compiled").mkdir()
    compiled = _curve(tmp_path / "compiled", layout, "aot_eager")
    eager_dir = tmp_path / "eager"
    run_train([*FAST, f"trainer.max_steps={STEPS}", *layout, f"hydra.run.dir={eager_dir}"], cwd=tmp_path)
    assert_same_curve(compiled, read_metric(eager_dir))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["compile.backend=tvm"], "compile.backend='tvm': expected one of inductor"),
    ],
)
def test_bad_compile_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(compose(["compile.enabled=true", *overrides]))
