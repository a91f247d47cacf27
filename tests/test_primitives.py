"""ParallelState, distributed checkpoints, the LR schedule and the whitebox harness."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from conftest import FAST
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from curry_train.checkpoint import dcp, files
from curry_train.layout.dims import ParallelDims
from curry_train.module import lr_lambda
from curry_train.primitives import ParallelState, parallel_state
from curry_train.validation.whitebox import compare, reference_overrides, validate

# ----------------------------------------------------------------------------------------------
# ParallelState


def test_parallel_dims_fill_the_free_degree():
    d = ParallelDims(8, dp_shard=-1, tp=2, pp=2)
    assert (d.pp, d.dp_replicate, d.dp_shard, d.cp, d.tp) == (2, 1, 2, 1, 2)
    assert d.dp == 2 and d.world_size == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=6, tp=4), "world size 6 is not divisible by"),
        (dict(world_size=8, dp_shard=2, tp=2), "multiply to 4, but the world size is 8"),
        (dict(world_size=8, dp_replicate=-1, dp_shard=-1), "only one parallel degree may be -1"),
        (dict(world_size=8, tp=0), "tp=0"),
    ],
)
def test_parallel_dims_errors_name_the_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs)


def test_cuda_processes_take_their_local_gpu_before_nccl_starts(monkeypatch):
    """Under torchrun each process must be on GPU LOCAL_RANK before the NCCL group exists (else
    every communicator sits on GPU 0); checked with the CUDA and c10d calls recorded, not run."""

    calls = []
    monkeypatch.setattr(parallel_state.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel_state.torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(
        parallel_state.dist,
        "init_process_group",
        lambda backend, **kwargs: calls.append(("init_process_group", backend)),
    )
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    parallel_state.init_process_group_from_env("cuda")
    assert calls == [("set_device", 3), ("init_process_group", "nccl")]
    calls.clear()
    parallel_state.init_process_group_from_env("cpu")
    assert calls == [("init_process_group", "gloo")]


def _mesh_worker() -> dict:
    ps = ParallelState(dp_replicate=1, dp_shard=-1, cp=1, tp=2, pp=1)
    groups = {
        "dp": dist.get_process_group_ranks(ps.get_dp_group()),
        "tp": dist.get_process_group_ranks(ps.get_tp_group()),
        "pp": dist.get_process_group_ranks(ps.get_pp_group()),
        "cp": dist.get_process_group_ranks(ps.get_cp_group()),
        "ranks": (ps.dp_rank, ps.tp_rank),
    }
    # A gradient as FSDP2 + TP leave it: sharded over data-parallel and tensor-parallel ranks. Its
    # norm must take one all-reduce over both (ParallelState's flattened view), not one per dimension.

    full = torch.arange(48, dtype=torch.float32).reshape(6, 8) / 10
    grad = distribute_tensor(full, ps.mesh["dp_shard", "tp"], [Shard(0), Shard(1)])
    with CommDebugMode() as comm:
        norm = torch.nn.utils.get_total_norm([grad], foreach=True).full_tensor()
    groups["norm"], groups["all_reduces"] = norm.item(), comm.get_total_counts()
    return groups


def _norm_worker() -> dict:
    """2 x 2 x 2 (dp_shard, cp, tp): gradients sharded over ("dp_shard", "tp"), which are not
    neighbours in the mesh (FSDP2's no_shard over (dp_replicate_cp, dp_shard) beside TP); their norm
    is still one all-reduce."""

    ps = ParallelState(dp_replicate=1, dp_shard=2, cp=2, tp=2, pp=1)
    full = torch.arange(48, dtype=torch.float32).reshape(6, 8) / 10
    grad = distribute_tensor(full, ps.mesh["dp_shard", "tp"], [Shard(0), Shard(1)])
    with CommDebugMode() as comm:
        norm = torch.nn.utils.get_total_norm([grad], foreach=True).full_tensor()
    return {"norm": norm.item(), "collectives": comm.get_total_counts()}


@pytest.mark.slow
def test_gradient_norm_over_dims_apart_is_one_all_reduce(pools):
    full = torch.arange(48, dtype=torch.float32).reshape(6, 8) / 10
    for got in pools.run(8, _norm_worker):
        assert got["norm"] == pytest.approx(torch.linalg.vector_norm(full).item(), rel=1e-6)
        assert got["collectives"] == 1


@pytest.mark.slow
def test_parallel_state_groups_on_four_ranks(pools):
    """tp is the innermost dimension: tp groups are neighbouring ranks, dp groups stride by tp."""
    groups = dict(enumerate(pools.run(4, _mesh_worker)))
    assert groups[0]["tp"] == [0, 1] and groups[2]["tp"] == [2, 3]
    assert groups[0]["dp"] == [0, 2] and groups[3]["dp"] == [1, 3]
    assert all(groups[r]["pp"] == [r] and groups[r]["cp"] == [r] for r in range(4))
    assert [groups[r]["ranks"] for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    full = torch.arange(48, dtype=torch.float32).reshape(6, 8) / 10
    for r in range(4):  # the same norm on every rank, from one all-reduce over dp x tp
        assert groups[r]["norm"] == pytest.approx(torch.linalg.vector_norm(full).item(), rel=1e-6)
        assert groups[r]["all_reduces"] == 1  # collectives of any kind: the one all-reduce


# ----------------------------------------------------------------------------------------------
# Distributed checkpoints


def _tiny_training_state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.fixture
def single_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(tmp_path, single_process_group):
    model, optimizer = _tiny_training_state(0)
    torch.manual_seed(123)
    path = dcp.save(tmp_path / files.checkpoint_name(5), model, [optimizer], {"global_step": 5})
    expected_random = torch.rand(3)
    assert files.is_checkpoint(path) and not list(tmp_path.glob("*.tmp"))

    other, other_optimizer = _tiny_training_state(1)
    assert not torch.equal(other[0].weight, model[0].weight)
    meta = dcp.load(path, other, [other_optimizer])
    assert meta == {"global_step": 5}
    for a, b in zip(model.parameters(), other.parameters(), strict=False):
        assert torch.equal(a, b)
    state, other_state = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    for key in state:
        assert torch.equal(state[key]["exp_avg"], other_state[key]["exp_avg"])
        assert torch.equal(state[key]["exp_avg_sq"], other_state[key]["exp_avg_sq"])
    assert torch.equal(torch.rand(3), expected_random)  # the RNG continues where the save left it


def test_incomplete_checkpoints_are_invisible_and_pruning_keeps_the_newest(tmp_path, single_process_group):
    model, optimizer = _tiny_training_state(0)
    run = tmp_path / "run" / "checkpoints"
    for step in (2, 4, 6):
        dcp.save(run / files.checkpoint_name(step), model, [optimizer], {"global_step": step})
    crashed = run / (files.checkpoint_name(8) + files.TMP_SUFFIX)  # a save interrupted before its rename
    crashed.mkdir()
    (crashed / files.META_FILE).write_bytes(b"partial")
    assert [p.name for p in files.checkpoints_in(run)] == ["step-00000002", "step-00000004", "step-00000006"]
    assert files.latest_checkpoint(tmp_path).name == "step-00000006"
    removed = files.prune(run, keep_last=2)
    assert [p.name for p in removed] == ["step-00000002"]
    assert [p.name for p in files.checkpoints_in(run)] == ["step-00000004", "step-00000006"]


# ----------------------------------------------------------------------------------------------
# LR schedule


def test_lr_schedule_warms_up_then_decays_to_min():
    def f(step, schedule="cosine"):
        return lr_lambda(step, warmup=10, total=110, schedule=schedule, min_ratio=0.1)

    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert f(60, "linear") == pytest.approx(0.55) and f(60, "constant") == 1.0


# ----------------------------------------------------------------------------------------------
# Whitebox harness


def test_reference_drops_the_layout_and_keeps_the_rest():
    ref = reference_overrides(
        ["parallel=dp", "parallel.dp.bucket_cap_mb=1", "trainer.devices=4", "seed=3", "model.dim=64"]
    )
    assert "seed=3" in ref and "model.dim=64" in ref
    assert "trainer.devices=1" in ref and "parallel=dp" in ref
    assert not any(o in ref for o in ("trainer.devices=4", "parallel.dp.bucket_cap_mb=1"))


@pytest.fixture(scope="module")
def dp2_report(pools):
    report = validate([*FAST, "trainer.devices=2"], steps=2, pools=pools)
    assert report.ok, report.table(only_failures=True)
    names = {row.name for row in report.rows}
    assert {"loss", "grad_norm", "grad tok_embeddings.weight", "grad layers.3.ffn_norm.weight"} <= names
    return report


@pytest.mark.slow
def test_whitebox_catches_a_wrong_gradient(dp2_report):
    """The comparison fails on a gradient off by 0.1% (a wrongly scaled reduction looks like this)."""
    rows = dp2_report.rows
    assert max(row.error for row in rows) < 1e-6  # the real parallel run is far inside tolerance

    def records_from(report, scale_name=None, scale=1.0):
        steps = sorted({row.step for row in report.rows})
        out = []
        for step in steps:
            grads = {}
            for row in report.rows:
                if row.step == step and row.name.startswith("grad "):
                    value = torch.tensor([row.value * (scale if row.name == scale_name else 1.0)], dtype=torch.float64)
                    grads[row.name[5:]] = value
            loss = next(r.value for r in report.rows if r.step == step and r.name == "loss")
            norm = next(r.value for r in report.rows if r.step == step and r.name == "grad_norm")
            out.append({"loss": loss, "grad_norm": norm, "grads": grads})
        return out

    good = records_from(dp2_report)
    assert compare(good, copy.deepcopy(good)).ok
    bad = records_from(dp2_report, "grad layers.1.attention.wv.weight", 1.001)
    report = compare(bad, good)
    assert not report.ok
    assert [row.name for row in report.rows if not row.ok] == ["grad layers.1.attention.wv.weight"] * 2
    missing = copy.deepcopy(good)
    del missing[0]["grads"]["norm.weight"]
    assert not compare(missing, good).ok and "missing ['norm.weight']" in compare(missing, good).problems[0]
    assert not compare([{**good[0], "loss": good[0]["loss"] * (1 + 1e-4)}, good[1]], good).ok
    assert math.isfinite(good[0]["loss"])
