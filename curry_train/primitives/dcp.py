"""Distributed checkpoints: every rank writes its own shards; a checkpoint appears whole or not at all.

A checkpoint is a directory ``step-00000100/`` holding

* the model and optimizer state, saved with ``torch.distributed.checkpoint`` (DCP) under
  fully-qualified parameter names: each rank writes the shards it owns, replicated tensors are
  written once, nothing is gathered to rank 0, and DCP reshards on load, so a checkpoint saved
  under one layout loads under another;
* ``meta.pt`` (rank 0): everything else the trainer restores (loop progress, LR schedule, ...);
* ``rng-rank00000.pt`` (each rank): that rank's random-number generator states.

It is written as ``step-00000100.tmp`` and renamed once every rank has finished, so an interrupted
save never leaves a directory that looks complete, and never touches the checkpoints before it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

META_FILE = "meta.pt"
DCP_METADATA = ".metadata"
TMP_SUFFIX = ".tmp"
NAME_PATTERN = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / META_FILE).is_file()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteStateError(ValueError):
    """The model or optimizer state holds NaN or infinity: such a state is never written."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def state_is_finite(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> bool:
    """Collective: whether every rank's parameters and optimizer state are finite (one all-reduce)."""
    tensors = [_local(p.detach()) for p in model.parameters()]
    for optimizer in optimizers:
        tensors += [_local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    floats = [t for t in tensors if t.is_floating_point() and t.numel()]
    if floats:
        finite = torch.stack([torch.isfinite(t).all() for t in floats]).all().float()
    else:
        finite = torch.ones((), device=next((t.device for t in tensors), torch.device("cpu")))
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(path: str | Path, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer], meta: dict[str, Any]) -> Path:
    """Collective: every rank calls it with the same ``path``. Returns the checkpoint's directory.
    Raises ``NonFiniteStateError``, writing nothing, when any rank's state holds NaN or infinity."""
    path = Path(path)
    optimizers = list(optimizers)
    if not state_is_finite(model, optimizers):
        raise NonFiniteStateError(f"{path.name}: the model or optimizer state holds NaN or infinity; not saved")
    tmp = path.with_name(path.name + TMP_SUFFIX)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier interrupted save
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, list(optimizers))
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    torch.save(rng_state(), tmp / rng_file(rank))
    if rank == 0:
        torch.save(meta, tmp / META_FILE)
    _barrier()
    if rank == 0:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    _barrier()
    return path


def load(path: str | Path, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, Any]:
    """Collective: load model and optimizer state in place (resharding to this layout) and this rank's
    RNG state where the checkpoint has one for it; return the trainer's metadata."""
    path = Path(path)
    optimizers = list(optimizers)
    model_state, optim_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_path = path / rng_file(rank)
    if rng_path.is_file():
        set_rng_state(torch.load(rng_path, weights_only=False))
    return torch.load(path / META_FILE, weights_only=False)


def checkpoints_in(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if NAME_PATTERN.match(p.name) and is_checkpoint(p)]
    return sorted(found, key=lambda p: int(NAME_PATTERN.match(p.name).group(1)))


def prune(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints; return what was deleted."""
    doomed = checkpoints_in(directory)[:-keep_last]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def latest_checkpoint(search_dir: str | Path) -> Optional[Path]:
    """The most recently written complete checkpoint anywhere below ``search_dir``."""
    search_dir = Path(search_dir)
    if not search_dir.is_dir():
        return None
    candidates = [
        p.parent for p in search_dir.rglob(META_FILE) if NAME_PATTERN.match(p.parent.name) and is_checkpoint(p.parent)
    ]
    return max(candidates, key=lambda p: (p / META_FILE).stat().st_mtime, default=None)
