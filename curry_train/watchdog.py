"""The hang watchdog: a job in which no rank has advanced for ``trainer.hang_timeout`` seconds ends,
naming the stuck rank(s), with every rank's stacks and last collectives on disk (beside it,
``stragglers.py`` names the rank its peers wait for in a run that does finish)."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from curry_train.exits import EXIT_HUNG, report


class Watchdog(Callback):
    """Ends a job in which no rank has advanced for ``timeout`` seconds, naming the stuck rank(s).

    A thread on each rank writes a heartbeat every ``poll`` seconds into ``<run_dir>/.heartbeat/``:
    the rank's step and how long ago it last advanced (a training or validation batch, a checkpoint
    save). When its own rank has not advanced for ``timeout`` seconds, the lowest rank whose thread
    still beats reads every heartbeat: the stuck ranks are those that stopped beating (a stopped or
    dead process) or, else, those at the lowest step (the others wait for them in a collective). It
    asks every rank to dump its threads' stacks (``stacks-rankNNNNN.txt`` in the run directory), waits
    for them, reports one line and ends its process with ``exits.EXIT_HUNG``; the launcher (or torchrun)
    ends the others. ``timeout=0`` turns it off."""

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
        while True:  # a beat at once, then every poll: a rank stopped in its first second is seen too
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
            if self._stop.wait(self.poll):
                return

    def _beats(self) -> dict[int, dict[str, Any]]:
        return read_beats(self.run_dir, self.world)

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
            stuck, why, _ = behind(beats)
        why += self._collective_in_wait(stuck)
        stacks = sorted(self.run_dir.glob("stacks-rank*.txt"))
        line = (
            f"curry-train: error: no rank advanced for {idle:.0f} s (trainer.hang_timeout={self.timeout:g}):"
            f" rank(s) {', '.join(map(str, stuck))} {why}; stacks: {', '.join(str(p) for p in stacks)}"
        )
        report(line)
        logging.shutdown()
        os._exit(EXIT_HUNG)  # the training thread is blocked in the collective: end the process itself


# What a collective that waited out its timeout raises. gloo: the operation that timed out reads "Timed
# out waiting ... for recv operation"; gloo then closes every pair of the context, so another operation
# in flight at that moment (DDP's bucket all-reduce, run from its comm hook's callback) reads "Application
# timeout caused pair closure" instead, and either may be the one that reaches the training thread.
# NCCL: "collective operation timeout", where it is raised.
COLLECTIVE_TIMEOUT_TEXTS = ("Timed out waiting", "Application timeout caused pair closure", "operation timeout")


def is_collective_timeout(error: BaseException) -> bool:
    """A collective that waited ``trainer.timeout`` for its peers (``COLLECTIVE_TIMEOUT_TEXTS``). By
    default NCCL's own watchdog ends the process instead of raising; the launcher then names the rank
    that ended, and the hang watchdog is the one that names a stuck rank: keep ``trainer.hang_timeout``
    below ``trainer.timeout`` on GPUs."""
    text = str(error)
    return isinstance(error, RuntimeError) and any(marker in text for marker in COLLECTIVE_TIMEOUT_TEXTS)


def read_beats(run_dir: Path, world: int) -> dict[int, dict[str, Any]]:
    """Every rank's last heartbeat (``Watchdog``) that is on disk (one not written yet: not beating)."""
    beats = {}
    for rank in range(world):
        try:
            beats[rank] = json.loads((Path(run_dir) / ".heartbeat" / f"rank-{rank:05d}.json").read_text())
        except (OSError, ValueError):
            continue
    return beats


def behind(beats: dict[int, dict[str, Any]]) -> tuple[list[int], str, bool]:
    """When every rank still beats: the ranks at the lowest step (the others wait for them), why, and
    whether every rank is at that step (none behind)."""
    lowest = min(beat["step"] for beat in beats.values())
    stuck = [rank for rank, beat in sorted(beats.items()) if beat["step"] == lowest]
    others = sorted({beat["step"] for rank, beat in beats.items() if rank not in stuck})
    why = f"at step {lowest}" + (f"; the others at step {others[0]}, waiting for them" if others else "")
    return stuck, why, not others


def timed_out(run_dir: Path, rank: int, world: int, timeout: float, poll: float = 1.0) -> tuple[bool, str]:
    """After a collective on ``rank`` waited ``timeout`` s (``trainer.timeout``) for its peers: whether this
    rank reports it (the lowest rank not stuck), and the line naming the stuck rank(s) from the watchdog's
    heartbeats. A rank that stopped (or died) beat last when it stopped, about ``timeout`` before the
    ranks that waited for it failed; else the ranks at the lowest step are the ones waited for."""
    beats = read_beats(run_dir, world)
    head = f"curry-train: error: a collective waited trainer.timeout={timeout:g} s for its peers"
    if not beats:
        return rank == 0, f"{head}; no heartbeats to name the stuck rank by (trainer.hang_timeout=0)"
    newest = max(beat["time"] for beat in beats.values())
    stale = min(max(timeout / 2, poll + 0.25), 2 * poll + 0.5)  # older than the others' by more than a beat
    stuck = [r for r in range(world) if r not in beats or newest - beats[r]["time"] > stale]
    if stuck:
        why = "stopped beating (a stopped or dead process)"
    else:
        stuck, why, alone = behind(beats)
        if alone:
            return rank == 0, f"{head}; every rank is {why}: none is named stuck"
    leader = min((r for r in range(world) if r not in stuck), default=0)
    return rank == leader, f"{head}: rank(s) {', '.join(map(str, stuck))} {why}"
