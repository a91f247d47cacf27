#!/usr/bin/env python
"""Training throughput of curry-train's loop against a minimal hand-written PyTorch loop; with
``--memory``, the memory each rank of a layout holds.

    python scripts/bench.py [--steps N] [--warmup W] [--repeats R] [--loggers csv|none] [--json PATH] [overrides...]
    python scripts/bench.py --memory [--json PATH] [overrides...]
    python scripts/bench.py --layouts [--layout 'NAME: OVERRIDES']... [--steps N] [--json PATH] [overrides...]
    python scripts/bench.py --compare [--layout 'NAME: OVERRIDES']... [--steps N] [--json PATH] [overrides...]
    python scripts/bench.py --context [--seq-len S] [--cp 1,2,4] [--pattern ring] [--json PATH]
    python scripts/bench.py --pipeline [--pp P] [--microbatches 4,8] [--kinds K,...] [--steps N] [--json PATH] [overrides...]

Arguments without a leading ``--`` are Hydra overrides, exactly as for ``train.py``; the default is
the default config (the debug model on the bundled corpus). Both loops run in this one process, on
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
  ``curry_train.strategy.materialize_and_init`` (the same weights), AdamW with the same param groups
  and hyperparameters, ``LambdaLR`` with ``curry_train.module.lr_lambda``, the same micro-batching
  and loss normalization (cross-entropy summed / ``global_batch_size * seq_len``, one backward per
  micro-batch), ``clip_grad_norm_``, ``optimizer.step()``, ``zero_grad(set_to_none=True)``; batches
  from the same ``PackedSequences`` and ``GlobalBatchSampler`` (rank 0 of 1) through a
  ``DataLoader(collate_fn=torch.stack)``.

Both loops record their per-step loss; they must agree (the same weights, data and arithmetic), which
the table reports as the largest relative difference: the comparison is apples to apples.

``--memory`` runs the layout of the overrides (any ``trainer.devices``) through the real training path
and prints, per rank, the bytes held by parameters, gradients and optimizer state at the optimizer
step, the ZeRO formula of the layout's mode (Rajbhandari et al., 2020) and measured / formula, the
parameters held at the end of a forward, and the peak activation memory of one micro-batch's
forward+backward; then, on one process in fp32, the peak activation memory of the same model and
micro-batch for each ``parallel.recompute`` setting, and its saving against none. See
``curry_train/validation/memory.py`` for what is measured when, and how.

``--layouts`` runs several layouts of the same run (the overrides, common to all; by default ``dp``
and ``tp`` on 2 ranks, ``tp`` with sequence parallelism on 2, ``fsdp+tp`` on 4: FSDP 2 x TP 2; or
each ``--layout``) through the same measured path as ``--memory``, then ``N`` more steps (default
10), and prints one table: tokens/s over those ``N`` steps (``global_batch_size * seq_len`` tokens
per step, the slowest rank's clock, read at the end of each step from the end of the measured step
on), the bytes of parameters, gradients and optimizer state per rank (DTensors counted by their
local shards) against ZeRO's formula on the parameters one tensor-parallel rank holds, the peak
activation memory of one micro-batch per rank, and, for a sequence-parallel layout, its activations
over those of the same layout without it. The ranks are local processes sharing this machine's
cores: tokens/s compares layouts on this machine, not what they would do on one device per rank.

``--compare`` is ``--layouts`` (the same measured path, by default ``dp`` and ``fsdp`` (ZeRO-3) on 2
ranks and ``--layouts``' other three; or each ``--layout``; ``N`` timed steps, default 2) plus one more
step per layout, untimed, whose collectives each rank counts, and prints one table, per layout:

* tokens/s and ms/step over the ``N`` timed steps (the slowest rank's clock, as ``--layouts``);
* MFU: model FLOPs per step, ``tokens_per_step * (6N + 12*L*h*s)`` (``flops_per_token``: N the
  parameters less the input embedding, L layers, h = model.dim, s = seq_len), over ``step time x
  ranks x hardware.peak_bf16_flops`` (the ``hardware`` config group: pass the one the run is on).
  Only on a GPU (accelerator cuda): on CPU it prints ``-`` (JSON null);
* memory per rank, the most any rank holds: the peak of PyTorch's memory tracker's total (every
  category it books, summed) over the measured forward+backward of one micro-batch; the model
  state (parameters, gradients, optimizer state at the optimizer step); the activations' peak;
* communication per optimizer step, bytes per rank by collective (all-reduce, all-gather,
  reduce-scatter, all-to-all, send+recv, broadcast), counted over one whole training step
  (``on_train_batch_start`` to ``on_train_batch_end``: forward and backward of every micro-batch,
  gradient clipping, the optimizer, the loss metrics' sync) by a dispatch mode
  (``curry_train/validation/comm.py``): all-gather by its output, all-reduce, reduce-scatter and
  all-to-all by their input, operand bytes rather than wire bytes. DDP's gradient all-reduce runs
  in curry-train's Python communication hook, so the mode sees it; the table also prints the bytes
  of DDP's buckets, which it equals (4P: one fp32 per parameter). Measured here (tests/test_bench.py):
  DDP all-reduces 4P; FSDP full all-gathers ``4M(2P - P_root)`` (every unit for each micro-batch's
  forward, all but the root unit again for its backward) and reduce-scatters 4P once a step;
  tensor parallelism all-reduces ``4L + 2`` activations (``b*s*h``) per micro-batch: two per block
  forward and two backward, the vocabulary-split embedding's output and the head's input gradient
  (plus loss parallelism's and the gradient norm's few bytes); sequence parallelism all-gathers and
  reduce-scatters as many full activations instead of those all-reduces;
* the pipeline bubble's formula where pp > 1 (``validation/bubble.py``; ``-`` elsewhere). A
  pipeline stage cannot run a micro-batch alone, so a pipelined layout's activations and peak are
  ``-``; ``--pipeline`` measures its bubble.

``--pipeline`` runs every schedule kind (``gpipe``, ``1F1B``, ``interleaved``, ``interleaved_zb``,
``zbv``, ``dualpipev``) on ``P`` processes (default 2, one thread each) at each micro-batch count
``M`` (default 4 and 8), on the model of the overrides with ``model.n_layers=8`` by default (equal
stages for 1 and 2 stages per rank), and prints per kind the bubble formula next to the measured
bubble (each rank's idle share of a step: 1 - time computing / step time), ms/step and tokens/s,
over ``N`` timed steps (default 5) after 2 warm-up steps. See ``curry_train/validation/bubble.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from curry_train.config import ConfigError, compose  # noqa: E402
from curry_train.config.checks import LaunchPlan, check  # noqa: E402
from curry_train.advise import flops_parameters, flops_per_token  # noqa: E402
from curry_train.data import GlobalBatchSampler, LMDataModule  # noqa: E402
from curry_train.model import Llama  # noqa: E402
from curry_train.module import CausalLM, lr_lambda  # noqa: E402
from curry_train.primitives.pipeline_schedule import KINDS  # noqa: E402
from curry_train.strategy import materialize_and_init  # noqa: E402
from curry_train.validation.bubble import BubbleRow, bubble_table, check_bubble_runs, measure_bubbles  # noqa: E402
from curry_train.validation.comm import COLLECTIVES  # noqa: E402
from curry_train.validation.memory import MEASURED_STEP, LayoutMemory, measure_layouts  # noqa: E402
from curry_train.validation.whitebox import reference_overrides  # noqa: E402

LOOPS = ("hand", "curry")
PRECISIONS = ("32-true", "32", "bf16-mixed")  # what the hand loop reproduces


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class LoopRun:
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

    @property
    def tokens_per_s(self) -> float:
        return self.timed_steps * self.tokens_per_step / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.timed_steps

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
            "runs": [run.to_dict() for run in self.runs],
        }

    def table(self) -> str:
        c = self.config
        lines = [
            f"model={c['model']} ({c['parameters'] / 1e6:.2f}M params)  device={c['device']}  precision={c['precision']}"
            f"  threads={c['threads']}  loggers={c['loggers']}",
            f"global_batch_size={c['global_batch_size']} micro_batch_size={c['micro_batch_size']} seq_len={c['seq_len']}"
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
        ]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Set-up


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


def run_hand_loop(
    cfg: DictConfig, datamodule: LMDataModule, device: torch.device, warmup: int = 1, repeat: int = 0
) -> LoopRun:
    """``cfg.trainer.max_steps`` steps of a plain PyTorch loop doing what curry-train's step does."""
    d, o = cfg.data, cfg.optim
    total_steps = cfg.trainer.max_steps
    tokens_per_step = d.global_batch_size * d.seq_len
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    with torch.device("meta"):
        model = Llama(cfg.model)
    materialize_and_init(model, device, cfg.seed)
    model.train()

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
    )
    min_ratio = o.min_lr / o.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, o.warmup_steps, total_steps, o.schedule, min_ratio)
    )
    max_norm = o.grad_clip if o.grad_clip > 0 else float("inf")

    sampler = GlobalBatchSampler(len(datamodule.train_set), d.global_batch_size, 0, 1, cfg.seed)
    loader = DataLoader(
        datamodule.train_set,
        batch_sampler=sampler,
        collate_fn=torch.stack,
        num_workers=d.num_workers,
        pin_memory=device.type == "cuda",
    )
    bf16 = str(cfg.trainer.precision) == "bf16-mixed"

    step_ends: list[float] = []
    losses: list[torch.Tensor] = []
    for step, batch in enumerate(loader):
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            total = torch.zeros((), device=device)
            for micro in batch.split(d.micro_batch_size):
                inputs, labels = micro[:, :-1], micro[:, 1:]
                logits = model(inputs)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / tokens_per_step
                loss.backward()
                total += loss.detach()
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.grad is not None], max_norm, foreach=True
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        losses.append(total)
        step_ends.append(_clock(device))
        if step + 1 == total_steps:
            break
    return LoopRun("hand", repeat, warmup, tokens_per_step, step_ends, [float(x) for x in losses])


