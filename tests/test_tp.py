"""parallel=tp: ColumnParallelLinear / RowParallelLinear, sequence parallel, loss parallel: the layers' own
contracts (their layouts' parity: test_parity.py)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.distributed as dist
from conftest import FAST, run_seed_example
from torch.utils._python_dispatch import TorchDispatchMode

from curry_train.config import ConfigError, compose
from curry_train.config.checks import check
from curry_train.model.llama import SDPA, Llama
from curry_train.primitives import ParallelState
from curry_train.primitives.materialize import materialize_and_init
from curry_train.primitives.tp_linear import apply_tensor_parallel, distinct_rng_per_rank

SEED_EXAMPLE = """
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate

from curry_train.primitives import ColumnParallelLinear, ParallelState, RowParallelLinear
from curry_train.primitives.tp_linear import reduce_partial_gradients

dist.init_process_group("gloo")  # torchrun's environment; ParallelState builds its mesh on this group
ps = ParallelState(tp=2)
rank = dist.get_rank()
torch.manual_seed(rank)  # ranks draw differently: the layers must still hold slices of one matrix

# -- the seed example, as written --
q_proj = ColumnParallelLinear(
    in_features=2048, out_features=2048,
    tp_group=ps.get_tp_group(), bias=False,
    gather_output=False,        # downstream uses the slice; common in attention
)
o_proj = RowParallelLinear(
    in_features=2048, out_features=2048,
    tp_group=ps.get_tp_group(), bias=False,
    input_is_parallel=True,     # input is already per-rank
)
# -- end of the seed example --


def relative_error(got, expected):
    return float((got - expected).norm() / expected.norm())


def check_against_plain_linears(first, second, x, shard_sequence=False):
    # The same two matmuls with the full weights as plain nn.Linear layers, on this process alone.
    linears = []
    for layer in (first, second):
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.weight.full_tensor())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.full_tensor())
        linears.append(linear)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = linears[1](linears[0](x_ref))
    (y_ref.square().sum()).backward()
    x_local = x.detach().chunk(2, dim=1)[rank].clone() if shard_sequence else x.detach().clone()
    x_local.requires_grad_()
    y = second(first(x_local))
    y.square().sum().backward()  # under sequence parallel: this rank's tokens' share of the same sum
    reduce_partial_gradients([*first.parameters(), *second.parameters()])
    expected_y = y_ref.chunk(2, dim=1)[rank] if shard_sequence else y_ref
    expected_dx = x_ref.grad.chunk(2, dim=1)[rank] if shard_sequence else x_ref.grad
    errors = {"output": relative_error(y, expected_y), "input grad": relative_error(x_local.grad, expected_dx)}
    for layer, linear in zip((first, second), linears):
        for name, param in layer.named_parameters():
            assert param.grad.placements == param.placements, (name, param.grad.placements)
            reference = getattr(linear, name).grad
            errors[f"{type(layer).__name__}.{name} grad"] = relative_error(param.grad.full_tensor(), reference)
    assert max(errors.values()) < 1e-5, errors
    return errors


torch.manual_seed(0)  # the input: the same on every rank
x = torch.randn(2, 8, 2048)
assert q_proj.weight.to_local().shape == (1024, 2048) and o_proj.weight.to_local().shape == (2048, 1024)
check_against_plain_linears(q_proj, o_proj, x)

