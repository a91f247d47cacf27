"""Saves that do not stall training (``checkpoint.async_mode``).

A save is staged on the training thread (``dcp.stage``: the state copied to host memory, pinned on CUDA,
with the RNG states and the loop's metadata) and training goes on; a background thread writes it
(``dcp.write``: the shards through DCP, the small files, the manifest last, the rename, then retention),
with collectives on a process group of its own so that they never interleave with training's. At most one
save is in flight: the next one waits for it first. A failed write is raised on the training thread at
the next step (``poll``) or wait, as ``CheckpointWriteError``; the checkpoint before it stays the newest
complete one, since nothing is renamed or pruned before a save is whole.

* ``thread``: DCP writes from the background thread of this process (file writes release the GIL).
* ``process``: DCP's own process executor writes the shards (``AsyncCheckpointerType.PROCESS``, away from
  this process's GIL); the background thread then writes the small files and the manifest.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from curry_train.checkpoint import dcp
from curry_train.checkpoint.dcp import Retention, Staged
from curry_train.options import ASYNC_MODES

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    staged: Staged
    future: Future
    started: float


def _process_save(state: dict[str, Any], storage_writer: Any = None, process_group: Any = None) -> Any:
    """DCP's process executor: the shards written by a process of its own; returns once they are."""
    return torch_dcp.async_save(
        state,
        storage_writer=storage_writer,
        process_group=process_group,
        async_checkpointer_type=AsyncCheckpointerType.PROCESS,
    ).result()


class BackgroundSaver:
    """At most one save in flight; ``mode`` is ``checkpoint.async_mode`` (``off``: every save finishes
    before training goes on)."""

    def __init__(self, mode: str = "off", timeout: Optional[timedelta] = None) -> None:
        if mode not in ASYNC_MODES:
            raise ValueError(f"checkpoint.async_mode={mode!r}: expected one of {', '.join(ASYNC_MODES)}")
        self.mode = mode
        self.timeout = timeout  # the background group's collectives wait as long as training's (trainer.timeout)
        self._executor: Optional[ThreadPoolExecutor] = None
        self._group: Any = None
        self._inflight: Optional[InFlight] = None
        self.written: list[float] = []  # seconds each background save took to write, in order

    @property
    def background(self) -> bool:
        return self.mode != "off"

    def _own_group(self) -> Any:
        """Collective on first use (every rank saves at the same step): the background writes' own group, on
        gloo (host memory; beside training's NCCL on a GPU) even for one process."""
        if self._group is None and dist.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=self.timeout)
        return self._group

    def save(self, staged: Staged, retention: Optional[Retention]) -> None:
        """Write ``staged`` (staged by the caller, with ``copy`` when ``background``): in the background,
        after the save in flight (if any) is complete; else now."""
        if not self.background:
            dcp.write(staged, None, retention)
            return
        self.wait()
        group = self._own_group()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curry-save")
        saver = _process_save if self.mode == "process" else None
        future = self._executor.submit(self._write, staged, group, retention, saver)
        self._inflight = InFlight(staged, future, time.perf_counter())

    @staticmethod
    def _write(staged: Staged, group: Any, retention: Optional[Retention], saver: Any) -> float:
        started = time.perf_counter()
        dcp.write(staged, group, retention, shards=saver)
        return time.perf_counter() - started

    def poll(self) -> None:
        """Non-blocking: if the save in flight has finished well, report it. A failure waits for ``wait``,
        which every rank reaches at the same step (the next save, the end): raised here, it would stop
        each rank at whichever step it noticed, and leave the others in a collective."""
        inflight = self._inflight
        if inflight is not None and inflight.future.done() and inflight.future.exception() is None:
            self._finish()

    def wait(self) -> Optional[float]:
        """Block until the save in flight (if any) is complete; raise if it failed. Returns the seconds
        waited, or None when nothing was in flight."""
        if self._inflight is None:
            return None
        began = time.perf_counter()
        self._inflight.future.exception()  # waits
        waited = time.perf_counter() - began
        self._finish()
        return waited

    def _finish(self) -> None:
        inflight, self._inflight = self._inflight, None
        error = inflight.future.exception()
        if error is not None:
            raise error
        self.written.append(inflight.future.result())
        log.info("checkpoint saved: %s (written in the background in %.2f s)", inflight.staged.path, self.written[-1])

    def close(self) -> None:
        """Wait for the save in flight, then stop the background thread (and DCP's writing process: it
        lives as long as the process that started it, else, and a pool's worker outlives its run)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self.mode == "process":
                _end_dcp_process()


def _end_dcp_process() -> None:
    """End DCP's checkpoint process of this process, if it started one (its finalizer asks it to stop and
    joins it); the next process-mode save starts a new one."""
    from torch.distributed.checkpoint import _async_process_executor as executor  # noqa: PLC0415

    process, executor._CHECKPOINT_PROCESS = executor._CHECKPOINT_PROCESS, None
    if process is not None:
        process.__del__()
