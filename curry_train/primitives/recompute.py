"""Activation recompute (Chen et al., 2016; selective: Korthikanti et al., 2022).

The first thing to try when one device runs out of memory, before any model parallelism: keep
fewer activations in forward and recompute them in backward.

=============  ===================================================================================
``none``       keep every activation.
``full``       each block keeps only its input; its whole forward runs again in backward.
``selective``  ``every_n_blocks=0``: in every block, keep the outputs of the expensive ops
               (matmuls, attention) and recompute the cheap, memory-hungry ones (norms,
               activations, RoPE, elementwise); ``every_n_blocks=n``: full recompute of every
               n-th block, none elsewhere.
=============  ===================================================================================

Per-op selective recompute keeps every matmul's output (``keep_matmuls="all"``), or every other one's in
each block (``"every_other"``: in this model's order wq, wv, w1 and w2 kept; wk, wo and w3 recomputed;
torchtitan's "op" policy). For a Llama 3 8B block at 8k tokens that runs 37% of its forward matmul FLOPs
again (12% more matmul time a step) and keeps 38% fewer bytes (docs/planning.md). The count restarts
with each block's forward and again with its recomputation, so both keep the same ones.

Blocks are changed in place (their ``forward`` is wrapped), so parameter names stay the same and
checkpoints load with or without recompute.
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from curry_train.options import RECOMPUTE_KEEP_MATMULS, RECOMPUTE_MODES

# Ops whose outputs are kept under per-op selective recompute: the FLOP-heavy ones.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.linear.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}
if hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"):
    _SAVED_OPS.add(torch.ops.aten._scaled_dot_product_cudnn_attention.default)


# The matmuls ``keep_matmuls="every_other"`` alternates over (a linear reaches the dispatcher as one of these).
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def _save_expensive_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _every_other_matmul_contexts():
    """One block forward's selective contexts that keep the 1st, 3rd, ... matmul's output and recompute the
    2nd, 4th, ...: counted apart in the forward and in its recomputation, which see the same matmuls in
    the same order."""
    seen = {False: 0, True: 0}  # by ctx.is_recompute

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in _MATMULS:
            seen[ctx.is_recompute] += 1
            if seen[ctx.is_recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return _save_expensive_ops(ctx, op, *args, **kwargs)

    return create_selective_checkpoint_contexts(policy)


def _wrap_forward(module: nn.Module, per_op: bool, keep_matmuls: str = "all") -> None:
    forward = module.forward
    context_fn = None
    if per_op:
        context_fn = (
            _every_other_matmul_contexts
            if keep_matmuls == "every_other"
            else functools.partial(create_selective_checkpoint_contexts, _save_expensive_ops)
        )

    @functools.wraps(forward)
    def recomputed(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        if context_fn is None:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    module.forward = recomputed


def apply_recompute(blocks: Iterable[nn.Module], mode: str, every_n_blocks: int = 0, keep_matmuls: str = "all") -> int:
    """Apply ``mode`` to ``blocks`` (in order); returns how many blocks now recompute."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={mode!r}: expected one of {', '.join(RECOMPUTE_MODES)}")
    if every_n_blocks < 0:
        raise ValueError(f"every_n_blocks={every_n_blocks} must be >= 0")
    if keep_matmuls not in RECOMPUTE_KEEP_MATMULS:
        raise ValueError(f"keep_matmuls={keep_matmuls!r}: expected one of {', '.join(RECOMPUTE_KEEP_MATMULS)}")
    if keep_matmuls != "all" and (mode != "selective" or every_n_blocks):
        raise ValueError(f"keep_matmuls={keep_matmuls!r} applies to per-op selective recompute only")
    if mode == "none":
        return 0
    count = 0
    for index, block in enumerate(blocks):
        if mode == "full":
            _wrap_forward(block, per_op=False)
        elif every_n_blocks == 0:
            _wrap_forward(block, per_op=True, keep_matmuls=keep_matmuls)
        elif index % every_n_blocks == 0:
            _wrap_forward(block, per_op=False)
        else:
            continue
        count += 1
    return count
