"""parallel=fsdp (the ZeRO family on FSDP2), activation recompute, resharding checkpoints."""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import (
    FAST,
    REPO,
    STEPS,
    assert_same_curve,
    clean_env,
    matrix,
    read_metric,
    run_seed_example,
    run_train,
)
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from curry_train.config import ConfigError, compose
from curry_train.config.checks import check
from curry_train.launch import end_process_group, spawn
from curry_train.model import Llama
from curry_train.primitives import DistributedOptimizer
from curry_train.primitives.data_parallel import gradient_sync
from curry_train.primitives.materialize import materialize_and_init
from curry_train.validation.memory import bare_model_activation_bytes
from curry_train.validation.whitebox import validate

ACCUMULATE = ("data.global_batch_size=32",)  # 2 micro-batches per rank on 4 ranks, 4 on 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(("parallel.fsdp.sharding=full", "trainer.devices=2"), id="full-2"),
        matrix(("parallel.fsdp.sharding=full", "trainer.devices=4"), "full-4"),
        matrix(("parallel.fsdp.sharding=shard_grad_op", "trainer.devices=2"), "shard_grad_op-2"),
        pytest.param(("parallel.fsdp.sharding=shard_grad_op", "trainer.devices=4"), id="shard_grad_op-4"),
        pytest.param(("parallel.fsdp.sharding=optimizer", "trainer.devices=2"), id="optimizer-2"),
        matrix(("parallel.fsdp.sharding=optimizer", "trainer.devices=4"), "optimizer-4"),
        matrix(("parallel.fsdp.sharding=no_shard", "trainer.devices=2"), "no_shard-2"),
        pytest.param(("parallel.fsdp.sharding=no_shard", "trainer.devices=4"), id="no_shard-4"),
        pytest.param(
            ("parallel.fsdp.sharding=hybrid", "parallel.fsdp.replicas=2", "trainer.devices=4"), id="hybrid-2x2"
        ),
    ],
)
def test_whitebox_fsdp_matches_single_process(layout):
    report = validate([*FAST, *ACCUMULATE, "parallel=fsdp", *layout], steps=2)
    assert report.ok, report.table(only_failures=True)
    assert len(report.rows) == 2 * (2 + 39)  # loss, grad norm and 39 parameters, at 2 steps


