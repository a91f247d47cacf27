"""The results of ``bench.py --layouts`` and ``--compare``: one row per layout (memory per rank, tokens/s,
MFU, bytes per collective, the bubble) and the two tables (what each column means is printed under
them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from curry_train.validation.comm import COLLECTIVES
from curry_train.validation.layout_memory import LayoutMemory
from curry_train.validation.memory import MEASURED_STEP, count_text
from curry_train.validation.throughput import StepRate


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
                f"{fraction:>8}{count_text(row.activations):>13}{f'{ratio:.3f}' if ratio is not None else '-':>10}"
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
