"""``curry-bench --checkpoint``: what a save costs training, with saves that stall it and in the background.

Each model (the debug model and a ~100M Llama) under each layout (1 process, fsdp on 2 ranks) and each
``checkpoint.async_mode`` (``off``, ``thread``) trains ``steps`` steps through the real training path,
saving every ``every`` steps (``PeriodicCheckpoint``, as a run saves). Each rank notes the end of every
step (after its save) and the strategy's timing of each save; the table prints, the slowest rank's:

* **blocks**: how long a save held training (the wait for the save in flight before it, staging, and
  for ``off`` the whole write), the median over the saves;
* **written**: how long the write itself took (``off``: the same as blocks; in the background: from
  submission until the manifest was renamed into place);
* **bytes**: the checkpoint directory's size on disk;
* **step** and **overlapped step**: the median step without a save near it, and the step right after a
  background save, which runs while it is written (for ``off``, the step after a save, which waits for
  nothing).

The ``ratio`` row per model and layout: a background save's blocks over a stalled save's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from curry_train.callbacks import PeriodicCheckpoint
from curry_train.checkpoint import files
from curry_train.config import compose
from curry_train.config.checks import check
from curry_train.pool import Pools
from curry_train.runner import Measurement, fit_layouts
from curry_train.validation.defaults import COMPILE_MODELS
from curry_train.validation.whitebox import measurement_config

CHECKPOINT_LAYOUTS = {"1 process": (), "fsdp 2": ("parallel=fsdp", "trainer.devices=2")}
MODES = ("off", "thread")


class SaveTimer(Callback):
    """After the run's save of a step (it comes after ``PeriodicCheckpoint`` in the callbacks): the step's
    end, and the strategy's timing of a save made in it."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.saves: list[dict[str, Any]] = []
        self._seen: Any = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.ends.append(time.perf_counter())
        timing = getattr(trainer.strategy, "last_save", None)
        if timing is not None and timing is not self._seen:
            self._seen = timing
            self.saves.append({"step": trainer.global_step, "blocked": timing.blocked, "waited": timing.waited})


class SaveMeasurement(Measurement):
    def __init__(self, directory: Path, every: int) -> None:
        self.directory = directory
        self.timer = SaveTimer()
        self.callbacks = [PeriodicCheckpoint(directory, every, keep_last=2, save_on_end=False), self.timer]

    def result(self, trainer: pl.Trainer) -> dict[str, Any]:
        saver = trainer.strategy.saver
        saver.wait()
        newest = files.checkpoints_in(self.directory)
        size = sum(p.stat().st_size for p in newest[-1].iterdir()) if newest else 0
        return {
            "rank": trainer.global_rank,
            "ends": self.timer.ends,
            "saves": self.timer.saves,
            "written": list(saver.written) if saver.background else [s["blocked"] for s in self.timer.saves],
            "bytes": size,
        }


@dataclass(frozen=True)
class SaveProbeFactory:
    """Picklable: a ``SaveMeasurement`` on each rank, saving into ``directory`` every ``every`` steps."""

    directory: str
    every: int

    def __call__(self, cfg: DictConfig) -> SaveMeasurement:
        return SaveMeasurement(Path(self.directory), self.every)


