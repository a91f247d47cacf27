"""ContextParallel: attention over a sequence sharded across the ``cp`` ranks of a group.

Each rank holds a slice of every sequence (its queries, keys and values); the attention of its
queries needs every rank's keys and values. Patterns (``pattern=``):

``ring``         Ring attention (Liu et al., 2023): key/value blocks travel a ring of the cp ranks;
                 at each of the cp steps a rank computes its queries against the block it holds
                 while sending it on and receiving the next (communication overlaps compute). Block
                 results are merged exactly with their log-sum-exp, in fp32. Backward runs the ring
                 again; the key/value gradients travel with their blocks and end at their owners.
``double_ring``  The same with two levels (as in LoongTrain's double ring): cp = outer x inner;
                 blocks go round the inner ring (ranks of one group, e.g. a node), then hop once to
                 the next group (the outer ring), so only one step in ``inner`` crosses groups.
``alltoall``     Ulysses-style (Jacobs et al., 2023): an all-to-all trades the sequence shard for a
                 head shard (every rank gets the whole sequence for heads/cp heads), attention runs
                 locally, a second all-to-all trades back. Needs heads divisible by cp (key/value
                 heads fewer than cp are sent repeated).

Causal attention and load balance: with the sequence cut into cp chunks in order, rank r's queries
see r+1 chunks of keys, so the last rank works cp times more than the first. The *zigzag* layout
(``load_balance=True``) cuts it into 2*cp chunks and gives rank r chunks r and 2cp-1-r, so every
rank does the same work. ``sequence_layout`` gives the positions a rank holds; the caller shards
tokens, RoPE positions and labels alike (``shard_sequence``).

Each block runs a fused attention kernel that returns the log-sum-exp, checked against an exact
math kernel before use (``attention_kernels``). Grouped key/value heads travel and are read as they
are: each group of query heads that shares them runs against the block without a repeated copy
(the all-to-all alone sends them repeated when there are fewer than cp).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from curry_train.model.documents import document_mask
from curry_train.options import CP_PATTERNS
from curry_train.primitives.attention_kernels import block_backward, block_forward, masked_backward, masked_forward

# Seconds spent waiting for communication (a block not yet arrived, an all-to-all), accumulated for
# the bench (curry_train.validation.context, on gloo): what compute did not hide. Host time: NCCL's
# wait() only orders streams, so on CUDA this does not measure the exposed transfer.
WAIT_SECONDS = [0.0]


def _wait(works: list) -> None:
    start = time.perf_counter()
    for work in works:
        work.wait()
    WAIT_SECONDS[0] += time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Sequence layout


def sequence_layout(seq_len: int, cp: int, rank: int, load_balance: bool = True) -> list[range]:
    """The position ranges rank ``rank`` of ``cp`` holds (in the order it holds them)."""
    parts = 2 * cp if load_balance else cp
    if seq_len % parts:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by {parts} ({'2 x ' if load_balance else ''}cp={cp})"
        )
    chunk = seq_len // parts
    indices = (rank, parts - 1 - rank) if load_balance else (rank,)
    return [range(i * chunk, (i + 1) * chunk) for i in indices]


def sequence_positions(seq_len: int, cp: int, rank: int, load_balance: bool = True, device=None) -> Tensor:
    return torch.tensor([p for r in sequence_layout(seq_len, cp, rank, load_balance) for p in r], device=device)


def shard_sequence(x: Tensor, cp: int, rank: int, load_balance: bool = True, dim: int = 1) -> Tensor:
    """This rank's part of ``x`` along ``dim`` (tokens, labels, positions: all sharded alike)."""
    ranges = sequence_layout(x.shape[dim], cp, rank, load_balance)
    return torch.cat([x.narrow(dim, r.start, len(r)) for r in ranges], dim=dim)


# ----------------------------------------------------------------------------------------------
# Grouped key/value heads


def _expand_kv(k: Tensor, groups: int) -> Tensor:
    """Key/value heads repeated to the query heads: only for the all-to-all, whose heads are scattered
    over the ranks and must divide by cp."""
    return k.repeat_interleave(groups, dim=1) if groups > 1 else k


