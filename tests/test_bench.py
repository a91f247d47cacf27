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
import torch
import torch.distributed as dist

from conftest import FAST

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


# ----------------------------------------------------------------------------------------------
# --layouts: dp, tp, tp with sequence parallelism and fsdp+tp on the same run


def tensor_parallel_oracle(overrides, tp: int) -> tuple[int, int, int, bool]:
    """From the parameters' shapes: P, the parameters one of ``tp`` ranks holds (everything split
    but the norms), the number of parameter tensors, and whether every split shape's first dimension
    divides by 2 again (FSDP over 2 ranks adds no padding)."""
    from curry_train.config import compose
    from curry_train.model import Llama

    with torch.device("meta"):
        named = list(Llama(compose(list(overrides)).model).named_parameters())
    P = sum(p.numel() for _, p in named)
    split, even = 0, True
    for name, p in named:
        if name.endswith("norm.weight"):
            split += p.numel()
            even &= p.shape[0] % 2 == 0
            continue
        assert p.numel() % tp == 0, name
        split += p.numel() // tp
        local_rows = p.shape[0] // tp if not name.endswith(("wo.weight", "w2.weight")) else p.shape[0]
        even &= local_rows % 2 == 0
    return P, split, len(named), even


@pytest.mark.timeout(420)
def test_bench_layouts_side_by_side(tmp_path, capsys):
    bench = load_bench()
    path = tmp_path / "layouts.json"
    assert bench.main(["--layouts", "--steps", "1", "--json", str(path), *FAST]) == 0
    table = capsys.readouterr().out
    for header in ("layout", "tokens/s", "params", "grads", "optimizer", "activations", "vs no SP"):
        assert header in table
    figures = json.loads(path.read_text())
    rows = {row["name"]: row for row in figures["rows"]}
    assert list(rows) == ["dp", "tp", "tp+sp", "fsdp+tp"]
    assert {name: (row["ranks"], row["dp"], row["tp"]) for name, row in rows.items()} == {
        "dp": (2, 2, 1), "tp": (2, 1, 2), "tp+sp": (2, 1, 2), "fsdp+tp": (4, 2, 2)}
    for row in rows.values():
        assert row["tokens_per_step"] == 16 * 64 and row["timed_steps"] == 1
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert row["activations"] > 0

    # Model state per rank, from the shapes: fp32 parameters and gradients, AdamW's two moments and
    # a 4-byte step counter per parameter tensor.
    P, P_tp, tensors, even = tensor_parallel_oracle(FAST, 2)
    assert P_tp < P and even

    def state(n: int) -> dict[str, int]:
        expected = {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n + 4 * tensors}
        return {**expected, "total": sum(expected.values())}

    expected = {"dp": state(P), "tp": state(P_tp), "tp+sp": state(P_tp), "fsdp+tp": state(P_tp // 2)}
    for name, row in rows.items():
        for record in row["memory"]["ranks"]:
            assert record["state"] == expected[name], (name, record["rank"])
    assert rows["tp"]["params"] < rows["dp"]["params"]
    # fsdp+tp: tp's state halved (no padding in these shapes), but for the step counters on every rank.
    assert rows["fsdp+tp"]["total"] - 4 * tensors == (rows["tp"]["total"] - 4 * tensors) // 2
    for name in ("tp", "tp+sp", "fsdp+tp"):
        assert rows[name]["memory"]["tp_parameters"] == P_tp

    # Sequence parallelism: the activations between blocks are sequence shards.
    tp_acts = {r["activations"] for r in rows["tp"]["memory"]["ranks"]}
    assert all(r["activations"] < min(tp_acts) for r in rows["tp+sp"]["memory"]["ranks"])
    assert rows["tp+sp"]["sp_activation_ratio"] == pytest.approx(rows["tp+sp"]["activations"] / rows["tp"]["activations"])
    assert 0 < rows["tp+sp"]["sp_activation_ratio"] < 1
    assert all(rows[name]["sp_activation_ratio"] is None for name in ("dp", "tp", "fsdp+tp"))
    assert not dist.is_initialized()


def test_bench_layouts_reject_bad_input(capsys):
    bench = load_bench()
    assert bench.parse_layout("tp4: parallel=tp parallel.tp.size=4 trainer.devices=4") == (
        "tp4", ("parallel=tp", "parallel.tp.size=4", "trainer.devices=4"))
    assert bench.parse_layout("parallel=dp trainer.devices=2") == (
        "parallel=dp trainer.devices=2", ("parallel=dp", "trainer.devices=2"))
    assert bench.main(["--layouts", "parallel=tp"]) == 2
    assert "each layout sets parallel, trainer.devices" in capsys.readouterr().err
    assert bench.main(["--layouts", "--layout", "empty:"]) == 2
    assert "expected 'NAME: overrides...'" in capsys.readouterr().err
    assert bench.main(["--layouts", "--layout", "a: parallel=tp trainer.devices=3"]) == 2  # 3 ranks, tp=2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--memory", "--layouts"])


# ----------------------------------------------------------------------------------------------
# --pipeline: every schedule kind's bubble, measured, next to its formula


@pytest.mark.timeout(300)
def test_bench_pipeline_bubbles_next_to_formulas(tmp_path, capsys):
    from curry_train.primitives.pipeline_schedule import KINDS

    bench = load_bench()
    path = tmp_path / "bubbles.json"
    # 4 blocks: P=2 ranks of one stage (2 blocks each) or of two (1 block each): equal stages.
    assert bench.main(["--pipeline", "--microbatches", "4", "--steps", "1", "--json", str(path), *FAST, "model.n_layers=4"]) == 0
    table = capsys.readouterr().out
    rows = json.loads(path.read_text())["rows"]
    assert [row["kind"] for row in rows] == list(KINDS)
    P, M = 2, 4
    for row in rows:
        assert (row["pp"], row["microbatches"]) == (P, M)
        v = row["virtual_stages"]
        assert row["layers_per_stage"] == [4 // (P * v)] * (P * v)
        if row["kind"] in ("gpipe", "1F1B"):
            assert v == 1 and row["formula"] == pytest.approx((P - 1) / (M + P - 1))
        elif row["kind"] == "interleaved":
            assert v == 2 and row["formula"] == pytest.approx((P - 1) / (v * M + P - 1))
        else:
            assert row["formula"] is None and row["formula_text"] == "~0"
        assert len(row["measured"]) == P and all(0 <= m < 1 for m in row["measured"])
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0 and row["step_ms"] > 0
    lines = {line.split()[0]: line for line in table.splitlines() if line.split() and line.split()[0] in KINDS}
    assert set(lines) == set(KINDS)
    assert "20.0%" in lines["gpipe"] and "20.0%" in lines["1F1B"] and "11.1%" in lines["interleaved"]
    assert all(" ~0 " in lines[kind] for kind in ("interleaved_zb", "zbv", "dualpipev"))


def test_bench_pipeline_rejects_bad_input(capsys):
    bench = load_bench()
    assert bench.main(["--pipeline", "--pp", "1"]) == 2
    assert "at least 2 ranks" in capsys.readouterr().err
    assert bench.main(["--pipeline", "--microbatches", "2"]) == 2  # V-shaped: 4 stages need 4 micro-batches
    assert "at least as many micro-batches as stages" in capsys.readouterr().err
    assert bench.main(["--pipeline", "model.n_layers=2"]) == 2
    assert "raise model.n_layers" in capsys.readouterr().err
    for bad in (["--kinds", "gpipe,pipedream"], ["--microbatches", "4,x"], ["--microbatches", "0"]):
        with pytest.raises(SystemExit):
            bench.main(["--pipeline", *bad])


@pytest.mark.timeout(300)
def test_bench_context_mode_memory_falls_with_cp(tmp_path, capsys):
    """Per-rank activation memory of context-parallel attention (measured by PyTorch's memory
    tracker, not by time) falls about linearly with cp: at cp=4 at most about a third of cp=1."""
    bench = load_bench()
    path = tmp_path / "context.json"
    assert bench.main(["--context", "--seq-len", "2048", "--cp", "1,2,4", "--steps", "1", "--json", str(path)]) == 0
    assert "exposed comm" in capsys.readouterr().out
    rows = {row["cp"]: row for row in json.loads(path.read_text())["rows"]}
    assert sorted(rows) == [1, 2, 4] and len(rows[4]["activations"]) == 4
    assert rows[2]["max_activations"] < 0.6 * rows[1]["max_activations"]
    assert rows[4]["max_activations"] <= 0.34 * rows[1]["max_activations"]
    assert all(0.0 <= share < 1.0 for row in rows.values() for share in row["exposed_comm"])
    assert bench.main(["--context", "--seq-len", "1020", "--cp", "4"]) == 2  # 1020 tokens do not split into 8 chunks
