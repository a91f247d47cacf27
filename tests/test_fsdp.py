"""parallel=fsdp (the ZeRO family on FSDP2) and activation recompute: the primitives' own contracts (their
layouts' parity: test_parity.py; resharding checkpoints: test_resume.py)."""

from __future__ import annotations

import collections
import time

import pytest
import torch
import torch.distributed as dist
from conftest import (
    FAST,
    run_seed_example,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
from torch.utils._python_dispatch import TorchDispatchMode

from curry_train.config import ConfigError, compose
from curry_train.config.checks import check
from curry_train.model.llama import Llama
from curry_train.primitives import DistributedOptimizer
from curry_train.primitives.data_parallel import gradient_sync
from curry_train.primitives.distributed_optimizer import AllToAllReduceScatter
from curry_train.primitives.materialize import materialize_and_init
from curry_train.validation.memory import bare_model_activation_bytes

SEED_EXAMPLE = """
import torch
from curry_train.primitives import DistributedOptimizer

class Config:
    lr = 1e-3

cfg = Config()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

# -- the seed example, as written --
model = DistributedOptimizer.wrap(
    model,
    sharding="full",            # one of: "no_shard", "shard_grad_op" (ZeRO-2), "full" (ZeRO-3)
    mixed_precision="bf16",     # bf16 or fp16 or fp32
    cpu_offload=False,
    backward_prefetch="backward_pre",
    use_orig_params=True,
)
optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
# -- end of the seed example --

loss = model(torch.randn(8, 16)).float().pow(2).mean()
loss.backward()
optimizer.step()
shards = [p.to_local().numel() for p in model.parameters()]
full = [p.numel() for p in model.parameters()]
assert sum(shards) < sum(full), (shards, full)
print("SEED OK", torch.distributed.get_rank(), sum(shards), sum(full))
"""


@pytest.mark.slow
def test_seed_example_runs_unchanged_under_torchrun(tmp_path):
    assert run_seed_example(SEED_EXAMPLE, tmp_path).count("SEED OK") == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel=fsdp", "parallel.fsdp.cpu_offload=true"], "needs a GPU"),
        (["parallel=fsdp", "parallel.fsdp.sharding=zero9"], "parallel.fsdp.sharding='zero9'"),
        (["parallel=fsdp", "parallel.fsdp.backward_prefetch=backward_post"], "FSDP2 offers backward_pre, none"),
        (["parallel=dp+fsdp"], "fsdp already does data parallelism"),
        (
            ["parallel=fsdp", "parallel.fsdp.sharding=hybrid", "parallel.fsdp.replicas=3", "trainer.devices=4"],
            "world size 4 is not divisible by",
        ),
        (["parallel.recompute=some"], "parallel.recompute='some'"),
        (["parallel.recompute=selective", "parallel.recompute_keep_matmuls=half"], "expected one of all, every_other"),
        (
            ["parallel.recompute=full", "parallel.recompute_keep_matmuls=every_other"],
            "applies to per-op selective recompute",
        ),
        (
            [
                "parallel.recompute=selective",
                "parallel.recompute_every_n_blocks=2",
                "parallel.recompute_keep_matmuls=every_other",
            ],
            "applies to per-op selective recompute",
        ),
        (
            ["parallel=fsdp", "parallel.fsdp.sharding=optimizer", "parallel.fsdp.reshard_after_forward=true"],
            "ZeRO-1 keeps full parameters",
        ),
        (
            ["parallel=fsdp", "parallel.fsdp.sharding=optimizer", "parallel.fsdp.blocks_per_unit=2"],
            "ZeRO-1 has no wrapping units",
        ),
        (
            ["parallel=fsdp", "parallel.fsdp.sharding=optimizer", "parallel.fsdp.explicit_prefetch=true"],
            "no units to prefetch",
        ),
        (
            ["parallel=fsdp+pp", "trainer.devices=4", "parallel.fsdp.explicit_prefetch=true"],
            "each stage runs its own share",
        ),
        (
            [
                "parallel=fsdp",
                "parallel.fsdp.sharding=hybrid",
                "trainer.devices=4",
                "parallel.fsdp.async_reduce_scatter=true",
            ],
            "all-reduces each reduce-scatter's output",
        ),
        (
            ["parallel=fsdp", "parallel.fsdp.sharding=optimizer", "parallel.fsdp.async_reduce_scatter=true"],
            "with no reduce-scatter to complete later",
        ),
    ],
)
def test_fsdp_options_that_cannot_apply_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(compose([*FAST, *overrides]))