def _query_groups(x: Tensor, groups: int) -> list[Tensor]:
    """(batch, heads, seq, ...) -> ``groups`` views (batch, kv_heads, seq, ...): view ``r`` holds query
    head ``h * groups + r`` of each key/value head ``h`` (the heads that share it), no copy. Each
    group attends to the key/value block as it is, so the ring never repeats keys and values to the
    query heads (as SDPA's ``enable_gqa``); grouped-query attention costs one kernel call per group."""
    if groups == 1:
        return [x]
    return list(x.unflatten(1, (x.shape[1] // groups, groups)).unbind(2))


def _join_groups(parts: Sequence[Tensor]) -> Tensor:
    """The inverse of ``_query_groups``: (batch, heads, seq, ...) from its groups' views."""
    return parts[0] if len(parts) == 1 else torch.stack(list(parts), dim=2).flatten(1, 2)


# ----------------------------------------------------------------------------------------------
# Rings


@dataclass(frozen=True)
class RingPlan:
    """Who sends to whom after each step, and whose block each rank holds at each step."""

    group: dist.ProcessGroup
    rank: int  # in the cp group
    size: int
    send_to: tuple[int, ...]  # per step, this rank's destination (cp-group rank); the last move returns blocks home
    recv_from: tuple[int, ...]
    holds: tuple[int, ...]  # per step, the cp-group rank whose key/value block this rank holds

    @property
    def steps(self) -> int:
        return len(self.holds)

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)


def ring_plan(group: dist.ProcessGroup, pattern: str = "ring", inner: Optional[int] = None) -> RingPlan:
    """The moves of ``ring`` (rank r sends to r+1 after each step) or ``double_ring`` (cp = outer x
    inner, rank (g, l) = g*inner + l: inner moves (g, l) -> (g, l+1); the last of each inner cycle
    goes to the next group instead, (g, l) -> (g+1, l+1), so blocks of the next group arrive)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if pattern == "ring" or size == 1:
        moves = [[(r + 1) % size for r in range(size)] for _ in range(size)]
    elif pattern == "double_ring":
        inner = inner or default_inner_ring(size)
        if size % inner:
            raise ValueError(f"double_ring: inner ring size {inner} does not divide cp={size}")
        outer = size // inner
        moves = []
        for step in range(size):
            end_of_cycle = (step + 1) % inner == 0
            moves.append(
                [
                    (((r // inner) + (1 if end_of_cycle else 0)) % outer) * inner + (r % inner + 1) % inner
                    for r in range(size)
                ]
            )
    else:
        raise ValueError(f"pattern={pattern!r}: expected ring or double_ring here")
    holds_all = list(range(size))  # holds_all[r]: owner of the block rank r holds
    holds, send_to, recv_from = [], [], []
    for move in moves:
        holds.append(holds_all[rank])
        send_to.append(move[rank])
        recv_from.append(move.index(rank))
        nxt = [0] * size
        for r in range(size):
            nxt[move[r]] = holds_all[r]
        holds_all = nxt
    assert holds_all == list(range(size)), "ring moves must return every block to its owner"
    assert sorted(holds) == list(range(size)), "every rank must see every block once"
    return RingPlan(group, rank, size, tuple(send_to), tuple(recv_from), tuple(holds))


def default_inner_ring(size: int) -> int:
    """Inner ring size when none is given: the largest divisor of ``size`` not above its square root
    (cp=4: 2 groups of 2; cp=8: 4 groups of 2; a prime cp: one ring)."""
    inner = max(d for d in range(1, int(math.isqrt(size)) + 1) if size % d == 0)
    return inner if inner > 1 else size


KV_TAG, GRAD_TAG = 1, 2  # blocks and their gradients are in flight at once: never confuse them


def _exchange(plan: RingPlan, step: int, tensor: Tensor, tag: int = KV_TAG) -> tuple[Tensor, list]:
    """Start sending ``tensor`` to this step's destination and receiving its replacement."""
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor, plan.global_rank(plan.send_to[step]), plan.group, tag),
        dist.P2POp(dist.irecv, received, plan.global_rank(plan.recv_from[step]), plan.group, tag),
    ]
    return received, dist.batch_isend_irecv(ops)