# ----------------------------------------------------------------------------------------------
# curry-train's loop


class StepClock(Callback):
    """Reads the clock and the step's loss at the end of every training step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step_ends: list[float] = []
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.losses.append(pl_module.last_step_loss)
        self.step_ends.append(_clock(self.device))


def run_curry_loop(
    cfg: DictConfig, datamodule: LMDataModule, plan: LaunchPlan, loggers: str = "csv", warmup: int = 1, repeat: int = 0
) -> LoopRun:
    """``cfg.trainer.max_steps`` steps of curry-train's real Trainer, strategy and module."""
    from lightning.pytorch.loggers import CSVLogger

    from curry_train.run import build_trainer

    clock = StepClock(device_of(plan))
    with tempfile.TemporaryDirectory(prefix="curry-bench-") as run_dir:
        # The logger every real run has (curry_train.run.make_loggers), without the tracker.
        logger_list = (
            [CSVLogger(save_dir=run_dir, name="", version="", flush_logs_every_n_steps=1)] if loggers == "csv" else []
        )
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        trainer = build_trainer(
            cfg, Path(run_dir), plan.accelerator, callbacks=[clock], checkpoints=False, loggers=logger_list
        )
        trainer.fit(CausalLM(cfg), datamodule=datamodule)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    return LoopRun("curry", repeat, warmup, tokens_per_step, clock.step_ends, [float(x) for x in clock.losses])


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
        },
        steps=steps,
        warmup=warmup,
        repeats=repeats,
        tokens_per_step=tokens_per_step,
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


