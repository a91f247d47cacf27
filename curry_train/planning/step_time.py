"""How long one optimizer step takes, by arithmetic: model FLOPs over the devices' assumed throughput,
the pipeline bubble, and each parallel group's communication over its link.

The model and the communication volumes are derived in docs/planning.md ("Step time").
"""

from __future__ import annotations

import math
from typing import Optional

from omegaconf import DictConfig

from curry_train.layout.pipeline import canonical_kind, split_layers, stage_to_rank
from curry_train.model.config import head_dim
from curry_train.planning.layout import Layout, microbatches_per_step
from curry_train.planning.memory import (
    active_parameter_count,
    compiles_the_loss,
    expert_parameter_count,
    parameter_count,
    parameter_shapes,
    rank_parameters,
)
from curry_train.primitives.lora import is_adapter

ZERO_BUBBLE = ("interleaved_zb", "zbv", "dualpipev")
ALL_TO_ALL_LATENCY = 20e-6  # seconds an all-to-all of small messages takes within a node (NCCL's order)


def flops_per_token(parameters: int, n_layers: int, dim: int, seq_len: int) -> int:
    """Model FLOPs of training on one token, forward and backward (Kaplan et al., 2020; PaLM's MFU,
    Chowdhery et al., 2022): ``6N + 12*L*h*s``. A matmul with N weights costs 2N FLOPs per token
    forward and 4N backward (the gradients of its input and of its weights); attention's two
    sequence-long products (``QK^T`` and the weighted sum of V) cost ``2*s*h`` each per token and
    layer forward, ``12*L*h*s`` with backward (causal masking not discounted, as in PaLM). Recompute
    is not model FLOPs: it adds hardware FLOPs only. ``dim``: the attention's width, ``n_heads x
    head_dim`` (the model's dim unless ``model.head_dim`` says otherwise)."""
    return 6 * parameters + 12 * n_layers * dim * seq_len


def flops_parameters(model_cfg: DictConfig) -> int:
    """N of ``flops_per_token``: the parameters a token goes through (for a MoE model the active
    ones: its ``top_k`` routed experts of each layer, not all of them) less the input embedding's (a
    lookup, no matmul; tied to the head, it is the head's matmul and counts), as torchtitan counts them."""
    shapes = parameter_shapes(model_cfg)
    embedding = 0 if model_cfg.tie_embeddings else math.prod(shapes["tok_embeddings.weight"])
    return active_parameter_count(model_cfg) - embedding


def all_to_all_bytes(cfg: DictConfig, layout: Layout) -> float:
    """Bytes one rank puts into all-to-alls per optimizer step under expert parallelism (its mean over
    the ep group: a rank's share depends on the routing): per MoE layer it holds and micro-batch,
    every pick of its ``T`` tokens (``T * top_k`` rows of ``dim``) goes out, the experts' outputs
    come back, and backward sends both gradients the other way: ``4 * T * top_k * dim`` values, plus
    the counts sent first (``experts`` int64). ``(ep - 1) / ep`` of it leaves the rank."""
    m = cfg.model
    moe = m.get("moe")
    if moe is None or layout.ep == 1:
        return 0.0
    pbytes = layout.element_bytes
    tokens = cfg.data.seq_len // layout.cp * layout.micro_batch_size
    moe_blocks = (
        max(
            sum(1 for i in r if i >= moe.dense_layers)
            for r in split_layers(m.n_layers, layout.pp * layout.stages_per_rank)
        )
        * layout.stages_per_rank
    )
    per_layer = 4 * tokens * moe.top_k * m.dim * pbytes + moe.experts * 8
    return float(moe_blocks * microbatches_per_step(cfg, layout) * per_layer)


