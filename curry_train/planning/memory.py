"""What one rank holds, in bytes: model state (ZeRO's formulas over the rank's own parameters, as
curry-train holds them), the state gathered during forward and backward, activations and the loss.

The accounting, term by term, is derived in docs/planning.md ("What a rank holds");
``validation.memory`` measures it (tests/test_memory.py, tests/test_bench.py).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from curry_train.layout.pipeline import canonical_kind, split_layers, stage_to_rank
from curry_train.model.config import head_dim
from curry_train.model.llama import Llama
from curry_train.planning.layout import Layout, microbatches_per_step
from curry_train.primitives.lora import ADAPTERS, apply_lora

STATE_KEYS = ("params", "grads", "optimizer")
# Bytes per parameter of (parameters, gradients, optimizer state) for Adam.
BYTES_PER_PARAMETER = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}
# The ZeRO stage of each mode: which of (parameters, gradients, optimizer state) are sharded.
ZERO_STAGE = {"dp": 0, "no_shard": 0, "optimizer": 1, "shard_grad_op": 2, "full": 3, "hybrid": 3}
_SHARDED = {0: (False, False, False), 1: (False, False, True), 2: (False, True, True), 3: (True, True, True)}

# ----------------------------------------------------------------------------------------------
# ZeRO's formulas


def zero_formula_terms(mode: str, P: int, d: int, mixed_precision: str = "fp32", replicas: int = 1) -> dict[str, int]:
    """Per-rank bytes of parameters, gradients and Adam's state by ZeRO's formulas (Rajbhandari et
    al., 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", section 5),
    for ``P`` parameters over ``d`` data-parallel ranks.

    Mixed precision (``bf16``/``fp16``), the paper's case: 2 bytes per parameter for the half-precision
    parameters, 2 for their gradients, K = 12 for Adam's state (fp32 master weights, momentum and
    variance, 4 each). ``fp32``: 4 for the parameters (which are the master weights), 4 for the
    gradients, 8 for momentum and variance. A term sharded over d ranks is divided by d (rounded up):

    ==================  ================  =============================  ===========================
    mode                ZeRO stage        mixed precision                fp32
    ==================  ================  =============================  ===========================
    dp, no_shard        none (DDP)        16P                            16P
    optimizer           ZeRO-1 (P_os)     4P + 12P/d                     8P + 8P/d
    shard_grad_op       ZeRO-2 (P_os+g)   2P + 14P/d                     4P + 12P/d
    full                ZeRO-3 (P_os+g+p) 16P/d                          16P/d
    hybrid              ZeRO-3 in groups  16P/(d/replicas)               16P/(d/replicas)
    ==================  ================  =============================  ===========================

    ``optimizer`` (ZeRO-1) is curry-train's own (``distributed_optimizer.ZeroOneModule``): in fp32 it
    holds exactly the formula; in half precision its gradients are reduced in fp32 into the shards
    and the half-precision full gradients freed, so it holds 2P + 16P/d at the step, not 4P + 12P/d.
    """
    if mode not in ZERO_STAGE:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(ZERO_STAGE)}")
    if mixed_precision not in BYTES_PER_PARAMETER:
        raise ValueError(f"mixed_precision={mixed_precision!r}: expected one of {', '.join(BYTES_PER_PARAMETER)}")
    if d < 1 or replicas < 1 or d % replicas:
        raise ValueError(f"d={d}, replicas={replicas}: expected positive sizes, d a multiple of replicas")
    shards = d // replicas if mode == "hybrid" else d
    sharded = _SHARDED[ZERO_STAGE[mode]]
    return {
        key: -(-nbytes * P // shards) if is_sharded else nbytes * P
        for key, nbytes, is_sharded in zip(STATE_KEYS, BYTES_PER_PARAMETER[mixed_precision], sharded, strict=False)
    }


def zero_formula_bytes(mode: str, P: int, d: int, mixed_precision: str = "fp32", replicas: int = 1) -> int:
    """Per-rank model-state bytes by ZeRO's formula: the sum of ``zero_formula_terms`` (see there)."""
    return sum(zero_formula_terms(mode, P, d, mixed_precision, replicas).values())


