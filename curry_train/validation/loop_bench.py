"""What the training loop costs besides the model (``scripts/bench.py --loop``).

On a model so small that its compute is negligible (by default 2 blocks of width 32 on 16-token rows,
2 rows a step), curry-train's real loop -- ``run.build_trainer`` with the run's own callbacks
(``run.run_callbacks``: summary, preemption, hang watchdog), periodic checkpoints (none due in the timed
steps: their bookkeeping only), the run's metrics.csv (``run.make_loggers``,
``logger=csv``) and the progress bar as configured -- runs against the
hand-written PyTorch loop of ``throughput.run_hand_loop`` doing the same step, ``[hand, curry] x R``
alternating. Per loop: host time per step (median over the repeats), and where it goes, summed over the
timed steps of each run and divided by their count:

* ``data``: the loader's ``__next__`` (both loops read the same ``TrainBatches`` through a ``DataLoader``);
* ``forward+backward``: ``TrainStep.forward_backward`` (hand: its micro-batch loop);
* ``optimizer``: the rest of ``TrainStep.run`` -- the gradient norm and clip, the optimizer, zeroing, the
  schedule, the non-finite tally (hand: clip, step, zero, schedule);
* ``logging``: the module's logged steps (``CausalLM._log_train``: the one host read, the loggers);
* ``checkpoint``: ``PeriodicCheckpoint.on_train_batch_end`` (is a save due; a background save's poll);
* ``hooks+loop``: the remainder -- Lightning's loop and every other hook (the clock's own reads included).

The ratio curry / hand of the step time is the loop's overhead; the issue's bar is 1.10.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch.utils.data.dataloader import _BaseDataLoaderIter

from curry_train.callbacks import PeriodicCheckpoint
from curry_train.config.schema import Config
from curry_train.model.llama import Llama
from curry_train.module import CausalLM, LMDataModule
from curry_train.primitives.materialize import materialize_and_init
from curry_train.run import build_trainer, make_loggers, run_callbacks
from curry_train.train_step import TrainStep
from curry_train.validation.throughput import LoopRun, device_of, hand_optimizer, prepare, run_hand_loop

TINY = (
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=2",
    "model.ffn_dim=64",
    "data.seq_len=16",
    "data.global_batch_size=2",
    "data.micro_batch_size=2",
)
PARTS = ("data", "forward+backward", "optimizer", "logging", "checkpoint", "hooks+loop")


class Sections:
    """Seconds spent in named sections, counted only while ``on``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.on = False

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.on:
            yield
            return
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - began

    def timing(self, owner: Any, attribute: str, name: str) -> Any:
        """A context in which ``owner.attribute`` (a function) runs inside section ``name``."""
        original = getattr(owner, attribute)
        seconds, clock = self.seconds, time.perf_counter

        def timed(*args: Any, **kwargs: Any) -> Any:  # no context manager: the instrument's own cost stays small
            if not self.on:
                return original(*args, **kwargs)
            began = clock()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[name] += clock() - began

        @contextmanager
        def patched() -> Iterator[None]:
            setattr(owner, attribute, timed)
            try:
                yield
            finally:
                setattr(owner, attribute, original)

        return patched()


@dataclass
class LoopCost:
    """One run: its ``LoopRun`` (step clock) and the seconds of each part over its timed steps."""

    run: LoopRun
    seconds: dict[str, float]

    def per_step_ms(self) -> dict[str, float]:
        steps = self.run.timed_steps
        parts = {name: 1e3 * self.seconds.get(name, 0.0) / steps for name in PARTS[:-1]}
        parts["hooks+loop"] = self.run.ms_per_step - sum(parts.values())
        return parts