def all_to_all_count(cfg: DictConfig, layout: Layout) -> int:
    """All-to-alls one rank issues per step under expert parallelism: per MoE layer and micro-batch,
    the counts, the tokens and the outputs forward, and both gradients backward."""
    moe = cfg.model.get("moe")
    if moe is None or layout.ep == 1:
        return 0
    n_stages = layout.pp * layout.stages_per_rank
    blocks = max(sum(1 for i in r if i >= moe.dense_layers) for r in split_layers(cfg.model.n_layers, n_stages))
    return 5 * blocks * layout.stages_per_rank * microbatches_per_step(cfg, layout)


def bubble_formula(kind: str, pp: int, microbatches: int, virtual_stages: int = 1) -> Optional[float]:
    """The idle share of a pipeline step for schedule ``kind``: ``(P-1) / (M+P-1)`` for gpipe and
    1F1B, ``(P-1) / (v*M+P-1)`` for interleaved (Narayanan et al., 2021); None for the zero-bubble
    kinds, whose weight-gradient chunks fill the drain (Qi et al., 2023) and which have no closed
    formula (what remains depends on the forward / input-gradient / weight-gradient cost ratio)."""
    key = canonical_kind(kind)
    if key in ZERO_BUBBLE:
        return None
    v = virtual_stages if key == "interleaved" else 1
    return (pp - 1) / (v * microbatches + pp - 1)


def bubble_ratio(layout: Layout, microbatches: int) -> float:
    """The pipeline bubble over the compute: ``(pp - 1) / (v * M)``, from the bubble's share of a step
    (``bubble_formula``: ``(pp - 1) / (v * M + pp - 1)``; v > 1 for the looped schedules); 0 without
    pp and for the zero-bubble kinds."""
    if layout.pp == 1:
        return 0.0
    share = bubble_formula(layout.pp_schedule, layout.pp, microbatches, layout.stages_per_rank)
    return 0.0 if share is None else share / (1 - share)


def _link(layout: Layout, axis: str, gpus_per_node: int, hw: DictConfig) -> float:
    """The bandwidth ring collectives reach in ``axis``'s groups: NVLink's at ``collective_efficiency``
    within a node, the network's at ``inter_node_efficiency`` across nodes (NCCL's bus bandwidths). The
    mesh is (pp, dp_replicate, dp_shard, cp, tp), tp innermost, so a group spans ``stride * size``
    consecutive ranks."""
    order = ("tp", "cp", "dp_shard", "dp_replicate", "pp")
    stride = 1
    for name in order:
        size = layout.sizes()[name]
        if name == axis or (axis == "dp" and name == "dp_shard"):
            span = stride * size * (layout.dp_replicate if axis == "dp" else 1)
            if span <= gpus_per_node:
                return hw.intra_node_bandwidth * hw.collective_efficiency
            return hw.inter_node_bandwidth * hw.get("inter_node_efficiency", hw.collective_efficiency)
        stride *= size
    raise ValueError(axis)


# ----------------------------------------------------------------------------------------------
# Compute: each rank's GEMMs, its attention, its memory-bound work (docs/planning.md, "Step time")


def _peak(hw: DictConfig, layout: Layout) -> float:
    return hw.peak_bf16_flops if layout.mixed_precision == "bf16" else hw.get("peak_fp32_flops", hw.peak_bf16_flops / 2)


def gemm_seconds(m: float, k: float, n: float, hw: DictConfig, layout: Layout) -> float:
    """One (m x k) @ (k x n) matmul: the larger of its FLOPs at the achieved rate of large GEMMs and its
    operands' bytes at memory bandwidth (a small or thin GEMM is bound by its reads), plus one kernel's
    latency. So tensor parallelism's narrower GEMMs and small models run further from peak."""
    if m <= 0 or k <= 0 or n <= 0:
        return 0.0
    width = layout.element_bytes
    flops = 2.0 * m * k * n / (_peak(hw, layout) * matmul_efficiency(hw, min(k, n)))
    reads = width * (m * k + k * n + m * n) / (hw.memory_bandwidth * hw.memory_efficiency)
    return max(flops, reads) + hw.kernel_latency


