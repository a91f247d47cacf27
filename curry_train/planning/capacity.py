"""Capacity sweeps: the largest model of a family, or the largest micro-batch, that fits each layout.

``scripts/capacity_sweep.py`` is the command line. For each layout (a ``parallel=`` option string
plus overrides, on ``hardware.nodes x hardware.gpus_per_node`` devices of ``hardware``) the sweep
finds the largest member of a family (``families``; ``sweep=model``) or the largest power-of-two
micro-batch (``sweep=micro_batch``) that fits, by ``advise.estimate`` (``mode=estimate``) or by
running trials (``mode=measure``: ``trials``), and recommends the largest size any layout fits
under the lightest layout that fits it (``weight``), with its ``python train.py ...`` command. How
"fits" is decided, and how a trial is measured: docs/planning.md ("Capacity sweeps").
"""

from __future__ import annotations

import math
import re
import shlex
import sys
from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch
from omegaconf import DictConfig

from curry_train.config import compose
from curry_train.config.schema import ParallelConfig, PPConfig
from curry_train.layout.pipeline import check_microbatches, split_layers, stages_per_rank
from curry_train.planning.advise import HEADROOM, estimate
from curry_train.planning.capacity_report import Candidate, Result, Row, Sweep, size_text
from curry_train.planning.families import FAMILIES, MEMBER_KEYS, default_family, family
from curry_train.planning.layout import Layout, LayoutSpec, PlanningError, current_layout, parse_layout, train_command
from curry_train.planning.trials import measure, measure_blocker

SWEEPS = ("model", "micro_batch")
MODES = ("auto", "estimate", "measure")
STARTS = ("estimate", "top", "bottom")
TRIAL_TIMEOUT_S = 1800.0


