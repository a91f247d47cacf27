"""One worker's run: loggers, callbacks, the Trainer, and ``fit``. Called once per process."""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import signal
import sys
import warnings
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import IO, Iterable, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from typing_extensions import override

from curry_train.callbacks import PeriodicCheckpoint, Preempted, Preemption, RunSummary, StepProgressBar
from curry_train.checkpoint import dcp, files
from curry_train.config.schema import Config
from curry_train.evaluation.callback import Evaluation
from curry_train.layout.dims import ParallelDims
from curry_train.module import CausalLM, LMDataModule
from curry_train.strategy import CurryStrategy
from curry_train.watchdog import Watchdog

log = logging.getLogger(__name__)

# Metrics are reduced by torchmetrics over the right group before they are logged (module.py), so
# Lightning's advice to add sync_dist does not apply; the pytree notice is Lightning's, about torch.
warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class _DropAdvertisements(logging.Filter):
    """Lightning's start-up tip for a hosted logging service says nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertisements())


def wandb_account_configured() -> bool:
    """An API key in the environment, or a ``wandb login`` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class _AppendingWriter(ExperimentWriter):
    """Lightning's metrics.csv writer with its file kept open: a logged step appends its rows and flushes them
    to the operating system (a killed process keeps them) instead of reopening the file through fsspec and
    checking it exists at every step (~0.2 ms a logged step). New columns rewrite the file with the wider
    header, as Lightning's does."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._file: Optional[IO[str]] = None
        self._rows: Optional[csv.DictWriter] = None

    def save(self) -> None:
        if not self.metrics:
            return
        new_keys = self._record_new_keys()
        if self._rows is None or new_keys:
            self.close()
            exists = self._fs.isfile(self.metrics_file_path)
            if new_keys and exists:
                self._rewrite_with_new_header(self.metrics_keys)
            self._file = self._fs.open(self.metrics_file_path, mode="a" if exists else "w", newline="")
            self._rows = csv.DictWriter(self._file, fieldnames=self.metrics_keys)
            if not exists:
                self._rows.writeheader()
        self._rows.writerows(self.metrics)
        self._file.flush()
        self.metrics = []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._rows = None


class MetricsCsv(CSVLogger):
    """The run's metrics.csv: Lightning's CSV logger with ``_AppendingWriter``."""

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if isinstance(self._experiment, _AppendingWriter):
            self._experiment.close()


class _Unprofiled(PassThroughProfiler):
    """Lightning's default, no profiling, with a shared null context for ``profile``: the default makes and
    runs a generator context at every hook call and every callback's hook call (~15 a step)."""

    @override
    def profile(self, action_name: str) -> AbstractContextManager:
        return _NOTHING


_NOTHING = nullcontext()


def make_loggers(cfg: Config, run_dir: Path, run_name: str, resume_step: Optional[int] = None) -> list[Logger]:
    """The per-step metrics.csv in the run directory (always: later tools read it), plus the tracker.
    ``resume_step``: a run resumed in its own directory keeps the rows of the steps before it."""
    csv_logger = MetricsCsv(save_dir=str(run_dir), name="csv", version="", flush_logs_every_n_steps=1)
    if resume_step is not None and rank_zero_only.rank == 0:
        keep_metrics_before(csv_logger, resume_step)
    loggers: list[Logger] = [csv_logger]
    kind = cfg.logger.kind
    if kind == "wandb":
        offline = cfg.logger.offline if cfg.logger.offline is not None else not wandb_account_configured()
        loggers.append(
            WandbLogger(
                name=run_name,
                save_dir=str(run_dir),
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                offline=offline,
                tags=list(cfg.logger.tags),
                config=dataclasses.asdict(cfg),
            )
        )
    elif kind == "tensorboard":
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    return loggers


def keep_metrics_before(logger: CSVLogger, step: int) -> None:
    """Lightning's CSV writer starts its file afresh: give it back the rows logged before ``step``
    (those after it were logged by a run that did not reach its next checkpoint, and are redone)."""
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header, rows = list(reader.fieldnames or []), [row for row in reader if int(row["step"]) < step]
    writer = logger.experiment  # made now: it deletes the file
    with path.open("w", newline="") as handle:
        table = csv.DictWriter(handle, fieldnames=header)
        table.writeheader()
        table.writerows(rows)
    writer.metrics_keys = sorted(header)


