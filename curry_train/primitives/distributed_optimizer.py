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
``optimizer``      ZeRO-1: only the optimizer state is sharded. Parameters and gradients stay
                   replicated; gradients are all-reduced, each rank updates its shard, and the
                   updated parameters are all-gathered before the next forward. FSDP2 has no such
                   mode: it is this module's own (``ZeroOneModule``), with the same interface
                   (DTensor shards as parameters, ``set_requires_gradient_sync``).
``no_shard``       plain data parallelism: a replicated mesh, gradients all-reduced.
``hybrid``         HSDP: sharded within ``dp_shard`` groups, replicated across ``dp_replicate``.
=================  ================================================================================

Gradients are *summed* over the data-parallel ranks, not averaged: the loss of each rank is
already its share of the global-batch mean (see ``curry_train.train_step``).

Mixed precision (``bf16`` / ``fp16``): units compute with parameters cast to that dtype and
reduce gradients in fp32; the sharded parameters the optimizer updates stay fp32.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from curry_train.options import BACKWARD_PREFETCH, EXPERT_SHARDING, MIXED_PRECISIONS, SHARDING_MODES
from curry_train.primitives.parallel_state import (
    ParallelState,
    all_gather_single,
    init_process_group_from_env,
    reduce_scatter_single,
)

try:  # FSDP2's custom-collective interface (set_custom_reduce_scatter); absent from older releases
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
except ImportError:  # pragma: no cover - the torch this project pins has it
    ReduceScatter = object  # type: ignore[assignment,misc]

# the compute dtype of each of options.MIXED_PRECISIONS (fp32: the parameters' own)
PARAM_DTYPES = dict(zip(MIXED_PRECISIONS, (None, torch.bfloat16, torch.float16), strict=True))


def fsdp_mesh(parallel_state: ParallelState, sharding: str) -> DeviceMesh:
    """The mesh FSDP2 runs over: 2-D (replicate, shard) for hybrid and no_shard, else the 1-D shard
    mesh. Context-parallel ranks hold different tokens of the same samples, so parameters are
    sharded (and gradients summed) over them as well."""
    if parallel_state.dims.cp_enabled:
        if sharding == "hybrid":
            return parallel_state.mesh["dp_replicate", "dp_shard_cp"]
        if sharding == "no_shard":
            return parallel_state.mesh["dp_replicate_cp", "dp_shard"]
    if sharding in ("hybrid", "no_shard"):
        return parallel_state.mesh["dp_replicate", "dp_shard"]
    return parallel_state.submesh("dp_shard_cp")


