"""Tensor parallelism (Megatron-LM; Shoeybi et al., 2019) and sequence parallelism (Korthikanti et al., 2022).

A transformer block's matmuls are split over the ``tp`` ranks of a group so that no rank holds a
whole weight matrix:

``ColumnParallelLinear``  ``Linear(in, out)`` split along ``out``: each rank holds
                          ``Linear(in, out / tp)`` and computes its slice of the output features
                          (attention heads, MLP hidden units). No communication in forward.
``RowParallelLinear``     ``Linear(in, out)`` split along ``in``: each rank holds
                          ``Linear(in / tp, out)``, takes its slice of the input features (the
                          column layer's output) and produces a partial sum; the partial sums are
                          all-reduced, so a block costs two all-reduces (after attention and MLP).

Megatron names the two conjugate collectives ``f`` (identity forward, all-reduce of the input's
gradient backward: entering the parallel region) and ``g`` (all-reduce forward, identity backward:
leaving it). Sequence parallelism replaces them with ``g-bar`` / ``g``: between blocks the
activations are split along the sequence, so norms and dropout work on ``1/tp`` of the tokens;
entering the region all-gathers the sequence (reduce-scatter of the gradient), leaving it
reduce-scatters the partial sums along the sequence instead of all-reducing them. An all-reduce is
a reduce-scatter followed by an all-gather, so the traffic is the same and the saved activation
memory is free.

The parameters are ``DTensor``s on the tensor-parallel mesh (column weight ``Shard(0)``, row weight
``Shard(1)``) and the forward is written with DTensor ops, so the collectives above and their
backward conjugates come from DTensor's redistribution rules rather than hand-written autograd
functions; and so the layers compose with FSDP2 on a 2-D mesh and with DCP's resharding.
Activations between layers are plain local tensors, as in Megatron.

``apply_tensor_parallel`` applies a model's ``plan`` (see ``curry_train.model.SplitPlan``).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import RowwiseParallel, SequenceParallel, parallelize_module

TPGroup = Union[dist.ProcessGroup, DeviceMesh]
SEQUENCE_DIM = 1  # activations are (batch, seq, features)


def tp_mesh(tp_group: TPGroup) -> DeviceMesh:
    """The 1-D mesh of ``tp_group``. Pass the ``DeviceMesh`` (``ParallelState.mesh["tp"]``) when the
    parameters must compose with FSDP2, which needs both meshes to come from one root mesh."""
    if isinstance(tp_group, DeviceMesh):
        if tp_group.ndim != 1:
            raise ValueError(f"tp_group: expected a 1-D mesh, got {tp_group.ndim}-D {tp_group}")
        return tp_group
    device_type = "cuda" if "nccl" in str(dist.get_backend(tp_group)) else "cpu"
    return DeviceMesh.from_group(tp_group, device_type)


def enter_parallel_region(x: Tensor, mesh: DeviceMesh, sequence_parallel: bool) -> DTensor:
    """The input every rank of a column-parallel layer needs, whole: Megatron's ``f`` (identity
    forward, all-reduce of the gradient) or, for sequence shards, ``g-bar`` (all-gather forward,
    reduce-scatter backward). A ``DTensor`` input (already entered, shared by several layers) is
    only redistributed, so one gather serves Q, K and V, and their gradients are summed before the
    one reduction."""
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [Shard(SEQUENCE_DIM) if sequence_parallel else Replicate()], run_check=False)
    if x.placements == (Replicate(),):
        return x  # not even a no-op redistribute: its backward would reduce each layer's gradient apart
    return x.redistribute(mesh, [Replicate()])


def gather_input_once(module: nn.Module, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Enter the parallel region at ``module``'s first argument (e.g. an attention or MLP block
    whose column-parallel layers share one input): one collective per module, not per layer."""

    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (enter_parallel_region(args[0], mesh, sequence_parallel), *args[1:])

    module.register_forward_pre_hook(hook)


