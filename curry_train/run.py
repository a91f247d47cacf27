"""One worker's run: loggers, callbacks, the Trainer, and ``fit``. Called once per process."""

from __future__ import annotations

import csv
import logging
import os
import signal
import sys
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from omegaconf import DictConfig, OmegaConf

from curry_train.config.schema import ParallelConfig
from curry_train.module import CausalLM, LMDataModule
from curry_train.primitives import dcp
from curry_train.strategy import CurryStrategy

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


class StepProgressBar(TQDMProgressBar):
    """One bar over the run's optimizer steps (Lightning's counts an epoch's batches), showing the
    loss and tokens/s the module logs to it."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch; later ones continue the same bar
            bar.reset(total=trainer.max_steps)
            bar.initial = trainer.global_step  # a resumed run starts where its checkpoint was
            bar.set_description("train")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            _update_n(bar, trainer.global_step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the bar spans epochs: closed at the end of training

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version says nothing about training
        return metrics


class RunSummary(Callback):
    """What a person wants to see at the start of a run and at its end, on rank 0: the layout, the
    parameter count and tokens per step; then the final losses, tokens/s and where everything is."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.step_seconds, self.steps = 0.0, 0  # time inside training steps: validation and checkpoints left out
        self._step_began = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cfg, step = self.cfg, pl_module.step
        degrees = step.parallel_state.degrees
        d = cfg.data
        accumulation = d.global_batch_size // (d.micro_batch_size * degrees.dp)
        log.info(
            "%s: %s parameters | parallel=%s (%s) on %d %s process(es) | %s tokens per step (%d x %d),"
            " micro-batch %d, %d accumulation step(s) | %d steps -> %s",
            cfg.model.name,
            f"{pl_module.num_parameters:,}",
            "+".join(ParallelConfig.of(cfg).options),
            degrees,
            trainer.world_size,
            trainer.strategy.root_device.type,
            f"{d.global_batch_size * d.seq_len:,}",
            d.global_batch_size,
            d.seq_len,
            d.micro_batch_size,
            accumulation,
            trainer.max_steps,
            self.run_dir,
        )

    def on_train_batch_start(self, *_: Any) -> None:
        self._step_began = time.perf_counter()

    def on_train_batch_end(self, *_: Any) -> None:
        self.step_seconds += time.perf_counter() - self._step_began
        self.steps += 1

    def closing_lines(self, trainer: pl.Trainer) -> list[str]:
        """The run's last words (after every callback's end of training, the last checkpoint's too)."""
        metrics = trainer.callback_metrics
        parts = [f"step {trainer.global_step}"]
        for key, name in (("train/loss", "train loss"), ("val/loss", "val loss")):
            if key in metrics:
                parts.append(f"{name} {float(metrics[key]):.4f}")
        if self.step_seconds > 0:
            tokens = self.steps * self.cfg.data.global_batch_size * self.cfg.data.seq_len
            parts.append(f"{tokens / self.step_seconds:,.0f} tokens/s")
        checkpoint = next((cb.last_saved for cb in trainer.callbacks if isinstance(cb, PeriodicCheckpoint)), None)
        return [
            f"done: {', '.join(parts)}",
            f"run directory: {self.run_dir}",
            f"last checkpoint: {checkpoint if checkpoint is not None else 'none saved'}",
        ]


class Preempted(Exception):
    """The run was asked to stop (SIGTERM, SIGUSR1), saved a checkpoint at a step's end and stopped."""


