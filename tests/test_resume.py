"""Checkpoints are stored by parameter name, not by layout: a checkpoint saved by one layout resumes under
another (fewer ranks, one process, another expert-parallel size) and continues on the single-process curve.

Each source run is trained once per test run (session fixtures, in the session's worker pools) and its
checkpoints serve every test that starts from them; its own curve is held to the reference first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST, STEPS, assert_same_curve, read_metric, train
from safetensors.torch import load_file

from curry_train.checkpoint import files
from curry_train.cli import export as export_cli
from curry_train.config import compose
from curry_train.model.llama import Llama

CURVE = (*FAST, f"trainer.max_steps={STEPS}")
MOE = (*CURVE, "model=moe_debug", "model.moe.bias_update_rate=0.05")  # balancing changes the routing in 10 steps
# A source run stops at the step it saves (its last): the learning rate of the first 10 steps is warmup's
# (optim.warmup_steps=10), which does not depend on trainer.max_steps, so its steps are the reference's.
assert compose(list(FAST)).optim.warmup_steps >= STEPS


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / files.checkpoint_name(step)


def assert_steps_of(run_dir: Path, steps: range, reference: dict[int, float]) -> None:
    """``run_dir`` trained exactly ``steps``, with the reference's losses."""
    curve = read_metric(run_dir)
    assert sorted(curve) == list(steps)
    assert_same_curve(curve, {step: reference[step] for step in steps})


@pytest.fixture(scope="session")
def fsdp4_run(pools, tmp_path_factory) -> Path:
    """ZeRO-3 on 4 ranks for 3 steps, the checkpoint of step 3."""
    return train(
        pools, [*FAST, "trainer.max_steps=3", "parallel=fsdp", "trainer.devices=4"], tmp_path_factory.mktemp("fsdp4")
    )


@pytest.fixture(scope="session")
def moe_reference(pools, tmp_path_factory) -> Path:
    """moe_debug on one process for STEPS steps (a bias rate at which a wrongly moved bias shows)."""
    return train(pools, MOE, tmp_path_factory.mktemp("moe_single"))


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_fewer_ranks_and_on_one_process(pools, fsdp4_run, single_process_curve, tmp_path):
    """Saved by fsdp on 4 ranks (its curve the reference's); resumed by fsdp on 2 and by a single process
    from step 3: the rest of the same curve."""
    assert_steps_of(fsdp4_run, range(3), single_process_curve)
    for name, layout in (("fsdp2", ["parallel=fsdp", "trainer.devices=2"]), ("single", [])):
        resumed = train(pools, [*CURVE, *layout, f"ckpt_path={checkpoint(fsdp4_run, 3)}"], tmp_path / name)
        assert_steps_of(resumed, range(3, STEPS), single_process_curve)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        # ZeRO-1: DTensor shards of parameters and optimizer state
        pytest.param(("parallel=fsdp", "parallel.fsdp.sharding=optimizer", "trainer.devices=4"), id="zero1-4"),
        # fsdp+tp+pp: per-stage DCP shards, 2-D DTensors
        pytest.param(("parallel=fsdp+tp+pp", "trainer.devices=8", "data.micro_batch_size=2"), id="3d-8"),
    ],
)
def test_a_sharded_checkpoint_resumes_on_one_process(pools, single_process_curve, tmp_path, layout):
    """6 steps of the layout (the reference's), then its step-6 checkpoint resumed in one process: the rest
    of the same curve."""
    saved = train(pools, [*FAST, "trainer.max_steps=6", *layout], tmp_path / "saved")
    assert_steps_of(saved, range(6), single_process_curve)
    resumed = train(pools, [*CURVE, f"ckpt_path={checkpoint(saved, 6)}"], tmp_path / "resumed")
    assert_steps_of(resumed, range(6, STEPS), single_process_curve)
    # what ckpt_path=last follows from a new directory: the resumed run records the checkpoint it continues
    assert files.resumed_from(checkpoint(resumed, STEPS)) == str(checkpoint(saved, 6).resolve())
    assert files.resumed_from(checkpoint(saved, 6)) is None


@pytest.mark.slow
def test_a_checkpoint_saved_under_ep4_resumes_under_ep2_and_one_process(pools, moe_reference, tmp_path):
    """moe_debug under ep=4 for 5 steps (the reference's curve), then its step-5 checkpoint (the
    experts split 4 ways, the routers' balancing biases) resumed under ep=2 and under one process: each
    continues on the reference's curve."""
    reference = read_metric(moe_reference)
    source = train(
        pools,
        [*MOE, "trainer.max_steps=5", "parallel=ep", "parallel.ep.size=4", "trainer.devices=4"],
        tmp_path / "ep4",
    )
    assert_steps_of(source, range(5), reference)
    for name, layout in (("ep2", ["parallel=ep", "trainer.devices=2"]), ("single", [])):
        resumed = train(pools, [*MOE, *layout, f"ckpt_path={checkpoint(source, 5)}"], tmp_path / name)
        assert_steps_of(resumed, range(5, STEPS), reference)


@pytest.mark.slow
def test_export_consolidates_a_sharded_checkpoint(fsdp4_run, single_process_run, tmp_path):
    """The safetensors export of an fsdp checkpoint equals that of the single-process run's."""
    exported = {}
    for name, run_dir in (("fsdp", fsdp4_run), ("single", single_process_run)):
        output = tmp_path / f"{name}.safetensors"
        assert export_cli.main([str(checkpoint(run_dir, 3)), "--output", str(output)]) == 0
        exported[name] = load_file(str(output))
    with torch.device("meta"):
        model = Llama(compose().model)
    assert set(exported["fsdp"]) == {name for name, _ in model.named_parameters()}
    for name, tensor in exported["single"].items():
        torch.testing.assert_close(exported["fsdp"][name], tensor, rtol=1e-5, atol=1e-6)
