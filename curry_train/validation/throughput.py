"""Training throughput of curry-train's loop against a minimal hand-written PyTorch loop, on one
device (``scripts/bench.py``, its default mode).

The overrides are Hydra overrides, exactly as for ``train.py``; the default is the default config
(the debug model on the bundled corpus). Both loops run in this one process, on
one device (``trainer.devices=1``), one after the other, ``R`` times (default 3):
``[hand loop, curry loop] x R``; alternating spreads the machine's noise over both.

What is measured, for each loop: training tokens per second (``global_batch_size * seq_len`` tokens
per optimizer step) over ``N`` steps (default 20) that follow ``W`` warmup steps (default 2, at
least 1). The clock is ``time.perf_counter()`` read at the end of every step; the figure is
``N * tokens_per_step / (t[W + N] - t[W])``, so start-up (Trainer, model, data loader) and the
first steps are not counted, while everything a step does in steady state is: fetching the batch,
forward and backward over the micro-batches, clipping, the optimizer and the schedule, and, for
curry-train, every Lightning hook, metric and logger call. (On CUDA the device is synchronized at
each reading.) The report gives, per loop, the median over the repeats, the ratio curry / hand of
the medians, and (less sensitive to the machine's load drifting between repeats) the median of
each repeat's own ratio.

* curry: the real thing. ``curry_train.run.build_trainer`` (no checkpoints; the CSV logger, which
  every real run writes, or ``--loggers none``) fits ``CausalLM(cfg)`` on ``LMDataModule``, with the
  progress bar and validation off; a Callback reads the clock in ``on_train_batch_end``.
* hand: ``curry_train.model.Llama`` built on the meta device and initialized by
  ``curry_train.primitives.materialize.materialize_and_init`` (the same weights), AdamW with the same param groups
  and hyperparameters, ``LambdaLR`` with ``curry_train.module.lr_lambda``, the same micro-batching
  and loss normalization (cross-entropy summed / ``global_batch_size * seq_len``, one backward per
  micro-batch), ``clip_grad_norm_``, ``optimizer.step()``, ``zero_grad(set_to_none=True)``; batches
  from the same ``TrainBatches`` (rank 0 of 1) through a ``DataLoader``.

Both loops record their per-step loss; they must agree (the same weights, data and arithmetic), which
the table reports as the largest relative difference: the comparison is apples to apples.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from curry_train.config import ConfigError, compose
from curry_train.config.checks import LaunchPlan, check
from curry_train.config.schema import Config
from curry_train.data.loader import TrainBatches
from curry_train.model.config import head_dim
from curry_train.model.llama import Llama
from curry_train.module import LMDataModule, fused_supported, lr_lambda
from curry_train.options import PRECISIONS
from curry_train.planning.step_time import flops_parameters, flops_per_token
from curry_train.primitives.materialize import materialize_and_init
from curry_train.runner import Measurement, fit
from curry_train.validation.peak_flops import DTYPES, matmul_flops

LOOPS = ("hand", "curry")


# ----------------------------------------------------------------------------------------------
# Results


class StepRate:
    """tokens/s and ms/step of a run with ``timed_steps``, their ``seconds`` and ``tokens_per_step``."""

    timed_steps: int
    seconds: float
    tokens_per_step: int

    @property
    def tokens_per_s(self) -> float:
        return self.timed_steps * self.tokens_per_step / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.timed_steps


@dataclass
class LoopRun(StepRate):
    """One run of one loop: the clock at the end of each step, and each step's loss."""

    loop: str
    repeat: int
    warmup: int
    tokens_per_step: int
    step_ends: list[float]
    losses: list[float]

    @property
    def timed_steps(self) -> int:
        return len(self.step_ends) - self.warmup

    @property
    def seconds(self) -> float:
        return self.step_ends[-1] - self.step_ends[self.warmup - 1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "loop": self.loop,
            "repeat": self.repeat,
            "timed_steps": self.timed_steps,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "ms_per_step": self.ms_per_step,
            "losses": self.losses,
        }


