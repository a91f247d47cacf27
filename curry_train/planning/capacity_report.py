"""A capacity sweep's results: the candidates tried on each layout, what fits, and the table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig

from curry_train.planning.advise import HEADROOM
from curry_train.planning.families import Member
from curry_train.planning.layout import ZERO_NAMES, Layout, LayoutSpec


def size_text(n: Optional[float]) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def layout_label(layout: Layout) -> str:
    """``ZeRO-3 x8 tp=2 SP recompute=full``: the data-parallel mode over its ranks, then the rest."""
    ranks = layout.dp if layout.zero == "none" else layout.shards
    parts = [f"{ZERO_NAMES[layout.zero]} x{ranks}"]
    parts += [f"{name}={getattr(layout, name)}" for name in ("tp", "pp", "cp") if getattr(layout, name) > 1]
    if layout.sequence_parallel:
        parts.append("SP")
    if layout.recompute != "none":
        parts.append(f"recompute={layout.recompute}")
    return " ".join(parts)


@dataclass
class Candidate:
    """A size to try: a family member (model sweep) or a micro-batch (micro-batch sweep)."""

    size: float  # parameters, or the micro-batch: what "largest" compares
    label: str
    overrides: list[str]  # what makes the run this candidate (on top of the user's and the layout's)
    member: Optional[Member] = None
    micro_batch_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "size": self.size, "micro_batch_size": self.micro_batch_size}
        if self.member is not None:
            out["model"] = self.member.to_dict()
        return out


@dataclass
class Result:
    """One candidate on one layout: estimated, and in measure mode also tried."""

    candidate: Candidate
    status: str  # fits | too big | OOM | error | invalid
    estimate_bytes: Optional[int]  # advise.estimate's per-rank total
    capacity_bytes: int
    reason: str = ""  # why it does not fit (or what went wrong)
    measured_peak_bytes: Optional[int] = None  # per rank, the largest over ranks (measure mode)
    memory_breakdown: dict[str, int] = field(default_factory=dict)  # the estimate's parts
    seconds: Optional[float] = None
    stderr_tail: Optional[str] = None
    measurement: Optional[str] = None  # how the peak was taken
    reserved_bytes: int = 0

    @property
    def fits(self) -> bool:
        return self.status == "fits"

    @property
    def memory_bytes(self) -> Optional[int]:
        """Per rank: the measured peak plus the reserved runtime where measured, else the estimate."""
        if self.measured_peak_bytes is not None:
            return self.measured_peak_bytes + self.reserved_bytes
        return self.estimate_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.to_dict(),
            "status": self.status,
            "fits": self.fits,
            "memory_bytes": self.memory_bytes,
            "estimate_bytes": self.estimate_bytes,
            "measured_peak_bytes": self.measured_peak_bytes,
            "capacity_bytes": self.capacity_bytes,
            "reason": self.reason,
            "memory_breakdown": self.memory_breakdown,
            "seconds": self.seconds,
            "measurement": self.measurement,
            "stderr_tail": self.stderr_tail,
        }


@dataclass
class Row:
    """One layout: the largest candidate that fits and the next one up."""

    spec: LayoutSpec
    layout: Layout  # at the run's micro-batch (model sweep) or the largest that fits (micro-batch sweep; else 1)
    overrides: list[str]  # the layout's overrides (layout_overrides)
    largest: Optional[Result] = None
    next: Optional[Result] = None  # the next valid candidate up (None: the largest is the top)
    trials: list[Result] = field(default_factory=list)  # measure mode, in the order they ran
    invalid: list[Result] = field(default_factory=list)
    error: Optional[str] = None
    # the sweep's working state, not reported
    cfg: Optional[DictConfig] = field(default=None, repr=False)  # the run under this layout
    run_overrides: list[str] = field(default_factory=list, repr=False)  # the user's (less the model's) + the layout's
    candidates: list[Candidate] = field(default_factory=list, repr=False)

    @property
    def label(self) -> str:
        return layout_label(self.layout)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.spec.text,
            "parallel": self.spec.options,
            "label": self.label,
            "overrides": self.overrides,
            "sizes": self.layout.sizes(),
            "zero": self.layout.zero,
            "recompute": self.layout.recompute,
            "mixed_precision": self.layout.mixed_precision,
            "micro_batch_size": self.layout.micro_batch_size,
            "world": self.layout.world,
            "largest": self.largest.to_dict() if self.largest else None,
            "next": self.next.to_dict() if self.next else None,
            "trials": [t.to_dict() for t in self.trials],
            "invalid": [r.to_dict() for r in self.invalid],
            "error": self.error,
        }


@dataclass
class Sweep:
    sweep: str
    mode: str
    family: Optional[str]
    cfg: DictConfig
    candidates: list[Candidate]
    rows: list[Row]
    capacity_bytes: int
    recommended: Optional[Row] = None
    command: Optional[str] = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        hw, rec = self.cfg.hardware, self.recommended
        return {
            "sweep": self.sweep,
            "mode": self.mode,
            "family": self.family,
            "model": self.cfg.model.name,
            "hardware": {
                "name": hw.name,
                "nodes": hw.nodes,
                "gpus_per_node": hw.gpus_per_node,
                "memory_bytes": hw.memory_bytes,
                "reserved_bytes": hw.reserved_bytes,
            },
            "headroom": HEADROOM,
            "capacity_bytes": self.capacity_bytes,
            "seq_len": self.cfg.data.seq_len,
            "global_batch_size": self.cfg.data.global_batch_size,
            "micro_batch_size": self.cfg.data.micro_batch_size,
            "candidates": [
                {k: v for k, v in c.to_dict().items() if self.sweep == "micro_batch" or k != "micro_batch_size"}
                for c in self.candidates
            ],
            "rows": [row.to_dict() for row in self.rows],
            "recommended": None
            if rec is None
            else {
                "layout": rec.spec.text,
                "label": rec.label,
                "parallel": rec.spec.options,
                "sizes": rec.layout.sizes(),
                **rec.largest.to_dict(),
                "command": self.command,
            },
            "command": self.command,
            "warnings": self.warnings,
        }

    def table(self) -> str:
        return format_table(self)


# ----------------------------------------------------------------------------------------------
# The report


def _memory_cell(res: Result, mode: str) -> str:
    if mode == "measure" and res.measured_peak_bytes is not None:
        return f"{size_text(res.memory_bytes)} (est. {size_text(res.estimate_bytes)})"
    return size_text(res.memory_bytes)


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_table(result: Sweep) -> str:
    cfg, hw = result.cfg, result.cfg.hardware
    what = f"family {result.family}" if result.sweep == "model" else f"micro-batch of {cfg.model.name}"
    how = "by measurement" if result.mode == "measure" else "by estimate"
    lines = [
        f"capacity sweep ({what}, {how}) on {hw.nodes} x {hw.gpus_per_node} {hw.name}: {size_text(hw.memory_bytes)}"
        f" per device, {size_text(result.capacity_bytes)} usable ({HEADROOM:.0%} headroom);"
        f" seq {cfg.data.seq_len}, global batch {cfg.data.global_batch_size}"
        + (f", vocabulary {cfg.model.vocab_size}" if result.sweep == "model" else ""),
    ]
    model_sweep = result.sweep == "model"
    header = (
        "layout",
        *(("micro",) if model_sweep else ()),
        "largest that fits",
        "per rank" + (" (measured)" if result.mode == "measure" else ""),
        "next size up: why not",
    )
    table = [header]

    def size_of(res: Result) -> str:
        return res.candidate.label if model_sweep else str(res.candidate.micro_batch_size)

    for row in result.rows:
        if row.next is not None:
            why = f"{size_of(row.next)}: " + _short(
                row.next.reason if row.next.status == "too big" else f"{row.next.status}, {row.next.reason}"
            )
        elif row.largest is not None:
            why = "none: the largest of the family" if model_sweep else "none: the whole local batch (global / dp)"
        else:
            why = row.invalid[0].reason if row.invalid else "no candidate"
        if row.error:
            why += f"  [error: {_short(row.error)}]"
        cells = (
            row.label,
            *((str(row.layout.micro_batch_size),) if model_sweep else ()),
            size_of(row.largest) if row.largest else "nothing",
            _memory_cell(row.largest, result.mode) if row.largest else "-",
            why,
        )
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1])
    rec = result.recommended
    if rec is None:
        lines.append("recommended target size: none -- nothing fits any layout; see the next size up of each row")
    else:
        size = rec.largest.candidate.label if model_sweep else f"micro-batch {rec.largest.candidate.micro_batch_size}"
        lines.append(
            f"recommended target size: {size} with {rec.label} ({rec.layout.mixed_precision}):"
            f" {size_text(rec.largest.memory_bytes)} of {size_text(result.capacity_bytes)} per rank"
        )
        lines.append(result.command or "")
    for row in result.rows:
        for trial in row.trials:
            if trial.status == "error" and trial.stderr_tail:
                lines.append(f"--- {row.label} | {trial.candidate.label}: stderr tail ---")
                lines.append(trial.stderr_tail)
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)