def parse_count(text: str) -> float:
    """``"70B"`` -> 7e10, ``"30M"`` -> 3e7, ``"16"`` -> 16."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBTkmbt]?)\s*", text)
    if not match:
        raise PlanningError(f"max={text!r}: expected a number, optionally with K, M, B or T (e.g. max=70B, max=16)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    return float(match.group(1)) * scale


# ----------------------------------------------------------------------------------------------
# Layouts


def parse_layouts(text: str) -> list[LayoutSpec]:
    """``'dp;fsdp fsdp.sharding=optimizer;fsdp+tp tp.size=8'``: layout strings separated by ``;``, each
    the ``parallel`` options first (``layout.parse_layout``; ``tp.size=8`` is ``parallel.tp.size=8``)."""
    items = [part.strip() for part in text.split(";")]
    specs = [parse_layout(item, f"layouts item {item!r}", options_first=True) for item in items if item]
    if not specs:
        raise PlanningError(f"layouts={text!r}: no layout given")
    return specs


def default_layouts(cfg: DictConfig) -> str:
    """The decision order as layouts: DDP, ZeRO-1, -2, -3, ZeRO-3 with selective then full recompute,
    then tensor parallelism over a node (with sequence parallelism) and, on several nodes, a pipeline
    over them (one stage per node). One device: DDP, and DDP with full recompute."""
    hw = cfg.hardware
    world = hw.nodes * hw.gpus_per_node
    if world == 1:
        return "dp;dp recompute=full"
    items = [
        "dp",
        "fsdp fsdp.sharding=optimizer",
        "fsdp fsdp.sharding=shard_grad_op",
        "fsdp",
        "fsdp recompute=selective",
        "fsdp recompute=full",
    ]
    tp = hw.gpus_per_node & -hw.gpus_per_node  # the largest power of two that divides a node
    if tp > 1:
        items.append(f"fsdp+tp tp.size={tp} tp.sequence_parallel=true recompute=full")
    if hw.nodes > 1:
        items.append(f"fsdp+tp+pp tp.size={tp} tp.sequence_parallel=true pp.size={hw.nodes} recompute=full")
    return ";".join(items)


def _names_precision(overrides: Sequence[str]) -> bool:
    return any(o.lstrip("+~").startswith(("trainer.precision=", "parallel.fsdp.mixed_precision=")) for o in overrides)


def layout_overrides(cfg: DictConfig, spec: LayoutSpec, user_overrides: Sequence[str]) -> list[str]:
    """The overrides that run ``spec`` on the hardware's devices. The compute dtype is the hardware's
    (``hardware.mixed_precision``, as advise recommends) unless the run or the item names one."""
    hw = cfg.hardware
    overrides = [*spec.hydra_overrides(), f"trainer.devices={hw.gpus_per_node}", f"trainer.num_nodes={hw.nodes}"]
    if hw.mixed_precision == "bf16" and not _names_precision([*user_overrides, *spec.overrides]):
        overrides.append(
            "parallel.fsdp.mixed_precision=bf16"
            if "fsdp" in spec.options.split("+")
            else "trainer.precision=bf16-mixed"
        )
    return overrides


ZERO_WEIGHT = {"none": 0, "optimizer": 1, "shard_grad_op": 2, "full": 3, "hybrid": 3}
RECOMPUTE_WEIGHT = {"none": 0, "selective": 1, "full": 2}


def weight(layout: Layout) -> tuple[int, ...]:
    """How heavy a layout is in the decision order (dp -> ZeRO-1/2/3 -> recompute -> tp -> pp -> cp):
    compared as a tuple, a heavier primitive outweighs any setting of the lighter ones."""
    return (layout.cp, layout.pp, layout.tp, RECOMPUTE_WEIGHT.get(layout.recompute, 2), ZERO_WEIGHT.get(layout.zero, 3))


def invalid_reason(cfg: DictConfig, layout: Layout) -> Optional[str]:
    """Why ``cfg`` cannot run under ``layout`` (sizes that do not divide), or None."""
    m, d = cfg.model, cfg.data
    if layout.tp > 1:
        for key in ("n_heads", "n_kv_heads", "dim", "ffn_dim", "vocab_size"):
            if m[key] % layout.tp:
                return f"tp={layout.tp} does not divide model.{key}={m[key]}"
    if layout.cp > 1:
        cp_cfg = ParallelConfig.of(cfg).cp
        parts = 2 * layout.cp if cp_cfg is None or cp_cfg.load_balance else layout.cp
        if d.seq_len % parts:
            return f"cp={layout.cp} needs data.seq_len={d.seq_len} divisible by {parts}"
    if d.global_batch_size % (layout.micro_batch_size * layout.dp):
        return (
            f"micro-batch {layout.micro_batch_size} x dp {layout.dp} does not divide"
            f" data.global_batch_size={d.global_batch_size}"
        )
    if layout.pp > 1:
        pp = ParallelConfig.of(cfg).pp or PPConfig()
        try:
            n_stages = layout.pp * stages_per_rank(pp.schedule, pp.virtual_stages)
            split_layers(m.n_layers, n_stages, pp.layers_per_stage)
            local = d.global_batch_size // layout.dp
            check_microbatches(pp.schedule, pp.microbatches or local // layout.micro_batch_size, layout.pp, n_stages)
        except ValueError as error:
            return f"pp={layout.pp}: {error}"
    return None


def _local_micro_batch(configured: int, local: int) -> int:
    """The configured micro-batch, halved until it divides the local batch (as advise does)."""
    size = configured
    while size > 1 and local % size:
        size //= 2
    return max(1, size)


def micro_batch_candidates(cfg: DictConfig, layout: Layout) -> list[int]:
    """Powers of two up to the local batch (``data.global_batch_size / dp``) that divide it."""
    local = cfg.data.global_batch_size // layout.dp
    return [2**i for i in range(int(math.log2(max(1, local))) + 1) if local % 2**i == 0]


# ----------------------------------------------------------------------------------------------
# The search


def search(n: int, start: int, trial: Callable[[int], Optional[bool]]) -> int:
    """The largest ``i`` in ``[0, n)`` with ``trial(i)`` true (-1: none), assuming true below a
    boundary and false above it. Probes ``start`` first, then its neighbour (when the first probe is
    right about the boundary, two trials settle it), then bisects. ``trial`` returning None (an
    error) stops the search with what is known so far."""
    lo, hi = -1, n  # trial(lo) true (or lo = -1), trial(hi) false (or hi = n)
    probe, probes = min(max(start, 0), n - 1), 0
    while hi - lo > 1:
        ok = trial(probe)
        if ok is None:
            return lo
        lo, hi = (probe, hi) if ok else (lo, probe)
        probes += 1
        neighbour = probe + 1 if ok else probe - 1
        probe = neighbour if probes == 1 and lo < neighbour < hi else (lo + hi) // 2
    return lo


# ----------------------------------------------------------------------------------------------
# The sweep


def _why(est_memory: dict[str, int], capacity: int) -> str:
    parts = {
        "model state": sum(est_memory.get(k, 0) for k in ("params", "grads", "optimizer", "transient")),
        "activations": est_memory.get("activations", 0),
        "loss": est_memory.get("loss", 0),
    }
    top = sorted(parts.items(), key=lambda kv: -kv[1])[:2]
    largest = ", ".join(f"{k} {size_text(v)}" for k, v in top)
    return f"needs {size_text(est_memory['total'])} > {size_text(capacity)} ({largest})"


def _estimate_result(cfg: DictConfig, layout: Layout, candidate: Candidate) -> Result:
    reason = invalid_reason(cfg, layout)
    capacity = int(cfg.hardware.memory_bytes * (1 - HEADROOM))
    if reason:
        return Result(candidate, "invalid", None, capacity, reason)
    est = estimate(cfg, layout)
    return Result(
        candidate,
        "fits" if est.fits else "too big",
        est.memory["total"],
        est.capacity,
        "" if est.fits else _why(est.memory, est.capacity),
        memory_breakdown=dict(est.memory),
    )


def _progress(message: str, end: str = "\n") -> None:
    print(message, file=sys.stderr, flush=True, end=end)


def _resolve_mode(mode: str, cfg: DictConfig, warnings: list[str]) -> str:
    """``measure`` or ``estimate``; ``auto`` measures GPU hardware where this machine can run it."""
    if mode not in MODES:
        raise PlanningError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    blocker = measure_blocker(cfg)
    if mode == "measure" and blocker:
        raise PlanningError(blocker)
    if mode == "auto":
        if cfg.hardware.accelerator != "gpu" or not torch.cuda.is_available():
            return "estimate"
        if blocker:
            warnings.append(f"estimated, not measured: {blocker.split(';')[0].replace('mode=measure', 'measuring')}")
            return "estimate"
        return "measure"
    return mode


def run_sweep(
    overrides: Sequence[str] = (),
    sweep: str = "model",
    layouts: Optional[str] = None,
    mode: str = "auto",
    family_name: Optional[str] = None,
    start: str = "estimate",
    largest: Optional[float] = None,
    trial_timeout: float = TRIAL_TIMEOUT_S,
    progress: Callable[..., None] = _progress,
) -> Sweep:
    """Sweep ``sweep`` over each layout of ``layouts`` (default: ``default_layouts``) for the run of
    ``overrides`` on its ``hardware``; ``largest`` bounds the candidates (parameters or micro-batch)."""
    if sweep not in SWEEPS:
        raise PlanningError(f"sweep={sweep!r}: expected one of {', '.join(SWEEPS)}")
    if start not in STARTS:
        raise PlanningError(f"start={start!r}: expected one of {', '.join(STARTS)}")
    if family_name is not None and sweep != "model":
        raise PlanningError("family= applies to sweep=model (sweep=micro_batch sweeps the run's own model)")
    if trial_timeout <= 0:
        raise PlanningError(f"trial_timeout={trial_timeout}: expected a positive number of seconds")
    overrides = list(overrides)
    cfg = compose(overrides)
    hw = cfg.hardware
    if hw.nodes < 1 or hw.gpus_per_node < 1:
        raise PlanningError(f"hardware.nodes={hw.nodes} and hardware.gpus_per_node={hw.gpus_per_node} must be positive")
    warnings: list[str] = []
    mode = _resolve_mode(mode, cfg, warnings)
    family_name = (family_name or default_family(cfg)) if sweep == "model" else None
    if family_name is not None and family_name not in FAMILIES:
        raise PlanningError(f"family={family_name!r}: expected one of {', '.join(FAMILIES)}")
    specs = parse_layouts(layouts if layouts is not None else default_layouts(cfg))
    capacity = int(hw.memory_bytes * (1 - HEADROOM))
    user_model = [
        o
        for o in overrides
        if o.split("=")[0].lstrip("+~").startswith("model.")
        and o.split("=")[0].split(".")[1] in (*MEMBER_KEYS, "name", "max_seq_len")
    ]
    base_overrides = [o for o in overrides if o not in user_model] if sweep == "model" else overrides

    rows: list[Row] = []
    for spec in specs:  # every layout composed (and its errors raised) before any estimate
        lay_overrides = layout_overrides(cfg, spec, overrides)
        try:
            lay_cfg = compose([*base_overrides, *lay_overrides])
            layout = current_layout(lay_cfg)
        except Exception as error:  # a bad key (Hydra) or sizes that do not divide the devices
            raise PlanningError(f"layout {spec.text!r}: {str(error).strip().splitlines()[0]}") from None
        if mode == "measure" and hw.accelerator == "cpu" and (layout.pp > 1 or layout.cp > 1):
            raise PlanningError(
                f"layout {spec.text!r}: mode=measure on CPU measures one micro-batch with PyTorch's"
                " memory tracker outside the pipeline and context-parallel step; measure pp and cp on"
                " a GPU, or use mode=estimate"
            )
        rows.append(Row(spec, layout, lay_overrides, cfg=lay_cfg, run_overrides=[*base_overrides, *lay_overrides]))

    members = family(family_name, cfg) if sweep == "model" else []
    all_candidates: dict[str, Candidate] = {}
    for row in rows:
        layout, lay_cfg = row.layout, row.cfg
        if sweep == "model":
            layout = row.layout = replace(
                layout,
                micro_batch_size=_local_micro_batch(
                    lay_cfg.data.micro_batch_size, lay_cfg.data.global_batch_size // layout.dp
                ),
            )
            micro = (
                [f"data.micro_batch_size={layout.micro_batch_size}"]
                if layout.micro_batch_size != lay_cfg.data.micro_batch_size
                else []
            )
            candidates = [
                Candidate(m.parameters, m.label, [*m.model_overrides(), *micro], m, layout.micro_batch_size)
                for m in members
            ]
        else:
            candidates = [
                Candidate(mb, f"micro-batch {mb}", [f"data.micro_batch_size={mb}"], None, mb)
                for mb in micro_batch_candidates(lay_cfg, layout)
            ]
        row.candidates = [c for c in candidates if largest is None or c.size <= largest]
        for c in row.candidates:
            all_candidates.setdefault(c.label, c)

    # Estimates, member by member (memory caches the shapes of a few models: keep each one's hot).
    estimates: dict[tuple[int, int], Result] = {}
    n_max = max((len(row.candidates) for row in rows), default=0)
    for index in range(n_max):
        for r, row in enumerate(rows):
            if index < len(row.candidates):
                c = row.candidates[index]
                c_cfg = c.member.apply(row.cfg) if c.member else row.cfg
                layout = replace(row.layout, micro_batch_size=c.micro_batch_size)
                estimates[r, index] = _estimate_result(c_cfg, layout, c)

    if mode == "measure":
        progress(
            f"measuring {len(rows)} layout(s) on {hw.gpus_per_node} {hw.name} device(s): one process per trial,"
            f" up to {trial_timeout:.0f} s each"
        )
    trial_number = [0]
    for r, row in enumerate(rows):
        results = [estimates[r, i] for i in range(len(row.candidates))]
        row.invalid = [res for res in results if res.status == "invalid"]
        valid = [i for i, res in enumerate(results) if res.status != "invalid"]
        if mode == "estimate":
            fitting = [i for i in valid if results[i].fits]
            best = fitting[-1] if fitting else -1
            row.largest = results[best] if fitting else None
            above = [i for i in valid if i > best]
            row.next = results[above[0]] if above else None
            continue
        # measure: search the valid candidates, starting where the estimate puts the boundary
        fitting = [k for k, i in enumerate(valid) if results[i].fits]
        first = {"estimate": fitting[-1] if fitting else 0, "top": len(valid) - 1, "bottom": 0}[start]
        measured: dict[int, Result] = {}

        def trial(
            k: int,
            row: Row = row,
            valid: list[int] = valid,
            results: list[Result] = results,
            measured: dict[int, Result] = measured,
        ) -> Optional[bool]:
            i = valid[k]
            trial_number[0] += 1
            res = measure(row, results[i], trial_timeout, progress, warnings, trial_number[0])
            measured[k] = res
            row.trials.append(res)
            if res.status == "error":
                row.error = res.reason
                return None
            return res.fits

        best = search(len(valid), first, trial)
        row.largest = measured.get(best) if best >= 0 else None
        row.next = measured.get(best + 1) if best + 1 < len(valid) else None
        if row.next is None and best + 1 < len(valid) and row.error is None:
            row.next = results[valid[best + 1]]
    if sweep == "micro_batch":  # a row's layout at its largest micro-batch
        for row in rows:
            largest_micro_batch = row.largest.candidate.micro_batch_size if row.largest else 1
            row.layout = replace(row.layout, micro_batch_size=largest_micro_batch)

    sweep_result = Sweep(
        sweep, mode, family_name, cfg, list(all_candidates.values()), rows, capacity, warnings=warnings
    )
    fitting_rows = [row for row in rows if row.largest is not None]
    if fitting_rows:
        top = max(row.largest.candidate.size for row in fitting_rows)
        # the lightest layout that fits the largest size (the first given among equals)
        rec = min(
            (row for row in fitting_rows if row.largest.candidate.size == top), key=lambda row: weight(row.layout)
        )
        sweep_result.recommended = rec
        sweep_result.command = recommended_command(cfg, rec, overrides, user_model)
    return sweep_result


def recommended_command(cfg: DictConfig, row: Row, user_overrides: Sequence[str], user_model: Sequence[str]) -> str:
    """``python train.py ...`` for the recommended row: ``layout.train_command`` for the layout, with the
    member's model (``model=<preset>`` where one has its shapes), and the layout item's own ``parallel.*``
    settings that train_command does not write (e.g. ``parallel.pp.schedule``)."""
    cand = row.largest.candidate
    layout = replace(row.layout, micro_batch_size=cand.micro_batch_size)
    user = list(user_overrides)
    if cand.member is not None:
        user = [o for o in user if o not in user_model]
        if cand.member.preset:
            user = [o for o in user if not o.lstrip("+~").startswith("model=")] + [f"model={cand.member.preset}"]
        else:
            user += cand.member.model_overrides()
    command = train_command(cfg, layout, user)
    try:
        args = shlex.split(command)[2:]
    except ValueError:  # an unbalanced quote in a value: train_command does not quote
        args = command.split()[2:]
    given = {a.split("=", 1)[0] for a in args}
    for extra in row.spec.overrides:  # the user's own parallel.* keys: train_command keeps those that apply
        key = extra.split("=", 1)[0]
        if key.startswith("parallel.") and key not in given:
            args.append(extra)
            given.add(key)
    return "python train.py " + " ".join(shlex.quote(a) for a in args)