def matmul_efficiency(hw: DictConfig, size: float) -> float:
    """The share of the peak a GEMM whose narrower weight side is ``size`` reaches: measured by size where
    the hardware config has a table (``matmul_efficiency_by_size``, a probe's: ``curry-bench --estimate``),
    interpolated in log2 of the size and held at its ends; else the large GEMMs' ``matmul_efficiency``."""
    table = hw.get("matmul_efficiency_by_size")
    if not table:
        return hw.matmul_efficiency
    points = sorted((float(key), float(value)) for key, value in table.items())
    if size <= points[0][0]:
        return points[0][1]
    if size >= points[-1][0]:
        return points[-1][1]
    for (s0, e0), (s1, e1) in zip(points, points[1:], strict=False):
        if s0 <= size <= s1:
            share = (math.log2(size) - math.log2(s0)) / (math.log2(s1) - math.log2(s0))
            return e0 + share * (e1 - e0)
    return hw.matmul_efficiency


def block_gemms(cfg: DictConfig, layout: Layout) -> list[tuple[float, float, float, float]]:
    """(m, k, n, count) of one transformer block's forward GEMMs on one rank for one micro-batch: the
    attention projections and the MLP (dense, or the rank's experts with their routed rows, the shared
    experts and the router), split by tensor parallelism; m: the micro-batch's tokens on the rank."""
    m = cfg.model
    tp, tokens = layout.tp, layout.micro_batch_size * cfg.data.seq_len / layout.cp
    hd = head_dim(m)
    q, kv = m.n_heads * hd / tp, m.n_kv_heads * hd / tp
    gemms = [(tokens, m.dim, q, 1), (tokens, m.dim, kv, 2), (tokens, q, m.dim, 1)]
    moe = m.get("moe")
    if moe is None:
        return gemms + [(tokens, m.dim, m.ffn_dim / tp, 2), (tokens, m.ffn_dim / tp, m.dim, 1)]
    local = moe.experts / layout.ep
    rows = tokens * moe.top_k * layout.ep / moe.experts  # per local expert, routing balanced
    hidden = moe.expert_ffn_dim
    gemms += [(rows, m.dim, hidden, 2 * local), (rows, hidden, m.dim, local), (tokens, m.dim, moe.experts, 1)]
    if moe.shared_experts:
        shared = moe.shared_experts * hidden / tp
        gemms += [(tokens, m.dim, shared, 2), (tokens, shared, m.dim, 1)]
    return gemms


def recomputed_gemms(cfg: DictConfig, layout: Layout) -> list[tuple[float, float, float, float]]:
    """The forward GEMMs of one block that ``recompute_keep_matmuls=every_other`` runs again in backward: of
    the block's matmuls in order (wq, wk, wv, wo, w1, w3, w2), the 2nd, 4th and 6th, i.e. wk, wo and w3;
    a mixture's MLP, half of its GEMMs."""
    gemms = block_gemms(cfg, layout)
    (tokens, dim, _, _), (_, _, kv, _), (_, q, _, _) = gemms[:3]
    attention = [(tokens, dim, kv, 1), (tokens, q, dim, 1)]
    if cfg.model.get("moe") is None:
        return [*attention, (tokens, dim, cfg.model.ffn_dim / layout.tp, 1)]
    return attention + [(mm, k, n, count / 2) for mm, k, n, count in gemms[3:]]


def tp_linears(cfg: DictConfig) -> int:
    """A block's linears tensor parallelism shards: q, k, v and the output projection; the MLP's three, or
    a mixture's shared experts' (its routed experts are whole on each rank)."""
    moe = cfg.model.get("moe")
    return 4 + (3 if moe is None or moe.shared_experts else 0)


