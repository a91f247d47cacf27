"""DistributedOptimizer: data parallelism with sharded model state (ZeRO; Rajbhandari et al., 2020).

``DistributedOptimizer.wrap(model, sharding=...)`` applies PyTorch's FSDP2 (``fully_shard``) to
each wrapping unit (by default each repeated transformer block) and then to the root, over the
data-parallel mesh of a ``ParallelState``. The optimizer built afterwards on
``model.parameters()`` sees sharded (``DTensor``) parameters, so its state is sharded too:

=================  ================================================================================
``full``           ZeRO-3: parameters, gradients and optimizer state sharded; a unit's parameters
                   are all-gathered for its forward and again for its backward.
``shard_grad_op``  ZeRO-2 as FSDP2 expresses it: as ``full``, but a unit keeps its gathered
                   parameters from forward to backward (one all-gather per step instead of two).
``no_shard``       plain data parallelism: a replicated mesh, gradients all-reduced.
``hybrid``         HSDP: sharded within ``dp_shard`` groups, replicated across ``dp_replicate``.
=================  ================================================================================

Gradients are *summed* over the data-parallel ranks, not averaged: the loss of each rank is
already its share of the global-batch mean (see ``curry_train.strategy``).

Mixed precision (``bf16`` / ``fp16``): units compute with parameters cast to that dtype and
reduce gradients in fp32; the sharded parameters the optimizer updates stay fp32.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from curry_train.primitives.parallel_state import ParallelState

SHARDING_MODES = ("full", "shard_grad_op", "no_shard", "hybrid")
PARAM_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKWARD_PREFETCH = ("backward_pre", "none")


def fsdp_mesh(parallel_state: ParallelState, sharding: str) -> DeviceMesh:
    """The mesh FSDP2 runs over: 2-D (replicate, shard) for hybrid and no_shard, else the 1-D shard
    mesh. Context-parallel ranks hold different tokens of the same samples, so parameters are
    sharded (and gradients summed) over them as well."""
    if sharding in ("hybrid", "no_shard"):
        return parallel_state.mesh["dp_replicate", "dp_shard"]
    return parallel_state.submesh("dp_shard_cp")


def _check_options(sharding: str, mixed_precision: str, cpu_offload: bool, backward_prefetch: str, use_orig_params: bool) -> None:
    if sharding not in SHARDING_MODES:
        raise ValueError(f"sharding={sharding!r}: expected one of {', '.join(SHARDING_MODES)}")
    if mixed_precision not in PARAM_DTYPES:
        raise ValueError(f"mixed_precision={mixed_precision!r}: expected one of {', '.join(PARAM_DTYPES)}")
    if backward_prefetch not in BACKWARD_PREFETCH:
        raise ValueError(
            f"backward_prefetch={backward_prefetch!r}: FSDP2 offers {', '.join(BACKWARD_PREFETCH)}"
            " (backward_pre: gather the next unit's parameters before this unit's backward)"
        )
    if not use_orig_params:
        raise ValueError("use_orig_params=False: FSDP2 always exposes the original parameters (as DTensors)")
    if cpu_offload and not torch.cuda.is_available():
        raise ValueError("cpu_offload=True needs an accelerator: on a CPU-only machine the parameters are already on the CPU")


class DistributedOptimizer:
    """Namespace of the seed API: ``DistributedOptimizer.wrap(model, sharding="full", ...)``."""

    @staticmethod
    def wrap(
        model: nn.Module,
        sharding: str = "full",
        mixed_precision: str = "fp32",
        cpu_offload: bool = False,
        backward_prefetch: str = "backward_pre",
        use_orig_params: bool = True,
        *,
        parallel_state: Optional[ParallelState] = None,
        reshard_after_forward: Optional[bool] = None,
        units: Optional[Sequence[nn.Module]] = None,
        blocks_per_unit: int = 1,
    ) -> nn.Module:
        """Shard ``model`` in place over the data-parallel ranks and return it.

        ``units``: the modules each sharded on its own (default: the model's repeated blocks, taken
        ``blocks_per_unit`` at a time, from ``model.plan`` when the model declares one, else every
        child of the model's ModuleLists/ModuleDicts). ``parallel_state``: default, a
        ``ParallelState`` over all ranks with the shape this ``sharding`` needs. May be called on a
        meta-device model; materialize afterwards.
        """
        _check_options(sharding, mixed_precision, cpu_offload, backward_prefetch, use_orig_params)
        if parallel_state is None:
            if sharding == "hybrid":
                raise ValueError("sharding='hybrid' needs parallel_state=ParallelState(dp_replicate=R, dp_shard=-1)")
            parallel_state = ParallelState(dp_replicate=-1, dp_shard=1) if sharding == "no_shard" else ParallelState()
        mesh = fsdp_mesh(parallel_state, sharding)
        if reshard_after_forward is None:
            reshard_after_forward = sharding in ("full", "hybrid")
        mp_policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[mixed_precision], reduce_dtype=torch.float32)
        offload: OffloadPolicy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
        groups = _unit_groups(model, units, blocks_per_unit)
        for group in groups:
            fully_shard(group if len(group) > 1 else group[0], mesh=mesh, reshard_after_forward=reshard_after_forward,
                        mp_policy=mp_policy, offload_policy=offload)
        # The root's own parameters (embedding, final norm, head) are used last in forward and first
        # in backward: keeping them gathered saves an all-gather and costs little.
        fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp_policy, offload_policy=offload)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                _sum_gradients(module)
                if backward_prefetch == "none":
                    module.set_modules_to_backward_prefetch([])
        return model


def _unit_groups(model: nn.Module, units: Optional[Sequence[nn.Module]], blocks_per_unit: int) -> list[list[nn.Module]]:
    if blocks_per_unit < 1:
        raise ValueError(f"blocks_per_unit={blocks_per_unit} must be positive")
    if units is None:
        plan = getattr(model, "plan", None)
        if plan is not None:
            units = list(model.get_submodule(plan.blocks).values())
        else:
            units = [m for c in model.modules() if isinstance(c, (nn.ModuleList, nn.ModuleDict)) for m in c.children()]
    units = list(units)
    return [units[i : i + blocks_per_unit] for i in range(0, len(units), blocks_per_unit)]


def _sum_gradients(module: FSDPModule) -> None:
    """Reduce gradients with a plain sum: no 1/world-size factor, and a SUM collective rather than
    PREMUL_SUM (which gloo lacks)."""
    if hasattr(module, "set_gradient_divide_factor"):
        module.set_gradient_divide_factor(1.0)
    else:  # older FSDP2
        module.set_reduce_scatter_divide_factor(1.0)
    if hasattr(module, "set_force_sum_reduction_for_comms"):
        module.set_force_sum_reduction_for_comms(True)
