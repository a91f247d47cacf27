"""ParallelState: the one source of truth for a run's topology, on the ranks of a process group.

It consumes a ``ParallelDims`` (``curry_train/layout/dims.py``: the degrees, validated before any process
started) and builds the ``DeviceMesh`` with named dimensions ``pp x dp_replicate x dp_shard x cp x tp``,
which hands out each group:

=================  ==============================================================================
``get_dp_group``   data parallel: ranks that hold different samples (``dp_replicate x dp_shard``)
``get_tp_group``   tensor parallel: ranks that split each matmul
``get_pp_group``   pipeline parallel: ranks that hold consecutive stages
``get_cp_group``   context parallel: ranks that split each sequence
``get_ep_group``   expert parallel: ranks that split a MoE layer's experts, borrowed from the ranks
                   holding distinct tokens (``dp x cp``); the experts' data-parallel ranks
                   (``submesh("edp")``) are the ones expert parallelism leaves
=================  ==============================================================================

The process group is not its to make: the launcher's worker, Lightning's strategy or the script under
torchrun joins it first (``init_process_group_from_env`` joins torchrun's environment).
``ParallelState(tp=2)`` is short for ``ParallelState(ParallelDims(world_size, tp=2))`` on the group's ranks.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from curry_train.layout.dims import DIMS, ParallelDims

# torch 2.13 names the flat collectives all_gather_single and reduce_scatter_single (the *_tensor names
# warn on every call); older releases have only the *_tensor names.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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
    """``ParallelDims`` -> a named ``DeviceMesh`` and its process groups, on the initialized process group."""

    def __init__(self, dims: Optional[ParallelDims] = None, device_type: Optional[str] = None, **degrees: int) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "ParallelState needs the process group first: torch.distributed.init_process_group() (under"
                " torchrun), or curry_train.primitives.parallel_state.init_process_group_from_env(device_type)"
            )
        if dims is None:
            dims = ParallelDims(dist.get_world_size(), **degrees)
        elif degrees:
            raise ValueError(f"ParallelState: give the degrees as dims or as keywords, not both ({sorted(degrees)})")
        if dims.world_size != dist.get_world_size():
            raise ValueError(
                f"ParallelState: {dims} is a layout of {dims.world_size} ranks, the group has {dist.get_world_size()}"
            )
        self.dims = dims
        self.device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        self.mesh: DeviceMesh = init_device_mesh(self.device_type, dims.shape, mesh_dim_names=DIMS)
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
        if dims.tp_enabled:
            self._flattened["dp_shard_cp_tp"] = self.mesh["dp_shard", "cp", "tp"]._flatten("dp_shard_cp_tp")
        if dims.tp_enabled and dims.cp_enabled:
            # TP beside replicas over cp ranks (FSDP2's no_shard over (dp_replicate_cp, dp_shard)).
            self._flattened["dp_shard_tp"] = self.mesh["dp_shard", "tp"]._flatten("dp_shard_tp")
        if dims.ep_enabled:
            # Expert parallelism splits the ranks holding distinct tokens into (edp, ep): ep takes
            # neighbouring ranks (innermost, so the all-to-all stays on the fastest links), edp is
            # what is left, over which the experts' gradients are summed (and FSDP shards them).
            # "edp_one" is a dimension of size one: FSDP2's replicated (no_shard) experts need a
            # 2-D (replicate, shard) mesh.
            split = self._flattened["dp_cp"]._unflatten(
                0, (dims.dp_cp // dims.ep, 1, dims.ep), ("edp", "edp_one", "ep")
            )
            self._flattened.update(edp=split["edp"], edp_one=split["edp_one"], ep=split["ep"])
            self.expert_mesh = split

    # Degrees ------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def dp_size(self) -> int:
        return self.dims.dp

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
        return self.get_ep_mesh().get_local_rank() if self.dims.ep_enabled else 0

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
        if not self.dims.ep_enabled:
            raise ValueError("this ParallelState has no expert parallelism (ep=1)")
        return self._flattened["ep"]

    def get_ep_group(self) -> dist.ProcessGroup:
        return self.get_ep_mesh().get_group()

    def __repr__(self) -> str:
        return f"ParallelState({self.dims}, device={self.device_type})"
