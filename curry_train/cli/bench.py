"""Benchmarks: curry-train's loop against a hand-written one, per-rank memory, layouts side by side,
the pipeline bubble, context-parallel attention.

    python scripts/bench.py [--steps N] [--warmup W] [--repeats R] [--loggers csv|none] [--json PATH] [overrides...]
    python scripts/bench.py --memory [--json PATH] [overrides...]
    python scripts/bench.py --layouts [--layout 'NAME: OVERRIDES']... [--steps N] [--json PATH] [overrides...]
    python scripts/bench.py --compare [--layout 'NAME: OVERRIDES']... [--steps N] [--json PATH] [overrides...]
    python scripts/bench.py --context [--seq-len S] [--cp 1,2,4] [--pattern ring] [--json PATH]
    python scripts/bench.py --pipeline [--pp P] [--microbatches 4,8] [--kinds K,...] [--steps N] [--json PATH]
                            [overrides...]
    python scripts/bench.py --loop [--steps N] [--warmup W] [--repeats R] [--progress-bar] [--json PATH] [overrides...]
    python scripts/bench.py --compile [--models debug,llama-100m] [--every-layout | --layout 'NAME: OVERRIDES'...]
                            [--steps N] [--warmup W] [--repeats R] [--json PATH]
                            [overrides...]
    python scripts/bench.py --estimate [--models debug,llama-100m] [--steps N] [--hardware-out PATH] [--json PATH]
    python scripts/bench.py --checkpoint [--models debug,llama-100m] [--steps N] [--every K] [--json PATH]
                            [overrides...]

Arguments without a leading ``--`` are Hydra overrides, exactly as for ``train.py``; the default is
the default config (the debug model on the bundled corpus). What each mode measures, and how, is
documented where it is measured:

* default: curry-train's training loop against a minimal hand-written PyTorch loop on one device:
  tokens/s, the ratio, and the per-step losses, which must agree, and MFU against the device's measured
  matmul peak and against the hardware table's (``curry_train/validation/throughput.py``, ``peak_flops.py``);
* ``--loop``: what the loop costs besides the model: on a tiny model (compute negligible), curry-train's real
  loop, the hand step inside Lightning's bare loop, and the hand-written loop, alternating; ms/step and its
  parts (data, forward+backward, optimizer, logging, checkpoint bookkeeping, hooks and loop)
  (``curry_train/validation/loop_bench.py``);
* ``--compile``: eager and ``compile.enabled=true`` side by side for the debug model and a ~100M-parameter
  Llama: tokens/s, peak memory, MFU, recompilations after the first step, the losses' difference; with
  ``--every-layout`` in each of 1 process, dp 2, fsdp 2, tp 2 and fsdp 2 x tp 2 (or the ``--layout`` given)
  (``curry_train/validation/compile_bench.py``);
* ``--memory``: per rank, the model state against ZeRO's formula, the parameters held after forward
  and the peak activations; on one process, the activations of each ``parallel.recompute`` setting
  (``curry_train/validation/memory_bench.py``, ``curry_train/validation/memory.py``);
* ``--layouts``, ``--compare``: several layouts of one run side by side: tokens/s and memory per rank;
  with ``--compare`` also ms/step, MFU, peak memory, bytes per collective and the pipeline bubble
  (``curry_train/validation/layouts.py``, ``curry_train/validation/comm.py``);
* ``--context``: context-parallel attention's activation memory per rank, exposed communication and
  tokens/s for each cp at one sequence length (``curry_train/validation/context.py``);
* ``--estimate``: this machine probed (matmul rate, memory bandwidth, an op's cost, attention's rate, gloo's
  bandwidth and latency) into a hardware config, then the step-time model's estimate against measured steps
  of dp, fsdp, tp, pp and cp on 2 ranks, for each model (``curry_train/validation/estimate_bench.py``);
* ``--checkpoint``: what a save costs training, for each model under 1 process and fsdp 2, with saves
  that stall training and in the background (``checkpoint.async_mode=thread``): how long a save holds
  training, the write's time and bytes, and the step that overlaps a background write against a plain
  one (``curry_train/validation/checkpoint_bench.py``);
* ``--pipeline``: every schedule kind (``gpipe``, ``1F1B``, ``interleaved``, ``interleaved_zb``,
  ``zbv``, ``dualpipev``) on ``P`` processes (default 2, one thread each) at each micro-batch count
  ``M`` (default 4 and 8), on the model of the overrides with ``model.n_layers=8`` by default (equal
  stages for 1 and 2 stages per rank), and prints per kind the bubble formula next to the measured
  bubble (each rank's idle share of a step: 1 - time computing / step time), ms/step and tokens/s,
  over ``N`` timed steps (default 5) after 2 warm-up steps. See ``curry_train/validation/bubble.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from curry_train.cli.common import error_line, fail, is_config_error
from curry_train.layout.pipeline import canonical_kind
from curry_train.options import PIPELINE_SCHEDULES as KINDS
from curry_train.validation.defaults import COMPARE_LAYOUTS, COMPILE_LAYOUTS, COMPILE_MODELS, LAYOUTS


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 4,8") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: micro-batch counts must be positive")
    return counts


def _models(text: str) -> list[str]:
    models = [part.strip() for part in text.split(",")]
    unknown = [model for model in models if model not in COMPILE_MODELS]
    if unknown or not models:
        raise argparse.ArgumentTypeError(f"{text!r}: expected models among {', '.join(COMPILE_MODELS)}")
    return models


def _kinds(text: str) -> list[str]:

    kinds = [part.strip() for part in text.split(",")]
    for kind in kinds:
        try:
            canonical_kind(kind)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return kinds


def _measure(args: argparse.Namespace, mode: str, steps: int) -> Any:
    """Run the mode's measurement; torch and Lightning load here, once the arguments parsed."""
    # each mode imports what it measures with here, after --help and a bad argument answered
    from curry_train.runner import quiet_lightning  # noqa: PLC0415

    quiet_lightning()
    if mode == "memory":
        from curry_train.validation.memory_bench import memory_bench  # noqa: PLC0415

        return memory_bench(args.overrides)
    if mode in ("layouts", "compare"):
        from curry_train.validation.layouts import layouts_bench, parse_layouts  # noqa: PLC0415

        layouts = parse_layouts(args.layout) if args.layout else None
        return layouts_bench(args.overrides, layouts, steps, compare=mode == "compare")
    if mode == "context":
        from curry_train.validation.context import context_bench  # noqa: PLC0415

        return context_bench(args.seq_len, args.cp, args.pattern, steps)
    if mode == "compile":
        from curry_train.validation.compile_bench import compile_bench  # noqa: PLC0415
        from curry_train.validation.layouts import parse_layouts  # noqa: PLC0415

        layouts = parse_layouts(args.layout) if args.layout else COMPILE_LAYOUTS if args.every_layout else None
        return compile_bench(args.overrides, steps, args.warmup, args.models, layouts, args.repeats or 1)
    if mode == "estimate":
        from curry_train.validation.estimate_bench import estimate_bench  # noqa: PLC0415

        return estimate_bench(args.overrides, args.models, steps, args.hardware_out)
    if mode == "checkpoint":
        from curry_train.validation.checkpoint_bench import checkpoint_bench  # noqa: PLC0415

        return checkpoint_bench(args.overrides, args.models, steps, args.every)
    if mode == "loop":
        from curry_train.validation.loop_bench import loop_bench  # noqa: PLC0415

        return loop_bench(args.overrides, steps, args.warmup, args.repeats, progress_bar=args.progress_bar)
    if mode == "pipeline":
        from curry_train.validation.bubble import pipeline_bench  # noqa: PLC0415

        return pipeline_bench(args.overrides, args.pp, args.microbatches, steps, args.kinds)
    from curry_train.validation.throughput import bench  # noqa: PLC0415

    return bench(args.overrides, steps, args.warmup, args.repeats, args.loggers, progress=True)