class Preemption(Callback):
    """SIGTERM (what SLURM and Kubernetes send before they kill a job) and SIGUSR1 (SLURM's warning,
    ``--signal=USR1@120``): every rank finishes its current step, the run saves a checkpoint and stops;
    ``train`` then raises ``Preempted``.

    The handler only notes the signal (a collective inside a signal handler could cross the step's
    own); at each step's end the ranks agree with one all-reduce of a flag, so all stop at the same
    step even when the signal reaches them at different moments. It replaces Lightning's SIGTERM
    handling, which broadcasts from inside the handler and ends the run without a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: Optional[int] = None  # the signal this process got
        self.stopped_at: Optional[int] = None  # the step after which the run stopped

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning registers its own (in fit, after on_fit_start): ours replace them.
        if threading.current_thread() is threading.main_thread():  # Python installs handlers there only
            for signum in self.SIGNALS:
                signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signum

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        flag = torch.tensor(float(self.received is not None), device=trainer.strategy.root_device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not bool(flag):
            return
        for callback in trainer.callbacks:
            if isinstance(callback, PeriodicCheckpoint):
                callback.save(trainer)
        self.stopped_at = trainer.global_step
        trainer.should_stop = True


class PeriodicCheckpoint(Callback):
    """Save every ``every_n_steps`` optimizer steps (and at the end); keep the last ``keep_last``."""

    def __init__(self, directory: Path, every_n_steps: int, keep_last: int, save_on_end: bool) -> None:
        self.directory, self.every_n_steps = Path(directory), every_n_steps
        self.keep_last, self.save_on_end = keep_last, save_on_end
        self._last_saved_step: Optional[int] = None
        self.last_saved: Optional[Path] = None

    def save(self, trainer: pl.Trainer) -> None:
        """Collective: save the state after the current step (once per step), then prune."""
        step = trainer.global_step
        if step == self._last_saved_step:
            return
        path = trainer.strategy.broadcast(self.directory / dcp.checkpoint_name(step))
        trainer.save_checkpoint(path, weights_only=False)
        self._last_saved_step, self.last_saved = step, path
        if trainer.is_global_zero:
            dcp.prune(self.directory, self.keep_last)
            log.info("checkpoint saved: %s", path)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            for debris in dcp.remove_interrupted(self.directory):
                log.warning("removed %s: a save that never finished", debris)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_on_end:
            self.save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_step": self._last_saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_saved_step = state_dict.get("last_saved_step")


def wandb_account_configured() -> bool:
    """An API key in the environment, or a ``wandb login`` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def make_loggers(cfg: DictConfig, run_dir: Path, run_name: str, resume_step: Optional[int] = None) -> list[Logger]:
    """The per-step metrics.csv in the run directory (always: later tools read it), plus the tracker.
    ``resume_step``: a run resumed in its own directory keeps the rows of the steps before it."""
    csv_logger = CSVLogger(save_dir=str(run_dir), name="csv", version="", flush_logs_every_n_steps=1)
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
                config=OmegaConf.to_container(cfg, resolve=True),
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


def run_name(cfg: DictConfig) -> str:
    return f"{cfg.model.name}-{'+'.join(ParallelConfig.of(cfg).options)}"


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    accelerator: str,
    callbacks: Sequence[Callback] = (),
    checkpoints: bool = True,
    loggers: Optional[Iterable[Logger]] = None,
) -> pl.Trainer:
    t = cfg.trainer
    all_callbacks = list(callbacks)
    if checkpoints:
        c = cfg.checkpoint
        all_callbacks.append(PeriodicCheckpoint(run_dir / "checkpoints", c.every_n_steps, c.keep_last, c.save_on_end))
    if t.enable_progress_bar:
        all_callbacks.append(StepProgressBar())
    return pl.Trainer(
        accelerator="gpu" if accelerator == "cuda" else "cpu",
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=CurryStrategy(cfg, timeout=timedelta(seconds=t.timeout)),
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
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
    )


def train(cfg: DictConfig, run_dir: Path, accelerator: str, ckpt_path: Optional[str]) -> pl.Trainer:
    """Train with ``cfg`` in this process (one rank of the run). Returns the finished Trainer."""
    # Lightning's own notices print on rank 0 only once the strategy knows the rank: from the start.
    rank_zero_only.rank = utils_rank_zero_only.rank = int(os.environ.get("RANK", "0"))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    summary = RunSummary(cfg, run_dir)
    in_place = ckpt_path is not None and Path(run_dir).resolve() in Path(ckpt_path).resolve().parents
    loggers = make_loggers(cfg, run_dir, run_name(cfg), dcp.saved_step(ckpt_path) if in_place else None)
    preemption = Preemption()
    trainer = build_trainer(cfg, run_dir, accelerator, callbacks=[summary, preemption], loggers=loggers)
    trainer.fit(CausalLM(cfg), datamodule=LMDataModule(cfg.data, cfg.seed), ckpt_path=ckpt_path)
    if preemption.stopped_at is not None:
        name = signal.Signals(preemption.received).name if preemption.received else "a peer's signal"
        raise Preempted(f"{name}: stopped after step {preemption.stopped_at} and saved its checkpoint")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # its closing notes now, so that the summary is the run's last words
    for line in summary.closing_lines(trainer) if trainer.is_global_zero else ():
        log.info(line)
    return trainer