def _check_options(
    sharding: str, mixed_precision: str, cpu_offload: bool, backward_prefetch: str, use_orig_params: bool
) -> None:
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
        raise ValueError(
            "cpu_offload=True needs an accelerator: on a CPU-only machine the parameters are already on the CPU"
        )


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
        roots: Optional[Sequence[nn.Module]] = None,
        explicit_prefetch: Optional[bool] = None,
        async_reduce_scatter: Optional[bool] = None,
    ) -> nn.Module:
        """Shard ``model`` in place over the data-parallel ranks and return it.

        ``units``: the modules each sharded on its own (default: the model's repeated blocks, taken
        ``blocks_per_unit`` at a time, from ``model.plan`` when the model declares one, else every
        child of the model's ModuleLists/ModuleDicts); with ``sharding="optimizer"``, the modules
        whose forward hooks swap in the full parameters of all their own modules (default: none,
        each module swaps its own). ``roots``: the modules sharded last, each
        holding the parameters no unit holds (default: ``model``; pipeline stages that share
        ``model``'s modules pass themselves, since their forward, not ``model``'s, runs). ``parallel_state``: default, a
        ``ParallelState`` over all ranks with the shape this ``sharding`` needs. ``explicit_prefetch``:
        each unit's all-gather is issued asynchronously as the unit before it (in forward; after it,
        in backward) starts, see ``prefetch_explicitly``; default: where the mesh's device has no
        streams (CPU) and ``roots`` is not given. ``async_reduce_scatter``: on a CPU mesh, each unit's
        gradient reduce-scatter is issued asynchronously and completed as the next one is issued or
        as backward ends, see ``DeferredSums``; default: on a CPU, except for hybrid. May be called
        on a meta-device model; materialize afterwards.
        """
        _check_options(sharding, mixed_precision, cpu_offload, backward_prefetch, use_orig_params)
        if parallel_state is None:
            if sharding == "hybrid":
                raise ValueError("sharding='hybrid' needs parallel_state=ParallelState(dp_replicate=R, dp_shard=-1)")
            # As the seed API is used under torchrun: the wrapped model joins torchrun's group itself.
            init_process_group_from_env("cuda" if torch.cuda.is_available() else "cpu")
            parallel_state = ParallelState(dp_replicate=-1, dp_shard=1) if sharding == "no_shard" else ParallelState()
        mesh = fsdp_mesh(parallel_state, sharding)
        if sharding == "optimizer":
            if cpu_offload:
                raise ValueError(
                    "sharding='optimizer' keeps parameters and gradients on the device; cpu_offload applies to "
                    "full/shard_grad_op/hybrid"
                )
            if reshard_after_forward:
                raise ValueError(
                    "reshard_after_forward=True: sharding='optimizer' (ZeRO-1) keeps the full parameters; use "
                    "sharding='full' to reshard"
                )
            if blocks_per_unit != 1:
                raise ValueError(
                    "sharding='optimizer' has no wrapping units (its parameters are gathered once per step): leave "
                    "blocks_per_unit unset"
                )
            return _zero_one(model, mesh, PARAM_DTYPES[mixed_precision], units or ())
        if reshard_after_forward is None:
            reshard_after_forward = sharding in ("full", "hybrid")
        mp_policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[mixed_precision], reduce_dtype=torch.float32)
        offload: OffloadPolicy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
        groups = _unit_groups(model, units, blocks_per_unit)
        for group in groups:
            fully_shard(
                group if len(group) > 1 else group[0],
                mesh=mesh,
                shard_placement_fn=shard_placement(mesh),
                reshard_after_forward=reshard_after_forward,
                mp_policy=mp_policy,
                offload_policy=offload,
            )
        # The root's own parameters (embedding, final norm, head) are used last in forward and first
        # in backward: keeping them gathered saves an all-gather and costs little.
        if explicit_prefetch is None:
            explicit_prefetch = mesh.device_type == "cpu" and roots is None
        roots = [model] if roots is None else list(roots)
        for root in roots:
            fully_shard(
                root,
                mesh=mesh,
                reshard_after_forward=False,
                mp_policy=mp_policy,
                offload_policy=offload,
                shard_placement_fn=shard_placement(mesh),
            )
        if explicit_prefetch:
            prefetch_explicitly(roots, [group[0] for group in groups])
        if async_reduce_scatter is None:
            async_reduce_scatter = mesh.device_type == "cpu" and sharding != "hybrid"
        elif async_reduce_scatter and sharding == "hybrid":
            raise ValueError(
                "async_reduce_scatter=True with sharding='hybrid': FSDP2 all-reduces each reduce-scatter's "
                "output across the replicas as soon as it returns"
            )
        deferred = DeferredSums() if async_reduce_scatter else None
        for module in {id(m): m for root in [model, *roots] for m in root.modules()}.values():
            if isinstance(module, FSDPModule):
                _sum_gradients(module, deferred)
                if backward_prefetch == "none":
                    module.set_modules_to_backward_prefetch([])
        return model