@dataclass
class BenchResult:
    config: dict[str, Any]
    steps: int
    warmup: int
    repeats: int
    tokens_per_step: int
    runs: list[LoopRun] = field(default_factory=list)
    flops_per_token: float = 0.0  # model FLOPs of training on one token (planning.step_time.flops_per_token)
    measured_peak: float = 0.0  # the device's measured matmul FLOP/s in the run's compute dtype (peak_flops)
    table_peak: float = 0.0  # hardware.peak_bf16_flops of the config's hardware group
    hardware: str = ""

    def mfu(self, loop: str = "curry", peak: Optional[float] = None) -> float:
        """Model FLOPs utilization of ``loop``'s median tokens/s against ``peak`` (default: the measured one)."""
        return self.tokens_per_s(loop) * self.flops_per_token / (peak or self.measured_peak)

    def of(self, loop: str) -> list[LoopRun]:
        return [run for run in self.runs if run.loop == loop]

    def tokens_per_s(self, loop: str) -> float:
        """Median over the repeats."""
        return statistics.median(run.tokens_per_s for run in self.of(loop))

    def ms_per_step(self, loop: str) -> float:
        return statistics.median(run.ms_per_step for run in self.of(loop))

    @property
    def ratio(self) -> float:
        """curry / hand, of the median tokens/s."""
        return self.tokens_per_s("curry") / self.tokens_per_s("hand")

    @property
    def paired_ratio(self) -> float:
        """Median over the repeats of curry / hand within a repeat (the two runs were adjacent in time)."""
        pairs = zip(self.of("curry"), self.of("hand"), strict=True)
        return statistics.median(curry.tokens_per_s / hand.tokens_per_s for curry, hand in pairs)

    def losses(self, loop: str, repeat: int = 0) -> list[float]:
        return next(run.losses for run in self.runs if run.loop == loop and run.repeat == repeat)

    @property
    def max_loss_rel_diff(self) -> float:
        """Largest relative difference of any run's per-step loss from the first hand run's."""
        reference = self.losses("hand")
        return max(
            abs(a - b) / max(abs(b), 1e-30) for run in self.runs for a, b in zip(run.losses, reference, strict=True)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "steps": self.steps,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "tokens_per_step": self.tokens_per_step,
            **{f"{loop}_tokens_per_s": self.tokens_per_s(loop) for loop in LOOPS},
            **{f"{loop}_ms_per_step": self.ms_per_step(loop) for loop in LOOPS},
            "ratio": self.ratio,
            "paired_ratio": self.paired_ratio,
            "max_loss_rel_diff": self.max_loss_rel_diff,
            "flops_per_token": self.flops_per_token,
            "measured_peak_flops": self.measured_peak,
            "table_peak_flops": self.table_peak,
            "mfu_measured_peak": {loop: self.mfu(loop) for loop in LOOPS},
            "mfu_table_peak": {loop: self.mfu(loop, self.table_peak) for loop in LOOPS},
            "runs": [run.to_dict() for run in self.runs],
        }

    def table(self) -> str:
        c = self.config
        lines = [
            f"model={c['model']} ({c['parameters'] / 1e6:.2f}M params)  device={c['device']}  "
            f"precision={c['precision']}"
            f"  threads={c['threads']}  loggers={c['loggers']}",
            f"global_batch_size={c['global_batch_size']} micro_batch_size={c['micro_batch_size']} "
            f"seq_len={c['seq_len']}"
            f"  -> {self.tokens_per_step} tokens/step;  {self.steps} timed steps after {self.warmup} warmup, "
            f"{self.repeats} repeat(s)",
            "",
            f"{'loop':<8} {'tokens/s (median)':>18} {'ms/step (median)':>17}   per repeat (tokens/s)",
        ]
        for loop in LOOPS:
            each = " ".join(f"{run.tokens_per_s:,.0f}" for run in self.of(loop))
            lines.append(f"{loop:<8} {self.tokens_per_s(loop):>18,.0f} {self.ms_per_step(loop):>17.1f}   {each}")
        overhead = self.ms_per_step("curry") - self.ms_per_step("hand")
        lines += [
            "",
            f"ratio curry/hand: {self.ratio:.3f}  (curry overhead {overhead:+.1f} ms/step; "
            f"median of per-repeat ratios {self.paired_ratio:.3f})",
            f"per-step losses: max rel. diff {self.max_loss_rel_diff:.1e} over all runs "
            f"(hand, repeat 0: {', '.join(f'{x:.4f}' for x in self.losses('hand')[:4])}"
            f"{', ...' if len(self.losses('hand')) > 4 else ''})",
            f"MFU (curry): {100 * self.mfu():.1f}% of the measured {self.config['compute_dtype']} matmul peak"
            f" ({self.measured_peak / 1e9:,.0f} GFLOP/s); {100 * self.mfu('curry', self.table_peak):.2f}% of"
            f" hardware={self.hardware}'s peak_bf16_flops ({self.table_peak / 1e12:,.1f} TFLOP/s);"
            f" {self.flops_per_token / 1e6:,.1f} MFLOP per token (6N + 12*L*h*s)",
        ]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Set-up