DEFAULT_STEPS = {
    "throughput": 20,
    "layouts": 10,
    "compare": 2,
    "pipeline": 5,
    "context": 3,
    "compile": 5,
    "estimate": 4,
    "checkpoint": 12,
    "loop": 200,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, as for train.py (with --layouts: common to every layout)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per run (default 20; --layouts: 10, after the measured step; --compare: 2;"
        " --pipeline: 5 per row)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps before them, at least 1 (default 2; --loop: 20)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="[hand, curry] rounds, medians reported (default 3); with --compile, eager and compiled runs alternated"
        " this many times, the median run reported (default 1)",
    )
    parser.add_argument("--loggers", choices=("csv", "none"), default="csv", help="curry loop's loggers (default csv)")
    parser.add_argument(
        "--every-layout",
        action="store_true",
        help=f"with --compile: in each of {', '.join(COMPILE_LAYOUTS)} (default: one process)",
    )
    parser.add_argument(
        "--progress-bar", action="store_true", help="with --loop: the progress bar on, as in a run (default off)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--loop",
        action="store_true",
        help="the loop's own cost: curry-train's loop, Lightning's bare loop and a hand-written one on a tiny model, "
        "ms/step split into data, forward+backward, optimizer, logging, checkpoint, hooks+loop",
    )
    mode.add_argument(
        "--memory",
        action="store_true",
        help="per-rank memory of the layout instead of throughput (--steps, --warmup, --repeats, --loggers unused)",
    )
    mode.add_argument(
        "--layouts",
        action="store_true",
        help=f"tokens/s and per-rank memory of several layouts of the same run, side by side (default: "
        f"{', '.join(LAYOUTS)}; see --layout)",
    )
    mode.add_argument(
        "--compare",
        action="store_true",
        help=f"--layouts with MFU, ms/step, peak memory per rank, communication volume per collective and the "
        f"pipeline bubble (default: {', '.join(COMPARE_LAYOUTS)}; see --layout)",
    )
    mode.add_argument(
        "--pipeline",
        action="store_true",
        help="the measured pipeline bubble next to its formula, and tokens/s, for every schedule kind",
    )
    mode.add_argument(
        "--context",
        action="store_true",
        help="context-parallel attention: per-rank activation memory, exposed communication and tokens/s for each cp",
    )
    mode.add_argument(
        "--estimate",
        action="store_true",
        help="probe this machine into a hardware config, then the step-time estimate against measured steps"
        " of dp, fsdp, tp, pp and cp on 2 ranks",
    )
    mode.add_argument(
        "--checkpoint",
        action="store_true",
        help="what a save costs training, stalled and in the background, for 1 process and fsdp 2",
    )
    mode.add_argument(
        "--compile",
        action="store_true",
        help="eager and compiled training side by side: tokens/s, peak memory, MFU, recompilations",
    )
    parser.add_argument(
        "--models",
        type=_models,
        default=list(COMPILE_MODELS),
        metavar="MODEL[,MODEL...]",
        help=f"with --compile, --estimate or --checkpoint: the models (default {','.join(COMPILE_MODELS)})",
    )
    parser.add_argument(
        "--every", type=int, default=3, help="with --checkpoint: save every this many steps (default 3)"
    )
    parser.add_argument(
        "--hardware-out",
        type=Path,
        default=Path("hardware_probed.yaml"),
        help="with --estimate: where to write the probed hardware config (default hardware_probed.yaml)",
    )
    parser.add_argument("--seq-len", type=int, default=8192, help="with --context: the sequence length (default 8192)")
    parser.add_argument(
        "--cp", type=_counts, default=[1, 2, 4], metavar="CP[,CP...]", help="with --context: cp sizes (default 1,2,4)"
    )
    parser.add_argument(
        "--pattern", default="ring", help="with --context: ring, double_ring or alltoall (default ring)"
    )
    parser.add_argument(
        "--layout",
        action="append",
        default=None,
        metavar="'NAME: OVERRIDES'",
        help="with --layouts or --compare, a layout to compare instead of the defaults (repeatable), e.g. "
        "--layout 'tp4: parallel=tp parallel.tp.size=4 trainer.devices=4'",
    )
    parser.add_argument("--pp", type=int, default=2, help="with --pipeline: pipeline ranks P (default 2)")
    parser.add_argument(
        "--microbatches",
        type=_counts,
        default=[4, 8],
        metavar="M[,M...]",
        help="with --pipeline: micro-batch counts M, each a row per kind (default 4,8)",
    )
    parser.add_argument(
        "--kinds",
        type=_kinds,
        default=list(KINDS),
        metavar="KIND[,KIND...]",
        help=f"with --pipeline: schedule kinds (default all: {','.join(KINDS)})",
    )
    args = parser.parse_args(argv)
    mode_name = (
        "compile"
        if args.compile
        else "compare"
        if args.compare
        else "layouts"
        if args.layouts or args.layout
        else "pipeline"
        if args.pipeline
        else "context"
        if args.context
        else "compile"
        if args.compile
        else "estimate"
        if args.estimate
        else "checkpoint"
        if args.checkpoint
        else "loop"
        if args.loop
        else "throughput"
    )
    steps = DEFAULT_STEPS[mode_name] if args.steps is None else args.steps
    if args.warmup is None:
        args.warmup = 20 if mode_name == "loop" else 2
    if args.repeats is None and mode_name != "compile":
        args.repeats = 3
    if steps < 1 or args.warmup < 1 or (args.repeats is not None and args.repeats < 1):
        parser.error("--steps, --warmup and --repeats must be at least 1")
    if args.every_layout and not args.compile:
        parser.error("--every-layout goes with --compile")
    if args.layout and (args.memory or args.pipeline or args.context):
        parser.error("--layout goes with --layouts, --compare or --compile")
    try:
        result = _measure(args, "memory" if args.memory else mode_name, steps)
    except Exception as error:
        if not is_config_error(error):
            raise
        return fail("curry-bench", error_line(error))
    print(result.table())
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"json: {args.json.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