# ----------------------------------------------------------------------------------------------
# --memory

# (parallel.recompute, parallel.recompute_every_n_blocks), compared on one process.
RECOMPUTE_SETTINGS = (("none", 0), ("selective", 0), ("selective", 2), ("full", 0))
# Where FSDP2 departs from the paper's accounting (measured; see tests/test_memory.py).
MEMORY_NOTES = {
    "shard_grad_op": (
        "shard_grad_op: FSDP2 reshards after backward, so at the optimizer step a rank holds ZeRO-3's 16P/d;",
        "ZeRO-2's 4P + 12P/d (fp32) is what it holds at the end of forward, every unit gathered (params@fwd).",
    ),
    "no_shard": ("no_shard: FSDP2 gathers a second copy of the parameters from forward to backward (params@fwd).",),
    "mixed": (
        "mixed precision: FSDP2 keeps fp32 shards of parameters and gradients (4 + 4 + 8 bytes per parameter,",
        "not ZeRO's 2 + 2 + 12: the same 16 in total); half-precision copies exist only while gathered.",
    ),
}


def recompute_name(mode: str, every_n_blocks: int) -> str:
    return f"{mode}, every_n_blocks={every_n_blocks}" if every_n_blocks else mode


@dataclass
class MemoryResult:
    layout: LayoutMemory
    recompute: list[LayoutMemory]  # one process, one per RECOMPUTE_SETTINGS

    def recompute_rows(self) -> list[dict[str, Any]]:
        none = self.recompute[0].ranks[0]["activations"]
        return [
            {
                "recompute": run.recompute,
                "every_n_blocks": run.recompute_every_n_blocks,
                "activations": run.ranks[0]["activations"],
                "saving": 1.0 - run.ranks[0]["activations"] / none,
            }
            for run in self.recompute
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout.to_dict(), "recompute": self.recompute_rows()}

    def table(self) -> str:
        m = self.layout
        shards = m.dp // m.replicas
        lines = [
            f"layout: {' '.join(m.overrides) or '(defaults)'}",
            f"model={m.model}: P = {m.parameters:,} parameters"
            + (f", {m.tp_parameters:,} on each of tp = {m.tp} tensor-parallel ranks (P in the formula)" if m.tp > 1 else "")
            + f"; d = {m.dp} data-parallel ranks ({m.mode}, {m.mixed_precision}, state sharded over {shards})",
            f"model state per rank at the optimizer step (step {MEASURED_STEP}), bytes; formula {m.formula_text}",
            "",
            f"{'rank':>4} {'params':>12} {'grads':>12} {'optimizer':>12} {'total':>12} {'formula':>12} {'ratio':>7}"
            f" {'params@fwd':>12} {'activations':>12}",
        ]
        for r in m.ranks:
            state, formula = r["state"], m.formula_of(r)
            lines.append(
                f"{r['rank']:>4} {state['params']:>12,} {state['grads']:>12,} {state['optimizer']:>12,}"
                f" {state['total']:>12,} {formula:>12,} {state['total'] / formula:>7.4f}"
                f" {_count((r.get('after_forward') or {}).get('params')):>12} {_count(r['activations']):>12}"
            )
        mb, seq = m.micro_batch
        lines += [
            "",
            "optimizer: AdamW's moments and its 4-byte step counter per parameter tensor. FSDP2 pads each parameter's",
            "first dimension to a multiple of the shards. params@fwd: parameters held at the end of the step's first",
            f"forward (gathered units and their shards). activations: peak of one forward+backward of {mb} x {seq} tokens.",
            *(("pipeline: a rank holds its stages only, so P is per rank: " + ", ".join(
                f"pp rank {i}: {n:,}" for i, n in enumerate(m.stage_parameters))
               + "; activations are not measured (a stage cannot run a micro-batch alone).",)
              if m.pp > 1 else ()),
            *MEMORY_NOTES.get(m.mode, ()),
            *(MEMORY_NOTES["mixed"] if m.mixed_precision != "fp32" else ()),
            "",
            f"peak activations of one forward+backward of {self.recompute[0].micro_batch[0]} x "
            f"{self.recompute[0].micro_batch[1]} tokens, model={self.recompute[0].model}, one process, fp32:",
            f"{'parallel.recompute':<28} {'activations':>14} {'saving vs none':>15}",
        ]
        for row in self.recompute_rows():
            saving = f"{100 * row['saving']:.1f}%" if row["recompute"] != "none" else "-"
            lines.append(
                f"{recompute_name(row['recompute'], row['every_n_blocks']):<28} {row['activations']:>14,} {saving:>15}"
            )
        return "\n".join(lines)


def memory_bench(overrides: Sequence[str] = ()) -> MemoryResult:
    """The layout of ``overrides`` on its processes, and each recompute setting of the same run on
    one process (``whitebox.reference_overrides``: the layout's keys replaced by one fp32 process)."""
    one_process = reference_overrides(overrides)
    recompute = [
        [*one_process, f"parallel.recompute={mode}", f"parallel.recompute_every_n_blocks={every}"]
        for mode, every in RECOMPUTE_SETTINGS
    ]
    layout, *runs = measure_layouts([list(overrides), *recompute])
    return MemoryResult(layout, runs)


