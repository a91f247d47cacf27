"""``curry-bench --estimate``: the step-time model (``planning.step_time``) on this machine, held against
measured steps.

1. A probe, on every rank of a pool of ``ranks`` local processes at once (so each rank has the share of
   the machine a run gives it): the best fp32 matmul rate over a few sizes, memory bandwidth (a large
   elementwise add), the cost of one small op (dispatch and kernel), the fused attention's rate at the
   model's shape, the collectives' fixed cost and bandwidth as a step sees them (gloo, each call after a
   burst of compute on every rank, fitted over 256 KiB - 4 MiB), and the host work a tensor-parallel
   linear, an FSDP unit and a context-parallel ring attention add over plain ones. Written as a hardware
   config whose every figure is that probe's.
2. Each layout (dp, fsdp, tp, pp, cp on 2 ranks) of each model (the debug model and a ~100M Llama)
   trained for a few timed steps through the real training path (``layouts.layouts_bench``).
3. The estimate of each with the probed config, against the measurement: ratio and parts.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from curry_train.config import compose
from curry_train.planning.advise import estimate
from curry_train.planning.layout import current_layout
from curry_train.pool import WorkerPool
from curry_train.primitives.context_parallel import ContextParallelAttention
from curry_train.primitives.parallel_state import all_gather_single
from curry_train.validation.defaults import COMPILE_MODELS
from curry_train.validation.layouts import layouts_bench

ESTIMATE_LAYOUTS = {
    "dp": ("parallel=dp", "trainer.devices=2"),
    "fsdp": ("parallel=fsdp", "trainer.devices=2"),
    "tp": ("parallel=tp", "trainer.devices=2"),
    "pp": ("parallel=pp", "trainer.devices=2"),
    "cp": ("parallel=cp", "trainer.devices=2"),
}
MATMUL_SIZES = (64, 128, 256, 512, 1024, 2048)  # a GEMM's narrower weight side


def _best(fn: Any, seconds: float = 0.3, least: int = 5) -> float:
    """The median of repeated timings of ``fn()`` (after one untimed call): what a run's steps see, not
    the luckiest call."""
    fn()
    timings, spent = [], 0.0
    while spent < seconds or len(timings) < least:
        start = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - start)
        spent += timings[-1]
    return statistics.median(timings)


# Timings that run collectives: a fixed count of calls, the same on every rank (a time budget would let
# the ranks' counts differ, and their collectives mismatch)
ROUNDS = {"seconds": 0.0, "least": 100}
IN_STEP_SIZES = (1 << 16, 1 << 18, 1 << 20)  # fp32 elements: 256 KiB, 1 MiB, 4 MiB


def _in_step(call: Any, work: Any, rounds: int = 30) -> float:
    """The median seconds of ``call()`` (a collective), each call after a burst of ``work()`` on every rank."""
    dist.barrier()
    timings = []
    for _ in range(rounds):
        work()
        start = time.perf_counter()
        call()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = fixed + per_unit * x`` over ``points`` (x, y): a collective's fixed seconds and
    seconds per byte. Neither is let below what the points allow: a fixed part under 0 reads as 0, and the
    slope is at least that of the line from the origin to the largest point's 1%."""
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    x_max, y_max = max(points)
    slope = max(slope, 0.01 * y_max / x_max)
    return max(0.0, mean_y - slope * mean_x), slope


