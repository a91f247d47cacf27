"""CurryStrategy: the Lightning Strategy that turns the ``parallel`` config into a parallel model.

It owns, in one place and one order, everything that depends on the layout:

1. the process group and the ``ParallelState`` mesh (``setup_environment``);
2. the model, built by the LightningModule on the meta device (``tensor_init_context``), and the
   ordered list of steps that parallelizes it (``parallelize``);
3. how a step's micro-batches run forward and backward (``forward_backward``), the global gradient
   norm, and the group over which losses are summed (``metrics_group``);
4. which slice of each global batch this rank reads (``distributed_sampler_kwargs``);
5. distributed checkpoints (``save_checkpoint`` / ``load_checkpoint``).

The LightningModule and the model stay parallelism-agnostic: the model declares what can be split
(``Llama.plan``), the module declares the loss; the strategy decides how.

Gradient reduction convention: the module's loss on a micro-batch is its *contribution* to the
mean over the global batch (token losses summed, divided by the global token count), so the
data-parallel reduction must *sum* gradients, not average them. Gradient accumulation and data
parallelism then compute exactly the gradient of one big batch.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Generator, Mapping, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _init_dist_connection
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from curry_train.config.checks import layout_degrees, pipeline_microbatches
from curry_train.primitives import dcp
from curry_train.primitives.distributed_optimizer import DistributedOptimizer, ZeroOneModule
from curry_train.primitives.parallel_state import ParallelState, init_process_group_from_env
from curry_train.primitives.context_parallel import ContextParallel, sequence_positions, shard_sequence
from curry_train.primitives.pipeline_schedule import PipelineSchedule, pipeline_stages
from curry_train.primitives.recompute import apply_recompute
from curry_train.primitives.tp_linear import apply_tensor_parallel, reduce_partial_gradients

log = logging.getLogger(__name__)


def parameter_seed(seed: int, name: str) -> int:
    """A generator seed for one parameter: a function of the run seed and the parameter's name only."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def materialize_and_init(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a meta-device model on ``device`` and initialize every parameter as a single-process
    run would: the full value of each parameter is drawn from a generator seeded by its name, then
    this rank keeps its own shard. The weights are therefore identical for every layout."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    model.tie_weights()
    for name, param in model.named_parameters():
        generator = torch.Generator(device=device).manual_seed(parameter_seed(seed, name))
        full = torch.empty(param.shape, dtype=param.dtype, device=device)
        model.init_parameter(name, full, generator)
        if isinstance(param, DTensor):
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
    model.reset_buffers()


def _allreduce_sum_hook(group, bucket):  # no annotations: DDP inspects them and wants real classes
    """DDP communication hook: sum gradients over the data-parallel group (see the module docstring)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _plain(tensor: Tensor) -> Tensor:
    """A loss as a plain tensor (under loss parallelism it is a replicated DTensor)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def gradient_sync(model: nn.Module, last: bool, sync_each_microbatch: bool = False):
    """Gradient accumulation: reduce gradients over the data-parallel ranks only in the last
    micro-batch's backward (DDP: ``no_sync``; FSDP and ZeRO-1: ``set_requires_gradient_sync``), unless
    ``sync_each_microbatch`` trades traffic for the memory of unsharded gradients (FSDP)."""
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if last else model.no_sync()
    if isinstance(model, (FSDPModule, ZeroOneModule)):
        model.set_requires_gradient_sync(last or sync_each_microbatch)
    return nullcontext()


