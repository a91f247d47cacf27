"""Eager against compiled training, side by side in one run (``scripts/bench.py --compile``).

For each model (the debug model, and a ~100M-parameter Llama: 16 blocks of 768, 12 heads, 4 key/value
heads, SwiGLU 2048, on the byte-level corpus: 101M parameters), curry-train's own loop
(``throughput.run_curry_loop``, one device) runs ``W`` warm-up steps and ``N`` timed steps eagerly, then
the same with ``compile.enabled=true``, each run in a fresh process (so that neither's memory or caches
count in the other's figures). Per run:

* tokens/s over the timed steps (the warm-up steps hold the compilation);
* peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on a CPU the rise of the process's peak
  resident memory over the run (Linux's VmHWM) above what it held before the model was built;
* graphs dynamo compiled after the first step (``recompiles``): a recompilation every step would make
  the compiled loop slower than eager; it must be 0;
* MFU against the device's measured matmul peak (``peak_flops``), probed once per compute dtype in the
  bench's own process before the first run (probed after each run, while the run's workers or compile
  processes were still winding down, it read low and put MFU above 100%);
* the per-step losses, compared with eager's (the largest relative difference).
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from curry_train.config import compose
from curry_train.config.checks import check
from curry_train.model.llama import Llama
from curry_train.module import LMDataModule
from curry_train.pool import Pools
from curry_train.primitives.host_memory import reset_peak, resident
from curry_train.runner import fit_layouts
from curry_train.validation.defaults import COMPILE_MODELS as MODELS
from curry_train.validation.peak_flops import DTYPES, matmul_flops
from curry_train.validation.throughput import (
    LoopRun,
    StepClock,
    compute_dtype_name,
    device_of,
    model_flops_per_token,
    prepare,
    run_curry_loop,
)


class GraphCounter(Callback):
    """Graphs dynamo has compiled since the counter was made, read at the end of the first step and of the
    last."""

    def __init__(self) -> None:
        self.after_first: Optional[int] = None
        self.at_end = 0
        # dynamo's count is the process's: a pool worker that ran a compiled run before this one has counted
        # that run's graphs (``--repeats``)
        self.before = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) - self.before
        if self.after_first is None:
            self.after_first = graphs
        self.at_end = graphs


def _reset_peak(device: torch.device) -> int:
    """Start the peak-memory reading; returns the baseline it is measured from."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    return resident().get("VmRSS", 0) if reset_peak() else 0


def _peak(device: torch.device, baseline: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resident().get("VmHWM", baseline) - baseline


@dataclass
class CompileRow:
    model: str  # the model's name; with layouts, "model, layout"
    parameters: int
    mode: str  # eager | compiled
    run: LoopRun
    peak_memory: int
    recompiles: int  # graphs compiled after the first step
    mfu: float
    graphs: int = 0  # graphs dynamo compiled in the run (eager: 0)
    max_loss_rel_diff: float = 0.0  # against the same model's eager run (every compiled run's, the largest)
    runs_tokens_per_s: list[float] = field(default_factory=list)  # every run's of this mode, in run order

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "parameters": self.parameters,
            "mode": self.mode,
            "tokens_per_s": self.run.tokens_per_s,
            "ms_per_step": self.run.ms_per_step,
            "peak_memory": self.peak_memory,
            "recompiles": self.recompiles,
            "graphs": self.graphs,
            "mfu": self.mfu,
            "losses": self.run.losses,
            "max_loss_rel_diff": self.max_loss_rel_diff,
            "runs_tokens_per_s": self.runs_tokens_per_s,
        }


