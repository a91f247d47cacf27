"""A layout's memory, per rank, measured in a real run: the probe each rank runs (model state at the
optimizer step, the parameters held after forward, the peak activations of one micro-batch, the
collectives of a step) and the layouts run one after another in the same workers. What is measured,
and how, is described in curry_train.validation.memory, whose tools it uses."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from curry_train.config import compose
from curry_train.config.checks import check
from curry_train.config.schema import ParallelConfig
from curry_train.layout.dims import ParallelDims
from curry_train.model.llama import Llama
from curry_train.planning.memory import is_expert, tensor_parallel_shapes, zero_formula_terms, zero_formula_text
from curry_train.pool import Pools
from curry_train.primitives.distributed_optimizer import ZeroOneModule
from curry_train.primitives.pipeline_schedule import pipeline_stages
from curry_train.runner import Measurement, fit_layouts
from curry_train.validation.comm import CommCounter, ddp_bucket_bytes
from curry_train.validation.memory import MEASURED_STEP, model_state_bytes, peak_memory
from curry_train.validation.whitebox import measurement_config

# ----------------------------------------------------------------------------------------------
# A layout's memory, per rank


class MemoryProbe(Callback):
    """Takes this rank's measurements in step ``step`` of a real run (see the module docstring).

    ``comm_step`` (1-based, like ``step``; after ``step``): the step whose collectives are counted
    from ``on_train_batch_start`` to ``on_train_batch_end`` (``record["comm"]``). That step and any
    after it are not timed (no ``step_ends``)."""

    def __init__(self, step: int = MEASURED_STEP, comm_step: Optional[int] = None) -> None:
        if comm_step is not None and comm_step <= step:
            raise ValueError(f"comm_step={comm_step} must come after the measured step {step}")
        self.step = step
        self.comm_step = comm_step
        self.record: dict[str, Any] = {}
        self._hook: Optional[torch.utils.hooks.RemovableHandle] = None
        self._counter: Optional[CommCounter] = None

    def _measuring(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step == self.step - 1  # global_step counts the steps already taken

    @staticmethod
    def _optimizers(trainer: pl.Trainer) -> list[torch.optim.Optimizer]:
        return [getattr(opt, "_optimizer", opt) for opt in trainer.optimizers]

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        ps = module.step.parallel_state
        shard_mesh = ps.submesh("dp_shard_cp")
        self.record.update(
            rank=trainer.global_rank,
            shard_rank=shard_mesh.get_local_rank(),
            shards=shard_mesh.size(),
            pp_rank=ps.pp_rank,
        )

        def after_forward(*_: Any) -> None:
            # The step's own first forward: the activation measurement's forward comes before it.
            if self._measuring(trainer) and "activations" in self.record and "after_forward" not in self.record:
                self.record["after_forward"] = model_state_bytes(module.model, self._optimizers(trainer))

        self._hook = module.model.register_forward_hook(after_forward)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.comm_step is not None and trainer.global_step == self.comm_step - 1:
            self._counter = CommCounter()
            self._counter.__enter__()  # left in on_train_batch_end: the whole step, its optimizer and logging included
            return
        if not self._measuring(trainer):
            return
        if module.step.pipelined:
            # A pipeline stage cannot run a micro-batch alone, and the schedule's step calls each stage
            # once per micro-batch, which PyTorch's memory tracker refuses: not measured.
            self.record["activations"], self.record["transient"], self.record["peak"] = None, None, None
            return
        optimizers = self._optimizers(trainer)
        micro_batch = module.step.micro_batches(batch)[0]

        # As in the step's own forward_backward: tensor parallelism's loss runs under
        # loss_parallel() (vocabulary-sharded logits); context parallelism gives the model this
        # rank's share of the sequence.
        def forward_backward() -> None:
            with module.step.loss_context():
                with trainer.strategy.precision_plugin.train_step_context():
                    loss = module.step.micro_batch_loss(micro_batch)
                module.step.backward(loss)

        if isinstance(module.model, ZeroOneModule):
            # ZeRO-1 gathers the full values updated by the last step in this forward, module by module.
            # Gathered first, the measured forward is the model's alone: gloo's thread holds a gather's
            # send buffer for a moment after the collective returns, which then read as an activation.
            module.model.gather_full_values()
        device = trainer.strategy.root_device
        if device.type == "cuda":  # the allocator's own peak over the same forward+backward
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        self.record["activations"], self.record["transient"], self.record["peak"] = peak_memory(
            module.model, forward_backward, optimizers, [batch]
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.record["cuda_peak"] = torch.cuda.max_memory_allocated(device)
        for optimizer in optimizers:  # the step itself starts from no gradients, as every step does
            optimizer.zero_grad(set_to_none=True)

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        if self._measuring(trainer):
            self.record["state"] = model_state_bytes(module.model, self._optimizers(trainer))

    def _stop_counting(self) -> Optional[CommCounter]:
        counter, self._counter = self._counter, None
        if counter is not None:
            counter.__exit__(None, None, None)
        return counter

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        counter = self._stop_counting()
        if counter is not None:
            self.record.update(
                comm=counter.to_dict(), comm_step=trainer.global_step, ddp_bucket_bytes=ddp_bucket_bytes(module.model)
            )
            return
        if self.comm_step is not None and trainer.global_step >= self.comm_step:
            return
        if trainer.global_step >= self.step:  # the measured step (its end starts the clock) and those after it
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize(trainer.strategy.root_device)
            self.record.setdefault("step_ends", []).append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._stop_counting()
        if self._hook is not None:
            self._hook.remove()

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_counting()


class MemoryMeasurement(Measurement):
    """``MemoryProbe`` as the runner's probe: this rank's record after the run."""

    def __init__(self, comm_step: Optional[int] = None) -> None:
        self.probe = MemoryProbe(comm_step=comm_step)
        self.callbacks = [self.probe]

    def result(self, trainer: pl.Trainer) -> dict[str, Any]:
        return self.probe.record


@dataclass(frozen=True)
class MemoryProbeFactory:
    """Picklable: a ``MemoryMeasurement`` on each rank, counting the collectives of ``comm_step``."""

    comm_step: Optional[int] = None

    def __call__(self, cfg: DictConfig) -> MemoryMeasurement:
        return MemoryMeasurement(self.comm_step)


@dataclass
class LayoutMemory:
    """A layout's measurements: one record per rank (rank, shard_rank, shards, state, after_forward,
    activations, peak), with what the formula needs: the mode, P and d."""

    overrides: list[str]
    model: str
    mode: str  # a key of ZERO_STAGE
    mixed_precision: str
    parameters: int  # P
    tp: int  # tensor-parallel ranks
    tp_parameters: int  # parameters one tensor-parallel rank holds (its matmul shards, replicated norms); P if tp == 1
    dp: int  # d: data-parallel ranks
    replicas: int  # data-parallel replicas (hybrid: groups, each sharded over dp / replicas ranks)
    micro_batch: tuple[int, int]  # sequences x tokens of the forward+backward whose activations are measured
    recompute: str
    recompute_every_n_blocks: int
    ranks: list[dict[str, Any]] = field(default_factory=list)
    pp: int = 1  # pipeline ranks (> 1: a rank holds its stages only, and activations are not measured)
    cp: int = 1  # context-parallel ranks (a rank runs 1/cp of each sequence)
    # Per pipeline rank, the parameters one of its tensor-parallel ranks holds: [tp_parameters] without pp.
    stage_parameters: list[int] = field(default_factory=list)

    def formula_terms_of(self, pp_rank: int = 0) -> dict[str, int]:
        """ZeRO's formula for one rank: data parallelism replicates or shards what tensor and pipeline
        parallelism left on it."""
        P = self.stage_parameters[pp_rank] if self.stage_parameters else self.tp_parameters
        # FSDP shards over the context-parallel ranks too (they hold different tokens of the same samples).
        return zero_formula_terms(self.mode, P, self.dp * self.cp, self.mixed_precision, self.replicas)

    def formula_of(self, record: dict[str, Any]) -> int:
        """The formula for the rank of ``record`` (its pipeline stage's parameters)."""
        return sum(self.formula_terms_of(record.get("pp_rank", 0)).values())

    @property
    def formula_terms(self) -> dict[str, int]:
        """The formula for the rank that holds the most (the pipeline rank with the most parameters)."""
        stage = (
            max(range(len(self.stage_parameters)), key=self.stage_parameters.__getitem__)
            if self.stage_parameters
            else 0
        )
        return self.formula_terms_of(stage)

    @property
    def formula(self) -> int:
        return sum(self.formula_terms.values())

    @property
    def formula_text(self) -> str:
        return zero_formula_text(self.mode, self.mixed_precision)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "formula": self.formula, "formula_text": self.formula_text}


