"""The layout runner: layouts trained through the real training path in pools of reused workers.

Every measurement that holds a layout against something (``validation.whitebox``: one process's
gradients; ``validation.layout_memory``: ZeRO's formulas; ``validation.capacity_trial``: a device's
memory; ``validation.throughput``: a hand-written loop) runs the same body on each rank: build the
run's Trainer with a probe (a Lightning callback that takes the measurements), fit, hand back what the
probe holds. ``fit_layouts`` runs that body for many layouts, each in the ``pool.WorkerPool`` of its
world size (started once for all of them), and returns each layout's per-rank results, or the error
that layout met: one layout's failure does not stop the others.

``train_in_workers`` runs a whole run's worker body (``workers.run_worker``: loggers, checkpoints,
metrics, exactly as ``curry-train`` runs it) in a pool, for the tests that resume, reshard and
export what a run wrote.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from curry_train.config.checks import LaunchPlan
from curry_train.config.schema import Config
from curry_train.module import CausalLM, LMDataModule
from curry_train.pool import DEFAULT_TIMEOUT_S, JobFailed, Pools
from curry_train.run import build_trainer
from curry_train.workers import run_worker


class Measurement:
    """What a measurement puts into a run on one rank: its callbacks and loggers; after ``fit``, the
    rank's result."""

    callbacks: Sequence[Callback] = ()

    def loggers(self, run_dir: Path) -> list[Logger]:
        """The run's loggers (none: a measured run writes no metrics unless it measures them)."""
        return []

    def result(self, trainer: pl.Trainer) -> Any:
        raise NotImplementedError


ProbeFactory = Callable[[Config], Measurement]  # called on each rank with the run's config; pickled by name


@dataclass
class Outcome:
    """One layout's run: each rank's probe result in rank order, or the error it met."""

    ranks: Optional[list[Any]] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def quiet_lightning() -> None:
    """Lightning's per-fit banners and tips would drown the table."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


class _JobLogging:
    """A pool worker runs many jobs: each starts with the logging a fresh worker has (Lightning's
    per-fit banners quiet) and leaves none of its handlers (a run's train.log) to the next."""

    def __enter__(self) -> None:
        self.handlers = list(logging.getLogger().handlers)
        quiet_lightning()

    def __exit__(self, *exc: Any) -> None:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h not in self.handlers]:
            handler.close()
            root.removeHandler(handler)


def fit(
    cfg: Config,
    run_dir: Path,
    plan: LaunchPlan,
    measurement: Measurement,
    datamodule: Optional[LMDataModule] = None,
) -> Any:
    """This rank's run of ``cfg`` on ``plan``'s layout with ``measurement``'s callbacks and loggers (no
    checkpoints), on ``datamodule`` (None: the run's own); the measurement's result."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer = build_trainer(
        cfg,
        run_dir,
        plan.accelerator,
        plan.dims,
        callbacks=measurement.callbacks,
        checkpoints=False,
        loggers=measurement.loggers(run_dir),
    )
    trainer.fit(CausalLM(cfg), datamodule=datamodule if datamodule is not None else LMDataModule(cfg.data, cfg.seed))
    return measurement.result(trainer)


def fit_job(container: dict, run_dir: str, plan: LaunchPlan, probe: ProbeFactory) -> Any:
    """A pool job, on each rank: ``fit`` the run of ``container`` with the measurement ``probe`` makes."""
    with _JobLogging():
        cfg = Config.of(container)
        return fit(cfg, Path(run_dir), plan, probe(cfg))


def fit_layouts(
    layouts: Sequence[tuple[DictConfig, LaunchPlan]],
    probe: ProbeFactory,
    pools: Optional[Pools] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Outcome]:
    """Each checked layout (its config and ``check``'s plan) trained with ``probe``, the layouts of one
    world size one after another in one pool (``pools``: the caller's, kept open; None: pools of this
    call's own). Outcomes in the order of ``layouts``."""
    own = pools is None
    pools = pools if pools is not None else Pools(inline_single=True)
    outcomes: list[Outcome] = [Outcome() for _ in layouts]
    try:
        for world_size in sorted({plan.world_size for _, plan in layouts}):
            for index, (cfg, plan) in enumerate(layouts):
                if plan.world_size != world_size:
                    continue
                container = OmegaConf.to_container(cfg, resolve=True)
                with tempfile.TemporaryDirectory(prefix="curry-layout-") as run_dir:
                    try:
                        ranks = pools.run(
                            world_size,
                            fit_job,
                            container,
                            run_dir,
                            plan,
                            probe,
                            accelerator=plan.accelerator,
                            timeout_s=timeout_s,
                        )
                    except JobFailed as failed:
                        outcomes[index] = Outcome(error=str(failed))
                    else:
                        outcomes[index] = Outcome(ranks=ranks)
            if own:
                pools.close(world_size)
    finally:
        if own:
            pools.close()
    return outcomes


def train_job(container: dict, run_dir: str, plan: LaunchPlan) -> None:
    """On each rank: the worker body of a run (``workers.run_worker``), as ``curry-train`` starts it."""
    with _JobLogging():
        run_worker(container, run_dir, plan)


def train_in_workers(
    cfg: DictConfig, plan: LaunchPlan, run_dir: Path, pools: Pools, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Train the checked run ``cfg`` into ``run_dir`` on the pool of its world size. Raises ``JobFailed``
    (a worker's ``SystemExit`` says the run's exit status)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    container = OmegaConf.to_container(cfg, resolve=True)
    # read when the job's process group is made, as launch's workers have it from run_worker
    recorder = {"TORCH_FR_BUFFER_SIZE": str(cfg.trainer.flight_recorder)} if cfg.trainer.flight_recorder else {}
    pools.run(
        plan.world_size,
        train_job,
        container,
        str(run_dir),
        plan,
        accelerator=plan.accelerator,
        timeout_s=timeout_s,
        env=recorder,
    )
