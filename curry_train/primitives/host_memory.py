"""This process's resident memory on Linux (``/proc/self/status``), and a reset of its peak.

Used to measure what a piece of work adds to a process: reset the peak (``reset_peak``), read the
resident memory then (``resident()["VmRSS"]``), do the work, and read the peak (``resident()["VmHWM"]``).
"""

from __future__ import annotations

from pathlib import Path


def resident() -> dict[str, int]:
    """Resident memory now (``VmRSS``) and at its peak since the last reset (``VmHWM``), bytes; {} off Linux."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if line.startswith(("VmRSS", "VmHWM")))
    return {key: int(value.split()[0]) * 1024 for key, value in fields.items()}


def reset_peak() -> bool:
    """Start ``VmHWM`` again from the current resident memory (Linux's clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