# ----------------------------------------------------------------------------------------------
# --layouts

# The layouts compared by default: name -> the overrides that make it. Everything else (model,
# data, precision) comes from the command line, the same for every layout.
LAYOUTS = {
    "dp": ("parallel=dp", "trainer.devices=2"),
    "tp": ("parallel=tp", "trainer.devices=2"),
    "tp+sp": ("parallel=tp", "parallel.tp.sequence_parallel=true", "trainer.devices=2"),
    "fsdp+tp": ("parallel=fsdp+tp", "trainer.devices=4"),
}
LAYOUT_KEYS = ("parallel", "+parallel", "trainer.devices", "trainer.num_nodes")  # each layout sets these itself
# --compare's defaults: --layouts' and FSDP (ZeRO-3) on 2 ranks.
COMPARE_LAYOUTS = {"dp": LAYOUTS["dp"], "fsdp": ("parallel=fsdp", "trainer.devices=2"),
                   **{name: layout for name, layout in LAYOUTS.items() if name != "dp"}}


def _count(value: Optional[int]) -> str:
    return f"{value:,}" if value is not None else "-"


def parse_layout(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"NAME: override override ..."`` (or just the overrides, which then name the layout)."""
    name, colon, rest = spec.partition(":")
    if colon and "=" not in name:
        name, overrides = name.strip(), tuple(rest.split())
    else:
        name, overrides = spec.strip(), tuple(spec.split())
    if not name or not overrides:
        raise ConfigError(f"--layout {spec!r}: expected 'NAME: overrides...' or 'overrides...', e.g. "
                          "'tp4: parallel=tp parallel.tp.size=4 trainer.devices=4'")
    return name, overrides


def parse_layouts(specs: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each ``--layout``, by name; a name given twice is an error (the second would replace the first)."""
    layouts: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        name, overrides = parse_layout(spec)
        if name in layouts:
            raise ConfigError(f"--layout {spec!r}: a layout named {name!r} is already given")
        layouts[name] = overrides
    return layouts


@dataclass
class LayoutRow:
    """One layout's measurements (``memory``: per rank) and its throughput; with ``--compare`` also
    its model FLOPs per step, the peak FLOP/s of one device (None: not a GPU, no MFU) and the
    pipeline bubble's formula (None: no pipeline, or a zero-bubble schedule; see ``bubble_text``)."""

    name: str
    memory: LayoutMemory
    sequence_parallel: bool
    tokens_per_step: int
    flops_per_step: Optional[int] = None
    peak_flops: Optional[float] = None  # of one device
    bubble: Optional[float] = None
    bubble_text: str = "-"

    @property
    def ranks(self) -> int:
        return len(self.memory.ranks)

    @property
    def timed_steps(self) -> int:
        return len(self.memory.ranks[0]["step_ends"]) - 1

    @property
    def seconds(self) -> float:
        """The timed steps' duration on the slowest rank (the ranks wait for each other in collectives)."""
        return max(r["step_ends"][-1] - r["step_ends"][0] for r in self.memory.ranks)

    @property
    def tokens_per_s(self) -> float:
        return self.timed_steps * self.tokens_per_step / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.timed_steps

    @property
    def mfu(self) -> Optional[float]:
        """Model FLOPs per step over what the ranks' devices could do in the step time at peak."""
        if self.flops_per_step is None or self.peak_flops is None:
            return None
        return self.flops_per_step / (self.seconds / self.timed_steps * self.ranks * self.peak_flops)

    def state(self, key: str) -> int:
        """The most bytes of ``key`` (params, grads, optimizer, total) any rank holds at the optimizer step."""
        return max(r["state"][key] for r in self.memory.ranks)

    @property
    def activations(self) -> Optional[int]:
        """The most any rank's one micro-batch forward+backward peaked at, bytes (None: not measured)."""
        if any(r["activations"] is None for r in self.memory.ranks):
            return None
        return max(r["activations"] for r in self.memory.ranks)

    @property
    def peak_memory(self) -> Optional[int]:
        """The most any rank's tracked total peaked at in that forward+backward (model state, gathered
        parameters, activations, temporaries: the tracker's categories summed at its peak), bytes."""
        if any(r.get("peak") is None for r in self.memory.ranks):
            return None
        return max(sum(v for k, v in r["peak"].items() if k != "Total") for r in self.memory.ranks)

    def comm(self, collective: str, key: str = "bytes") -> int:
        """The most ``key`` (bytes, elements, ops) of ``collective`` any rank issued in the counted step."""
        return max((r.get("comm") or {}).get(collective, {}).get(key, 0) for r in self.memory.ranks)

    @property
    def ddp_bucket_bytes(self) -> Optional[int]:
        """DDP's gradient buckets, bytes (what its reducer all-reduces per step); None: not DDP."""
        buckets = [r.get("ddp_bucket_bytes") for r in self.memory.ranks]
        return max(sum(b) for b in buckets) if all(b is not None for b in buckets) else None

    def compare_dict(self) -> dict[str, Any]:
        """The --compare figures (bytes per rank: the most any rank holds or moves)."""
        return {
            "ms_per_step": self.ms_per_step,
            "flops_per_step": self.flops_per_step,
            "peak_flops": self.peak_flops,
            "mfu": self.mfu,
            "peak_memory": self.peak_memory,
            "model_state": self.state("total"),
            "comm": {name: {key: self.comm(name, key) for key in ("ops", "elements", "bytes")} for name in COLLECTIVES},
            "ddp_bucket_bytes": self.ddp_bucket_bytes,
            "pp": self.memory.pp,
            "bubble": self.bubble,
            "bubble_text": self.bubble_text,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ranks": self.ranks,
            "dp": self.memory.dp,
            "tp": self.memory.tp,
            "sequence_parallel": self.sequence_parallel,
            "tokens_per_step": self.tokens_per_step,
            "timed_steps": self.timed_steps,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            **{key: self.state(key) for key in ("params", "grads", "optimizer", "total")},
            "activations": self.activations,
            "memory": self.memory.to_dict(),
        }


@dataclass
class LayoutsResult:
    config: dict[str, Any]
    rows: list[LayoutRow] = field(default_factory=list)
    compare: bool = False  # --compare: table() is compare_table()

    def baseline(self, row: LayoutRow) -> Optional[LayoutRow]:
        """For a sequence-parallel row, the same layout without sequence parallelism, if it ran."""
        if not row.sequence_parallel:
            return None
        return next((other for other in self.rows if not other.sequence_parallel and other.memory.tp == row.memory.tp
                     and other.memory.dp == row.memory.dp and other.memory.mode == row.memory.mode), None)

    def sp_ratio(self, row: LayoutRow) -> Optional[float]:
        """Activations of a sequence-parallel row over those of the same layout without it."""
        baseline = self.baseline(row)
        if baseline is None or row.activations is None or baseline.activations is None:
            return None
        return row.activations / baseline.activations

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "rows": [
                {**row.to_dict(), "sp_activation_ratio": self.sp_ratio(row), **(row.compare_dict() if self.compare else {})}
                for row in self.rows
            ],
        }

    def table(self) -> str:
        if self.compare:
            return self.compare_table()
        c = self.config
        lines = [
            f"model={c['model']} ({c['parameters']:,} params)  device={c['device']}  cores={c['cores']} (threads per rank:"
            f" cores // ranks, at least 1)  "
            f"global_batch_size={c['global_batch_size']} x seq_len={c['seq_len']} = {c['tokens_per_step']} tokens/step; "
            f"activations of one micro-batch of {c['micro_batch_size']} x {c['seq_len']} tokens",
            f"tokens/s: the {c['steps']} steps after the measured step {MEASURED_STEP}, in the same run (slowest rank's clock);"
            " bytes: the most any rank holds, at the optimizer step",
            "",
            f"{'layout':<10}{'ranks':>6}{'dp x tp':>9}{'tokens/s':>10}{'params':>12}{'grads':>12}{'optimizer':>12}"
            f"{'total':>12}{'formula':>12}{'ratio':>8}{'activations':>13}{'vs no SP':>10}",
        ]
        for row in self.rows:
            m, ratio = row.memory, self.sp_ratio(row)
            # A pipeline rank holds its stages only: the formula is that of the rank with the most parameters.
            formula, fraction = f"{m.formula:,}", f"{row.state('total') / m.formula:.4f}"
            lines.append(
                f"{row.name:<10}{row.ranks:>6}{f'{m.dp} x {m.tp}':>9}{row.tokens_per_s:>10,.0f}{row.state('params'):>12,}"
                f"{row.state('grads'):>12,}{row.state('optimizer'):>12,}{row.state('total'):>12,}{formula:>12}"
                f"{fraction:>8}{_count(row.activations):>13}{f'{ratio:.3f}' if ratio is not None else '-':>10}"
            )
        tp_rows = {row.memory.tp: row.memory.tp_parameters for row in self.rows if row.memory.tp > 1}
        lines += [
            "",
            "formula: ZeRO's for the layout's data-parallel mode (DDP 16P, ZeRO-3 16P/d; see --memory) with P the parameters"
            " one tensor-parallel rank holds"
            + "".join(f"; tp={tp}: {n:,} of {c['parameters']:,}" for tp, n in sorted(tp_rows.items()))
            + " (block matmuls, embedding and head split, norms replicated); with pp, of the pipeline rank holding the most.",
            "ratio above 1: AdamW's 4-byte step counter per parameter tensor, and FSDP2's padding of uneven shards.",
            "vs no SP: activations of a sequence-parallel layout over those of the same layout without it (norms, residuals",
            "and dropout between the blocks hold 1/tp of the sequence).",
        ]
        if c["cores"] < max(row.ranks for row in self.rows):
            lines.append(f"tokens/s: {max(row.ranks for row in self.rows)} processes on {c['cores']} cores: "
                         "the layouts with more ranks than cores share them.")
        return "\n".join(lines)

    def compare_table(self) -> str:
        c = self.config
        mb = lambda n: f"{n / 1e6:.2f}" if n is not None else "-"  # noqa: E731
        lines = [
            f"model={c['model']} ({c['parameters']:,} params, {c['n_layers']} layers, dim {c['dim']})  device={c['device']}"
            f"  cores={c['cores']}  global_batch_size={c['global_batch_size']} x seq_len={c['seq_len']} ="
            f" {c['tokens_per_step']} tokens/step, micro-batches of {c['micro_batch_size']}",
            f"tokens/s, ms/step: the {c['steps']} step{'s' * (c['steps'] > 1)} after the measured step {MEASURED_STEP}"
            " (slowest rank's clock); memory: the most any rank holds;",
            f"comm: the most bytes any rank issued per collective in one whole optimizer step (step"
            f" {MEASURED_STEP + c['steps'] + 1}, counted, not timed); MB = 1e6 bytes",
            "",
            f"{'layout':<10}{'ranks':>6}{'dp x tp x pp':>13}{'tokens/s':>10}{'ms/step':>9}{'MFU':>7}{'peak MB':>9}"
            f"{'state MB':>9}{'acts MB':>9}{'all_reduce':>11}{'all_gather':>11}{'reduce_sc.':>11}{'all_to_all':>11}"
            f"{'send+recv':>10}{'broadcast':>10}{'bubble':>8}",
        ]
        for row in self.rows:
            m = row.memory
            mfu = f"{100 * row.mfu:.1f}%" if row.mfu is not None else "-"
            p2p = row.comm("send") + row.comm("recv")
            lines.append(
                f"{row.name:<10}{row.ranks:>6}{f'{m.dp} x {m.tp} x {m.pp}':>13}{row.tokens_per_s:>10,.0f}"
                f"{row.ms_per_step:>9.1f}{mfu:>7}{mb(row.peak_memory):>9}{mb(row.state('total')):>9}"
                f"{mb(row.activations):>9}{mb(row.comm('all_reduce')):>11}{mb(row.comm('all_gather')):>11}"
                f"{mb(row.comm('reduce_scatter')):>11}{mb(row.comm('all_to_all')):>11}{mb(p2p):>10}"
                f"{mb(row.comm('broadcast')):>10}{row.bubble_text:>8}"
            )
        gpu = c["device"] == "cuda"
        lines += [
            "",
            f"MFU: tokens/step x (6N + 12*L*h*s) model FLOPs / (step time x ranks x peak FLOP/s of one device); N ="
            f" {c['flops_parameters']:,}, the parameters",
            f"less the input embedding (a lookup, no matmul): {c['flops_per_token']:,} FLOPs per token.",
            f"Peak: {c['peak_flops']:.3g} FLOP/s (hardware={c['hardware']}: dense bf16, whatever the run's precision)."
            if gpu else
            f"MFU '-': the run is on {c['device']}, not a GPU; hardware.peak_bf16_flops is a GPU's (hardware={c['hardware']})"
            " or, for hardware=cpu, a rough planning figure.",
            "peak: the memory tracker's total (parameters, gradients, optimizer state, gathered parameters, activations,"
            " temporaries) at its peak",
            "in the measured forward+backward of one micro-batch; state: parameters, gradients and optimizer state at the"
            " optimizer step; acts: activations' peak.",
            "comm (curry_train/validation/comm.py): the collectives dispatched in the step, bytes of their operands, not"
            " of the wire: all-gather",
            "its output, all-reduce, reduce-scatter and all-to-all their input, send/recv what they carry (a ring"
            " all-reduce of B bytes over d ranks",
            "sends 2(d-1)/d x B from each). Includes the gradient norm's all-reduce and the loss metrics' sync (a few"
            " bytes each).",
        ]
        for row in self.rows:
            buckets = row.ddp_bucket_bytes
            if buckets is not None:
                lines.append(f"{row.name}: DDP's bucketed all-reduce: {buckets:,} bytes (from its buckets), counted"
                             f" {row.comm('all_reduce'):,} = {row.comm('all_reduce') / (4 * row.memory.parameters):.4f} x 4P.")
        if any(row.memory.pp > 1 for row in self.rows):
            lines += ["bubble: (P-1)/(M+P-1) for gpipe and 1F1B, (P-1)/(v*M+P-1) for interleaved, ~0 for the zero-bubble"
                      " kinds (the formula: --pipeline",
                      "measures it). Pipelined layouts: activations and peak not measured (a stage cannot run a"
                      " micro-batch alone)."]
        else:
            lines.append("bubble: '-' without pipeline parallelism.")
        if c["cores"] < max(row.ranks for row in self.rows):
            lines.append(f"tokens/s: {max(row.ranks for row in self.rows)} processes on {c['cores']} cores: "
                         "the layouts with more ranks than cores share them.")
        return "\n".join(lines)