@dataclass
class LoopBenchResult:
    config: dict[str, Any]
    costs: list[LoopCost] = field(default_factory=list)

    @property
    def loops(self) -> list[str]:
        return list(dict.fromkeys(cost.run.loop for cost in self.costs))

    def of(self, loop: str) -> list[LoopCost]:
        return [cost for cost in self.costs if cost.run.loop == loop]

    def ms_per_step(self, loop: str) -> float:
        return statistics.median(cost.run.ms_per_step for cost in self.of(loop))

    def parts(self, loop: str) -> dict[str, float]:
        """Each part's median over the repeats, in ms per step."""
        return {name: statistics.median(cost.per_step_ms()[name] for cost in self.of(loop)) for name in PARTS}

    @property
    def ratio(self) -> float:
        return self.ratio_of("curry")

    def ratio_of(self, loop: str) -> float:
        """``loop``'s step time over the hand loop's (medians)."""
        return self.ms_per_step(loop) / self.ms_per_step("hand")

    @property
    def max_loss_rel_diff(self) -> float:
        """Largest relative difference of any run's per-step loss from the first hand run's: the loops agree."""
        reference = self.of("hand")[0].run.losses
        return max(
            abs(a - b) / max(abs(b), 1e-30) for c in self.costs for a, b in zip(c.run.losses, reference, strict=True)
        )

    @property
    def paired_ratio(self) -> float:
        pairs = zip(self.of("curry"), self.of("hand"), strict=True)
        return statistics.median(c.run.ms_per_step / h.run.ms_per_step for c, h in pairs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "ms_per_step": {loop: self.ms_per_step(loop) for loop in self.loops},
            "parts_ms_per_step": {loop: self.parts(loop) for loop in self.loops},
            "ratio": self.ratio,
            "paired_ratio": self.paired_ratio,
            "max_loss_rel_diff": self.max_loss_rel_diff,
            "runs": [{**cost.run.to_dict(), "parts_ms_per_step": cost.per_step_ms()} for cost in self.costs],
        }

    def table(self) -> str:
        c = self.config
        lines = [
            f"the loop's own cost: model dim={c['dim']} layers={c['n_layers']}, {c['tokens_per_step']} tokens/step, "
            f"{c['steps']} timed steps after {c['warmup']}, {c['repeats']} repeat(s); "
            f"log_every_n_steps={c['log_every_n_steps']}, progress bar {'on' if c['progress_bar'] else 'off'}",
            "",
            f"{'loop':<9} {'ms/step':>8} " + " ".join(f"{name:>16}" for name in PARTS),
        ]
        for loop in self.loops:
            parts = self.parts(loop)
            lines.append(f"{loop:<9} {self.ms_per_step(loop):>8.3f} " + " ".join(f"{parts[n]:>16.3f}" for n in PARTS))
        lines += [
            "",
            f"ratio curry/hand: {self.ratio:.3f} (median of per-repeat ratios {self.paired_ratio:.3f}); "
            f"curry's overhead {self.ms_per_step('curry') - self.ms_per_step('hand'):+.3f} ms/step"
            + (
                f" (Lightning's own loop with the hand step: {self.ratio_of('lightning'):.3f})"
                if "lightning" in self.loops
                else ""
            )
            + "; "
            f"per-step losses: max rel. diff {self.max_loss_rel_diff:.1e} over all runs",
        ]
        return "\n".join(lines)


class _Clock(Callback):
    """The step clock and the switch of the sections: on from the end of the warm-up steps."""

    def __init__(self, device: torch.device, warmup: int, sections: Sections) -> None:
        self.device, self.warmup, self.sections = device, warmup, sections
        self.step_ends: list[float] = []
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step_ends.append(time.perf_counter())
        self.losses.append(pl_module.step.last_loss if isinstance(pl_module, CausalLM) else pl_module.last_loss)
        self.sections.on = len(self.step_ends) >= self.warmup


def _curry(cfg: Any, datamodule: LMDataModule, plan: Any, warmup: int, repeat: int) -> LoopCost:
    sections = Sections()
    clock = _Clock(device_of(plan), warmup, sections)
    config = Config.of(cfg)
    with tempfile.TemporaryDirectory(prefix="curry-loop-") as run_dir, ExitStack() as stack:
        for owner, attribute, name in (
            (_BaseDataLoaderIter, "__next__", "data"),
            (TrainStep, "forward_backward", "forward+backward"),
            (TrainStep, "run", "run"),
            (CausalLM, "_log_train", "logging"),
            (PeriodicCheckpoint, "on_train_batch_end", "checkpoint"),
        ):
            stack.enter_context(sections.timing(owner, attribute, name))
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        trainer = build_trainer(
            config,
            Path(run_dir),
            plan.accelerator,
            plan.dims,
            callbacks=[*run_callbacks(config, Path(run_dir)), clock],
            loggers=make_loggers(config, Path(run_dir), "loop-bench"),
        )
        trainer.fit(CausalLM(config), datamodule=datamodule)
    seconds = dict(sections.seconds)
    seconds["optimizer"] = seconds.pop("run", 0.0) - seconds.get("forward+backward", 0.0)
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    run = LoopRun("curry", repeat, warmup, tokens, clock.step_ends, [float(x) for x in clock.losses])
    return LoopCost(run, seconds)