def _peak_activation_bytes(mode: str, every_n_blocks: int = 0) -> int:
    """Peak activation memory of one forward+backward of the debug model, by PyTorch's memory tracker."""
    return bare_model_activation_bytes(compose().model, mode, every_n_blocks, torch.randint(0, 256, (4, 256)))


@pytest.mark.slow
def test_recompute_keeps_fewer_activations():
    none = _peak_activation_bytes("none")
    selective = _peak_activation_bytes("selective")
    every_other = _peak_activation_bytes("selective", every_n_blocks=2)
    full = _peak_activation_bytes("full")
    half_matmuls = bare_model_activation_bytes(
        compose().model, "selective", 0, torch.randint(0, 256, (4, 256)), keep_matmuls="every_other"
    )
    assert full < every_other < none
    assert full < selective < 0.8 * none  # per-op: matmul/attention outputs kept, the rest recomputed
    assert full < half_matmuls < 0.85 * selective  # wk, wo and w3's outputs recomputed
    assert full < 0.3 * none  # a full-recompute block keeps little more than its input


class _MatmulCounter(TorchDispatchMode):
    """Counts the matmuls dispatched (a linear reaches the dispatcher as ``mm``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _recomputed_run(keep_matmuls: str) -> tuple[int, int, list[torch.Tensor]]:
    """Matmuls dispatched in forward and in backward of the debug model under per-op selective recompute,
    and its gradients."""
    from curry_train.primitives.recompute import apply_recompute  # noqa: PLC0415

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(compose().model)
    materialize_and_init(model, torch.device("cpu"), 0)
    if keep_matmuls != "none":
        apply_recompute(list(model.get_submodule(model.plan.blocks).values()), "selective", 0, keep_matmuls)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with _MatmulCounter() as forward:
        loss = model(tokens).float().pow(2).mean()
    with _MatmulCounter() as backward:
        loss.backward()
    return forward.count, backward.count, [p.grad for p in model.parameters()]


def test_every_other_matmul_is_recomputed_and_gradients_do_not_change():
    """``recompute_keep_matmuls=every_other`` recomputes wk, wo and w3 in each block's backward (3 of its 7
    matmuls), ``all`` none of them; the gradients are those of no recompute, bit for bit."""
    blocks = compose().model.n_layers
    forward, backward, reference = _recomputed_run("none")
    for keep, recomputed in (("all", 0), ("every_other", 3 * blocks)):
        got_forward, got_backward, grads = _recomputed_run(keep)
        assert got_forward == forward
        assert got_backward == backward + recomputed, keep
        for got, want in zip(grads, reference, strict=True):
            assert torch.equal(got, want), keep


def _count_reductions(sharding: str, sync_each: bool) -> dict[str, int]:

    class CommCounter(TorchDispatchMode):
        """Counts the c10d collectives dispatched (FSDP2 issues them as c10d ops)."""

        def __init__(self):
            super().__init__()
            self.counts = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "c10d":
                self.counts[func.name()] += 1
            return func(*args, **(kwargs or {}))

    with torch.device("meta"):
        model = Llama(compose().model)
    DistributedOptimizer.wrap(model, sharding=sharding)
    materialize_and_init(model, torch.device("cpu"), 0)
    micro_batches = [torch.randint(0, 256, (2, 32)) for _ in range(3)]
    with CommCounter() as comm:
        for index, tokens in enumerate(micro_batches):
            with gradient_sync(model, last=index == len(micro_batches) - 1, sync_each_microbatch=sync_each):
                model(tokens).float().pow(2).mean().backward()
    return dict(comm.counts)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["full", "shard_grad_op", "optimizer"])
def test_gradient_accumulation_reduces_once_per_step(sharding, pools):
    """3 micro-batches: one reduction per step, not per micro-batch: a reduce-scatter per FSDP unit
    (on a CPU, the all-to-all that stands for it), or (ZeRO-1) an all-reduce per parameter tensor."""

    with torch.device("meta"):
        tensors = len(list(Llama(compose().model).parameters()))
    units = compose().model.n_layers + 1  # one per block, and the root (embedding, norm, head)
    collective, per_step = ("allreduce", tensors) if sharding == "optimizer" else ("alltoall", units)
    results = {}
    for sync_each in (False, True):
        counts, _ = pools.run(2, _count_reductions, sharding, sync_each)
        assert not any("reduce_scatter" in op for op in counts)  # each reduce-scatter went the all-to-all way
        results[sync_each] = sum(n for op, n in counts.items() if collective in op)
    assert results[False] == per_step
    assert results[True] == 3 * per_step


def _live_bytes() -> int:
    """Bytes of every tensor storage Python can reach (each storage once), once gloo has let go of the
    collectives already waited for: its worker thread holds a finished collective's tensors a moment after
    ``wait()`` returns (a blocking all-to-all's input and output stayed reachable in about one reading of
    six here). The smallest of a few readings 20 ms apart, ending at two equal ones."""
    readings = [_reachable_tensor_bytes()]
    while len(readings) < 10 and (len(readings) < 2 or readings[-1] != readings[-2]):
        time.sleep(0.02)
        readings.append(_reachable_tensor_bytes())
    return min(readings)


def _reachable_tensor_bytes() -> int:
    import gc  # noqa: PLC0415

    gc.collect()
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        try:
            storage = obj.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
        except (RuntimeError, NotImplementedError):  # a freed storage, a meta or subclass tensor
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _held_after_a_micro_batch(mixed_precision: str, sync_each: bool) -> int:
    """Bytes the first of two micro-batches leaves behind on this rank (its gradients), FSDP over 2 ranks."""
    with torch.device("meta"):
        model = Llama(compose().model)
    DistributedOptimizer.wrap(model, sharding="full", mixed_precision=mixed_precision)
    materialize_and_init(model, torch.device("cpu"), 0)
    tokens = torch.randint(0, 256, (2, 33))

    def micro_batch(last: bool) -> None:
        with gradient_sync(model, last=last, sync_each_microbatch=sync_each):
            torch.nn.functional.cross_entropy(
                model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten()
            ).backward()

    micro_batch(False)  # a step first: what FSDP allocates once is not the micro-batch's
    micro_batch(True)
    model.zero_grad(set_to_none=True)
    before = _live_bytes()
    micro_batch(False)
    return _live_bytes() - before


@pytest.mark.slow
@pytest.mark.parametrize("mixed_precision", ["fp32", "bf16"])
def test_accumulating_fsdp_holds_unsharded_fp32_gradients_as_estimated(mixed_precision, pools):
    """Between micro-batches FSDP keeps every gradient of the rank unsharded, in fp32 (4 bytes a parameter
    whatever the compute dtype), unless it reduces every micro-batch (sharded: 4 / 2 on 2 ranks); advise's
    estimate counts the same (``planning.memory.holds_unsharded_gradients``), within FSDP2's padding."""
    from curry_train.planning.advise import estimate  # noqa: PLC0415
    from curry_train.planning.layout import current_layout  # noqa: PLC0415

    for sync_each in (False, True):
        held = pools.run(2, _held_after_a_micro_batch, mixed_precision, sync_each)
        cfg = compose(
            [
                "trainer.devices=2",
                "parallel=fsdp",
                f"parallel.fsdp.mixed_precision={mixed_precision}",
                f"parallel.fsdp.sync_each_microbatch={str(sync_each).lower()}",
                "data.global_batch_size=8",
                "data.micro_batch_size=2",
            ]
        )
        grads = estimate(cfg, current_layout(cfg)).memory["grads"]
        with torch.device("meta"):
            P = Llama(cfg.model).num_parameters()
        assert grads == pytest.approx(4 * P / (1 if not sync_each else 2), rel=0.02)
        # every rank holds what the estimate counts (2% for FSDP2's padding; here it is exact)
        assert all(rank_held == pytest.approx(grads, rel=0.02) for rank_held in held), (sync_each, held, grads)