@dataclass
class CompileResult:
    config: dict[str, Any]
    rows: list[CompileRow] = field(default_factory=list)

    def row(self, model: str, mode: str) -> CompileRow:
        return next(r for r in self.rows if r.model == model and r.mode == mode)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "rows": [row.to_dict() for row in self.rows]}

    def table(self) -> str:
        c = self.config
        lines = [
            f"device={c['device']}  precision={c['precision']}  backend={c['backend']}  {c['steps']} timed steps after"
            f" {c['warmup']} warm-up (compilation)  measured {c['compute_dtype']} matmul peak"
            f" {c['measured_peak'] / 1e9:,.0f} GFLOP/s",
            "",
            f"{'model':<12}{'params':>9} {'mode':<9}{'tokens/s':>11}{'ms/step':>10}{'peak MiB':>10}{'MFU':>7}"
            f"{'recompiles':>11}{'loss vs eager':>15}{'speed-up':>10}",
        ]
        repeats = int(c.get("repeats", 1))
        if repeats > 1:
            lines[0] += f"  {repeats} runs a mode, alternating: the median run shown"
            lines[2] += "  tokens/s of each run"
        width = max(12, *(len(row.model) + 1 for row in self.rows))
        lines[2] = f"{'model':<{width}}" + lines[2][12:]
        for row in self.rows:
            eager = self.row(row.model, "eager")
            lines.append(
                f"{row.model:<{width}}{row.parameters / 1e6:>8.1f}M {row.mode:<9}{row.run.tokens_per_s:>11,.0f}"
                f"{row.run.ms_per_step:>10.1f}{row.peak_memory / 2**20:>10.0f}{100 * row.mfu:>6.1f}%"
                f"{row.recompiles:>11}{row.max_loss_rel_diff:>15.1e}"
                f"{row.run.tokens_per_s / eager.run.tokens_per_s:>9.2f}x"
                + ("  " + " ".join(f"{t:,.0f}" for t in row.runs_tokens_per_s) if repeats > 1 else "")
            )
        lines += [
            "",
            "peak MiB: CUDA's max_memory_allocated; on a CPU the rise of the process's peak resident memory over the"
            " run. recompiles: graphs compiled after the first step (0: compiled once).",
        ]
        return "\n".join(lines)


def _run(name: str, mode: str, overrides: Sequence[str], steps: int, warmup: int) -> dict[str, Any]:
    """One (model, mode) run, in the process it is called in; returns plain figures."""
    run_overrides = [*MODELS[name], *overrides, f"compile.enabled={mode == 'compiled'}"]
    cfg, plan = prepare(run_overrides, steps, warmup)
    device = device_of(plan)
    datamodule = LMDataModule(cfg.data, cfg.seed)
    datamodule.setup("fit")
    counter = GraphCounter()
    baseline = _reset_peak(device)
    run = run_curry_loop(cfg, datamodule, plan, "none", warmup, callbacks=[counter])
    peak = _peak(device, baseline)
    return _describe(name, cfg, device, run, peak, counter.at_end, counter.at_end - (counter.after_first or 0))


def _describe(
    name: str, cfg: Any, device: torch.device, run: LoopRun, peak: int, graphs: int, recompiles: int
) -> dict[str, Any]:
    """A run's plain figures."""
    dtype = compute_dtype_name(cfg)
    with torch.device("meta"):
        parameters = Llama(cfg.model).num_parameters()
    return {
        "run": run,
        "peak": peak,
        "graphs": graphs,
        "recompiles": recompiles,
        "parameters": parameters,
        "flops_per_token": model_flops_per_token(cfg),
        "config": {
            "device": str(device),
            "precision": str(cfg.trainer.precision),
            "backend": cfg.compile.backend,
            "compute_dtype": dtype,
        },
    }


class _CompileClock(StepClock):
    """A rank's step clock and graph counts (``runner.fit_layouts``' measurement on each rank)."""

    def __init__(self, cfg: Any) -> None:
        self.graph_counter = GraphCounter()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        super().__init__(device, "none", [self.graph_counter])  # the clock waits for the device

    def result(self, trainer: pl.Trainer) -> dict[str, Any]:
        step_ends, losses = super().result(trainer)
        counter = self.graph_counter
        return {
            "step_ends": step_ends,
            "losses": losses,
            "graphs": counter.at_end,
            "recompiles": counter.at_end - (counter.after_first or 0),
        }


def _run_ranks(
    name: str, layout: Sequence[str], mode: str, overrides: Sequence[str], steps: int, warmup: int, pools: Pools
) -> dict[str, Any]:
    """One (model, layout, mode) run on several ranks, in ``pools``' workers (a worker's peak memory is not
    the run's alone: 0). The step clock is the slowest rank's."""
    cfg = compose([*MODELS[name], *overrides, *layout, f"compile.enabled={mode == 'compiled'}"])
    OmegaConf.update(cfg, "trainer.max_steps", warmup + steps)
    OmegaConf.update(cfg, "trainer.limit_val_batches", 0)
    OmegaConf.update(cfg, "trainer.enable_progress_bar", False)
    plan = check(cfg)
    (outcome,) = fit_layouts([(cfg, plan)], _CompileClock, pools)
    if outcome.error is not None:
        raise RuntimeError(f"{name}, {' '.join(layout)}, {mode}: {outcome.error}")
    slowest = max(outcome.ranks, key=lambda rank: rank["step_ends"][-1] - rank["step_ends"][warmup - 1])
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    run = LoopRun("curry", 0, warmup, tokens_per_step, slowest["step_ends"], outcome.ranks[0]["losses"])
    single = _describe(
        name, cfg, device_of(plan), run, 0, slowest["graphs"], max(r["recompiles"] for r in outcome.ranks)
    )
    return single


