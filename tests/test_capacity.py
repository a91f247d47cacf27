"""scripts/capacity_sweep.py: the largest family member or micro-batch that fits each layout.

Estimate mode is checked against ``advise.estimate`` called here on configs composed here (the
reported size fits, the next one up does not) and against bytes-per-parameter arithmetic; measure
mode runs real trials on the CPU with the debug family under a small memory cap, one of which runs
out of memory for real (an address-space limit), and the sweep goes on below it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from curry_train.cli import capacity as capacity_cli
from curry_train.config import compose
from curry_train.planning import capacity, families, trials
from curry_train.planning.advise import estimate
from curry_train.planning.layout import Layout, current_layout

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
H100 = 80 * GIB  # conf/hardware/h100_80gb.yaml
CAPACITY = int(H100 * 0.9)  # less advise's 10% headroom
STATE_BYTES_PER_PARAM = 16  # fp32 parameters and gradients, AdamW's two moments (autocast keeps fp32 state)


def load_sweep():
    return capacity_cli


def run_json(capsys, args):
    code = load_sweep().main([*args, "format=json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def closed_form_parameters(m, vocab: int, tied: bool = False) -> int:
    """Llama's parameters from its shapes: embedding and head, final norm, and per block the four
    attention projections (grouped K/V), SwiGLU's three matrices and two norms."""
    head_dim = m["dim"] // m["n_heads"]
    d, kv = m["dim"], m["n_kv_heads"] * head_dim
    block = 2 * d * d + 2 * d * kv + 3 * d * m["ffn_dim"] + 2 * d
    return vocab * d * (1 if tied else 2) + d + m["n_layers"] * block


def layout_and_cfg(base: list[str], row: dict) -> tuple:
    """The row's layout, composed here from its overrides, as train.py would run it."""
    cfg = compose([*base, *row["overrides"]])
    return cfg, current_layout(cfg)


def with_model(cfg, model: dict):
    cfg = cfg.copy()
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
        OmegaConf.update(cfg, f"model.{key}", model[key])
    return cfg


# ----------------------------------------------------------------------------------------------
# The family