# bf16 keeps 8 bits of mantissa: a gradient carries a few bf16 roundings of its inputs (measured on the
# debug model: 1.4e-2 at worst per tensor; test_parity.py's fsdp-bf16 row uses the same bound)
BF16_GRAD_RTOL = 3e-2


class _Tied(torch.nn.Module):
    """Tied embedding and head, a layer whose rows do not split evenly over 3 ranks (34 = 12 + 12 + 10)
    and one with fewer rows than ranks (2 = 1 + 1 + 0)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.up = torch.nn.Linear(8, 34)
        self.down = torch.nn.Linear(34, 8)
        self.gate = torch.nn.Linear(8, 2)
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.down(torch.relu(self.up(x))) * self.gate(x).sigmoid().mean(-1, keepdim=True)
        return self.head(x)


def _zero1_against_reference(mixed_precision: str) -> tuple[dict[str, float], list[int]]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = _Tied()
    model = _Tied()
    model.load_state_dict(reference.state_dict())
    model = DistributedOptimizer.wrap(model, sharding="optimizer", mixed_precision=mixed_precision)
    assert model.head.weight is model.embed.weight  # still tied: one shard
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    tokens = torch.randint(0, 10, (4 * world, 6))

    def loss_fn(out, t):
        return torch.nn.functional.cross_entropy(out.flatten(0, 1).float(), t.flatten(), reduction="sum")

    for _ in range(3):
        mine = tokens[4 * rank : 4 * rank + 4]
        for index, micro in enumerate(mine.split(2)):  # 2 micro-batches, reduced once
            model.set_requires_gradient_sync(index == 1)
            (loss_fn(model(micro), micro) / tokens.numel()).backward()
        (loss_fn(reference(tokens), tokens) / tokens.numel()).backward()
        optimizer.step(), reference_optimizer.step()
        optimizer.zero_grad(), reference_optimizer.zero_grad()
    errors = {
        name: ((p.full_tensor() - q).norm() / q.norm()).item()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=False)
    }
    return errors, [p.to_local().shape[0] for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("mixed_precision, tolerance", [("fp32", 1e-6), ("bf16", BF16_GRAD_RTOL)])
def test_zero1_seed_api_matches_one_process(mixed_precision, tolerance, pools):
    """DistributedOptimizer.wrap(sharding="optimizer") then AdamW(model.parameters()), on 3 ranks:
    after 3 steps of 2 accumulated micro-batches, the parameters of one process on the whole batch."""

    results = pools.run(3, _zero1_against_reference, mixed_precision)
    errors = results[0][0]
    assert set(errors) == {
        "embed.weight",
        "up.weight",
        "up.bias",
        "down.weight",
        "down.bias",
        "gate.weight",
        "gate.bias",
    }
    assert max(errors.values()) <= tolerance, errors
    if mixed_precision == "bf16":
        assert max(errors.values()) > 1e-5  # bf16 really computed
    rows = [shard_rows for _, shard_rows in results]
    assert [r[1] for r in rows] == [12, 12, 10] and [r[5] for r in rows] == [1, 1, 0]  # up.weight, gate.weight


def _prefetches(explicit_prefetch):
    """One forward and backward of the debug model under ZeRO-3 on this rank: the all-gathers FSDP2
    issued ahead of their unit (pass, unit, asynchronously) in order, and the gradients."""
    issued = []
    original = FSDPParamGroup._prefetch_unshard

    def recording(target, pass_type):
        issued.append((pass_type, target._module_fqn, target.unshard_async_op))
        return original(target, pass_type)

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(compose().model)
    DistributedOptimizer.wrap(model, sharding="full", explicit_prefetch=explicit_prefetch)
    materialize_and_init(model, torch.device("cpu"), 0)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(dist.get_rank()))
    FSDPParamGroup._prefetch_unshard = staticmethod(recording)
    try:
        model(tokens).float().pow(2).mean().backward()
    finally:
        FSDPParamGroup._prefetch_unshard = staticmethod(original)
    return issued, {name: p.grad.to_local().clone() for name, p in model.named_parameters()}


@pytest.mark.slow
def test_explicit_prefetch_gathers_one_unit_ahead_and_changes_nothing_else(pools):
    """On a CPU, by default, each block's all-gather is issued asynchronously as the unit before it
    starts (forward: the root, then blocks 0..n-2; backward: the root, then blocks n-1..1), and the
    gradients are bit for bit those of FSDP2's blocking gathers (explicit_prefetch=False)."""
    n = compose().model.n_layers
    (on, on_grads), _ = pools.run(2, _prefetches, None)
    (off, off_grads), _ = pools.run(2, _prefetches, False)
    forward = [f"layers.{i}" for i in range(n)]
    assert on == [("forward", unit, True) for unit in forward] + [
        ("backward", unit, True) for unit in reversed(forward)
    ]
    # FSDP2's own on a CPU: in backward only, each a blocking call
    assert off and all(pass_type == "backward" and not issued_async for pass_type, _, issued_async in off)
    assert on_grads.keys() == off_grads.keys()
    assert all(torch.equal(on_grads[name], off_grads[name]) for name in on_grads)


