"""Context parallelism, measured: per-rank attention activation memory and tokens/s against cp.

``measure_context`` runs the attention op (``ContextParallelAttention``: q, k, v of this rank's
share of one long sequence; grouped key/value heads) forward and backward on ``cp`` local processes
for each cp, one thread each, and reports per rank:

* the peak activation memory of one forward+backward, by PyTorch's memory tracker: what the op
  keeps for backward (its q, k, v, output and log-sum-exp shards) and its transient buffers (the
  key/value block in flight, the block kernel's workspace). It should fall about linearly with cp;
* the exposed communication: the time a rank waits for a key/value block (or gradient block) after
  finishing its compute for the step, as a share of the op's time. The rest of the transfer time
  is hidden behind compute (the overlap);
* tokens/s of the whole sequence through forward+backward.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from curry_train.config import ConfigError
from curry_train.options import CP_PATTERNS as PATTERNS
from curry_train.pool import WorkerPool
from curry_train.primitives import context_parallel as cpm
from curry_train.validation.memory import peak_memory


@dataclass
class ContextRow:
    cp: int
    pattern: str
    seq_len: int
    activations: list[int]  # per rank, bytes
    exposed_comm: list[float]  # per rank, share of the op's time spent waiting for blocks
    ms: float  # forward+backward of the op, slowest rank
    tokens_per_s: float

    @property
    def max_activations(self) -> int:
        return max(self.activations)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_activations": self.max_activations}


def _context_worker(
    seq_len: int, heads: int, kv_heads: int, head_dim: int, pattern: str, steps: int
) -> list[tuple[int, float, float]]:
    """A pool job: the attention op on this rank's share of the sequence; every rank's figures."""
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    full = [torch.randn(1, h, seq_len, head_dim, generator=generator) for h in (heads, kv_heads, kv_heads)]
    q, k, v = (cpm.shard_sequence(t, world, rank, dim=2).requires_grad_() for t in full)
    attention = cpm.ContextParallelAttention(dist.group.WORLD, pattern if world > 1 else "ring")

    def step() -> None:
        attention(q, k, v).sum().backward()
        for t in (q, k, v):
            t.grad = None

    step()  # warm-up
    activations, _, _ = peak_memory(attention, step, inputs=[q, k, v])
    waits = cpm.WAIT_SECONDS
    waits[0] = 0.0
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    rows = [None] * world
    dist.all_gather_object(rows, (activations, waits[0] / steps / seconds, seconds))
    return rows


def measure_context(
    seq_len: int = 8192,
    cps: Sequence[int] = (1, 2, 4),
    pattern: str = "ring",
    heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 64,
    steps: int = 3,
) -> list[ContextRow]:

    rows = []
    for cp in cps:
        with WorkerPool(cp) as pool:
            raw = pool.run(_context_worker, seq_len, heads, kv_heads, head_dim, pattern, steps)[0]
        seconds = max(r[2] for r in raw)
        rows.append(
            ContextRow(
                cp=cp,
                pattern=pattern if cp > 1 else "-",
                seq_len=seq_len,
                activations=[r[0] for r in raw],
                exposed_comm=[r[1] for r in raw],
                ms=1000 * seconds,
                tokens_per_s=seq_len / seconds,
            )
        )
    return rows


def context_table(rows: Sequence[ContextRow]) -> str:
    base = rows[0].max_activations
    lines = [
        f"{'cp':>3} {'pattern':<12}{'seq':>7}{'activations/rank':>18}{'vs cp=' + str(rows[0].cp):>9}"
        f"{'exposed comm':>14}{'ms fwd+bwd':>12}{'tokens/s':>11}"
    ]
    for row in rows:
        exposed = max(row.exposed_comm)
        lines.append(
            f"{row.cp:>3} {row.pattern:<12}{row.seq_len:>7}{row.max_activations:>18,}"
            f"{row.max_activations / base:>9.2f}{exposed:>14.1%}{row.ms:>12.1f}{row.tokens_per_s:>11,.0f}"
        )
    return "\n".join(lines)


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
