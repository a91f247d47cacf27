"""One check of every CUDA-only path, on one GPU, in a few minutes: one table.

    python scripts/gpu_check.py [--json PATH] [--dry-run]

Rows (each runs in this process, one after the other; a row that fails says why and the others still run):

1. ``cp-kernels``: the fused attention block kernel context parallelism picks on this GPU for bf16 and
   fp16 (flash, cuDNN or memory-efficient), each checked against the exact math kernel forward and
   backward (``primitives.attention_kernels.block_kernel``);
2. ``document-mask``: the kernel ``data.document_mask`` attends with on this GPU for bf16:
   FlexAttention's block mask, checked against the dense-mask kernel forward and backward
   (``model.documents.kernel_for``), else the dense mask;
3. ``bf16-fsdp``: the debug model trained 40 steps under ``parallel=fsdp`` with bf16 compute and with
   fp32: the bf16 loss curve within 2% of fp32's at every step;
4. ``compile``: the debug model eager and ``compile.enabled=true`` (inductor's Triton kernels): the same
   losses (1e-2), no recompilation after the first step, the speed-up (``bench.py --compile``);
5. ``memory-estimate``: a ~1B Llama (2048 wide, 16 blocks, bf16 FSDP, selective recompute, 4 x 2048
   tokens) trained 3 steps: advise's peak memory estimate against ``torch.cuda.max_memory_allocated``
   (within 15%, the tolerance the CPU tests hold);
6. ``mfu-1b``: that model compiled, bf16: tokens/s and MFU against the hardware table's peak for this
   GPU (``conf/hardware``: h100_80gb, h200, a100_*) and against the measured bf16 matmul peak.

Without a CUDA device (or with ``--dry-run``) it lists what it would run and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

CHECKS = ("cp-kernels", "document-mask", "bf16-fsdp", "compile", "memory-estimate", "mfu-1b")
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
    import torch  # noqa: PLC0415  (loads once the arguments parsed: --help answers at once)

    if args.dry_run or not torch.cuda.is_available():
        why = "--dry-run" if args.dry_run else "no CUDA device"
        print(f"gpu_check ({why}): would run, on one CUDA GPU, in this order:")
        listed = __doc__.split("still run):\n\n", 1)[1].split("\n\nWithout", 1)[0]  # the docstring's numbered rows
        print("\n".join(f"  {line.strip()}" for line in listed.splitlines()))
        return 0
    from curry_train.validation.gpu_checks import run_checks  # noqa: PLC0415  (torch and Lightning: a GPU run)

    rows = run_checks(CHECKS, ONE_B, hardware_of(torch.cuda.get_device_name(0)))
    print(table(rows, torch.cuda.get_device_name(0)))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
