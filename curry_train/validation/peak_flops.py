"""The device's achievable dense matmul FLOP/s, measured: the denominator of an MFU that means something
on any device (a CPU has no datasheet peak that its threads reach; a GPU's table peak assumes clocks
and shapes a run may not get).

``matmul_flops(device, dtype)`` multiplies two square matrices (``2 n^3`` FLOPs each; n = 4096 on CUDA,
1024 on a CPU) for about ``seconds``, after two warm-up products, and returns the best rate of its
timed rounds: the most this device does with dense matmuls of that dtype on these threads.
"""

from __future__ import annotations

import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 0, seconds: float = 0.5) -> float:
    """The best measured FLOP/s of ``size x size`` matmuls in ``dtype`` on ``device`` (see module docstring)."""
    n = size or (4096 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    _sync(device)
    best, spent, rounds = 0.0, 0.0, 0
    while spent < seconds or rounds < 3:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        elapsed = time.perf_counter() - start
        spent += elapsed
        rounds += 1
        best = max(best, 2 * n**3 / elapsed)
    return best


def measured_peaks(device: torch.device, seconds: float = 0.5) -> dict[str, float]:
    """``matmul_flops`` in fp32 and bf16."""
    return {name: matmul_flops(device, dtype, seconds=seconds) for name, dtype in DTYPES.items()}
