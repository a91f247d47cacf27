"""The callbacks of a run: a progress bar over steps, the run's first and last words, periodic
checkpoints, preemption (save and stop on SIGTERM/SIGUSR1) and the hang watchdog."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n

from curry_train import stragglers
from curry_train.checkpoint import files
from curry_train.checkpoint.hf_export import export_checkpoint
from curry_train.config.schema import Config

log = logging.getLogger(__name__)


def report(line: str) -> None:
    """An error line into the run's log and onto stderr (once: Hydra's console handler writes to stdout)."""
    log.error(line)
    handlers = logging.getLogger().handlers
    if not any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr for h in handlers):
        print(line, file=sys.stderr, flush=True)


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
        return [
            f"done: {', '.join(parts)}",
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

    def __init__(
        self,
        directory: Path,
        every_n_steps: int,
        keep_last: int,
        save_on_end: bool,
        export_hf: Optional[Path] = None,
        export_dtype: Optional[str] = None,
    ) -> None:
        self.directory, self.every_n_steps = Path(directory), every_n_steps
        self.keep_last, self.save_on_end = keep_last, save_on_end
        # The Hugging Face directory the final checkpoint is exported to (not after a preemption: the grace
        # period is for the save), in export_dtype (None: model.init_from's dtype, else fp32).
        self.export_hf, self.export_dtype = export_hf, export_dtype
        self._last_saved_step: Optional[int] = None
        self.last_saved: Optional[Path] = None

    def save(self, trainer: pl.Trainer) -> None:
        """Collective: save the state after the current step (once per step), then prune."""
        step = trainer.global_step
        if step == self._last_saved_step:
            return
        path = trainer.strategy.broadcast(self.directory / files.checkpoint_name(step))
        watchdogs = [callback for callback in trainer.callbacks if isinstance(callback, Watchdog)]
        with contextlib.ExitStack() as stack:
            for watchdog in watchdogs:  # a long save is work, not a hang (a stuck one: trainer.timeout)
                stack.enter_context(watchdog.paused())
            trainer.save_checkpoint(path, weights_only=False)
        self._last_saved_step, self.last_saved = step, path
        if trainer.is_global_zero:
            files.prune(self.directory, self.keep_last)
            log.info("checkpoint saved: %s", path)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            for debris in files.remove_interrupted(self.directory):
                log.warning("removed %s: a save that never finished", debris)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_on_end:
            self.save(trainer)
        preempted = any(isinstance(c, Preemption) and c.stopped_at is not None for c in trainer.callbacks)
        if self.export_hf is not None and self.last_saved is not None and trainer.is_global_zero and not preempted:
            written = export_checkpoint(self.last_saved, self.export_hf, self.export_dtype)
            log.info("exported %s to %s (%d safetensors file(s))", self.last_saved, self.export_hf, len(written))

    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_step": self._last_saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_saved_step = state_dict.get("last_saved_step")


class Watchdog(Callback):
    """Ends a job in which no rank has advanced for ``timeout`` seconds, naming the stuck rank(s).

    A thread on each rank writes a heartbeat every ``poll`` seconds into ``<run_dir>/.heartbeat/``:
    the rank's step and how long ago it last advanced (a training or validation batch, a checkpoint
    save). When its own rank has not advanced for ``timeout`` seconds, the lowest rank whose thread
    still beats reads every heartbeat: the stuck ranks are those that stopped beating (a stopped or
    dead process) or, else, those at the lowest step (the others wait for them in a collective). It
    asks every rank to dump its threads' stacks (``stacks-rankNNNNN.txt`` in the run directory), waits
    for them, reports one line and ends its process with ``EXIT_HUNG``; the launcher (or torchrun)
    ends the others. ``timeout=0`` turns it off."""

    EXIT_HUNG = 4
    DUMP_WAIT_S = 3.0

    def __init__(self, run_dir: Path, timeout: float, poll: float = 1.0) -> None:
        self.directory = Path(run_dir) / ".heartbeat"
        self.run_dir, self.timeout, self.poll = Path(run_dir), timeout, poll
        self.rank, self.world, self.step = 0, 1, 0
        self.advanced = time.monotonic()
        self._stop = threading.Event()
        self._paused = False
        self._thread: Optional[threading.Thread] = None

    def beat(self, step: Optional[int] = None) -> None:
        """This rank advanced (from the training thread; the watchdog thread reads it)."""
        self.advanced = time.monotonic()
        if step is not None:
            self.step = step

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No hang is called while the block runs; the clock restarts when it ends."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
            self.beat()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.timeout <= 0:
            return
        self.rank, self.world = trainer.global_rank, trainer.world_size
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.directory / "dump").unlink(missing_ok=True)  # a request of an earlier run
        self.beat(trainer.global_step)
        self._thread = threading.Thread(target=self._watch, name="curry-watchdog", daemon=True)
        self._thread.start()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.beat(trainer.global_step)

    def on_validation_batch_end(self, *args: Any) -> None:
        self.beat()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop.set()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop.set()

    # -- the watchdog thread ---------------------------------------------------------------------

    def _heartbeat_path(self, rank: int) -> Path:
        return self.directory / f"rank-{rank:05d}.json"

    def _watch(self) -> None:
        dumped = False
        while not self._stop.wait(self.poll):
            idle = 0.0 if self._paused else time.monotonic() - self.advanced
            beat = {"step": self.step, "idle": idle, "time": time.time()}
            partial = self._heartbeat_path(self.rank).with_suffix(".partial")
            partial.write_text(json.dumps(beat))
            partial.replace(self._heartbeat_path(self.rank))  # readers never see half a file
            if not dumped and (self.directory / "dump").exists():
                self._dump_stacks()
                dumped = True
            if idle > self.timeout and self._leads():
                self._end_job(idle)

    def _beats(self) -> dict[int, dict[str, Any]]:
        beats = {}
        for rank in range(self.world):
            try:
                beats[rank] = json.loads(self._heartbeat_path(rank).read_text())
            except (OSError, ValueError):  # not written yet: counts as not beating
                continue
        return beats

    def _alive(self, beat: Optional[dict[str, Any]]) -> bool:
        return beat is not None and time.time() - beat["time"] < 3 * self.poll + 5

    def _leads(self) -> bool:
        """The lowest rank whose watchdog still beats acts (this one, when the others are gone)."""
        beats = self._beats()
        alive = [rank for rank in range(self.world) if rank == self.rank or self._alive(beats.get(rank))]
        return min(alive) == self.rank

    def _dump_stacks(self) -> None:
        with (self.run_dir / f"stacks-rank{self.rank:05d}.txt").open("w") as out:
            faulthandler.dump_traceback(file=out, all_threads=True)
        if int(os.environ.get("TORCH_FR_BUFFER_SIZE", "0") or 0) > 0 and dist.is_initialized():
            # PyTorch's flight recorder: this rank's last collectives, the one it waits in last.
            trace = torch._C._distributed_c10d._dump_fr_trace_json(includeCollectives=True, onlyActive=False)
            (self.run_dir / f"flight-rank{self.rank:05d}.json").write_bytes(trace)

    def _collective_in_wait(self, stuck: list[int]) -> str:
        """From the flight recorder's dumps: the collective the ranks that are not stuck wait in."""
        waiting = []
        for path in sorted(self.run_dir.glob("flight-rank*.json")):
            rank = int(path.stem.removeprefix("flight-rank"))
            try:
                entries = json.loads(path.read_text()).get("entries") or []
            except (OSError, ValueError):
                continue
            if rank not in stuck and entries:
                last = max(entries, key=lambda entry: entry.get("record_id", 0))
                group = (last.get("process_group") or ["", "?"])[1]
                waiting.append(f"{last.get('profiling_name')} #{last.get('collective_seq_id')} of {group}")
        if not waiting:
            return ""
        return f"; the others wait in {', '.join(sorted(set(waiting)))} (flight-rank*.json)"

    def _end_job(self, idle: float) -> None:
        (self.directory / "dump").touch()
        self._dump_stacks()
        time.sleep(self.DUMP_WAIT_S)  # the other ranks' watchdogs dump theirs
        beats = self._beats()
        gone = [rank for rank in range(self.world) if rank != self.rank and not self._alive(beats.get(rank))]
        if gone:
            stuck, why = gone, "stopped beating (a stopped or dead process)"
        else:
            lowest = min(beat["step"] for beat in beats.values())
            stuck = [rank for rank, beat in sorted(beats.items()) if beat["step"] == lowest]
            others = sorted({beat["step"] for rank, beat in beats.items() if rank not in stuck})
            why = f"at step {lowest}" + (f"; the others at step {others[0]}, waiting for them" if others else "")
        why += self._collective_in_wait(stuck)
        stacks = sorted(self.run_dir.glob("stacks-rank*.txt"))
        line = (
            f"curry-train: error: no rank advanced for {idle:.0f} s (trainer.hang_timeout={self.timeout:g}):"
            f" rank(s) {', '.join(map(str, stuck))} {why}; stacks: {', '.join(str(p) for p in stacks)}"
        )
        report(line)
        logging.shutdown()
        os._exit(self.EXIT_HUNG)  # the training thread is blocked in the collective: end the process itself