def attention_flops(cfg: DictConfig, layout: Layout) -> float:
    """Forward FLOPs of one block's causal attention on one rank for one micro-batch: ``QK^T`` and the
    weighted sum of V, ``4 * s_q * s_k * heads * head_dim``, of which a causal kernel computes half; each
    context-parallel rank holds ``s / cp`` of the queries against the whole sequence's keys."""
    m, s = cfg.model, cfg.data.seq_len
    heads = m.n_heads / layout.tp
    return 4.0 * layout.micro_batch_size * (s / layout.cp) * s * heads * head_dim(m) / 2


def elementwise_bytes(cfg: DictConfig, layout: Layout, compiled: bool = False) -> tuple[float, int]:
    """Bytes one block's memory-bound forward ops move on one rank for one micro-batch, and how many
    kernels they launch, counted op by op from ``model/llama.py`` (``a``: the activations' bytes):

    - RMSNorm in fp32, eager (``x.float()``, ``pow``, ``mean``, the products, ``type_as``): ``2a + 36``
      bytes per element, twice a block; the two residual adds ``3a`` each; sequence parallelism splits them;
    - RoPE in fp32 on q and k (upcast, four half-width products, their sums, ``stack``, ``type_as``):
      ``2a + 52`` per element; the heads' transposes to and from SDPA: ``2a`` per element of q, k, v, out;
    - SwiGLU's ``silu(w1 x) * w3 x``: ``5a`` per hidden element.

    Compiled (``compile.enabled``), inductor fuses each group into one read and one write: ``2a`` per
    norm, rotation and transpose element, ``3a`` per hidden one; a handful of kernels."""
    m = cfg.model
    tp, tokens = layout.tp, layout.micro_batch_size * cfg.data.seq_len / layout.cp
    a = layout.element_bytes
    residual = m.dim / (tp if layout.sequence_parallel else 1)
    hd = head_dim(m)
    q, kv = m.n_heads * hd / tp, m.n_kv_heads * hd / tp
    moe = m.get("moe")
    hidden = (moe.expert_ffn_dim * moe.top_k if moe is not None else m.ffn_dim) / tp
    if compiled:
        per_token = 2 * (2 * a) * residual + 2 * a * (q + kv) + 3 * a * hidden
        return tokens * per_token, 8
    per_token = (
        2 * (2 * a + 36) * residual
        + 2 * 3 * a * residual
        + (2 * a + 52) * (q + kv)
        + 2 * a * (2 * q + 2 * kv)
        + 5 * a * hidden
    )
    return tokens * per_token, ELEMENTWISE_KERNELS


ELEMENTWISE_KERNELS = 46  # eager kernels of one block's forward besides its GEMMs and attention (op count above)