def probe_job(heads: int, head_dim: int, seq_len: int, batch: int) -> dict[str, float]:
    """On every rank at once: the machine as one rank of a run sees it."""
    found: dict[str, float] = {}
    tokens = batch * seq_len
    for n in MATMUL_SIZES:  # a training GEMM's three forms: forward, the input's gradient, the weight's
        x, w, g = torch.randn(tokens, n), torch.randn(n, n), torch.randn(tokens, n)
        seconds = _best(lambda x=x, w=w: x @ w.t()) + _best(lambda g=g, w=w: g @ w) + _best(lambda g=g, x=x: g.t() @ x)
        found[f"matmul_{n}"] = 3 * 2 * tokens * n * n / seconds
    x, y = torch.randn(1 << 23), torch.randn(1 << 23)  # 32 MiB each: beyond the caches
    z = torch.empty_like(x)
    found["memory_bandwidth"] = 3 * x.numel() * 4 / _best(lambda: torch.add(x, y, out=z))
    # the model's own memory-bound mix: an eager fp32 RMSNorm forward and backward at the model's width
    width = heads * head_dim
    h = torch.randn(tokens, width, requires_grad=True)
    scale = torch.ones(width, requires_grad=True)

    def norm() -> None:
        h32 = h.float()
        ((h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5)) * scale).sum().backward()

    found["elementwise_bandwidth"] = 3 * 40 * h.numel() / _best(norm)  # elementwise_bytes' count: 2a + 36, x3
    one = torch.zeros(8, requires_grad=True)

    def op() -> None:  # two recorded ops and their two backward nodes
        (one * 2.0).sum().backward()

    found["kernel_latency"] = _best(op) / 4
    q = torch.randn(batch, heads, seq_len, head_dim, requires_grad=True)
    k, v = torch.randn_like(q, requires_grad=True), torch.randn_like(q, requires_grad=True)

    def attention() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    flops = 3.5 * 4.0 * batch * seq_len * seq_len * heads * head_dim / 2  # forward + backward, causal half
    found["attention_flops"] = flops / _best(attention)
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        ring = 2 * (world - 1) / world
        # As a training step sees them: between bursts of compute, the ranks out of step by whatever the
        # cores' sharing put between them. A step's collectives (an activation, a unit's parameters) are
        # 0.25-4 MiB here; what each costs is a fixed part and a part per byte, fitted over those sizes.
        a, b = torch.randn(256, 512), torch.randn(512, 512)

        def work() -> None:  # ~1.3 GFLOP: a block's share of compute between two of its collectives
            for _ in range(10):
                a @ b

        reduces, gathers = [], []
        for n in IN_STEP_SIZES:
            t, gathered = torch.ones(n), torch.empty(world * n)
            reduces.append((ring * n * 4, _in_step(lambda t=t: dist.all_reduce(t), work)))
            gather = _in_step(lambda t=t, g=gathered: all_gather_single(g, t), work)
            gathers.append(((world - 1) * n * 4, gather))
        reduce_fixed, reduce_per_byte = fit_line(reduces)
        gather_fixed, gather_per_byte = fit_line(gathers)
        found["collective_latency"] = (reduce_fixed + gather_fixed) / 2
        found["bus_bandwidth"] = 1 / reduce_per_byte
        found["gather_bandwidth"] = 1 / gather_per_byte  # FSDP's collectives: gloo's all-gather
        tiny = _tiny_all_reduce()  # what the host-work probes' own collectives cost, to take out of them
        found["tp_linear_overhead"] = _tp_linear_overhead(tiny)
        found["fsdp_unit_overhead"] = _fsdp_unit_overhead(tiny)
        found["cp_ring_overhead"] = _ring_attention_overhead(tiny)
        stats = torch.tensor([found[key] for key in sorted(found)], dtype=torch.float64)
        dist.all_reduce(stats)  # every rank's view, averaged: they ran at the same time
        found = dict(zip(sorted(found), (stats / world).tolist(), strict=True))
    return found