def model_flops_per_token(cfg: DictConfig) -> int:
    """``flops_per_token`` of the config's model at its sequence length."""
    m = cfg.model
    return flops_per_token(flops_parameters(m), m.n_layers, m.n_heads * head_dim(m), cfg.data.seq_len)


def compute_dtype_name(cfg: DictConfig) -> str:
    """The run's matmul dtype, as ``peak_flops.DTYPES`` names it: bf16 under bf16 precision, else fp32."""
    return "bf16" if "bf16" in str(cfg.trainer.precision) else "fp32"


def prepare(overrides: Sequence[str], steps: int, warmup: int) -> tuple[DictConfig, LaunchPlan]:
    """The composed config, run for ``warmup + steps`` steps with validation and progress bar off."""
    if steps < 1 or warmup < 1:
        raise ValueError(f"--steps={steps} and --warmup={warmup} must be at least 1")
    cfg = compose(overrides)
    if cfg.trainer.devices != 1 or cfg.trainer.num_nodes != 1:
        raise ConfigError(
            f"trainer.devices={cfg.trainer.devices}, trainer.num_nodes={cfg.trainer.num_nodes}: "
            "the benchmark runs both loops in one process on one device; leave them at 1"
        )
    OmegaConf.update(cfg, "trainer.max_steps", warmup + steps)
    OmegaConf.update(cfg, "trainer.limit_val_batches", 0)
    OmegaConf.update(cfg, "trainer.enable_progress_bar", False)
    plan = check(cfg)
    if str(cfg.trainer.precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision}: the benchmark supports {', '.join(PRECISIONS)}")
    return cfg, plan


def device_of(plan: LaunchPlan) -> torch.device:
    return torch.device("cuda", 0) if plan.accelerator == "cuda" else torch.device("cpu")


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------
# The hand-written loop


def hand_optimizer(model: torch.nn.Module, cfg: DictConfig) -> tuple[torch.optim.Optimizer, Any]:
    """The AdamW (matrices decay; fused where torch has it) and LambdaLR schedule of curry-train's step, for
    the hand-written loops the benches set beside it."""
    o = cfg.optim
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        fused=fused_supported(decay + no_decay),
    )
    total, min_ratio = cfg.trainer.max_steps, o.min_lr / o.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, o.warmup_steps, total, o.schedule, min_ratio)
    )
    return optimizer, scheduler


def run_hand_loop(
    cfg: DictConfig,
    datamodule: LMDataModule,
    device: torch.device,
    warmup: int = 1,
    repeat: int = 0,
    sections: Optional[Callable[[str], AbstractContextManager]] = None,
) -> LoopRun:
    """``cfg.trainer.max_steps`` steps of a plain PyTorch loop doing what curry-train's step does
    (``sections``: times its forward+backward and optimizer parts after the warm-up; ``loop_bench``)."""
    section = sections if sections is not None else (lambda name: nullcontext())
    d, o = cfg.data, cfg.optim
    total_steps = cfg.trainer.max_steps
    tokens_per_step = d.global_batch_size * d.seq_len
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    with torch.device("meta"):
        model = Llama(cfg.model)
    materialize_and_init(model, device, cfg.seed)
    model.train()

    optimizer, scheduler = hand_optimizer(model, cfg)
    max_norm = o.grad_clip if o.grad_clip > 0 else float("inf")

    loader = DataLoader(
        TrainBatches(datamodule.mixture, datamodule.mixture.start_state(), 0, 1),
        batch_size=None,
        num_workers=d.num_workers,
        pin_memory=device.type == "cuda",
    )
    bf16 = str(cfg.trainer.precision) == "bf16-mixed"

    step_ends: list[float] = []
    losses: list[torch.Tensor] = []
    for step, (batch, _) in enumerate(loader):
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            with section("forward+backward"):
                total = torch.zeros((), device=device)
                for micro in batch.split(d.micro_batch_size):
                    inputs, labels = micro[:, :-1], micro[:, 1:]
                    logits = model(inputs)
                    loss = (
                        F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
                        / tokens_per_step
                    )
                    loss.backward()
                    total += loss.detach()
            with section("optimizer"):
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.grad is not None], max_norm, foreach=True
                )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
        losses.append(total)
        step_ends.append(_clock(device))
        if sections is not None:
            sections.on = len(step_ends) >= warmup
        if step + 1 == total_steps:
            break
    return LoopRun("hand", repeat, warmup, tokens_per_step, step_ends, [float(x) for x in losses])