def _parameter(
    local_shape: tuple[int, ...],
    global_shape: tuple[int, ...],
    mesh: DeviceMesh,
    placement: Placement,
    bound: float,
    device,
    dtype,
) -> nn.Parameter:
    """A DTensor parameter. On the meta device only shapes exist (``primitives.materialize`` initializes later);
    elsewhere the full tensor gets nn.Linear's init U(-bound, bound) and rank 0's draw is scattered,
    so the shards are slices of one matrix whatever each rank's RNG state."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "meta":
        local = torch.empty(local_shape, device=device, dtype=dtype)
        stride = torch.empty(global_shape, device="meta").stride()
        return nn.Parameter(
            DTensor.from_local(local, mesh, [placement], run_check=False, shape=torch.Size(global_shape), stride=stride)
        )
    full = torch.empty(global_shape, device=device, dtype=dtype).uniform_(-bound, bound)
    return nn.Parameter(distribute_tensor(full, mesh, [placement]))


def _divide(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise ValueError(f"{what}={size} is not divisible by the tensor-parallel size {tp}")
    return size // tp


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` (out, in) split by rows: each rank computes ``out / tp`` features.

    ``gather_output``: all-gather the output features (every rank gets ``out``); otherwise each rank
    returns its slice, which a following ``RowParallelLinear`` consumes directly.
    ``sequence_parallel``: a plain-tensor input is this rank's sequence shard (all-gathered first).
    ``use_local_output=False`` returns the ``DTensor`` (sharded on the last dim unless gathered), e.g.
    logits for ``torch.distributed.tensor.parallel.loss_parallel``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp_group: TPGroup,
        bias: bool = False,
        gather_output: bool = False,
        *,
        sequence_parallel: bool = False,
        use_local_output: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.mesh = tp_mesh(tp_group)
        tp = self.mesh.size()
        local_out = _divide(out_features, tp, "ColumnParallelLinear out_features")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel, self.use_local_output = (
            gather_output,
            sequence_parallel,
            use_local_output,
        )
        bound = 1 / math.sqrt(in_features) if in_features else 0.0
        self.weight = _parameter(
            (local_out, in_features), (out_features, in_features), self.mesh, Shard(0), bound, device, dtype
        )
        self.bias = (
            _parameter((local_out,), (out_features,), self.mesh, Shard(0), bound, device, dtype) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp_group: TPGroup, **kwargs):
        """The parallel version of ``linear`` (on its device; its values sliced unless on the meta device)."""
        return _from_linear(cls, linear, tp_group, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        x = enter_parallel_region(x, self.mesh, self.sequence_parallel)
        y = F.linear(x, self.weight, self.bias)
        if getattr(self, "lora_a", None) is not None:  # A whole, B split like W: the adapters' slice of y
            y = y + low_rank(self, x)
        if self.gather_output:
            y = y.redistribute(self.mesh, [Replicate()])  # all-gather forward; backward keeps each rank's slice
        return y.to_local() if self.use_local_output else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} (/{self.mesh.size()}), "
            f"bias={self.bias is not None}, gather_output={self.gather_output}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` (out, in) split by columns: each rank multiplies its ``in / tp``
    input features and the partial products are summed over the ranks (all-reduce; under
    ``sequence_parallel`` a reduce-scatter that leaves each rank its sequence shard).

    ``input_is_parallel``: the input is already this rank's slice of the features (a column layer's
    output); otherwise it is the whole input, and each rank takes its slice. The bias is added once,
    after the reduction (adding it per rank would count it ``tp`` times).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp_group: TPGroup,
        bias: bool = False,
        input_is_parallel: bool = True,
        *,
        sequence_parallel: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.mesh = tp_mesh(tp_group)
        tp = self.mesh.size()
        local_in = _divide(in_features, tp, "RowParallelLinear in_features")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        bound = 1 / math.sqrt(in_features) if in_features else 0.0
        self.weight = _parameter(
            (out_features, local_in), (out_features, in_features), self.mesh, Shard(1), bound, device, dtype
        )
        self.bias = (
            _parameter((out_features,), (out_features,), self.mesh, Replicate(), bound, device, dtype) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp_group: TPGroup, **kwargs):
        """The parallel version of ``linear`` (on its device; its values sliced unless on the meta device)."""
        return _from_linear(cls, linear, tp_group, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, DTensor):
            if self.input_is_parallel:
                x = DTensor.from_local(x, self.mesh, [Shard(x.ndim - 1)], run_check=False)
            else:  # keep this rank's slice; backward all-gathers the slices
                x = DTensor.from_local(x, self.mesh, [Replicate()], run_check=False).redistribute(
                    self.mesh, [Shard(x.ndim - 1)]
                )
        partial = F.linear(x, self.weight)  # Partial(): each rank's product of its slices
        if getattr(self, "lora_a", None) is not None:  # A split like W's inputs: a partial sum, reduced with it
            partial = partial + low_rank(self, x)
        y = partial.redistribute(self.mesh, [Shard(SEQUENCE_DIM) if self.sequence_parallel else Replicate()])
        if self.bias is not None:
            y = y + self.bias
        return y.to_local()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (/{self.mesh.size()}), out_features={self.out_features}, "
            f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


def low_rank(layer: nn.Module, x: Tensor) -> Tensor:
    """A LoRA-adapted layer's adapter term, ``(alpha / rank) B A dropout(x)`` (``primitives/lora.py``)."""
    return F.linear(F.linear(layer.lora_dropout(x), layer.lora_a), layer.lora_b) * layer.lora_scale


