"""``parallelize``: a meta-device model and a layout in, this rank's part of the parallel model out.

The model declares what can be split (``Llama.plan``); this module decides how, from the layout,
in the one order in which the primitives compose. Each ``apply_*`` step takes explicit arguments
and calls a primitive of ``curry_train.primitives``; a step whose option is off does nothing.

To add a primitive: write it in ``curry_train/primitives/`` with plain arguments, add its options
to ``ParallelConfig`` (``curry_train/config/schema.py``) and its checks to ``config/checks.py``,
then one ``apply_*`` step here, at the place in the order its comment justifies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from curry_train.checkpoint.hf_load import load_pretrained
from curry_train.config.schema import CPConfig, DPConfig, EPConfig, FSDPConfig, ParallelConfig, PPConfig, TPConfig
from curry_train.layout.pipeline import SPLIT_BACKWARD, canonical_kind
from curry_train.model.config import LoRAConfig
from curry_train.model.moe import MoE
from curry_train.primitives.compile import compile_blocks
from curry_train.primitives.context_parallel import ContextParallel, sequence_positions
from curry_train.primitives.data_parallel import replicate
from curry_train.primitives.distributed_optimizer import DistributedOptimizer, shard_experts
from curry_train.primitives.expert_parallel import ExpertParallel
from curry_train.primitives.lora import apply_lora, is_adapter
from curry_train.primitives.materialize import init_parameters, materialize_and_init
from curry_train.primitives.parallel_state import ParallelState
from curry_train.primitives.pipeline_schedule import pipeline_stages
from curry_train.primitives.recompute import apply_recompute
from curry_train.primitives.tp_linear import apply_tensor_parallel

log = logging.getLogger(__name__)


@dataclass
class ParallelModel:
    """This rank's part of the model, and its pipeline stages."""

    model: nn.Module  # what the optimizer, checkpoints and (without a pipeline) the step run
    stages: Optional[list[Optional[nn.Module]]] = None  # every pipeline stage, None where another rank holds it


def parallelize(
    model: nn.Module,
    ps: ParallelState,
    layout: ParallelConfig,
    *,
    device: torch.device,
    seed: int,
    seq_len: int,
    init_from: Optional[str] = None,
    compile_backend: Optional[str] = None,
    lora: Optional[LoRAConfig] = None,
) -> ParallelModel:
    """Apply ``layout`` to ``model``, built on the meta device, in the order that composes; its weights
    are drawn from ``seed``, or read from the Hugging Face directory ``init_from``; ``compile_backend``:
    torch.compile each block with it (None: eager); ``lora``: adapters on a frozen base (None: off)."""
    # Swaps linears for their DTensor-sharded versions, so it comes before anything that wraps
    # them; FSDP later shards those shards over the data-parallel axis of the same mesh (2-D).
    apply_tensor_parallel_layout(model, ps, layout.tp)
    # Cuts the blocks into stages and drops what this rank does not hold, while still on meta.
    model, stages = apply_pipeline_split(model, ps, layout.pp)
    blocks = list(model.get_submodule(model.plan.blocks).values())
    # Turns each MoE layer's stacked expert weights into shards over the ep ranks (DTensors, still
    # on meta) before FSDP, which then shards them further over the ranks EP leaves.
    apply_expert_parallel(model, ps, layout.ep)
    # Wraps only the attention op inside each block: recompute and FSDP then wrap whole blocks.
    apply_context_parallel(blocks, model.plan.attention_op, ps, layout.cp)
    # Adds the adapters beside their linears (and freezes the rest) while still on meta: recompute,
    # compile and FSDP then take them with their block, and they are drawn by name like every weight.
    apply_lora_adapters(model, lora)
    # Wraps each block's forward before FSDP, so a recomputation runs inside its unit, while the
    # unit's parameters are gathered.
    apply_recompute(blocks, layout.recompute, layout.recompute_every_n_blocks, layout.recompute_keep_matmuls)
    # Compiles each block's forward, its recompute included, before FSDP or DDP wrap the block: their
    # collectives stay in the eager hooks around the compiled call.
    if compile_backend is not None:
        split = layout.pp is not None and canonical_kind(layout.pp.schedule) in SPLIT_BACKWARD
        compile_blocks(blocks, compile_backend, retain_graph=split)
    # Shards while the parameters are still on the meta device: no rank allocates the whole model.
    # ZeRO-1 swaps full parameters in with forward hooks: on compiled blocks, one hook per block, outside
    # the compiled call, so the graphs trace none.
    zero1_units = blocks if compile_backend is not None else None
    apply_fsdp(model, ps, layout, roots=_pipeline_roots(stages), zero1_units=zero1_units)
    # Draws each parameter's full value from its own seeded generator, then keeps this rank's
    # shard: the same weights in every layout. Or reads just this rank's shards of pretrained weights.
    materialize(model, device, seed, init_from, lora is not None)
    # Needs real buffers: the RoPE positions of the sequence shard this rank holds.
    apply_sequence_positions(model, ps, layout.cp, seq_len, device)
    # Replicates real tensors, so after materialization, and last, so it sees every parameter.
    model = apply_ddp(model, ps, layout, device)
    return ParallelModel(model, stages)


