"""Communication volume: the collectives a piece of code issues, counted as they are dispatched.

``CommCounter`` is a ``TorchDispatchMode``: every op dispatched while it is active passes through it,
and it books the communication ops by collective: how many calls, how many elements and how many
bytes each moved on this rank. What it sees:

* ``c10d::*`` ops: every ``torch.distributed`` call on a ``ProcessGroup`` (``dist.all_reduce`` and
  friends, FSDP2's all-gathers and reduce-scatters, a DDP communication hook written in Python such
  as curry-train's, the pipeline schedule's send/recv, torchmetrics' syncs);
* FSDP's gradient reduce-scatter on a CPU, which curry-train issues as an all-to-all
  (``AllToAllReduceScatter``): booked as the reduce-scatter it is, by its input;
* ``_c10d_functional::*`` ops: the functional collectives DTensor's redistributions issue (tensor
  and sequence parallelism) and ``torch.distributed._functional_collectives``.

A functional collective is booked once: while the mode handles an op it is off the mode stack, so
the ``c10d`` call a functional op makes underneath is not counted again. Ops on tensor subclasses
(DTensor) are declined (``NotImplemented``), so that the subclass runs first and the collectives it
issues inside its own dispatch (implicit redistributions, loss parallelism's reductions, a sharded
gradient norm's all-reduce) reach the mode as ops on plain tensors.

Bytes per call, by the tensors the collective is defined on (the convention of ``CommDebugMode`` and
of the usual volume formulas): all-gather its *output* (the gathered tensor, ``group size`` x the
input), all-reduce, reduce-scatter and all-to-all their *input*, broadcast, send and recv the tensors
they carry. These are bytes of the collective's operands, not bytes on the wire: a ring all-reduce
of B bytes over d ranks sends ``2 (d-1)/d B`` from each rank, a ring all-gather or reduce-scatter
``(d-1)/d B``.

Not torch's ``CommDebugMode``: its module tracker fails with FSDP2 and with a module called twice
in one forward (torch 2.13). What a dispatch mode cannot see: collectives issued on a thread the
mode is not active on. The autograd engine carries the mode (thread-local state) into backward, on
CPU the calling thread itself: DDP's gradient all-reduce, issued by curry-train's Python
communication hook from backward, is counted here, exactly its buckets' bytes (``ddp_bucket_bytes``,
tests/test_bench.py). On CUDA (autograd's device threads) this was not checked: compare the two.
"""

from __future__ import annotations

import collections
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from curry_train.primitives.distributed_optimizer import issuing_reduce_scatter

# The collectives reported, in table order; anything else (reduce, gather, scatter, barrier) is "other".
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send", "recv", "other")

