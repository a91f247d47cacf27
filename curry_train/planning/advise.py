"""Which layout to run: per-rank memory and step time of candidate layouts, and the decision walk.

The decision guide, as numbers: add data parallelism, then ZeRO-1, ZeRO-2, ZeRO-3 (FSDP), then
activation recompute, then tensor parallelism (only when a step's memory exceeds a device), pipeline
parallelism (across nodes), context parallelism (when the sequence breaks memory), one primitive at a
time, and stop at the first layout that fits ``hardware`` with ``HEADROOM`` to spare. What each
estimate counts, and why, is in docs/planning.md.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig

from curry_train.config.schema import ParallelConfig
from curry_train.layout.pipeline import check_microbatches
from curry_train.planning.layout import (
    ZERO_NAMES,
    Layout,
    current_layout,
    loss_chunks_of,
    microbatches_per_step,
    pipeline_knobs,
    train_command,
)
from curry_train.planning.memory import (
    activation_bytes,
    holds_unsharded_gradients,
    is_expert,
    model_state,
    rank_parameters,
    transient_state,
)
from curry_train.planning.plot import new_figure, save
from curry_train.planning.step_time import step_time, throughput
from curry_train.primitives.lora import is_adapter

HEADROOM = 0.10  # of device memory, left free by a recommendation (allocator, spikes, estimate error)
SPEEDUP = 0.10  # a heavier layout replaces a lighter one that fits only if its step is this much shorter
DOMINATES = 0.5  # expert parallelism is weighed when the experts' traffic is at least this share of the step
MEMORY_PARTS = ("params", "grads", "optimizer", "transient", "activations", "loss", "reserved")


@dataclass
class Estimate:
    layout: Layout
    memory: dict[str, int]  # per rank, by part, and "total"
    capacity: int  # the device's memory less HEADROOM
    time: dict[str, float]
    speed: dict[str, float] = field(default_factory=dict)  # tokens_per_s_per_device, mfu (step_time.throughput)

    @property
    def fits(self) -> bool:
        return self.memory["total"] <= self.capacity

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": asdict(self.layout),
            "memory": self.memory,
            "fits": self.fits,
            "capacity": self.capacity,
            "step_time": self.time,
            **self.speed,
        }


def estimate(cfg: DictConfig, layout: Layout) -> Estimate:
    """Per-rank memory (the fullest rank: shard 0, the fullest pipeline rank's activations with the
    largest stage's parameters) and step time of ``layout`` for ``cfg``'s model, data and hardware."""
    hw = cfg.hardware
    states = []
    for stage in range(layout.pp):
        named = rank_parameters(
            cfg.model, layout.tp, layout.pp, stage, layout.pp_schedule, layout.virtual_stages, layout.ep
        )
        if cfg.model.get("lora") is not None:  # the frozen base: parameters only, no gradient, no optimizer state
            frozen = [(name, shape) for name, shape in named if not is_adapter(name)]
            named = [(name, shape) for name, shape in named if is_adapter(name)]
        dense = [shape for name, shape in named if not is_expert(name)]
        experts = [shape for name, shape in named if is_expert(name)]
        state = model_state(dense, layout.zero, layout.shards, layout.mixed_precision, 0, layout.dp_replicate)
        if cfg.model.get("lora") is not None:
            frozen_experts = [shape for name, shape in frozen if is_expert(name)]
            frozen = [shape for name, shape in frozen if not is_expert(name)]
            base = model_state(frozen, layout.zero, layout.shards, layout.mixed_precision, 0, layout.dp_replicate)
            if frozen_experts:  # sharded as the experts are: over the ranks expert parallelism leaves
                base["params"] += model_state(
                    frozen_experts, layout.zero, layout.expert_shards, layout.mixed_precision
                )["params"]
            state["params"] += base["params"] // (2 if cfg.model.lora.base_dtype == "bf16" else 1)  # 2 bytes
        if experts:  # FSDP shards the experts over the ranks expert parallelism leaves
            expert_state = model_state(experts, layout.zero, layout.expert_shards, layout.mixed_precision)
            state = {key: state[key] + expert_state[key] for key in state}
        if holds_unsharded_gradients(cfg, layout):  # fp32, whole on the rank, until the step's last backward
            state["grads"] = 4 * sum(math.prod(shape) for shape in dense + experts)
        if cfg.model.get("lora") is not None:  # the frozen base's transient all-gathers too
            dense, experts = dense + frozen, experts + frozen_experts
        state["transient"] = transient_state(cfg.model, dense + experts, layout, stage)
        if layout.pp > 1 and layout.zero in ("full", "hybrid"):
            # a pipeline stage keeps its units gathered from its first backward to its last
            whole = layout.element_bytes * sum(math.prod(shape) for shape in dense + experts)
            state["transient"] = max(state["transient"], whole)
        states.append(state)
    memory = dict(max(states, key=lambda st: sum(st.values())))
    memory.update(activation_bytes(cfg, layout, hw.flash_attention))
    memory["reserved"] = int(hw.reserved_bytes)
    memory["total"] = sum(memory.values())
    capacity = int(hw.memory_bytes * (1 - HEADROOM))
    times = step_time(cfg, layout, hw)
    return Estimate(layout, memory, capacity, times, throughput(cfg, layout, hw, times))


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
            "tokens_per_s_per_device": rec.speed["tokens_per_s_per_device"] if rec else None,
            "mfu": rec.speed["mfu"] if rec else None,
            "layout": asdict(rec.layout) if rec else None,
            "command": self.command,
            "reasons": self.reasons,
            "tried": [{"step": step, **est.to_dict()} for step, est in self.tried],
        }


def _reducing_each_microbatch_too(cfg: DictConfig, layouts: Sequence[Layout]) -> list[Layout]:
    """Each layout, followed, where FSDP would hold its gradients unsharded between micro-batches (and no
    pipeline forces it to), by the same with a reduce-scatter every micro-batch
    (``parallel.fsdp.sync_each_microbatch``: sharded gradients, for more traffic)."""
    out = []
    for layout in layouts:
        out.append(layout)
        if layout.pp == 1 and holds_unsharded_gradients(cfg, layout):
            out.append(replace(layout, sync_each_microbatch=True))
    return out


def _loss_chunks(cfg: DictConfig, base: Layout) -> list[Layout]:
    """``base`` with its loss over more chunks of the sequence (``model.loss_chunks``: 2, 4, ... up to 64,
    fewest first, at every micro-batch); none where the run already chunks it as finely."""
    seq = cfg.data.seq_len // base.cp // (base.tp if base.sequence_parallel else 1)
    counts = [c for c in _powers_of_two(min(64, seq)) if c > base.loss_chunks]
    return [replace(base, loss_chunks=c, micro_batch_size=m) for c in counts for m in _micro_batches(cfg, base.dp)]


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
    """Walk the decision guide (module docstring; docs/planning.md) over ``hardware.nodes x
    hardware.gpus_per_node`` devices."""
    hw = cfg.hardware
    world, gpn = hw.nodes * hw.gpus_per_node, hw.gpus_per_node
    mp = hw.mixed_precision
    mb = cfg.data.micro_batch_size
    tried: list[tuple[str, Estimate]] = []
    reasons: list[str] = []
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731

    def done(est: Estimate) -> Advice:
        est = _expert_parallel(cfg, est, tried, reasons)
        est = _across_nodes(cfg, est, tried, reasons)
        return Advice(est, tried, reasons, train_command(cfg, est.layout, overrides))

    def attempt(step: str, layouts: Sequence[Layout]) -> Optional[Estimate]:
        est, ok = _fit(cfg, _reducing_each_microbatch_too(cfg, layouts))
        tried.append((step, est))
        return est if ok else None

    mb = _micro_batches(cfg, world)[0]
    chunks = loss_chunks_of(cfg)  # the run's own model.loss_chunks, kept by every candidate
    ddp = Layout(dp_replicate=world, mixed_precision=mp, micro_batch_size=mb, loss_chunks=chunks)
    if est := attempt("data parallel (DDP)", [ddp]):
        reasons.append(f"DDP fits: {gib(est.memory['total'])} of {gib(est.capacity)} per rank; no sharding needed.")
        return done(est)
    reasons.append(f"DDP needs {gib(tried[-1][1].memory['total'])} per rank, more than {gib(tried[-1][1].capacity)}.")
    if world > 1:
        for zero in ("optimizer", "shard_grad_op", "full"):
            layout = Layout(dp_shard=world, zero=zero, mixed_precision=mp, micro_batch_size=mb, loss_chunks=chunks)
            if est := attempt(ZERO_NAMES[zero], [layout]):
                reasons.append(
                    f"{ZERO_NAMES[zero]} fits ({gib(est.memory['total'])} per rank); lighter sharding does not."
                )
                return done(est)
            reasons.append(f"{ZERO_NAMES[zero]} needs {gib(tried[-1][1].memory['total'])} per rank.")
    else:
        reasons.append("one device: there is nothing to shard over.")
    base = Layout(
        dp_shard=world, zero="full" if world > 1 else "none", dp_replicate=1, mixed_precision=mp, loss_chunks=chunks
    )
    if world > 1 and (eps := _ep_sizes(cfg, base)):
        # A MoE model's gathered units hold every expert of a layer; expert parallelism keeps 1/ep of
        # them per rank (same sharded state, smaller gathers), before anything cuts the batch.
        layouts = [replace(base, ep=e, micro_batch_size=mb) for e in eps]
        if est := attempt("expert parallel (ZeRO-3 + ep)", layouts):
            reasons.append(
                f"ZeRO-3 + ep={est.layout.ep} fits ({gib(est.memory['total'])} per rank): FSDP alone gathers every"
                f" expert of a layer at once; ep={est.layout.ep} keeps 1/{est.layout.ep} of them on each rank."
            )
            return done(est)
        reasons.append(f"ZeRO-3 + ep needs {gib(tried[-1][1].memory['total'])} per rank.")
        base = replace(base, ep=tried[-1][1].layout.ep)
    smaller = [replace(base, micro_batch_size=m) for m in _micro_batches(cfg, world)[1:]]
    if smaller and (est := attempt("smaller micro-batch (more accumulation)", smaller)):
        reasons.append(
            f"micro-batch {est.layout.micro_batch_size} (gradient accumulation keeps the global batch) fits."
        )
        return done(est)
    base = replace(base, micro_batch_size=1)

    def chunk_the_loss(base: Layout) -> Optional[Estimate]:
        """Where the logits outweigh what the blocks keep (and a tenth of the device), the head and the loss
        a chunk of the sequence at a time (each chunk's logits again in backward: one more GEMM of the head,
        lighter than any recompute); the chunks that hold least are kept from here on (``tried[-1]``)."""
        last = estimate(cfg, base)
        chunked = _loss_chunks(cfg, base)
        loss = last.memory["loss"]
        if loss <= last.memory["activations"] or loss < HEADROOM * last.capacity or not chunked:
            return None  # the logits are not what breaks memory
        if est := attempt("loss in chunks (model.loss_chunks)", chunked):
            reasons.append(
                f"the loss in {est.layout.loss_chunks} chunks fits ({gib(est.memory['total'])} per rank): the"
                f" logits ({gib(last.memory['loss'])}) outweighed the blocks' activations."
            )
            return est
        reasons.append(
            f"the logits ({gib(last.memory['loss'])}) outweigh the blocks' activations: the loss in"
            f" {tried[-1][1].layout.loss_chunks} chunks ({gib(tried[-1][1].memory['total'])} per rank) from here on."
        )
        return None

    if est := chunk_the_loss(base):
        return done(est)
    base = replace(base, loss_chunks=tried[-1][1].layout.loss_chunks)
    for recompute in ("selective", "full"):
        if est := attempt(
            f"recompute={recompute}",
            [replace(base, recompute=recompute, micro_batch_size=m) for m in _micro_batches(cfg, world)],
        ):
            reasons.append(f"recompute={recompute} fits ({gib(est.memory['total'])} per rank); tp and cp not needed.")
            return done(est)
        base = replace(base, recompute=recompute)
        if est := chunk_the_loss(base):
            return done(est)
        base = replace(base, loss_chunks=tried[-1][1].layout.loss_chunks)
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
    cp_layouts = [_fit_ep(replace(base, cp=c, dp_shard=world // c)) for c in cps]
    tp_layouts = [_fit_ep(replace(base, tp=t, dp_shard=world // t, sequence_parallel=True)) for t in tps]
    steps = [("cp", cp_layouts), ("tp", tp_layouts)] if sequence_bound else [("tp", tp_layouts), ("cp", cp_layouts)]
    if sequence_bound:
        reasons.append(
            f"activations of one sequence ({gib(last.memory['activations'] + last.memory['loss'])}) outweigh"
            " the model state: the sequence breaks memory, so context parallelism comes first."
        )
    else:
        reasons.append(
            "one step's memory exceeds a device even with ZeRO-3 and full recompute: tensor parallelism next."
        )
    for name, layouts in steps:
        if layouts and (est := attempt(name, layouts)):
            reasons.append(f"{name}={getattr(est.layout, name)} fits ({gib(est.memory['total'])} per rank).")
            return done(est)
    both = [
        _fit_ep(replace(base, tp=t, cp=c, dp_shard=world // (t * c), sequence_parallel=True))
        for t in tps
        for c in cps
        if world % (t * c) == 0
    ]
    if both and (est := attempt("tp+cp", both)):
        return done(est)
    reasons.append("no combination of tp and cp fits.")
    return Advice(None, tried, reasons + _what_would_fit(cfg, tried[-1][1], world), None)


def _fit_ep(layout: Layout) -> Layout:
    """``layout`` with its ep cut to what its dp x cp ranks can lend (ep and those are powers of two)."""
    return replace(layout, ep=math.gcd(layout.ep, layout.dp * layout.cp))


def _ep_sizes(cfg: DictConfig, layout: Layout) -> list[int]:
    """Expert-parallel sizes a MoE model can take on ``layout``: powers of two dividing its experts and
    the ranks holding distinct tokens (dp x cp), ep alone within a node; none for a dense model."""
    moe = cfg.model.get("moe")
    if moe is None:
        return []
    ranks = layout.dp * layout.cp
    most = max(1, cfg.hardware.gpus_per_node // layout.tp)
    return [e for e in _powers_of_two(min(ranks, most)) if ranks % e == 0 and moe.experts % e == 0]


def _expert_parallel(cfg: DictConfig, est: Estimate, tried: list[tuple[str, Estimate]], reasons: list[str]) -> Estimate:
    """For a MoE model, expert parallelism where the experts' data-parallel traffic dominates the step
    (``DOMINATES``).

    Under FSDP every rank gathers (and reduce-scatters) every expert of every layer, though each token
    uses ``top_k`` of them; expert parallelism keeps ``1/ep`` of each layer's experts on a rank (their
    traffic over ``dp x cp / ep`` ranks) and sends the tokens to them instead (two all-to-alls each
    way per layer, within a node). Taken if it fits and its step is ``SPEEDUP`` shorter; the reason
    says which it was. ZeRO-1 and HSDP do not compose with ep: their candidates shard as ZeRO-2/3."""
    layout = est.layout
    eps = [e for e in _ep_sizes(cfg, layout) if e != layout.ep] if layout.ep == 1 else []
    if not eps:
        return est
    zero = {"optimizer": "shard_grad_op", "hybrid": "full"}.get(layout.zero, layout.zero)
    sharded = {} if zero == "none" else {"dp_shard": layout.dp, "dp_replicate": 1}
    options = [estimate(cfg, replace(layout, ep=e, zero=zero, **sharded)) for e in eps]
    fitting = [o for o in options if o.fits]
    now, experts = est.time["total"], est.time.get("dp_experts", 0.0)
    if not fitting:
        reasons.append(f"ep does not fit beside {layout.describe()} ({', '.join(f'ep={e}' for e in eps)} tried).")
        return est
    best = min(fitting, key=lambda e: e.time["total"])
    moves = "gathers" if layout.zero in ("shard_grad_op", "full", "hybrid") else "all-reduces"
    if experts >= DOMINATES * now and best.time["total"] < (1 - SPEEDUP) * now:
        tried.append((f"expert parallel: ep={best.layout.ep}", best))
        reasons.append(
            f"the experts' data-parallel traffic takes {experts:.3g} s of a {now:.3g} s step under"
            f" {layout.describe()} (each rank {moves} every expert, a token uses {cfg.model.moe.top_k} of"
            f" {cfg.model.moe.experts}); ep={best.layout.ep} keeps 1/{best.layout.ep} of them per rank and moves"
            f" the tokens instead (all-to-all {best.time.get('ep', 0.0):.3g} s): {best.time['total']:.3g} s per"
            f" step, {gib_text(best.memory['total'])} per rank."
        )
        return best
    reasons.append(
        f"ep not needed: the experts fit under {layout.describe()} (their traffic: {experts:.3g} s of a"
        f" {now:.3g} s step); the fastest ep that fits, ep={best.layout.ep}, would take {best.time['total']:.3g} s"
        f" per step."
    )
    return est


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
            reasons.append(
                "pp not needed: one node (pipeline parallelism trades a bubble for less inter-node traffic,"
                " and ZeRO already divides the model state)."
            )
        return est
    inner = hw.gpus_per_node // (layout.tp * layout.cp)  # data-parallel ranks of one node
    candidates: list[tuple[str, Layout]] = []
    sharded = layout.zero in ("optimizer", "shard_grad_op", "full")
    if sharded and layout.ep == 1 and inner >= 1 and layout.dp > inner and layout.dp % inner == 0:
        hybrid = replace(
            layout, zero="hybrid", dp_shard=inner, dp_replicate=layout.dp // inner, sync_each_microbatch=False
        )
        candidates += [("HSDP", c) for c in _reducing_each_microbatch_too(cfg, [hybrid])]
    schedules = (
        [pipeline_knobs(cfg)]
        if ParallelConfig.of(cfg).pp is not None
        else [{"pp_schedule": "1F1B", "virtual_stages": None}, {"pp_schedule": "interleaved", "virtual_stages": 2}]
    )
    for pp in _divisors(hw.nodes):
        if layout.dp % pp or layout.pp > 1:
            continue
        dp = layout.dp // pp
        if (dp * layout.cp) % layout.ep:
            continue
        zeros = ("none",) if dp == 1 else ("none", "optimizer", "shard_grad_op", "full")
        for zero in (z for z in zeros if layout.ep == 1 or z != "optimizer"):
            for knobs in schedules:
                candidate = replace(
                    layout,
                    pp=pp,
                    zero=zero,
                    dp_shard=1 if zero == "none" else dp,
                    dp_replicate=dp if zero == "none" else 1,
                    sync_each_microbatch=False,  # a pipeline stage reduces its gradients after its last backward
                    loss_chunks=1,  # the last stage's schedule computes the loss from whole logits (the check)
                    **knobs,
                )
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
            names = ", ".join(sorted({n for n, _ in options}))
            reasons.append(f"pp across the {hw.nodes} nodes does not fit ({names}).")
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
            + (f", bubble {best.time['bubble']:.2f} s" if best.layout.pp > 1 else "")
            + "."
        )
        return best
    pp_options = [e for n, e in fitting if n.startswith("pp=")]
    if pp_options:
        fastest = min(pp_options, key=lambda e: e.time["total"])
        reasons.append(
            f"pp not needed: across {hw.nodes} nodes the fastest pipeline that fits ({fastest.layout.describe()})"
            f" takes {fastest.time['total']:.2f} s per step (bubble"
            f" {fastest.time['bubble']:.2f} s) against {now:.2f} s"
            + (f"; HSDP would take {best.time['total']:.2f} s" if name == "HSDP" else "")
            + "."
        )
    else:
        reasons.append(
            f"pp not needed: no pipeline over the {hw.nodes} nodes fits;"
            f" HSDP takes {best.time['total']:.2f} s"
            f" per step against {now:.2f} s."
        )
    return est


def _shorter_bubble(cfg: DictConfig, now: Estimate) -> Optional[Estimate]:
    """The pipeline schedule, of those that run this layout and fit, whose step is the shortest, if it
    is ``SPEEDUP`` shorter than ``now``'s: interleaved (2 stages per rank: half the bubble, twice the
    sends, more activations in flight) and the zero-bubble kinds."""
    options = [
        {"pp_schedule": "interleaved", "virtual_stages": 2},
        {"pp_schedule": "interleaved_zb", "virtual_stages": 2},
        {"pp_schedule": "zbv", "virtual_stages": None},
    ]
    fitting = []
    for knobs in options:
        layout = replace(now.layout, **knobs)
        if layout != now.layout and _pipeline_runs(cfg, layout) and (est := estimate(cfg, layout)).fits:
            fitting.append(est)
    best = min(fitting, key=lambda e: e.time["total"], default=None)
    return best if best is not None and best.time["total"] < (1 - SPEEDUP) * now.time["total"] else None


def _pipeline_runs(cfg: DictConfig, layout: Layout) -> bool:
    """Whether the schedule accepts the layout: a stage per rank's blocks, the micro-batch count."""
    n_stages = layout.pp * layout.stages_per_rank
    try:
        check_microbatches(layout.pp_schedule, microbatches_per_step(cfg, layout), layout.pp, n_stages)
    except ValueError:
        return False
    return cfg.model.n_layers >= n_stages


