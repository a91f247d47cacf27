"""LoRA (Hu et al., 2021): a frozen base and, beside each target linear, two trained low-rank factors.

A target linear ``W`` (out x in) computes ``W x + (alpha / rank) * B (A dropout(x))`` with ``A`` (rank x in)
and ``B`` (out x rank) its own parameters, registered on the linear itself as ``lora_a`` and ``lora_b``:
the base keeps its name (``layers.0.attention.wq.weight``), so pretrained weights and checkpoints load
as they are, and the adapters' names follow it (``layers.0.attention.wq.lora_a``). ``B`` starts at zero,
so training starts from the base model exactly. Every other parameter is frozen: it gets no gradient
and no optimizer state.

Applied on the meta device after tensor parallelism and before recompute, compile and FSDP
(``curry_train.parallelize``), so those wrap the adapters with their block; the adapters' values are
drawn by name like every parameter (``Llama.init_parameter``). A tensor-parallel layer's adapters are
DTensors split to follow it (``tp_linear.lora_placements``), and its own forward adds them.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from curry_train.primitives.tp_linear import ColumnParallelLinear, RowParallelLinear, lora_placements

ADAPTERS = ("lora_a", "lora_b")


def is_adapter(name: str) -> bool:
    """Whether the parameter ``name`` is a LoRA factor."""
    return name.rsplit(".", 1)[-1] in ADAPTERS


def _adapter(shape: tuple[int, int], like: torch.Tensor, placement=None) -> nn.Parameter:
    """An adapter factor on ``like``'s device and dtype; a DTensor split by ``placement`` on ``like``'s mesh."""
    if placement is None:
        return nn.Parameter(torch.empty(shape, device=like.device, dtype=like.dtype))
    mesh = like.device_mesh
    local = list(shape)
    if isinstance(placement, Shard):
        local[placement.dim] //= mesh.size()
    tensor = torch.empty(local, device=like.to_local().device, dtype=like.dtype)
    stride = torch.empty(shape, device="meta").stride()
    return nn.Parameter(
        DTensor.from_local(tensor, mesh, [placement], run_check=False, shape=torch.Size(shape), stride=stride)
    )


def _adapt(linear: nn.Module, rank: int, scale: float, dropout: float) -> None:
    weight = linear.weight
    out_features, in_features = weight.shape
    linear.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    linear.lora_scale = scale
    if isinstance(linear, (ColumnParallelLinear, RowParallelLinear)):  # their forward adds the adapters
        a, b = lora_placements(linear)
        linear.lora_a = _adapter((rank, in_features), weight, a)
        linear.lora_b = _adapter((out_features, rank), weight, b)
        return
    linear.lora_a = _adapter((rank, in_features), weight)
    linear.lora_b = _adapter((out_features, rank), weight)
    drop = linear.lora_dropout

    @functools.wraps(linear.forward)
    def forward(x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, linear.weight, linear.bias)
        return base + F.linear(F.linear(drop(x), linear.lora_a), linear.lora_b) * scale

    linear.forward = forward


def apply_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Freeze ``model`` and give adapters to each ``nn.Linear`` whose path ends with one of ``targets``
    (``attention.wq``, ``feed_forward.w2``, ``output``, ...); returns the adapted paths. ``ValueError``
    for a target that matches no linear."""
    if rank < 1:
        raise ValueError(f"LoRA rank {rank}: at least 1")
    for param in model.parameters():
        param.requires_grad_(False)
    adapted, matched = [], set()
    for path, module in list(model.named_modules()):
        target = next((t for t in targets if path == t or path.endswith("." + t)), None)
        if target is None or not isinstance(module, (nn.Linear, ColumnParallelLinear, RowParallelLinear)):
            continue
        _adapt(module, rank, alpha / rank, dropout)
        adapted.append(path)
        matched.add(target)
    missing = [t for t in targets if t not in matched]
    if missing:
        raise ValueError(f"LoRA target {missing[0]!r} matches no linear layer of the model")
    return adapted