def zero_formula_text(mode: str, mixed_precision: str = "fp32") -> str:
    """The formula as the paper writes it, e.g. ``ZeRO-2: 2P + 14P/d``."""
    stage = ZERO_STAGE[mode]
    sharded = _SHARDED[stage]
    per_param = BYTES_PER_PARAMETER[mixed_precision]
    replicated = sum(n for n, s in zip(per_param, sharded, strict=False) if not s)
    split = sum(n for n, s in zip(per_param, sharded, strict=False) if s)
    d = "(d/replicas)" if mode == "hybrid" else "d"
    terms = [f"{replicated}P"] * bool(replicated) + [f"{split}P/{d}"] * bool(split)
    return f"{'DDP' if stage == 0 else f'ZeRO-{stage}'}: {' + '.join(terms)}"


# ----------------------------------------------------------------------------------------------
# The model's shapes


def tensor_parallel_shapes(model: nn.Module, tp: int) -> dict[str, torch.Size]:
    """Each parameter's shape on one of ``tp`` tensor-parallel ranks, from the model's ``plan`` as
    ``tp_linear.apply_tensor_parallel`` splits it: column layers, the embedding and the head by
    their first dimension, row layers' weights by their second; norms (and row biases) replicated."""
    plan = model.plan
    split: dict[str, int] = {plan.embedding: 0, plan.head: 0}
    for name in model.get_submodule(plan.blocks):
        split.update({f"{plan.blocks}.{name}.{path}": 0 for path in plan.column})
        split.update({f"{plan.blocks}.{name}.{path}": 1 for path in plan.row})
    shapes = {}
    for name, param in model.named_parameters():
        module, _, kind = name.rpartition(".")
        dim = split.get(module) if tp > 1 else None
        if kind in ADAPTERS and dim is not None:  # LoRA follows its layer: column B by rows, row A by columns
            dim = {("lora_a", 1): 1, ("lora_b", 0): 0}.get((kind, dim))
        elif dim == 1 and kind != "weight":
            dim = None
        if dim is None:
            shapes[name] = param.shape
        else:
            shape = list(param.shape)
            shape[dim] //= tp
            shapes[name] = torch.Size(shape)
    return shapes