def _deferred_reduce_scatters(async_reduce_scatter):
    """Two backwards of the debug model under ZeRO-3 on this rank, the second adding to the first's
    gradients: for each, how many reduce-scatters were issued asynchronously, how many were still
    in flight as it returned, and the gradients."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(compose().model)
    DistributedOptimizer.wrap(model, sharding="full", async_reduce_scatter=async_reduce_scatter)
    materialize_and_init(model, torch.device("cpu"), 0)
    comms = {
        id(c): c
        for c in (
            g._reduce_scatter_comm
            for m in model.modules()
            if isinstance(m, FSDPModule)
            for g in m._get_fsdp_state()._fsdp_param_groups
        )
    }
    deferred = {id(c.deferred): c.deferred for c in comms.values() if c.deferred is not None}
    out = []
    for seed in (1, 2):
        tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(10 * seed + dist.get_rank()))
        model(tokens).float().pow(2).mean().backward()
        out.append(
            (
                sum(d.deferred for d in deferred.values()),
                sum(len(d.pending) for d in deferred.values()),
                {name: p.grad.to_local().clone() for name, p in model.named_parameters()},
            )
        )
    return len(comms), len(deferred), out


@pytest.mark.slow
def test_deferred_reduce_scatters_give_the_blocking_gradients(pools):
    """On a CPU, by default, each unit's reduce-scatter (the 6 blocks' and the root's) is issued
    asynchronously and completed by the time backward returns, with the gradients of blocking ones
    bit for bit; where gradients are already there to add to (a second backward), they block."""
    n = compose().model.n_layers
    (units, shared, on), _ = pools.run(2, _deferred_reduce_scatters, None)
    (units_off, shared_off, off), _ = pools.run(2, _deferred_reduce_scatters, False)
    assert units == units_off == n + 1 and shared == 1 and shared_off == 0
    assert [(issued, pending) for issued, pending, _ in on] == [(n + 1, 0), (n + 1, 0)]
    for (_, _, grads_on), (_, _, grads_off) in zip(on, off, strict=True):
        assert grads_on.keys() == grads_off.keys()
        assert all(torch.equal(grads_on[name], grads_off[name]) for name in grads_on)
    assert not all(torch.equal(on[0][2][name], on[1][2][name]) for name in on[0][2])  # the second added


def _read_at_once(async_reduce_scatter, case):
    """One backward of a small model under ZeRO-3 where FSDP2 reads the reduce-scatter's output as
    soon as it returns: ``bf16`` parameters (it casts the fp32 output to them), or a gradient divide
    factor set after wrapping (it divides the output). How many were deferred, and the gradients."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(dtype)
    DistributedOptimizer.wrap(model, sharding="full", async_reduce_scatter=async_reduce_scatter)
    if case == "divide":
        model.set_gradient_divide_factor(2.0)
    (comm,) = [g._reduce_scatter_comm for g in model._get_fsdp_state()._fsdp_param_groups]
    inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(dist.get_rank())).to(dtype)
    model(inputs).float().pow(2).mean().backward()
    return comm.deferred.deferred if comm.deferred is not None else None, [
        p.grad.to_local() for p in model.parameters()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bf16", "divide"])
def test_reduce_scatters_read_at_once_are_not_deferred(case, pools):
    (deferred, grads), _ = pools.run(2, _read_at_once, None, case)
    (_, blocking), _ = pools.run(2, _read_at_once, False, case)
    assert deferred == 0
    assert all(torch.equal(a, b) for a, b in zip(grads, blocking, strict=True))


def _reduce_scatter_both_ways():
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = torch.randn(world * 1000, generator=torch.Generator().manual_seed(rank))
    group = dist.group.WORLD
    ours, gloo = torch.empty(1000), torch.empty(1000)
    AllToAllReduceScatter()(ours, inputs, group, dist.ReduceOp.SUM)
    dist.reduce_scatter_tensor(gloo, inputs.clone(), group=group)
    averaged = torch.empty(1000)
    AllToAllReduceScatter()(averaged, inputs, group, dist.ReduceOp.AVG)  # not a plain sum: gloo's own
    expected = sum(torch.randn(world * 1000, generator=torch.Generator().manual_seed(r)) for r in range(world))
    return ours, gloo, averaged, expected.view(world, -1)[rank]


@pytest.mark.slow
def test_all_to_all_reduce_scatter_is_a_reduce_scatter(pools):
    """On 3 ranks: each rank's chunk of the sum over ranks, as gloo's reduce-scatter gives it (to fp32
    rounding: the two add in different orders), and an average passed on to gloo."""
    for ours, gloo, averaged, expected in pools.run(3, _reduce_scatter_both_ways):
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours, gloo, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(averaged, expected / 3, rtol=1e-6, atol=1e-6)
