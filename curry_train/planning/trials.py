"""Capacity trials (measure mode): one short training run per subprocess, so that running out of
memory cannot poison the next trial; its exit is classified as ``ok``, ``oom`` or ``error``, and its
measured peak decides whether the candidate fits.

The trial itself (``python -m curry_train.validation.capacity_trial OUT_DIR overrides...``) lives with
the measurements; it is only named here, on the command line. How a trial is held to one device's
memory is in docs/planning.md ("Measure mode").
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import DictConfig

from curry_train.config import ConfigError, compose
from curry_train.config.checks import check
from curry_train.planning.capacity_report import Result, Row, size_text

TRIAL_MODULE = "curry_train.validation.capacity_trial"
OOM_PATTERNS = (
    r"out of memory",  # CUDA: "CUDA out of memory", torch.OutOfMemoryError's text, NCCL's
    r"OutOfMemoryError",
    r"can't allocate memory",  # CPU: DefaultCPUAllocator under an address-space limit
    r"cannot allocate memory",
    r"\bMemoryError\b",
    r"std::bad_alloc",
    r"terminated with signal SIGKILL",  # a worker killed by the kernel's OOM killer (torch.multiprocessing)
)


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
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_PORT",
            "MASTER_ADDR",
            "TORCHELASTIC_RUN_ID",
            "GROUP_RANK",
            "NODE_RANK",
        )
    }
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
        command = [sys.executable, "-m", TRIAL_MODULE, out_dir, *overrides]
        began = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=out_dir,
            env=_trial_env(cpu),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
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
        oom_line = next(
            (
                line
                for line in reversed(stderr.splitlines())
                if any(re.search(p, line, re.IGNORECASE) for p in OOM_PATTERNS)
            ),
            stderr,
        )
        reason = (
            "killed by SIGKILL (the kernel's OOM killer?)"
            if process.returncode == -signal.SIGKILL
            else _last_error_line(oom_line)
        )
        return "oom", {**details, "reason": reason}
    if status == "error":
        return "error", {**details, "reason": f"exit {process.returncode}: {_last_error_line(stderr)}"}
    return "ok", details


def measure_blocker(cfg: DictConfig) -> Optional[str]:
    """Why this machine cannot measure ``cfg.hardware`` (None: it can)."""
    hw = cfg.hardware
    gpu = hw.accelerator == "gpu"
    if gpu and not torch.cuda.is_available():
        return (
            f"mode=measure with hardware={hw.name} needs a CUDA device and none is visible;"
            " use mode=estimate, or hardware=cpu to measure CPU processes"
        )
    if hw.nodes > 1:
        return (
            f"mode=measure runs trials on this machine: hardware.nodes={hw.nodes} needs several;"
            " use mode=estimate, or hardware.nodes=1"
        )
    if gpu and hw.gpus_per_node > torch.cuda.device_count():
        return (
            f"mode=measure: hardware.gpus_per_node={hw.gpus_per_node} but {torch.cuda.device_count()} CUDA"
            " device(s) are visible; use mode=estimate, or a smaller hardware.gpus_per_node"
        )
    if hw.reserved_bytes >= hw.memory_bytes:
        return (
            f"mode=measure: hardware.reserved_bytes={hw.reserved_bytes} leaves nothing of"
            f" hardware.memory_bytes={hw.memory_bytes} for tensors"
        )
    return None


def measure(
    row: Row, estimated: Result, timeout: float, progress: Callable[..., None], warnings: list[str], number: int
) -> Result:
    """Check and run one trial of ``estimated.candidate`` on ``row``'s layout: ``estimated`` with the
    measured peak and the verdict (fits, too big, OOM, error); a line of progress per trial."""
    hw = row.cfg.hardware
    cpu = hw.accelerator == "cpu"
    candidate = estimated.candidate
    overrides = [
        *row.run_overrides,
        *candidate.overrides,
        f"trainer.accelerator={'cpu' if cpu else 'gpu'}",
        "logger=none",
    ]
    result = replace(
        estimated, reserved_bytes=int(hw.reserved_bytes), memory_breakdown=dict(estimated.memory_breakdown)
    )
    progress(f"trial {number} [{row.label} | {candidate.label}]: ", end="")
    try:
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
            result.reason = (
                f"measured {size_text(peak)}"
                + (f" + reserved {size_text(result.reserved_bytes)}" if result.reserved_bytes else "")
                + f" > {size_text(estimated.capacity_bytes)}"
            )
        budget = hw.memory_bytes - hw.reserved_bytes
        for rank in details["ranks"]:
            device_total = rank.get("device_total_bytes")
            if device_total and device_total < budget:
                note = (
                    f"this device has {size_text(device_total)}, less than the {size_text(budget)} of tensors a"
                    f" {hw.name} rank may hold (memory_bytes - reserved_bytes): trials may run out of memory"
                    " before that device would"
                )
                if note not in warnings:
                    warnings.append(note)
    elif status == "oom":
        result.status, result.reason = "OOM", details["reason"]
    else:
        result.status, result.reason = "error", details["reason"]
    shown = {"fits": f"fits: {size_text(result.memory_bytes)} of {size_text(result.capacity_bytes)}"}.get(
        result.status, f"{result.status}: {result.reason}"
    )
    progress(f"{shown} (estimate {size_text(result.estimate_bytes)}; {details['seconds']:.0f} s)")
    return result
