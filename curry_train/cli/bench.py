"""Benchmarks: curry-train's loop against a hand-written one, per-rank memory, layouts side by side,
the pipeline bubble, context-parallel attention.

    python scripts/bench.py [--steps N] [--warmup W] [--repeats R] [--loggers csv|none] [--json PATH] [overrides...]
    python scripts/bench.py --memory [--json PATH] [overrides...]
    python scripts/bench.py --layouts [--layout 'NAME: OVERRIDES']... [--steps N] [--json PATH] [overrides...]
    python scripts/bench.py --compare [--layout 'NAME: OVERRIDES']... [--steps N] [--json PATH] [overrides...]
    python scripts/bench.py --context [--seq-len S] [--cp 1,2,4] [--pattern ring] [--json PATH]
    python scripts/bench.py --pipeline [--pp P] [--microbatches 4,8] [--kinds K,...] [--steps N] [--json PATH]
                            [overrides...]
    python scripts/bench.py --compile [--models debug,llama-100m] [--steps N] [--warmup W] [--json PATH]
                            [overrides...]

Arguments without a leading ``--`` are Hydra overrides, exactly as for ``train.py``; the default is
the default config (the debug model on the bundled corpus). What each mode measures, and how, is
documented where it is measured:

* default: curry-train's training loop against a minimal hand-written PyTorch loop on one device:
  tokens/s, the ratio, and the per-step losses, which must agree, and MFU against the device's measured
  matmul peak and against the hardware table's (``curry_train/validation/throughput.py``, ``peak_flops.py``);
* ``--compile``: eager and ``compile.enabled=true`` side by side for the debug model and a ~100M-parameter
  Llama: tokens/s, peak memory, MFU, recompilations after the first step, the losses' difference
  (``curry_train/validation/compile_bench.py``);
* ``--memory``: per rank, the model state against ZeRO's formula, the parameters held after forward
  and the peak activations; on one process, the activations of each ``parallel.recompute`` setting
  (``curry_train/validation/memory_bench.py``, ``curry_train/validation/memory.py``);
* ``--layouts``, ``--compare``: several layouts of one run side by side: tokens/s and memory per rank;
  with ``--compare`` also ms/step, MFU, peak memory, bytes per collective and the pipeline bubble
  (``curry_train/validation/layouts.py``, ``curry_train/validation/comm.py``);
* ``--context``: context-parallel attention's activation memory per rank, exposed communication and
  tokens/s for each cp at one sequence length (``curry_train/validation/context.py``);
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
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from curry_train.cli.common import error_line, fail, is_config_error
from curry_train.config import ConfigError, compose
from curry_train.layout.pipeline import canonical_kind
from curry_train.options import CP_PATTERNS as PATTERNS
from curry_train.options import PIPELINE_SCHEDULES as KINDS
from curry_train.planning.step_time import flops_parameters, flops_per_token  # noqa: F401  (re-exported for tests)
from curry_train.validation.bubble import BubbleRow, bubble_table, check_bubble_runs, measure_bubbles
from curry_train.validation.compile_bench import MODELS as COMPILE_MODELS
from curry_train.validation.compile_bench import compile_bench
from curry_train.validation.context import context_table, measure_context
from curry_train.validation.layouts import (  # noqa: F401
    COMPARE_LAYOUTS,
    LAYOUTS,
    layouts_bench,
    parse_layout,
    parse_layouts,
)
from curry_train.validation.layouts_report import LayoutRow, LayoutsResult  # noqa: F401
from curry_train.validation.memory_bench import MemoryResult, memory_bench  # noqa: F401
from curry_train.validation.throughput import BenchResult, LoopRun, bench  # noqa: F401

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
            f"model={c['model']} ({c['n_layers']} blocks)  P={c['pp']} processes, one thread each, on {c['cores']} "
            "cores;"
            f" micro-batch {c['micro_batch_size']} x {c['seq_len']} tokens; {c['steps']} timed steps per row",
            "bubble: each rank's idle share of a step, 1 - (time in forward, backward, weight-gradient chunks and "
            "the loss)"
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
    overrides: Sequence[str] = (),
    pp: int = 2,
    microbatches: Sequence[int] = (4, 8),
    steps: int = 5,
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


@dataclass
class ContextResult:
    rows: list
    seq_len: int

    def table(self) -> str:

        return (
            f"context parallel attention (ContextParallelAttention), one sequence of {self.seq_len} tokens, "
            "8 heads x 64, 2 key/value heads, fwd+bwd, one thread per rank:\n"
            + context_table(self.rows)
            + "\nactivations: peak of one forward+backward by PyTorch's memory tracker (the op's saved shards and"
            " its key/value blocks in flight); exposed comm: time waiting for a block after its compute, share of"
            " the op's time (the rest of each transfer overlaps compute)."
        )

    def to_dict(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "rows": [row.to_dict() for row in self.rows]}


def context_bench(seq_len: int, cps: Sequence[int], pattern: str, steps: int) -> ContextResult:
    """Attention memory per rank and tokens/s for each cp at one sequence length."""

    if pattern not in PATTERNS:
        raise ConfigError(f"--pattern {pattern}: expected one of {', '.join(PATTERNS)}")
    for cp in cps:
        if cp < 1 or seq_len % (2 * cp):
            raise ConfigError(f"--cp {cp}: the sequence ({seq_len}) must divide into 2 x cp chunks")

    return ContextResult(rows=measure_context(seq_len, cps, pattern, steps=steps), seq_len=seq_len)


DEFAULT_STEPS = {"throughput": 20, "layouts": 10, "compare": 2, "pipeline": 5, "context": 3, "compile": 5}


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
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them, at least 1 (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="[hand, curry] rounds; medians reported (default 3)")
    parser.add_argument("--loggers", choices=("csv", "none"), default="csv", help="curry loop's loggers (default csv)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    mode = parser.add_mutually_exclusive_group()
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
        "--compile",
        action="store_true",
        help="eager and compiled training side by side: tokens/s, peak memory, MFU, recompilations",
    )
    parser.add_argument(
        "--models",
        type=_models,
        default=list(COMPILE_MODELS),
        metavar="MODEL[,MODEL...]",
        help=f"with --compile: the models (default {','.join(COMPILE_MODELS)})",
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
        "compare"
        if args.compare
        else "layouts"
        if args.layouts or args.layout
        else "pipeline"
        if args.pipeline
        else "context"
        if args.context
        else "compile"
        if args.compile
        else "throughput"
    )
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
        elif mode_name == "compile":
            result = compile_bench(args.overrides, steps, args.warmup, args.models)
        elif mode_name == "pipeline":
            result = pipeline_bench(args.overrides, args.pp, args.microbatches, steps, args.kinds)
        else:
            result = bench(args.overrides, steps, args.warmup, args.repeats, args.loggers, progress=True)
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
