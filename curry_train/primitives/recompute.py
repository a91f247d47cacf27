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

Blocks are changed in place (their ``forward`` is wrapped), so parameter names stay the same and
checkpoints load with or without recompute.
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from curry_train.options import RECOMPUTE_MODES

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


def _save_expensive_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _wrap_forward(module: nn.Module, per_op: bool) -> None:
    forward = module.forward
    context_fn = functools.partial(create_selective_checkpoint_contexts, _save_expensive_ops) if per_op else None

    @functools.wraps(forward)
    def recomputed(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        if context_fn is None:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    module.forward = recomputed


def apply_recompute(blocks: Iterable[nn.Module], mode: str, every_n_blocks: int = 0) -> int:
    """Apply ``mode`` to ``blocks`` (in order); returns how many blocks now recompute."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={mode!r}: expected one of {', '.join(RECOMPUTE_MODES)}")
    if every_n_blocks < 0:
        raise ValueError(f"every_n_blocks={every_n_blocks} must be >= 0")
    if mode == "none":
        return 0
    count = 0
    for index, block in enumerate(blocks):
        if mode == "full":
            _wrap_forward(block, per_op=False)
        elif every_n_blocks == 0:
            _wrap_forward(block, per_op=True)
        elif index % every_n_blocks == 0:
            _wrap_forward(block, per_op=False)
        else:
            continue
        count += 1
    return count
