"""Layouts measured side by side (``scripts/bench.py --layouts``, ``--compare``).

``--memory`` is in ``memory_bench.py``.

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
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from curry_train.config import ConfigError, compose
from curry_train.config.checks import check, pipeline_microbatches
from curry_train.config.schema import ParallelConfig
from curry_train.layout.pipeline import stages_per_rank
from curry_train.model.config import head_dim
from curry_train.planning.advise import estimate
from curry_train.planning.layout import current_layout
from curry_train.planning.layout import parse_layout as parse_layout_string
from curry_train.planning.step_time import bubble_formula, flops_parameters, flops_per_token
from curry_train.validation.defaults import COMPARE_LAYOUTS, LAYOUT_KEYS, LAYOUTS
from curry_train.validation.layout_memory import measure_layouts
from curry_train.validation.layouts_report import LayoutRow, LayoutsResult

# ----------------------------------------------------------------------------------------------
# --layouts


# The layouts compared by default: name -> the overrides that make it. Everything else (model,
# data, precision) comes from the command line, the same for every layout.
def parse_layout(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"NAME: override override ..."`` (or just the overrides, which then name the layout): a layout
    string (``planning.layout.parse_layout``), so ``parallel`` options may come first and
    ``tp.size=4`` stands for ``parallel.tp.size=4``. The name and the Hydra overrides."""
    layout = parse_layout_string(spec, f"--layout {spec!r}")
    return layout.name, layout.hydra_overrides()


def parse_layouts(specs: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each ``--layout``, by name; a name given twice is an error (the second would replace the first)."""
    layouts: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        name, overrides = parse_layout(spec)
        if name in layouts:
            raise ConfigError(f"--layout {spec!r}: a layout named {name!r} is already given")
        layouts[name] = overrides
    return layouts


def _bubble(cfg: DictConfig, degrees: Any) -> tuple[Optional[float], str]:
    """The bubble formula of a pipelined layout (planning/step_time.py) and its text; ``-`` without pp."""
    pp = ParallelConfig.of(cfg).pp
    if pp is None or degrees.pp == 1:
        return None, "-"
    formula = bubble_formula(
        pp.schedule, degrees.pp, pipeline_microbatches(cfg, degrees), stages_per_rank(pp.schedule, pp.virtual_stages)
    )
    return formula, f"{formula:.1%}" if formula is not None else "~0"


def layouts_bench(
    overrides: Sequence[str] = (),
    layouts: Optional[dict[str, Sequence[str]]] = None,
    steps: int = 10,
    compare: bool = False,
) -> LayoutsResult:
    """Each layout (default ``LAYOUTS``) with the common ``overrides``, through the real training path
    (``layout_memory.measure_layouts``): model state and activations per rank, then ``steps`` timed steps.
    ``compare`` (default layouts ``COMPARE_LAYOUTS``): one more step whose collectives each rank counts,
    and each row's MFU (on a GPU), peak memory and pipeline bubble: see the module docstring."""
    layouts = dict((COMPARE_LAYOUTS if compare else LAYOUTS) if layouts is None else layouts)
    if not layouts:
        raise ConfigError("no layouts to compare")
    if steps < 1:
        raise ValueError(f"--steps={steps} must be at least 1")
    for override in overrides:
        if override.partition("=")[0] in LAYOUT_KEYS:
            raise ConfigError(
                f"{override}: each layout sets {', '.join(LAYOUT_KEYS[::2])} itself; pass the layouts"
                " with --layout 'NAME: overrides...' and leave these out of the common overrides"
            )
    runs = {name: [*overrides, *layout] for name, layout in layouts.items()}
    cfgs = {name: compose(run) for name, run in runs.items()}
    plans = [check(cfg) for cfg in cfgs.values()]  # every layout fails fast, before any process starts
    shapes = {
        (
            cfg.model.name,
            cfg.data.global_batch_size,
            cfg.data.seq_len,
            cfg.data.micro_batch_size,
            OmegaConf.to_yaml(cfg.model),
        )
        for cfg in cfgs.values()
    }
    if len(shapes) != 1:
        raise ConfigError(
            f"the layouts differ in model or batch ({sorted(shape[:4] for shape in shapes)}): they must"
            " compare the same run"
        )
    memories = measure_layouts(list(runs.values()), timed_steps=steps, count_comm=compare)
    first = next(iter(cfgs.values()))
    tokens_per_step = first.data.global_batch_size * first.data.seq_len
    compare_config: dict[str, Any] = {}
    if compare:
        n_flops = flops_parameters(first.model)
        width = first.model.n_heads * head_dim(first.model)
        per_token = flops_per_token(n_flops, first.model.n_layers, width, first.data.seq_len)
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
        tp = ParallelConfig.of(cfg).tp
        sequence_parallel = bool(tp is not None and tp.sequence_parallel)
        row = LayoutRow(name, memory, sequence_parallel, tokens_per_step)
        if compare:
            estimated = estimate(cfg, current_layout(cfg)).memory
            row.estimated_peak = estimated["total"] - estimated["reserved"]
            row.flops_per_step = compare_config["flops_per_step"]
            row.peak_flops = compare_config["peak_flops"]
            row.bubble, row.bubble_text = _bubble(cfg, plan.dims)
        result.rows.append(row)
    return result
