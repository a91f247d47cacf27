"""CurryStrategy: the Lightning Strategy of a curry-train run. Lightning's hooks only.

* environment: the process group and the ``ParallelState`` mesh of the run's ``ParallelDims``
  (``setup_environment``);
* setup: the LightningModule builds its model on the meta device (``tensor_init_context``), then
  ``curry_train.parallelize`` applies the layout and a ``curry_train.train_step.TrainStep`` is handed to
  the module, which runs it: mesh -> parallelize -> TrainStep;
* which slice of each global batch this rank reads (``distributed_sampler_kwargs``);
* collectives through Lightning's own helpers (``reduce``, ``broadcast``, ``barrier``);
* Lightning's hooks around each batch's transfer, backward and optimizer step, dispatched only where the
  module, its datamodule or a callback implements them (``_implemented``: the loop's own cost);
* checkpoint IO: model and optimizer through DCP (``curry_train.checkpoint.dcp``), by parameter
  name, so a checkpoint of any layout resumes under any other.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Generator, Mapping, Optional, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.distributed import group as _group
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from torch.distributed import ReduceOp
from typing_extensions import override

from curry_train.checkpoint import dcp, files
from curry_train.checkpoint.background import BackgroundSaver
from curry_train.config.schema import Config
from curry_train.layout.dims import ParallelDims
from curry_train.parallelize import parallelize
from curry_train.primitives.parallel_state import ParallelState, init_process_group_from_env
from curry_train.train_step import StepSettings, TrainStep

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SaveTiming:
    """How long the last save held training: waiting for the save in flight before it (None: none was),
    and in all (the wait, staging, and the write itself when it is not in the background)."""

    waited: Optional[float]
    blocked: float


class CurryStrategy(ParallelStrategy):
    """The mesh of the run's ``ParallelDims``, the model through ``parallelize``, and its ``TrainStep``."""

    strategy_name = "curry"

    def __init__(self, cfg: Config, dims: ParallelDims, timeout: timedelta = timedelta(minutes=10)) -> None:
        super().__init__()
        self.cfg = cfg
        self.dims = dims  # built once by the config check (config.checks.check), handed to every worker
        self._timeout = timeout
        self._resumed: Optional[tuple[Path, Optional[str]]] = None  # the checkpoint resumed, and what it continued
        self.saver = BackgroundSaver(cfg.checkpoint.async_mode, timeout)
        self.last_save: Optional[SaveTiming] = None
        self.parallel_state: Optional[ParallelState] = None
        self.num_nodes = 1
        self._owns_process_group = True
        self._backward_hooks: Optional[bool] = None  # whether to dispatch Lightning's hooks (`_implemented`)
        self._step_hooks: Optional[bool] = None
        self._transfer_hooks: Optional[bool] = None

    @property
    def timeout(self) -> timedelta:
        """How long a collective waits for its peers (``trainer.timeout``), for every group of the run."""
        return self._timeout

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
        assert self.cluster_environment is not None
        self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
        self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        device_type = self.root_device.type
        # A pool of workers (curry_train.pool) joins each job's group before the run: it is the pool's to end.
        self._owns_process_group = not dist.is_initialized()
        if self.world_size > 1:
            _init_dist_connection(
                self.cluster_environment, "nccl" if device_type == "cuda" else "gloo", timeout=self._timeout
            )
        else:
            init_process_group_from_env(device_type, self._timeout)
        self.parallel_state = ParallelState(self.dims, device_type)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.parallel_state.dp_size, "rank": self.parallel_state.dp_rank}

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
        module, cfg = self.lightning_module, self.cfg
        self._backward_hooks = self._step_hooks = self._transfer_hooks = None  # decided again for this fit
        parallel = parallelize(
            module.model,
            self.parallel_state,
            cfg.parallel,
            device=self.root_device,
            seed=cfg.seed,
            seq_len=cfg.data.seq_len,
            init_from=cfg.model.init_from,
            compile_backend=cfg.compile.backend if cfg.compile.enabled else None,
            lora=cfg.model.lora,
        )
        # data.document_mask: the data's separator marks where its packed documents end
        separator = trainer.datamodule.separator if cfg.data.document_mask else None
        settings = StepSettings.of(cfg, self.dims.dp, separator)
        # each micro-batch's backward through the precision plugin, as LightningModule.manual_backward does
        module.attach(
            TrainStep(parallel, self.parallel_state, cfg.parallel, settings, self._backward, self.root_device)
        )
        self.model = module
        module.to(self.root_device)  # metric states and any other non-model buffers
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _backward(self, loss: Tensor) -> None:
        self.backward(loss, None)

    # ------------------------------------------------------------------------------------------
    # Lightning's hooks around each backward and optimizer step, dispatched only where implemented

    def _implemented(self, *hooks: str, callbacks: bool = True) -> bool:
        """Whether the module, its datamodule or (``callbacks``) any callback implements one of ``hooks``.
        Lightning calls each hook on the module and on every callback, implemented or not (a profiler context
        and two attribute writes each): for the hooks of every batch's transfer, every micro-batch's backward
        and every optimizer step, that is most of the loop's own cost on a small model. The precision plugin
        must do nothing besides the hooks there (no loss scaler)."""
        plain = type(self.precision_plugin) in (Precision, MixedPrecision)
        if not plain or getattr(self.precision_plugin, "scaler", None) is not None:
            return True
        if self.lightning_module.automatic_optimization:  # Lightning's closure and clipping: its own path
            return True
        trainer = self.lightning_module.trainer
        owners = [(self.lightning_module, pl.LightningModule), (trainer.datamodule, pl.LightningDataModule)]
        if callbacks:
            owners += [(callback, Callback) for callback in trainer.callbacks]
        return any(
            is_overridden(hook, owner, parent) for hook in hooks for owner, parent in owners if owner is not None
        )

    @override
    def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
        if self.lightning_module is None:
            return super().batch_to_device(batch, device, dataloader_idx)
        if self._transfer_hooks is None:
            self._transfer_hooks = self._implemented(
                "transfer_batch_to_device", "on_after_batch_transfer", callbacks=False
            )
        if self._transfer_hooks:
            return super().batch_to_device(batch, device, dataloader_idx)
        return move_data_to_device(batch, device or self.root_device)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Any], *args: Any, **kwargs: Any) -> Tensor:
        if self._backward_hooks is None:  # decided at the first backward: the callbacks are the trainer's by then
            self._backward_hooks = self._implemented("on_before_backward", "on_after_backward")
        if self._backward_hooks:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        self.precision_plugin.backward(closure_loss, self.lightning_module, optimizer, *args, **kwargs)
        return closure_loss.detach()

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Optional[Any] = None, **kwargs: Any) -> Any:
        if self._step_hooks is None:
            self._step_hooks = self._implemented("on_before_optimizer_step")
        if self._step_hooks:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        closure()  # manual optimization: Lightning's do-nothing closure (the step's backward has run)
        return optimizer.step(**kwargs)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # ------------------------------------------------------------------------------------------
    # Collectives used by Lightning

    @override
    def barrier(self, name: Optional[str] = None) -> None:
        if not _distributed_is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src, group=_group.WORLD)
        return holder[0]

    @override
    def reduce(
        self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Union[ReduceOp, str]] = "mean"
    ) -> Any:
        if isinstance(tensor, Tensor):  # None meant a sum here before Lightning's helper, which needs an op
            return _sync_ddp_if_available(tensor, group, reduce_op="sum" if reduce_op is None else reduce_op)
        return tensor

    @override
    def teardown(self) -> None:
        try:
            self.saver.close()  # a save in flight completes before the process group goes
        except Exception as error:  # already raised at the step that waited for it, or the run is ending on another
            log.error("the checkpoint written in the background failed: %s", error)
        ending_on = sys.exc_info()[1]  # Lightning tears down inside its handler of the error that ended the fit
        try:
            super().teardown()  # moves the module to the CPU
        except Exception as error:
            if ending_on is None:
                raise
            # An FSDP2 unit stopped mid-gather (a collective's timeout in its pre-forward) cannot be moved:
            # raised, this error would hide the one that ended the run, which names its cause and exit status.
            log.warning("teardown after %s failed: %s: %s", type(ending_on).__name__, type(error).__name__, error)
        if dist.is_initialized() and self._owns_process_group:
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
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Optional[Any] = None
    ) -> None:
        meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        config = dataclasses.asdict(self.cfg)  # what a resumed run is compared with
        frozen = self.cfg.model.lora is not None and not self.cfg.checkpoint.save_base  # LoRA: adapters alone
        lineage = {"resumed_from": files.lineage(self._resumed, filepath)}
        c = self.cfg.checkpoint
        began = time.perf_counter()
        waited = self.saver.wait() if self.saver.background else None  # at most one save in flight
        staged = dcp.stage(
            filepath,
            self.lightning_module,
            self._raw_optimizers(),
            meta,
            config,
            skip_frozen=frozen,
            lineage=lineage,
            copy=self.saver.background,
        )
        self.saver.save(staged, dcp.Retention(c.keep_last, c.keep_every))
        self.last_save = SaveTiming(waited, time.perf_counter() - began)

    @override
    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # what this run's checkpoints will record they continue (read now: retention may delete it later)
        self._resumed = (files.absolute(checkpoint_path), files.resumed_from(checkpoint_path))
        optimizers = self._raw_optimizers()
        loaded = dcp.load(checkpoint_path, self.lightning_module, optimizers)
        for optimizer in optimizers:  # the kernels are this layout's choice (configure_optimizers), not the saver's
            for group in optimizer.param_groups:
                for key in ("fused", "foreach"):
                    if key in optimizer.defaults:
                        group[key] = optimizer.defaults[key]
        return loaded

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