def _describe(overrides: Sequence[str], cfg: DictConfig, degrees: ParallelDims) -> LayoutMemory:

    parallel = ParallelConfig.of(cfg)
    fsdp = parallel.fsdp
    with torch.device("meta"):
        model = Llama(cfg.model)
    parameters = model.num_parameters()
    tp_shapes = tensor_parallel_shapes(model, degrees.tp)
    if degrees.ep > 1 and (fsdp is None or fsdp.sharding == "no_shard"):
        # replicated data parallelism holds 1/ep of each MoE layer's experts (sharded modes divide
        # them over dp x cp ranks either way: ep of them, then the ranks ep leaves)
        tp_shapes = {
            name: torch.Size([shape[0] // degrees.ep, *shape[1:]]) if is_expert(name) else shape
            for name, shape in tp_shapes.items()
        }
    stage_parameters = [sum(shape.numel() for shape in tp_shapes.values())]
    pp = parallel.pp
    if pp is not None and degrees.pp > 1:
        stage_parameters = []
        for pp_rank in range(degrees.pp):
            with torch.device("meta"):
                stage, _ = pipeline_stages(
                    Llama(cfg.model), pp.schedule, degrees.pp, pp_rank, pp.virtual_stages, pp.layers_per_stage
                )
            stage_parameters.append(sum(tp_shapes[name].numel() for name, _ in stage.named_parameters()))
    return LayoutMemory(
        overrides=list(overrides),
        model=cfg.model.name,
        mode=fsdp.sharding if fsdp is not None else "dp",
        # Autocast (trainer.precision=bf16-mixed) keeps no half-precision copy of the model state.
        mixed_precision=fsdp.mixed_precision if fsdp is not None else "fp32",
        parameters=parameters,
        tp=degrees.tp,
        tp_parameters=sum(shape.numel() for shape in tp_shapes.values()),
        dp=degrees.dp,
        replicas=degrees.dp_replicate,
        micro_batch=(cfg.data.micro_batch_size, cfg.data.seq_len),
        recompute=cfg.parallel.recompute,
        recompute_every_n_blocks=cfg.parallel.recompute_every_n_blocks,
        pp=degrees.pp,
        cp=degrees.cp,
        stage_parameters=stage_parameters,
    )


def measure_layouts(
    layouts: Sequence[Sequence[str]],
    config_dir: Optional[Path] = None,
    timed_steps: int = 0,
    count_comm: bool = False,
    pools: Optional[Pools] = None,
) -> list[LayoutMemory]:
    """Run each layout (Hydra overrides, composed and checked as for ``train.py``) for
    ``MEASURED_STEP`` steps, and ``timed_steps`` more, and return its per-rank measurements, in
    order. Layouts that need the same number of processes run in turn in one pool of workers
    (``runner.fit_layouts``): starting processes (and importing torch in them) costs more than a few
    steps of a small model. A layout that fails raises ``RuntimeError`` with its error.

    ``count_comm``: one more step, whose collectives each rank counts (``comm`` in its record)."""

    if timed_steps < 0:
        raise ValueError(f"timed_steps={timed_steps} must not be negative")
    comm_step = MEASURED_STEP + timed_steps + 1 if count_comm else None
    checked = []
    for overrides in layouts:
        cfg = measurement_config(compose(overrides, config_dir), MEASURED_STEP + timed_steps + bool(count_comm))
        checked.append((cfg, check(cfg)))
    results = [_describe(overrides, cfg, plan.dims) for overrides, (cfg, plan) in zip(layouts, checked, strict=True)]
    outcomes = fit_layouts(checked, MemoryProbeFactory(comm_step), pools)
    for overrides, result, outcome in zip(layouts, results, outcomes, strict=True):
        if not outcome.ok:
            raise RuntimeError(f"{' '.join(overrides)}: {outcome.error}")
        result.ranks = sorted(outcome.ranks, key=lambda record: record["rank"])
    return results
