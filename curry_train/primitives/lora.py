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

from curry_train.model.moe import Experts
from curry_train.primitives.tp_linear import ColumnParallelLinear, RowParallelLinear, lora_placements

ADAPTERS = ("lora_a", "lora_b")


# Routed experts' adapters sit on the ``Experts`` module beside the stacked weight they adapt, one
# factor per expert: ``experts.w1_lora_a`` (E, rank, dim) and ``experts.w1_lora_b`` (E, hidden, rank).
EXPERT_WEIGHTS = ("w1", "w2", "w3")


def is_adapter(name: str) -> bool:
    """Whether the parameter ``name`` is a LoRA factor."""
    last = name.rsplit(".", 1)[-1]
    return last in ADAPTERS or last.endswith(("_lora_a", "_lora_b"))


def adapted_weight(name: str) -> str | None:
    """The weight a ``lora_a`` factor adapts (``...wq.lora_a`` -> ``...wq.weight``; ``...experts.w1_lora_a``
    -> ``...experts.w1``); None for any other name."""
    if name.endswith(".lora_a"):
        return name.removesuffix(".lora_a") + ".weight"
    if name.endswith("_lora_a") and name.rsplit(".", 1)[-1].removesuffix("_lora_a") in EXPERT_WEIGHTS:
        return name.removesuffix("_lora_a")
    return None


def lora_b_of(name: str) -> str:
    """The ``lora_b`` factor that pairs with the ``lora_a`` factor ``name``."""
    return name.removesuffix("lora_a") + "lora_b"


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


def _adapt_experts(experts: Experts, weight: str, rank: int, scale: float, dropout: float) -> None:
    """Adapters for one stacked expert weight (E, out, in): A (E, rank, in) and B (E, out, rank), split
    like the weight over the expert-parallel ranks (``Shard(0)``) where it is split; ``Experts.forward``
    adds them to each expert's matmul."""
    stacked = getattr(experts, weight)
    n_experts, out_features, in_features = stacked.shape
    placement = Shard(0) if isinstance(stacked, DTensor) else None
    experts.register_parameter(f"{weight}_lora_a", _adapter((n_experts, rank, in_features), stacked, placement))
    experts.register_parameter(f"{weight}_lora_b", _adapter((n_experts, out_features, rank), stacked, placement))
    experts.lora_scale = scale
    experts.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()


def _expert_target(path: str, targets: Sequence[str]) -> list[tuple[str, str]]:
    """(target, weight) for each target naming one of the stacked weights of the ``Experts`` at ``path``."""
    found = []
    for target in targets:
        module, _, weight = target.rpartition(".")
        if weight in EXPERT_WEIGHTS and module and (path == module or path.endswith("." + module)):
            found.append((target, weight))
    return found


def apply_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Freeze ``model`` and give adapters to each ``nn.Linear`` whose path ends with one of ``targets``
    (``attention.wq``, ``feed_forward.w2``, ``output``, ...), and to the routed experts' stacked weights
    a target names (``feed_forward.experts.w1``, ...); returns the adapted paths. ``ValueError`` for a
    target that matches nothing."""
    if rank < 1:
        raise ValueError(f"LoRA rank {rank}: at least 1")
    for param in model.parameters():
        param.requires_grad_(False)
    adapted, matched = [], set()
    for path, module in list(model.named_modules()):
        if isinstance(module, Experts):
            for target, weight in _expert_target(path, targets):
                _adapt_experts(module, weight, rank, alpha / rank, dropout)
                adapted.append(f"{path}.{weight}")
                matched.add(target)
            continue
        target = next((t for t in targets if path == t or path.endswith("." + t)), None)
        if target is None or not isinstance(module, (nn.Linear, ColumnParallelLinear, RowParallelLinear)):
            continue
        _adapt(module, rank, alpha / rank, dropout)
        adapted.append(path)
        matched.add(target)
    missing = [t for t in targets if t not in matched]
    if missing:
        raise ValueError(f"LoRA target {missing[0]!r} matches no linear layer (or expert weight) of the model")
    return adapted