def micro_batch_seconds(cfg: DictConfig, layout: Layout, hw: DictConfig, blocks: int, head: bool) -> dict[str, float]:
    """Seconds of forward and backward of one micro-batch through ``blocks`` blocks (and ``head``: the
    output projection and the loss), by kind: GEMMs (backward: two per forward GEMM, the input's gradient
    and the weight's), attention (backward 2.5x forward: five products against two), memory-bound work
    (backward twice forward); recompute adds its forward again: full, the whole block; per-op selective,
    the memory-bound ops (and with ``recompute_keep_matmuls=every_other`` wk, wo and w3); every n-th block
    whole (``recompute_every_n_blocks``), the others nothing."""
    forward_gemm = sum(count * gemm_seconds(mm, k, n, hw, layout) for mm, k, n, count in block_gemms(cfg, layout))
    peak = _peak(hw, layout)
    attention = attention_flops(cfg, layout) / (peak * hw.attention_efficiency) + hw.kernel_latency
    bandwidth = hw.memory_bandwidth * hw.memory_efficiency
    moved, kernels = elementwise_bytes(cfg, layout, bool(cfg.get("compile", {}).get("enabled", False)))
    memory = moved / bandwidth + kernels * hw.kernel_latency
    kind = layout.recompute_kind
    whole = blocks if kind == "full" else layout.fully_recomputed(blocks)  # blocks whose forward runs twice
    again = 0.0  # GEMMs per-op selective recomputes, per block
    if kind == "per_op_half":
        again = sum(count * gemm_seconds(mm, k, n, hw, layout) for mm, k, n, count in recomputed_gemms(cfg, layout))
    parts = {
        "matmul": blocks * forward_gemm * 3 + whole * forward_gemm + blocks * again,
        "attention": blocks * attention * 3.5 + whole * attention,
        "memory": blocks * memory * 3 + (blocks if kind in ("per_op", "per_op_half") else whole) * memory,
    }
    if head:
        m = cfg.model
        tokens = layout.micro_batch_size * cfg.data.seq_len / layout.cp
        # model.loss_chunks: each chunk's logits and loss are computed again in backward (its forward GEMM and
        # the log-softmax's read and write, about 8 bytes a logit)
        chunked = layout.loss_chunks > 1
        parts["matmul"] += (4 if chunked else 3) * gemm_seconds(tokens, m.dim, m.vocab_size / layout.tp, hw, layout)
        # the loss: the logits read in fp32, softmax, the gradient written: about 16 bytes a logit; inductor's
        # (compiles_the_loss) reads the logits in forward and again in backward, where it writes their gradient
        per_logit = 3 * layout.element_bytes if compiles_the_loss(cfg, layout) else 16
        parts["memory"] += tokens * m.vocab_size / layout.tp * (24 if chunked else per_logit) / bandwidth
    return parts


def optimizer_seconds(cfg: DictConfig, layout: Layout, hw: DictConfig) -> float:
    """AdamW over the rank's share of the trainable parameters: memory-bound, about 32 bytes moved per
    parameter (fp32 parameter, gradient and two moments read, three written), plus the gradient norm's read."""
    named = rank_parameters(cfg.model, layout.tp, layout.pp, 0, layout.pp_schedule, layout.virtual_stages, layout.ep)
    if cfg.model.get("lora") is not None:
        named = [(name, shape) for name, shape in named if is_adapter(name)]
    params = sum(math.prod(shape) for _, shape in named) / max(1, layout.shards)
    return params * 36 / (hw.memory_bandwidth * hw.memory_efficiency)


def collective_seconds(volume: float, link: float, hw: DictConfig, calls: float = 1.0) -> float:
    """``volume`` bytes a rank sends in ring collectives at ``link`` bytes/s (``_link``: what they reach),
    plus each call's latency."""
    if volume <= 0:
        return 0.0
    return volume / link + calls * hw.collective_latency


def _busiest_rank(cfg: DictConfig, layout: Layout) -> tuple[int, bool]:
    """The blocks of the pipeline rank with the most (a step waits for the slowest stage), and whether it
    holds the head: its stages as the schedule places them (``stage_to_rank``) on the balanced split."""
    if layout.pp == 1:
        return cfg.model.n_layers, True
    n_stages = layout.pp * layout.stages_per_rank
    ranges = split_layers(cfg.model.n_layers, n_stages)
    owners = stage_to_rank(layout.pp_schedule, layout.pp, n_stages)
    load = {rank: (0, False) for rank in range(layout.pp)}
    for stage, (rank, layers) in enumerate(zip(owners, ranges, strict=True)):
        blocks, head = load[rank]
        load[rank] = (blocks + len(layers), head or stage == n_stages - 1)
    return max(load.values(), key=lambda item: (item[0] + (1 if item[1] else 0), item[1]))


