"""Capacity sweeps: the largest model of a family, or the largest micro-batch, that fits each layout.

``scripts/capacity_sweep.py`` is the command line; this module holds the families, the search, the
trials and the report. For each layout (a ``parallel=`` option string plus overrides, on
``hardware.nodes x hardware.gpus_per_node`` devices of ``hardware``), the sweep finds:

* ``sweep=model``: the largest member of a model family (``FAMILIES``) that fits, at the run's
  micro-batch (``data.micro_batch_size``, halved until it divides the layout's local batch);
* ``sweep=micro_batch``: the largest micro-batch (powers of two dividing the local batch
  ``data.global_batch_size / dp``) that fits the run's model;

and recommends a target: the largest size any layout fits, under the lightest layout that fits it
(``weight``: the decision order dp -> ZeRO-1/2/3 -> recompute -> tp -> pp -> cp), with the
``python train.py ...`` command.

How "fits" is decided (``mode``):

* ``estimate``: ``advise.estimate`` (per-rank memory by arithmetic) within the device memory less
  ``advise.HEADROOM``. Every candidate is estimated; nothing runs.
* ``measure``: each trial is one subprocess (``python -m curry_train.capacity``: the real training
  path for ``TRIAL_STEPS`` steps, in as many local processes as the layout asks for), so an
  out-of-memory error cannot poison the next trial. Each rank gets the memory of one ``hardware``
  device, so a trial runs out of memory where that device would (``_make_limit_callback``): on GPU
  the caching allocator may take ``memory_bytes - reserved_bytes`` of the device
  (``torch.cuda.set_per_process_memory_fraction``: an 80 GB plan is measured faithfully on a larger
  device); on CPU the address space may grow by ``memory_bytes`` once the data is loaded
  (``RLIMIT_AS``, with glibc told to map and unmap each allocation of 64 KiB or more on its own, so
  the address space follows the live tensors), and an allocation past it fails for real. A trial
  fits if it exits 0 and its measured peak per rank plus ``reserved_bytes`` is within the device
  memory less ``HEADROOM`` -- the estimate's accounting. The peak is ``torch.cuda.max_memory_allocated``
  over the run on GPU; on CPU, PyTorch's memory tracker over one micro-batch's forward and backward
  with the model state (``validation.memory.MemoryProbe``; so CPU trials measure dp, fsdp and tp
  layouts, not pp or cp), or the state at the optimizer step if larger. An out-of-memory failure
  (``OOM_PATTERNS`` in the trial's stderr, or a trial killed by SIGKILL: the kernel's OOM killer) is
  recorded as ``OOM`` and the search goes down; any other failure is an error, reported with the
  tail of the trial's stderr, and ends that layout's search. The search (``search``) starts at the
  estimate's answer (``start=estimate``; or the ``top`` or ``bottom`` candidate), tries its neighbour
  to confirm the boundary, then bisects; it assumes memory grows along the candidates.
* ``auto``: ``measure`` where ``hardware`` is a GPU this machine has (CUDA, one node, enough
  devices), ``estimate`` elsewhere.

Families (``family=``): a ladder of Llama-style shapes that grow in width and depth together. The
vocabulary (``model.vocab_size``), ``tie_embeddings``, norms and RoPE come from the run's config;
``max_seq_len`` is raised to ``data.seq_len`` where shorter. Each member is named by its parameter
count (``advise.parameter_count``):

* ``llama3``: the Llama 3 shapes (3.2 1B and 3B, 3.1 8B, 3 70B, 3.1 405B; untied here unless the
  config ties, so "1B" counts 1.5B with a 128256 vocabulary) and between them points on Llama's
  rules: ``n_heads = dim / 128``, ``n_kv_heads = min(8, n_heads / 4)`` (a divisor of ``n_heads``),
  ``ffn_dim`` = Llama's SwiGLU width ``8/3 * dim`` times 1.3 (``ffn_dim_multiplier``) rounded up to
  a multiple of 1024 (which gives Llama 3 8B's and 70B's widths exactly). Roughly 1.6 to 2x apart:
  0.16B to 406B with a 128256 vocabulary.
* ``debug``: the debug model's rule (``conf/model/debug.yaml``: head dim 32, ``n_kv_heads =
  n_heads / 2``, ``ffn_dim = 3 * dim``, ``n_layers = dim / 32``) from dim 64 to 1024: small enough
  to measure on a CPU.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from curry_train.advise import Layout

REPO = Path(__file__).resolve().parents[1]
SWEEPS = ("model", "micro_batch")
MODES = ("auto", "estimate", "measure")
STARTS = ("estimate", "top", "bottom")
FORMATS = ("text", "json")
OPTIONS = ("dp", "fsdp", "tp", "pp", "cp")
# Keys a layout item may give without the ``parallel.`` prefix: ``fsdp+tp tp.size=4 recompute=full``.
PARALLEL_KEYS = (*OPTIONS, "recompute", "recompute_every_n_blocks")
TRIAL_STEPS = 3  # the memory probe measures in step 3 (validation.memory.MEASURED_STEP), after DDP's bucket rebuild
TRIAL_TIMEOUT_S = 1800.0
OOM_PATTERNS = (
    r"out of memory",  # CUDA: "CUDA out of memory", torch.OutOfMemoryError's text, NCCL's
    r"OutOfMemoryError",
    r"can't allocate memory",  # CPU: DefaultCPUAllocator under an address-space limit
    r"cannot allocate memory",
    r"\bMemoryError\b",
    r"std::bad_alloc",
    r"terminated with signal SIGKILL",  # a worker killed by the kernel's OOM killer (torch.multiprocessing)
)
MEMBER_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")


class CapacityError(ValueError):
    """A bad option or layout: the message is one line, naming the value and what is expected."""


def _advise():
    """``curry_train.advise``, imported when first needed: a trial process (``trial_main``) that fails
    on its overrides then fails before torch and Lightning are imported."""
    import curry_train.advise as advise

    return advise


# ----------------------------------------------------------------------------------------------
# Families


@dataclass(frozen=True)
class Member:
    """One point of a family: a model's shapes and its parameter count (the run's vocabulary)."""

    name: str  # e.g. "llama3-8.0B"
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    parameters: int
    max_seq_len: Optional[int] = None  # set where the run's sequence is longer than the config's model allows
    preset: Optional[str] = None  # the conf/model file with exactly these shapes, if any

    @property
    def label(self) -> str:
        return f"{params_text(self.parameters)} (dim {self.dim}, {self.n_layers} layers)"

    def model_overrides(self) -> list[str]:
        """``model.*`` overrides that make the run's model this member."""
        overrides = [f"model.{key}={getattr(self, key)}" for key in MEMBER_KEYS] + [f"model.name={self.name}"]
        return overrides + ([f"model.max_seq_len={self.max_seq_len}"] if self.max_seq_len else [])

    def apply(self, cfg: DictConfig) -> DictConfig:
        """``cfg`` with this member's shapes (its model's name kept: ``advise`` caches shapes by config)."""
        cfg = cfg.copy()
        for key in MEMBER_KEYS:
            OmegaConf.update(cfg, f"model.{key}", getattr(self, key))
        if self.max_seq_len:
            OmegaConf.update(cfg, "model.max_seq_len", self.max_seq_len)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def params_text(n: float) -> str:
    """``8.0B``, ``70.6B``, ``853.1K``: a parameter count (or any count) in short form."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def parse_count(text: str) -> float:
    """``"70B"`` -> 7e10, ``"30M"`` -> 3e7, ``"16"`` -> 16."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBTkmbt]?)\s*", text)
    if not match:
        raise CapacityError(f"max={text!r}: expected a number, optionally with K, M, B or T (e.g. max=70B, max=16)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    return float(match.group(1)) * scale


def llama_ffn_dim(dim: int, multiplier: float = 1.3, multiple_of: int = 1024) -> int:
    """Llama's SwiGLU width: 2/3 of 4 x dim, times ``ffn_dim_multiplier``, rounded up to ``multiple_of``."""
    hidden = int(multiplier * int(2 * 4 * dim / 3))
    return multiple_of * math.ceil(hidden / multiple_of)


def _kv_heads(n_heads: int, most: int = 8) -> int:
    kv = min(most, max(1, n_heads // 4))
    while n_heads % kv:
        kv -= 1
    return kv


# (dim, n_layers, (n_heads, n_kv_heads, ffn_dim) where they are a published shape, else by rule)
LLAMA3_LADDER: tuple[tuple[int, int, Optional[tuple[int, int, int]]], ...] = (
    (512, 8, None),
    (1024, 12, None),
    (1536, 16, None),
    (2048, 16, (32, 8, 8192)),  # Llama 3.2 1B (tied there)
    (3072, 28, (24, 8, 8192)),  # Llama 3.2 3B (tied there)
    (4096, 32, (32, 8, 14336)),  # Llama 3.1 8B
    (5120, 40, None),
    (6144, 48, None),
    (7168, 60, None),
    (8192, 80, (64, 8, 28672)),  # Llama 3 70B
    (10240, 96, None),
    (12288, 112, None),
    (16384, 126, (128, 8, 53248)),  # Llama 3.1 405B
)
DEBUG_DIMS = (64, 128, 192, 256, 384, 512, 768, 1024)


def _family_shapes(name: str) -> list[tuple[int, int, int, int, int]]:
    """(dim, n_layers, n_heads, n_kv_heads, ffn_dim) of each member, smallest first."""
    if name == "llama3":
        shapes = []
        for dim, layers, given in LLAMA3_LADDER:
            heads = dim // 128
            n_heads, n_kv, ffn = given or (heads, _kv_heads(heads), llama_ffn_dim(dim))
            shapes.append((dim, layers, n_heads, n_kv, ffn))
        return shapes
    if name == "debug":
        return [(dim, dim // 32, dim // 32, dim // 64, 3 * dim) for dim in DEBUG_DIMS]
    raise CapacityError(f"family={name!r}: expected one of {', '.join(FAMILIES)}")


FAMILIES = ("llama3", "debug")


def _presets() -> dict[str, DictConfig]:
    return {path.stem: OmegaConf.load(path) for path in sorted((REPO / "conf" / "model").glob("*.yaml"))}


def family(name: str, cfg: DictConfig) -> list[Member]:
    """The members of family ``name`` for ``cfg``'s vocabulary and sequence, smallest first."""
    presets = _presets()
    members = []
    max_seq_len = cfg.data.seq_len if cfg.data.seq_len > cfg.model.max_seq_len else None
    for dim, layers, heads, kv, ffn in _family_shapes(name):
        probe = Member("", dim, layers, heads, kv, ffn, 0, max_seq_len)
        parameters = _advise().parameter_count(probe.apply(cfg).model)
        preset = next((key for key, m in presets.items() if all(m.get(k) == getattr(probe, k) for k in MEMBER_KEYS)
                       and m.get("vocab_size") == cfg.model.vocab_size
                       and bool(m.get("tie_embeddings")) == bool(cfg.model.tie_embeddings)
                       and m.get("max_seq_len", 0) >= cfg.data.seq_len
                       and all(m.get(k) == cfg.model.get(k) for k in ("norm_eps", "rope_theta", "dropout", "init_std"))),
                      None)
        members.append(replace(probe, name=f"{name}-{params_text(parameters)}", parameters=parameters, preset=preset))
    return members


# ----------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class LayoutSpec:
    """One item of ``layouts=``: the ``parallel`` options and the overrides that go with them."""

    text: str
    options: str  # e.g. "fsdp+tp"
    overrides: tuple[str, ...]  # full Hydra overrides (``parallel.`` prefixed where it was left out)


def parse_layouts(text: str) -> list[LayoutSpec]:
    """``'dp;fsdp fsdp.sharding=optimizer;fsdp+tp tp.size=8'``: items separated by ``;``, each the
    ``parallel`` option string, then overrides (``tp.size=8`` stands for ``parallel.tp.size=8``)."""
    specs = []
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        words = item.split()
        options = words[0]
        if "=" in options:
            raise CapacityError(f"layouts item {item!r}: start with the parallel options (e.g. 'fsdp+tp tp.size=4')")
        names = options.split("+")
        unknown = [n for n in names if n not in OPTIONS]
        if unknown or len(set(names)) != len(names):
            raise CapacityError(f"layouts item {item!r}: unknown or repeated option(s) {unknown or names};"
                                f" expected {', '.join(OPTIONS)} joined by +")
        overrides = []
        for word in words[1:]:
            key, eq, _ = word.partition("=")
            if not eq:
                raise CapacityError(f"layouts item {item!r}: {word!r} is not key=value")
            overrides.append(f"parallel.{word}" if key.split(".")[0] in PARALLEL_KEYS else word)
        specs.append(LayoutSpec(item, options, tuple(overrides)))
    if not specs:
        raise CapacityError(f"layouts={text!r}: no layout given")
    return specs


def default_layouts(cfg: DictConfig) -> str:
    """The decision order as layouts: DDP, ZeRO-1, -2, -3, ZeRO-3 with selective then full recompute,
    then tensor parallelism over a node (with sequence parallelism) and, on several nodes, a pipeline
    over them (one stage per node). One device: DDP, and DDP with full recompute."""
    hw = cfg.hardware
    world = hw.nodes * hw.gpus_per_node
    if world == 1:
        return "dp;dp recompute=full"
    items = ["dp", "fsdp fsdp.sharding=optimizer", "fsdp fsdp.sharding=shard_grad_op", "fsdp",
             "fsdp recompute=selective", "fsdp recompute=full"]
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
    overrides = [f"parallel={spec.options}", *spec.overrides, f"trainer.devices={hw.gpus_per_node}",
                 f"trainer.num_nodes={hw.nodes}"]
    if hw.mixed_precision == "bf16" and not _names_precision([*user_overrides, *spec.overrides]):
        overrides.append("parallel.fsdp.mixed_precision=bf16" if "fsdp" in spec.options.split("+")
                         else "trainer.precision=bf16-mixed")
    return overrides


ZERO_WEIGHT = {"none": 0, "optimizer": 1, "shard_grad_op": 2, "full": 3, "hybrid": 3}
RECOMPUTE_WEIGHT = {"none": 0, "selective": 1, "full": 2}


def weight(layout: Layout) -> tuple[int, ...]:
    """How heavy a layout is in the decision order (dp -> ZeRO-1/2/3 -> recompute -> tp -> pp -> cp):
    compared as a tuple, a heavier primitive outweighs any setting of the lighter ones."""
    return (layout.cp, layout.pp, layout.tp, RECOMPUTE_WEIGHT.get(layout.recompute, 2), ZERO_WEIGHT.get(layout.zero, 3))


def layout_label(layout: Layout) -> str:
    """``ZeRO-3 x8 tp=2 SP recompute=full``: the data-parallel mode over its ranks, then the rest."""
    ranks = layout.dp if layout.zero == "none" else layout.shards
    parts = [f"{_advise().ZERO_NAMES[layout.zero]} x{ranks}"]
    parts += [f"{name}={getattr(layout, name)}" for name in ("tp", "pp", "cp") if getattr(layout, name) > 1]
    if layout.sequence_parallel:
        parts.append("SP")
    if layout.recompute != "none":
        parts.append(f"recompute={layout.recompute}")
    return " ".join(parts)


def invalid_reason(cfg: DictConfig, layout: Layout) -> Optional[str]:
    """Why ``cfg`` cannot run under ``layout`` (sizes that do not divide), or None."""
    from curry_train.primitives.pipeline_schedule import check_microbatches, split_layers, stages_per_rank

    m, d = cfg.model, cfg.data
    if layout.tp > 1:
        for key in ("n_heads", "n_kv_heads", "dim", "ffn_dim", "vocab_size"):
            if m[key] % layout.tp:
                return f"tp={layout.tp} does not divide model.{key}={m[key]}"
    if layout.cp > 1:
        cp_cfg = cfg.parallel.get("cp")
        parts = 2 * layout.cp if cp_cfg is None or cp_cfg.load_balance else layout.cp
        if d.seq_len % parts:
            return f"cp={layout.cp} needs data.seq_len={d.seq_len} divisible by {parts}"
    if d.global_batch_size % (layout.micro_batch_size * layout.dp):
        return (f"micro-batch {layout.micro_batch_size} x dp {layout.dp} does not divide"
                f" data.global_batch_size={d.global_batch_size}")
    if layout.pp > 1:
        pp = cfg.parallel.pp
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
# Results


@dataclass
class Candidate:
    """A size to try: a family member (model sweep) or a micro-batch (micro-batch sweep)."""

    size: float  # parameters, or the micro-batch: what "largest" compares
    label: str
    overrides: list[str]  # what makes the run this candidate (on top of the user's and the layout's)
    member: Optional[Member] = None
    micro_batch_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "size": self.size, "micro_batch_size": self.micro_batch_size}
        if self.member is not None:
            out["model"] = self.member.to_dict()
        return out


@dataclass
class Result:
    """One candidate on one layout: estimated, and in measure mode also tried."""

    candidate: Candidate
    status: str  # fits | too big | OOM | error | invalid
    estimate_bytes: Optional[int]  # advise.estimate's per-rank total
    capacity_bytes: int
    reason: str = ""  # why it does not fit (or what went wrong)
    measured_peak_bytes: Optional[int] = None  # per rank, the largest over ranks (measure mode)
    memory_breakdown: dict[str, int] = field(default_factory=dict)  # the estimate's parts
    seconds: Optional[float] = None
    stderr_tail: Optional[str] = None
    measurement: Optional[str] = None  # how the peak was taken
    reserved_bytes: int = 0

    @property
    def fits(self) -> bool:
        return self.status == "fits"

    @property
    def memory_bytes(self) -> Optional[int]:
        """Per rank: the measured peak plus the reserved runtime where measured, else the estimate."""
        if self.measured_peak_bytes is not None:
            return self.measured_peak_bytes + self.reserved_bytes
        return self.estimate_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate.to_dict(), "status": self.status, "fits": self.fits,
                "memory_bytes": self.memory_bytes, "estimate_bytes": self.estimate_bytes,
                "measured_peak_bytes": self.measured_peak_bytes, "capacity_bytes": self.capacity_bytes,
                "reason": self.reason, "memory_breakdown": self.memory_breakdown, "seconds": self.seconds,
                "measurement": self.measurement, "stderr_tail": self.stderr_tail}


@dataclass
class Row:
    """One layout: the largest candidate that fits and the next one up."""

    spec: LayoutSpec
    layout: Layout  # at the run's micro-batch (model sweep) or the largest that fits (micro-batch sweep; else 1)
    overrides: list[str]  # the layout's overrides (layout_overrides)
    largest: Optional[Result] = None
    next: Optional[Result] = None  # the next valid candidate up (None: the largest is the top)
    trials: list[Result] = field(default_factory=list)  # measure mode, in the order they ran
    invalid: list[Result] = field(default_factory=list)
    error: Optional[str] = None
    # the sweep's working state, not reported
    cfg: Optional[DictConfig] = field(default=None, repr=False)  # the run under this layout
    run_overrides: list[str] = field(default_factory=list, repr=False)  # the user's (less the model's) + the layout's
    candidates: list[Candidate] = field(default_factory=list, repr=False)

    @property
    def label(self) -> str:
        return layout_label(self.layout)

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.spec.text, "parallel": self.spec.options, "label": self.label,
                "overrides": self.overrides, "sizes": self.layout.sizes(), "zero": self.layout.zero,
                "recompute": self.layout.recompute, "mixed_precision": self.layout.mixed_precision,
                "micro_batch_size": self.layout.micro_batch_size, "world": self.layout.world,
                "largest": self.largest.to_dict() if self.largest else None,
                "next": self.next.to_dict() if self.next else None,
                "trials": [t.to_dict() for t in self.trials], "invalid": [r.to_dict() for r in self.invalid],
                "error": self.error}


@dataclass
class Sweep:
    sweep: str
    mode: str
    family: Optional[str]
    cfg: DictConfig
    candidates: list[Candidate]
    rows: list[Row]
    capacity_bytes: int
    recommended: Optional[Row] = None
    command: Optional[str] = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        hw, rec = self.cfg.hardware, self.recommended
        return {
            "sweep": self.sweep, "mode": self.mode, "family": self.family, "model": self.cfg.model.name,
            "hardware": {"name": hw.name, "nodes": hw.nodes, "gpus_per_node": hw.gpus_per_node,
                         "memory_bytes": hw.memory_bytes, "reserved_bytes": hw.reserved_bytes},
            "headroom": _advise().HEADROOM, "capacity_bytes": self.capacity_bytes, "seq_len": self.cfg.data.seq_len,
            "global_batch_size": self.cfg.data.global_batch_size, "micro_batch_size": self.cfg.data.micro_batch_size,
            "candidates": [{k: v for k, v in c.to_dict().items() if self.sweep == "micro_batch" or k != "micro_batch_size"}
                           for c in self.candidates],
            "rows": [row.to_dict() for row in self.rows],
            "recommended": None if rec is None else {
                "layout": rec.spec.text, "label": rec.label, "parallel": rec.spec.options, "sizes": rec.layout.sizes(),
                **rec.largest.to_dict(), "command": self.command},
            "command": self.command, "warnings": self.warnings,
        }

    def table(self) -> str:
        return format_table(self)


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
# Trials


def classify(returncode: int, stderr: str) -> str:
    """``ok``, ``oom`` or ``error`` for a trial process's exit."""
    if returncode == 0:
        return "ok"
    if returncode == -signal.SIGKILL or any(re.search(p, stderr, re.IGNORECASE) for p in OOM_PATTERNS):
        return "oom"
    return "error"


def _last_error_line(stderr: str) -> str:
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line.strip()) for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^([\w.]+(Error|Exception|Exit)|curry-train: error)\b", line):
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def _trial_env(cpu: bool) -> dict[str, str]:
    """A user's shell: no launcher variables from a surrounding run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR",
                        "TORCHELASTIC_RUN_ID", "GROUP_RANK", "NODE_RANK")}
    env.setdefault("WANDB_SILENT", "true")
    if cpu:
        # The address-space limit stands for the device's memory, so make the address space follow the
        # live tensors: glibc maps every allocation of 64 KiB or more on its own and unmaps it when
        # freed (a fixed threshold: by default it rises and freed blocks stay in the heap, holding about
        # twice the live bytes), trims the heap early, and keeps two arenas (64 MiB of address space each).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", "1048576")
        env.setdefault("MALLOC_ARENA_MAX", "2")
    return env


def run_trial(overrides: Sequence[str], timeout: float, cpu: bool) -> tuple[str, dict[str, Any]]:
    """Run one trial process. Returns (``ok`` | ``oom`` | ``error``, details: ``ranks`` (the JSON
    each rank wrote), ``stderr`` tail, ``seconds``, ``reason``)."""
    with tempfile.TemporaryDirectory(prefix="curry-capacity-") as out_dir:
        command = [sys.executable, "-m", "curry_train.capacity", out_dir, *overrides]
        began = time.perf_counter()
        process = subprocess.Popen(command, cwd=out_dir, env=_trial_env(cpu), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            _, stderr = process.communicate()
            timed_out = True
        except BaseException:  # Ctrl-C: the trial has its own session, so end it (and its workers) here
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        seconds = time.perf_counter() - began
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank-*.json"))]
    tail = "\n".join(stderr.strip().splitlines()[-25:])[-4000:]
    details = {"ranks": ranks, "stderr": tail, "seconds": seconds}
    if timed_out:
        return "error", {**details, "reason": f"timed out after {timeout:.0f} s (trial_timeout=)"}
    status = classify(process.returncode, stderr)
    if status == "ok" and not ranks:
        return "error", {**details, "reason": "the trial exited 0 but wrote no measurement"}
    if status == "oom":
        reason = ("killed by SIGKILL (the kernel's OOM killer?)" if process.returncode == -signal.SIGKILL
                  else _last_error_line(next((line for line in reversed(stderr.splitlines())
                                              if any(re.search(p, line, re.IGNORECASE) for p in OOM_PATTERNS)), stderr)))
        return "oom", {**details, "reason": reason}
    if status == "error":
        return "error", {**details, "reason": f"exit {process.returncode}: {_last_error_line(stderr)}"}
    return "ok", details


# ----------------------------------------------------------------------------------------------
# The sweep


def size_text(n: Optional[float]) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _why(est_memory: dict[str, int], capacity: int) -> str:
    parts = {"model state": sum(est_memory.get(k, 0) for k in ("params", "grads", "optimizer", "transient")),
             "activations": est_memory.get("activations", 0), "loss": est_memory.get("loss", 0)}
    top = sorted(parts.items(), key=lambda kv: -kv[1])[:2]
    return f"needs {size_text(est_memory['total'])} > {size_text(capacity)} ({', '.join(f'{k} {size_text(v)}' for k, v in top)})"


def _estimate_result(cfg: DictConfig, layout: Layout, candidate: Candidate) -> Result:
    reason = invalid_reason(cfg, layout)
    capacity = int(cfg.hardware.memory_bytes * (1 - _advise().HEADROOM))
    if reason:
        return Result(candidate, "invalid", None, capacity, reason)
    est = _advise().estimate(cfg, layout)
    return Result(candidate, "fits" if est.fits else "too big", est.memory["total"], est.capacity,
                  "" if est.fits else _why(est.memory, est.capacity), memory_breakdown=dict(est.memory))


def _progress(message: str, end: str = "\n") -> None:
    print(message, file=sys.stderr, flush=True, end=end)


def _measure_blocker(cfg: DictConfig) -> Optional[str]:
    """Why this machine cannot measure ``cfg.hardware`` (None: it can)."""
    import torch

    hw = cfg.hardware
    gpu = hw.accelerator == "gpu"
    if gpu and not torch.cuda.is_available():
        return (f"mode=measure with hardware={hw.name} needs a CUDA device and none is visible;"
                " use mode=estimate, or hardware=cpu to measure CPU processes")
    if hw.nodes > 1:
        return (f"mode=measure runs trials on this machine: hardware.nodes={hw.nodes} needs several;"
                " use mode=estimate, or hardware.nodes=1")
    if gpu and hw.gpus_per_node > torch.cuda.device_count():
        return (f"mode=measure: hardware.gpus_per_node={hw.gpus_per_node} but {torch.cuda.device_count()} CUDA"
                " device(s) are visible; use mode=estimate, or a smaller hardware.gpus_per_node")
    if hw.reserved_bytes >= hw.memory_bytes:
        return (f"mode=measure: hardware.reserved_bytes={hw.reserved_bytes} leaves nothing of"
                f" hardware.memory_bytes={hw.memory_bytes} for tensors")
    return None


def _resolve_mode(mode: str, cfg: DictConfig, warnings: list[str]) -> str:
    """``measure`` or ``estimate``; ``auto`` measures GPU hardware where this machine can run it."""
    if mode not in MODES:
        raise CapacityError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    blocker = _measure_blocker(cfg)
    if mode == "measure" and blocker:
        raise CapacityError(blocker)
    if mode == "auto":
        import torch

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
    from curry_train.config import compose

    if sweep not in SWEEPS:
        raise CapacityError(f"sweep={sweep!r}: expected one of {', '.join(SWEEPS)}")
    if start not in STARTS:
        raise CapacityError(f"start={start!r}: expected one of {', '.join(STARTS)}")
    if family_name is not None and sweep != "model":
        raise CapacityError("family= applies to sweep=model (sweep=micro_batch sweeps the run's own model)")
    if trial_timeout <= 0:
        raise CapacityError(f"trial_timeout={trial_timeout}: expected a positive number of seconds")
    overrides = list(overrides)
    cfg = compose(overrides)
    hw = cfg.hardware
    if hw.nodes < 1 or hw.gpus_per_node < 1:
        raise CapacityError(f"hardware.nodes={hw.nodes} and hardware.gpus_per_node={hw.gpus_per_node} must be positive")
    warnings: list[str] = []
    mode = _resolve_mode(mode, cfg, warnings)
    family_name = (family_name or "llama3") if sweep == "model" else None
    if family_name is not None and family_name not in FAMILIES:
        raise CapacityError(f"family={family_name!r}: expected one of {', '.join(FAMILIES)}")
    specs = parse_layouts(layouts if layouts is not None else default_layouts(cfg))
    capacity = int(hw.memory_bytes * (1 - _advise().HEADROOM))
    user_model = [o for o in overrides if o.split("=")[0].lstrip("+~").startswith("model.")
                  and o.split("=")[0].split(".")[1] in (*MEMBER_KEYS, "name", "max_seq_len")]
    base_overrides = [o for o in overrides if o not in user_model] if sweep == "model" else overrides

    rows: list[Row] = []
    for spec in specs:  # every layout composed (and its errors raised) before any estimate
        lay_overrides = layout_overrides(cfg, spec, overrides)
        try:
            lay_cfg = compose([*base_overrides, *lay_overrides])
            layout = _advise().current_layout(lay_cfg)
        except Exception as error:  # a bad key (Hydra) or sizes that do not divide the devices
            raise CapacityError(f"layout {spec.text!r}: {str(error).strip().splitlines()[0]}") from None
        if mode == "measure" and hw.accelerator == "cpu" and (layout.pp > 1 or layout.cp > 1):
            raise CapacityError(f"layout {spec.text!r}: mode=measure on CPU measures one micro-batch with PyTorch's memory"
                                " tracker outside the pipeline and context-parallel step; measure pp and cp on a GPU,"
                                " or use mode=estimate")
        rows.append(Row(spec, layout, lay_overrides, cfg=lay_cfg, run_overrides=[*base_overrides, *lay_overrides]))

    members = family(family_name, cfg) if sweep == "model" else []
    all_candidates: dict[str, Candidate] = {}
    for row in rows:
        layout, lay_cfg = row.layout, row.cfg
        if sweep == "model":
            layout = row.layout = replace(layout, micro_batch_size=_local_micro_batch(
                lay_cfg.data.micro_batch_size, lay_cfg.data.global_batch_size // layout.dp))
            micro = ([f"data.micro_batch_size={layout.micro_batch_size}"]
                     if layout.micro_batch_size != lay_cfg.data.micro_batch_size else [])
            candidates = [Candidate(m.parameters, m.label, [*m.model_overrides(), *micro], m, layout.micro_batch_size)
                          for m in members]
        else:
            candidates = [Candidate(mb, f"micro-batch {mb}", [f"data.micro_batch_size={mb}"], None, mb)
                          for mb in micro_batch_candidates(lay_cfg, layout)]
        row.candidates = [c for c in candidates if largest is None or c.size <= largest]
        for c in row.candidates:
            all_candidates.setdefault(c.label, c)

    # Estimates, member by member (advise caches the shapes of a few models: keep each one's hot).
    estimates: dict[tuple[int, int], Result] = {}
    n_max = max((len(row.candidates) for row in rows), default=0)
    for index in range(n_max):
        for r, row in enumerate(rows):
            if index < len(row.candidates):
                c = row.candidates[index]
                c_cfg = c.member.apply(row.cfg) if c.member else row.cfg
                estimates[r, index] = _estimate_result(c_cfg, replace(row.layout, micro_batch_size=c.micro_batch_size), c)

    if mode == "measure":
        progress(f"measuring {len(rows)} layout(s) on {hw.gpus_per_node} {hw.name} device(s): one process per trial,"
                 f" up to {trial_timeout:.0f} s each")
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

        def trial(k: int, row: Row = row, valid: list[int] = valid, results: list[Result] = results,
                  measured: dict[int, Result] = measured) -> Optional[bool]:
            i = valid[k]
            trial_number[0] += 1
            res = _measure(row, results[i], trial_timeout, progress, warnings, trial_number[0])
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
            row.layout = replace(row.layout, micro_batch_size=row.largest.candidate.micro_batch_size if row.largest else 1)

    sweep_result = Sweep(sweep, mode, family_name, cfg, list(all_candidates.values()), rows, capacity, warnings=warnings)
    fitting_rows = [row for row in rows if row.largest is not None]
    if fitting_rows:
        top = max(row.largest.candidate.size for row in fitting_rows)
        # the lightest layout that fits the largest size (the first given among equals)
        rec = min((row for row in fitting_rows if row.largest.candidate.size == top), key=lambda row: weight(row.layout))
        sweep_result.recommended = rec
        sweep_result.command = recommended_command(cfg, rec, overrides, user_model)
    return sweep_result


def _measure(row: Row, estimated: Result, timeout: float, progress: Callable[..., None],
             warnings: list[str], number: int) -> Result:
    """Check and run one trial of ``estimated.candidate`` on ``row``'s layout."""
    from curry_train.config import ConfigError
    from curry_train.config.checks import check

    hw = row.cfg.hardware
    cpu = hw.accelerator == "cpu"
    candidate = estimated.candidate
    overrides = [*row.run_overrides, *candidate.overrides, f"trainer.accelerator={'cpu' if cpu else 'gpu'}",
                 "logger=none"]
    result = replace(estimated, reserved_bytes=int(hw.reserved_bytes), memory_breakdown=dict(estimated.memory_breakdown))
    progress(f"trial {number} [{row.label} | {candidate.label}]: ", end="")
    try:
        from curry_train.config import compose

        check(compose(overrides))
    except ConfigError as error:
        result.status, result.reason = "error", f"config: {error}"
        progress(f"error: {result.reason}")
        return result
    status, details = run_trial(overrides, timeout, cpu)
    result.seconds, result.stderr_tail = round(details["seconds"], 1), details["stderr"]
    if status == "ok":
        peak = max(rank["peak_bytes"] for rank in details["ranks"])
        result.measured_peak_bytes, result.measurement = peak, details["ranks"][0]["method"]
        total = peak + result.reserved_bytes
        result.stderr_tail = None
        if total <= estimated.capacity_bytes:
            result.status, result.reason = "fits", ""
        else:
            result.status = "too big"
            result.reason = (f"measured {size_text(peak)}" + (f" + reserved {size_text(result.reserved_bytes)}"
                             if result.reserved_bytes else "") + f" > {size_text(estimated.capacity_bytes)}")
        budget = hw.memory_bytes - hw.reserved_bytes
        for rank in details["ranks"]:
            device_total = rank.get("device_total_bytes")
            if device_total and device_total < budget:
                note = (f"this device has {size_text(device_total)}, less than the {size_text(budget)} of tensors a"
                        f" {hw.name} rank may hold (memory_bytes - reserved_bytes): trials may run out of memory"
                        " before that device would")
                if note not in warnings:
                    warnings.append(note)
    elif status == "oom":
        result.status, result.reason = "OOM", details["reason"]
    else:
        result.status, result.reason = "error", details["reason"]
    shown = {"fits": f"fits: {size_text(result.memory_bytes)} of {size_text(result.capacity_bytes)}"}.get(
        result.status, f"{result.status}: {result.reason}")
    progress(f"{shown} (estimate {size_text(result.estimate_bytes)}; {details['seconds']:.0f} s)")
    return result


def recommended_command(cfg: DictConfig, row: Row, user_overrides: Sequence[str], user_model: Sequence[str]) -> str:
    """``python train.py ...`` for the recommended row: ``advise.train_command`` for the layout, with the
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
    command = _advise().train_command(cfg, layout, user)
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


# ----------------------------------------------------------------------------------------------
# The report


def _memory_cell(res: Result, mode: str) -> str:
    if mode == "measure" and res.measured_peak_bytes is not None:
        return f"{size_text(res.memory_bytes)} (est. {size_text(res.estimate_bytes)})"
    return size_text(res.memory_bytes)


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_table(result: Sweep) -> str:
    cfg, hw = result.cfg, result.cfg.hardware
    what = f"family {result.family}" if result.sweep == "model" else f"micro-batch of {cfg.model.name}"
    how = "by measurement" if result.mode == "measure" else "by estimate"
    lines = [
        f"capacity sweep ({what}, {how}) on {hw.nodes} x {hw.gpus_per_node} {hw.name}: {size_text(hw.memory_bytes)}"
        f" per device, {size_text(result.capacity_bytes)} usable ({_advise().HEADROOM:.0%} headroom);"
        f" seq {cfg.data.seq_len}, global batch {cfg.data.global_batch_size}"
        + (f", vocabulary {cfg.model.vocab_size}" if result.sweep == "model" else ""),
    ]
    model_sweep = result.sweep == "model"
    header = ("layout", *(("micro",) if model_sweep else ()), "largest that fits",
              "per rank" + (" (measured)" if result.mode == "measure" else ""), "next size up: why not")
    table = [header]

    def size_of(res: Result) -> str:
        return res.candidate.label if model_sweep else str(res.candidate.micro_batch_size)

    for row in result.rows:
        if row.next is not None:
            why = f"{size_of(row.next)}: " + _short(row.next.reason if row.next.status == "too big"
                                                    else f"{row.next.status}, {row.next.reason}")
        elif row.largest is not None:
            why = "none: the largest of the family" if model_sweep else "none: the whole local batch (global / dp)"
        else:
            why = row.invalid[0].reason if row.invalid else "no candidate"
        if row.error:
            why += f"  [error: {_short(row.error)}]"
        cells = (row.label, *((str(row.layout.micro_batch_size),) if model_sweep else ()),
                 size_of(row.largest) if row.largest else "nothing",
                 _memory_cell(row.largest, result.mode) if row.largest else "-", why)
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1])
    rec = result.recommended
    if rec is None:
        lines.append("recommended target size: none -- nothing fits any layout; see the next size up of each row")
    else:
        size = (rec.largest.candidate.label if model_sweep
                else f"micro-batch {rec.largest.candidate.micro_batch_size}")
        lines.append(f"recommended target size: {size} with {rec.label} ({rec.layout.mixed_precision}):"
                     f" {size_text(rec.largest.memory_bytes)} of {size_text(result.capacity_bytes)} per rank")
        lines.append(result.command or "")
    for row in result.rows:
        for trial in row.trials:
            if trial.status == "error" and trial.stderr_tail:
                lines.append(f"--- {row.label} | {trial.candidate.label}: stderr tail ---")
                lines.append(trial.stderr_tail)
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# One trial: ``python -m curry_train.capacity OUT_DIR [overrides...]``


def _address_space_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _make_limit_callback(hardware: DictConfig):
    import lightning.pytorch as pl
    import torch

    class DeviceMemoryLimit(pl.Callback):
        """Gives this rank the memory of one ``hardware`` device, so that a trial runs out of memory
        where that device would (set once the data is loaded and the process group is up, before the
        model is materialized):

        * GPU: the caching allocator may take ``memory_bytes - reserved_bytes`` of this device
          (``torch.cuda.set_per_process_memory_fraction``; the CUDA context and NCCL's buffers, which
          ``reserved_bytes`` stands for, live outside it);
        * CPU: the process's address space may grow by ``memory_bytes`` (``RLIMIT_AS``; the runtime's
          own allocations, which ``reserved_bytes`` stands for, are inside it)."""

        device_total: Optional[int] = None

        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            device = trainer.strategy.root_device
            if device.type == "cuda":
                self.device_total = torch.cuda.get_device_properties(device).total_memory
                budget = hardware.memory_bytes - hardware.reserved_bytes
                torch.cuda.set_per_process_memory_fraction(min(1.0, budget / self.device_total), device)
                torch.cuda.reset_peak_memory_stats(device)
                return
            if sys.platform.startswith("linux"):
                import resource

                torch.ones(1 << 17).add_(1)  # start the intra-op threads (their stacks) before the limit
                limit = _address_space_bytes() + int(hardware.memory_bytes)
                resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

    return DeviceMemoryLimit()


def _trial_worker(container: dict, out_dir: str, accelerator: str) -> None:
    import logging

    import lightning.pytorch as pl
    import torch

    from curry_train.data import LMDataModule
    from curry_train.module import CausalLM
    from curry_train.run import build_trainer
    from curry_train.validation.memory import MemoryProbe

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = OmegaConf.create(container)
    pl.seed_everything(cfg.seed, verbose=False)
    limit = _make_limit_callback(cfg.hardware)
    probe = MemoryProbe(TRIAL_STEPS) if accelerator == "cpu" else None
    callbacks = [limit] + ([probe] if probe else [])
    trainer = build_trainer(cfg, Path(out_dir), accelerator, callbacks=callbacks, checkpoints=False, loggers=[])
    trainer.fit(CausalLM(cfg), datamodule=LMDataModule(cfg.data, cfg.seed))
    device = trainer.strategy.root_device
    if device.type == "cuda":
        record = {"peak_bytes": torch.cuda.max_memory_allocated(device),
                  "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
                  "method": "torch.cuda.max_memory_allocated", "device_total_bytes": limit.device_total}
    else:
        tracked = probe.record.get("peak") or {}
        peak = tracked.get("Total", sum(tracked.values()))
        state = probe.record["state"]["total"]
        record = {"peak_bytes": max(peak, state), "tracked_peak": probe.record["peak"], "state": probe.record["state"],
                  "method": "memory tracker: one micro-batch's forward+backward with the model state"}
    record["rank"] = trainer.global_rank
    Path(out_dir, f"rank-{trainer.global_rank:05d}.json").write_text(json.dumps(record))


def trial_main(argv: Sequence[str]) -> int:
    """Run the configuration of ``argv[1:]`` for ``TRIAL_STEPS`` steps and write each rank's peak
    memory to ``argv[0]/rank-NNNNN.json``. Errors propagate (non-zero exit, traceback on stderr)."""
    from curry_train.config import ConfigError, compose

    out_dir, overrides = argv[0], list(argv[1:])
    cfg = compose(overrides)  # a bad override fails here, before torch and Lightning load

    from curry_train.config.checks import check
    from curry_train.launch import spawn
    from curry_train.validation.whitebox import measurement_config

    cfg = measurement_config(cfg, TRIAL_STEPS)
    try:
        plan = check(cfg)
    except ConfigError as error:
        print(f"curry-train: error: {error}", file=sys.stderr)
        return 2
    container = OmegaConf.to_container(cfg, resolve=True)
    if plan.world_size == 1:
        _trial_worker(container, out_dir, plan.accelerator)
    else:
        spawn(plan.world_size, _trial_worker, container, out_dir, plan.accelerator)
    return 0


if __name__ == "__main__":
    from curry_train.capacity import trial_main as _trial_main  # functions spawn can pickle by module name

    sys.exit(_trial_main(sys.argv[1:]))
