"""One capacity trial: ``python -m curry_train.validation.capacity_trial OUT_DIR [overrides...]``.

Runs the configuration of the overrides through the real training path for ``TRIAL_STEPS`` steps,
in as many local processes as it asks for, each rank held to the memory of one ``hardware`` device,
and writes each rank's peak memory to ``OUT_DIR/rank-NNNNN.json``. ``planning.trials`` starts it in
a subprocess and classifies its exit; docs/planning.md ("Measure mode") says what is measured how.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from curry_train.config import ConfigError, compose
from curry_train.config.checks import check
from curry_train.runner import Measurement, fit_layouts
from curry_train.validation.layout_memory import MemoryProbe
from curry_train.validation.whitebox import measurement_config

TRIAL_STEPS = 3  # the memory probe measures in step 3 (validation.memory.MEASURED_STEP), after DDP's bucket rebuild


def _address_space_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


class DeviceMemoryLimit(pl.Callback):
    """Gives this rank the memory of one ``hardware`` device, so that a trial runs out of memory
    where that device would (set once the data is loaded and the process group is up, before the
    model is materialized):

    * GPU: the caching allocator may take ``memory_bytes - reserved_bytes`` of this device
      (``torch.cuda.set_per_process_memory_fraction``; the CUDA context and NCCL's buffers, which
      ``reserved_bytes`` stands for, live outside it);
    * CPU: the process's address space may grow by ``memory_bytes`` (``RLIMIT_AS``; the runtime's
      own allocations, which ``reserved_bytes`` stands for, are inside it)."""

    def __init__(self, hardware: DictConfig) -> None:
        self.hardware = hardware
        self.device_total: Optional[int] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        hardware, device = self.hardware, trainer.strategy.root_device
        if device.type == "cuda":
            self.device_total = torch.cuda.get_device_properties(device).total_memory
            budget = hardware.memory_bytes - hardware.reserved_bytes
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / self.device_total), device)
            torch.cuda.reset_peak_memory_stats(device)
            return
        if sys.platform.startswith("linux"):
            import resource  # noqa: PLC0415  (POSIX only: imported where the platform is known to have it)

            torch.ones(1 << 17).add_(1)  # start the intra-op threads (their stacks) before the limit
            limit = _address_space_bytes() + int(hardware.memory_bytes)
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))


class TrialMeasurement(Measurement):
    """The runner's probe of a trial: the device's memory limit, and on a CPU the memory probe of step
    ``TRIAL_STEPS``; its result is this rank's peak memory."""

    def __init__(self, cfg: DictConfig, accelerator: str) -> None:
        self.limit = DeviceMemoryLimit(cfg.hardware)
        self.probe = MemoryProbe(TRIAL_STEPS) if accelerator == "cpu" else None
        self.callbacks = [self.limit] + ([self.probe] if self.probe else [])

    def result(self, trainer: pl.Trainer) -> dict[str, Any]:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            record = {
                "peak_bytes": torch.cuda.max_memory_allocated(device),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
                "method": "torch.cuda.max_memory_allocated",
                "device_total_bytes": self.limit.device_total,
            }
        else:
            tracked = self.probe.record.get("peak") or {}
            peak = tracked.get("Total", sum(tracked.values()))
            state = self.probe.record["state"]["total"]
            record = {
                "peak_bytes": max(peak, state),
                "tracked_peak": self.probe.record["peak"],
                "state": self.probe.record["state"],
                "method": "memory tracker: one micro-batch's forward+backward with the model state",
            }
        record["rank"] = trainer.global_rank
        return record


@dataclass(frozen=True)
class TrialProbe:
    """Picklable: a ``TrialMeasurement`` on each rank of a run on ``accelerator``."""

    accelerator: str

    def __call__(self, cfg: DictConfig) -> TrialMeasurement:
        return TrialMeasurement(cfg, self.accelerator)


def trial_main(argv: Sequence[str]) -> int:
    """Run the configuration of ``argv[1:]`` for ``TRIAL_STEPS`` steps and write each rank's peak
    memory to ``argv[0]/rank-NNNNN.json``. A failure is printed (non-zero exit, its traceback on stderr)."""
    out_dir, overrides = argv[0], list(argv[1:])
    cfg = measurement_config(compose(overrides), TRIAL_STEPS)
    try:
        plan = check(cfg)
    except ConfigError as error:
        print(f"curry-train: error: {error}", file=sys.stderr)
        return 2
    (outcome,) = fit_layouts([(cfg, plan)], TrialProbe(plan.accelerator))
    if not outcome.ok:
        print(outcome.error, file=sys.stderr)
        return 1
    for record in outcome.ranks:
        Path(out_dir, f"rank-{record['rank']:05d}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    # Run from the module by its name, so that the pool's workers unpickle its probe by that name, not __main__'s.
    from curry_train.validation.capacity_trial import trial_main as _trial_main

    sys.exit(_trial_main(sys.argv[1:]))
