"""The callbacks of a run: a progress bar over steps, the run's first and last words, periodic
checkpoints and preemption (save and stop on SIGTERM/SIGUSR1); the hang watchdog is ``watchdog.py``."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from curry_train import stragglers
from curry_train.checkpoint import files
from curry_train.checkpoint.hf_export import export_checkpoint
from curry_train.config.schema import Config
from curry_train.watchdog import Watchdog

log = logging.getLogger(__name__)


class StepProgressBar(TQDMProgressBar):
    """One bar over the run's optimizer steps (Lightning's counts an epoch's batches), showing the
    loss and tokens/s the module logs to it. It is drawn at most every ``REFRESH_S`` seconds (and at the
    last step): Lightning's draws it twice at every step, which costs a small model's step 0.2 ms."""

    REFRESH_S = 0.1  # tqdm's own least interval between two draws

    def __init__(self) -> None:
        super().__init__()
        self._drawn = -math.inf  # time.monotonic() of the last draw

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch; later ones continue the same bar
            bar.reset(total=trainer.max_steps)
            bar.initial = trainer.global_step  # a resumed run starts where its checkpoint was
            bar.set_description("train")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable or not self._should_update(step, bar.total):
            return
        bar.n = step  # counted at every step (closing the bar shows it), drawn at most every REFRESH_S
        now = time.monotonic()
        if now - self._drawn >= self.REFRESH_S or step >= bar.total:
            self._drawn = now
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the bar spans epochs: closed at the end of training

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)  # validation's, logged through Lightning
        metrics.pop("v_num", None)  # the logger's version says nothing about training
        # training's, as host numbers at each logged step (reading them costs no synchronization)
        metrics.update({name: f"{value:.3g}" for name, value in getattr(pl_module, "progress", {}).items()})
        return metrics


class RunSummary(Callback):
    """What a person wants to see at the start of a run and at its end, on rank 0: the layout, the
    parameter count and tokens per step; then the final losses, tokens/s and where everything is."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.step_seconds, self.steps = 0.0, 0  # time inside training steps: validation and checkpoints left out
        self._step_began = 0.0
        self.straggler_line: Optional[str] = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cfg, step = self.cfg, pl_module.step
        degrees = step.parallel_state.dims
        d = cfg.data
        accumulation = d.global_batch_size // (d.micro_batch_size * degrees.dp)
        log.info(
            "%s: %s parameters | parallel=%s (%s) on %d %s process(es) | %s tokens per step (%d x %d),"
            " micro-batch %d, %d accumulation step(s) | %d steps -> %s",
            cfg.model.name,
            f"{pl_module.num_parameters:,}",
            "+".join(cfg.parallel.options),
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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank, once: the times of all ranks for the straggler report (rank 0 writes it).
        mine = stragglers.RankTimes(
            trainer.global_rank, self.steps, self.step_seconds, stragglers.recorded_collectives()
        )
        self.straggler_line = stragglers.report(stragglers.gather(mine))

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
        evaluated = [line for cb in trainer.callbacks if (line := getattr(cb, "closing_line", lambda: None)())]
        return [
            f"done: {', '.join(parts)}",
            *evaluated,  # the last evaluation's sets and tasks (curry_train.evaluation)
            *([self.straggler_line] if self.straggler_line else []),
            f"run directory: {self.run_dir}",
            f"last checkpoint: {checkpoint if checkpoint is not None else 'none saved'}",
        ]


class Preempted(Exception):
    """The run was asked to stop (SIGTERM, SIGUSR1), saved a checkpoint at a step's end and stopped."""

    signum: Optional[int] = None  # the signal this process got (None: a peer's)


class Preemption(Callback):
    """SIGTERM (what SLURM and Kubernetes send before they kill a job) and SIGUSR1 (SLURM's warning,
    ``--signal=USR1@120``): every rank finishes its current step, the run saves a checkpoint and stops;
    ``train`` then raises ``Preempted``.

    The handler only notes the signal (a collective inside a signal handler could cross the step's
    own); at each step's end the ranks agree with one all-reduce of a flag, so all stop at the same
    step even when the signal reaches them at different moments. The flag is a host tensor reduced over
    gloo (the run's own group on CPU; one of its own beside NCCL): the agreement never waits for the
    device. It replaces Lightning's SIGTERM
    handling, which broadcasts from inside the handler and ends the run without a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: Optional[int] = None  # the signal this process got
        self.stopped_at: Optional[int] = None  # the step after which the run stopped
        self._group: Optional[dist.ProcessGroup] = None  # gloo, for the host flag (None: one process)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning registers its own (in fit, after on_fit_start): ours replace them.
        if threading.current_thread() is threading.main_thread():  # Python installs handlers there only
            for signum in self.SIGNALS:
                signal.signal(signum, self._note)
        if dist.is_initialized() and dist.get_world_size() > 1:
            gloo = dist.get_backend() == "gloo"
            timeout = getattr(trainer.strategy, "timeout", None)  # trainer.timeout, as for training's groups
            self._group = dist.group.WORLD if gloo else dist.new_group(backend="gloo", timeout=timeout)

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signum

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        stop = self.received is not None
        if self._group is not None:
            flag = torch.tensor(float(stop))  # on the host
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            stop = bool(flag)
        if not stop:
            return
        for callback in trainer.callbacks:
            if isinstance(callback, PeriodicCheckpoint):  # complete before the grace period ends
                callback.save(trainer, complete=True, why="preempted")
        self.stopped_at = trainer.global_step
        trainer.should_stop = True


@contextlib.contextmanager
def _saving(trainer: pl.Trainer) -> Iterator[None]:
    """The hang watchdog paused: a long save, or a wait for one, is work, not a hang (a stuck one:
    trainer.timeout)."""
    with contextlib.ExitStack() as stack:
        for watchdog in (callback for callback in trainer.callbacks if isinstance(callback, Watchdog)):
            stack.enter_context(watchdog.paused())
        yield


class PeriodicCheckpoint(Callback):
    """Save every ``every_n_steps`` optimizer steps (and at the end); keep the last ``keep_last``."""

    def __init__(
        self,
        directory: Path,
        every_n_steps: int,
        keep_last: int,
        save_on_end: bool,
        export_hf: Optional[Path] = None,
        export_dtype: Optional[str] = None,
    ) -> None:
        self.directory, self.every_n_steps = files.place(directory), every_n_steps  # a path, or a URL
        self.keep_last, self.save_on_end = keep_last, save_on_end
        # The Hugging Face directory the final checkpoint is exported to (not after a preemption: the grace
        # period is for the save), in export_dtype (None: model.init_from's dtype, else fp32).
        self.export_hf, self.export_dtype = export_hf, export_dtype
        self._last_saved_step: Optional[int] = None
        self.last_saved: Optional[Path] = None

    def save(self, trainer: pl.Trainer, complete: bool = False, why: str = "") -> None:
        """Collective: save the state after the current step (once per step); retention prunes the older
        ones once it is complete. Under ``checkpoint.async_mode`` it is written in the background unless
        ``complete`` (the end of the run, a preemption): then it returns once the checkpoint is whole."""
        step = trainer.global_step
        saver = getattr(trainer.strategy, "saver", None)
        if step == self._last_saved_step:
            if complete and saver is not None:
                with _saving(trainer):
                    saver.wait()
            return
        settle = getattr(trainer.lightning_module, "settle", None)
        if settle is not None:  # steps skipped since the last logged step: counted (or the run stops) first
            settle()
        path = trainer.strategy.broadcast(str(self.directory / files.checkpoint_name(step)))
        began = time.perf_counter()
        with _saving(trainer):
            trainer.save_checkpoint(path, weights_only=False)
            background = saver is not None and saver.background
            if background and complete:
                saver.wait()
        self._last_saved_step, self.last_saved = step, path
        if not trainer.is_global_zero:
            return
        timing = getattr(trainer.strategy, "last_save", None)
        waited = timing.waited if timing is not None else None
        before = f"waited {waited:.2f} s for the save in flight, then " if waited else ""
        if background and not complete:
            log.info(
                "checkpoint staged: %s (%sheld training %.2f s; writing in the background)",
                path,
                before,
                time.perf_counter() - began,
            )
        else:
            log.info(
                "checkpoint saved: %s (%s%s in %.2f s)%s",
                path,
                before,
                "saved",
                time.perf_counter() - began,
                f", {why}" if why else "",
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            for debris in files.remove_interrupted(self.directory):
                log.warning("removed %s: a save that never finished", debris)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        saver = getattr(trainer.strategy, "saver", None)
        if saver is not None:
            saver.poll()  # a background save that finished: reported, or its failure raised
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        settle = getattr(pl_module, "settle", None)
        if settle is not None:  # a non-finite step past the allowance stops the run before the save and export
            settle()
        if self.save_on_end:
            self.save(trainer, complete=True)
        saver = getattr(trainer.strategy, "saver", None)
        if saver is not None:
            with _saving(trainer):
                saver.wait()  # the run ends with its checkpoints whole
        preempted = any(isinstance(c, Preemption) and c.stopped_at is not None for c in trainer.callbacks)
        if self.export_hf is not None and self.last_saved is not None and trainer.is_global_zero and not preempted:
            written = export_checkpoint(self.last_saved, self.export_hf, self.export_dtype)
            log.info("exported %s to %s (%d safetensors file(s))", self.last_saved, self.export_hf, len(written))

    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_step": self._last_saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_saved_step = state_dict.get("last_saved_step")
