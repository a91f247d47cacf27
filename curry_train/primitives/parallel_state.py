"""ParallelState: the one source of truth for a run's topology.

Five degrees, outermost first: ``pp x dp_replicate x dp_shard x cp x tp``. Tensor parallelism is
innermost so its ranks are neighbours (the same node, the fastest links); pipeline parallelism is
outermost so its point-to-point traffic is what crosses nodes (Megatron-LM's ordering; torchtitan's
``ParallelDims``). The degrees are validated once, then a ``DeviceMesh`` with named dimensions
hands out each group:

=================  ==============================================================================
``get_dp_group``   data parallel: ranks that hold different samples (``dp_replicate x dp_shard``)
``get_tp_group``   tensor parallel: ranks that split each matmul
``get_pp_group``   pipeline parallel: ranks that hold consecutive stages
``get_cp_group``   context parallel: ranks that split each sequence
=================  ==============================================================================

``ParallelState(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1)``: one degree may be ``-1``, which
takes whatever the others leave of the world size. The process group is initialized from the
environment (torchrun, SLURM via Lightning, or curry-train's launcher) if it is not yet.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class Degrees:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def __str__(self) -> str:
        return " x ".join(f"{name}={getattr(self, name)}" for name in DIMS)


def resolve_degrees(
    world_size: int, dp_replicate: int = 1, dp_shard: int = -1, cp: int = 1, tp: int = 1, pp: int = 1
) -> Degrees:
    """Fill the one ``-1`` degree and check that the degrees multiply to ``world_size``.

    Needs no process group, so configurations are checked before any worker starts.
    """
    given = {"pp": pp, "dp_replicate": dp_replicate, "dp_shard": dp_shard, "cp": cp, "tp": tp}
    for name, size in given.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"parallel degree {name}={size!r}: expected a positive integer or -1")
    free = [name for name, size in given.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one parallel degree may be -1, got {free}")
    fixed = math.prod(size for size in given.values() if size != -1)
    if free:
        if world_size % fixed:
            fixed_text = " x ".join(f"{n}={s}" for n, s in given.items() if s != -1)
            raise ValueError(
                f"world size {world_size} is not divisible by {fixed_text} = {fixed}, so {free[0]} cannot fill it"
            )
        given[free[0]] = world_size // fixed
    degrees = Degrees(**given)
    if degrees.world_size != world_size:
        raise ValueError(
            f"the parallel degrees {degrees} multiply to {degrees.world_size}, but the world size is {world_size}"
        )
    return degrees


def init_process_group_from_env(device_type: str, timeout: timedelta = timedelta(minutes=10)) -> None:
    """Join the default process group: NCCL on CUDA, gloo on CPU; a one-process group when alone."""
    if dist.is_initialized():
        return
    if device_type == "cuda":
        # Each process on its own GPU before NCCL starts: without it every rank's communicator (and
        # the ring's batched sends) would sit on GPU 0, which hangs (torch.distributed.batch_isend_irecv).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)


class ParallelState:
    """Degrees -> a named ``DeviceMesh`` and its process groups."""

    def __init__(
        self,
        dp_replicate: int = 1,
        dp_shard: int = -1,
        cp: int = 1,
        tp: int = 1,
        pp: int = 1,
        device_type: Optional[str] = None,
    ) -> None:
        self.device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        init_process_group_from_env(self.device_type)
        self.degrees = resolve_degrees(dist.get_world_size(), dp_replicate, dp_shard, cp, tp, pp)
        shape = tuple(getattr(self.degrees, name) for name in DIMS)
        self.mesh: DeviceMesh = init_device_mesh(self.device_type, shape, mesh_dim_names=DIMS)
        # Flattened views used by the primitives: samples differ across "dp"; FSDP shards over
        # "dp_shard_cp" (context-parallel ranks hold different tokens of the same samples, so their
        # gradients are summed like data-parallel ones); "dp_cp" is every rank holding distinct tokens.
        self._flattened = {
            "dp": self.mesh["dp_replicate", "dp_shard"]._flatten("dp"),
            "dp_shard_cp": self.mesh["dp_shard", "cp"]._flatten("dp_shard_cp"),
            "dp_cp": self.mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
            # replicas that also sum over context-parallel ranks (FSDP2's no_shard with cp)
            "dp_replicate_cp": self.mesh["dp_replicate", "cp"]._flatten("dp_replicate_cp"),
        }
        # FSDP2 + TP gradients are sharded over ("dp_shard_cp", "tp"): with this view DTensor reduces
        # their norm in one all-reduce, not one per dimension (whose different summation orders
        # could leave ranks with different norms, hence different clipping). Each view is a group
        # of its own, so only where it is not one of the others: with tp, and with cp for the second.
        if self.degrees.tp > 1:
            self._flattened["dp_shard_cp_tp"] = self.mesh["dp_shard", "cp", "tp"]._flatten("dp_shard_cp_tp")
        if self.degrees.tp > 1 and self.degrees.cp > 1:
            # TP beside replicas over cp ranks (FSDP2's no_shard over (dp_replicate_cp, dp_shard)).
            self._flattened["dp_shard_tp"] = self.mesh["dp_shard", "tp"]._flatten("dp_shard_tp")

    # Degrees ------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.degrees.world_size

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def dp_size(self) -> int:
        return self.degrees.dp

    @property
    def dp_rank(self) -> int:
        return self.submesh("dp").get_local_rank()

    @property
    def tp_rank(self) -> int:
        return self.mesh["tp"].get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank()

    @property
    def cp_rank(self) -> int:
        return self.mesh["cp"].get_local_rank()

    # Meshes and groups --------------------------------------------------------------------------
    def submesh(self, name: str) -> DeviceMesh:
        """A named dimension (``pp``, ``dp_replicate``, ``dp_shard``, ``cp``, ``tp``) or flattened view
        (``dp``, ``dp_shard_cp``, ``dp_cp``) of the mesh."""
        return self._flattened[name] if name in self._flattened else self.mesh[name]

    def get_dp_group(self) -> dist.ProcessGroup:
        return self.submesh("dp").get_group()

    def get_tp_group(self) -> dist.ProcessGroup:
        return self.mesh["tp"].get_group()

    def get_pp_group(self) -> dist.ProcessGroup:
        return self.mesh["pp"].get_group()

    def get_cp_group(self) -> dist.ProcessGroup:
        return self.mesh["cp"].get_group()

    def __repr__(self) -> str:
        return f"ParallelState({self.degrees}, device={self.device_type})"
