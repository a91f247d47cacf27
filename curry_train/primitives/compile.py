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

from typing import Iterable

import torch
from torch import nn

BACKENDS = ("inductor", "aot_eager", "eager")  # compile.backend


def compile_blocks(blocks: Iterable[nn.Module], backend: str = "inductor") -> int:
    """Compile each block's ``forward`` in place; returns how many were compiled."""
    if backend not in BACKENDS:
        raise ValueError(f"compile.backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    count = 0
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend, fullgraph=False)
        count += 1
    return count