def _measured_peaks(
    overrides: Sequence[str], models: Sequence[str], layouts: Optional[dict[str, Sequence[str]]]
) -> dict[str, float]:
    """The matmul peak of the device the runs use, for each compute dtype they use, probed here before any
    run (the runs' tokens/s are the machine's, whatever the ranks: one peak for all)."""
    peaks: dict[str, float] = {}
    for name in models:
        for layout in (layouts or {"": ()}).values():
            cfg = compose([*MODELS[name], *overrides, *layout])
            dtype = compute_dtype_name(cfg)
            if dtype not in peaks:
                peaks[dtype] = matmul_flops(device_of(check(cfg)), DTYPES[dtype])
    return peaks


def compile_bench(
    overrides: Sequence[str] = (),
    steps: int = 5,
    warmup: int = 2,
    models: Sequence[str] = tuple(MODELS),
    layouts: Optional[dict[str, Sequence[str]]] = None,
    repeats: int = 1,
) -> CompileResult:
    """Each of ``models`` eager, then compiled, in one process each in a fresh process (module docstring);
    with ``layouts`` (name -> overrides), in each layout: a run of several ranks in a pool of workers.
    ``repeats`` > 1 alternates eager and compiled runs that many times and reports, for each mode, the run
    of median tokens/s (the others' tokens/s beside it): a machine whose speed drifts between runs moves
    one run of a pair, not the median of several."""
    context = multiprocessing.get_context("spawn")
    rows: list[tuple[CompileRow, dict[str, Any]]] = []
    peaks = _measured_peaks(overrides, models, layouts)
    with Pools() as pools:
        for name in models:
            for layout_name, layout in (layouts or {"": ()}).items():
                label = f"{name}, {layout_name}" if layout_name else name
                several = bool(layout) and check(compose([*MODELS[name], *overrides, *layout])).world_size > 1
                runs: dict[str, list[tuple[CompileRow, dict[str, Any]]]] = {"eager": [], "compiled": []}
                for _ in range(repeats):
                    for mode in ("eager", "compiled"):
                        if several:
                            figures = _run_ranks(name, tuple(layout), mode, overrides, steps, warmup, pools)
                        else:
                            with context.Pool(1) as pool:
                                figures = pool.apply(_run, (name, mode, [*overrides, *layout], steps, warmup))
                                pool.close()  # the worker leaves by itself (the pool's exit would kill it)
                                pool.join()
                        run = figures["run"]
                        row = CompileRow(
                            label, figures["parameters"], mode, run, figures["peak"], figures["recompiles"], 0.0
                        )
                        row.graphs = figures["graphs"]
                        figures["config"]["measured_peak"] = peaks[figures["config"]["compute_dtype"]]
                        row.mfu = run.tokens_per_s * figures["flops_per_token"] / figures["config"]["measured_peak"]
                        runs[mode].append((row, figures["config"]))
                (eager, _), (compiled, config) = (_median_run(runs[mode]) for mode in ("eager", "compiled"))
                compiled.max_loss_rel_diff = max(
                    abs(a - b) / abs(b)
                    for row, _ in runs["compiled"]
                    for a, b in zip(row.run.losses, eager.run.losses, strict=True)
                )
                compiled.recompiles = max(row.recompiles for row, _ in runs["compiled"])
                rows += [(eager, config), (compiled, config)]
    result = CompileResult(
        config={"overrides": list(overrides), "steps": steps, "warmup": warmup, "repeats": repeats, **rows[0][1]}
    )
    result.rows = [row for row, _ in rows]
    return result


def _median_run(runs: list[tuple[CompileRow, dict[str, Any]]]) -> tuple[CompileRow, dict[str, Any]]:
    """The run of median tokens/s (the lower of the middle two for an even count), with every run's
    tokens/s in run order."""
    ranked = sorted(runs, key=lambda item: item[0].run.tokens_per_s)
    row, config = ranked[(len(ranked) - 1) // 2]
    row.runs_tokens_per_s = [item[0].run.tokens_per_s for item in runs]
    return row, config
