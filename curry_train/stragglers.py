"""Which rank the others wait for: the straggler report a run logs at its end.

A rank that is slow to compute makes every other rank wait inside the step's collectives, so its own
step time looks like everyone's. What tells it apart is when each rank *issues* a collective: PyTorch's
flight recorder (``trainer.flight_recorder``) stamps every collective with its creation time, and
ranks enqueue the same collective (same process group, same sequence number) at nearly the same
moment unless one of them is late. The report is each rank's mean lateness over the collectives all
its peers recorded too (the last ``RECENT`` of each rank), beside its mean step time.

Times are the hosts' clocks: exact between the ranks of a node, good to the clocks' synchronization
(NTP, typically well under a millisecond) across nodes.
"""

from __future__ import annotations

import os
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

RECENT = 500  # collectives of each rank the report reads
FLAG_FACTOR = 2.0  # a straggler is this many times later than the (lower) median rank ...
FLAG_MIN_MS = 5.0  # ... and at least this late, on average (a busy host's jitter stays below)


@dataclass
class RankTimes:
    """One rank's share of the report."""

    rank: int
    steps: int
    step_seconds: float
    issued: list[tuple[str, int, int]] = field(default_factory=list)  # (process group, sequence number, ns)


def recorded_collectives(limit: int = RECENT) -> list[tuple[str, int, int]]:
    """This rank's last ``limit`` collectives in the flight recorder (empty when it is off)."""
    if int(os.environ.get("TORCH_FR_BUFFER_SIZE", "0") or 0) <= 0 or not dist.is_initialized():
        return []
    trace = pickle.loads(
        torch._C._distributed_c10d._dump_fr_trace(includeCollectives=True, includeStackTraces=False, onlyActive=False)
    )
    issued = []
    for entry in trace.get("entries", [])[-limit:]:
        group = entry.get("process_group") or ("", "?")
        if entry.get("collective_seq_id"):  # point-to-point sends and receives pair up otherwise
            issued.append((str(group[0]), int(entry["collective_seq_id"]), int(entry["time_created_ns"])))
    return issued


def gather(mine: RankTimes) -> list[RankTimes]:
    """Every rank's times on every rank (one collective, at the end of training)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    everyone: list[Optional[RankTimes]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [times for times in everyone if times is not None]


def lateness_ms(ranks: Sequence[RankTimes]) -> dict[int, tuple[float, int]]:
    """Each rank's mean lateness (ms) issuing the collectives it shares with a peer, and their count."""
    issued: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)
    for times in ranks:
        for group, sequence, created in times.issued:
            issued[group, sequence][times.rank] = created
    late: dict[int, list[float]] = defaultdict(list)
    for stamps in issued.values():
        if len(stamps) < 2:
            continue
        first = min(stamps.values())
        for rank, created in stamps.items():
            late[rank].append((created - first) / 1e6)
    return {rank: (sum(values) / len(values), len(values)) for rank, values in late.items()}


def report(ranks: Sequence[RankTimes]) -> Optional[str]:
    """One line: each rank's mean step time and lateness, and the straggler when there is one."""
    if len(ranks) < 2:
        return None
    ranks = sorted(ranks, key=lambda times: times.rank)
    steps = ", ".join(f"{t.rank}: {t.step_seconds / max(t.steps, 1):.3f}" for t in ranks)
    line = f"straggler report: mean step time per rank (s) {steps}"
    late = lateness_ms(ranks)
    if not late:
        return line + " (trainer.flight_recorder=0: no lateness measured)"
    counts = sorted(count for _, count in late.values())
    line += f"; mean lateness issuing the same collective (ms, over {counts[len(counts) // 2]})"
    line += " " + ", ".join(f"{rank}: {late[rank][0]:.1f}" for rank in sorted(late))
    means = sorted(mean for mean, _ in late.values())
    typical = means[(len(means) - 1) // 2]  # the lower median: with two ranks, the earlier one
    slow = [rank for rank in sorted(late) if late[rank][0] >= max(FLAG_MIN_MS, FLAG_FACTOR * typical)]
    if slow:
        return line + f"; the others wait for rank(s) {', '.join(map(str, slow))}"
    return line + "; no straggler"