def configure_worker_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs to the console and <run_dir>/train.log; other ranks print warnings only."""
    root = logging.getLogger()
    if root.handlers:  # the process Hydra itself configured
        return
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank != 0:  # Lightning's loggers have handlers of their own: its per-rank notices, once is enough
        for name in ("lightning.fabric", "lightning.pytorch"):
            logging.getLogger(name).setLevel(logging.WARNING)


def run_name(cfg: Config) -> str:
    return f"{cfg.model.name}-{'+'.join(cfg.parallel.options)}"


def build_trainer(
    cfg: Config,
    run_dir: Path,
    accelerator: str,
    dims: ParallelDims,
    callbacks: Sequence[Callback] = (),
    checkpoints: bool = True,
    loggers: Optional[Iterable[Logger]] = None,
) -> pl.Trainer:
    t = cfg.trainer
    all_callbacks = list(callbacks)
    if checkpoints:
        c = cfg.checkpoint
        export_hf = run_dir / "hf" if c.export_hf_on_end else None
        all_callbacks.append(
            PeriodicCheckpoint(
                files.checkpoint_dir(run_dir, c.dir),
                c.every_n_steps,
                c.keep_last,
                c.save_on_end,
                export_hf,
                c.export_hf_dtype,
            )
        )
    if t.enable_progress_bar:
        all_callbacks.append(StepProgressBar())
    return pl.Trainer(
        accelerator="gpu" if accelerator == "cuda" else "cpu",
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=CurryStrategy(cfg, dims, timeout=timedelta(seconds=t.timeout)),
        precision=t.precision,
        max_steps=t.max_steps,
        logger=list(loggers) if loggers is not None else make_loggers(cfg, run_dir, run_name(cfg)),
        callbacks=all_callbacks,
        # The module logs every trainer.log_every_n_steps steps: Lightning writes rows at the same cadence, and
        # none between them (it would repeat the last logged values as those of the steps in between).
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        enable_progress_bar=t.enable_progress_bar,
        enable_checkpointing=False,
        enable_model_summary=False,
        profiler=_Unprofiled(),
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
    )


def run_callbacks(cfg: Config, run_dir: Path) -> list[Callback]:
    """A run's own callbacks, besides checkpoints and the progress bar (``build_trainer``): its summary, the
    preemption handler (these two first, in this order), the hang watchdog, and evaluation if configured."""
    callbacks: list[Callback] = [RunSummary(cfg, run_dir), Preemption(), Watchdog(run_dir, cfg.trainer.hang_timeout)]
    evaluation = Evaluation(cfg)
    if evaluation.enabled:
        callbacks.append(evaluation)
    return callbacks


def train(cfg: Config, run_dir: Path, accelerator: str, dims: ParallelDims, ckpt_path: Optional[str]) -> pl.Trainer:
    """Train with ``cfg`` in this process (one rank of the run, of the layout ``dims``). Returns the
    finished Trainer."""
    # Lightning's own notices print on rank 0 only once the strategy knows the rank: from the start.
    rank_zero_only.rank = utils_rank_zero_only.rank = int(os.environ.get("RANK", "0"))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    callbacks = run_callbacks(cfg, run_dir)
    summary, preemption = callbacks[0], callbacks[1]
    own = str(files.absolute(files.checkpoint_dir(run_dir, cfg.checkpoint.dir))).rstrip("/") + "/"
    in_place = ckpt_path is not None and str(files.absolute(ckpt_path)).startswith(own)
    loggers = make_loggers(cfg, run_dir, run_name(cfg), dcp.saved_step(ckpt_path) if in_place else None)
    trainer = build_trainer(cfg, run_dir, accelerator, dims, callbacks=callbacks, loggers=loggers)
    trainer.fit(CausalLM(cfg), datamodule=LMDataModule(cfg.data, cfg.seed), ckpt_path=ckpt_path)
    if preemption.stopped_at is not None:
        name = signal.Signals(preemption.received).name if preemption.received else "a peer's signal"
        stopped = Preempted(f"{name}: stopped after step {preemption.stopped_at} and saved its checkpoint")
        stopped.signum = preemption.received
        raise stopped
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # its closing notes now, so that the summary is the run's last words
    for line in summary.closing_lines(trainer) if trainer.is_global_zero else ():
        log.info(line)
    return trainer
