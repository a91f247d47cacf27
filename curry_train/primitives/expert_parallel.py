"""ExpertParallel: a MoE layer's experts split over ranks, tokens sent to them with all-to-all.

``ExpertParallel.wrap(moe_layer, ep_group=ps.get_ep_mesh())`` keeps ``E / ep`` of the layer's E
experts on each rank (``Shard(0)`` DTensors of the stacked expert weights, so optimizers, gradient
norms and DCP checkpoints see the whole layer and reshard it across ep sizes) and replaces the
layer's dispatcher with one that, for each forward:

1. exchanges the counts first: rank r tells every rank how many of its tokens go to each of that
   rank's experts (one small ``all_to_all_single``), so every rank knows how much it will receive;
2. sends the tokens, already sorted by expert, to their experts' ranks (``all_to_all_single`` with
   uneven splits: dropless, nothing padded), regroups what arrived by local expert, runs the local
   experts, and sends the outputs back the same way;
3. hands the outputs back in the order the layer sorted them; the layer weighs and combines.

Both exchanges are differentiable (their backward is the reverse exchange), so each expert's
gradient sums the contributions of the tokens of every rank of its group. The ranks of the group
hold distinct tokens (they are borrowed from the data-parallel and context-parallel ranks, as in
torchtitan and Megatron-LM); the experts' gradients are then summed over the ranks expert
parallelism leaves (``ParallelState.submesh("edp")``), where FSDP also shards them.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from curry_train.model.moe import Experts, MoE
from curry_train.options import EP_DISPATCHERS
from curry_train.primitives.parallel_state import all_gather_single, reduce_scatter_single


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; backward sends the gradients back the other way."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, send: list[int], receive: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        out = x.new_empty((sum(receive), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None]:
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.receive, group=ctx.group)
        return out, None, None, None


def all_to_all(x: Tensor, send: list[int], receive: list[int], group: dist.ProcessGroup) -> Tensor:
    """Rows ``send[i]`` of ``x`` (in order) to rank i of ``group``; ``receive[i]`` rows from rank i."""
    return _AllToAll.apply(x, send, receive, group)


class AllToAllDispatch:
    """The layer's dispatcher under expert parallelism (module docstring)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)

    def __call__(self, experts: Experts, tokens: Tensor, counts: Tensor) -> Tensor:
        """tokens: (N, dim) sorted by global expert; counts: (E,) tokens per global expert."""
        local_experts = counts.numel() // self.size
        # 1. counts first: received[i, e] = tokens rank i sends to my local expert e
        sent_counts = counts.reshape(self.size, local_experts)
        received_counts = torch.empty_like(sent_counts)
        dist.all_to_all_single(received_counts, sent_counts.contiguous(), group=self.group)
        send = sent_counts.sum(1).tolist()
        receive = received_counts.sum(1).tolist()
        # 2. tokens to their experts' ranks; regroup the arrivals (by source, then expert) by expert
        arrived = all_to_all(tokens, send, receive, self.group)
        expert_of_row = torch.repeat_interleave(
            torch.arange(local_experts, device=counts.device).repeat(self.size), received_counts.flatten()
        )
        order = torch.argsort(expert_of_row, stable=True)
        out = experts(arrived[order], received_counts.sum(0))
        back = torch.empty_like(out).index_copy_(0, order, out)  # undo the regrouping
        # 3. the outputs back to the tokens' ranks, in the order they were sent
        return all_to_all(back, receive, send, self.group)


_all_gather = all_gather_single
_reduce_scatter = reduce_scatter_single


