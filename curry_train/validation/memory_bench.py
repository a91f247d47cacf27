"""``bench.py --memory``: the layout of the overrides, per rank (model state against ZeRO's formula of its
mode, the parameters held after forward, the peak activations of one micro-batch), then on one process
the activations of each ``parallel.recompute`` setting and their saving. See
``curry_train/validation/memory.py`` for what is measured when, and how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from curry_train.validation.layout_memory import LayoutMemory, measure_layouts
from curry_train.validation.memory import MEASURED_STEP, count_text
from curry_train.validation.whitebox import reference_overrides

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
                f" {count_text((r.get('after_forward') or {}).get('params')):>12} {count_text(r['activations']):>12}"
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