# Biases (each added once), a gathered output feeding a row layer that slices its own input,
# and sequence parallelism (input and output split along the sequence), on a small shape.
x = torch.randn(2, 8, 16)
column = ColumnParallelLinear(16, 24, ps.get_tp_group(), bias=True, gather_output=True)
row = RowParallelLinear(24, 16, ps.get_tp_group(), bias=True, input_is_parallel=False)
check_against_plain_linears(column, row, x)
column = ColumnParallelLinear(16, 24, ps.mesh["tp"], bias=True, sequence_parallel=True)
row = RowParallelLinear(24, 16, ps.mesh["tp"], bias=True, sequence_parallel=True)
check_against_plain_linears(column, row, x, shard_sequence=True)
print("SEED OK", rank)
"""


@pytest.mark.slow
def test_seed_example_runs_unchanged_under_torchrun(tmp_path):
    """The issue's seed example in a 2-process CPU job; outputs and gradients equal plain nn.Linear's."""
    assert run_seed_example(SEED_EXAMPLE, tmp_path).count("SEED OK") == 2


def _block_collectives() -> dict:
    """Counts the collectives of one block's forward and backward, with and without sequence parallel;
    and checks the per-rank dropout generator."""

    class CommCounter(TorchDispatchMode):
        """The functional collectives DTensor issues (the ``_c10d_functional`` ops), and the elements
        each moves: its input (all-reduce, reduce-scatter) or its output (all-gather).

        Not torch's ``CommDebugMode``: its module tracker fails on a module called twice in one
        forward (the block's residual dropout) in torch 2.13."""

        def __init__(self):
            super().__init__()
            self.counts, self.elements = collections.Counter(), collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            op = func.name().split("::")[-1].removesuffix("_")
            if func.namespace in ("_c10d_functional", "c10d") and not op.startswith(("wait", "_")):
                self.counts[op] += 1
                self.elements[op] += (out if "all_gather" in op else args[0]).numel()
            return out

    ps = ParallelState(tp=2)
    mesh, rank = ps.mesh["tp"], dist.get_rank()
    cfg = compose().model
    results = {}
    for sp in (False, True):
        with torch.device("meta"):
            model = Llama(cfg)
        apply_tensor_parallel(model, mesh, sequence_parallel=sp)
        materialize_and_init(model, torch.device("cpu"), 0)
        block = model.layers["0"]
        batch, seq = 2, 16
        torch.manual_seed(0)
        x = torch.randn(batch, seq, cfg.dim)
        x = (x.chunk(2, dim=1)[rank] if sp else x).requires_grad_()
        cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
        with CommCounter() as forward:
            y = block(x, cos, sin)
        with CommCounter() as backward:
            y.sum().backward()
        results[sp] = {
            "forward": dict(forward.counts),
            "backward": dict(backward.counts),
            "volume": dict(forward.elements),
            "activation": batch * seq * cfg.dim,
        }

    class Draw(torch.nn.Module):
        def forward(self):
            return torch.rand(4)

    draw = Draw()
    distinct_rng_per_rank(draw, mesh)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    sharded, replicated = draw(), torch.rand(4)
    torch.set_rng_state(state)  # what activation recompute does before replaying a forward
    replayed = draw()
    gathered = [None, None]
    dist.all_gather_object(gathered, (sharded, replicated, torch.equal(sharded, replayed)))
    results["rng"] = gathered
    return results


class _RankOne:  # what distinct_rng_per_rank reads of a mesh
    device_type = "cpu"

    @staticmethod
    def get_local_rank() -> int:
        return 1


@pytest.mark.parametrize("rate, forks", [(0.0, False), (0.1, True)])
def test_rank_streams_only_for_modules_that_drop(rate, forks):
    """An attention op or dropout that drops nothing draws nothing: it runs unwrapped (so a compiled
    block traces it whole); one that drops draws its rank's seed from the shared generator first."""
    for module in (SDPA(rate), torch.nn.Dropout(rate)):
        distinct_rng_per_rank(module, _RankOne())
        x = torch.randn(1, 2, 8, 4)
        state = torch.get_rng_state()
        module(x, x, x) if isinstance(module, SDPA) else module(x)
        assert (not torch.equal(state, torch.get_rng_state())) == forks, type(module).__name__


@pytest.mark.slow
def test_block_collectives_and_dropout_rng(pools):
    """One block's forward: 2 all-reduces; under sequence parallel 2 all-gathers and 2
    reduce-scatters moving the same number of elements. Backward mirrors them (f's all-reduce;
    g-bar's reduce-scatter, g's all-gather). Dropout draws differ across ranks where activations are sharded."""

    results, _ = pools.run(2, _block_collectives)
    plain, sp = results[False], results[True]
    activation = plain["activation"]  # elements of one (batch, seq, dim) activation
    assert plain["forward"] == {"all_reduce": 2}
    assert plain["volume"] == {"all_reduce": 2 * activation}
    assert plain["backward"] == {"all_reduce": 2}
    assert sp["forward"] == {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}
    assert sp["volume"] == {"all_gather_into_tensor": 2 * activation, "reduce_scatter_tensor": 2 * activation}
    assert sp["backward"] == {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}
    (sharded0, replicated0, replay0), (sharded1, replicated1, replay1) = results["rng"]
    assert not torch.equal(sharded0, sharded1)  # per-rank masks where activations are sharded
    assert torch.equal(replicated0, replicated1)  # the shared generator stays in step
    assert replay0 and replay1  # recompute replays the same masks


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel=tp", "parallel.tp.size=3"], "parallel.tp.size=3 does not divide model.n_heads=4"),
        (
            ["parallel=tp", "parallel.tp.size=4", "trainer.devices=4"],
            "parallel.tp.size=4 does not divide model.n_kv_heads=2",
        ),
        (["parallel=tp", "parallel.tp.size=2", "model.vocab_size=257"], "does not divide model.vocab_size=257"),
        (
            ["parallel=tp", "parallel.tp.size=2", "trainer.devices=3"],
            "parallel.tp.size=2 does not divide the world size 3",
        ),
        (["parallel=dp+tp", "trainer.devices=2"], "use parallel=tp, or parallel=fsdp\\+tp"),
    ],
    ids=["heads", "kv-heads", "vocab", "world", "dp+tp"],
)
def test_tp_sizes_that_do_not_divide_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check(compose([*FAST, *overrides]))