def _tp_linear_overhead(tiny_all_reduce: float) -> float:
    """What a tensor-parallel linear costs the host over a plain one, per forward and backward: a column-
    then a row-parallel linear (the MLP's plan) on tensors too small to compute, against the same pair
    unsharded, less their two all-reduces (the row's output forward, the column's input gradient backward;
    each a tiny all-reduce's time), which the step-time model counts on their own."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def pair() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16, bias=False), nn.Linear(16, 8, bias=False))

    plain, sharded = pair(), pair()
    parallelize_module(sharded, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
    x = torch.randn(2, 8)
    dist.barrier()
    extra = _best(lambda: sharded(x).sum().backward(), **ROUNDS) - _best(lambda: plain(x).sum().backward(), **ROUNDS)
    return max(0.0, (extra - 2 * tiny_all_reduce) / 2)


def _fsdp_unit_overhead(tiny_all_reduce: float) -> float:
    """What an FSDP unit's hooks cost the host per forward and backward: a unit of two linears too small to
    compute, fully sharded, against the same unsharded, less its three collectives (the gathers before the
    forward and the backward, the gradients' reduce-scatter), each a tiny all-reduce's time."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def unit() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))

    plain, sharded = unit(), unit()
    fully_shard(sharded, mesh=mesh)
    x = torch.randn(2, 8)
    dist.barrier()
    extra = _best(lambda: sharded(x).sum().backward(), **ROUNDS) - _best(lambda: plain(x).sum().backward(), **ROUNDS)
    return max(0.0, extra - 3 * tiny_all_reduce)


def _ring_attention_overhead(tiny_all_reduce: float) -> float:
    """What context parallelism's ring attention costs the host over plain attention, per forward and
    backward: the ring over every rank (each holding its two zigzag chunks of the sequence) on tensors too
    small to compute, against the fused kernel on the same local shapes, less the ring's transfers (three
    per step of the ring: K and V out forward, again backward, and their gradients home), each a tiny
    all-reduce's time."""
    world = dist.get_world_size()
    ring = ContextParallelAttention(dist.group.WORLD)
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    dist.barrier()
    extra = _best(lambda: ring(q, k, v).sum().backward(), **ROUNDS) - _best(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward(), **ROUNDS
    )
    return max(0.0, extra - 3 * (world - 1) * tiny_all_reduce)


def _tiny_all_reduce() -> float:
    small = torch.ones(2)
    dist.barrier()
    return _best(lambda: dist.all_reduce(small), **ROUNDS)


def hardware_config(probed: dict[str, float], ranks: int, base: dict[str, Any]) -> dict[str, Any]:
    """A hardware config whose rates are the probe's: the best matmul as the peak (efficiency 1), the
    attention's rate as its share of it, the add's bandwidth, one op's cost as every kernel's least."""
    rates = {n: probed[f"matmul_{n}"] for n in MATMUL_SIZES}
    peak = max(rates.values())
    return {
        **base,
        "name": "probed",
        "accelerator": "cpu",
        "gpus_per_node": ranks,
        "nodes": 1,
        "peak_fp32_flops": peak,
        "peak_bf16_flops": peak,
        "matmul_efficiency": 1.0,
        "matmul_efficiency_by_size": {n: rate / peak for n, rate in rates.items()},
        "attention_efficiency": min(1.0, probed["attention_flops"] / peak),
        "memory_bandwidth": probed["memory_bandwidth"],
        "memory_efficiency": min(1.0, probed["elementwise_bandwidth"] / probed["memory_bandwidth"]),
        "kernel_latency": probed["kernel_latency"],
        # the slower of the two collectives' byte rates: FSDP's gathers, DDP's all-reduce
        "intra_node_bandwidth": min(
            probed.get("bus_bandwidth", base["intra_node_bandwidth"]),
            probed.get("gather_bandwidth", base["intra_node_bandwidth"]),
        ),
        "comm_overlap": 0.0,  # gloo copies on the cores that compute
        "collective_efficiency": 1.0,
        "collective_latency": probed.get("collective_latency", base["collective_latency"]),
        "tp_linear_overhead": probed.get("tp_linear_overhead", base["tp_linear_overhead"]),
        "fsdp_unit_overhead": probed.get("fsdp_unit_overhead", base["fsdp_unit_overhead"]),
        "cp_ring_overhead": probed.get("cp_ring_overhead", base["cp_ring_overhead"]),
        "mixed_precision": "fp32",
    }


@dataclass
class EstimateRow:
    model: str
    layout: str
    measured_ms: float
    estimated_ms: float
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.estimated_ms / self.measured_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "layout": self.layout,
            "measured_ms": self.measured_ms,
            "estimated_ms": self.estimated_ms,
            "ratio": self.ratio,
            "parts_ms": self.parts,
        }


@dataclass
class EstimateResult:
    hardware: dict[str, Any]  # the first model's probe: the config written to hardware_path
    hardware_path: Optional[str]
    rows: list[EstimateRow] = field(default_factory=list)
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)  # each model's, before its layouts

    def to_dict(self) -> dict[str, Any]:
        return {
            "hardware": self.hardware,
            "hardware_path": self.hardware_path,
            "probes": self.probes,
            "rows": [row.to_dict() for row in self.rows],
        }

    def table(self) -> str:
        lines = []
        for model, h in (self.probes or {"": self.hardware}).items():
            lines += _probe_lines(model, h)
        if self.hardware_path:
            lines.append(f"hardware config written: {self.hardware_path}")
        header = f"{'model':<11} {'layout':<7} {'measured ms':>12} {'estimated ms':>13} {'ratio':>6}"
        lines += ["", header + "   largest parts (ms)"]
        for row in self.rows:
            top = sorted(row.parts.items(), key=lambda item: -item[1])[:4]
            text = ", ".join(f"{k} {v:.1f}" for k, v in top)
            figures = f"{row.measured_ms:>12.1f} {row.estimated_ms:>13.1f} {row.ratio:>6.2f}"
            lines.append(f"{row.model:<11} {row.layout:<7} {figures}   {text}")
        ratios = [row.ratio for row in self.rows]
        if ratios:
            worst = max(ratios, key=lambda r: abs(r - 1))
            lines.append(f"\nworst estimate/measured: {worst:.2f}; median {statistics.median(ratios):.2f}")
        return "\n".join(lines)