def _what_would_fit(cfg: DictConfig, best: Estimate, world: int) -> list[str]:
    m = best.memory
    state = m["params"] + m["grads"] + m["optimizer"]
    rest = m["total"] - state
    free = best.capacity - rest
    hints = [
        f"nothing fits on {world} x {gib_text(cfg.hardware.memory_bytes)} ({cfg.hardware.name}); closest:"
        f" {best.layout.describe()} at {gib_text(m['total'])} per rank."
    ]
    if free > 0:
        needed = math.ceil(world * state / free)
        hints.append(f"more devices: the sharded model state needs about {needed} devices of this kind.")
    hints.append(
        "CPU offload (parallel.fsdp.cpu_offload=true) moves the sharded parameters, gradients and"
        f" optimizer state ({gib_text(state)} per rank) to host memory."
    )
    if m["activations"] + m["loss"] > state:
        hints.append("a shorter sequence (data.seq_len) or more context-parallel ranks shrinks the activations.")
    return hints


def gib_text(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


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
        parts = {k: v for k, v in now.time.items() if k not in ("total", "compute", "dp", "dp_experts")}
        worst = max(parts, key=parts.get) if parts else None
        nxt = None
        if worst and parts[worst] > 0.2 * now.time["compute"]:
            what = {"dp_exposed": "data-parallel communication not hidden by compute", "bubble": "the pipeline bubble"}
            why = (
                f"{what.get(worst, f'communication on {worst}')} takes {parts[worst]:.2f} s"
                f" of a {now.time['total']:.2f} s step"
            )
            notes: list[str] = []
            zero2 = replace(layout, zero="shard_grad_op")
            if worst == "dp_exposed" and layout.zero == "full" and estimate(cfg, zero2).fits:
                nxt = zero2
                why += ": ZeRO-2 gathers parameters once per step instead of per micro-batch, and fits"
            elif worst == "dp_exposed" and (alt := _across_nodes(cfg, now, [], notes)) is not now:
                nxt = alt.layout
                why += ": " + notes[-1]
            elif worst == "bubble" and (alt := _shorter_bubble(cfg, now)) is not None:
                nxt = alt.layout
                why += (
                    f": {alt.layout.pp_schedule} (v={alt.layout.stages_per_rank}) cuts the bubble to"
                    f" {alt.time['bubble']:.2f} s and fits ({gib_text(alt.memory['total'])} per rank):"
                    f" {alt.time['total']:.2f} s per step"
                )
            elif worst == "bubble":
                why += (
                    ": more micro-batches per step (a smaller data.micro_batch_size); no other schedule that"
                    f" fits is {SPEEDUP:.0%} faster"
                )
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


# ----------------------------------------------------------------------------------------------
# The chart


GIB = 2**30


def plot_memory(cfg: DictConfig, candidates: Sequence[tuple[str, Estimate]], path: Path) -> Any:
    """Each candidate's memory per rank, in GiB, as a bar stacked by part (``MEMORY_PARTS``, bottom
    up), next to the device's memory and the capacity a recommendation may use (less ``HEADROOM``);
    written as PNG to ``path``. ``candidates``: (step of the walk, its estimate), in the order tried."""
    if not candidates:
        raise ValueError("no candidates to plot")
    hw = cfg.hardware
    figure, axes = new_figure(width=max(9.0, 3.0 + 1.4 * len(candidates)), height=6.0)
    positions = list(range(len(candidates)))
    bottoms = [0.0] * len(candidates)
    for index, part in enumerate(MEMORY_PARTS):
        heights = [est.memory[part] / GIB for _, est in candidates]
        axes.bar(positions, heights, width=0.6, bottom=bottoms, label=part, color=f"C{index}")
        bottoms = [bottom + height for bottom, height in zip(bottoms, heights, strict=False)]
    capacity = candidates[0][1].capacity
    axes.axhline(
        hw.memory_bytes / GIB, color="black", linewidth=1.5, label=f"device memory {gib_text(hw.memory_bytes)}"
    )
    axes.axhline(
        capacity / GIB,
        color="black",
        linewidth=1.5,
        linestyle="--",
        label=f"usable capacity {gib_text(capacity)} (less {HEADROOM:.0%} headroom)",
    )
    for position, (_, est) in zip(positions, candidates, strict=False):
        verdict = "fits" if est.fits else "too big"
        axes.annotate(
            f"{gib_text(est.memory['total'])}\n{verdict}",
            (position, est.memory["total"] / GIB),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
            zorder=5,
        )
    labels = [
        textwrap.fill(f"{step}: {'+'.join(est.layout.options())}", 16, break_long_words=False)
        for step, est in candidates
    ]
    axes.set_xticks(positions, labels, fontsize=8)
    axes.set_ylim(0, 1.12 * max(bottoms + [hw.memory_bytes / GIB]))
    axes.set_xlabel("candidate layout (step: parallel options), in the order tried")
    axes.set_ylabel("memory per rank (GiB)")
    axes.set_title(
        f"{cfg.model.name}, seq {cfg.data.seq_len}: memory per rank on {hw.nodes} x {hw.gpus_per_node} {hw.name}"
    )
    # The legend lists the parts top down, as the bars stack them, under the two lines.
    handles = dict(zip(*reversed(axes.get_legend_handles_labels()), strict=False))
    names = [name for name in handles if name not in MEMORY_PARTS] + list(reversed(MEMORY_PARTS))
    axes.legend([handles[name] for name in names], names, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    axes.grid(axis="y", alpha=0.3)
    save(figure, path)
    return figure