class _AllGather(torch.autograd.Function):
    """Every rank's equal-sized ``x`` stacked in rank order; backward reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), group=ctx.group)
        return out, None


class _ReduceScatter(torch.autograd.Function):
    """Each rank's part of the sum of every rank's ``x``; backward all-gathers the gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
        _reduce_scatter(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.new_empty((dist.get_world_size(ctx.group) * grad.shape[0], *grad.shape[1:]))
        _all_gather(out, grad.contiguous(), group=ctx.group)
        return out, None


class AllGatherDispatch:
    """Megatron-LM's all-gather dispatcher: every rank gathers every rank's routed tokens (padded to
    the longest), runs its own experts on the rows routed to them, and a reduce-scatter returns each
    rank's rows (each pick is computed on exactly one rank, the others add zeros, so the sum is exact).
    It moves ``ep`` times the all-to-all's volume, in collectives every backend has in its fastest
    form; the all-to-all dispatcher is the default."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __call__(self, experts: Experts, tokens: Tensor, counts: Tensor) -> Tensor:
        local_experts = counts.numel() // self.size
        every = counts.new_empty(self.size * counts.numel())
        _all_gather(every, counts.contiguous(), group=self.group)
        every = every.view(self.size, counts.numel())  # picks of rank r for expert e
        rows = every.sum(1)  # picks of each rank
        longest = int(rows.max())
        padded = torch.cat([tokens, tokens.new_zeros(longest - tokens.shape[0], *tokens.shape[1:])])
        gathered = _AllGather.apply(padded, self.group)  # (size * longest, dim)
        # the rows of my experts in each rank's block (sorted by expert there): contiguous runs
        starts = torch.cumsum(every, 1) - every
        mine = slice(self.rank * local_experts, (self.rank + 1) * local_experts)
        lengths = every[:, mine].flatten()  # by (source, local expert)
        begins = (torch.arange(self.size, device=counts.device) * longest).unsqueeze(1) + starts[:, mine]
        run_start = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        offset = torch.arange(int(lengths.sum()), device=counts.device) - run_start
        index = torch.repeat_interleave(begins.flatten(), lengths) + offset
        expert_of_row = torch.repeat_interleave(
            torch.arange(local_experts, device=counts.device).repeat(self.size), lengths
        )
        order = torch.argsort(expert_of_row, stable=True)  # by local expert, then source
        out = experts(gathered[index[order]], every[:, mine].sum(0))
        placed = gathered.new_zeros((self.size * longest, out.shape[-1])).index_add(0, index[order], out)
        return _ReduceScatter.apply(placed, self.group)[: tokens.shape[0]]


DISPATCHERS = dict(zip(EP_DISPATCHERS, (AllToAllDispatch, AllGatherDispatch), strict=True))  # options' names


class ExpertParallel:
    """Namespace of the seed API: ``ExpertParallel.wrap(moe_layer, ep_group=...)``."""

    @staticmethod
    def wrap(
        moe: MoE,
        ep_group: Union[DeviceMesh, dist.ProcessGroup],
        *,
        dispatcher: str = "alltoall",
        device_type: Optional[str] = None,
    ) -> MoE:
        """Shard ``moe``'s experts over ``ep_group`` (a 1-D ``DeviceMesh`` such as
        ``ParallelState.get_ep_mesh()``, or a process group) and dispatch its tokens with
        ``dispatcher``: ``alltoall`` (default; counts first, dropless) or ``allgather``
        (``AllGatherDispatch``).

        May be called on a meta-device layer (the stacked weights become ``Shard(0)`` DTensors and
        ``materialize_and_init`` fills this rank's experts). Pass the mesh from the run's
        ``ParallelState`` when FSDP will wrap the experts too: FSDP needs both meshes from one root.
        """
        if dispatcher not in DISPATCHERS:
            raise ValueError(f"dispatcher={dispatcher!r}: expected one of {', '.join(DISPATCHERS)}")
        if isinstance(ep_group, DeviceMesh):
            mesh = ep_group
        else:
            device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
            mesh = DeviceMesh.from_group(ep_group, device_type)
        if mesh.ndim != 1:
            raise ValueError(f"ep_group: expected a 1-D mesh, got {mesh.ndim} dimensions")
        size, rank = mesh.size(), mesh.get_local_rank()
        experts = moe.experts
        if experts.n_experts % size:
            raise ValueError(f"{experts.n_experts} experts cannot be split evenly over {size} expert-parallel ranks")
        local = experts.n_experts // size
        for name, param in list(experts.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                raise ValueError(f"experts.{name} is already a DTensor: wrap each MoE layer once, before FSDP")
            shard = param.detach()[rank * local : (rank + 1) * local]
            sharded = DTensor.from_local(
                shard, mesh, [Shard(0)], run_check=False, shape=param.shape, stride=param.stride()
            )
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        moe.dispatch = DISPATCHERS[dispatcher](mesh.get_group())
        return moe
