"""The figure helpers of the charts (matplotlib): advise's memory per rank (``advise.plot_memory``) and
runs_diff's loss curves draw on ``new_figure`` and write with ``save``. Nothing here loads torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from curry_train.planning.layout import PlanningError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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