def prefetch_explicitly(roots: Sequence[nn.Module], units: Sequence[nn.Module]) -> None:
    """Gather each unit's parameters while the unit before it computes: as a unit's forward starts,
    the all-gather of the next unit in ``units`` order is issued, and as its backward starts, that
    of the unit before it (each root starts the first in forward, the last in backward). All of
    them asynchronously: FSDP2 otherwise waits for each all-gather where it is issued.

    On a GPU, FSDP2 overlaps an all-gather with compute through its own streams, so this is left
    off there. A device without streams (CPU, gloo) has no such overlap: every unit's all-gather
    is a blocking call that each rank enters whenever it gets there, and the rank that arrives
    first waits for the other. Issued one unit early, the transfer runs on the process group's
    thread during a unit of compute, and the skew between ranks is absorbed there (the debug
    model's fsdp 2 step on a 2-core machine: 5% more tokens/s, eager and compiled, in an
    alternating series; the README's compile table). It holds two units' gathered parameters at a time
    instead of one, as FSDP2's own prefetch does on a GPU."""
    if not hasattr(FSDPModule, "_set_unshard_async_op"):  # an FSDP2 without async unshard: nothing to overlap
        return
    for root in roots:
        inside = {id(m) for m in root.modules()}
        order = [unit for unit in units if id(unit) in inside and isinstance(unit, FSDPModule)]
        cast(FSDPModule, root)._set_unshard_async_op(True)
        if not order:
            continue
        cast(FSDPModule, root).set_modules_to_forward_prefetch([order[0]])
        cast(FSDPModule, root).set_modules_to_backward_prefetch([order[-1]])
        for earlier, later in zip(order[:-1], order[1:], strict=True):
            earlier.set_modules_to_forward_prefetch([later])
            later.set_modules_to_backward_prefetch([earlier])


def shard_placement(mesh: DeviceMesh) -> Callable[[nn.Parameter], Optional[Shard]]:
    """FSDP2 splits each parameter's rows (dim 0) over the shard ranks, padding each rank's part to
    the same size: a tensor with fewer rows than ranks (a MoE layer's stacked experts, ``(E, hidden,
    dim)``, over more ranks than its E; its router's ``(E, dim)`` gate) would leave whole rows on a
    few ranks and padding of that size on the rest. Such a tensor is split along dim 1 instead."""
    shards = mesh.size(mesh.ndim - 1)

    def placement(param: nn.Parameter) -> Optional[Shard]:
        local = param.to_local() if isinstance(param, DTensor) else param
        if local.ndim >= 2 and local.shape[0] < shards <= local.shape[1]:
            return Shard(1)
        return None  # FSDP2's default, Shard(0)

    return placement


def shard_experts(
    experts: Sequence[nn.Module],
    parallel_state: ParallelState,
    sharding: str = "full",
    mixed_precision: str = "fp32",
    reshard_after_forward: Optional[bool] = None,
) -> None:
    """Expert-parallel experts (``Shard(0)`` DTensors over ``ParallelState.get_ep_mesh()``) under
    FSDP2 over the ranks expert parallelism leaves (``edp``): sharded there as ``sharding`` says,
    or replicated (``no_shard``). Call before ``wrap`` shards the blocks that hold them, so each
    experts module is a unit of its own and the blocks' units keep the dense parameters."""
    if sharding not in EXPERT_SHARDING:
        raise ValueError(f"sharding={sharding!r} with expert parallelism: expected one of {', '.join(EXPERT_SHARDING)}")
    if sharding == "no_shard":
        mesh = parallel_state.expert_mesh["edp", "edp_one"]  # (replicate, shard of one)
    else:
        mesh = parallel_state.submesh("edp")
    if reshard_after_forward is None:
        reshard_after_forward = sharding == "full"
    mp_policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[mixed_precision], reduce_dtype=torch.float32)
    for module in experts:
        fully_shard(
            module,
            mesh=mesh,
            reshard_after_forward=reshard_after_forward,
            mp_policy=mp_policy,
            shard_placement_fn=shard_placement(mesh),
        )
        _sum_gradients(module)


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


def _sum_gradients(module: FSDPModule, deferred: Optional["DeferredSums"] = None) -> None:
    """Reduce gradients with a plain sum: no 1/world-size factor, and a SUM collective rather than
    PREMUL_SUM (which gloo lacks). On a CPU mesh, through ``AllToAllReduceScatter`` (completed
    later through ``deferred`` where given)."""
    if hasattr(module, "set_gradient_divide_factor"):
        module.set_gradient_divide_factor(1.0)
    else:  # older FSDP2
        module.set_reduce_scatter_divide_factor(1.0)
    if hasattr(module, "set_force_sum_reduction_for_comms"):
        module.set_force_sum_reduction_for_comms(True)
    groups = module._get_fsdp_state()._fsdp_param_groups
    if len(groups) == 1 and groups[0].device.type == "cpu" and hasattr(module, "set_custom_reduce_scatter"):
        module.set_custom_reduce_scatter(AllToAllReduceScatter(groups[0], deferred))


