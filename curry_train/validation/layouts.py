"""Layouts measured side by side (``scripts/bench.py --memory``, ``--layouts``, ``--compare``).

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
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from curry_train.config import ConfigError, compose
from curry_train.config.checks import check, pipeline_microbatches
from curry_train.config.schema import ParallelConfig
from curry_train.planning.advise import estimate
from curry_train.planning.layout import current_layout
from curry_train.planning.layout import parse_layout as parse_layout_string
from curry_train.planning.step_time import bubble_formula, flops_parameters, flops_per_token
from curry_train.primitives.pipeline_schedule import stages_per_rank
from curry_train.validation.comm import COLLECTIVES
from curry_train.validation.memory import MEASURED_STEP, LayoutMemory, measure_layouts
from curry_train.validation.throughput import StepRate
from curry_train.validation.whitebox import reference_overrides

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
        shards = 1 if m.mode in ("dp", "no_shard") else m.dp * m.cp // m.replicas
        lines = [
            f"layout: {' '.join(m.overrides) or '(defaults)'}",
            f"model={m.model}: P = {m.parameters:,} parameters"
            + (
                f", {m.tp_parameters:,} on each of tp = {m.tp} tensor-parallel ranks (P in the formula)"
                if m.tp > 1
                else ""
            )
            + (
                f"; d = {m.dp} data-parallel x {m.cp} context-parallel ranks"
                if m.cp > 1
                else f"; d = {m.dp} data-parallel ranks"
            )
            + f" ({m.mode}, {m.mixed_precision}, state sharded over {shards})",
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
            f"forward (gathered units and their shards). activations: peak of one forward+backward of {mb} x {seq} "
            "tokens.",
            *(
                (
                    "pipeline: a rank holds its stages only, so P is per rank: "
                    + ", ".join(f"pp rank {i}: {n:,}" for i, n in enumerate(m.stage_parameters))
                    + "; activations are not measured (a stage cannot run a micro-batch alone).",
                )
                if m.pp > 1
                else ()
            ),
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
COMPARE_LAYOUTS = {
    "dp": LAYOUTS["dp"],
    "fsdp": ("parallel=fsdp", "trainer.devices=2"),
    **{name: layout for name, layout in LAYOUTS.items() if name != "dp"},
}


def _count(value: Optional[int]) -> str:
    return f"{value:,}" if value is not None else "-"


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


@dataclass
class LayoutRow(StepRate):
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
    estimated_peak: Optional[int] = None  # planning.advise's per-rank bytes, less its reserved runtime

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

    @property
    def cuda_peak(self) -> Optional[int]:
        """The most any rank's CUDA allocator held in that forward+backward (None: not on a GPU)."""
        peaks = [r.get("cuda_peak") for r in self.memory.ranks]
        return max(peaks) if peaks and all(p is not None for p in peaks) else None

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
            "cuda_peak": self.cuda_peak,
            "estimated_peak": self.estimated_peak,
            "model_state": self.state("total"),
            "comm": {name: {key: self.comm(name, key) for key in ("ops", "elements", "bytes")} for name in COLLECTIVES},
            "ddp_bucket_bytes": self.ddp_bucket_bytes,
            "pp": self.memory.pp,
            "cp": self.memory.cp,
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
        return next(
            (
                other
                for other in self.rows
                if not other.sequence_parallel
                and other.memory.tp == row.memory.tp
                and other.memory.dp == row.memory.dp
                and other.memory.mode == row.memory.mode
            ),
            None,
        )

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
                {
                    **row.to_dict(),
                    "sp_activation_ratio": self.sp_ratio(row),
                    **(row.compare_dict() if self.compare else {}),
                }
                for row in self.rows
            ],
        }

    def table(self) -> str:
        if self.compare:
            return self.compare_table()
        c = self.config
        lines = [
            f"model={c['model']} ({c['parameters']:,} params)  device={c['device']}  cores={c['cores']} (threads per "
            "rank:"
            f" cores // ranks, at least 1)  "
            f"global_batch_size={c['global_batch_size']} x seq_len={c['seq_len']} = {c['tokens_per_step']} "
            "tokens/step; "
            f"activations of one micro-batch of {c['micro_batch_size']} x {c['seq_len']} tokens",
            f"tokens/s: the {c['steps']} steps after the measured step {MEASURED_STEP}, in the same run (slowest "
            "rank's clock);"
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
                f"{row.name:<10}{row.ranks:>6}{f'{m.dp} x {m.tp}':>9}{row.tokens_per_s:>10,.0f}"
                f"{row.state('params'):>12,}"
                f"{row.state('grads'):>12,}{row.state('optimizer'):>12,}{row.state('total'):>12,}{formula:>12}"
                f"{fraction:>8}{_count(row.activations):>13}{f'{ratio:.3f}' if ratio is not None else '-':>10}"
            )
        tp_rows = {row.memory.tp: row.memory.tp_parameters for row in self.rows if row.memory.tp > 1}
        lines += [
            "",
            "formula: ZeRO's for the layout's data-parallel mode (DDP 16P, ZeRO-3 16P/d; see --memory) with P the "
            "parameters"
            " one tensor-parallel rank holds"
            + "".join(f"; tp={tp}: {n:,} of {c['parameters']:,}" for tp, n in sorted(tp_rows.items()))
            + " (block matmuls, embedding and head split, norms replicated); with pp, of the pipeline rank holding "
            "the most.",
            "ratio above 1: AdamW's 4-byte step counter per parameter tensor, and FSDP2's padding of uneven shards.",
            "vs no SP: activations of a sequence-parallel layout over those of the same layout without it (norms, "
            "residuals",
            "and dropout between the blocks hold 1/tp of the sequence).",
        ]
        if c["cores"] < max(row.ranks for row in self.rows):
            lines.append(
                f"tokens/s: {max(row.ranks for row in self.rows)} processes on {c['cores']} cores: "
                "the layouts with more ranks than cores share them."
            )
        return "\n".join(lines)

    def compare_table(self) -> str:
        c = self.config
        mb = lambda n: f"{n / 1e6:.2f}" if n is not None else "-"  # noqa: E731
        lines = [
            f"model={c['model']} ({c['parameters']:,} params, {c['n_layers']} layers, dim {c['dim']})  "
            f"device={c['device']}"
            f"  cores={c['cores']}  global_batch_size={c['global_batch_size']} x seq_len={c['seq_len']} ="
            f" {c['tokens_per_step']} tokens/step, micro-batches of {c['micro_batch_size']}",
            f"tokens/s, ms/step: the {c['steps']} step{'s' * (c['steps'] > 1)} after the measured step {MEASURED_STEP}"
            " (slowest rank's clock); memory: the most any rank holds;",
            f"comm: the most bytes any rank issued per collective in one whole optimizer step (step"
            f" {MEASURED_STEP + c['steps'] + 1}, counted, not timed); MB = 1e6 bytes",
            "",
            f"{'layout':<10}{'ranks':>6}{'dp x tp x pp x cp':>18}{'tokens/s':>10}{'ms/step':>9}{'MFU':>7}{'peak MB':>9}"
            f"{'est MB':>9}{'state MB':>9}{'acts MB':>9}{'all_reduce':>11}{'all_gather':>11}{'reduce_sc.':>11}"
            f"{'all_to_all':>11}"
            f"{'send+recv':>10}{'broadcast':>10}{'bubble':>8}",
        ]
        for row in self.rows:
            m = row.memory
            mfu = f"{100 * row.mfu:.1f}%" if row.mfu is not None else "-"
            p2p = row.comm("send") + row.comm("recv")
            lines.append(
                f"{row.name:<10}{row.ranks:>6}{f'{m.dp} x {m.tp} x {m.pp} x {m.cp}':>18}{row.tokens_per_s:>10,.0f}"
                f"{row.ms_per_step:>9.1f}{mfu:>7}{mb(row.cuda_peak or row.peak_memory):>9}{mb(row.estimated_peak):>9}"
                f"{mb(row.state('total')):>9}"
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
            if gpu
            else f"MFU '-': the run is on {c['device']}, not a GPU; hardware.peak_bf16_flops is a GPU's "
            f"(hardware={c['hardware']})"
            " or, for hardware=cpu, a rough planning figure.",
            (
                "peak: the CUDA allocator's peak (torch.cuda.max_memory_allocated)"
                if gpu
                else "peak: the memory tracker's total (parameters, gradients, optimizer state, gathered "
                "parameters, activations,"
                " temporaries) at its peak"
            )
            + " in the measured forward+backward of one micro-batch;",
            "est: curry_train.planning's estimate for the layout (scripts/advise.py), less hardware.reserved_bytes: it"
            " budgets gradient accumulation's gradients too;",
            "state: parameters, gradients and optimizer state at the optimizer step; acts: activations' peak.",
            "comm (curry_train/validation/comm.py): the collectives dispatched in the step, bytes of their "
            "operands, not"
            " of the wire: all-gather",
            "its output, all-reduce, reduce-scatter and all-to-all their input, send/recv what they carry (a ring"
            " all-reduce of B bytes over d ranks",
            "sends 2(d-1)/d x B from each). Includes the gradient norm's all-reduce and the loss metrics' sync (a few"
            " bytes each).",
        ]
        for row in self.rows:
            buckets = row.ddp_bucket_bytes
            if buckets is not None:
                lines.append(
                    f"{row.name}: DDP's bucketed all-reduce: {buckets:,} bytes (from its buckets), counted"
                    f" {row.comm('all_reduce'):,} = {row.comm('all_reduce') / (4 * row.memory.parameters):.4f} x 4P."
                )
        if any(row.memory.pp > 1 for row in self.rows):
            lines += [
                "bubble: (P-1)/(M+P-1) for gpipe and 1F1B, (P-1)/(v*M+P-1) for interleaved, ~0 for the zero-bubble"
                " kinds (the formula: --pipeline",
                "measures it). Pipelined layouts: activations and peak not measured (a stage cannot run a"
                " micro-batch alone).",
            ]
        else:
            lines.append("bubble: '-' without pipeline parallelism.")
        if c["cores"] < max(row.ranks for row in self.rows):
            lines.append(
                f"tokens/s: {max(row.ranks for row in self.rows)} processes on {c['cores']} cores: "
                "the layouts with more ranks than cores share them."
            )
        return "\n".join(lines)


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
        tp = ParallelConfig.of(cfg).tp
        sequence_parallel = bool(tp is not None and tp.sequence_parallel)
        row = LayoutRow(name, memory, sequence_parallel, tokens_per_step)
        if compare:
            estimated = estimate(cfg, current_layout(cfg)).memory
            row.estimated_peak = estimated["total"] - estimated["reserved"]
            row.flops_per_step = compare_config["flops_per_step"]
            row.peak_flops = compare_config["peak_flops"]
            row.bubble, row.bubble_text = _bubble(cfg, plan.degrees)
        result.rows.append(row)
    return result
