"""Expert parallelism: the all-to-all dispatcher against the single-process layer and the layout's checks
(training under ep beside every other dimension against one process: test_parity.py; resharding an ep
checkpoint: test_resume.py)."""

from __future__ import annotations

import re

import pytest
from conftest import run_seed_example

from curry_train.config import ConfigError, compose
from curry_train.config.checks import check

# Each rank routes its own tokens through a layer whose 8 experts are split over the 4 ranks (with
# each dispatcher), and compares with the same layer whole on one rank: outputs and input gradients on each rank, each
# expert's gradient (the sum over every rank's tokens), the router's (this rank's tokens). Then
# identity experts: the tokens travel to their experts' ranks and back into their places.
SEED_EXAMPLE = """
import torch
import torch.distributed as dist
from curry_train.primitives import Experts, ExpertParallel, MoE, ParallelState, TopKRouter

dist.init_process_group("gloo")  # torchrun's environment; ParallelState builds its mesh on this group
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