def step_time(cfg: DictConfig, layout: Layout, hw: DictConfig) -> dict[str, float]:
    """Seconds of one optimizer step by parts: compute (by kind under ``compute/``), the pipeline's
    bubble, each axis's communication and the share of it compute does not hide."""
    m = cfg.model
    N = parameter_count(m)
    s, L, h = cfg.data.seq_len, m.n_layers, m.dim
    M = microbatches_per_step(cfg, layout)
    blocks, head = _busiest_rank(cfg, layout)
    per_micro = micro_batch_seconds(cfg, layout, hw, blocks, head=head)
    parts = {f"compute/{k}": M * v for k, v in per_micro.items()}
    parts["compute/optimizer"] = optimizer_seconds(cfg, layout, hw)
    compute = sum(parts.values())
    backward = compute * 2 / 3  # what DDP's and FSDP's gradient reductions can hide behind
    times = {"compute": compute, **parts, "bubble": compute * bubble_ratio(layout, M)}
    gpn = hw.gpus_per_node
    pbytes = layout.element_bytes
    N_experts = expert_parameter_count(m)
    d = layout.dp if layout.zero == "none" else layout.shards
    # parameters one rank's data-parallel group handles: the dense ones over d ranks, and the experts
    # expert parallelism leaves the rank over the d / ep ranks that hold the same experts
    groups = [((N - N_experts) / (layout.tp * layout.pp), d)]
    if N_experts:
        groups.append((N_experts / (layout.ep * layout.pp), max(1, d // layout.ep)))
    # the gradients' reduce-scatter (and HSDP's all-reduce) once a step, or every micro-batch
    # (parallel.fsdp.sync_each_microbatch)
    reductions = M if layout.sync_each_microbatch and layout.zero != "none" else 1
    volumes = []
    for P_rank, ranks in groups:
        ring = (ranks - 1) / ranks if ranks > 1 else 0.0
        if layout.zero == "none":
            volumes.append(2 * ring * 4 * P_rank)
        elif layout.zero in ("optimizer", "shard_grad_op"):
            volumes.append(ring * (4 * reductions * P_rank + pbytes * P_rank))
        else:
            volumes.append(ring * (4 * reductions * P_rank + 2 * M * pbytes * P_rank))
    volume = sum(volumes)
    P_rank = N / (layout.tp * layout.pp)
    dp_link = _link(layout, "dp_shard" if layout.zero == "hybrid" else "dp", gpn, hw)
    units = blocks + 1  # FSDP's units (a block each, and the root), or DDP's buckets at least as many
    calls = (3 * M if layout.zero in ("full", "hybrid") else 2) * units
    times["dp"] = collective_seconds(volume, dp_link, hw, calls if volume else 0)
    if layout.zero in ("full", "hybrid", "shard_grad_op") and hw.get("fsdp_unit_overhead", 0.0):
        times["fsdp_hooks"] = hw.fsdp_unit_overhead * units * M  # each unit's hooks, every micro-batch
    if N_experts:  # the experts' share of it (part of "dp", not added again to the total)
        times["dp_experts"] = volumes[-1] / dp_link
    if layout.zero == "hybrid" and layout.dp_replicate > 1:
        # HSDP: gathers and reduce-scatters stay in the shard group; the replicas all-reduce the
        # gradient shards (fp32) once a step (or every micro-batch, as above), over the links that join them.
        volume = 2 * (layout.dp_replicate - 1) / layout.dp_replicate * 4 * P_rank / d * reductions
        times["dp"] += collective_seconds(volume, _link(layout, "dp", gpn, hw), hw, units * reductions)
    act = s // layout.cp * layout.micro_batch_size * h * pbytes
    tp_blocks = max(len(r) for r in split_layers(L, layout.pp))
    if layout.tp > 1:  # two all-reduces (or gather + reduce-scatter pairs) forward, two backward; exposed
        # a recomputed block's forward all-reduces again
        rounds = 4 + 2 * (1 if layout.recompute == "full" else layout.fully_recomputed(tp_blocks) / tp_blocks)
        volume = rounds * tp_blocks * M * 2 * (layout.tp - 1) / layout.tp * act
        times["tp"] = collective_seconds(volume, _link(layout, "tp", gpn, hw), hw, rounds * tp_blocks * M)
    if layout.tp > 1 and hw.get("tp_linear_overhead", 0.0):
        # each sharded linear's host work (DTensor), forward and backward, per micro-batch; the embedding
        # and the head are sharded too
        times["tp_dispatch"] = hw.tp_linear_overhead * (tp_linears(cfg) * tp_blocks + 2) * M
    if layout.pp > 1:
        # Stage boundaries: each micro-batch's activation forward and its gradient back. In the steady
        # state a send runs beside the next micro-batch's compute; the first micro-batch's hops through
        # every stage boundary (and its gradient's back) are on the critical path.
        hops = 2 * (layout.pp * layout.stages_per_rank - 1)
        times["pp"] = hops * collective_seconds(act, _link(layout, "pp", gpn, hw), hw)
    if layout.cp > 1:
        kv = 2 * (s // layout.cp) * layout.micro_batch_size * head_dim(m) * m.n_kv_heads * pbytes
        # K, V out cp - 1 times forward and again backward; their fp32 gradients cp moves home (the
        # ring's count: tests/test_bench.py measures it). Each transfer runs behind the block's attention
        # on the chunk before it: what the attention does not cover is exposed.
        volume = blocks * M * (2 * (layout.cp - 1) * kv + layout.cp * kv * 4 / pbytes)
        transfer = collective_seconds(volume, _link(layout, "cp", gpn, hw), hw, blocks * M * 3 * (layout.cp - 1))
        times["cp"] = max(0.0, transfer - times["compute/attention"] * hw.get("comm_overlap", 1.0))
    if layout.cp > 1 and hw.get("cp_ring_overhead", 0.0):
        # each block's ring attention's host work (its steps' kernels, merges and sends), forward and
        # backward, per micro-batch
        times["cp_dispatch"] = hw.cp_ring_overhead * blocks * M
    if layout.ep > 1:
        # the share of each rank's all-to-all that goes to the other ranks, over the links of the ep
        # group: ep takes the innermost of the dp x cp ranks, so it spans tp x ep neighbouring ranks
        link = hw.intra_node_bandwidth if layout.tp * layout.ep <= gpn else hw.inter_node_bandwidth
        volume = all_to_all_bytes(cfg, layout) * (layout.ep - 1) / layout.ep
        # each is a round of messages to every rank of the group, small for a small model: its latency
        times["ep"] = volume / link + all_to_all_count(cfg, layout) * ALL_TO_ALL_LATENCY
    # FSDP prefetches the next unit's gather behind this one's compute, and DDP reduces buckets behind the
    # backward: hidden up to the compute they run beside; the first unit's gather and the last
    # reduction wait for nothing to hide behind.
    hide = (backward if layout.zero in ("none", "optimizer", "shard_grad_op") else compute) * hw.get(
        "comm_overlap", 1.0
    )
    times["dp_exposed"] = max(0.0, times["dp"] - hide) + (times["dp"] / units if times["dp"] else 0.0)
    times["total"] = sum(v for k, v in times.items() if k not in ("dp", "dp_experts") and not k.startswith("compute/"))
    return times


def published_flops_per_token(cfg: DictConfig) -> float:
    """``flops_per_token`` as torchtitan's and the papers' MFU counts it: N all the parameters a token goes
    through, the input embedding's too (``flops_parameters`` leaves that lookup out)."""
    m = cfg.model
    return flops_per_token(active_parameter_count(m), m.n_layers, m.n_heads * head_dim(m), cfg.data.seq_len)


def throughput(cfg: DictConfig, layout: Layout, hw: DictConfig, times: dict[str, float]) -> dict[str, float]:
    """Tokens per second per device and MFU (of the bf16 peak, as published runs count it) of a step."""
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    per_device = tokens / times["total"] / layout.world
    return {
        "tokens_per_s_per_device": per_device,
        "mfu": per_device * published_flops_per_token(cfg) / hw.peak_bf16_flops,
    }
