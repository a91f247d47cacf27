"""Host reads of tensor values during training steps: each one, on a GPU, waits for the device to finish
everything queued before it (a synchronization), so the steady state must have at most one per logged
step (``curry_train.module``: every metric comes to the host in one read).

``HostReads`` counts them on any device, CPU included, where nothing waits but the reads are the same
calls: every scalar read (``item``, ``bool``, ``float``, ``int`` reach the dispatcher as ``aten._local_scalar_dense``
or ``aten.is_nonzero``, ``torch.equal`` as ``aten.equal``, seen by a dispatch mode) and the
copies that bring a tensor to the host (``tolist``, ``numpy``, ``cpu``, patched on ``torch.Tensor``
for the time of the count, since on a CPU they dispatch nothing). ``SyncCount`` is the measurement
(``runner.fit``) that counts them in each training step after the first few, with where each came from.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger
from torch.utils._python_dispatch import TorchDispatchMode

from curry_train.runner import Measurement

SCALAR_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,  # answers a Python bool
}
COPIES = ("tolist", "numpy", "cpu")  # methods that bring a tensor to the host


def _caller() -> str:
    """The innermost frame outside torch and this module: who asked for the read."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if "/torch/" not in name and name != __file__:
            return f"{Path(name).name}:{frame.lineno} {frame.name}"
    return "?"


class HostReads(TorchDispatchMode):
    """While entered: ``reads``, one entry (the caller) per host read of a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self._saved: dict[str, Callable] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        if func in SCALAR_READS:
            self.reads.append(f"{func.__name__} from {_caller()}")
        return func(*args, **(kwargs or {}))

    def _counting(self, name: str) -> Callable:
        original = self._saved[name]

        def method(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not torch.compiler.is_compiling():
                self.reads.append(f"{name} from {_caller()}")
            return original(tensor, *args, **kwargs)

        return method

    def __enter__(self) -> HostReads:
        for name in COPIES:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)
            self._saved.clear()


class SyncCount(Callback, Measurement):
    """The measurement (``runner.fit``): the host reads of each training step from step ``after`` on
    (the loop's hooks, the step, its logging and checkpoint bookkeeping: from one batch's start to the
    next's; the last step, whose end is the run's, is left out), and whether the step logged metrics.
    ``result``: ``[(step, logged, reads)]``."""

    def __init__(self, after: int = 2, loggers: str = "csv") -> None:
        self.after, self.logger_kind = after, loggers
        self.callbacks = [self]
        self.steps: list[tuple[int, bool, list[str]]] = []
        self._mode: Optional[HostReads] = None

    def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if self._mode is not None:  # the step before ended: its end hooks and the next batch's fetch counted
            reads = self._stop()
            step = trainer.global_step - 1
            logged = (step + 1) % trainer.lightning_module.cfg.trainer.log_every_n_steps == 0
            self.steps.append((step, logged, reads))
        if trainer.global_step >= self.after:
            self._mode = HostReads().__enter__()

    def on_train_end(self, trainer: pl.Trainer, *_: Any) -> None:
        self._stop()

    def _stop(self) -> list[str]:
        if self._mode is None:
            return []
        mode, self._mode = self._mode, None
        mode.__exit__(None, None, None)
        return mode.reads

    def loggers(self, run_dir: Path) -> list[Logger]:
        if self.logger_kind != "csv":
            return []
        return [CSVLogger(save_dir=str(run_dir), name="", version="")]

    def result(self, trainer: pl.Trainer) -> list[tuple[int, bool, list[str]]]:
        return self.steps