def _bubble(cfg: DictConfig, degrees: Any) -> tuple[Optional[float], str]:
    """The bubble formula of a pipelined layout (validation/bubble.py) and its text; ``-`` without pp."""
    from curry_train.config.checks import pipeline_microbatches
    from curry_train.primitives.pipeline_schedule import stages_per_rank
    from curry_train.validation.bubble import bubble_formula

    pp = cfg.parallel.get("pp")
    if pp is None or degrees.pp == 1:
        return None, "-"
    formula = bubble_formula(pp.schedule, degrees.pp, pipeline_microbatches(cfg, degrees),
                             stages_per_rank(pp.schedule, pp.virtual_stages))
    return formula, f"{formula:.1%}" if formula is not None else "~0"


def layouts_bench(
    overrides: Sequence[str] = (), layouts: Optional[dict[str, Sequence[str]]] = None, steps: int = 10,
    compare: bool = False,
) -> LayoutsResult:
    """Each layout (default ``LAYOUTS``) with the common ``overrides``, through the real training path
    (``memory.measure_layouts``): model state and activations per rank, then ``steps`` timed steps.
    ``compare`` (default layouts ``COMPARE_LAYOUTS``): one more step whose collectives each rank counts,
    and each row's MFU (on a GPU), peak memory and pipeline bubble: see the module docstring."""
    layouts = dict((COMPARE_LAYOUTS if compare else LAYOUTS) if layouts is None else layouts)
    if not layouts:
        raise ConfigError("no layouts to compare")
    if steps < 1:
        raise ValueError(f"--steps={steps} must be at least 1")
    for override in overrides:
        if override.partition("=")[0] in LAYOUT_KEYS:
            raise ConfigError(f"{override}: each layout sets {', '.join(LAYOUT_KEYS[::2])} itself; pass the layouts"
                              " with --layout 'NAME: overrides...' and leave these out of the common overrides")
    runs = {name: [*overrides, *layout] for name, layout in layouts.items()}
    cfgs = {name: compose(run) for name, run in runs.items()}
    plans = [check(cfg) for cfg in cfgs.values()]  # every layout fails fast, before any process starts
    shapes = {(cfg.model.name, cfg.data.global_batch_size, cfg.data.seq_len, cfg.data.micro_batch_size,
               OmegaConf.to_yaml(cfg.model)) for cfg in cfgs.values()}
    if len(shapes) != 1:
        raise ConfigError(f"the layouts differ in model or batch ({sorted(shape[:4] for shape in shapes)}): they must"
                          " compare the same run")
    memories = measure_layouts(list(runs.values()), timed_steps=steps, count_comm=compare)
    first = next(iter(cfgs.values()))
    tokens_per_step = first.data.global_batch_size * first.data.seq_len
    compare_config: dict[str, Any] = {}
    if compare:
        n_flops = flops_parameters(first.model)
        per_token = flops_per_token(n_flops, first.model.n_layers, first.model.dim, first.data.seq_len)
        gpu = plans[0].accelerator == "cuda"
        compare_config = {
            "n_layers": first.model.n_layers,
            "dim": first.model.dim,
            "flops_parameters": n_flops,
            "flops_per_token": per_token,
            "flops_per_step": tokens_per_step * per_token,
            "hardware": first.hardware.name,
            "peak_flops": float(first.hardware.peak_bf16_flops) if gpu else None,
        }
    result = LayoutsResult(
        config={
            "overrides": list(overrides),
            "layouts": {name: list(layout) for name, layout in layouts.items()},
            "model": first.model.name,
            "parameters": memories[0].parameters,
            "device": plans[0].accelerator,
            "cores": os.cpu_count() or 1,
            "global_batch_size": first.data.global_batch_size,
            "micro_batch_size": first.data.micro_batch_size,
            "seq_len": first.data.seq_len,
            "tokens_per_step": tokens_per_step,
            "steps": steps,
            **compare_config,
        },
        compare=compare,
    )
    for (name, cfg), memory, plan in zip(cfgs.items(), memories, plans, strict=True):
        tp = cfg.parallel.get("tp")
        sequence_parallel = bool(tp is not None and tp.sequence_parallel)
        row = LayoutRow(name, memory, sequence_parallel, tokens_per_step)
        if compare:
            row.flops_per_step = compare_config["flops_per_step"]
            row.peak_flops = compare_config["peak_flops"]
            row.bubble, row.bubble_text = _bubble(cfg, plan.degrees)
        result.rows.append(row)
    return result