_REDUCE_SCATTER = threading.local()


def issuing_reduce_scatter() -> bool:
    """True while this thread issues ``AllToAllReduceScatter``'s all-to-all: a reduce-scatter by what
    it does, as communication accounting (``validation/comm.py``) books it."""
    return getattr(_REDUCE_SCATTER, "issuing", False)


class AllToAllReduceScatter(ReduceScatter):
    """FSDP2's gradient reduce-scatter as an all-to-all and a local sum: each rank sends its
    gradients' i-th chunk to rank i, then adds up the chunks it received, in rank order.

    gloo has no reduce-scatter of its own (torch's gloo backend builds one from heavier
    collectives): a 3.4 MB reduce-scatter over 2 ranks took 3.2-3.9 ms on this project's 2-core
    machine, the all-to-all and sum 1.5 ms, an all-gather of the same size 1.8 ms. The all-to-all
    moves each rank's (d-1)/d of the input, what a reduce-scatter needs at least. Only a plain,
    blocking SUM goes this way (what ``_sum_gradients`` asks of FSDP2); anything else is passed to
    ``reduce_scatter_tensor`` as before."""

    def __init__(self, param_group: Any = None, deferred: Optional["DeferredSums"] = None) -> None:
        self.param_group = param_group  # FSDP2's parameter group whose gradients the output becomes
        self.deferred = deferred

    def allocate(self, size: Sequence[Any], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def _may_defer(self, output: torch.Tensor) -> bool:
        """Whether nothing reads the output before backward ends: FSDP2 makes it the gradients as they
        are, unless it must (each right away, after this call returns) all-reduce it across replicas
        (HSDP), pass it to an all-reduce hook, divide it, add it to gradients already there, run
        post-accumulate-grad hooks, or cast it to parameters of another dtype; and the call is made
        inside a backward, whose end completes it."""
        group = self.param_group
        return (
            self.deferred is not None
            and group is not None
            and torch._C._current_graph_task_id() != -1
            and not getattr(group, "_is_hsdp", True)
            and getattr(group, "_all_reduce_hook", None) is None
            and getattr(group, "gradient_divide_factor", None) == 1
            and all(
                p.grad is None
                and not getattr(p, "_post_accumulate_grad_hooks", None)
                and (p.dtype == output.dtype or not p.requires_grad)
                for p in (fsdp_param.sharded_param for fsdp_param in group.fsdp_params)
            )
        )

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> Optional[dist.Work]:
        if async_op or op != dist.ReduceOp.SUM:
            return reduce_scatter_single(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        defer = self._may_defer(output_tensor)
        if self.deferred is not None:
            self.deferred.complete()  # the unit before: at most one in flight
        received = torch.empty_like(input_tensor)
        _REDUCE_SCATTER.issuing = True
        try:
            work = dist.all_to_all_single(received, input_tensor, group=group, async_op=defer)
        finally:
            _REDUCE_SCATTER.issuing = False
        if defer:
            assert self.deferred is not None and work is not None
            self.deferred.add(work, received, input_tensor, output_tensor, group.size())
        else:
            torch.sum(received.view(group.size(), -1), dim=0, out=output_tensor.view(-1))
        return None


class DeferredSums:
    """Gradient reduce-scatters in flight (``AllToAllReduceScatter``'s all-to-alls, issued
    asynchronously): each is completed, waited for and summed into its output, as the next is
    issued, or at the latest as the backward that issued it ends (an autograd final callback, which
    runs after FSDP2's own). So a rank that reaches a unit's reduce-scatter first does not wait there
    for the other: on a CPU a blocking collective holds both ranks in lockstep at every unit, and
    each pays for the other's jitter. One unit's gradients stay in flight: its reduce-scatter input
    and the all-to-all's output, 2 x 4 bytes a parameter of the unit, until the next unit's
    gradients are ready."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        self.callback_for = -1  # the backward (autograd graph task) whose end completes them
        self.deferred = 0  # how many have been issued asynchronously, for tests

    def add(self, work: Any, received: torch.Tensor, source: torch.Tensor, output: torch.Tensor, ranks: int) -> None:
        self.pending.append((work, received, source, output, ranks))
        self.deferred += 1
        task = torch._C._current_graph_task_id()
        if task != self.callback_for:
            self.callback_for = task
            torch.autograd.Variable._execution_engine.queue_callback(self.complete)

    def complete(self) -> None:
        while self.pending:
            work, received, _, output, ranks = self.pending.pop(0)
            work.wait()
            torch.sum(received.view(ranks, -1), dim=0, out=output.view(-1))


# ----------------------------------------------------------------------------------------------
# ZeRO-1: optimizer state sharded, parameters and gradients replicated


class ZeroOneModule:
    """Mixin added to the class of a model wrapped with ``sharding="optimizer"`` (ZeRO-1), the way
    FSDP2 adds ``FSDPModule``.

    What each rank holds, for P parameters over d data-parallel ranks:

    * the registered parameters are ``DTensor`` shards (``Shard(0)``, ``torch.chunk`` rows) over the
      data-parallel mesh: ``model.parameters()``, the optimizer built on them, its state, the
      gradient norm and DCP checkpoints all see shards, exactly as with FSDP2;
    * each parameter's full value, replicated, is what forward and backward use: swapped in by a
      pre-forward hook on the module that owns it and swapped out after its forward (so
      recomputation in backward, which calls the module again, sees it too). In fp32 the shard is a
      view into the full value (4P in all); with bf16/fp16 the full value is a half-precision copy
      (2P) and the fp32 shard is the master weight (4P/d);
    * gradients accumulate into the full values (4P, or 2P in half precision); after the backward
      of the last micro-batch they are all-reduced (summed) over the data-parallel ranks, and each
      shard's gradient becomes its rows of the reduced gradient (a view in fp32; an fp32 copy of
      the rows in half precision, reduced in fp32);
    * after the optimizer updates the shards, the next forward all-gathers the full values; a shard
      is detected as updated by its version counters, so a checkpoint load refreshes them too.
    """

    _zero1: "_ZeroOneState"

    def set_requires_gradient_sync(self, requires_gradient_sync: bool) -> None:
        """False: the next backward only accumulates local gradients (gradient accumulation)."""
        self._zero1.requires_gradient_sync = requires_gradient_sync

    def compute_parameters(self) -> list[torch.Tensor]:
        """The full (replicated) values forward and backward use, once built."""
        return [slot.full for slot in self._zero1.slots.values() if slot.full is not None]

    def gather_full_values(self) -> None:
        """Bring every full value up to date now (what the next forward's pre-hooks would do, each
        before its module runs): a collective on every data-parallel rank."""
        for slot in self._zero1.slots.values():
            self._zero1.ensure_full(slot)


class _Slot:
    """One parameter under ZeRO-1: its shard (the registered DTensor parameter) and its full value."""

    def __init__(
        self, shard: nn.Parameter, rows: int, shards: int, rank: int, compute_dtype: Optional[torch.dtype]
    ) -> None:
        self.shard = shard
        self.rows = rows
        self.chunk = -(-rows // shards)  # torch.chunk's rows per shard; the last shards may hold fewer or none
        self.start = min(rank * self.chunk, rows)
        self.end = min(self.start + self.chunk, rows)
        self.shards = shards
        self.compute_dtype = compute_dtype  # None: compute in the shard's dtype, the shard a view of the full value
        self.buffer: Optional[torch.Tensor] = None  # shards * chunk rows: the all-gather's output
        self.full: Optional[nn.Parameter] = None
        self.version: Any = None  # the shard's version when the full value was last gathered

    def current_version(self) -> tuple[int, int]:
        """Changes whenever the shard is written in place: DTensor ops (the optimizer, a checkpoint
        load) bump the DTensor's counter, direct writes to the local tensor bump the local one's."""
        return self.shard._version, self.local()._version

    def local(self) -> torch.Tensor:
        return self.shard.to_local()

    def built(self) -> bool:
        return (
            self.buffer is not None
            and (
                self.compute_dtype is not None
                or self.local().untyped_storage().data_ptr() == self.buffer.untyped_storage().data_ptr()
            )
            and self.buffer.device == self.local().device
        )


class _ZeroOneState:
    def __init__(self, mesh: DeviceMesh, compute_dtype: Optional[torch.dtype]) -> None:
        self.mesh = mesh
        self.group = mesh.get_group()
        self.rank = mesh.get_local_rank()
        self.shards = mesh.size()
        self.compute_dtype = compute_dtype
        self.slots: dict[int, _Slot] = {}  # id(shard parameter) -> slot, in registration order
        self.shard_of: dict[int, nn.Parameter] = {}  # id(full value) -> shard parameter
        self.requires_gradient_sync = True
        self._callback_queued = False

    # -- building and gathering the full values ----------------------------------------------

    @torch.no_grad()
    def _build(self, slot: _Slot) -> None:
        """Allocate the full value's buffer and, in fp32, make the shard a view into it."""
        local = slot.local()
        shape = (slot.shards * slot.chunk, *slot.shard.shape[1:])
        dtype = slot.compute_dtype or local.dtype
        slot.buffer = torch.empty(shape, dtype=dtype, device=local.device)
        full = slot.buffer[: slot.rows]
        if slot.compute_dtype is None:
            view = full[slot.start : slot.end]
            view.copy_(local)
            # Same Parameter object (the optimizer may already hold it), new storage: a view of the buffer.
            replacement = nn.Parameter(
                DTensor.from_local(
                    view, self.mesh, [Shard(0)], run_check=False, shape=slot.shard.shape, stride=slot.shard.stride()
                ),
                requires_grad=slot.shard.requires_grad,
            )
            torch.utils.swap_tensors(slot.shard, replacement)
        if slot.full is not None:
            self.shard_of.pop(id(slot.full), None)
        slot.full = nn.Parameter(full, requires_grad=slot.shard.requires_grad)
        self.shard_of[id(slot.full)] = slot.shard
        slot.full.register_post_accumulate_grad_hook(self._on_gradient)
        slot.version = None

    @torch.no_grad()
    def _gather(self, slot: _Slot) -> None:
        local = slot.local()
        chunks = list(slot.buffer.chunk(slot.shards)) if slot.chunk else [slot.buffer[:0]] * slot.shards
        mine = torch.zeros_like(chunks[self.rank])
        mine[: slot.end - slot.start].copy_(local)
        if dist.get_backend(self.group) == "gloo":
            dist.all_gather(chunks, mine, group=self.group)
        else:
            all_gather_single(slot.buffer, mine, group=self.group)
        slot.version = slot.current_version()

    def ensure_full(self, slot: _Slot) -> nn.Parameter:
        if not slot.built():
            self._build(slot)
        if slot.version != slot.current_version():
            self._gather(slot)
        return slot.full

    # -- gradients -----------------------------------------------------------------------------

    def _on_gradient(self, _: torch.Tensor) -> None:
        if self.requires_gradient_sync and not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce_gradients)

    @torch.no_grad()
    def _reduce_gradients(self) -> None:
        """End of a synchronizing backward: sum the full gradients over the data-parallel ranks (in
        a fixed order on every rank), then give each shard its rows."""
        self._callback_queued = False
        pending = []
        for slot in self.slots.values():
            if slot.full is None or slot.full.grad is None:
                continue
            grad = slot.full.grad if slot.compute_dtype is None else slot.full.grad.float()
            pending.append((slot, grad, dist.all_reduce(grad, group=self.group, async_op=True)))
        for slot, grad, work in pending:
            work.wait()
            rows = grad[slot.start : slot.end]
            if slot.compute_dtype is not None:
                rows = rows.clone()  # the reduced fp32 copy of the full gradient is freed
            shard_grad = DTensor.from_local(
                rows, self.mesh, [Shard(0)], run_check=False, shape=slot.shard.shape, stride=slot.shard.stride()
            )
            if slot.shard.grad is None:
                slot.shard.grad = shard_grad
            else:  # gradients already on the shard (an earlier synchronizing backward): accumulate
                slot.shard.grad += shard_grad
            slot.full.grad = None