class _Bare(pl.LightningModule):
    """The hand loop's step (``throughput.run_hand_loop``) as a LightningModule with manual optimization and
    nothing of curry-train's: run by a Trainer without callbacks, loggers or progress bar, it is the floor
    Lightning's own loop sets."""

    def __init__(self, cfg: Any, device: torch.device, sections: Sections) -> None:
        super().__init__()
        self.cfg, self.sections, self.automatic_optimization = cfg, sections, False
        with torch.device("meta"):
            self.model = Llama(cfg.model)
        materialize_and_init(self.model, device, cfg.seed)
        self.last_loss: Optional[torch.Tensor] = None

    def configure_optimizers(self) -> Any:
        optimizer, schedule = hand_optimizer(self.model, self.cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        d, clip = self.cfg.data, self.cfg.optim.grad_clip
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        with self.sections("forward+backward"):
            total = torch.zeros(())
            for micro in batch.split(d.micro_batch_size):
                logits = self.model(micro[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), micro[:, 1:].flatten(), reduction="sum")
                loss = loss / (d.global_batch_size * d.seq_len)
                self.manual_backward(loss)
                total += loss.detach()
        with self.sections("optimizer"):
            grads = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, clip if clip > 0 else float("inf"), foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
        self.last_loss = total


def _lightning(cfg: Any, datamodule: LMDataModule, plan: Any, warmup: int, repeat: int) -> LoopCost:
    sections = Sections()
    clock = _Clock(device_of(plan), warmup, sections)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=cfg.trainer.max_steps,
        logger=False,
        callbacks=[clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    with sections.timing(_BaseDataLoaderIter, "__next__", "data"):
        trainer.fit(_Bare(cfg, device_of(plan), sections), datamodule=datamodule)
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    run = LoopRun("lightning", repeat, warmup, tokens, clock.step_ends, [float(x) for x in clock.losses])
    return LoopCost(run, dict(sections.seconds))


def _hand(cfg: Any, datamodule: LMDataModule, plan: Any, warmup: int, repeat: int) -> LoopCost:
    sections = Sections()
    with sections.timing(_BaseDataLoaderIter, "__next__", "data"):
        run = run_hand_loop(cfg, datamodule, device_of(plan), warmup, repeat, sections=sections)
    return LoopCost(run, dict(sections.seconds))


def loop_bench(
    overrides: Sequence[str] = (),
    steps: int = 200,
    warmup: int = 20,
    repeats: int = 3,
    progress_bar: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> LoopBenchResult:
    """``repeats`` x [hand, curry] on the tiny model (``TINY`` under ``overrides``); see the module docstring."""
    if repeats < 1:
        raise ValueError(f"--repeats={repeats} must be at least 1")
    fixed = ("logger=csv", "checkpoint.every_n_steps=0", "checkpoint.save_on_end=false")
    cfg, plan = prepare([*TINY, *fixed, *overrides], steps, warmup)
    if progress_bar:  # prepare turns the progress bar off for the other benches; this one measures it if asked
        OmegaConf.update(cfg, "trainer.enable_progress_bar", True)
    datamodule = LMDataModule(cfg.data, cfg.seed)
    datamodule.setup("fit")
    result = LoopBenchResult(
        config={
            "overrides": list(overrides),
            "dim": cfg.model.dim,
            "n_layers": cfg.model.n_layers,
            "tokens_per_step": cfg.data.global_batch_size * cfg.data.seq_len,
            "steps": steps,
            "warmup": warmup,
            "repeats": repeats,
            "log_every_n_steps": cfg.trainer.log_every_n_steps,
            "progress_bar": bool(cfg.trainer.enable_progress_bar),
            "device": str(device_of(plan)),
        }
    )
    for repeat in range(repeats):
        runs = (("hand", _hand), ("lightning", _lightning), ("curry", _curry))
        for loop, run in runs if plan.accelerator == "cpu" else (runs[0], runs[2]):
            cost = run(cfg, datamodule, plan, warmup, repeat)
            if len(cost.run.step_ends) != warmup + steps:
                raise RuntimeError(f"{loop} loop ran {len(cost.run.step_ends)} steps, expected {warmup + steps}")
            result.costs.append(cost)
            (log or (lambda line: print(line, file=sys.stderr, flush=True)))(
                f"repeat {repeat + 1}/{repeats} {loop:<5}: {cost.run.ms_per_step:.3f} ms/step"
            )
    return result
