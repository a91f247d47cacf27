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
``get_ep_group``   expert parallel: ranks that split a MoE layer's experts, borrowed from the ranks
                   holding distinct tokens (``dp x cp``); the experts' data-parallel ranks
                   (``submesh("edp")``) are the ones expert parallelism leaves
=================  ==============================================================================

``ParallelState(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=1)``: one degree may be ``-1``, which
takes whatever the others leave of the world size. The process group is initialized from the
environment (torchrun, SLURM via Lightning, or curry-train's launcher) if it is not yet.
"""

from __future__ import annotations

import dataclasses
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
    ep: int = 1  # not a dimension of its own: a split of the dp x cp ranks

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def __str__(self) -> str:
        text = " x ".join(f"{name}={getattr(self, name)}" for name in DIMS)
        return f"{text} (ep={self.ep} of dp x cp)" if self.ep > 1 else text


def resolve_degrees(
    world_size: int, dp_replicate: int = 1, dp_shard: int = -1, cp: int = 1, tp: int = 1, pp: int = 1, ep: int = 1
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
    if not isinstance(ep, int) or ep < 1:
        raise ValueError(f"parallel degree ep={ep!r}: expected a positive integer")
    if (degrees.dp * degrees.cp) % ep:
        raise ValueError(
            f"ep={ep} must divide the {degrees.dp * degrees.cp} ranks holding distinct tokens "
            f"(dp={degrees.dp} x cp={degrees.cp}), from which expert parallelism takes its ranks"
        )
    return dataclasses.replace(degrees, ep=ep)


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
        ep: int = 1,
        device_type: Optional[str] = None,
    ) -> None:
        self.device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        init_process_group_from_env(self.device_type)
        self.degrees = resolve_degrees(dist.get_world_size(), dp_replicate, dp_shard, cp, tp, pp, ep)
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
        if self.degrees.ep > 1:
            # Expert parallelism splits the ranks holding distinct tokens into (edp, ep): ep takes
            # neighbouring ranks (innermost, so the all-to-all stays on the fastest links), edp is
            # what is left, over which the experts' gradients are summed (and FSDP shards them).
            # "edp_one" is a dimension of size one: FSDP2's replicated (no_shard) experts need a
            # 2-D (replicate, shard) mesh.
            ep = self.degrees.ep
            split = self._flattened["dp_cp"]._unflatten(
                0, (self.degrees.dp * self.degrees.cp // ep, 1, ep), ("edp", "edp_one", "ep")
            )
            self._flattened.update(edp=split["edp"], edp_one=split["edp_one"], ep=split["ep"])
            self.expert_mesh = split

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
    def ep_rank(self) -> int:
        return self.get_ep_mesh().get_local_rank() if self.degrees.ep > 1 else 0

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

    def get_ep_mesh(self) -> DeviceMesh:
        """The expert-parallel ranks as a mesh (DTensor experts are sharded over it)."""
        if self.degrees.ep == 1:
            raise ValueError("this ParallelState has no expert parallelism (ep=1)")
        return self._flattened["ep"]

    def get_ep_group(self) -> dist.ProcessGroup:
        return self.get_ep_mesh().get_group()

    def __repr__(self) -> str:
        return f"ParallelState({self.degrees}, device={self.device_type})"