# ----------------------------------------------------------------------------------------------
# --pipeline

# Equal stages for P=2 with 2 stages per rank: 4 stages of 2 blocks (the debug model has 4 blocks).
PIPELINE_DEFAULTS = ("model.n_layers=8",)


@dataclass
class BubbleResult:
    config: dict[str, Any]
    rows: list[BubbleRow]

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "rows": [row.to_dict() for row in self.rows]}

    def table(self) -> str:
        c = self.config
        lines = [
            f"model={c['model']} ({c['n_layers']} blocks)  P={c['pp']} processes, one thread each, on {c['cores']} cores;"
            f" micro-batch {c['micro_batch_size']} x {c['seq_len']} tokens; {c['steps']} timed steps per row",
            "bubble: each rank's idle share of a step, 1 - (time in forward, backward, weight-gradient chunks and the loss)"
            " / step time",
            "",
            bubble_table(self.rows),
            "",
            "formula: (P-1)/(M+P-1) for gpipe and 1F1B, (P-1)/(v*M+P-1) for interleaved; ~0 for the zero-bubble kinds.",
            "The measured bubble counts sending activations and gradients between processes and each chunk's schedule",
            "overhead as idle, and the embedding and head make the first and last stages heavier than the others.",
        ]
        return "\n".join(lines)


