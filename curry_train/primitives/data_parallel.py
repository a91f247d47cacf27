"""Replicated data parallelism (DistributedDataParallel) and gradient accumulation's one reduction.

Gradients are *summed* over the data-parallel ranks, never averaged: each rank's loss is already its
share of the global batch's mean (see ``curry_train.train_step``), so the sum is one big batch's
gradient. DDP's default hook averages; ``replicate`` installs a summing one.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from curry_train.primitives.distributed_optimizer import ZeroOneModule


def _allreduce_sum_hook(group, bucket):  # no annotations: DDP inspects them and wants real classes
    """DDP communication hook: sum gradients over the data-parallel group."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def replicate(
    model: nn.Module,
    group: dist.ProcessGroup,
    device: torch.device,
    bucket_cap_mb: int = 25,
    static_graph: bool = False,
) -> DistributedDataParallel:
    """Wrap a materialized ``model`` in DDP over ``group``, gradients summed in buckets during backward."""
    with warnings.catch_warnings():
        # Its deprecation notice itself says to keep broadcast_buffers=False for rank-local buffers
        # until DDP offers another way not to sync them at init; printed by every rank, it says nothing.
        warnings.filterwarnings("ignore", message=r".*broadcast_buffers.*is deprecated", category=FutureWarning)
        ddp = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            process_group=group,
            bucket_cap_mb=bucket_cap_mb,
            static_graph=static_graph,
            gradient_as_bucket_view=True,
            broadcast_buffers=False,  # RoPE tables and this rank's positions: computed, and rank-specific under cp
        )
    ddp.register_comm_hook(group, _allreduce_sum_hook)
    return ddp


def gradient_sync(model: nn.Module, last: bool, sync_each_microbatch: bool = False) -> AbstractContextManager:
    """Gradient accumulation: reduce gradients over the data-parallel ranks only in the last
    micro-batch's backward (DDP: ``no_sync``; FSDP and ZeRO-1: ``set_requires_gradient_sync``), unless
    ``sync_each_microbatch`` trades traffic for the memory of unsharded gradients (FSDP)."""
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if last else model.no_sync()
    if isinstance(model, (FSDPModule, ZeroOneModule)):
        model.set_requires_gradient_sync(last or sync_each_microbatch)
    return nullcontext()