def lora_placements(layer: nn.Module) -> tuple[Placement, Placement]:
    """How a parallel layer's adapters are split so that they follow it: a column layer's ``A`` whole and
    ``B`` by output rows, like ``W``; a row layer's ``A`` by input columns, like ``W``, and ``B`` whole."""
    return (Replicate(), Shard(0)) if isinstance(layer, ColumnParallelLinear) else (Shard(1), Replicate())


def _from_linear(cls: type, linear: nn.Linear, tp_group: TPGroup, **kwargs) -> nn.Module:
    layer = cls(
        linear.in_features,
        linear.out_features,
        tp_group,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
        **kwargs,
    )
    _copy_shards(layer, linear)
    return layer


@torch.no_grad()
def _copy_shards(layer: nn.Module, linear: nn.Linear) -> None:
    for name in ("weight", "bias"):
        source, target = getattr(linear, name), getattr(layer, name)
        if source is not None and not source.is_meta:
            shard = distribute_tensor(source.detach(), layer.mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(shard.to_local())


def reduce_partial_gradients(parameters) -> None:
    """Lay each DTensor gradient out like its parameter; above all, sum over the tensor-parallel
    ranks the gradients DTensor left pending (``Partial``).

    A replicated parameter used on sequence shards (a norm's weight, a row layer's bias under
    sequence parallelism) gets from each rank the gradient of its tokens only; autograd accumulates
    these as a ``Partial`` DTensor. (torch's vocabulary-parallel embedding returns a ``Replicate``
    gradient for its ``Shard(0)`` weight: this keeps the rank's rows.) Call this once per step,
    after the last backward; FSDP2 does the same for the parameters it manages."""
    for param in parameters:
        grad = param.grad
        if isinstance(grad, DTensor) and grad.placements != param.placements:
            param.grad = grad.redistribute(grad.device_mesh, param.placements)


def distinct_rng_per_rank(module: nn.Module, mesh: DeviceMesh) -> None:
    """Make the randomness ``module`` draws (dropout masks) differ between the ranks of ``mesh``.

    Where the activations are sharded (attention heads, sequence shards), identical masks on every
    rank would correlate the dropout of different heads/tokens. Each call draws a seed from the
    default generator, which stays in step on all tensor-parallel ranks (and which activation
    recompute replays, so the recomputed masks equal the first ones), then runs the forward with
    the generator seeded by that seed plus this rank's index. Replicated activations keep the shared
    default generator, so their masks agree across ranks, as the math requires."""
    forward, rank = module.forward, mesh.get_local_rank()
    device_type = mesh.device_type

    # Eager on purpose under torch.compile: reseeding the generator does not trace, and a graph break
    # inside a tensor-parallel module would leave its DTensor input live across two graphs (DTensor's
    # backward then receives plain-tensor gradients). Skipping it is one clean break around this call.
    @torch._dynamo.disable
    def forward_on_rank_stream(*args, **kwargs):
        seed = int(torch.randint(0, 2**62, ()))
        devices = [torch.accelerator.current_device_index()] if device_type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            torch.manual_seed(seed + rank)
            return forward(*args, **kwargs)

    @functools.wraps(forward)
    def forward_with_rank_rng(*args, **kwargs):
        if not module.training or _dropout_rate(module) == 0:
            return forward(*args, **kwargs)  # draws nothing (the usual LLM setting): compiles whole
        return forward_on_rank_stream(*args, **kwargs)

    module.forward = forward_with_rank_rng


def _dropout_rate(module: nn.Module) -> Optional[float]:
    """The probability a dropout (``p``) or an attention op (``dropout``) drops with; None when the module
    names none (it may draw anything)."""
    rate = module.p if isinstance(module, nn.Dropout) else getattr(module, "dropout", None)
    return rate if isinstance(rate, (int, float)) else None


def apply_tensor_parallel(
    model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool = False, loss_parallel: bool = False
) -> None:
    """Split ``model`` in place over ``mesh`` as its ``plan`` declares (on the meta device: values
    are drawn later, so the weights are those of a single-process run whatever the tp size).

    * each block: the plan's column layers (QKV, MLP up/gate) and row layers (attention out, MLP
      down) become ``Column/RowParallelLinear``; their parents (attention, MLP) enter the parallel
      region once for all their column layers; the attention op, which sees this rank's heads only,
      draws distinct dropout masks per rank;
    * the embedding is split along the vocabulary (each rank looks up its rows, the partial
      embeddings are all-reduced, or reduce-scattered along the sequence);
    * the head is column-parallel: with ``loss_parallel`` its logits stay sharded over the
      vocabulary (a ``DTensor``) for ``loss_parallel()``'s cross-entropy, so no rank holds them all;
      otherwise they are all-gathered;
    * ``sequence_parallel``: between blocks, activations are this rank's sequence shard; norms and
      the residual dropout run on the shards (norm weights become replicated DTensors whose
      gradients are summed over the ranks, see ``reduce_partial_gradients``).
    """
    plan = model.plan
    sp = sequence_parallel
    if sp and hasattr(model, "sequence_shards"):
        model.sequence_shards = mesh.size()  # a later pipeline stage's input is the sequence shard
    for block in model.get_submodule(plan.blocks).values():
        column = [path for path in plan.column if _holds(block, path)]
        for path in column:
            _replace(block, path, ColumnParallelLinear.from_linear(block.get_submodule(path), mesh))
        for path in (path for path in plan.row if _holds(block, path)):
            _replace(block, path, RowParallelLinear.from_linear(block.get_submodule(path), mesh, sequence_parallel=sp))
        for parent in dict.fromkeys(path.rpartition(".")[0] for path in column):
            gather_input_once(block.get_submodule(parent), mesh, sp)
        distinct_rng_per_rank(block.get_submodule(plan.attention_op), mesh)
        if sp:
            for path in plan.norms:
                parallelize_module(block.get_submodule(path), mesh, SequenceParallel(use_local_output=True))
            for dropout in (m for m in block.modules() if isinstance(m, nn.Dropout)):
                distinct_rng_per_rank(dropout, mesh)
    if getattr(model, plan.embedding, None) is not None:
        output_layout = Shard(SEQUENCE_DIM) if sp else Replicate()
        parallelize_module(
            model.get_submodule(plan.embedding),
            mesh,
            RowwiseParallel(input_layouts=Replicate(), output_layouts=output_layout),
        )
    if sp and getattr(model, plan.final_norm, None) is not None:
        parallelize_module(model.get_submodule(plan.final_norm), mesh, SequenceParallel(use_local_output=True))
    if getattr(model, plan.head, None) is not None:
        head = ColumnParallelLinear.from_linear(
            model.get_submodule(plan.head),
            mesh,
            sequence_parallel=sp,
            gather_output=not loss_parallel,
            use_local_output=not loss_parallel,
        )
        _replace(model, plan.head, head)


def _holds(block: nn.Module, path: str) -> bool:
    """Whether ``block`` has the plan's linear at ``path``: a mixture-of-experts block has no dense
    MLP, and its router and experts stay whole on every tensor-parallel rank (they see the same
    tokens there, so they compute the same values and gradients)."""
    try:
        return isinstance(block.get_submodule(path), nn.Linear)
    except AttributeError:
        return False


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
