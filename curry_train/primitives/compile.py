"""``torch.compile`` per transformer block, in the place of the parallelize order where it composes with
every layout.

Each block's ``forward`` is compiled in place (``block.forward = torch.compile(block.forward)``), after
recompute has wrapped it and before FSDP or DDP wrap the block: the compiler sees the recompute policy
(it traces ``torch.utils.checkpoint`` and its selective contexts), while FSDP's all-gathers and
reduce-scatters stay in the eager hooks around the compiled call, as in torchtitan. Parameter names do
not change, so checkpoints load compiled or not. Blocks are compiled one by one because they repeat:
dynamo treats each block's parameters as inputs of one graph, so a model of L blocks compiles the
block once, not L times.

What does not compile runs eagerly between graphs (``fullgraph=False``):

* context parallelism's attention (``ContextParallelAttention``: an autograd Function that sends key and
  value blocks around the ring with point-to-point collectives) is excluded on purpose (its ``forward``
  is decorated with ``torch._dynamo.disable``), one graph break in each block: the projections, RoPE, norms and MLP
  before and after it still compile;
* a mixture of experts' routing counts become Python numbers (``tolist``) for the dispatch, a graph
  break there; the expert matmuls' shapes change from step to step, which dynamo handles with
  dynamic shapes after its first recompilation.

``compile.backend``: ``inductor`` (C++ on CPU, Triton on CUDA), or ``aot_eager`` (the same graphs, run
by eager kernels: what the layout tests use to check composition without inductor's compile time).
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from curry_train.options import COMPILE_BACKENDS


def compile_blocks(blocks: Iterable[nn.Module], backend: str = "inductor", retain_graph: bool = False) -> int:
    """Compile each block's ``forward`` in place; returns how many were compiled.

    ``retain_graph``: the backward runs in two passes over one graph (the zero-bubble pipeline
    schedules take the input gradient first, the weight gradient later). The compiled backward then
    must not free ("donate") its saved buffers in the first pass."""
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile.backend={backend!r}: expected one of {', '.join(COMPILE_BACKENDS)}")
    if retain_graph:
        torch._functorch.config.donated_buffer = False
    count = 0
    for block in blocks:
        block.forward = _with_own_inputs(torch.compile(block.forward, backend=backend, fullgraph=False))
        count += 1
    return count


def _with_own_inputs(compiled):
    """``compiled`` called with each plain-tensor argument that lives in a tensor subclass copied first.

    Tensor parallelism's vocabulary-parallel embedding returns ``DTensor.to_local()`` of an all-reduce:
    a view whose storage is the collective's ``AsyncCollectiveTensor``. Given it, the compiled graph
    rebuilds the input from that subclass and the gradient skips ``to_local``'s backward: it reaches
    DTensor's redistribution as a plain tensor and fails. The copy (one activation: the first block's
    input) is a plain tensor with its own autograd edge."""

    @functools.wraps(compiled)
    def forward(*args, **kwargs):
        return compiled(*(_own(arg) for arg in args), **kwargs)

    return forward


def _own(value):
    if isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
        base = value._base if value._is_view() else None
        if type(value) is not torch.Tensor or (base is not None and type(base) is not torch.Tensor):
            return value.clone()
    return value