def _zero_one(
    model: nn.Module, mesh: DeviceMesh, compute_dtype: Optional[torch.dtype], units: Sequence[nn.Module] = ()
) -> nn.Module:
    """Shard every parameter of ``model`` in place (ZeRO-1); see ``ZeroOneModule``.

    The full values are swapped in by a forward pre-hook on the module that owns each parameter, or,
    for the modules inside one of ``units`` (compiled blocks), on that unit, for all its modules at
    once: the compiled forward then sees full parameters and traces no hook. (Recomputation in a
    compiled block happens inside its compiled backward, on the parameters the graph was given.)"""
    unit_of = {id(m): unit for unit in units for m in unit.modules()}
    members: dict[int, tuple[nn.Module, list]] = {}  # id(hook owner) -> (owner, [(module, names)])
    if mesh.ndim != 1:
        raise ValueError(f"sharding='optimizer' runs over a 1-D data-parallel mesh, got {mesh}")
    state = _ZeroOneState(mesh, compute_dtype)
    shards: dict[int, nn.Parameter] = {}  # id(original parameter) -> its shard: tied weights stay tied
    for module in model.modules():
        owned = [(name, p) for name, p in module._parameters.items() if p is not None]
        if not owned:
            continue
        for name, param in owned:
            if isinstance(param, DTensor):
                raise ValueError(
                    f"sharding='optimizer': parameter {name!r} of {type(module).__name__} is already a DTensor"
                )
            if param.ndim == 0:
                raise ValueError(
                    f"sharding='optimizer': parameter {name!r} of {type(module).__name__} is a scalar; shard needs a "
                    "dimension"
                )
            if id(param) not in shards:
                chunk = -(-param.shape[0] // state.shards)
                start = min(state.rank * chunk, param.shape[0])
                local = param.detach()[start : min(start + chunk, param.shape[0])].clone()
                shard = nn.Parameter(
                    DTensor.from_local(
                        local, mesh, [Shard(0)], run_check=False, shape=param.shape, stride=param.stride()
                    ),
                    requires_grad=param.requires_grad,
                )
                shards[id(param)] = shard
                state.slots[id(shard)] = _Slot(shard, param.shape[0], state.shards, state.rank, compute_dtype)
            module._parameters[name] = shards[id(param)]
        owner = unit_of.get(id(module), module)
        members.setdefault(id(owner), (owner, []))[1].append((module, [name for name, _ in owned]))
    for owner, owned_by in members.values():

        def swap_in(_: nn.Module, args: Any, owned_by: list = owned_by) -> Any:
            for mod, names in owned_by:
                for name in names:
                    shard = mod._parameters[name]
                    if isinstance(shard, DTensor):
                        mod._parameters[name] = state.ensure_full(state.slots[id(shard)])
            if compute_dtype is None:
                return None
            # Mixed precision, as FSDP2 does it: floating-point inputs cast to the compute dtype.
            return tuple(
                a.to(compute_dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
            )

        def swap_out(_: nn.Module, args: Any, output: Any, owned_by: list = owned_by) -> None:
            for mod, names in owned_by:
                for name in names:
                    shard = state.shard_of.get(id(mod._parameters[name]))
                    if shard is not None:
                        mod._parameters[name] = shard

        owner.register_forward_pre_hook(swap_in)
        owner.register_forward_hook(swap_out, always_call=True)
    cls = model.__class__
    model.__class__ = type(f"ZeroOne{cls.__name__}", (ZeroOneModule, cls), {})
    model._zero1 = state
    return model