def _pairs(q_ranges: Sequence[range], kv_ranges: Sequence[range], causal: bool):
    """(query chunk, key/value chunk, causal?) pairs that attend: earlier chunks fully, the same chunk
    causally, later chunks not at all. Chunks are equal, aligned ranges of positions."""
    for i, qr in enumerate(q_ranges):
        for j, kr in enumerate(kv_ranges):
            if not causal or kr.stop <= qr.start:
                yield i, j, False
            elif kr.start == qr.start:
                yield i, j, True


def _block_masks(documents: Optional[Tensor], q_ranges, kv_ranges, causal: bool) -> dict:
    """Under a document mask, each attending (query chunk, key/value chunk) pair's mask (batch, 1, q, k);
    pairs whose mask is empty (no query's document reaches into the block) are left out."""
    if documents is None:
        return {}
    masks = {}
    for i, j, diagonal in _pairs(q_ranges, kv_ranges, causal):
        qr, kr = q_ranges[i], kv_ranges[j]
        allowed = document_mask(
            documents[:, qr.start : qr.stop], documents[:, kr.start : kr.stop], 0 if diagonal else None
        )
        if bool(allowed.any()):
            masks[i, j] = allowed
    return masks


def _merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Merge a block's output into the running one by their log-sum-exps (fp32). Rows that no key has
    reached yet (both -inf, under a document mask) stay empty."""
    merged = torch.logaddexp(lse, block_lse)
    base = torch.where(torch.isfinite(merged), merged, torch.zeros_like(merged))
    out = out * torch.exp(lse - base)[..., None] + block_out.float() * torch.exp(block_lse - base)[..., None]
    return out, merged


class _RingAttention(torch.autograd.Function):
    """The ring's forward and backward. Queries are handled in units of (sequence chunk, query group):
    each unit is a strided view of ``q`` against the key/value block's heads as they are. With
    ``documents`` (the rows' document numbers, whole), a pair of chunks runs under its document mask,
    and a pair the mask leaves empty does not run."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, layouts: tuple, causal: bool, scale: float, documents=None):
        q_ranges = layouts[plan.rank]
        chunk = len(q_ranges[0])
        groups = q.shape[1] // k.shape[1]
        q_units = [_query_groups(qc, groups) for qc in q.split(chunk, dim=2)]  # [chunk][group]
        out = [[torch.zeros_like(qg, dtype=torch.float32) for qg in units] for units in q_units]
        lse = [[torch.full(qg.shape[:-1], float("-inf"), device=q.device) for qg in units] for units in q_units]
        kv = torch.stack([k, v])
        for step in range(plan.steps):
            pending = _exchange(plan, step, kv) if step < plan.steps - 1 else None
            ks, vs = kv[0].split(chunk, dim=2), kv[1].split(chunk, dim=2)
            kv_ranges = layouts[plan.holds[step]]
            masks = _block_masks(documents, q_ranges, kv_ranges, causal)
            for i, j, diagonal in _pairs(q_ranges, kv_ranges, causal):
                if documents is not None and (i, j) not in masks:
                    continue
                for r, qg in enumerate(q_units[i]):
                    if documents is None:
                        o, block_lse = block_forward(qg, ks[j], vs[j], diagonal, scale)
                    else:
                        o, block_lse = masked_forward(qg, ks[j], vs[j], masks[i, j], scale)
                    out[i][r], lse[i][r] = _merge(out[i][r], lse[i][r], o, block_lse)
            if pending is not None:
                kv, works = pending
                _wait(works)
        # Laid out (batch, seq, heads, dim) in memory, as SDPA lays its output out: the model's transpose
        # back to (batch, seq, heads x dim) for the output projection is then a view, not a second copy
        # of the output kept for backward.
        b, h, s, d = q.shape
        out_t = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        for i, parts in enumerate(out):
            for target, part in zip(_query_groups(out_t.narrow(2, i * chunk, chunk), groups), parts, strict=True):
                target.copy_(part)
        lse_t = torch.cat([_join_groups(parts) for parts in lse], dim=2)
        ctx.save_for_backward(q, k, v, out_t, lse_t)
        ctx.plan, ctx.layouts, ctx.causal, ctx.scale, ctx.documents = plan, layouts, causal, scale, documents
        return out_t

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, layouts, causal, scale, documents = ctx.plan, ctx.layouts, ctx.causal, ctx.scale, ctx.documents
        q_ranges = layouts[plan.rank]
        chunk = len(q_ranges[0])
        groups = q.shape[1] // k.shape[1]

        def units(x: Tensor) -> list[list[Tensor]]:
            return [_query_groups(c, groups) for c in x.split(chunk, dim=2)]

        q_units, o_units, do_units, l_units = units(q), units(out), units(dout.contiguous()), units(lse)
        dq = [[torch.zeros_like(qg, dtype=torch.float32) for qg in parts] for parts in q_units]
        kv = torch.stack([k, v])
        grads_in_flight = None
        for step in range(plan.steps):
            pending = _exchange(plan, step, kv) if step < plan.steps - 1 else None
            ks, vs = kv[0].split(chunk, dim=2), kv[1].split(chunk, dim=2)
            dkv = torch.zeros_like(kv, dtype=torch.float32)  # this rank's share of the block's gradient
            kv_ranges = layouts[plan.holds[step]]
            masks = _block_masks(documents, q_ranges, kv_ranges, causal)
            for i, j, diagonal in _pairs(q_ranges, kv_ranges, causal):
                if documents is not None and (i, j) not in masks:
                    continue
                for r in range(groups):
                    unit = (do_units[i][r], q_units[i][r], ks[j], vs[j], o_units[i][r], l_units[i][r])
                    if documents is None:
                        dq_r, dk_j, dv_j = block_backward(*unit, diagonal, scale)
                    else:
                        dq_r, dk_j, dv_j = masked_backward(*unit, masks[i, j], scale)
                    dq[i][r] += dq_r.float()
                    dkv[0].narrow(2, j * chunk, chunk).add_(dk_j.float())  # the group's share of the head
                    dkv[1].narrow(2, j * chunk, chunk).add_(dv_j.float())
            # The block's gradient travels with it, gathering each rank's share; it arrived (from the
            # ranks before) while this rank computed, and the last move brings it home.
            if grads_in_flight is not None:
                arrived, works = grads_in_flight
                _wait(works)
                dkv += arrived
            grads_in_flight = _exchange(plan, step, dkv, GRAD_TAG) if plan.size > 1 else (dkv, [])
            if pending is not None:
                kv, works = pending
                _wait(works)
        dkv, works = grads_in_flight
        _wait(works)
        dq_t = torch.cat([_join_groups(parts) for parts in dq], dim=2)
        return dq_t.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# All-to-all (Ulysses)


class _AllToAll(torch.autograd.Function):
    """Split dim ``scatter`` over the group, gather dim ``gather``; backward is the reverse."""

    @staticmethod
    def forward(ctx, x: Tensor, group, scatter: int, gather: int) -> Tensor:
        ctx.group, ctx.scatter, ctx.gather = group, scatter, gather
        return _all_to_all(x, group, scatter, gather)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad.contiguous(), ctx.group, ctx.gather, ctx.scatter), None, None, None