class CurryStrategy(ParallelStrategy):
    """Builds the mesh from the ``parallel`` config and applies the project's primitives in order."""

    strategy_name = "curry"

    def __init__(self, cfg: DictConfig, timeout: timedelta = timedelta(minutes=10)) -> None:
        super().__init__()
        self.cfg = cfg
        self._timeout = timeout
        self.parallel_state: Optional[ParallelState] = None
        self.pipeline_modules: Optional[list[Optional[nn.Module]]] = None  # every stage; None: not on this rank
        self._schedule: Optional[PipelineSchedule] = None
        self.num_nodes = 1

    # ------------------------------------------------------------------------------------------
    # Devices, processes, mesh

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @override
    def _configure_launcher(self) -> None:
        # Processes are started by curry_train.launch (or torchrun / srun) before the Trainer exists.
        self._launcher = None

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._set_world_ranks()
        device_type = self.root_device.type
        if self.world_size > 1:
            backend = "nccl" if device_type == "cuda" else "gloo"
            _init_dist_connection(self.cluster_environment, backend, timeout=self._timeout)
        else:
            init_process_group_from_env(device_type, self._timeout)
        degrees = layout_degrees(self.cfg, self.world_size)
        self.parallel_state = ParallelState(
            dp_replicate=degrees.dp_replicate,
            dp_shard=degrees.dp_shard,
            cp=degrees.cp,
            tp=degrees.tp,
            pp=degrees.pp,
            device_type=device_type,
        )
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank
        log.info("layout: %s", self.parallel_state)

    def _set_world_ranks(self) -> None:
        assert self.cluster_environment is not None
        self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
        self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        ps = self.parallel_state
        return {"num_replicas": ps.dp_size, "rank": ps.dp_rank}

    @property
    def metrics_group(self) -> dist.ProcessGroup:
        """Ranks that hold distinct tokens of a global batch: losses and token counts are summed over it."""
        return self.parallel_state.submesh("dp_cp").get_group()

    # ------------------------------------------------------------------------------------------
    # The model

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Generator[None, None, None]:
        # The LightningModule builds the model here; nothing is allocated until `parallelize`.
        with torch.device("meta"):
            yield

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.lightning_module is not None
        self.accelerator.setup(trainer)
        self.parallelize(self.lightning_module)
        self.model = self.lightning_module
        self.lightning_module.to(self.root_device)  # metric states and any other non-model buffers
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def parallelize(self, module: pl.LightningModule) -> None:
        """Apply the layout to ``module.model`` (built on the meta device), in the one order that works:

        0. tensor (and sequence) parallelism: swaps modules for their parallel versions, so it comes
           before anything that wraps them; its DTensor parameters are what FSDP then shards on
           the data-parallel axis of the same mesh (2-D);
        1. activation recompute: wraps each block's forward; before FSDP, so that a block's
           recomputation happens inside its unit, while its parameters are gathered;
        2. FSDP: shards the parameters while they are still on the meta device, so no rank ever
           allocates the whole model;
        3. materialize and initialize: each parameter's full value is drawn from its own
           seeded generator and each rank keeps its shard, so weights are the same for every layout;
        4. DDP (data parallelism without FSDP): replicates real tensors, so it comes after
           materialization, and last, so it sees the final set of parameters. DDP does not handle
           DTensor parameters, so with tensor parallelism the replicas are FSDP2's ``no_shard``
           (step 2) instead.
        """
        p, ps = self.cfg.parallel, self.parallel_state
        model = module.model
        tp, pp = p.get("tp"), p.get("pp")
        if tp is not None:
            apply_tensor_parallel(model, ps.mesh["tp"], tp.sequence_parallel, tp.loss_parallel)
        roots = None
        if pp is not None:
            model, self.pipeline_modules = pipeline_stages(
                model, pp.schedule, ps.mesh["pp"].size(), ps.pp_rank, pp.virtual_stages, pp.layers_per_stage
            )
            local = [stage for stage in self.pipeline_modules if stage is not None]
            roots = local if len(local) > 1 else None  # views run, not the rank's container
        blocks = list(model.get_submodule(model.plan.blocks).values())
        cp = p.get("cp")
        if cp is not None:
            attention, op = model.plan.attention_op.rsplit(".", 1)
            for block in blocks:
                ContextParallel.wrap(block.get_submodule(attention), ps.get_cp_group(), cp.pattern, causal=True,
                                     load_balance=cp.load_balance, inner_ring=cp.inner_ring, op_name=op)
        apply_recompute(blocks, p.recompute, p.recompute_every_n_blocks)
        fsdp = p.get("fsdp")
        if fsdp is None and (tp is not None or pp is not None) and ps.submesh("dp_cp").size() > 1:
            DistributedOptimizer.wrap(model, sharding="no_shard", parallel_state=ps, roots=roots)
        elif fsdp is not None:
            DistributedOptimizer.wrap(
                model,
                sharding=fsdp.sharding,
                mixed_precision=fsdp.mixed_precision,
                cpu_offload=fsdp.cpu_offload,
                backward_prefetch=fsdp.backward_prefetch,
                parallel_state=ps,
                reshard_after_forward=fsdp.reshard_after_forward,
                blocks_per_unit=fsdp.blocks_per_unit,
                roots=roots,
            )
        materialize_and_init(model, self.root_device, self.cfg.seed)
        if cp is not None:
            model.positions = sequence_positions(self.cfg.data.seq_len, cp.size, ps.cp_rank, cp.load_balance, self.root_device)
        replicas = ps.submesh("dp_cp").get_group() if cp is not None else ps.get_dp_group()
        if fsdp is None and tp is None and pp is None and ps.submesh("dp_cp").size() > 1:
            dp_cfg = p.get("dp")
            model = DistributedDataParallel(
                model,
                device_ids=[self.root_device.index] if self.root_device.type == "cuda" else None,
                process_group=replicas,
                bucket_cap_mb=dp_cfg.bucket_cap_mb if dp_cfg is not None else 25,
                static_graph=dp_cfg.static_graph if dp_cfg is not None else False,
                gradient_as_bucket_view=True,
                broadcast_buffers=False,  # RoPE tables and this rank's positions: computed, and rank-specific under cp
            )
            model.register_comm_hook(replicas, _allreduce_sum_hook)
        module.model = model

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # ------------------------------------------------------------------------------------------
    # A training step

    def forward_backward(self, module: pl.LightningModule, micro_batches: list[Tensor], loss_fn: Callable) -> Tensor:
        """Forward and backward over this rank's micro-batches; returns the summed (detached) loss.

        The gradient all-reduce runs once, in the last micro-batch's backward. Under loss
        parallelism the loss and its backward run inside ``loss_parallel()`` (the logits are
        sharded over the vocabulary); gradients tensor parallelism left pending are summed last.
        """
        model = module.model
        if self.pipeline_modules is not None:
            with self._loss_context():
                loss = self._pipeline(module).train_step(*self._pipeline_inputs(micro_batches)).loss
            if self.cfg.parallel.get("tp") is not None:
                reduce_partial_gradients(model.parameters())
            return loss
        loss_fn = self._sequence_sharded(module, loss_fn)
        fsdp = self.cfg.parallel.get("fsdp")
        sync_each = fsdp is not None and fsdp.sync_each_microbatch
        total = torch.zeros((), device=self.root_device)
        for index, batch in enumerate(micro_batches):
            with gradient_sync(model, last=index == len(micro_batches) - 1, sync_each_microbatch=sync_each):
                with self._loss_context():
                    loss = loss_fn(model, batch)
                    module.manual_backward(loss)
            total += _plain(loss.detach())
        if self.cfg.parallel.get("tp") is not None:
            reduce_partial_gradients(model.parameters())
        return total

    def _pipeline(self, module: pl.LightningModule) -> PipelineSchedule:
        """The schedule of this rank's stages (built at the first step: it needs the module's loss)."""
        if self._schedule is None:
            pp = self.cfg.parallel.pp
            degrees = layout_degrees(self.cfg, self.world_size)
            self._schedule = PipelineSchedule(
                pp.schedule,
                pipeline_microbatches(self.cfg, degrees),
                self.pipeline_modules,
                self.parallel_state.get_pp_group(),
                loss_fn=module.token_loss,
                virtual_stages=pp.virtual_stages,
                device=self.root_device,
            )
        return self._schedule

    @torch.no_grad()
    def forward_eval(self, module: pl.LightningModule, micro_batches: list[Tensor], loss_fn: Callable) -> Tensor:
        if self.pipeline_modules is not None:
            with self._loss_context():
                return self._pipeline(module).eval_step(*self._pipeline_inputs(micro_batches)).loss
        loss_fn = self._sequence_sharded(module, loss_fn)
        total = torch.zeros((), device=self.root_device)
        for batch in micro_batches:
            with self._loss_context():
                total += _plain(loss_fn(module.model, batch))
        return total

    def _cp_shard(self, x: Tensor) -> Tensor:
        cp = self.cfg.parallel.cp
        return shard_sequence(x, cp.size, self.parallel_state.cp_rank, cp.load_balance)

    def _sequence_sharded(self, module: pl.LightningModule, loss_fn: Callable) -> Callable:
        """Context parallelism: this rank's share of each sequence's inputs and labels (the model
        knows their positions: ``Llama.positions``); the loss is still over the global token count."""
        if self.cfg.parallel.get("cp") is None:
            return loss_fn
        return lambda model, tokens: module.token_loss(model(self._cp_shard(tokens[:, :-1])), self._cp_shard(tokens[:, 1:]))

    def _pipeline_inputs(self, micro_batches: list[Tensor]) -> tuple:
        """What the schedule's step takes: whole micro-batches, or with context parallelism this
        rank's shards of their inputs and labels. ``parallel.pp.microbatches`` cuts the rank's batch
        its own way (the module cuts it by ``data.micro_batch_size``); the loss is over the global
        token count either way."""
        n = self._schedule.n_microbatches  # built by _pipeline() before its step's inputs are made
        if len(micro_batches) != n:
            micro_batches = list(torch.cat(micro_batches).tensor_split(n))
        if self.cfg.parallel.get("cp") is None:
            return (micro_batches,)
        return [self._cp_shard(mb[:, :-1]) for mb in micro_batches], [self._cp_shard(mb[:, 1:]) for mb in micro_batches]

    @property
    def token_fraction(self) -> float:
        """The share of each sample's tokens this rank computes (1 / cp)."""
        cp = self.cfg.parallel.get("cp")
        return 1.0 / cp.size if cp is not None else 1.0

    def _loss_context(self):
        tp = self.cfg.parallel.get("tp")
        if tp is not None and tp.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return nullcontext()

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip to ``max_norm`` (0: measure only); returns the global gradient norm before clipping."""
        params = [p for p in self.lightning_module.parameters() if p.grad is not None]
        max_norm = max_norm if max_norm > 0 else float("inf")
        groups: dict[Any, list[Tensor]] = {}  # torch's foreach kernels take one kind of tensor at a time
        for param in params:
            groups.setdefault(getattr(param.grad, "device_mesh", None), []).append(param.grad)
        pipelined = self.pipeline_modules is not None and self.parallel_state.mesh["pp"].size() > 1
        if len(groups) == 1 and not pipelined:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            return _plain(norm)
        # Tensor parallelism without FSDP: DTensor gradients beside plain (replicated) ones; and
        # pipeline stages: each rank holds some parameters, the norm is over all of them.
        norms = [_plain(torch.nn.utils.get_total_norm(grads, foreach=True)) for grads in groups.values()]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=self.root_device)
        if pipelined:
            squared = norm.double().square()
            dist.all_reduce(squared, group=self.parallel_state.get_pp_group())
            norm = squared.sqrt().float()
        scale = min(1.0, max_norm / (float(norm) + 1e-6))  # torch's clip coefficient
        if scale < 1.0:
            for grads in groups.values():
                torch._foreach_mul_(grads, scale)
        return norm

    # ------------------------------------------------------------------------------------------
    # Collectives used by Lightning

    @override
    def barrier(self, name: Optional[str] = None) -> None:
        if dist.is_initialized():
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src)
        return holder[0]

    @override
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[str] = "mean") -> Any:
        if not isinstance(tensor, Tensor) or not dist.is_initialized():
            return tensor
        op = dist.ReduceOp.SUM if reduce_op in ("sum", None) else dist.ReduceOp.MAX if reduce_op == "max" else None
        result = tensor.clone()
        dist.all_reduce(result, op=op or dist.ReduceOp.SUM, group=group)
        if op is None:
            result /= dist.get_world_size(group)
        return result

    @override
    def teardown(self) -> None:
        super().teardown()
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------------------
    # Checkpoints: model and optimizer go through DCP in `save_checkpoint`, not through Lightning.

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return False

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}

    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {}

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Optional[Any] = None) -> None:
        meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        dcp.save(filepath, self.lightning_module, self._raw_optimizers(), meta)

    @override
    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        return dcp.load(checkpoint_path, self.lightning_module, self._raw_optimizers())

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # loaded in place by load_checkpoint

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # loaded in place by load_checkpoint

    @override
    def remove_checkpoint(self, filepath: str | Path) -> None:
        if self.is_global_zero:
            shutil.rmtree(filepath, ignore_errors=True)

    def _raw_optimizers(self) -> list[torch.optim.Optimizer]:
        return [getattr(opt, "_optimizer", opt) for opt in self.optimizers]