def materialize(model: nn.Module, device: torch.device, seed: int, init_from: Optional[str], adapters: bool) -> None:
    """Real tensors for the meta-device ``model``: seeded initialization, or ``init_from``'s weights (and
    the LoRA adapters, which no pretrained directory holds, seeded)."""
    if init_from is None:
        materialize_and_init(model, device, seed)
        return
    report = load_pretrained(model, device, init_from)
    if adapters:
        init_parameters(model, device, seed, is_adapter)
    memory = "not measured here"
    if report.peak_rss is not None and report.rss_before is not None:
        memory = f"{_size(report.peak_rss - report.rss_before)} above the {_size(report.rss_before)} before it"
    log.info(
        "loaded %d tensors from %s: read %s for this rank's %s of parameters (largest single read %s);"
        " peak resident memory during the load %s",
        report.tensors,
        init_from,
        _size(report.bytes_read),
        _size(report.shard_bytes),
        _size(report.largest_read),
        memory,
    )


def apply_lora_adapters(model: nn.Module, lora: Optional[LoRAConfig]) -> None:
    if lora is None:
        return
    adapted = apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout)
    if lora.base_dtype == "bf16":  # the frozen base stored in bf16 (still on meta: it is drawn or read so)
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    log.info("LoRA rank %d on %d linears; every other weight frozen (%s)", lora.rank, len(adapted), lora.base_dtype)