@functools.lru_cache(maxsize=128)  # capacity sweeps estimate a family of models at several tp
def _shapes(model_yaml: str, tp: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    cfg = OmegaConf.create(model_yaml)
    with torch.device("meta"):
        model = Llama(cfg)
    if cfg.get("lora") is not None:
        apply_lora(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha)
    return tuple((name, tuple(shape)) for name, shape in tensor_parallel_shapes(model, tp).items())


def parameter_shapes(model_cfg: DictConfig, tp: int = 1) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape on one of ``tp`` tensor-parallel ranks, by name, in the model's order."""
    return dict(_shapes(OmegaConf.to_yaml(model_cfg), tp))


def rank_parameters(
    model_cfg: DictConfig,
    tp: int = 1,
    pp: int = 1,
    stage: int = 0,
    schedule: str = "1F1B",
    virtual_stages: Optional[int] = None,
    ep: int = 1,
) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the parameters one rank holds: its tensor-parallel shards of the blocks of
    the stages pipeline rank ``stage`` holds under ``schedule`` (``pipeline_schedule.pipeline_stages``:
    ``pp x stages_per_rank`` stages, looped or V-shaped over the ranks; the embedding with the first
    stage, norm and head with the last, so a V-shaped schedule's rank 0 holds both), and of each MoE
    layer's experts the ``1/ep`` that expert parallelism leaves it (experts stay whole under tp)."""
    ranges, owner = stage_map(model_cfg.n_layers, Layout(pp=pp, pp_schedule=schedule, virtual_stages=virtual_stages))
    n_stages = len(owner)
    local = [s for s in range(n_stages) if owner[s] == stage]
    blocks = {i for s in local for i in ranges[s]}
    held = []
    for name, shape in parameter_shapes(model_cfg, tp).items():
        head, _, rest = name.partition(".")
        if head == "layers":
            keep = int(rest.split(".")[0]) in blocks
        elif head == "tok_embeddings":
            keep = 0 in local
        else:
            keep = n_stages - 1 in local
        if keep:
            held.append((name, (shape[0] // ep, *shape[1:]) if is_expert(name) else shape))
    return held


def is_expert(name: str) -> bool:
    """Whether parameter ``name`` is a routed expert's (the stacked weights expert parallelism splits)."""
    return ".experts." in name


def rank_shapes(
    model_cfg: DictConfig,
    tp: int = 1,
    pp: int = 1,
    stage: int = 0,
    schedule: str = "1F1B",
    virtual_stages: Optional[int] = None,
    ep: int = 1,
) -> list[tuple[int, ...]]:
    """Shapes of the parameters one rank holds (``rank_parameters``)."""
    return [shape for _, shape in rank_parameters(model_cfg, tp, pp, stage, schedule, virtual_stages, ep)]


def stage_map(n_layers: int, layout: Layout) -> tuple[list[range], list[int]]:
    """The pipeline cut ``parallelize`` makes for ``layout``: each stage's blocks (``split_layers``) and the
    pipeline rank holding it (``stage_to_rank``); one stage on rank 0 without pp."""
    n_stages = layout.pp * layout.stages_per_rank
    return split_layers(n_layers, n_stages), stage_to_rank(layout.pp_schedule, layout.pp, n_stages)


def parameter_count(model_cfg: DictConfig) -> int:
    return sum(math.prod(shape) for shape in rank_shapes(model_cfg))


def active_parameter_count(model_cfg: DictConfig) -> int:
    """Parameters one token goes through: all but the routed experts it is not sent to (each MoE
    layer's ``top_k`` of its ``experts``); the parameter count for a dense model."""
    moe = model_cfg.get("moe")
    total = parameter_count(model_cfg)
    if moe is None:
        return total
    return total - expert_parameter_count(model_cfg) * (moe.experts - moe.top_k) // moe.experts


def expert_parameter_count(model_cfg: DictConfig) -> int:
    """Parameters of the routed experts of every MoE layer (0 for a dense model)."""
    return sum(math.prod(shape) for name, shape in parameter_shapes(model_cfg).items() if is_expert(name))


# ----------------------------------------------------------------------------------------------
# Model state


def model_state(
    shapes: Sequence[tuple[int, ...]],
    zero: str,
    shards: int,
    mixed_precision: str = "fp32",
    shard_rank: int = 0,
    replicas: int = 1,
) -> dict[str, int]:
    """Bytes of parameters, gradients and AdamW state one rank holds at the optimizer step, as
    curry-train holds them (docs/planning.md); ``shard_rank`` 0 holds the most (whole chunks).

    ``shards``: the ranks the state is split over (FSDP2's shard mesh: dp_shard x cp; for hybrid the
    ranks of one replica group); ``replicas`` is only for ZeRO's formula of hybrid."""
    P = sum(math.prod(s) for s in shapes)
    padded = own = padded_full = 0
    for shape in shapes:
        if len(shape) >= 2 and shape[0] < shards <= shape[1]:  # split along dim 1 (shard_placement)
            shape = (shape[1], shape[0], *shape[2:])
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


def holds_unsharded_gradients(cfg: DictConfig, layout: Layout) -> bool:
    """Whether FSDP keeps each of the rank's gradients unsharded, in fp32, between micro-batches: under
    gradient accumulation it reduces them only in the last micro-batch's backward (unless
    ``parallel.fsdp.sync_each_microbatch``), and a pipeline stage never reduces them before its last
    backward. Measured: 4 bytes a parameter on each of 2 ranks after a first micro-batch, against 2 with a
    reduce-scatter each micro-batch (tests/test_fsdp.py)."""
    if layout.zero not in ("full", "hybrid", "shard_grad_op"):
        return False
    return layout.pp > 1 or (microbatches_per_step(cfg, layout) > 1 and not layout.sync_each_microbatch)


def transient_state(cfg_model: DictConfig, shapes: Sequence[tuple[int, ...]], layout: Layout, stage: int = 0) -> int:
    """Model-state bytes that exist only during forward/backward (docs/planning.md), on pipeline rank
    ``stage``: ZeRO-3 keeps gathered only the embedding and head this rank holds."""
    pbytes = layout.element_bytes
    P = sum(math.prod(s) for s in shapes)
    if layout.zero == "shard_grad_op":
        return pbytes * P + 4 * P // max(1, cfg_model.n_layers)  # all units gathered, one block's fp32 gradient
    if layout.zero in ("full", "hybrid"):
        whole = rank_shapes(cfg_model, layout.tp, ep=layout.ep)
        _, owner = stage_map(cfg_model.n_layers, layout)
        embedding, head = math.prod(whole[0]), math.prod(whole[-1])
        block = (sum(math.prod(s) for s in whole) - embedding - head) / max(1, cfg_model.n_layers)
        kept = embedding * (owner[0] == stage) + head * (owner[-1] == stage)  # where this rank holds them
        return int(pbytes * (kept + 2 * block) + 4 * block)
    if layout.zero == "optimizer" and layout.mixed_precision == "bf16":
        return 2 * P  # bf16 full gradients until reduced into the fp32 shards
    return 0


# ----------------------------------------------------------------------------------------------
# Activations and the loss


def loss_bytes_per_logit(mixed_precision: str, loss_parallel: bool = False, compiled: bool = False) -> int:
    """What the loss holds per logit at its peak, which is in its backward (PyTorch's memory tracker,
    tests/test_memory.py): the fp32 log-probabilities that cross-entropy keeps, their gradient and the
    logits' fp32 gradient, 12 bytes, in fp32 and bf16 alike. Its forward holds less: the logits in the
    compute dtype, for half-precision logits their fp32 copy (``TrainStep.token_loss`` upcasts them),
    and the log-probabilities (8 bytes in fp32, 2 + 4 + 4 in bf16), and the logits are freed before
    backward. Under loss parallelism (vocabulary-sharded DTensors) the sharded log-softmax keeps 12
    bytes a logit in forward, and its backward peaks at 16.

    ``compiled`` (inductor's cross-entropy, ``compiles_the_loss``): its forward keeps the logits themselves
    and one log-sum-exp a row, and its backward writes the logits' gradient in one kernel, in the compute
    dtype: 2 elements a logit, 8 bytes in fp32 and 4 in bf16 (a process's peak resident memory, measured
    by tests/test_memory.py)."""
    if compiled and not loss_parallel:
        return 2 * (2 if mixed_precision == "bf16" else 4)
    return 16 if loss_parallel else 12


def compiles_the_loss(cfg: DictConfig, layout: Layout) -> bool:
    """Whether the run's cross-entropy is inductor's (``compile.loss``, as ``TrainStep`` builds it): not
    under loss parallelism, nor in chunks (the model sums those itself), nor with a backend that does not
    generate kernels (``aot_eager`` keeps eager's tensors)."""
    compile_cfg = cfg.get("compile") or {}
    return (
        bool(compile_cfg.get("enabled", False))
        and bool(compile_cfg.get("loss", True))
        and compile_cfg.get("backend", "inductor") == "inductor"
        and layout.loss_chunks <= 1
        and not loss_parallel_of(cfg, layout)
    )


def loss_parallel_of(cfg: DictConfig, layout: Layout) -> bool:
    """Whether the head's output is sharded over the vocabulary (``parallel.tp.loss_parallel``, the default
    under tp), or whole."""
    return layout.tp > 1 and bool(OmegaConf.select(cfg, "parallel.tp.loss_parallel", default=True))


def block_activation_bytes(cfg: DictConfig, layout: Layout, flash_attention: bool) -> dict[str, float]:
    """Bytes one block keeps for backward on one rank, by what recompute does with them
    (docs/planning.md): ``all`` (no recompute), ``selective`` (what per-op selective recompute keeps:
    the block's input and the matmul and attention outputs), ``selective_half`` (the same with every other
    matmul's output: wq, wv, w1 and w2's; ``recompute_keep_matmuls=every_other``) and ``input`` (what full
    recompute keeps)."""
    m = cfg.model
    s, b, h, f, a = cfg.data.seq_len // layout.cp, layout.micro_batch_size, m.dim, m.ffn_dim, m.n_heads
    q = a * head_dim(m)  # the attention's width: dim, unless model.head_dim says otherwise
    kv = head_dim(m) * m.n_kv_heads
    t, sp = layout.tp, layout.sequence_parallel
    e = layout.element_bytes
    seq = t if sp else 1  # sequence parallelism splits what lies between the tensor-parallel regions
    # RMSNorm: its input in fp32 (an fp32 input itself, else an fp32 copy), the fp32 normalized input,
    # its rstd, and the output in the compute dtype (the matmuls' input; gathered under SP).
    norm = (4 + 4) * s * b * h / seq + 4 * s * b / seq + e * s * b * h
    # Attention: q, k and v, the output and its log-sum-exp; SDPA (enable_gqa) and context parallelism's
    # ring read each key/value head for its group of query heads, never a repeated copy.
    # A kernel without fusion also keeps Korthikanti's 5as^2b (softmax, dropout mask and output).
    attention = (e * s * b * (2 * q + 2 * kv) + 4 * s * b * a) / t
    if not flash_attention:
        attention += 5 * a * s * s * b * e / 2 / t
    mlp = 4 * e * s * b * f / t  # w1 and w3 outputs, SiLU's output, the product
    dropout = 2 * s * b * h / seq if m.dropout > 0 else 0  # 1-byte masks of the two residual dropouts
    mlp_outputs = e * s * b * f * 2 / t  # w1, w3
    moe = m.get("moe")
    if moe is not None:
        # Blocks past dense_layers route each token to top_k experts (whole on every tp rank): the
        # experts' SwiGLU tensors per pick and the shared experts' per token, the dispatched copies
        # (sorted, arrived, regrouped, expert output, sent back: 5 per pick) and the router's fp32
        # logits and scores; averaged over the blocks.
        k, fe, shared = moe.top_k, moe.expert_ffn_dim, moe.shared_experts
        moe_mlp = 4 * e * s * b * fe * (k + shared) + 5 * e * s * b * k * h + 8 * s * b * moe.experts
        moe_outputs = e * s * b * fe * 2 * (k + shared) + 5 * e * s * b * k * h
        share = (m.n_layers - moe.dense_layers) / m.n_layers
        mlp += share * (moe_mlp - mlp)
        mlp_outputs += share * (moe_outputs - mlp_outputs)
    whole = 2 * norm + attention + mlp + dropout
    block_input = e * s * b * h / seq
    # A block's backward, beside what the blocks keep: the gradient arriving at its output, and in the
    # MLP's, the gradient of the product, then of w3's and SiLU's outputs from it, while w2's backward
    # has freed the product it kept: two of the MLP's four tensors more.
    gradients = 0.5 * mlp + e * s * b * h / seq
    # wq, wk, wv, w1, w3; wo, w2 (before reduction)
    matmul_outputs = e * s * b * (q + 2 * kv) / t + mlp_outputs + 2 * e * s * b * h
    sdpa_outputs = (e * s * b * q + 4 * s * b * a) / t
    half_outputs = e * s * b * (q + kv) / t + mlp_outputs / 2 + e * s * b * h  # wq, wv; w1; w2
    return {
        "all": whole,
        "selective": block_input + matmul_outputs + sdpa_outputs,
        "selective_half": block_input + half_outputs + sdpa_outputs,
        "input": block_input,
        "gradients": gradients,
    }


def kept_per_block(block: dict[str, float], layout: Layout, rank_blocks: int) -> tuple[float, float]:
    """What one of a rank's ``rank_blocks`` blocks keeps for backward on average under the layout's
    recompute, and what the blocks from the last recomputing one on keep: backward has freed those after
    it when that one recomputes its whole set (its peak). ``every_n``: blocks 0, n, 2n, ... keep their
    input and recompute, the others keep everything."""
    kind = layout.recompute_kind
    if kind == "every_n":
        n = layout.recompute_every_n_blocks
        whole = layout.fully_recomputed(rank_blocks)
        last = n * (whole - 1)
        average = (whole * block["input"] + (rank_blocks - whole) * block["all"]) / rank_blocks
        return average, block["input"] + (rank_blocks - 1 - last) * block["all"]
    kept = {"none": "all", "per_op": "selective", "per_op_half": "selective_half", "full": "input"}[kind]
    return block[kept], block[kept]


def activation_bytes(cfg: DictConfig, layout: Layout, flash_attention: bool) -> dict[str, int]:
    """Peak activation and loss bytes of the fullest pipeline rank (docs/planning.md): every rank
    keeps its blocks' forwards in flight; only the one holding the last stage keeps the final norm
    and the loss (one micro-batch's: its backward follows its forward at once)."""
    m = cfg.model
    s, b = cfg.data.seq_len // layout.cp, layout.micro_batch_size
    block = block_activation_bytes(cfg, layout, flash_attention)
    kept, tail = kept_per_block(block, layout, -(-m.n_layers // (layout.pp * layout.stages_per_rank)))
    e = layout.element_bytes
    seq = layout.tp if layout.sequence_parallel else 1
    final_norm = (4 + 4) * s * b * m.dim / seq + 4 * s * b / seq + e * s * b * m.dim
    # model.loss_chunks: one chunk's logits at a time (chunked_cross_entropy), and in backward the chunk's
    # gradient of the head's weight (in the compute dtype) before it is added to the others'
    chunks = min(layout.loss_chunks, max(1, s // seq))
    loss_parallel = loss_parallel_of(cfg, layout)
    vocab = m.vocab_size / (layout.tp if loss_parallel else 1)
    per_logit = loss_bytes_per_logit(layout.mixed_precision, loss_parallel, compiles_the_loss(cfg, layout))
    loss = per_logit * s * b * vocab / chunks
    if chunks > 1:
        loss += e * m.vocab_size * m.dim / layout.tp
    peaks = []
    for forwards, holds_last in block_forwards_per_rank(layout, m.n_layers, microbatches_per_step(cfg, layout)):
        # A stage's forward of one micro-batch keeps its blocks' tensors until its backward. The
        # peak: the loss's backward on the last stage (the kept tensors, the final norm and the
        # loss), or the backward of a block, which recomputes its whole set next to the others' and
        # makes the gradients of its tensors.
        stored = kept * forwards
        recomputing = stored - tail + block["all"] + block["gradients"]
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
    forwards in flight, ``chunks_in_flight``, times the mean blocks of its stages, as ``parallelize``
    splits them: ``stage_map``), and whether it holds the last stage (the final norm, the head and
    the loss). Without pp: one rank, all blocks, once."""
    v = layout.stages_per_rank
    ranges, owner = stage_map(n_layers, layout)
    return [
        (
            chunks_in_flight(layout.pp_schedule, layout.pp, v, microbatches, rank)
            * sum(len(r) for r, o in zip(ranges, owner, strict=False) if o == rank)
            / v,
            owner[-1] == rank,
        )
        for rank in range(layout.pp)
    ]
