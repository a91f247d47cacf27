"""The checks of ``curry-gpu-check`` (``cli/gpu_check.py`` says what each row holds): every CUDA-only path
once, on one GPU, each a row that says why it failed while the others still run."""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any, Callable, Sequence

import torch

from curry_train.config import compose
from curry_train.model.documents import kernel_for
from curry_train.module import LMDataModule
from curry_train.planning.advise import estimate
from curry_train.planning.layout import current_layout
from curry_train.primitives.attention_kernels import block_kernel
from curry_train.validation.compile_bench import compile_bench
from curry_train.validation.throughput import prepare, run_curry_loop

Check = Callable[[Sequence[str], str], tuple[bool, str]]  # (the ~1B model's overrides, the hardware option)


def _cp_kernels(one_b: Sequence[str], hardware: str) -> tuple[bool, str]:

    device = torch.device("cuda", 0)
    chosen = {
        str(dtype).removeprefix("torch."): block_kernel(device, dtype, 64) for dtype in (torch.bfloat16, torch.float16)
    }
    fused = all(name != "math" for name in chosen.values())
    return fused, ", ".join(f"{dtype}: {name}" for dtype, name in chosen.items()) + " (checked vs math, fwd+bwd)"


def _document_mask(one_b: Sequence[str], hardware: str) -> tuple[bool, str]:
    device = torch.device("cuda", 0)
    chosen = {str(dtype).removeprefix("torch."): kernel_for(device, dtype, 128) for dtype in (torch.bfloat16,)}
    fused = all(name == "flex" for name in chosen.values())
    detail = ", ".join(f"{dtype}: {name}" for dtype, name in chosen.items())
    return fused, f"{detail} (FlexAttention's block mask checked vs the dense mask, fwd+bwd)"


def _train_losses(overrides: Sequence[str], steps: int) -> list[float]:

    cfg, plan = prepare(overrides, steps, 1)
    datamodule = LMDataModule(cfg.data, cfg.seed)
    datamodule.setup("fit")
    return run_curry_loop(cfg, datamodule, plan, "none", 1).losses


def _bf16_fsdp(one_b: Sequence[str], hardware: str) -> tuple[bool, str]:
    common = ("parallel=fsdp", "trainer.accelerator=gpu", "data.seq_len=256")
    fp32 = _train_losses([*common, "parallel.fsdp.mixed_precision=fp32"], 39)
    bf16 = _train_losses([*common, "parallel.fsdp.mixed_precision=bf16"], 39)
    worst = max(abs(a - b) / abs(b) for a, b in zip(bf16, fp32, strict=True))
    return (
        worst <= 0.02,
        f"40 steps, max rel. loss difference bf16 vs fp32 {worst:.2e} (limit 2e-2); final {bf16[-1]:.4f}",
    )


def _compile(one_b: Sequence[str], hardware: str) -> tuple[bool, str]:

    result = compile_bench(["trainer.accelerator=gpu"], steps=10, warmup=3, models=["debug"])
    compiled, eager = result.row("debug", "compiled"), result.row("debug", "eager")
    speedup = compiled.run.tokens_per_s / eager.run.tokens_per_s
    ok = compiled.recompiles == 0 and compiled.max_loss_rel_diff <= 1e-2
    return ok, (
        f"debug model: {speedup:.2f}x eager tokens/s, loss diff {compiled.max_loss_rel_diff:.1e}, "
        f"{compiled.recompiles} recompiles; peak {compiled.peak_memory / 2**20:.0f} MiB"
        f" (eager {eager.peak_memory / 2**20:.0f})"
    )


def _memory_estimate(one_b: Sequence[str], hardware: str) -> tuple[bool, str]:

    overrides = [
        *one_b,
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


def _mfu_1b(one_b: Sequence[str], hardware: str) -> tuple[bool, str]:

    overrides = [*one_b, "trainer.accelerator=gpu", "trainer.precision=bf16-mixed", f"hardware={hardware}"]
    result = compile_bench(overrides, steps=5, warmup=3, models=["debug"])  # the overrides set the 1B shape
    row = result.row("debug", "compiled")
    table_peak = compose([f"hardware={hardware}"]).hardware.peak_bf16_flops
    mfu_table = row.mfu * result.config["measured_peak"] / table_peak
    return True, (
        f"~1B compiled bf16: {row.run.tokens_per_s:,.0f} tokens/s, MFU {100 * mfu_table:.1f}% of hardware={hardware}"
        f" ({table_peak / 1e12:.0f} TFLOP/s), {100 * row.mfu:.1f}% of the measured bf16 matmul peak"
        f" ({result.config['measured_peak'] / 1e12:.0f} TFLOP/s)"
    )


RUNNERS: dict[str, Check] = {
    "cp-kernels": _cp_kernels,
    "document-mask": _document_mask,
    "bf16-fsdp": _bf16_fsdp,
    "compile": _compile,
    "memory-estimate": _memory_estimate,
    "mfu-1b": _mfu_1b,
}


def run_checks(names: Sequence[str], one_b: Sequence[str], hardware: str) -> list[dict[str, Any]]:
    """Each check of ``names`` in turn (``one_b``: the ~1B model's overrides; ``hardware``: this GPU's
    ``conf/hardware`` option): a row each."""
    rows = []
    for name in names:
        start = time.perf_counter()
        try:
            ok, detail = RUNNERS[name](one_b, hardware)
        except Exception as error:  # one row fails, the rest still run
            ok, detail = False, f"{type(error).__name__}: {error}".splitlines()[0]
            traceback.print_exc(file=sys.stderr)
        rows.append({"check": name, "ok": ok, "detail": detail, "seconds": time.perf_counter() - start})
        print(f"{name}: {'ok' if ok else 'FAILED'} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return rows