def test_llama3_family_holds_the_published_shapes_and_grows():
    cfg = compose(["model=llama3_8b"])
    members = families.family("llama3", cfg)
    sizes = [m.parameters for m in members]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert all(b / a < 3.5 for a, b in zip(sizes, sizes[1:], strict=False))  # a ladder, not a jump
    for m in members:
        assert m.dim % m.n_heads == 0 and (m.dim // m.n_heads) % 2 == 0 and m.n_heads % m.n_kv_heads == 0
        assert m.parameters == closed_form_parameters(vars(m), 128256)
        assert m.name.endswith(families.params_text(m.parameters))
    for preset in ("llama3_8b", "llama3_70b", "llama3_405b"):
        shape = OmegaConf.load(ROOT / "conf" / "model" / f"{preset}.yaml")
        (member,) = [m for m in members if m.dim == shape.dim]
        assert member.preset == preset
        assert (member.n_layers, member.n_heads, member.n_kv_heads, member.ffn_dim) == (
            shape.n_layers,
            shape.n_heads,
            shape.n_kv_heads,
            shape.ffn_dim,
        )
    # Llama 3's SwiGLU widths follow from 8/3 x dim x 1.3, rounded up to 1024
    assert families.llama_ffn_dim(4096) == 14336 and families.llama_ffn_dim(8192) == 28672
    debug = compose([])  # the debug model is a member of the debug family
    assert any(
        (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim) == (128, 4, 4, 2, 384)
        for m in families.family("debug", debug)
    )


# ----------------------------------------------------------------------------------------------
# Estimate mode


BASE_1NODE = ["model=llama3_8b", "data.seq_len=2048", "data.micro_batch_size=1"]


@pytest.fixture(scope="module")
def dp_vs_fsdp():
    result = capacity.run_sweep(BASE_1NODE, layouts="dp;fsdp", mode="estimate")
    return result.to_dict()


def test_fsdp_fits_a_larger_member_than_dp_on_one_h100_node(dp_vs_fsdp):
    dp, fsdp = dp_vs_fsdp["rows"]
    assert dp_vs_fsdp["capacity_bytes"] == CAPACITY and dp["world"] == fsdp["world"] == 8
    dp_params = dp["largest"]["candidate"]["model"]["parameters"]
    fsdp_params = fsdp["largest"]["candidate"]["model"]["parameters"]
    # DDP holds 16 bytes per parameter on every rank: 8B is 128 GB, more than an 80 GiB device...
    assert STATE_BYTES_PER_PARAM * 8.0e9 > H100
    assert STATE_BYTES_PER_PARAM * dp_params <= CAPACITY and dp_params < 8.0e9
    # ... while a ~1B model (24 GB of state) fits with room for 2048-token activations
    assert dp_params >= 1.0e9
    # ZeRO-3 divides the state over the 8 ranks
    assert fsdp_params > dp_params
    assert STATE_BYTES_PER_PARAM * fsdp_params / 8 <= CAPACITY
    assert dp_vs_fsdp["recommended"]["candidate"]["model"]["parameters"] == fsdp_params
    assert dp_vs_fsdp["recommended"]["layout"] == "fsdp"


def test_reported_member_fits_by_its_own_estimate_and_the_next_does_not(dp_vs_fsdp):
    for row in dp_vs_fsdp["rows"]:
        cfg, layout = layout_and_cfg(BASE_1NODE, row)
        assert layout.mixed_precision == "bf16"  # the hardware's dtype, written into the overrides
        largest, nxt = row["largest"]["candidate"]["model"], row["next"]["candidate"]["model"]
        assert nxt["parameters"] > largest["parameters"]
        fits = estimate(with_model(cfg, largest), layout)
        assert fits.fits and fits.memory["total"] == row["largest"]["memory_bytes"] <= CAPACITY
        too_big = estimate(with_model(cfg, nxt), layout)
        assert not too_big.fits and too_big.memory["total"] > CAPACITY
        # the next member is the next one of the family: nothing in between was skipped
        params = [c["model"]["parameters"] for c in dp_vs_fsdp["candidates"]]
        assert params.index(nxt["parameters"]) == params.index(largest["parameters"]) + 1


def test_json_output_and_a_command_that_runs_the_recommendation(capsys):
    args = [*BASE_1NODE, "layouts=dp;fsdp fsdp.sharding=optimizer;fsdp recompute=full", "mode=estimate", "max=50B"]
    code, result, _ = run_json(capsys, args)
    assert code == 0
    assert {
        "sweep",
        "mode",
        "family",
        "hardware",
        "capacity_bytes",
        "headroom",
        "candidates",
        "rows",
        "recommended",
        "command",
    } <= result.keys()
    assert result["sweep"] == "model" and result["mode"] == "estimate" and result["family"] == "llama3"
    assert all(c["size"] <= 50e9 for c in result["candidates"])
    for row in result["rows"]:
        assert {"layout", "parallel", "label", "sizes", "largest", "next", "trials", "error"} <= row.keys()
        assert {"candidate", "status", "memory_bytes", "capacity_bytes", "reason"} <= row["largest"].keys()
        assert row["next"]["status"] == "too big" and "needs" in row["next"]["reason"]
    labels = [row["label"] for row in result["rows"]]
    assert labels == ["DDP x8", "ZeRO-1 x8", "ZeRO-3 x8 recompute=full"]
    rec = result["recommended"]
    largest = max(row["largest"]["candidate"]["size"] for row in result["rows"])
    assert rec["candidate"]["size"] == largest
    # the lightest layout among those that fit the largest size
    lightest = next(row for row in result["rows"] if row["largest"]["candidate"]["size"] == largest)
    assert rec["layout"] == lightest["layout"]
    # the command composes to that layout and that model
    command = result["command"]
    assert command == rec["command"] and command.startswith("python train.py ")
    cfg = compose(shlex.split(command)[2:])
    assert cfg.trainer.devices == 8 and cfg.data.seq_len == 2048
    model = rec["candidate"]["model"]
    assert {k: cfg.model[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")} == {
        k: model[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
    }
    _, layout = layout_and_cfg(BASE_1NODE, next(r for r in result["rows"] if r["layout"] == rec["layout"]))
    assert current_layout(cfg) == layout


def test_micro_batch_sweep_shards_buy_micro_batches(capsys):
    one_b = [
        "model.dim=2048",
        "model.n_layers=16",
        "model.n_heads=32",
        "model.n_kv_heads=8",
        "model.ffn_dim=8192",
        "model.vocab_size=128256",
        "data.seq_len=4096",
        "data.global_batch_size=64",
    ]
    code, result, _ = run_json(capsys, [*one_b, "sweep=micro_batch", "layouts=dp;fsdp", "mode=estimate"])
    assert code == 0 and result["family"] is None
    dp, fsdp = result["rows"]
    assert dp["largest"] is not None
    dp_mb, fsdp_mb = dp["largest"]["candidate"]["micro_batch_size"], fsdp["largest"]["candidate"]["micro_batch_size"]
    assert fsdp_mb >= dp_mb
    local = 64 // 8
    for row, mb in ((dp, dp_mb), (fsdp, fsdp_mb)):
        cfg, layout = layout_and_cfg(one_b, row)
        assert estimate(cfg, replace(layout, micro_batch_size=mb)).fits
        if 2 * mb <= local:
            assert row["next"]["candidate"]["micro_batch_size"] == 2 * mb
            assert not estimate(cfg, replace(layout, micro_batch_size=2 * mb)).fits
        else:
            assert row["next"] is None
    # memory grows with the micro-batch: a sweep over a shorter sequence fits at least as much
    _, shorter, _ = run_json(capsys, [*one_b, "data.seq_len=1024", "sweep=micro_batch", "layouts=dp", "mode=estimate"])
    assert shorter["rows"][0]["largest"]["candidate"]["micro_batch_size"] >= dp_mb
    assert f"data.micro_batch_size={result['recommended']['candidate']['micro_batch_size']}" in result["command"]


def test_the_target_goes_to_the_lightest_layout_that_fits_it(capsys):
    # every layout fits the 8.0B member, the largest below max=8.1B: ZeRO-1 is the lightest of them,
    # though listed second (recompute outweighs any ZeRO stage, ZeRO-3 outweighs ZeRO-1)
    layouts = "layouts=fsdp recompute=full;fsdp fsdp.sharding=optimizer;fsdp"
    code, result, _ = run_json(capsys, [*BASE_1NODE, layouts, "mode=estimate", "max=8.1B"])
    assert code == 0
    assert [row["largest"]["candidate"]["model"]["dim"] for row in result["rows"]] == [4096, 4096, 4096]
    assert all(row["next"] is None for row in result["rows"])
    assert result["recommended"]["layout"] == "fsdp fsdp.sharding=optimizer"
    assert "parallel.fsdp.sharding=optimizer" in result["command"] and "model=llama3_8b" in result["command"]
    order = [
        Layout(dp_replicate=8),
        Layout(dp_shard=8, zero="optimizer"),
        Layout(dp_shard=8, zero="shard_grad_op"),
        Layout(dp_shard=8, zero="full"),
        Layout(dp_shard=8, zero="full", recompute="selective"),
        Layout(dp_shard=8, zero="full", recompute="full"),
        Layout(dp_replicate=4, tp=2),
        Layout(dp_shard=2, tp=4),
        Layout(dp_shard=4, pp=2),
        Layout(dp_shard=4, cp=2),
    ]
    assert sorted(order, key=capacity.weight) == order


def test_text_table_names_each_layout_and_the_target(capsys):
    assert load_sweep().main([*BASE_1NODE, "layouts=dp;fsdp", "mode=estimate", "max=30B"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("capacity sweep (family llama3, by estimate) on 1 x 8 h100_80gb")
    assert lines[2].startswith("DDP x8") and lines[3].startswith("ZeRO-3 x8")
    assert "recommended target size:" in out and lines[-1].startswith("python train.py ")


def test_nothing_fits_exits_1(capsys):
    code, result, _ = run_json(capsys, ["model=llama3_70b", "sweep=micro_batch", "layouts=dp", "mode=estimate"])
    assert code == 1 and result["recommended"] is None and result["command"] is None
    assert result["rows"][0]["largest"] is None and result["rows"][0]["next"]["status"] == "too big"


@pytest.mark.parametrize(
    "args, message",
    [
        (["sweep=width"], "sweep='width'"),
        (["layouts=dp;zero9"], "unknown or repeated option"),
        (["layouts=fsdp+tp tp.size=3"], "fsdp+tp tp.size=3"),
        (["layouts=fsdp recompute"], "not key=value"),
        (["mode=measure"], "needs a CUDA device"),
        (["mode=guess"], "mode='guess'"),
        (["family=gpt2"], "family='gpt2'"),
        (["family=debug", "sweep=micro_batch"], "family= applies to sweep=model"),
        (["format=yaml"], "format='yaml'"),
        (["start=middle"], "start='middle'"),
        (["max=lots"], "max='lots'"),
        (["hardware=tpu_v9"], "hardware/tpu_v9"),
        (["hardware=cpu", "mode=measure", "layouts=fsdp+pp pp.size=2"], "pp and cp on a GPU"),
        (["hardware=cpu", "hardware.reserved_bytes=20000000000", "mode=measure"], "leaves nothing"),
    ],
)
def test_bad_options_are_one_line_errors(capsys, args, message):

    if args == ["mode=measure"] and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    code = load_sweep().main([*args, "mode=estimate"] if not any(a.startswith("mode=") for a in args) else args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("capacity_sweep: error:") and message in err


def test_auto_mode_measures_only_gpu_hardware_this_machine_has():

    warnings = []
    assert capacity._resolve_mode("auto", compose(["hardware=cpu"]), warnings) == "estimate"
    if not torch.cuda.is_available():
        assert capacity._resolve_mode("auto", compose([]), warnings) == "estimate"
    elif torch.cuda.device_count() < 8:
        assert capacity._resolve_mode("auto", compose(["hardware.gpus_per_node=8"]), warnings) == "estimate"
        assert "estimated, not measured" in warnings[-1]


# ----------------------------------------------------------------------------------------------
# The search and the trials' verdicts


@pytest.mark.parametrize("n", range(1, 8))
def test_search_finds_the_boundary_from_any_start(n):
    for boundary in range(-1, n):
        for start in range(n):
            probed = []

            def trial(i, probed=probed, boundary=boundary):
                probed.append(i)
                return i <= boundary

            assert capacity.search(n, start, trial) == boundary
            assert len(set(probed)) == len(probed)  # no candidate is tried twice
            if start == boundary and 0 <= boundary < n - 1:
                assert probed == [boundary, boundary + 1]  # a right estimate costs two trials


def test_search_stops_at_an_error_with_what_it_knows():
    probed = []

    def trial(i):
        probed.append(i)
        return True if i == 2 else None

    assert capacity.search(8, 2, trial) == 2 and probed == [2, 3]


@pytest.mark.parametrize(
    "code, stderr, verdict",
    [
        (0, "", "ok"),
        (1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "oom"),
        (
            1,
            "RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory",
            "oom",
        ),
        (-9, "", "oom"),
        (1, "torch.multiprocessing.spawn.ProcessExitedException: process 1 terminated with signal SIGKILL", "oom"),
        (1, "MemoryError", "oom"),
        (1, "ValueError: n_microbatches=0 must be positive", "error"),
        (2, "curry-train: error: data.paths: /x.bin does not exist", "error"),
        (-15, "", "error"),
    ],
)
def test_trial_verdicts(code, stderr, verdict):
    assert trials.classify(code, stderr) == verdict


def test_a_failing_trial_is_an_error_with_its_stderr():
    status, details = trials.run_trial(["model.no_such_key=1"], timeout=120, cpu=True)
    assert status == "error"
    assert "no_such_key" in details["stderr"] and details["reason"].startswith("exit 1:")


# ----------------------------------------------------------------------------------------------
# Measure mode on the CPU: real trials, a real out-of-memory error


CPU_TRIALS = [
    "hardware=cpu",
    "hardware.gpus_per_node=1",
    "hardware.memory_bytes=90000000",
    "hardware.reserved_bytes=0",
    "data.seq_len=64",
    "data.global_batch_size=2",
    "data.micro_batch_size=2",
]


@pytest.mark.slow
def test_measure_on_cpu_records_oom_and_goes_on(capsys):
    # start=top: the first trial is the largest member (6.4M parameters: 16 x 6.4M = 103 MB of model
    # state, more than the 90 MB device), which fails for real; the search goes down and the next
    # trial, the 2.7M member (43 MB of state), runs and fits.
    cfg = compose(CPU_TRIALS)
    members = [m for m in families.family("debug", cfg) if m.parameters <= 10e6]
    top, below = members[-1], members[-2]
    assert STATE_BYTES_PER_PARAM * closed_form_parameters(vars(top), 256) > 90e6
    assert STATE_BYTES_PER_PARAM * closed_form_parameters(vars(below), 256) < 0.9 * 90e6
    code, result, err = run_json(
        capsys, [*CPU_TRIALS, "family=debug", "mode=measure", "layouts=dp", "start=top", "max=10M"]
    )
    assert code == 0 and result["mode"] == "measure"
    (row,) = result["rows"]
    trials = row["trials"]
    assert [t["candidate"]["model"]["dim"] for t in trials] == [top.dim, below.dim]
    assert [t["status"] for t in trials] == ["OOM", "fits"]
    assert trials[0]["reason"] and trials[0]["measured_peak_bytes"] is None
    assert row["largest"]["candidate"]["model"]["dim"] == below.dim and row["next"]["status"] == "OOM"
    peak = row["largest"]["measured_peak_bytes"]
    # measured: at least the model state (16 bytes per parameter), within the device less headroom
    assert STATE_BYTES_PER_PARAM * below.parameters <= peak <= result["capacity_bytes"] == int(90e6 * 0.9)
    # ... and the estimate's, less the gradients: one micro-batch per step, so the tracker's peak is at
    # the end of its forward, before any gradient exists (the estimate budgets accumulation's).
    estimate_less_grads = row["largest"]["estimate_bytes"] - 4 * below.parameters
    assert peak == pytest.approx(estimate_less_grads, rel=0.05)
    assert row["error"] is None
    progress = [line for line in err.splitlines() if line.startswith("trial ")]
    assert len(progress) == 2 and "OOM" in progress[0] and "fits" in progress[1]
    assert result["recommended"]["candidate"]["model"]["dim"] == below.dim
    assert f"model.dim={below.dim}" in result["command"]