@dataclass
class CheckpointRow:
    model: str
    layout: str
    mode: str
    blocked_ms: float
    written_ms: float
    bytes: int
    step_ms: float
    overlapped_ms: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CheckpointResult:
    every: int
    steps: int
    rows: list[CheckpointRow] = field(default_factory=list)

    def ratio(self, model: str, layout: str) -> Optional[float]:
        found = {row.mode: row for row in self.rows if row.model == model and row.layout == layout}
        if "off" not in found or "thread" not in found or not found["off"].blocked_ms:
            return None
        return found["thread"].blocked_ms / found["off"].blocked_ms

    def to_dict(self) -> dict[str, Any]:
        ratios = {f"{r.model}/{r.layout}": self.ratio(r.model, r.layout) for r in self.rows}
        return {"every": self.every, "steps": self.steps, "rows": [r.to_dict() for r in self.rows], "ratios": ratios}

    def table(self) -> str:
        header = (
            f"{'model':<11} {'layout':<10} {'mode':<7} {'blocks ms':>10} {'written ms':>11} {'MB':>8}"
            f" {'step ms':>8} {'overlapped step ms':>19}"
        )
        lines = [f"a save every {self.every} steps, {self.steps} steps; the slowest rank's medians", header]
        for row in self.rows:
            lines.append(
                f"{row.model:<11} {row.layout:<10} {row.mode:<7} {row.blocked_ms:>10.1f} {row.written_ms:>11.1f}"
                f" {row.bytes / 1e6:>8.1f} {row.step_ms:>8.1f} {row.overlapped_ms:>19.1f}"
            )
        seen = []
        for row in self.rows:
            if (row.model, row.layout) not in seen:
                seen.append((row.model, row.layout))
        for model, layout in seen:
            ratio = self.ratio(model, layout)
            if ratio is not None:
                lines.append(
                    f"{model}, {layout}: a background save holds training {ratio:.2f}x as long as a stalled one"
                )
        return "\n".join(lines)


def _row(model: str, layout: str, mode: str, ranks: list[dict[str, Any]]) -> CheckpointRow:
    def slowest(values: Sequence[float]) -> float:
        return max(values) if values else float("nan")

    blocked = slowest([statistics.median(s["blocked"] for s in r["saves"]) for r in ranks if r["saves"]])
    written = slowest([statistics.median(r["written"]) for r in ranks if r["written"]])
    plain, overlapped = [], []
    for r in ranks:
        ends, saved = r["ends"], {s["step"] for s in r["saves"]}
        steps = {i + 1: ends[i] - ends[i - 1] for i in range(1, len(ends))}  # step i+1's duration, 1-based
        plain.append(statistics.median(t for s, t in steps.items() if s not in saved and s - 1 not in saved and s > 2))
        after = [t for s, t in steps.items() if s - 1 in saved]
        overlapped.append(statistics.median(after) if after else float("nan"))
    return CheckpointRow(
        model,
        layout,
        mode,
        1e3 * blocked,
        1e3 * written,
        max(r["bytes"] for r in ranks),
        1e3 * slowest(plain),
        1e3 * slowest(overlapped),
    )


def checkpoint_bench(
    overrides: Sequence[str] = (),
    models: Sequence[str] = ("debug", "llama-100m"),
    steps: int = 12,
    every: int = 3,
    layouts: Optional[dict[str, Sequence[str]]] = None,
    modes: Sequence[str] = MODES,
) -> CheckpointResult:
    if steps < 2 * every + 2:
        raise ValueError(f"--steps={steps}: at least {2 * every + 2} for saves every {every} steps and plain steps")
    result = CheckpointResult(every, steps)
    layouts = dict(CHECKPOINT_LAYOUTS if layouts is None else layouts)
    with tempfile.TemporaryDirectory(prefix="curry-checkpoint-bench-") as root:
        runs = []
        for model in models:
            for name, layout in layouts.items():
                for mode in modes:
                    cfg = compose([*overrides, *COMPILE_MODELS[model], *layout, f"checkpoint.async_mode={mode}"])
                    cfg = measurement_config(cfg, steps)
                    directory = Path(root) / f"{model}-{len(runs)}"
                    runs.append((model, name, mode, cfg, directory))
        checked = [(cfg, check(cfg)) for *_, cfg, _ in runs]  # every run fails fast, before any process starts
        with Pools(inline_single=True) as pools:
            for (model, name, mode, _, directory), checked_one in zip(runs, checked, strict=True):
                (outcome,) = fit_layouts([checked_one], SaveProbeFactory(str(directory), every), pools)
                if not outcome.ok:
                    raise RuntimeError(f"{model} {name} {mode}: {outcome.error}")
                result.rows.append(_row(model, name, mode, outcome.ranks))
    return result
