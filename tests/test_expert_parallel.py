"""Expert parallelism: the all-to-all dispatcher against the single-process layer, the layout's
checks, and training under ep beside every other dimension against one process (fp32, 10 steps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import FAST, STEPS, assert_same_curve, matrix, read_metric, run_seed_example, run_train

from curry_train.config import ConfigError, compose
from curry_train.config.checks import check
from curry_train.validation.whitebox import validate

# Each rank routes its own tokens through a layer whose 8 experts are split over the 4 ranks (with
# each dispatcher), and compares with the same layer whole on one rank: outputs and input gradients on each rank, each
# expert's gradient (the sum over every rank's tokens), the router's (this rank's tokens). Then
# identity experts: the tokens travel to their experts' ranks and back into their places.
SEED_EXAMPLE = """
import torch
import torch.distributed as dist
from curry_train.primitives import Experts, ExpertParallel, MoE, ParallelState, TopKRouter

ps = ParallelState(ep=4)
rank = dist.get_rank()


def layer():
    torch.manual_seed(0)
    return MoE(16, TopKRouter(16, 8, 2, score_function="sigmoid", normalize=True), Experts(8, 16, 24)).double()


for dispatcher in ("alltoall", "allgather"):
    reference = layer()
    moe = ExpertParallel.wrap(layer(), ep_group=ps.get_ep_group(), dispatcher=dispatcher)
    assert moe.experts.w1.to_local().shape == (2, 24, 16)
    x = torch.randn(3, 7 + rank, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    out, expected = moe(x), reference(x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    gate, gate_ref = moe.router.gate.weight.grad, reference.router.gate.weight.grad
    torch.testing.assert_close(gate, gate_ref, rtol=1e-12, atol=1e-12)
    for name in ("w1", "w3", "w2"):
        summed = getattr(reference.experts, name).grad.clone()
        dist.all_reduce(summed)
        mine = summed[2 * rank : 2 * rank + 2]
        torch.testing.assert_close(getattr(moe.experts, name).grad.to_local(), mine, rtol=1e-10, atol=1e-12)
    moe.experts.forward = lambda tokens, counts: tokens * 1.0
    with torch.no_grad():
        routing = moe.router(x.reshape(-1, 16))
        torch.testing.assert_close(moe(x), x * routing.weights.sum(-1).view(3, 7 + rank, 1))
    print("SEED OK", dispatcher, rank, flush=True)
dist.barrier()
dist.destroy_process_group()  # gloo's threads joined before the interpreter exits
"""


def test_expert_parallel_dispatch_equals_the_whole_layer(tmp_path):
    assert run_seed_example(SEED_EXAMPLE, tmp_path, nproc=4).count("SEED OK") == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=debug", "parallel=ep", "trainer.devices=2"], "parallel.ep needs a mixture-of-experts model"),
        (
            ["parallel=ep", "parallel.ep.size=3", "trainer.devices=3", "data.global_batch_size=24"],
            "model.moe.experts=8 cannot be split evenly over parallel.ep.size=3",
        ),
        (["parallel=ep", "parallel.ep.size=4", "trainer.devices=2"], "ep=4 must divide the 2 ranks holding distinct"),
        (["parallel=tp+ep", "trainer.devices=2"], "ep=2 must divide the 1 ranks holding distinct tokens"),
        (["parallel=ep", "parallel.ep.size=1", "trainer.devices=2"], "parallel.ep.size=1 must be at least 2"),
        (
            ["parallel=ep", "parallel.ep.dispatcher=alltoal", "trainer.devices=2"],
            "parallel.ep.dispatcher='alltoal': expected one of alltoall, allgather",
        ),
        (
            ["parallel=fsdp+ep", "parallel.fsdp.sharding=optimizer", "trainer.devices=2"],
            "parallel.fsdp.sharding=optimizer with parallel.ep",
        ),
        (
            ["parallel=ep", "trainer.devices=2", "model.moe.dense_layers=4"],
            "parallel.ep with model.moe.dense_layers=4 = model.n_layers: no block has experts",
        ),
        (
            ["parallel=tp", "parallel.tp.sequence_parallel=true", "trainer.devices=2"],
            "model.moe with parallel.tp.sequence_parallel=true",
        ),
    ],
)
def test_expert_parallel_settings_are_checked_before_any_worker(tmp_path, overrides, message):
    cfg = compose(["model=moe_debug", "logger=csv", *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(cfg, env={}, run_dir=tmp_path)


# -- training under ep against one process ----------------------------------------------------------

COMMON = (*FAST, "model=moe_debug", f"trainer.max_steps={STEPS}", "model.moe.bias_update_rate=0.05")


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory) -> Path:
    """moe_debug on one process for STEPS steps; a bias rate large enough that balancing changes the
    routing within the curve (a layout that moved the bias wrongly would leave it)."""
    run_dir = tmp_path_factory.mktemp("moe_single")
    run_train([*COMMON, f"hydra.run.dir={run_dir}"], cwd=run_dir)
    return run_dir


def final_biases(run_dir: Path) -> torch.Tensor:
    """Every router's balancing bias in the run's last checkpoint, stacked."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: PLC0415

    (checkpoint,) = sorted((run_dir / "checkpoints").glob("step-*"))[-1:]
    saved = run_dir / "consolidated.pt"
    dcp_to_torch_save(checkpoint, saved)
    state = torch.load(saved, weights_only=True)
    flat = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node

    walk("", state)
    biases = [flat[key] for key in sorted(flat) if key.endswith("router.expert_bias")]
    assert len(biases) == 4
    return torch.stack(biases)


LAYOUTS = [
    pytest.param(["parallel=tp+ep", "trainer.devices=4"], id="tp2+ep2"),
    pytest.param(["parallel=pp+ep", "trainer.devices=4"], id="pp2+ep2"),
    pytest.param(["parallel=fsdp+tp+ep", "trainer.devices=8"], id="3d-fsdp2+tp2+ep2-8-ranks"),
    matrix(["parallel=fsdp+ep", "parallel.ep.dispatcher=allgather", "trainer.devices=4"], id="fsdp+ep2-allgather"),
    matrix(["parallel=ep", "parallel.ep.size=2", "trainer.devices=4"], id="ep2-experts-replicated-over-2"),
    matrix(["parallel=ep", "trainer.devices=2"], id="ep2"),
    matrix(["parallel=fsdp+ep", "trainer.devices=4"], id="fsdp+ep2-experts-sharded-over-2"),
    matrix(["parallel=ep+cp", "parallel.ep.size=4", "trainer.devices=4"], id="ep4+cp2"),
    matrix(["parallel=fsdp+pp+ep", "parallel.pp.schedule=interleaved", "trainer.devices=8"], id="fsdp+pp+ep"),
    matrix(["parallel=tp+pp+cp+ep", "trainer.devices=8"], id="4d-tp+pp+cp+ep"),
]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_expert_parallel_layouts_reproduce_one_process(layout, moe_reference, tmp_path):
    """Loss and gradient norm within rel 1e-5 of one process at every step, and the routers'
    balancing biases at the end equal: the loads were summed over the right ranks."""
    run_train([*COMMON, *layout, f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert_same_curve(read_metric(tmp_path), read_metric(moe_reference))
    grad_norm = "train/grad_norm"
    assert_same_curve(read_metric(tmp_path, grad_norm), read_metric(moe_reference, grad_norm))
    torch.testing.assert_close(final_biases(tmp_path), final_biases(moe_reference), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_whitebox_fsdp_ep_gradients_match_one_process():
    """The whitebox validator on fsdp+ep (4 ranks: experts split over 2, sharded over the other 2):
    loss, gradient norm and every parameter's full gradient (the experts' gathered from both
    meshes) within rel 1e-5 of one process, at 2 steps."""
    report = validate([*FAST, "model=moe_debug", "parallel=fsdp+ep", "trainer.devices=4"], steps=2)
    assert report.ok, report.table(only_failures=True)
    names = {row.name for row in report.rows}
    assert {f"grad layers.{i}.feed_forward.experts.w{j}" for i in range(4) for j in (1, 2, 3)} <= names
    assert len(report.rows) == 2 * (2 + 55)  # loss, grad norm and the 55 parameters, at 2 steps


@pytest.mark.slow
def test_a_checkpoint_saved_under_ep4_resumes_under_ep2_and_one_process(moe_reference, tmp_path):
    """ep=4 for 10 steps (its curve is the reference's), then its step-5 checkpoint resumed under
    ep=2 and under one process: each continues on the reference's curve."""
    reference = read_metric(moe_reference)
    source = tmp_path / "ep4"
    run_train(
        [
            *COMMON,
            "parallel=ep",
            "parallel.ep.size=4",
            "trainer.devices=4",
            "checkpoint.every_n_steps=5",
            "checkpoint.keep_last=3",
            f"hydra.run.dir={source}",
        ],
        cwd=tmp_path,
    )
    assert_same_curve(read_metric(source), reference)
    step5 = source / "checkpoints" / "step-00000005"
    for name, layout in (("ep2", ["parallel=ep", "trainer.devices=2"]), ("single", [])):
        run_dir = tmp_path / name
        run_train([*COMMON, *layout, f"ckpt_path={step5}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        resumed = read_metric(run_dir)
        assert sorted(resumed) == list(range(5, STEPS))
        assert_same_curve(resumed, {step: reference[step] for step in resumed})