def _all_to_all(x: Tensor, group, scatter: int, gather: int) -> Tensor:
    size = dist.get_world_size(group)
    inputs = [t.contiguous() for t in x.chunk(size, dim=scatter)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(size)]
    start = time.perf_counter()
    dist.all_to_all(outputs, inputs, group=group)
    WAIT_SECONDS[0] += time.perf_counter() - start
    return torch.cat(outputs, dim=gather)


def _natural_order(layouts: Sequence[Sequence[range]]) -> Tensor:
    """Index that puts the gathered sequence (rank 0's positions, rank 1's, ...) in position order."""
    gathered = [p for ranges in layouts for r in ranges for p in r]
    return torch.tensor(gathered).argsort()


# ----------------------------------------------------------------------------------------------
# The module


class ContextParallelAttention(nn.Module):
    """Attention over (batch, heads, local_seq, head_dim) shards of q, k, v (``k``/``v`` may have
    fewer, grouped heads), returning this rank's shard of the output. Drop-in for the model's
    attention op (``Llama.plan.attention_op``)."""

    def __init__(
        self,
        cp_group: dist.ProcessGroup,
        pattern: str = "ring",
        causal: bool = True,
        load_balance: bool = True,
        inner_ring: Optional[int] = None,
    ) -> None:
        super().__init__()
        if pattern not in CP_PATTERNS:
            raise ValueError(f"pattern={pattern!r}: expected one of {', '.join(CP_PATTERNS)}")
        self.group, self.pattern, self.causal, self.load_balance = cp_group, pattern, causal, load_balance
        self.cp, self.rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
        self.plan = ring_plan(cp_group, pattern, inner_ring) if pattern != "alltoall" else None
        self._layouts: dict[int, tuple] = {}

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}, cp={self.cp}, causal={self.causal}, load_balance={self.load_balance}"

    def layouts(self, local_seq: int) -> tuple:
        """The positions every rank holds, for a local sequence of ``local_seq`` tokens (cached)."""
        if local_seq not in self._layouts:
            seq = local_seq * self.cp
            self._layouts[local_seq] = tuple(
                tuple(sequence_layout(seq, self.cp, r, self.load_balance)) for r in range(self.cp)
            )
        return self._layouts[local_seq]

    # Left out of torch.compile's graphs (a deliberate graph break): it runs its own send/recv ring.
    @torch._dynamo.disable
    def forward(self, q: Tensor, k: Tensor, v: Tensor, documents: Optional[Tensor] = None) -> Tensor:
        """``documents``: (batch, whole seq) document numbers of packed rows (every rank holds them whole):
        attention stays inside each document."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        layouts = self.layouts(q.shape[2])
        if self.pattern == "alltoall":
            return self._alltoall(q, k, v, layouts, scale, documents)
        return _RingAttention.apply(q, k, v, self.plan, layouts, self.causal, scale, documents)

    def _alltoall(
        self, q: Tensor, k: Tensor, v: Tensor, layouts: tuple, scale: float, documents: Optional[Tensor] = None
    ) -> Tensor:
        if q.shape[1] % self.cp:
            raise ValueError(f"alltoall: {q.shape[1]} heads do not divide by cp={self.cp}")
        if k.shape[1] % self.cp:  # fewer key/value heads than ranks: send them repeated to the query heads
            groups = q.shape[1] // k.shape[1]
            k, v = _expand_kv(k, groups), _expand_kv(v, groups)
        order = _natural_order(layouts).to(q.device)
        # (b, h, s_local, d) -> (b, h/cp, s, d), the gathered sequence put in position order
        q, k, v = (_AllToAll.apply(t, self.group, 1, 2).index_select(2, order) for t in (q, k, v))
        gqa = q.shape[1] != k.shape[1]
        if documents is not None:  # the whole rows are here, in position order: one mask over them
            mask = document_mask(documents, documents, 0 if self.causal else None)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=scale, enable_gqa=gqa)
        out = out.index_select(2, order.argsort())  # back to rank-major order, then to the rank's heads
        return _AllToAll.apply(out, self.group, 2, 1)


class ContextParallel:
    """Namespace of the seed API: ``ContextParallel.wrap(inner_attention=..., cp_group=...)``."""

    @staticmethod
    def wrap(
        inner_attention: nn.Module,
        cp_group: dist.ProcessGroup,
        pattern: str = "ring",
        causal: bool = True,
        load_balance: bool = True,
        inner_ring: Optional[int] = None,
        op_name: str = "sdpa",
    ) -> nn.Module:
        """Make ``inner_attention`` (a ``GQAttention``: projections, RoPE, then its attention op
        ``op_name``) attend over a sequence sharded across ``cp_group``: its op is replaced by a
        ``ContextParallelAttention``. The module then takes this rank's shard of the sequence and
        the cos/sin of the positions it holds (``sequence_positions``). Returns the module."""
        op = getattr(inner_attention, op_name, None)
        if op is None:
            raise ValueError(f"{type(inner_attention).__name__} has no attention op {op_name!r} to replace")
        if getattr(op, "dropout", 0.0):
            raise ValueError("context parallelism does not apply attention dropout: set model.dropout=0")
        setattr(inner_attention, op_name, ContextParallelAttention(cp_group, pattern, causal, load_balance, inner_ring))
        return inner_attention
