"""Which layout to run: per-rank memory and step time of candidate layouts, by arithmetic.

The decision guide, as numbers: add data parallelism, then ZeRO-1, ZeRO-2, ZeRO-3 (FSDP), then
activation recompute, then tensor parallelism (only when a step's memory exceeds a device), pipeline
parallelism (across nodes), context parallelism (when the sequence breaks memory), one primitive at a
time, and stop at the first layout that fits ``hardware`` with ``HEADROOM`` to spare.

What a rank holds (``estimate``), in bytes:

* model state, exactly as curry-train holds it at the optimizer step (``model_state``): ZeRO's
  formulas (``validation.memory.zero_formula_terms``) over the rank's own parameters (its tensor-
  parallel shards, its pipeline stage's blocks; the model built on the meta device, so P is exact),
  plus FSDP2's padding (each first dimension split in ``ceil(rows / shards)`` row chunks; gradients
  and parameters padded, Adam's state the rank's own rows only) and AdamW's 4-byte ``step`` per
  tensor. Sharded FSDP2 keeps fp32 master parameters and fp32 gradient shards whatever the compute
  dtype; ZeRO-1 in bf16 keeps bf16 full parameters and fp32 shards (see tests/test_memory.py);
* transient model state during forward/backward: ZeRO-3 keeps the root (embedding, head) gathered
  and gathers one unit ahead (two blocks in compute dtype, one block's fp32 gradient before its
  reduce-scatter); ZeRO-2 (``shard_grad_op``) keeps every unit gathered; ZeRO-1 in bf16 holds the
  bf16 full gradients until they are reduced;
* activations, counted per block as Korthikanti et al. 2022 ("Reducing Activation Recomputation in
  Large Transformer Models", section 4) count a GPT layer (``sbh(34 + 5as/h)`` bytes in 16-bit:
  each tensor autograd keeps for backward), applied to this model's ops (``block_activation_bytes``;
  s sequence, b micro-batch, h width, f MLP width, a heads, e bytes of the compute dtype):
  two RMSNorms, each keeping its input and normalized input in fp32 and its output (the matmuls'
  input) in e: ``2(8 + e)sbh``; attention keeping q, k and v repeated to the query heads, the
  output and its fp32 log-sum-exp: ``4e*sbh + 4sba`` (a kernel without fusion adds Korthikanti's
  ``5as^2b`` scores); SwiGLU keeping w1's and w3's outputs, SiLU's and the product: ``4e*sbf``;
  the residual dropouts' 1-byte masks ``2sbh`` when ``model.dropout > 0``. Tensor parallelism
  divides attention and MLP by tp; sequence parallelism also the norms, whose outputs the
  column-parallel matmuls keep gathered over the sequence. Recompute changes what a block keeps:
  ``selective`` (per-op, ``primitives/recompute.py``) its input and the outputs of its matmuls
  and attention; ``full`` its input only; the peak is then the larger of the end of forward and the
  last block's backward, which recomputes its whole set. Times the blocks per stage and the
  stage forwards in flight on each pipeline rank (``block_forwards_per_rank``: gpipe all M, 1F1B
  pp - rank, the looped and V-shaped schedules as PyTorch orders them), plus the final norm and the
  loss on the rank of the last stage; the fullest rank counts. Context parallelism divides s.
  Checked against PyTorch's memory tracker on the debug model (tests/test_memory.py: within 1%
  without recompute, with selective and with cp, 2% with tp and sequence parallelism, 5% above with
  full recompute);
* the loss: the logits in e and cross-entropy's fp32 log-probabilities (plus an fp32 copy of
  half-precision logits: ``module.token_loss`` upcasts them), over the vocabulary shard (tp,
  loss_parallel) and the sequence shard (cp);
* ``hardware.reserved_bytes`` (runtime, communication buffers).

Step time (``estimate``): ``(6N + 12*L*h*s)`` FLOPs per token (N parameters less the input
embedding, a lookup, as bench's MFU counts them; forward 1/3 of it;
full recompute adds a forward; selective recomputes elementwise ops only, no FLOPs counted) over ``world * peak * mfu``
(``hardware.mfu``, assumed 0.4), plus the pipeline bubble ``(pp - 1) / (v * M)`` of the compute (v
stages per rank for the looped schedules; none for the zero-bubble kinds), plus the
communication volume of each group over its link (a group spanning nodes uses the inter-node
bandwidth). Data-parallel traffic overlaps compute (DDP's buckets, FSDP's prefetched gathers and
reduce-scatters run while other blocks compute), so only what exceeds the compute counts
(``dp_exposed``); the tensor-parallel all-reduces, the pipeline's sends and the context-parallel ring
are counted whole, with no overlap -- an upper bound on those:

* data parallel: DDP all-reduces fp32 gradients (``2(d-1)/d * 4P``); ZeRO-1/2 reduce-scatter them
  and all-gather the updated parameters; ZeRO-3 all-gathers parameters in forward and backward of
  every micro-batch and reduce-scatters gradients once a step; ring collectives' ``(d-1)/d``;
* tensor parallel: 4 all-reduces (or all-gather + reduce-scatter with sequence parallelism, the
  same traffic) of ``s*b*h`` activations per block and micro-batch, forward and backward;
* pipeline: the stage boundary's ``s*b*h`` activations forward, their gradient backward, per
  micro-batch and stage of the rank;
* context parallel: the ring passes K and V (``2*s/cp*b*kv_dim``) ``cp - 1`` times per block and
  micro-batch forward and again backward, and their fp32 gradients ``cp`` moves home.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from curry_train.validation.memory import tensor_parallel_shapes, zero_formula_terms

HEADROOM = 0.10  # of device memory, left free by a recommendation (allocator, spikes, estimate error)
ZERO_MODES = ("none", "optimizer", "shard_grad_op", "full")  # DDP, ZeRO-1, ZeRO-2, ZeRO-3
ZERO_NAMES = {"none": "DDP", "optimizer": "ZeRO-1", "shard_grad_op": "ZeRO-2", "full": "ZeRO-3", "hybrid": "HSDP"}


def loss_bytes_per_logit(mixed_precision: str) -> int:
    """The logits in the compute dtype, cross-entropy's fp32 log-probabilities and, for half-precision
    logits, their fp32 copy (``module.token_loss`` upcasts them)."""
    return 8 if mixed_precision == "fp32" else 2 + 4 + 4


@dataclass(frozen=True)
class Layout:
    """A candidate: the parallel degrees and the knobs that change a rank's memory."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    zero: str = "none"  # none (DDP) | optimizer | shard_grad_op | full | hybrid
    mixed_precision: str = "fp32"  # fp32 | bf16: compute dtype
    recompute: str = "none"  # none | selective | full
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    pp_schedule: str = "1F1B"
    virtual_stages: Optional[int] = None  # parallel.pp.virtual_stages: None = the schedule's default

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages one rank holds (``pipeline_schedule.stages_per_rank``); 1 without pp."""
        from curry_train.primitives.pipeline_schedule import stages_per_rank

        return stages_per_rank(self.pp_schedule, self.virtual_stages) if self.pp > 1 else 1

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def shards(self) -> int:
        """Ranks that share one copy of the model state: FSDP shards over dp_shard x cp."""
        return 1 if self.zero == "none" else self.dp_shard * self.cp

    def sizes(self) -> dict[str, int]:
        return {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "tp": self.tp, "pp": self.pp, "cp": self.cp}

    def options(self) -> list[str]:
        """The ``parallel`` options this layout composes, in ``+`` order."""
        others = [name for name in ("tp", "pp", "cp") if getattr(self, name) > 1]
        if self.zero != "none":
            return ["fsdp", *others]
        # tp and pp replicate over the ranks they leave themselves (parallel=dp+tp is refused).
        return others if {"tp", "pp"} & set(others) else ["dp", *others]

    def describe(self) -> str:
        parts = [ZERO_NAMES[self.zero] + (f" over {self.shards}" if self.zero != "none" else f" x{self.dp}")]
        parts += [f"{name}={getattr(self, name)}" for name in ("tp", "pp", "cp") if getattr(self, name) > 1]
        if self.pp > 1 and (self.pp_schedule != "1F1B" or self.stages_per_rank > 1):
            parts.append(f"{self.pp_schedule}" + (f" v={self.stages_per_rank}" if self.stages_per_rank > 1 else ""))
        if self.sequence_parallel:
            parts.append("sequence parallel")
        if self.recompute != "none":
            parts.append(f"recompute={self.recompute}")
        parts.append(f"{self.mixed_precision}, micro-batch {self.micro_batch_size}")
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# The model's shapes


@functools.lru_cache(maxsize=128)  # capacity sweeps estimate a family of models at several tp
def _shapes(model_yaml: str, tp: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from curry_train.model import Llama

    with torch.device("meta"):
        model = Llama(OmegaConf.create(model_yaml))
    return tuple((name, tuple(shape)) for name, shape in tensor_parallel_shapes(model, tp).items())


def rank_shapes(model_cfg: DictConfig, tp: int = 1, pp: int = 1, stage: int = 0, schedule: str = "1F1B",
                virtual_stages: Optional[int] = None) -> list[tuple[int, ...]]:
    """Shapes of the parameters one rank holds: its tensor-parallel shards of the blocks of the
    stages pipeline rank ``stage`` holds under ``schedule`` (``pipeline_schedule.pipeline_stages``:
    ``pp x stages_per_rank`` stages, looped or V-shaped over the ranks; the embedding with the first
    stage, norm and head with the last, so a V-shaped schedule's rank 0 holds both)."""
    ranges, owner = stage_map(model_cfg.n_layers, Layout(pp=pp, pp_schedule=schedule, virtual_stages=virtual_stages))
    n_stages = len(owner)
    local = [s for s in range(n_stages) if owner[s] == stage]
    blocks = {i for s in local for i in ranges[s]}
    shapes = []
    for name, shape in _shapes(OmegaConf.to_yaml(model_cfg), tp):
        head, _, rest = name.partition(".")
        if head == "layers":
            keep = int(rest.split(".")[0]) in blocks
        elif head == "tok_embeddings":
            keep = 0 in local
        else:
            keep = n_stages - 1 in local
        if keep:
            shapes.append(shape)
    return shapes


def stage_map(n_layers: int, layout: Layout) -> tuple[list[range], list[int]]:
    """The strategy's pipeline cut for ``layout``: each stage's blocks (``split_layers``) and the
    pipeline rank holding it (``stage_to_rank``); one stage on rank 0 without pp."""
    from curry_train.primitives.pipeline_schedule import split_layers, stage_to_rank

    n_stages = layout.pp * layout.stages_per_rank
    return split_layers(n_layers, n_stages), stage_to_rank(layout.pp_schedule, layout.pp, n_stages)


def parameter_count(model_cfg: DictConfig) -> int:
    return sum(math.prod(shape) for shape in rank_shapes(model_cfg))


def flops_parameters(model_cfg: DictConfig) -> int:
    """N of ``flops_per_token``: the model's parameters less the input embedding's (a lookup, no
    matmul; tied to the head, it is the head's matmul and counts), as torchtitan counts them."""
    shapes = dict(_shapes(OmegaConf.to_yaml(model_cfg), 1))
    embedding = 0 if model_cfg.tie_embeddings else math.prod(shapes["tok_embeddings.weight"])
    return sum(math.prod(shape) for shape in shapes.values()) - embedding


# ----------------------------------------------------------------------------------------------
# Model state


def model_state(shapes: Sequence[tuple[int, ...]], zero: str, shards: int, mixed_precision: str = "fp32",
                shard_rank: int = 0, replicas: int = 1) -> dict[str, int]:
    """Bytes of parameters, gradients and AdamW state one rank holds at the optimizer step, as
    curry-train holds them (module docstring); ``shard_rank`` 0 holds the most (whole chunks).

    ``shards``: the ranks the state is split over (FSDP2's shard mesh: dp_shard x cp; for hybrid the
    ranks of one replica group); ``replicas`` is only for ZeRO's formula of hybrid."""
    P = sum(math.prod(s) for s in shapes)
    padded = own = padded_full = 0
    for shape in shapes:
        rows, row = shape[0], math.prod(shape[1:])
        chunk = math.ceil(rows / shards)
        padded += chunk * row
        own += max(0, min(chunk, rows - shard_rank * chunk)) * row
        padded_full += chunk * shards * row
    step = 4 * len(shapes)  # AdamW's step counter, a 4-byte tensor per parameter
    if zero in ("none", "dp", "no_shard"):
        terms = zero_formula_terms("dp", P, 1)  # autocast keeps fp32 state; DDP replicates it
        return {"params": terms["params"], "grads": terms["grads"], "optimizer": terms["optimizer"] + step}
    if zero == "optimizer":
        if mixed_precision == "fp32":  # the shard is a view into the full (padded) parameters
            return {"params": 4 * padded_full, "grads": 4 * P, "optimizer": 8 * own + step}
        return {"params": 2 * padded_full + 4 * own, "grads": 4 * own, "optimizer": 8 * own + step}
    # ZeRO-3, HSDP, and ZeRO-2 (which reshards after backward: at the step it holds ZeRO-3's state).
    d = shards * replicas if zero == "hybrid" else shards
    terms = zero_formula_terms("hybrid" if zero == "hybrid" else "full", P, d, "fp32", replicas)
    return {
        "params": terms["params"] + 4 * (padded - terms["params"] // 4),
        "grads": terms["grads"] + 4 * (padded - terms["grads"] // 4),
        "optimizer": 8 * own + step,
    }


def _transient_state(cfg_model: DictConfig, shapes: Sequence[tuple[int, ...]], layout: Layout, stage: int = 0) -> int:
    """Model-state bytes that exist only during forward/backward (module docstring), on pipeline rank
    ``stage``: ZeRO-3 keeps gathered only the embedding and head this rank holds."""
    pbytes = 2 if layout.mixed_precision == "bf16" else 4
    P = sum(math.prod(s) for s in shapes)
    if layout.zero == "shard_grad_op":
        return pbytes * P + 4 * P // max(1, cfg_model.n_layers)  # all units gathered, one block's fp32 gradient
    if layout.zero in ("full", "hybrid"):
        whole = rank_shapes(cfg_model, layout.tp)
        _, owner = stage_map(cfg_model.n_layers, layout)
        embedding, head = math.prod(whole[0]), math.prod(whole[-1])
        block = (sum(math.prod(s) for s in whole) - embedding - head) / max(1, cfg_model.n_layers)
        kept = embedding * (owner[0] == stage) + head * (owner[-1] == stage)  # where this rank holds them
        return int(pbytes * (kept + 2 * block) + 4 * block)
    if layout.zero == "optimizer" and layout.mixed_precision == "bf16":
        return 2 * P  # bf16 full gradients until reduced into the fp32 shards
    return 0


# ----------------------------------------------------------------------------------------------
# Activations and the step


def block_activation_bytes(cfg: DictConfig, layout: Layout, flash_attention: bool) -> dict[str, float]:
    """Bytes one block keeps for backward on one rank, by what recompute does with them (module
    docstring): ``all`` (no recompute), ``selective`` (what per-op selective recompute keeps: the
    block's input and the matmul and attention outputs) and ``input`` (what full recompute keeps)."""
    m = cfg.model
    s, b, h, f, a = cfg.data.seq_len // layout.cp, layout.micro_batch_size, m.dim, m.ffn_dim, m.n_heads
    kv = h // a * m.n_kv_heads
    t, sp = layout.tp, layout.sequence_parallel
    e = 2 if layout.mixed_precision == "bf16" else 4
    seq = t if sp else 1  # sequence parallelism splits what lies between the tensor-parallel regions
    # RMSNorm: its input in fp32 (an fp32 input itself, else an fp32 copy), the fp32 normalized input,
    # its rstd, and the output in the compute dtype (the matmuls' input; gathered under SP).
    norm = (4 + 4) * s * b * h / seq + 4 * s * b / seq + e * s * b * h
    # Attention: q, k and v repeated to the query heads, the output and its log-sum-exp; a kernel
    # without fusion also keeps Korthikanti's 5as^2b (softmax, dropout mask and output).
    attention = (4 * e * s * b * h + 4 * s * b * a) / t
    if not flash_attention:
        attention += 5 * a * s * s * b * e / 2 / t
    mlp = 4 * e * s * b * f / t  # w1 and w3 outputs, SiLU's output, the product
    dropout = 2 * s * b * h / seq if m.dropout > 0 else 0  # 1-byte masks of the two residual dropouts
    whole = 2 * norm + attention + mlp + dropout
    block_input = e * s * b * h / seq
    matmul_outputs = e * s * b * (h + 2 * kv + f * 2) / t + 2 * e * s * b * h  # wq, wk, wv, w1, w3; wo, w2 (before reduction)
    sdpa_outputs = (e * s * b * h + 4 * s * b * a) / t
    return {"all": whole, "selective": block_input + matmul_outputs + sdpa_outputs, "input": block_input}


def activation_bytes(cfg: DictConfig, layout: Layout, flash_attention: bool) -> dict[str, int]:
    """Peak activation and loss bytes of the fullest pipeline rank (module docstring): every rank
    keeps its blocks' forwards in flight; only the one holding the last stage keeps the final norm
    and the loss (one micro-batch's: its backward follows its forward at once)."""
    m = cfg.model
    s, b = cfg.data.seq_len // layout.cp, layout.micro_batch_size
    block = block_activation_bytes(cfg, layout, flash_attention)
    kept = {"none": "all", "selective": "selective", "full": "input"}[layout.recompute]
    e = 2 if layout.mixed_precision == "bf16" else 4
    seq = layout.tp if layout.sequence_parallel else 1
    final_norm = (4 + 4) * s * b * m.dim / seq + 4 * s * b / seq + e * s * b * m.dim
    loss = loss_bytes_per_logit(layout.mixed_precision) * s * b * m.vocab_size / layout.tp
    peaks = []
    for forwards, holds_last in block_forwards_per_rank(layout, m.n_layers, _microbatches(cfg, layout)):
        # A stage's forward of one micro-batch keeps its blocks' tensors until its backward. The
        # peak: the end of a forward (the kept tensors, and on the last stage the final norm and the
        # loss), or the backward of a block, which recomputes its whole set next to the others'.
        stored = block[kept] * forwards
        recomputing = stored - block[kept] + block["all"]
        rank_loss = loss if holds_last else 0.0
        total = max(stored + (final_norm + loss if holds_last else 0.0), recomputing)
        peaks.append((total, total - rank_loss, rank_loss))
    _, activations, rank_loss = max(peaks)
    return {"activations": int(activations), "loss": int(rank_loss)}


def chunks_in_flight(schedule: str, pp: int, v: int, microbatches: int, rank: int = 0) -> int:
    """Stage forwards (of one micro-batch through one of the rank's ``v`` stages) whose activations
    pipeline rank ``rank`` holds at its peak, waiting for their backward (the last part of it, for
    the zero-bubble kinds, whose weight-gradient step still reads the stored inputs). As PyTorch's
    schedules order them (tests/test_advise.py replays their ``pipeline_order``):

    * gpipe: every micro-batch's, ``M`` (all forwards run before any backward);
    * 1F1B: ``min(pp - rank, M)`` (``pp - 1 - rank`` warm-up forwards, then one backward per forward);
    * interleaved: the warm-up ``(v - 1) * pp + 2 * (pp - 1 - rank)`` plus the steady state's one, at
      most ``v * M``; each ``1/v`` of a rank's blocks, so rank 0 keeps ``1 + (pp - 1) / (pp * v)``
      times 1F1B's (Narayanan et al., 2021, "Efficient Large-Scale Language Model Training on GPU
      Clusters", section 2.2);
    * interleaved_zb: ``v * pp`` on every rank, at most ``v * M``: rank 0's 1F1B memory;
    * zbv: ``2 * pp`` (two half-rank stages, M >= 2pp): rank 0's 1F1B memory, on every rank;
    * dualpipev: ``2 * pp + 1`` half-rank forwards on every rank.
    """
    from curry_train.primitives.pipeline_schedule import canonical_kind

    if pp == 1:
        return 1
    key = canonical_kind(schedule)
    if key == "gpipe":
        return microbatches
    if key == "1f1b":
        return min(pp - rank, microbatches)
    if key == "interleaved":
        return min((v - 1) * pp + 2 * (pp - 1 - rank) + 1, v * microbatches)
    if key == "interleaved_zb":
        return min(v * pp, v * microbatches)
    if key == "zbv":
        return min(2 * pp, 2 * microbatches)
    return min(2 * pp + 1, 2 * microbatches)  # dualpipev


def block_forwards_per_rank(layout: Layout, n_layers: int, microbatches: int) -> list[tuple[float, bool]]:
    """Per pipeline rank: blocks times micro-batches whose activations it keeps at its peak (its
    forwards in flight, ``chunks_in_flight``, times the mean blocks of its stages, as the strategy
    splits them: ``stage_map``), and whether it holds the last stage (the final norm, the head and
    the loss). Without pp: one rank, all blocks, once."""
    v = layout.stages_per_rank
    ranges, owner = stage_map(n_layers, layout)
    return [
        (chunks_in_flight(layout.pp_schedule, layout.pp, v, microbatches, rank)
         * sum(len(r) for r, o in zip(ranges, owner) if o == rank) / v, owner[-1] == rank)
        for rank in range(layout.pp)
    ]


def _stage_blocks(n_layers: int, pp: int) -> list[range]:
    from curry_train.primitives.pipeline_schedule import split_layers

    return split_layers(n_layers, pp)


def _microbatches(cfg: DictConfig, layout: Layout) -> int:
    return max(1, cfg.data.global_batch_size // (layout.dp * layout.micro_batch_size))


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


def flops_per_token(parameters: int, n_layers: int, dim: int, seq_len: int) -> int:
    """Model FLOPs of training on one token, forward and backward (Kaplan et al., 2020; PaLM's MFU,
    Chowdhery et al., 2022): ``6N + 12*L*h*s``. A matmul with N weights costs 2N FLOPs per token
    forward and 4N backward (the gradients of its input and of its weights); attention's two
    sequence-long products (``QK^T`` and the weighted sum of V) cost ``2*s*h`` each per token and
    layer forward, ``12*L*h*s`` with backward (causal masking not discounted, as in PaLM). Recompute
    is not model FLOPs: it adds hardware FLOPs only."""
    return 6 * parameters + 12 * n_layers * dim * seq_len


def bubble_ratio(layout: Layout, microbatches: int) -> float:
    """The pipeline bubble over the compute: ``(pp - 1) / (v * M)``, from the bubble's share of a step
    (``validation.bubble.bubble_formula``: ``(pp - 1) / (v * M + pp - 1)``; v > 1 for the looped
    schedules); 0 without pp and for the zero-bubble kinds."""
    from curry_train.validation.bubble import bubble_formula

    if layout.pp == 1:
        return 0.0
    share = bubble_formula(layout.pp_schedule, layout.pp, microbatches, layout.stages_per_rank)
    return 0.0 if share is None else share / (1 - share)


def step_time(cfg: DictConfig, layout: Layout, hw: DictConfig) -> dict[str, float]:
    """Seconds of one optimizer step by parts: compute, bubble, and each axis's communication."""
    m = cfg.model
    N = parameter_count(m)
    s, L, h = cfg.data.seq_len, m.n_layers, m.dim
    N_matmul = flops_parameters(m)
    per_token = flops_per_token(N_matmul, L, h, s)
    if layout.recompute == "full":
        per_token += 2 * N_matmul + 4 * L * h * s
    tokens = cfg.data.global_batch_size * s
    compute = tokens * per_token / (layout.world * hw.peak_bf16_flops * hw.mfu)
    M = _microbatches(cfg, layout)
    times = {"compute": compute, "bubble": compute * bubble_ratio(layout, M)}
    gpn = hw.gpus_per_node
    pbytes = 2 if layout.mixed_precision == "bf16" else 4
    P_rank = N / (layout.tp * layout.pp)  # parameters one rank's data-parallel group handles
    d = layout.dp if layout.zero == "none" else layout.shards
    ring = (d - 1) / d if d > 1 else 0.0
    if layout.zero == "none":
        volume = 2 * ring * 4 * P_rank
    elif layout.zero in ("optimizer", "shard_grad_op"):
        volume = ring * (4 * P_rank + pbytes * P_rank)
    else:
        volume = ring * (4 * P_rank + 2 * M * pbytes * P_rank)
    times["dp"] = volume / _link(layout, "dp_shard" if layout.zero == "hybrid" else "dp", gpn, hw) if volume else 0.0
    if layout.zero == "hybrid" and layout.dp_replicate > 1:
        # HSDP: gathers and reduce-scatters stay in the shard group; the replicas all-reduce the
        # gradient shards (fp32) once a step, over the links that join them.
        volume = 2 * (layout.dp_replicate - 1) / layout.dp_replicate * 4 * P_rank / d
        times["dp"] += volume / _link(layout, "dp", gpn, hw)
    act = s // layout.cp * layout.micro_batch_size * h * pbytes
    blocks = max(len(r) for r in _stage_blocks(L, layout.pp))
    if layout.tp > 1:
        volume = 4 * blocks * M * 2 * (layout.tp - 1) / layout.tp * act
        times["tp"] = volume / _link(layout, "tp", gpn, hw)
    if layout.pp > 1:  # each of the rank's stages sends its boundary forward and its gradient back
        times["pp"] = 2 * M * layout.stages_per_rank * act / _link(layout, "pp", gpn, hw)
    if layout.cp > 1:
        kv = 2 * (s // layout.cp) * layout.micro_batch_size * h * m.n_kv_heads // m.n_heads * pbytes
        # K, V out cp - 1 times forward and again backward; their fp32 gradients cp moves home (the
        # ring's count: tests/test_bench.py measures it).
        volume = blocks * M * (2 * (layout.cp - 1) * kv + layout.cp * kv * 4 / pbytes)
        times["cp"] = volume / _link(layout, "cp", gpn, hw)
    times["dp_exposed"] = max(0.0, times["dp"] - compute)
    times["total"] = sum(v for k, v in times.items() if k != "dp")
    return times


@dataclass
class Estimate:
    layout: Layout
    memory: dict[str, int]  # per rank, by part, and "total"
    capacity: int  # the device's memory less HEADROOM
    time: dict[str, float]

    @property
    def fits(self) -> bool:
        return self.memory["total"] <= self.capacity

    def to_dict(self) -> dict[str, Any]:
        return {"layout": asdict(self.layout), "memory": self.memory, "fits": self.fits, "capacity": self.capacity,
                "step_time": self.time}


def estimate(cfg: DictConfig, layout: Layout) -> Estimate:
    """Per-rank memory (the fullest rank: shard 0, the fullest pipeline rank's activations with the
    largest stage's parameters) and step time of ``layout`` for ``cfg``'s model, data and hardware."""
    hw = cfg.hardware
    states = []
    for stage in range(layout.pp):
        shapes = rank_shapes(cfg.model, layout.tp, layout.pp, stage, layout.pp_schedule, layout.virtual_stages)
        shards = layout.shards
        state = model_state(shapes, layout.zero, shards, layout.mixed_precision, 0, layout.dp_replicate)
        state["transient"] = _transient_state(cfg.model, shapes, layout, stage)
        states.append(state)
    memory = dict(max(states, key=lambda st: sum(st.values())))
    memory.update(activation_bytes(cfg, layout, hw.flash_attention))
    memory["reserved"] = int(hw.reserved_bytes)
    memory["total"] = sum(memory.values())
    capacity = int(hw.memory_bytes * (1 - HEADROOM))
    return Estimate(layout, memory, capacity, step_time(cfg, layout, hw))


# ----------------------------------------------------------------------------------------------
# The walk


@dataclass
class Advice:
    recommended: Optional[Estimate]  # None: nothing fits
    tried: list[tuple[str, Estimate]]  # (step of the walk, its best candidate), in order
    reasons: list[str]  # why each heavier primitive is or is not needed
    command: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        rec = self.recommended
        return {
            "fits": rec is not None,
            "parallel": "+".join(rec.layout.options()) if rec else None,
            "sizes": rec.layout.sizes() if rec else None,
            "memory_per_rank_bytes": rec.memory["total"] if rec else None,
            "memory_breakdown": rec.memory if rec else None,
            "capacity_bytes": rec.capacity if rec else None,
            "step_time_s": rec.time if rec else None,
            "layout": asdict(rec.layout) if rec else None,
            "command": self.command,
            "reasons": self.reasons,
            "tried": [{"step": step, **est.to_dict()} for step, est in self.tried],
        }


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(1, int(math.log2(max(1, limit))) + 1)]


def _divides(cfg: DictConfig, tp: int) -> bool:
    m = cfg.model
    return all(x % tp == 0 for x in (m.n_heads, m.n_kv_heads, m.dim, m.ffn_dim, m.vocab_size))


def _micro_batches(cfg: DictConfig, dp: int) -> list[int]:
    """Micro-batch sizes to try, largest first: the configured one, halved down to 1."""
    size, sizes = cfg.data.micro_batch_size, []
    while size > 1:
        sizes.append(size)
        size //= 2
    local = cfg.data.global_batch_size // dp
    return [m for m in sizes if local % m == 0] + [1]


def _fit(cfg: DictConfig, layouts: Sequence[Layout]) -> tuple[Estimate, bool]:
    """The first layout that fits (in the given order), or the smallest in memory."""
    estimates = [estimate(cfg, layout) for layout in layouts]
    for est in estimates:
        if est.fits:
            return est, True
    return min(estimates, key=lambda e: e.memory["total"]), False


def advise(cfg: DictConfig, overrides: Sequence[str] = ()) -> Advice:
    """Walk the order (module docstring) over ``hardware.nodes x hardware.gpus_per_node`` devices."""
    hw = cfg.hardware
    world, gpn = hw.nodes * hw.gpus_per_node, hw.gpus_per_node
    mp = hw.mixed_precision
    mb = cfg.data.micro_batch_size
    tried: list[tuple[str, Estimate]] = []
    reasons: list[str] = []
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731

    def done(est: Estimate) -> Advice:
        est = _across_nodes(cfg, est, tried, reasons)
        return Advice(est, tried, reasons, train_command(cfg, est.layout, overrides))

    def attempt(step: str, layouts: Sequence[Layout]) -> Optional[Estimate]:
        est, ok = _fit(cfg, layouts)
        tried.append((step, est))
        return est if ok else None

    mb = _micro_batches(cfg, world)[0]
    ddp = Layout(dp_replicate=world, mixed_precision=mp, micro_batch_size=mb)
    if est := attempt("data parallel (DDP)", [ddp]):
        reasons.append(f"DDP fits: {gib(est.memory['total'])} of {gib(est.capacity)} per rank; no sharding needed.")
        return done(est)
    reasons.append(f"DDP needs {gib(tried[-1][1].memory['total'])} per rank, more than {gib(tried[-1][1].capacity)}.")
    if world > 1:
        for zero in ("optimizer", "shard_grad_op", "full"):
            layout = Layout(dp_shard=world, zero=zero, mixed_precision=mp, micro_batch_size=mb)
            if est := attempt(ZERO_NAMES[zero], [layout]):
                reasons.append(f"{ZERO_NAMES[zero]} fits ({gib(est.memory['total'])} per rank); lighter sharding does not.")
                return done(est)
            reasons.append(f"{ZERO_NAMES[zero]} needs {gib(tried[-1][1].memory['total'])} per rank.")
    else:
        reasons.append("one device: there is nothing to shard over.")
    base = Layout(dp_shard=world, zero="full" if world > 1 else "none", dp_replicate=1, mixed_precision=mp)
    smaller = [replace(base, micro_batch_size=m) for m in _micro_batches(cfg, world)[1:]]
    if smaller and (est := attempt("smaller micro-batch (more accumulation)", smaller)):
        reasons.append(f"micro-batch {est.layout.micro_batch_size} (gradient accumulation keeps the global batch) fits.")
        return done(est)
    base = replace(base, micro_batch_size=1)
    for recompute in ("selective", "full"):
        if est := attempt(f"recompute={recompute}", [replace(base, recompute=recompute, micro_batch_size=m)
                                                      for m in _micro_batches(cfg, world)]):
            reasons.append(f"recompute={recompute} fits ({gib(est.memory['total'])} per rank); tp and cp not needed.")
            return done(est)
    base = replace(base, recompute="full")
    last = tried[-1][1]
    # What no layout of these devices divides further: ZeRO-3 already splits the model state over
    # all of them (tp, pp and cp only re-divide it); the gathered units (transient) tp does divide.
    state = sum(last.memory[k] for k in ("params", "grads", "optimizer", "reserved"))
    if state > last.capacity:
        reasons.append(
            f"the model state alone ({gib(state)} per rank with ZeRO-3 over {world}) exceeds {gib(last.capacity)}:"
            " tp, pp and cp only re-divide it over the same devices."
        )
        return Advice(None, tried, reasons + _what_would_fit(cfg, last, world), None)
    state += last.memory["transient"]
    sequence_bound = last.memory["activations"] + last.memory["loss"] > state
    cps = [c for c in _powers_of_two(world) if world % c == 0 and cfg.data.seq_len % (2 * c) == 0]
    tps = [t for t in _powers_of_two(min(gpn, world)) if world % t == 0 and _divides(cfg, t)]
    cp_layouts = [replace(base, cp=c, dp_shard=world // c) for c in cps]
    tp_layouts = [replace(base, tp=t, dp_shard=world // t, sequence_parallel=True) for t in tps]
    steps = [("cp", cp_layouts), ("tp", tp_layouts)] if sequence_bound else [("tp", tp_layouts), ("cp", cp_layouts)]
    if sequence_bound:
        reasons.append(f"activations of one sequence ({gib(last.memory['activations'] + last.memory['loss'])}) outweigh"
                       " the model state: the sequence breaks memory, so context parallelism comes first.")
    else:
        reasons.append("one step's memory exceeds a device even with ZeRO-3 and full recompute: tensor parallelism next.")
    for name, layouts in steps:
        if layouts and (est := attempt(name, layouts)):
            reasons.append(f"{name}={getattr(est.layout, name)} fits ({gib(est.memory['total'])} per rank).")
            return done(est)
    both = [replace(base, tp=t, cp=c, dp_shard=world // (t * c), sequence_parallel=True)
            for t in tps for c in cps if world % (t * c) == 0]
    if both and (est := attempt("tp+cp", both)):
        return done(est)
    reasons.append("no combination of tp and cp fits.")
    return Advice(None, tried, reasons + _what_would_fit(cfg, tried[-1][1], world), None)


SPEEDUP = 0.10  # a heavier layout replaces a lighter one that fits only if its step is this much shorter


def _divisors(n: int) -> list[int]:
    return [k for k in range(2, n + 1) if n % k == 0]


def _across_nodes(cfg: DictConfig, est: Estimate, tried: list[tuple[str, Estimate]], reasons: list[str]) -> Estimate:
    """Pipeline parallelism, or HSDP, when the devices span nodes and the fitting layout's data-parallel
    traffic over the inter-node links makes the step needlessly slow.

    ZeRO over every rank moves the model state through the slowest links every step (ZeRO-3: every
    micro-batch). HSDP keeps the gathers inside a node and all-reduces gradient shards across nodes;
    pp with one stage group per node keeps data parallelism inside a node and sends only the stage
    boundary's activations between nodes, at the price of the bubble ``(pp - 1) / (v * M)``: the run's
    own ``parallel.pp.schedule`` if it sets one, else 1F1B and interleaved with 2 stages per rank
    (half the bubble, for more activations in flight and twice the sends). Each is taken only if it
    fits and its estimated step is ``SPEEDUP`` shorter. One node: pp is not needed."""
    hw, layout = cfg.hardware, est.layout
    if hw.nodes == 1:
        if layout.world > 1:
            reasons.append("pp not needed: one node (pipeline parallelism trades a bubble for less inter-node traffic,"
                           " and ZeRO already divides the model state).")
        return est
    inner = hw.gpus_per_node // (layout.tp * layout.cp)  # data-parallel ranks of one node
    candidates: list[tuple[str, Layout]] = []
    if layout.zero in ("optimizer", "shard_grad_op", "full") and inner >= 1 and layout.dp > inner and layout.dp % inner == 0:
        candidates.append(("HSDP", replace(layout, zero="hybrid", dp_shard=inner, dp_replicate=layout.dp // inner)))
    schedules = [pipeline_knobs(cfg)] if cfg.parallel.get("pp") is not None else \
        [{"pp_schedule": "1F1B", "virtual_stages": None}, {"pp_schedule": "interleaved", "virtual_stages": 2}]
    for pp in _divisors(hw.nodes):
        if layout.dp % pp or layout.pp > 1:
            continue
        dp = layout.dp // pp
        for zero in (("none",) if dp == 1 else ("none", "optimizer", "shard_grad_op", "full")):
            for knobs in schedules:
                candidate = replace(layout, pp=pp, zero=zero, dp_shard=1 if zero == "none" else dp,
                                    dp_replicate=dp if zero == "none" else 1, **knobs)
                if _pipeline_runs(cfg, candidate):
                    candidates.append((f"pp={pp}", candidate))
    # Keeping a node's traffic inside it may hold more per rank; full recompute may pay for that.
    candidates += [(name, replace(c, recompute="full")) for name, c in candidates if c.recompute != "full"]
    gib = gib_text
    now = est.time["total"]
    options = [(name, estimate(cfg, c)) for name, c in candidates]
    fitting = [(name, e) for name, e in options if e.fits]
    if not fitting:
        if options:
            reasons.append(f"pp across the {hw.nodes} nodes does not fit ({', '.join(sorted({n for n, _ in options}))}).")
        return est
    name, best = min(fitting, key=lambda item: item[1].time["total"])
    dp_time = est.time.get("dp", 0.0)
    if best.time["total"] < (1 - SPEEDUP) * now:
        tried.append((f"across nodes: {name}", best))
        reasons.append(
            f"across {hw.nodes} nodes, {est.layout.describe()} spends {dp_time:.2f} s per step in data-parallel"
            f" communication, {est.time['dp_exposed']:.2f} s of it not hidden by compute (step {now:.2f} s);"
            f" {best.layout.describe()} keeps that inside a node and fits"
            f" ({gib(best.memory['total'])} per rank): {best.time['total']:.2f} s per step"
            + (f", bubble {best.time['bubble']:.2f} s" if best.layout.pp > 1 else "") + "."
        )
        return best
    pp_options = [e for n, e in fitting if n.startswith("pp=")]
    if pp_options:
        fastest = min(pp_options, key=lambda e: e.time["total"])
        reasons.append(
            f"pp not needed: across {hw.nodes} nodes the fastest pipeline that fits ({fastest.layout.describe()}) takes {fastest.time['total']:.2f} s per step (bubble"
            f" {fastest.time['bubble']:.2f} s) against {now:.2f} s"
            + (f"; HSDP would take {best.time['total']:.2f} s" if name == "HSDP" else "") + "."
        )
    else:
        reasons.append(f"pp not needed: no pipeline over the {hw.nodes} nodes fits; HSDP takes {best.time['total']:.2f} s"
                       f" per step against {now:.2f} s.")
    return est


def _shorter_bubble(cfg: DictConfig, now: Estimate) -> Optional[Estimate]:
    """The pipeline schedule, of those that run this layout and fit, whose step is the shortest, if it
    is ``SPEEDUP`` shorter than ``now``'s: interleaved (2 stages per rank: half the bubble, twice the
    sends, more activations in flight) and the zero-bubble kinds."""
    options = [{"pp_schedule": "interleaved", "virtual_stages": 2}, {"pp_schedule": "interleaved_zb", "virtual_stages": 2},
               {"pp_schedule": "zbv", "virtual_stages": None}]
    fitting = []
    for knobs in options:
        layout = replace(now.layout, **knobs)
        if layout != now.layout and _pipeline_runs(cfg, layout) and (est := estimate(cfg, layout)).fits:
            fitting.append(est)
    best = min(fitting, key=lambda e: e.time["total"], default=None)
    return best if best is not None and best.time["total"] < (1 - SPEEDUP) * now.time["total"] else None


def _pipeline_runs(cfg: DictConfig, layout: Layout) -> bool:
    """Whether the schedule accepts the layout: a stage per rank's blocks, the micro-batch count."""
    from curry_train.primitives.pipeline_schedule import check_microbatches

    n_stages = layout.pp * layout.stages_per_rank
    try:
        check_microbatches(layout.pp_schedule, _microbatches(cfg, layout), layout.pp, n_stages)
    except ValueError:
        return False
    return cfg.model.n_layers >= n_stages


def _what_would_fit(cfg: DictConfig, best: Estimate, world: int) -> list[str]:
    m = best.memory
    state = m["params"] + m["grads"] + m["optimizer"]
    rest = m["total"] - state
    free = best.capacity - rest
    hints = [f"nothing fits on {world} x {gib_text(cfg.hardware.memory_bytes)} ({cfg.hardware.name}); closest:"
             f" {best.layout.describe()} at {gib_text(m['total'])} per rank."]
    if free > 0:
        needed = math.ceil(world * state / free)
        hints.append(f"more devices: the sharded model state needs about {needed} devices of this kind.")
    hints.append("CPU offload (parallel.fsdp.cpu_offload=true) moves the sharded parameters, gradients and"
                 f" optimizer state ({gib_text(state)} per rank) to host memory.")
    if m["activations"] + m["loss"] > state:
        hints.append("a shorter sequence (data.seq_len) or more context-parallel ranks shrinks the activations.")
    return hints


MEMORY_PARTS = ("params", "grads", "optimizer", "transient", "activations", "loss", "reserved")


def plot_memory(cfg: DictConfig, candidates: Sequence[tuple[str, Estimate]], path: Any) -> None:
    """A PNG of each candidate's per-rank memory, by part (``MEMORY_PARTS``), against the capacity
    (the device's memory less ``HEADROOM``)."""
    from curry_train.plot import stacked_bars

    if not candidates:
        raise ValueError("no candidates to plot")
    hw = cfg.hardware
    bars = [(f"{step}: {'+'.join(est.layout.options())}", {k: float(est.memory[k]) for k in MEMORY_PARTS})
            for step, est in candidates]
    capacity = candidates[0][1].capacity
    stacked_bars(bars, MEMORY_PARTS, path, limit=capacity, limit_label=f"capacity {gib_text(capacity)}",
                 title=f"{cfg.model.name}, seq {cfg.data.seq_len}: memory per rank on {hw.nodes} x {hw.gpus_per_node} {hw.name}")


def gib_text(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def train_command(cfg: DictConfig, layout: Layout, user_overrides: Sequence[str] = ()) -> str:
    """``python train.py ...`` for ``layout``: the user's overrides, less those the layout sets and
    the ``parallel.<option>.*`` keys of options the layout does not compose (the user's
    ``parallel.pp.schedule`` stays with a pipeline; ``parallel.cp.pattern`` goes without cp)."""
    hw = cfg.hardware
    mine = {"parallel", "parallel.fsdp.sharding", "parallel.fsdp.replicas", "parallel.fsdp.mixed_precision",
            "parallel.tp.size", "parallel.tp.sequence_parallel", "parallel.pp.size", "parallel.pp.schedule",
            "parallel.pp.virtual_stages", "parallel.cp.size",
            "parallel.recompute", "trainer.devices", "trainer.num_nodes", "trainer.precision", "data.micro_batch_size"}
    options = set(layout.options())

    def kept(override: str) -> bool:
        key = override.lstrip("+~").partition("=")[0]
        parts = key.split(".")
        if key in mine:
            return False
        return not (parts[0] == "parallel" and len(parts) > 2 and parts[1] not in options)

    args = [o for o in user_overrides if kept(o)]
    args.append(f"parallel={'+'.join(layout.options())}")
    if layout.zero != "none":
        args.append(f"parallel.fsdp.sharding={layout.zero}")
        if layout.zero == "hybrid":
            args.append(f"parallel.fsdp.replicas={layout.dp_replicate}")
        args.append(f"parallel.fsdp.mixed_precision={layout.mixed_precision}")
    elif layout.mixed_precision == "bf16":
        args.append("trainer.precision=bf16-mixed")
    for name in ("tp", "pp", "cp"):
        if getattr(layout, name) > 1:
            args.append(f"parallel.{name}.size={getattr(layout, name)}")
    if layout.pp > 1 and layout.pp_schedule != "1F1B":  # conf/parallel/pp.yaml's defaults: 1F1B, virtual_stages null
        args.append(f"parallel.pp.schedule={layout.pp_schedule}")
    if layout.pp > 1 and layout.virtual_stages is not None:
        args.append(f"parallel.pp.virtual_stages={layout.virtual_stages}")
    if layout.sequence_parallel:
        args.append("parallel.tp.sequence_parallel=true")
    if layout.recompute != "none":
        args.append(f"parallel.recompute={layout.recompute}")
    user_micro_batch = any(o.lstrip("+~").startswith("data.micro_batch_size") for o in user_overrides)
    if layout.micro_batch_size != cfg.data.micro_batch_size or user_micro_batch:  # the user's was dropped above
        args.append(f"data.micro_batch_size={layout.micro_batch_size}")
    args += [f"trainer.devices={hw.gpus_per_node}", f"trainer.num_nodes={hw.nodes}"]
    return "python train.py " + " ".join(args)


def current_layout(cfg: DictConfig) -> Layout:
    """The layout ``cfg`` would run (``trainer.devices x trainer.num_nodes`` ranks)."""
    from curry_train.config.checks import layout_degrees

    deg = layout_degrees(cfg, cfg.trainer.devices * cfg.trainer.num_nodes)
    fsdp, tp = cfg.parallel.get("fsdp"), cfg.parallel.get("tp")
    zero = "none" if fsdp is None or fsdp.sharding == "no_shard" else fsdp.sharding
    bf16 = (fsdp is not None and fsdp.mixed_precision != "fp32") or cfg.trainer.precision.startswith("bf16")
    return Layout(deg.dp_replicate, deg.dp_shard, deg.tp, deg.pp, deg.cp, zero, "bf16" if bf16 else "fp32",
                  cfg.parallel.recompute, bool(tp is not None and tp.sequence_parallel), cfg.data.micro_batch_size,
                  **pipeline_knobs(cfg))


def pipeline_knobs(cfg: DictConfig) -> dict[str, Any]:
    """The run's pipeline schedule and virtual stages (``parallel.pp``), for the layouts advise tries;
    the defaults of ``conf/parallel/pp.yaml`` without pp."""
    pp = cfg.parallel.get("pp")
    return {"pp_schedule": pp.schedule, "virtual_stages": pp.virtual_stages} if pp is not None else {}


NEXT_FOR_OOM = {"none": "optimizer", "optimizer": "shard_grad_op", "shard_grad_op": "full"}


def diagnose(cfg: DictConfig, symptom: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Which primitive to add next for ``symptom`` (oom | slow), given the layout ``cfg`` runs."""
    layout = current_layout(cfg)
    if layout.world > cfg.hardware.gpus_per_node * cfg.hardware.nodes:  # the run's own nodes, not the default 1
        cfg = cfg.copy()
        cfg.hardware.nodes = math.ceil(layout.world / cfg.hardware.gpus_per_node)
    now = estimate(cfg, layout)
    if symptom == "oom":
        if layout.zero in NEXT_FOR_OOM and layout.shards * (layout.dp if layout.zero == "none" else 1) > 1:
            nxt = replace(layout, zero=NEXT_FOR_OOM[layout.zero], dp_shard=layout.dp, dp_replicate=1)
            why = f"add the next ZeRO stage: {ZERO_NAMES[nxt.zero]} shards more of the model state"
        elif layout.recompute != "full":
            nxt = replace(layout, recompute="full")
            why = "add activation recompute: model state is sharded as far as it goes"
        else:
            nxt, why = None, "add tp (memory-bound step) or cp (long sequences): see the full advice"
    elif symptom == "slow":
        parts = {k: v for k, v in now.time.items() if k not in ("total", "compute", "dp")}
        worst = max(parts, key=parts.get) if parts else None
        nxt = None
        if worst and parts[worst] > 0.2 * now.time["compute"]:
            what = {"dp_exposed": "data-parallel communication not hidden by compute", "bubble": "the pipeline bubble"}
            why = f"{what.get(worst, f'communication on {worst}')} takes {parts[worst]:.2f} s of a {now.time['total']:.2f} s step"
            notes: list[str] = []
            if worst == "dp_exposed" and layout.zero == "full" and estimate(cfg, replace(layout, zero="shard_grad_op")).fits:
                nxt = replace(layout, zero="shard_grad_op")
                why += ": ZeRO-2 gathers parameters once per step instead of per micro-batch, and fits"
            elif worst == "dp_exposed" and (alt := _across_nodes(cfg, now, [], notes)) is not now:
                nxt = alt.layout
                why += ": " + notes[-1]
            elif worst == "bubble" and (alt := _shorter_bubble(cfg, now)) is not None:
                nxt = alt.layout
                why += (f": {alt.layout.pp_schedule} (v={alt.layout.stages_per_rank}) cuts the bubble to"
                        f" {alt.time['bubble']:.2f} s and fits ({gib_text(alt.memory['total'])} per rank):"
                        f" {alt.time['total']:.2f} s per step")
            elif worst == "bubble":
                why += ": more micro-batches per step (a smaller data.micro_batch_size); no other schedule that fits is" \
                       f" {SPEEDUP:.0%} faster"
        elif layout.recompute != "none" and estimate(cfg, replace(layout, recompute="none")).fits:
            nxt, why = replace(layout, recompute="none"), "recompute costs a forward and is not needed to fit"
        else:
            why = "the step is compute-bound by the estimate: measure with scripts/bench.py before adding primitives"
    else:
        raise ValueError(f"symptom={symptom!r}: expected oom or slow")
    result = {"symptom": symptom, "current": now.to_dict(), "advice": why, "next": None, "command": None}
    if nxt is not None:
        result.update(next=estimate(cfg, nxt).to_dict(), command=train_command(cfg, nxt, overrides))
    return result