def _size(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB ({nbytes:,} B)"


def apply_tensor_parallel_layout(model: nn.Module, ps: ParallelState, tp: Optional[TPConfig]) -> None:
    """Megatron-LM's column/row-parallel blocks, vocabulary-parallel embedding and head."""
    if tp is not None:
        apply_tensor_parallel(model, ps.mesh["tp"], tp.sequence_parallel, tp.loss_parallel)


def apply_pipeline_split(
    model: nn.Module, ps: ParallelState, pp: Optional[PPConfig]
) -> tuple[nn.Module, Optional[list[Optional[nn.Module]]]]:
    """This rank's stages (``pipeline_stages``); the model unchanged without a pipeline."""
    if pp is None:
        return model, None
    return pipeline_stages(model, pp.schedule, ps.mesh["pp"].size(), ps.pp_rank, pp.virtual_stages, pp.layers_per_stage)


def _pipeline_roots(stages: Optional[Sequence[Optional[nn.Module]]]) -> Optional[list[nn.Module]]:
    """FSDP's roots on a rank with several stages: the views the schedule runs, not their container."""
    local = [stage for stage in stages or () if stage is not None]
    return local if len(local) > 1 else None


def apply_expert_parallel(model: nn.Module, ps: ParallelState, ep: Optional[EPConfig]) -> None:
    """Each MoE layer's experts split over the ep ranks, its tokens dispatched with all-to-all (or all-gather)."""
    if ep is not None:
        for module in model.modules():
            if isinstance(module, MoE):
                ExpertParallel.wrap(module, ep_group=ps.get_ep_mesh(), dispatcher=ep.dispatcher)


def apply_context_parallel(
    blocks: Sequence[nn.Module], attention_op: str, ps: ParallelState, cp: Optional[CPConfig]
) -> None:
    """Ring, double-ring or all-to-all attention in place of each block's attention op."""
    if cp is None:
        return
    attention, op = attention_op.rsplit(".", 1)
    for block in blocks:
        ContextParallel.wrap(
            block.get_submodule(attention),
            ps.get_cp_group(),
            cp.pattern,
            causal=True,
            load_balance=cp.load_balance,
            inner_ring=cp.inner_ring,
            op_name=op,
        )


def apply_fsdp(
    model: nn.Module,
    ps: ParallelState,
    layout: ParallelConfig,
    roots: Optional[list[nn.Module]],
    zero1_units: Optional[list[nn.Module]] = None,
) -> None:
    """FSDP2 over the data-parallel ranks: the run's ZeRO stage with ``parallel=fsdp``; replicas
    (``no_shard``) for the ranks tensor, pipeline or expert parallelism leave, since DDP cannot hold
    their DTensor parameters or pipeline stages. ``zero1_units``: with ``sharding=optimizer``, the
    modules whose forward hooks swap in their whole subtree's parameters (compiled blocks)."""
    fsdp: Optional[FSDPConfig] = layout.fsdp
    if layout.ep is not None:
        # The experts first, over the ranks EP leaves (their own FSDP units: the blocks' units
        # then hold the dense parameters only), sharded as the layout shards the rest.
        experts = [m.experts for m in model.modules() if isinstance(m, MoE)]
        shard_experts(
            experts,
            ps,
            sharding=fsdp.sharding if fsdp is not None else "no_shard",
            mixed_precision=fsdp.mixed_precision if fsdp is not None else "fp32",
            reshard_after_forward=fsdp.reshard_after_forward if fsdp is not None else None,
        )
    if fsdp is not None:
        DistributedOptimizer.wrap(
            model,
            sharding=fsdp.sharding,
            mixed_precision=fsdp.mixed_precision,
            cpu_offload=fsdp.cpu_offload,
            backward_prefetch=fsdp.backward_prefetch,
            explicit_prefetch=fsdp.explicit_prefetch,
            async_reduce_scatter=fsdp.async_reduce_scatter,
            parallel_state=ps,
            reshard_after_forward=fsdp.reshard_after_forward,
            blocks_per_unit=fsdp.blocks_per_unit,
            roots=roots,
            units=zero1_units if fsdp.sharding == "optimizer" else None,
        )
    elif (layout.tp is not None or layout.pp is not None or layout.ep is not None) and ps.submesh("dp_cp").size() > 1:
        DistributedOptimizer.wrap(model, sharding="no_shard", parallel_state=ps, roots=roots)


def apply_sequence_positions(
    model: nn.Module, ps: ParallelState, cp: Optional[CPConfig], seq_len: int, device: torch.device
) -> None:
    """Context parallelism: the positions of this rank's zigzag share of each sequence."""
    if cp is not None:
        model.positions = sequence_positions(seq_len, cp.size, ps.cp_rank, cp.load_balance, device)


def apply_ddp(model: nn.Module, ps: ParallelState, layout: ParallelConfig, device: torch.device) -> nn.Module:
    """DistributedDataParallel over every rank holding distinct tokens (data, and context-parallel
    ranks, whose gradients are summed alike), for a layout that FSDP does not already replicate."""
    if any(getattr(layout, name) is not None for name in ("fsdp", "tp", "pp", "ep")) or ps.submesh("dp_cp").size() == 1:
        return model
    dp: DPConfig = layout.dp or DPConfig()
    replicas = ps.submesh("dp_cp").get_group() if layout.cp is not None else ps.get_dp_group()
    return replicate(model, replicas, device, bucket_cap_mb=dp.bucket_cap_mb, static_graph=dp.static_graph)