# (namespace, op name) -> (collective, the argument whose tensors are counted; "return": the result)
_OPS: dict[tuple[str, str], tuple[str, str]] = {
    # ProcessGroup through the dispatcher (torch.distributed.*, FSDP2, DDP comm hooks, pipelining).
    ("c10d", "allreduce_"): ("all_reduce", "tensors"),
    ("c10d", "allreduce_coalesced_"): ("all_reduce", "tensors"),
    ("c10d", "allgather_"): ("all_gather", "output_tensors"),
    ("c10d", "_allgather_base_"): ("all_gather", "output_tensor"),
    ("c10d", "allgather_coalesced_"): ("all_gather", "output_lists"),
    ("c10d", "allgather_into_tensor_coalesced_"): ("all_gather", "outputs"),
    ("c10d", "reduce_scatter_"): ("reduce_scatter", "input_tensors"),
    ("c10d", "_reduce_scatter_base_"): ("reduce_scatter", "input_tensor"),
    ("c10d", "reduce_scatter_tensor_coalesced_"): ("reduce_scatter", "inputs"),
    ("c10d", "alltoall_"): ("all_to_all", "input_tensors"),
    ("c10d", "alltoall_base_"): ("all_to_all", "input"),
    ("c10d", "broadcast_"): ("broadcast", "tensors"),
    ("c10d", "send"): ("send", "tensors"),
    ("c10d", "recv_"): ("recv", "tensors"),
    ("c10d", "recv_any_source_"): ("recv", "tensors"),
    ("c10d", "reduce_"): ("other", "tensors"),
    ("c10d", "gather_"): ("other", "input_tensors"),
    ("c10d", "scatter_"): ("other", "output_tensors"),
    ("c10d", "barrier"): ("other", ""),
    ("c10d", "monitored_barrier_"): ("other", ""),
    # Functional collectives (DTensor, torch.distributed._functional_collectives).
    ("_c10d_functional", "all_reduce"): ("all_reduce", "input"),
    ("_c10d_functional", "all_reduce_"): ("all_reduce", "input"),
    ("_c10d_functional", "all_reduce_coalesced"): ("all_reduce", "inputs"),
    ("_c10d_functional", "all_reduce_coalesced_"): ("all_reduce", "inputs"),
    ("_c10d_functional", "all_gather_into_tensor"): ("all_gather", "return"),
    ("_c10d_functional", "all_gather_into_tensor_out"): ("all_gather", "return"),
    ("_c10d_functional", "all_gather_into_tensor_coalesced"): ("all_gather", "return"),
    ("_c10d_functional", "reduce_scatter_tensor"): ("reduce_scatter", "input"),
    ("_c10d_functional", "reduce_scatter_tensor_out"): ("reduce_scatter", "input"),
    ("_c10d_functional", "reduce_scatter_tensor_coalesced"): ("reduce_scatter", "inputs"),
    ("_c10d_functional", "all_to_all_single"): ("all_to_all", "input"),
    ("_c10d_functional", "broadcast"): ("broadcast", "input"),
    ("_c10d_functional", "broadcast_"): ("broadcast", "input"),
    ("_c10d_functional", "isend"): ("send", "tensor"),
    ("_c10d_functional", "irecv"): ("recv", "tensor"),
}


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value`` (a tensor, or nested lists and tuples of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


class CommCounter(TorchDispatchMode):
    """Counts the collectives dispatched while active (see the module docstring): per collective,
    ``ops`` (calls), ``elements`` and ``bytes`` on this rank. ``to_dict()`` gives them as
    ``{collective: {"ops": .., "elements": .., "bytes": ..}}`` for every collective that ran.

        with CommCounter() as comm:
            step()
        comm.bytes["all_reduce"]
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.elements: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if any(t not in (torch.Tensor, nn.Parameter) for t in types):
            # A tensor subclass (DTensor, FSDP2's parameters): modes run before subclasses, and the
            # subclass's own collectives (a redistribution, loss parallelism's reductions) would run
            # while this mode is off the stack. Declining lets the subclass run first and desugar
            # into ops on plain tensors, which come back here (as in CommDebugMode).
            return NotImplemented
        out = func(*args, **kwargs)
        entry = _OPS.get((func.namespace, func._schema.name.split("::", 1)[-1]))
        if entry is not None:
            self.book(func, entry, args, kwargs, out)
        return out

    def book(self, func: Any, entry: tuple[str, str], args: tuple, kwargs: dict, out: Any) -> None:
        collective, operand = entry
        if collective == "all_to_all" and issuing_reduce_scatter():
            collective = "reduce_scatter"  # FSDP's gradient reduce-scatter, as an all-to-all on a CPU
        if operand == "return":
            tensors = _tensors(out)
        elif operand:
            names = [argument.name for argument in func._schema.arguments]
            bound = {**dict(zip(names, args, strict=False)), **kwargs}
            tensors = _tensors(bound.get(operand))
        else:
            tensors = []
        self.ops[collective] += 1
        self.elements[collective] += sum(t.numel() for t in tensors)
        self.bytes[collective] += sum(t.numel() * t.element_size() for t in tensors)

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {
            name: {"ops": self.ops[name], "elements": self.elements[name], "bytes": self.bytes[name]}
            for name in COLLECTIVES
            if self.ops[name]
        }


def ddp_bucket_bytes(model: nn.Module) -> Optional[list[int]]:
    """The bytes of each of a ``DistributedDataParallel`` model's gradient buckets, from DDP's own
    logging data (what its reducer all-reduces once per synchronized backward); None for any other
    model or where DDP does not report them."""

    if not isinstance(model, DistributedDataParallel):
        return None
    try:
        sizes = model._get_ddp_logging_data().get("bucket_sizes")
    except (AttributeError, RuntimeError):
        return None
    if isinstance(sizes, str):  # DDP logs lists as comma-separated strings
        sizes = [int(size) for size in sizes.split(",") if size.strip()]
    return [int(size) for size in sizes] if sizes else None
