"""The arithmetic of a pipeline (no torch: a run's config is checked before torch is imported): which
schedule a name means, how many stages each rank holds and which, how the layers split over the stages,
how many micro-batches a schedule accepts. ``primitives/pipeline_schedule.py`` runs them.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

from curry_train.options import PIPELINE_SCHEDULES as KINDS

# the keys of primitives.pipeline_schedule.SCHEDULES: one per torch.distributed.pipelining schedule
SCHEDULE_KEYS = ("gpipe", "1f1b", "interleaved", "interleaved_zb", "zbv", "dualpipev")
_ALIASES = {
    "1f1b": "1f1b",
    "interleaved_1f1b": "interleaved",
    "interleaved1f1b": "interleaved",
    "interleaved_zero_bubble": "interleaved_zb",
    "zb": "interleaved_zb",
    "zero_bubble": "interleaved_zb",
    "zbvzerobubble": "zbv",
    "dualpipe_v": "dualpipev",
}
LOOPED = ("interleaved", "interleaved_zb")
# Split each stage's backward into the input gradient, then the weight gradient (the graph is kept between)
SPLIT_BACKWARD = ("interleaved_zb", "zbv", "dualpipev")
V_SHAPED = ("zbv", "dualpipev")


def canonical_kind(kind: str) -> str:
    """The schedule's key in ``SCHEDULES`` (case-insensitive; a few common spellings accepted)."""
    key = str(kind).lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in SCHEDULE_KEYS:
        raise ValueError(f"pipeline schedule {kind!r}: expected one of {', '.join(KINDS)}")
    return key


def stages_per_rank(kind: str, virtual_stages: Optional[int] = None) -> int:
    """How many stages each rank holds: 1 (gpipe, 1F1B), ``virtual_stages`` (looped kinds, default
    2), 2 (V-shaped kinds)."""
    key = canonical_kind(kind)
    if key in V_SHAPED:
        if virtual_stages not in (None, 2):
            raise ValueError(
                f"schedule {kind}: V-shaped, exactly 2 stages per rank (got virtual_stages={virtual_stages})"
            )
        return 2
    if key in LOOPED:
        v = 2 if virtual_stages is None else virtual_stages
        if v < 1:
            raise ValueError(f"virtual_stages={v} must be positive")
        return v
    if virtual_stages not in (None, 1):
        raise ValueError(
            f"schedule {kind}: one stage per rank (got virtual_stages={virtual_stages}); "
            "use interleaved or interleaved_zb for virtual stages"
        )
    return 1


def stage_to_rank(kind: str, pp_size: int, n_stages: int) -> list[int]:
    """The rank of the pipeline group that holds each stage."""
    if canonical_kind(kind) in V_SHAPED:
        return [s if s < pp_size else 2 * pp_size - 1 - s for s in range(n_stages)]
    return [s % pp_size for s in range(n_stages)]


def check_microbatches(kind: str, n_microbatches: int, pp_size: int, n_stages: int) -> None:
    """The micro-batch counts each schedule accepts, checked up front with a message that says why."""
    key = canonical_kind(kind)
    if n_microbatches < 1:
        raise ValueError(f"n_microbatches={n_microbatches} must be positive")
    if key == "1f1b" and n_microbatches < pp_size:
        raise ValueError(f"schedule 1F1B needs at least as many micro-batches as stages: {n_microbatches} < {pp_size}")
    if key in LOOPED:
        rounds = max(1, n_microbatches // pp_size)
        if n_microbatches % rounds:
            raise ValueError(
                f"schedule {kind} runs micro-batches in rounds of {pp_size} (the pipeline size): "
                f"{n_microbatches} micro-batches are not a whole number of rounds; use a multiple of {pp_size}"
            )
    if key in V_SHAPED and n_microbatches < n_stages:
        raise ValueError(
            f"schedule {kind} needs at least as many micro-batches as stages: {n_microbatches} < {n_stages}"
        )


def split_layers(n_layers: int, n_stages: int, layers_per_stage: Optional[Sequence[int]] = None) -> list[range]:
    """Contiguous layer ranges, one per stage.

    ``layers_per_stage``: explicit counts. Otherwise balanced: the embedding (on the first stage) and
    the output head (on the last) weigh one layer each, and the split minimizes the heaviest stage,
    every stage holding at least one layer.
    """
    if n_stages < 1:
        raise ValueError(f"n_stages={n_stages} must be positive")
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
        if len(counts) != n_stages or sum(counts) != n_layers or min(counts) < 0:
            raise ValueError(
                f"layers_per_stage={counts}: expected {n_stages} non-negative counts summing to {n_layers} layers"
            )
    else:
        if n_stages > n_layers:
            raise ValueError(
                f"{n_stages} pipeline stages but the model has {n_layers} layers: at most one stage per layer"
            )
        counts = list(_balanced_counts(n_layers, n_stages))
    starts = [sum(counts[:s]) for s in range(n_stages)]
    return [range(start, start + count) for start, count in zip(starts, counts, strict=False)]


@functools.lru_cache(maxsize=256)  # planning asks for the same splits hundreds of times
def _balanced_counts(n_layers: int, n_stages: int) -> tuple[int, ...]:
    def load(stage: int, count: int) -> int:
        return count + (stage == 0) + (stage == n_stages - 1)

    # best[s][i]: (heaviest load, counts) for the first i layers over stages 0..s-1
    best: dict[tuple[int, int], tuple[int, list[int]]] = {(0, 0): (0, [])}
    for s in range(n_stages):
        for i in range(s, n_layers + 1):
            if (s, i) not in best:
                continue
            worst, counts = best[(s, i)]
            remaining_stages = n_stages - s - 1
            for count in range(1, n_layers - i - remaining_stages + 1):
                candidate = (max(worst, load(s, count)), counts + [count])
                key = (s + 1, i + count)
                if key not in best or candidate[0] < best[key][0]:
                    best[key] = candidate
    return tuple(best[(n_stages, n_layers)][1])
