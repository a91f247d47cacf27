"""compile.enabled: torch.compile per block in every layout, compiled once; MFU against a measured peak; the
GPU check's dry mode."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, read_metric, run_train

from curry_train.cli import gpu_check
from curry_train.validation.compile_bench import compile_bench
from curry_train.validation.peak_flops import matmul_flops
from curry_train.validation.throughput import bench

MATRIX = pytest.mark.matrix  # runs with --matrix
STEPS = 6


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
    assert compiled.recompiles == 0, result.table()
    assert compiled.max_loss_rel_diff <= 1e-5, result.table()
    assert compiled.run.tokens_per_s > 0 and eager.run.tokens_per_s > 0
    assert "recompiles" in result.table()


def _curve(tmp_path, name: str, layout: list[str], compiled: bool, backend: str) -> dict[int, float]:
    run_dir = tmp_path / f"{name}-{'compiled' if compiled else 'eager'}"
    args = [*FAST, f"trainer.max_steps={STEPS}", *layout, f"compile.enabled={compiled}", f"compile.backend={backend}"]
    run_train([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    return read_metric(run_dir)


# Each layout's compiled run against its own eager run. aot_eager: dynamo's graphs and AOT autograd's
# joint graph, run by eager kernels: composition with the layout's hooks, DTensors and collectives, to
# fp32 noise (1e-6). inductor: its fused C++ kernels reorder fp32 sums, 1e-4 over the steps.
TP_SP = ["parallel=tp", "trainer.devices=2", "parallel.tp.sequence_parallel=true"]
RECOMPUTE = ["parallel=fsdp", "trainer.devices=2", "parallel.recompute=full"]
LAYOUTS = [
    pytest.param("fsdp", ["parallel=fsdp", "trainer.devices=2"], "inductor", 1e-4, id="fsdp2-inductor"),
    pytest.param("dp", ["parallel=dp", "trainer.devices=2"], "aot_eager", 1e-6, id="ddp2"),
    pytest.param("tp-sp", TP_SP, "aot_eager", 1e-6, id="tp2-sp"),
    pytest.param("pp", ["parallel=pp", "trainer.devices=2"], "aot_eager", 1e-6, id="pp2"),
    pytest.param("cp", ["parallel=cp", "trainer.devices=2"], "aot_eager", 1e-6, id="cp2-ring-graph-break"),
    pytest.param("ep", ["model=moe_debug", "parallel=ep", "trainer.devices=2"], "aot_eager", 1e-6, marks=MATRIX),
    pytest.param("fsdp-recompute", RECOMPUTE, "inductor", 1e-4, id="fsdp2-recompute-inductor", marks=MATRIX),
    pytest.param("tp", ["parallel=tp", "trainer.devices=2"], "inductor", 1e-4, id="tp2-inductor", marks=MATRIX),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, layout, backend, rtol", LAYOUTS)
def test_compiled_training_matches_eager_in_each_layout(tmp_path, name, layout, backend, rtol):
    eager = _curve(tmp_path, name, layout, False, backend)
    compiled = _curve(tmp_path, name, layout, True, backend)
    assert sorted(compiled) == sorted(eager) == list(range(STEPS))
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=rtol), (step, compiled[step], loss)


def test_compile_rejects_an_unknown_backend(tmp_path):
    result = run_train(["compile.enabled=true", "compile.backend=tvm"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "compile.backend='tvm': expected one of inductor" in result.stderr