# ----------------------------------------------------------------------------------------------
# curry-train's loop


class StepClock(Callback, Measurement):
    """Reads the clock and the step's loss at the end of every training step (with ``callbacks``; the
    CSV logger every real run has, ``curry_train.run.make_loggers``, unless ``loggers`` is none)."""

    def __init__(self, device: torch.device, loggers: str = "csv", callbacks: Sequence[Callback] = ()) -> None:
        self.device, self.logger_kind = device, loggers
        self.callbacks = [self, *callbacks]
        self.step_ends: list[float] = []
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.losses.append(pl_module.step.last_loss)
        self.step_ends.append(_clock(self.device))

    def loggers(self, run_dir: Path) -> list[Logger]:
        if self.logger_kind != "csv":
            return []
        return [CSVLogger(save_dir=str(run_dir), name="", version="", flush_logs_every_n_steps=1)]

    def result(self, trainer: pl.Trainer) -> tuple[list[float], list[float]]:
        return self.step_ends, [float(x) for x in self.losses]


def run_curry_loop(
    cfg: DictConfig,
    datamodule: LMDataModule,
    plan: LaunchPlan,
    loggers: str = "csv",
    warmup: int = 1,
    repeat: int = 0,
    callbacks: Sequence[Callback] = (),
) -> LoopRun:
    """``cfg.trainer.max_steps`` steps of curry-train's real Trainer, strategy and module (and ``callbacks``),
    in this process (``runner.fit``)."""

    clock = StepClock(device_of(plan), loggers, callbacks)
    with tempfile.TemporaryDirectory(prefix="curry-bench-") as run_dir:
        step_ends, losses = fit(Config.of(cfg), Path(run_dir), plan, clock, datamodule)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    return LoopRun("curry", repeat, warmup, tokens_per_step, step_ends, losses)


# ----------------------------------------------------------------------------------------------
# The benchmark


def bench(
    overrides: Sequence[str] = (),
    steps: int = 20,
    warmup: int = 2,
    repeats: int = 3,
    loggers: str = "csv",
    progress: bool = False,
) -> BenchResult:
    """``repeats`` x [hand loop, curry loop], each ``warmup + steps`` steps; see the module docstring."""
    if repeats < 1:
        raise ValueError(f"--repeats={repeats} must be at least 1")
    if loggers not in ("csv", "none"):
        raise ValueError(f"loggers={loggers!r}: expected csv or none")
    cfg, plan = prepare(overrides, steps, warmup)
    device = device_of(plan)
    datamodule = LMDataModule(cfg.data, cfg.seed)
    datamodule.setup("fit")  # once: every run (and every Trainer) reads this same dataset
    with torch.device("meta"):
        parameters = Llama(cfg.model).num_parameters()
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    compute_dtype = compute_dtype_name(cfg)
    result = BenchResult(
        config={
            "overrides": list(overrides),
            "model": cfg.model.name,
            "parameters": parameters,
            "device": str(device),
            "precision": str(cfg.trainer.precision),
            "threads": torch.get_num_threads(),
            "loggers": loggers,
            "global_batch_size": cfg.data.global_batch_size,
            "micro_batch_size": cfg.data.micro_batch_size,
            "seq_len": cfg.data.seq_len,
            "compute_dtype": compute_dtype,
        },
        steps=steps,
        warmup=warmup,
        repeats=repeats,
        tokens_per_step=tokens_per_step,
        flops_per_token=model_flops_per_token(cfg),
        measured_peak=matmul_flops(device, DTYPES[compute_dtype]),
        table_peak=cfg.hardware.peak_bf16_flops,
        hardware=cfg.hardware.name,
    )
    for repeat in range(repeats):
        for loop in LOOPS:
            if loop == "hand":
                run = run_hand_loop(cfg, datamodule, device, warmup, repeat)
            else:
                run = run_curry_loop(cfg, datamodule, plan, loggers, warmup, repeat)
            if len(run.step_ends) != warmup + steps:
                raise RuntimeError(f"{loop} loop ran {len(run.step_ends)} steps, expected {warmup + steps}")
            result.runs.append(run)
            if progress:
                print(
                    f"repeat {repeat + 1}/{repeats} {loop:<5}: {run.tokens_per_s:>10,.0f} tokens/s"
                    f" {run.ms_per_step:>8.1f} ms/step",
                    file=sys.stderr,
                    flush=True,
                )
    return result
