"""How long one optimizer step takes, by arithmetic: model FLOPs over the devices' assumed throughput,
the pipeline bubble, and each parallel group's communication over its link.

The model and the communication volumes are derived in docs/planning.md ("Step time").
"""

from __future__ import annotations

import math
from typing import Optional

from omegaconf import DictConfig

from curry_train.layout.pipeline import canonical_kind, split_layers
from curry_train.model.config import head_dim
from curry_train.planning.layout import Layout, microbatches_per_step
from curry_train.planning.memory import (
    active_parameter_count,
    expert_parameter_count,
    parameter_count,
    parameter_shapes,
)

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
    pbytes = 2 if layout.mixed_precision == "bf16" else 4
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
    """Bandwidth of ``axis``'s groups: the mesh is (pp, dp_replicate, dp_shard, cp, tp), tp innermost,
    so a group spans ``stride * size`` consecutive ranks."""
    order = ("tp", "cp", "dp_shard", "dp_replicate", "pp")
    stride = 1
    for name in order:
        size = layout.sizes()[name]
        if name == axis or (axis == "dp" and name == "dp_shard"):
            span = stride * size * (layout.dp_replicate if axis == "dp" else 1)
            return hw.intra_node_bandwidth if span <= gpus_per_node else hw.inter_node_bandwidth
        stride *= size
    raise ValueError(axis)


def step_time(cfg: DictConfig, layout: Layout, hw: DictConfig) -> dict[str, float]:
    """Seconds of one optimizer step by parts: compute, bubble, and each axis's communication."""
    m = cfg.model
    N = parameter_count(m)
    s, L, h = cfg.data.seq_len, m.n_layers, m.dim
    N_matmul = flops_parameters(m)
    per_token = flops_per_token(N_matmul, L, m.n_heads * head_dim(m), s)
    if layout.recompute == "full":
        per_token += 2 * N_matmul + 4 * L * h * s
    tokens = cfg.data.global_batch_size * s
    compute = tokens * per_token / (layout.world * hw.peak_bf16_flops * hw.mfu)
    M = microbatches_per_step(cfg, layout)
    times = {"compute": compute, "bubble": compute * bubble_ratio(layout, M)}
    gpn = hw.gpus_per_node
    pbytes = 2 if layout.mixed_precision == "bf16" else 4
    N_experts = expert_parameter_count(m)
    d = layout.dp if layout.zero == "none" else layout.shards
    # parameters one rank's data-parallel group handles: the dense ones over d ranks, and the experts
    # expert parallelism leaves the rank over the d / ep ranks that hold the same experts
    groups = [((N - N_experts) / (layout.tp * layout.pp), d)]
    if N_experts:
        groups.append((N_experts / (layout.ep * layout.pp), max(1, d // layout.ep)))
    volumes = []
    for P_rank, ranks in groups:
        ring = (ranks - 1) / ranks if ranks > 1 else 0.0
        if layout.zero == "none":
            volumes.append(2 * ring * 4 * P_rank)
        elif layout.zero in ("optimizer", "shard_grad_op"):
            volumes.append(ring * (4 * P_rank + pbytes * P_rank))
        else:
            volumes.append(ring * (4 * P_rank + 2 * M * pbytes * P_rank))
    volume = sum(volumes)
    P_rank = N / (layout.tp * layout.pp)
    dp_link = _link(layout, "dp_shard" if layout.zero == "hybrid" else "dp", gpn, hw)
    times["dp"] = volume / dp_link if volume else 0.0
    if N_experts:  # the experts' share of it (part of "dp", not added again to the total)
        times["dp_experts"] = volumes[-1] / dp_link
    if layout.zero == "hybrid" and layout.dp_replicate > 1:
        # HSDP: gathers and reduce-scatters stay in the shard group; the replicas all-reduce the
        # gradient shards (fp32) once a step, over the links that join them.
        volume = 2 * (layout.dp_replicate - 1) / layout.dp_replicate * 4 * P_rank / d
        times["dp"] += volume / _link(layout, "dp", gpn, hw)
    act = s // layout.cp * layout.micro_batch_size * h * pbytes
    blocks = max(len(r) for r in split_layers(L, layout.pp))
    if layout.tp > 1:
        volume = 4 * blocks * M * 2 * (layout.tp - 1) / layout.tp * act
        times["tp"] = volume / _link(layout, "tp", gpn, hw)
    if layout.pp > 1:  # each of the rank's stages sends its boundary forward and its gradient back
        times["pp"] = 2 * M * layout.stages_per_rank * act / _link(layout, "pp", gpn, hw)
    if layout.cp > 1:
        kv = 2 * (s // layout.cp) * layout.micro_batch_size * head_dim(m) * m.n_kv_heads * pbytes
        # K, V out cp - 1 times forward and again backward; their fp32 gradients cp moves home (the
        # ring's count: tests/test_bench.py measures it).
        volume = blocks * M * (2 * (layout.cp - 1) * kv + layout.cp * kv * 4 / pbytes)
        times["cp"] = volume / _link(layout, "cp", gpn, hw)
    if layout.ep > 1:
        # the share of each rank's all-to-all that goes to the other ranks, over the links of the ep
        # group: ep takes the innermost of the dp x cp ranks, so it spans tp x ep neighbouring ranks
        link = hw.intra_node_bandwidth if layout.tp * layout.ep <= gpn else hw.inter_node_bandwidth
        volume = all_to_all_bytes(cfg, layout) * (layout.ep - 1) / layout.ep
        # each is a round of messages to every rank of the group, small for a small model: its latency
        times["ep"] = volume / link + all_to_all_count(cfg, layout) * ALL_TO_ALL_LATENCY
    times["dp_exposed"] = max(0.0, times["dp"] - compute)
    times["total"] = sum(v for k, v in times.items() if k not in ("dp", "dp_experts"))
    return times