def _probe_lines(model: str, h: dict[str, Any]) -> list[str]:
    sizes = ", ".join(f"{n}: {e:.0%}" for n, e in h["matmul_efficiency_by_size"].items())
    return [
        f"this machine, probed{f' before {model}' if model else ''} (each of 2 ranks at once):",
        f"  matmul {h['peak_fp32_flops'] / 1e9:,.1f} GFLOP/s at best; by the narrower side {sizes}",
        f"  attention {h['attention_efficiency']:.0%} of it; memory {h['memory_bandwidth'] / 1e9:,.1f} GB/s,"
        f" {h['memory_efficiency']:.0%} of it in eager norms; an op {h['kernel_latency'] * 1e6:,.1f} us",
        f"  gloo in a step {h['intra_node_bandwidth'] / 1e9:,.2f} GB/s bus bandwidth,"
        f" {h['collective_latency'] * 1e6:,.0f} us a call",
        f"  host work per micro-batch: a tensor-parallel linear {h['tp_linear_overhead'] * 1e6:,.0f} us,"
        f" an FSDP unit {h['fsdp_unit_overhead'] * 1e6:,.0f} us,"
        f" a ring attention {h['cp_ring_overhead'] * 1e6:,.0f} us",
    ]


def estimate_bench(
    overrides: Sequence[str] = (),
    models: Sequence[str] = ("debug", "llama-100m"),
    steps: int = 5,
    hardware_out: Optional[Path] = None,
    log: Optional[Callable[[str], None]] = None,
) -> EstimateResult:
    """Probe, measure and estimate each of ``models`` in turn; ``log`` (default: stderr) hears where it
    is, since a 2-core machine takes half an hour over the 100M model."""
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    base = OmegaConf.to_container(compose([*overrides, "hardware=cpu"]).hardware)
    result: Optional[EstimateResult] = None
    for index, model in enumerate(models, 1):
        common = [*overrides, *COMPILE_MODELS[model]]
        say(f"curry-bench --estimate: [{index}/{len(models)}] {model}: probing this machine at its shapes")
        # Probed at this model's shapes (its attention), right before its layouts run: the rates a 2-core
        # machine shared with others gives move by 10-20% over minutes, and a probe of the same minute
        # is what its steps see.
        hardware = hardware_config(_probe(compose(common)), 2, base)
        if result is None:
            result = EstimateResult(hardware, _write_hardware(hardware, hardware_out))
        result.probes[model] = hardware
        say(f"curry-bench --estimate: [{index}/{len(models)}] {model}: {', '.join(ESTIMATE_LAYOUTS)} on 2 ranks")
        measured = layouts_bench(common, ESTIMATE_LAYOUTS, steps)
        for name, row in zip(ESTIMATE_LAYOUTS, measured.rows, strict=True):
            cfg = compose([*common, *ESTIMATE_LAYOUTS[name]])
            probed_config = dict(hardware)
            cfg.hardware.matmul_efficiency_by_size = probed_config.pop("matmul_efficiency_by_size")
            cfg.hardware = OmegaConf.merge(cfg.hardware, probed_config)
            times = estimate(cfg, current_layout(cfg)).time
            parts = {k: 1e3 * v for k, v in times.items() if k not in ("total", "compute", "dp", "dp_experts") and v}
            result.rows.append(EstimateRow(model, name, row.ms_per_step, 1e3 * times["total"], parts))
    if result is None:
        raise ValueError("curry-bench --estimate: no model to measure")
    return result


def _probe(cfg: Any) -> dict[str, float]:
    """``probe_job`` on 2 ranks at once, at ``cfg``'s attention shape."""
    m = cfg.model
    with WorkerPool(2) as pool:
        return pool.run(probe_job, m.n_heads, m.dim // m.n_heads, cfg.data.seq_len, cfg.data.micro_batch_size)[0]


def _write_hardware(hardware: dict[str, Any], path: Optional[Path]) -> Optional[str]:
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# This machine as curry-bench --estimate probed it (curry_train/validation/estimate_bench.py)\n"
        + OmegaConf.to_yaml(OmegaConf.create(hardware))
    )
    return str(path.resolve())
