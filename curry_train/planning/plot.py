"""Charts, drawn with matplotlib: advise's memory per rank by part (``plot_memory``), and the figure
helpers runs_diff's loss curves use (``new_figure``, ``save``)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from omegaconf import DictConfig

from curry_train.planning.advise import HEADROOM, MEMORY_PARTS, Estimate, gib_text
from curry_train.planning.layout import PlanningError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

GIB = 2**30


def new_figure(width: float = 9.0, height: float = 5.5) -> tuple[Figure, Axes]:
    """A figure with one set of axes on matplotlib's Agg canvas (files only: no display, no pyplot state)."""
    # matplotlib takes about a second to load: only a command that draws pays it, not its --help or a bad argument
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def save(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as PNG to ``path`` (its folder made if missing); the absolute path."""
    path = Path(path).resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", dpi=120)
    except OSError as error:  # a read-only or missing place: one line, as for any bad argument
        raise PlanningError(f"cannot write the plot {path}: {error.strerror or error}") from None
    return path


def plot_memory(cfg: DictConfig, candidates: Sequence[tuple[str, Estimate]], path: Path) -> Figure:
    """Each candidate's memory per rank, in GiB, as a bar stacked by part (``MEMORY_PARTS``, bottom
    up), next to the device's memory and the capacity a recommendation may use (less ``HEADROOM``);
    written as PNG to ``path``. ``candidates``: (step of the walk, its estimate), in the order tried."""
    if not candidates:
        raise ValueError("no candidates to plot")
    hw = cfg.hardware
    figure, axes = new_figure(width=max(9.0, 3.0 + 1.4 * len(candidates)), height=6.0)
    positions = list(range(len(candidates)))
    bottoms = [0.0] * len(candidates)
    for index, part in enumerate(MEMORY_PARTS):
        heights = [est.memory[part] / GIB for _, est in candidates]
        axes.bar(positions, heights, width=0.6, bottom=bottoms, label=part, color=f"C{index}")
        bottoms = [bottom + height for bottom, height in zip(bottoms, heights, strict=False)]
    capacity = candidates[0][1].capacity
    axes.axhline(
        hw.memory_bytes / GIB, color="black", linewidth=1.5, label=f"device memory {gib_text(hw.memory_bytes)}"
    )
    axes.axhline(
        capacity / GIB,
        color="black",
        linewidth=1.5,
        linestyle="--",
        label=f"usable capacity {gib_text(capacity)} (less {HEADROOM:.0%} headroom)",
    )
    for position, (_, est) in zip(positions, candidates, strict=False):
        verdict = "fits" if est.fits else "too big"
        axes.annotate(
            f"{gib_text(est.memory['total'])}\n{verdict}",
            (position, est.memory["total"] / GIB),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
            zorder=5,
        )
    labels = [
        textwrap.fill(f"{step}: {'+'.join(est.layout.options())}", 16, break_long_words=False)
        for step, est in candidates
    ]
    axes.set_xticks(positions, labels, fontsize=8)
    axes.set_ylim(0, 1.12 * max(bottoms + [hw.memory_bytes / GIB]))
    axes.set_xlabel("candidate layout (step: parallel options), in the order tried")
    axes.set_ylabel("memory per rank (GiB)")
    axes.set_title(
        f"{cfg.model.name}, seq {cfg.data.seq_len}: memory per rank on {hw.nodes} x {hw.gpus_per_node} {hw.name}"
    )
    # The legend lists the parts top down, as the bars stack them, under the two lines.
    handles = dict(zip(*reversed(axes.get_legend_handles_labels()), strict=False))
    names = [name for name in handles if name not in MEMORY_PARTS] + list(reversed(MEMORY_PARTS))
    axes.legend([handles[name] for name in names], names, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    axes.grid(axis="y", alpha=0.3)
    save(figure, path)
    return figure