def pipeline_bench(
    overrides: Sequence[str] = (), pp: int = 2, microbatches: Sequence[int] = (4, 8), steps: int = 5,
    kinds: Sequence[str] = KINDS,
) -> BubbleResult:
    """Every schedule kind at the same P and each M (``validation.bubble.measure_bubbles``), on the
    model of ``PIPELINE_DEFAULTS`` + ``overrides``."""
    overrides = [*PIPELINE_DEFAULTS, *overrides]
    cfg = compose(overrides)
    try:
        check_bubble_runs(cfg.model.n_layers, kinds, pp, list(microbatches), steps)
    except ValueError as error:  # a (kind, M, P) the schedules do not accept: said like a config error
        raise ConfigError(str(error)) from error
    rows = measure_bubbles(overrides, kinds, pp, list(microbatches), steps)
    return BubbleResult(
        config={
            "overrides": list(overrides),
            "model": cfg.model.name,
            "n_layers": cfg.model.n_layers,
            "pp": pp,
            "microbatches": list(microbatches),
            "micro_batch_size": cfg.data.micro_batch_size,
            "seq_len": cfg.data.seq_len,
            "steps": steps,
            "cores": os.cpu_count() or 1,
        },
        rows=rows,
    )


def quiet_lightning() -> None:
    """Lightning's per-fit banners and tips would drown the table."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 4,8") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: micro-batch counts must be positive")
    return counts


def _kinds(text: str) -> list[str]:
    from curry_train.primitives.pipeline_schedule import canonical_kind

    kinds = [part.strip() for part in text.split(",")]
    for kind in kinds:
        try:
            canonical_kind(kind)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return kinds


@dataclass
class ContextResult:
    rows: list
    seq_len: int

    def table(self) -> str:
        from curry_train.validation.context import context_table

        return (f"context parallel attention (ContextParallelAttention), one sequence of {self.seq_len} tokens, "
                "8 heads x 64, 2 key/value heads, fwd+bwd, one thread per rank:\n" + context_table(self.rows)
                + "\nactivations: peak of one forward+backward by PyTorch's memory tracker (the op's saved shards and"
                " its key/value blocks in flight); exposed comm: time waiting for a block after its compute, share of"
                " the op's time (the rest of each transfer overlaps compute).")

    def to_dict(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "rows": [row.to_dict() for row in self.rows]}


def context_bench(seq_len: int, cps: Sequence[int], pattern: str, steps: int) -> ContextResult:
    """Attention memory per rank and tokens/s for each cp at one sequence length."""
    from curry_train.primitives.context_parallel import PATTERNS

    if pattern not in PATTERNS:
        raise ConfigError(f"--pattern {pattern}: expected one of {', '.join(PATTERNS)}")
    for cp in cps:
        if cp < 1 or seq_len % (2 * cp):
            raise ConfigError(f"--cp {cp}: the sequence ({seq_len}) must divide into 2 x cp chunks")
    from curry_train.validation.context import measure_context

    return ContextResult(rows=measure_context(seq_len, cps, pattern, steps=steps), seq_len=seq_len)


DEFAULT_STEPS = {"throughput": 20, "layouts": 10, "compare": 2, "pipeline": 5, "context": 3}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (with --layouts: common to every layout)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per run (default 20; --layouts: 10, after the measured step; --compare: 2;"
                             " --pipeline: 5 per row)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them, at least 1 (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="[hand, curry] rounds; medians reported (default 3)")
    parser.add_argument("--loggers", choices=("csv", "none"), default="csv", help="curry loop's loggers (default csv)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--memory", action="store_true",
                      help="per-rank memory of the layout instead of throughput (--steps, --warmup, --repeats, --loggers unused)")
    mode.add_argument("--layouts", action="store_true",
                      help=f"tokens/s and per-rank memory of several layouts of the same run, side by side (default: "
                           f"{', '.join(LAYOUTS)}; see --layout)")
    mode.add_argument("--compare", action="store_true",
                      help=f"--layouts with MFU, ms/step, peak memory per rank, communication volume per collective and the "
                           f"pipeline bubble (default: {', '.join(COMPARE_LAYOUTS)}; see --layout)")
    mode.add_argument("--pipeline", action="store_true",
                      help="the measured pipeline bubble next to its formula, and tokens/s, for every schedule kind")
    mode.add_argument("--context", action="store_true",
                      help="context-parallel attention: per-rank activation memory, exposed communication and tokens/s for each cp")
    parser.add_argument("--seq-len", type=int, default=8192, help="with --context: the sequence length (default 8192)")
    parser.add_argument("--cp", type=_counts, default=[1, 2, 4], metavar="CP[,CP...]", help="with --context: cp sizes (default 1,2,4)")
    parser.add_argument("--pattern", default="ring", help="with --context: ring, double_ring or alltoall (default ring)")
    parser.add_argument("--layout", action="append", default=None, metavar="'NAME: OVERRIDES'",
                        help="with --layouts or --compare, a layout to compare instead of the defaults (repeatable), e.g. "
                             "--layout 'tp4: parallel=tp parallel.tp.size=4 trainer.devices=4'")
    parser.add_argument("--pp", type=int, default=2, help="with --pipeline: pipeline ranks P (default 2)")
    parser.add_argument("--microbatches", type=_counts, default=[4, 8], metavar="M[,M...]",
                        help="with --pipeline: micro-batch counts M, each a row per kind (default 4,8)")
    parser.add_argument("--kinds", type=_kinds, default=list(KINDS), metavar="KIND[,KIND...]",
                        help=f"with --pipeline: schedule kinds (default all: {','.join(KINDS)})")
    args = parser.parse_args(argv)
    mode_name = ("compare" if args.compare else "layouts" if args.layouts or args.layout else "pipeline" if args.pipeline
                 else "context" if args.context else "throughput")
    steps = DEFAULT_STEPS[mode_name] if args.steps is None else args.steps
    if steps < 1 or args.warmup < 1 or args.repeats < 1:
        parser.error("--steps, --warmup and --repeats must be at least 1")
    if args.layout and (args.memory or args.pipeline or args.context):
        parser.error("--layout goes with --layouts or --compare")
    quiet_lightning()
    try:
        if args.memory:
            result = memory_bench(args.overrides)
        elif mode_name in ("layouts", "compare"):
            layouts = parse_layouts(args.layout) if args.layout else None
            result = layouts_bench(args.overrides, layouts, steps, compare=mode_name == "compare")
        elif mode_name == "context":
            result = context_bench(args.seq_len, args.cp, args.pattern, steps)
        elif mode_name == "pipeline":
            result = pipeline_bench(args.overrides, args.pp, args.microbatches, steps, args.kinds)
        else:
            result = bench(args.overrides, steps, args.warmup, args.repeats, args.loggers, progress=True)
    except ConfigError as error:
        print(f"curry-train: error: {error}", file=sys.stderr)
        return 2
    print(result.table())
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
