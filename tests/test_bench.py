"""scripts/bench.py: both loops run, in one process, and compute the same steps.

No assertion on speed: the figures depend on the machine and whatever else runs on it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

BENCH_PATH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
# The debug model, narrower and shallower, on short sequences: seconds per run even on a busy machine.
SMALL = [
    "model.dim=64",
    "model.n_layers=2",
    "model.ffn_dim=192",
    "data.global_batch_size=8",
    "data.micro_batch_size=4",
    "data.seq_len=64",
]


def load_bench():
    if "curry_bench" in sys.modules:
        return sys.modules["curry_bench"]
    spec = importlib.util.spec_from_file_location("curry_bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["curry_bench"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_bench_runs_both_loops_on_the_same_steps():
    bench = load_bench()
    steps, warmup, repeats = 2, 1, 2  # two repeats: curry-train's Trainer runs twice in this process
    result = bench.bench(SMALL, steps=steps, warmup=warmup, repeats=repeats, loggers="csv")

    assert result.tokens_per_step == 8 * 64
    assert [(run.repeat, run.loop) for run in result.runs] == [(r, loop) for r in range(repeats) for loop in ("hand", "curry")]
    for run in result.runs:
        assert len(run.step_ends) == len(run.losses) == warmup + steps
        assert run.timed_steps == steps
        assert all(b > a for a, b in zip(run.step_ends, run.step_ends[1:]))
        assert math.isfinite(run.tokens_per_s) and run.tokens_per_s > 0
        assert math.isfinite(run.ms_per_step) and run.ms_per_step > 0
    hand, curry = result.tokens_per_s("hand"), result.tokens_per_s("curry")
    assert math.isfinite(hand) and hand > 0 and math.isfinite(curry) and curry > 0
    assert result.ratio == pytest.approx(curry / hand, rel=1e-12)

    # Apples to apples: the hand loop reproduces curry-train's loss at every step, in every repeat.
    reference = result.losses("curry", 0)
    assert all(math.isfinite(x) for x in reference) and reference[-1] < reference[0]
    for run in result.runs:
        for step, (loss, ref) in enumerate(zip(run.losses, reference, strict=True)):
            assert abs(loss - ref) <= 1e-5 * abs(ref), f"{run.loop} repeat {run.repeat} step {step}: {loss} vs {ref}"
    assert result.max_loss_rel_diff <= 1e-5

    figures = json.loads(json.dumps(result.to_dict()))
    assert figures["ratio"] == pytest.approx(figures["curry_tokens_per_s"] / figures["hand_tokens_per_s"])
    assert len(figures["runs"]) == 2 * repeats
    table = result.table()
    assert "ratio curry/hand" in table and "hand" in table and "curry" in table
    assert not dist.is_initialized()  # the strategy's one-process group was torn down


def test_bench_rejects_bad_arguments(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--warmup", "0"])
    assert exit_info.value.code == 2
    assert bench.main(["trainer.devices=2"]) == 2
    assert "one device" in capsys.readouterr().err
