"""One check of every CUDA-only path, on one GPU, in a few minutes: one table.

    python scripts/gpu_check.py [--json PATH] [--dry-run]

Rows (each runs in this process, one after the other; a row that fails says why and the others still run):

1. ``cp-kernels``: the fused attention block kernel context parallelism picks on this GPU for bf16 and
   fp16 (flash, cuDNN or memory-efficient), each checked against the exact math kernel forward and
   backward (``primitives.attention_kernels.block_kernel``);
2. ``bf16-fsdp``: the debug model trained 40 steps under ``parallel=fsdp`` with bf16 compute and with
   fp32: the bf16 loss curve within 2% of fp32's at every step;
3. ``compile``: the debug model eager and ``compile.enabled=true`` (inductor's Triton kernels): the same
   losses (1e-2), no recompilation after the first step, the speed-up (``bench.py --compile``);
4. ``memory-estimate``: a ~1B Llama (2048 wide, 16 blocks, bf16 FSDP, selective recompute, 4 x 2048
   tokens) trained 3 steps: advise's peak memory estimate against ``torch.cuda.max_memory_allocated``
   (within 15%, the tolerance the CPU tests hold);
5. ``mfu-1b``: that model compiled, bf16: tokens/s and MFU against the hardware table's peak for this
   GPU (``conf/hardware``: h100_80gb, h200, a100_*) and against the measured bf16 matmul peak.

Without a CUDA device (or with ``--dry-run``) it lists what it would run and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from curry_train.config import compose
from curry_train.module import LMDataModule
from curry_train.planning.advise import estimate
from curry_train.planning.layout import current_layout
from curry_train.primitives.attention_kernels import block_kernel
from curry_train.validation.compile_bench import compile_bench
from curry_train.validation.throughput import prepare, run_curry_loop

CHECKS = ("cp-kernels", "bf16-fsdp", "compile", "memory-estimate", "mfu-1b")
ONE_B = (
    "model.name=llama_1b",
    "model.dim=2048",
    "model.n_layers=16",
    "model.n_heads=16",
    "model.n_kv_heads=8",
    "model.ffn_dim=8192",
    "model.vocab_size=32000",
    "data.seq_len=2048",
    "data.global_batch_size=4",
    "data.micro_batch_size=4",
)
HARDWARE = {"H100": "h100_80gb", "H200": "h200", "A100-SXM4-40GB": "a100_40gb", "A100": "a100_80gb"}


def hardware_of(device_name: str) -> str:
    """The ``conf/hardware`` option for a CUDA device name (its table peak); h100_80gb where none matches."""
    return next((option for key, option in HARDWARE.items() if key in device_name), "h100_80gb")


def _cp_kernels() -> tuple[bool, str]:

    device = torch.device("cuda", 0)
    chosen = {
        str(dtype).removeprefix("torch."): block_kernel(device, dtype, 64) for dtype in (torch.bfloat16, torch.float16)
    }
    fused = all(name != "math" for name in chosen.values())
    return fused, ", ".join(f"{dtype}: {name}" for dtype, name in chosen.items()) + " (checked vs math, fwd+bwd)"


def _train_losses(overrides: Sequence[str], steps: int) -> list[float]:

    cfg, plan = prepare(overrides, steps, 1)
    datamodule = LMDataModule(cfg.data, cfg.seed)
    datamodule.setup("fit")
    return run_curry_loop(cfg, datamodule, plan, "none", 1).losses


def _bf16_fsdp() -> tuple[bool, str]:
    common = ("parallel=fsdp", "trainer.accelerator=gpu", "data.seq_len=256")
    fp32 = _train_losses([*common, "parallel.fsdp.mixed_precision=fp32"], 39)
    bf16 = _train_losses([*common, "parallel.fsdp.mixed_precision=bf16"], 39)
    worst = max(abs(a - b) / abs(b) for a, b in zip(bf16, fp32, strict=True))
    return (
        worst <= 0.02,
        f"40 steps, max rel. loss difference bf16 vs fp32 {worst:.2e} (limit 2e-2); final {bf16[-1]:.4f}",
    )


def _compile() -> tuple[bool, str]:

    result = compile_bench(["trainer.accelerator=gpu"], steps=10, warmup=3, models=["debug"])
    compiled, eager = result.row("debug", "compiled"), result.row("debug", "eager")
    speedup = compiled.run.tokens_per_s / eager.run.tokens_per_s
    ok = compiled.recompiles == 0 and compiled.max_loss_rel_diff <= 1e-2
    return ok, (
        f"debug model: {speedup:.2f}x eager tokens/s, loss diff {compiled.max_loss_rel_diff:.1e}, "
        f"{compiled.recompiles} recompiles; peak {compiled.peak_memory / 2**20:.0f} MiB"
        f" (eager {eager.peak_memory / 2**20:.0f})"
    )


def _memory_estimate() -> tuple[bool, str]:

    overrides = [
        *ONE_B,
        "parallel=fsdp",
        "parallel.fsdp.mixed_precision=bf16",
        "parallel.recompute=selective",
        "trainer.accelerator=gpu",
    ]
    torch.cuda.reset_peak_memory_stats()
    _train_losses(overrides, 2)
    measured = torch.cuda.max_memory_allocated()
    cfg = compose(overrides)
    predicted = estimate(cfg, current_layout(cfg)).memory["total"] - cfg.hardware.reserved_bytes
    ratio = predicted / measured
    return (
        0.85 <= ratio <= 1.15,
        f"~1B bf16 FSDP: estimate {predicted / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB ({ratio:.2f}x)",
    )


def _mfu_1b() -> tuple[bool, str]:

    hardware = hardware_of(torch.cuda.get_device_name(0))
    overrides = [*ONE_B, "trainer.accelerator=gpu", "trainer.precision=bf16-mixed", f"hardware={hardware}"]
    result = compile_bench(overrides, steps=5, warmup=3, models=["debug"])  # the overrides set the 1B shape
    row = result.row("debug", "compiled")
    table_peak = compose([f"hardware={hardware}"]).hardware.peak_bf16_flops
    mfu_table = row.mfu * result.config["measured_peak"] / table_peak
    return True, (
        f"~1B compiled bf16: {row.run.tokens_per_s:,.0f} tokens/s, MFU {100 * mfu_table:.1f}% of hardware={hardware}"
        f" ({table_peak / 1e12:.0f} TFLOP/s), {100 * row.mfu:.1f}% of the measured bf16 matmul peak"
        f" ({result.config['measured_peak'] / 1e12:.0f} TFLOP/s)"
    )


RUNNERS: dict[str, Callable[[], tuple[bool, str]]] = {
    "cp-kernels": _cp_kernels,
    "bf16-fsdp": _bf16_fsdp,
    "compile": _compile,
    "memory-estimate": _memory_estimate,
    "mfu-1b": _mfu_1b,
}


def run_checks(names: Sequence[str] = CHECKS) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        start = time.perf_counter()
        try:
            ok, detail = RUNNERS[name]()
        except Exception as error:  # one row fails, the rest still run
            ok, detail = False, f"{type(error).__name__}: {error}".splitlines()[0]
            traceback.print_exc(file=sys.stderr)
        rows.append({"check": name, "ok": ok, "detail": detail, "seconds": time.perf_counter() - start})
        print(f"{name}: {'ok' if ok else 'FAILED'} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return rows


def table(rows: Sequence[dict[str, Any]], device: str) -> str:
    lines = [f"GPU check on {device}", "", f"{'check':<17}{'result':<8}{'s':>5}  detail"]
    for row in rows:
        lines.append(f"{row['check']:<17}{'ok' if row['ok'] else 'FAILED':<8}{row['seconds']:>5.0f}  {row['detail']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="list the checks and exit")
    args = parser.parse_args(argv)
    if args.dry_run or not torch.cuda.is_available():
        why = "--dry-run" if args.dry_run else "no CUDA device"
        print(f"gpu_check ({why}): would run, on one CUDA GPU, in this order:")
        listed = __doc__.split("still run):\n\n", 1)[1].split("\n\nWithout", 1)[0]  # the docstring's numbered rows
        print("\n".join(f"  {line.strip()}" for line in listed.splitlines()))
        return 0
    rows = run_checks()
    print(table(rows, torch.cuda.get_device_name(0)))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
