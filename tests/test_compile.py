"""compile.enabled: compiled once, the eager losses; MFU against a measured peak; the GPU check's dry mode
(every layout compiled against one eager process: test_parity.py's compiled rows)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import FAST

from curry_train.cli import gpu_check
from curry_train.config import ConfigError, compose
from curry_train.config.checks import check
from curry_train.validation import gpu_checks
from curry_train.validation.compile_bench import compile_bench
from curry_train.validation.peak_flops import matmul_flops
from curry_train.validation.throughput import bench, model_flops_per_token


def test_gpu_check_without_a_gpu_lists_its_checks_and_exits_0(capsys):
    assert gpu_check.main([] if not torch.cuda.is_available() else ["--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in gpu_check.CHECKS:
        assert f"``{name}``" in out
    assert set(gpu_checks.RUNNERS) == set(gpu_check.CHECKS)
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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["compile.backend=tvm"], "compile.backend='tvm': expected one of inductor"),
    ],
)
def test_bad_compile_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(compose(["compile.enabled=true", *overrides]))


@pytest.mark.slow
def test_compile_bench_in_a_layout_of_two_ranks():
    """--compile --layout --repeats 2: the eager and compiled runs of a 2-rank layout in a worker pool, each
    mode twice, alternating (aot_eager: the compiler's graphs without inductor's compile time); every
    compiled run matches eager and compiles once; each mode's row is its median run."""
    layouts = {"dp 2": ("parallel=dp", "trainer.devices=2")}
    result = compile_bench(
        [*FAST, "compile.backend=aot_eager"], steps=2, warmup=2, models=["debug"], layouts=layouts, repeats=2
    )
    compiled, eager = result.row("debug, dp 2", "compiled"), result.row("debug, dp 2", "eager")
    assert compiled.graphs > 0 and eager.graphs == 0, result.table()
    assert compiled.recompiles == 0 and compiled.max_loss_rel_diff <= 1e-5, result.table()
    assert len(compiled.run.step_ends) == 4 and compiled.run.tokens_per_s > 0
    assert "debug, dp 2" in result.table()
    for row in (eager, compiled):  # the lower of two runs' tokens/s is the median reported
        assert len(row.runs_tokens_per_s) == 2 and row.run.tokens_per_s == min(row.runs_tokens_per_s)
    assert "2 runs a mode, alternating" in result.table() and result.to_dict()["config"]["repeats"] == 2
    # one matmul peak, probed before the runs, for every row's MFU (probed after each, it read low)
    flops = model_flops_per_token(compose([*FAST, "parallel=dp", "trainer.devices=2"]))
    for row in (eager, compiled):
        assert row.mfu == pytest.approx(row.run.tokens_per_s * flops / result.config["measured_peak"], rel=1e-9)


def test_the_graph_counter_counts_the_graphs_of_its_own_run():
    """A pool worker that ran a compiled run keeps dynamo's count: the next run's counter (``--repeats``
    runs eager after compiled in the same workers) starts from what was counted before it."""
    from curry_train.validation.compile_bench import GraphCounter  # noqa: PLC0415

    torch.compile(lambda x: x.sin() + 1, backend="eager")(torch.ones(3))  # a graph before the counter
    counter = GraphCounter()
    counter.on_train_batch_end(None)
    assert counter.at_end == 0 and counter.after_first == 0
    torch.compile(lambda x: x.cos() * 2, backend="eager")(torch.ones(3))
    counter.on_train_batch_end(None)
    assert counter.at_end == 1