@pytest.mark.slow
@pytest.mark.parametrize(
    "sharding",
    ["full", matrix("shard_grad_op", "shard_grad_op"), matrix("no_shard", "no_shard"), "hybrid"],
)
def test_fsdp_on_four_ranks_reproduces_single_process_curve(sharding, single_process_curve, tmp_path):
    run_train(
        [
            *FAST,
            f"trainer.max_steps={STEPS}",
            "parallel=fsdp",
            f"parallel.fsdp.sharding={sharding}",
            "trainer.devices=4",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert_same_curve(read_metric(tmp_path), single_process_curve)


@pytest.mark.slow
def test_zero1_reproduces_the_curve_and_resumes_on_one_process(single_process_curve, tmp_path):
    """sharding=optimizer (ZeRO-1) on 4 ranks: the single-process curve; its step-6 checkpoint
    (DTensor shards of parameters and optimizer state) resumes in one process on the same curve."""
    saved_dir, resumed_dir = tmp_path / "zero1", tmp_path / "resumed"
    run_train(
        [
            *FAST,
            f"trainer.max_steps={STEPS}",
            "parallel=fsdp",
            "parallel.fsdp.sharding=optimizer",
            "trainer.devices=4",
            "checkpoint.every_n_steps=3",
            "checkpoint.keep_last=4",
            f"hydra.run.dir={saved_dir}",
        ],
        cwd=tmp_path,
    )
    assert_same_curve(read_metric(saved_dir), single_process_curve)
    checkpoint = saved_dir / "checkpoints" / "step-00000006"
    run_train(
        [*FAST, f"trainer.max_steps={STEPS}", f"ckpt_path={checkpoint}", f"hydra.run.dir={resumed_dir}"], cwd=tmp_path
    )
    resumed = read_metric(resumed_dir)
    assert sorted(resumed) == list(range(6, STEPS))
    assert_same_curve(resumed, {step: single_process_curve[step] for step in resumed})


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_fewer_ranks_and_on_one_process(tmp_path):
    """Saved by fsdp on 4 ranks; resumed by fsdp on 2 and by a single process: the same curve."""
    steps = 6
    common = [*FAST, f"trainer.max_steps={steps}"]
    reference_dir, saved_dir = tmp_path / "reference", tmp_path / "fsdp4"
    run_train([*common, f"hydra.run.dir={reference_dir}"], cwd=tmp_path)
    reference = read_metric(reference_dir)
    run_train(
        [*common, "parallel=fsdp", "trainer.devices=4", "trainer.max_steps=3", f"hydra.run.dir={saved_dir}"],
        cwd=tmp_path,
    )
    saved = read_metric(saved_dir)
    for step, loss in saved.items():  # fsdp on 4 ranks reproduces the single-process curve
        assert abs(loss - reference[step]) / reference[step] <= 1e-5, (step, loss, reference[step])
    checkpoint = saved_dir / "checkpoints" / "step-00000003"
    for name, layout in (
        ("fsdp2", ["parallel=fsdp", "trainer.devices=2"]),
        ("single", ["parallel=dp", "trainer.devices=1"]),
    ):
        run_dir = tmp_path / name
        run_train([*common, *layout, f"ckpt_path={checkpoint}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        resumed = read_metric(run_dir)
        assert sorted(resumed) == [3, 4, 5], name
        for step, loss in resumed.items():
            assert abs(loss - reference[step]) / reference[step] <= 1e-5, (name, step, loss, reference[step])


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
        (
            ["parallel=fsdp", "parallel.fsdp.sharding=optimizer", "parallel.fsdp.reshard_after_forward=true"],
            "ZeRO-1 keeps full parameters",
        ),
        (
            ["parallel=fsdp", "parallel.fsdp.sharding=optimizer", "parallel.fsdp.blocks_per_unit=2"],
            "ZeRO-1 has no wrapping units",
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
    assert full < every_other < none
    assert full < selective < 0.8 * none  # per-op: matmul/attention outputs kept, the rest recomputed
    assert full < 0.3 * none  # a full-recompute block keeps little more than its input


@pytest.mark.slow
def test_export_consolidates_a_sharded_checkpoint(tmp_path):
    """The safetensors export of an fsdp checkpoint equals that of the single-process run."""

    exported = {}
    for name, layout in (("fsdp", ["parallel=fsdp", "trainer.devices=2"]), ("single", [])):
        run_dir = tmp_path / name
        run_train([*FAST, *layout, "trainer.max_steps=2", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        output = tmp_path / f"{name}.safetensors"
        result = subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "export_checkpoint.py"),
                str(run_dir / "checkpoints" / "step-00000002"),
                "--output",
                str(output),
            ],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        exported[name] = load_file(str(output))
    with torch.device("meta"):
        model = Llama(compose().model)
    assert set(exported["fsdp"]) == {name for name, _ in model.named_parameters()}
    for name, tensor in exported["single"].items():
        torch.testing.assert_close(exported["fsdp"][name], tensor, rtol=1e-5, atol=1e-6)
    bad = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_checkpoint.py"), str(tmp_path), "--output", "x"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert bad.returncode == 2 and "not a complete curry-train checkpoint" in bad.stderr


# bf16 keeps 8 bits of mantissa (relative spacing 2**-8 = 3.9e-3). Units compute in bf16 and reduce
# in fp32, so a gradient entry carries a few bf16 roundings of its inputs: measured on the debug model,
# 1.4e-2 at worst per tensor (norm-wise), 7e-4 on the global gradient norm, 1e-4 on the loss.
BF16_RTOL, BF16_GRAD_RTOL = 2e-3, 3e-2


@pytest.mark.slow
def test_bf16_mixed_precision_stays_within_its_documented_tolerance():
    report = validate(
        [*FAST, "parallel=fsdp", "parallel.fsdp.mixed_precision=bf16", "trainer.devices=2"],
        steps=2,
        rtol=BF16_RTOL,
        grad_rtol=BF16_GRAD_RTOL,
    )
    assert report.ok, report.table(only_failures=True)
    worst = max(row.error for row in report.rows if row.name.startswith("grad "))
    assert worst > 1e-4  # bf16 really computed: fp32 would be ~1e-7


def _count_reductions(out_dir: str, sharding: str, sync_each: bool) -> None:

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
    counts = dict(comm.counts)
    if dist.get_rank() == 0:
        torch.save(counts, f"{out_dir}/counts.pt")
    end_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["full", "shard_grad_op", "optimizer"])
def test_gradient_accumulation_reduces_once_per_step(sharding, tmp_path):
    """3 micro-batches: one reduction per step, not per micro-batch: a reduce-scatter per FSDP unit,
    or (ZeRO-1) an all-reduce per parameter tensor."""

    with torch.device("meta"):
        tensors = len(list(Llama(compose().model).parameters()))
    units = compose().model.n_layers + 1  # one per block, and the root (embedding, norm, head)
    collective, per_step = ("allreduce", tensors) if sharding == "optimizer" else ("reduce_scatter", units)
    results = {}
    for sync_each in (False, True):
        spawn(2, _count_reductions, str(tmp_path), sharding, sync_each)
        counts = torch.load(tmp_path / "counts.pt")
        results[sync_each] = sum(n for op, n in counts.items() if collective in op)
    assert results[False] == per_step
    assert results[True] == 3 * per_step


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


def _zero1_against_reference(out_dir: str, mixed_precision: str) -> None:

    dist.init_process_group("gloo")  # the launcher sets the environment, as torchrun does
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
    shard_rows = [p.to_local().shape[0] for p in model.parameters()]
    if rank == 0:
        torch.save({"errors": errors}, f"{out_dir}/errors.pt")
    torch.save(shard_rows, f"{out_dir}/rows{rank}.pt")
    end_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mixed_precision, tolerance", [("fp32", 1e-6), ("bf16", BF16_GRAD_RTOL)])
def test_zero1_seed_api_matches_one_process(mixed_precision, tolerance, tmp_path):
    """DistributedOptimizer.wrap(sharding="optimizer") then AdamW(model.parameters()), on 3 ranks:
    after 3 steps of 2 accumulated micro-batches, the parameters of one process on the whole batch."""

    spawn(3, _zero1_against_reference, str(tmp_path), mixed_precision)
    errors = torch.load(tmp_path / "errors.pt")["errors"]
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
    rows = [torch.load(tmp_path / f"rows{rank}.pt") for rank in range(3)]
    assert [r[1] for r in rows] == [12, 12, 10] and [r[5] for r in rows] == [1, 1, 0]  # up.weight, gate.weight
