"""Materialize a meta-device model with the same weights in every layout.

Each parameter's full value is drawn from a generator seeded by the run's seed and the parameter's
name alone (``parameter_seed``), then each rank keeps its own shard. Neither the number of ranks nor
the order in which modules were wrapped, split or sharded can change a weight, which is what lets
every layout reproduce the single-process loss curve from step one.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def parameter_seed(seed: int, name: str) -> int:
    """A generator seed for one parameter: a function of the run seed and the parameter's name only."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def materialize_and_init(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a meta-device ``model`` on ``device`` and initialize every parameter as a single
    process would (``model.init_parameter(name, full, generator)``), keeping this rank's shard of
    DTensor parameters; then ``model.tie_weights()`` and ``model.reset_buffers()``."""
    model.to_empty(device=device)
    model.tie_weights()
    init_parameters(model, device, seed)
    model.reset_buffers()


@torch.no_grad()
def init_parameters(
    model: nn.Module, device: torch.device, seed: int, which: Callable[[str], bool] = lambda name: True
) -> None:
    """Draw the parameters ``which`` selects by name, as ``materialize_and_init`` does (in place)."""
    for name, param in model.named_parameters():
        if not which(name):
            continue
        generator = torch.Generator(device=device).manual_seed(parameter_seed(seed, name))
        full = torch.empty(param.shape, dtype=param.dtype, device=device)
        model.init_parameter(name, full, generator)
        if isinstance(param, DTensor):
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
