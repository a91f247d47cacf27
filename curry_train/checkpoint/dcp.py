"""Distributed checkpoints: every rank writes its own shards; a checkpoint appears whole or not at all.

A checkpoint is a directory ``step-00000100/`` holding

* the model and optimizer state, saved with ``torch.distributed.checkpoint`` (DCP) under
  fully-qualified parameter names: each rank writes the shards it owns, replicated tensors are
  written once, nothing is gathered to rank 0, and DCP reshards on load, so a checkpoint saved
  under one layout loads under another;
* ``meta.pt`` (rank 0): everything else the trainer restores (loop progress, LR schedule, ...);
* ``rng-rank00000.pt`` (each rank): that rank's random-number generator states, as tensors and
  numbers (``meta.pt`` and these are read with ``torch.load(weights_only=True)``: they cannot run code);
* ``config.json`` (rank 0, when given): the run's resolved config, to compare a resumed run against;
* ``manifest.json``, written last: every other file with its size and BLAKE2b digest. A directory
  without it is incomplete; ``verify`` names any file that is missing, cut short or altered.

It is written as ``step-00000100.tmp`` and renamed once every rank has finished, so an interrupted
save never leaves a directory that looks complete, and never touches the checkpoints before it.
Nothing non-finite is ever written (``NonFiniteStateError``).

Trust: no file of a checkpoint can run code. DCP's own ``.metadata`` is a pickle; it is read here
(``reader``) through an unpickler that admits only DCP's metadata classes, torch's dtypes and sizes, and
refuses anything else with the file named (docs/trust.md). The digests catch corruption, not a forger,
who can rewrite the manifest too.

Finding, naming and verifying checkpoints (no torch): ``curry_train.checkpoint.files``.
"""

from __future__ import annotations

import contextlib
import copy as pycopy
import errno
import functools
import io
import json
import logging
import os
import pickle
import random
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from curry_train.checkpoint.files import (
    CONFIG_FILE,
    LINEAGE_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    META_FILE,
    TMP_SUFFIX,
    CheckpointError,
    checkpoints_in,
    describe_files,
    existing_ancestor,
    is_checkpoint,
    is_url,
    place,
    prune,
    remove_tree,
    rng_file,
)

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """This process's generator states as tensors, lists and numbers: loadable with weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Every global DCP's ``.metadata`` pickle refers to (torch 2.4-2.13): its metadata dataclasses, the
# file system writer's storage records, torch.Size, a layout by name, the checkpoint's path; and dtypes.
METADATA_GLOBALS = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }
)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` admitting only ``METADATA_GLOBALS`` and torch's dtypes: a pickle that
    names any other callable (the way a pickle runs code) is refused, naming the file and the global."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.source}: refers to {module}.{name}, which DCP's metadata never holds; refused"
            " (a checkpoint file may not run code)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.source}: holds a persistent reference; refused")


def read_safe_metadata(stream: Any, source: str) -> Any:
    """The ``Metadata`` a DCP ``.metadata`` stream holds, unpickled by ``MetadataUnpickler``."""
    try:
        metadata = MetadataUnpickler(stream, source).load()
    except CheckpointError:
        raise
    except Exception as error:  # cut short, not a pickle at all
        raise CheckpointError(f"{source}: not readable as DCP metadata ({type(error).__name__}: {error})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{source}: holds a {type(metadata).__name__}, not DCP metadata; refused")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file system reader, its ``.metadata`` read by ``read_safe_metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = read_safe_metadata(stream, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@functools.cache
def _fsspec_classes() -> tuple[type, type]:
    """DCP's fsspec reader (its ``.metadata`` read by ``read_safe_metadata``) and writer, for checkpoints in
    object storage; fsspec loads only when one is used."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter  # noqa: PLC0415

    class SafeFsspecReader(FsspecReader):
        read_metadata = SafeFileSystemReader.read_metadata

    return SafeFsspecReader, FsspecWriter


def reader(path: str | Path) -> FileSystemReader:
    """The storage reader of the checkpoint at ``path`` (a local path or an fsspec URL): every read of a
    checkpoint goes through one."""
    return _fsspec_classes()[0](str(path)) if is_url(path) else SafeFileSystemReader(str(path))


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, except that what a checkpoint stores as bytes (anything not a tensor: the
    optimizer's param groups) is read with ``torch.load(weights_only=True)``: DCP's own reads it with
    ``weights_only=False``, which a forged ``.metadata`` naming a key as bytes could make run code."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as error:
            raise CheckpointError(f"{fqn}: not loadable as plain data ({type(error).__name__}); refused") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def _load(state: dict[str, Any], path: Any, no_dist: bool = False) -> None:
    """``dcp.load`` of ``state`` from the checkpoint at ``path`` through ``reader`` and ``SafeLoadPlanner``;
    a checkpoint refused on any rank is a ``CheckpointError`` naming it (DCP wraps it in a BaseException)."""
    try:
        dcp.load(state, storage_reader=reader(path), planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointException as wrapped:
        for error, _ in wrapped.failures.values():
            if isinstance(error, CheckpointError):
                raise CheckpointError(f"{path}: {error}") from None
        first = next(iter(wrapped.failures.values()))[0] if wrapped.failures else wrapped
        raise CheckpointError(f"{path}: could not be read ({type(first).__name__}: {first})") from None


def _writer(path: Any) -> Any:
    """DCP's storage writer for ``path``: its file system writer, or its fsspec writer for a URL."""
    return _fsspec_classes()[1](str(path)) if is_url(path) else FileSystemWriter(str(path))


def _safe_load(path: Any) -> Any:
    """``torch.load`` that cannot run code: tensors, containers and numbers only."""
    try:
        with place(path).open("rb") as stream:
            return torch.load(stream, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as error:  # a pickle asking for anything else (code), or not a torch file at all
        raise CheckpointError(f"{path}: not loadable as plain data ({type(error).__name__}); refused") from None


def _torch_save(obj: Any, path: Any) -> None:
    with place(path).open("wb") as stream:
        torch.save(obj, stream)


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


class CheckpointWriteError(OSError):
    """A save that could not be written (a full disk, a denied write): the checkpoint before it stays the
    newest complete one; the message names the directory and, for a full disk, the bytes needed."""


@dataclass
class Retention:
    """Which complete checkpoints a save keeps once it is complete: the ``keep_last`` newest and every
    checkpoint whose step is a multiple of ``keep_every`` (0: none kept for that)."""

    keep_last: int
    keep_every: int = 0


@dataclass
class Staged:
    """What a save writes, copied off the live training state (``stage``): the step that follows may
    change the parameters while it is written."""

    path: Path
    state: dict[str, Any]
    rng: dict[str, Any]
    meta: dict[str, Any]
    config: Optional[dict[str, Any]]
    lineage: Optional[dict[str, Any]]
    nbytes: int  # this rank's tensor bytes

    @property
    def step(self) -> Optional[int]:
        return self.meta.get("global_step")


def _nbytes(tree: Any) -> int:
    if isinstance(tree, dict):
        return sum(_nbytes(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(value) for value in tree)
    if torch.is_tensor(tree):
        local = _local(tree)
        return local.numel() * local.element_size()
    return 0


def _copied(tree: Any, pin: bool) -> Any:
    """``tree`` with every tensor copied to host memory (pinned where ``pin``: a CUDA copy that need not wait)."""
    if isinstance(tree, dict):
        return {key: _copied(value, pin) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_copied(value, pin) for value in tree]
    if isinstance(tree, tuple):
        return tuple(_copied(value, pin) for value in tree)
    if torch.is_tensor(tree):
        if hasattr(tree, "to_local"):  # a DTensor: its local shard copied, its placement kept
            from torch.distributed.tensor import DTensor  # noqa: PLC0415

            # built from its spec, not from_local (which would move the copy back to the mesh's device)
            return DTensor(_copied(tree.to_local(), pin), tree._spec, requires_grad=False)
        copy = torch.empty(tree.shape, dtype=tree.dtype, device="cpu", pin_memory=pin and tree.is_cuda)
        copy.copy_(tree.detach(), non_blocking=pin and tree.is_cuda)
        return copy
    return tree


def stage(
    path: str | Path,
    model: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer],
    meta: dict[str, Any],
    config: Optional[dict[str, Any]] = None,
    skip_frozen: bool = False,
    lineage: Optional[dict[str, Any]] = None,
    copy: bool = True,
) -> Staged:
    """Collective: the state a save of ``path`` writes. Raises ``NonFiniteStateError``, writing nothing,
    when any rank's state holds NaN or infinity. ``copy``: into host memory (a save in the background);
    else the live tensors (a save that finishes before training goes on)."""
    path = place(path)
    optimizers = list(optimizers)
    if not state_is_finite(model, optimizers):
        raise NonFiniteStateError(f"{path.name}: the model or optimizer state holds NaN or infinity; not saved")
    model_state, optim_state = get_state_dict(model, optimizers)
    if skip_frozen:
        frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
        model_state = {key: value for key, value in model_state.items() if key not in frozen}
    state = {"model": model_state, "optim": optim_state}
    if copy:
        state = _copied(state, pin=torch.cuda.is_available())
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the pinned copies are complete before the step that follows
        meta = _copied(pycopy.deepcopy(meta), pin=False)
    return Staged(path, state, rng_state(), meta, config, lineage, _nbytes(state))


def _agree(ok: bool, group: Any) -> bool:
    """Collective over ``group``: whether every rank's ``ok`` holds."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _collective_device(group: Any) -> torch.device:
    """Where a small tensor for a collective over ``group`` lives: the GPU for an NCCL-only group."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**28 else f"{count / 2**20:.1f} MiB"


def _full_disk(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a write into a full file system: ENOSPC, or the zip
    writer's "unexpected pos" that a short write leaves (torch.save)."""
    seen = 0
    while error is not None and seen < 10:
        if (
            getattr(error, "errno", None) == errno.ENOSPC
            or "No space left" in str(error)
            or "unexpected pos" in str(error)
        ):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def _failure(staged: Staged, error: BaseException) -> CheckpointWriteError:
    directory = staged.path.parent
    before = last_complete(directory)
    kept = f"; the newest complete checkpoint stays {before}" if before else "; no complete checkpoint before it"
    if _full_disk(error) and not is_url(directory):
        free = shutil.disk_usage(existing_ancestor(directory)).free
        return CheckpointWriteError(
            f"{directory}: the disk is full: the checkpoint of step {staged.step} needs about {_gib(_needed(staged))}"
            f" on this rank, {_gib(free)} free; not saved{kept}"
        )
    text = str(error).strip()
    reason = getattr(error, "strerror", None) or (text.splitlines()[0] if text else type(error).__name__)
    return CheckpointWriteError(
        f"{directory}: the checkpoint of step {staged.step} could not be written ({reason}){kept}"
    )


def _needed(staged: Staged) -> float:
    """Bytes a rank's share of a checkpoint takes on disk: its tensors, their headers, the small files."""
    return staged.nbytes * 1.02 + (1 << 20)


def last_complete(directory: Path) -> Optional[Path]:
    kept = checkpoints_in(directory)
    return kept[-1] if kept else None


def write(staged: Staged, group: Any = None, retention: Optional[Retention] = None, shards: Any = None) -> Path:
    """Collective over ``group`` (the default group; a save in the background: its own): write ``staged``
    as ``<path>.tmp``, the manifest last, rename it to ``path`` once every rank has finished, then apply
    ``retention``. In object storage (``path`` a URL), where a rename copies every object, it is written
    in place: the manifest, written last, is what makes it complete; a complete checkpoint already there
    is kept, not written again. ``shards``: what writes DCP's shards (default ``dcp.save``;
    ``background``'s process executor). Checks first that each file system has room for the shares of
    the ranks that write to it. Raises ``CheckpointWriteError`` on every rank when any rank's write
    failed; the checkpoint before it stays. Every stage's outcome is agreed on by all ranks before the
    next, so a failure on one rank never leaves the others waiting in a collective."""
    path = staged.path
    remote = is_url(path)
    tmp = path if remote else path.with_name(path.name + TMP_SUFFIX)
    distributed = dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    failure: Optional[BaseException] = None

    def stage_ok(action: Any) -> bool:
        """Run ``action`` (on this rank), then agree with every rank on whether all of theirs succeeded."""
        nonlocal failure
        if failure is None:
            try:
                action()
            except (Exception, CheckpointException) as error:  # DCP's is a BaseException
                failure = error
        return _agree(failure is None, group)

    def fail() -> CheckpointWriteError:
        if rank == 0 and not (remote and is_checkpoint(path)):
            with contextlib.suppress(Exception):
                remove_tree(tmp)  # room for the next save; the last complete one untouched
        return _failure(staged, failure or OSError("another rank's write failed"))

    if remote:
        done = False

        def already() -> None:
            nonlocal done
            done = is_checkpoint(path)

        if stage_ok(already) and _agree(done, group):
            return path  # a rerun saving a step the bucket holds whole (a resumed run's last step)
    elif not _room(staged, path.parent, group):
        raise _failure(staged, OSError(errno.ENOSPC, "No space left on device"))

    def prepare() -> None:
        if rank == 0:
            remove_tree(tmp)  # debris of an earlier interrupted save
            tmp.mkdir(parents=True, exist_ok=True)

    def shards_and_files() -> None:
        (shards or dcp.save)(staged.state, storage_writer=_writer(tmp), process_group=group)
        _torch_save(staged.rng, tmp / rng_file(rank))
        if rank == 0:
            _torch_save(staged.meta, tmp / META_FILE)
            if staged.config is not None:
                (tmp / CONFIG_FILE).write_text(json.dumps(staged.config, indent=1, sort_keys=True))
            if staged.lineage is not None:
                (tmp / LINEAGE_FILE).write_text(json.dumps(staged.lineage, indent=1, sort_keys=True))

    described: dict[str, Any] = {}

    def describe() -> None:  # every rank hashes its share of the files (every world-th)
        nonlocal described
        if remote:
            tmp.fs.invalidate_cache()  # a listing cached before the other ranks wrote would leave their files out
        written = sorted((p for p in tmp.iterdir() if p.is_file()), key=lambda p: p.name)
        described = describe_files(written[rank::world])

    if not (stage_ok(prepare) and stage_ok(shards_and_files) and stage_ok(describe)):
        raise fail()
    if world > 1:
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, described, group=group)
        described = {name: entry for share in shares for name, entry in share.items()}

    def finish() -> None:  # rank 0 writes the manifest last, then the rename makes it the checkpoint
        if rank == 0:
            manifest = {"format": MANIFEST_FORMAT, "files": described}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            if not remote:
                if path.exists():
                    shutil.rmtree(path)
                os.replace(tmp, path)

    if not stage_ok(finish):
        raise fail()
    if retention is not None and rank == 0:  # the new checkpoint is complete: the older ones may go
        try:
            prune(path.parent, retention.keep_last, retention.keep_every)
        except Exception as error:  # a checkpoint left over is not a failed save
            log.warning("retention could not delete an old checkpoint in %s: %s", path.parent, error)
    return path


def _room(staged: Staged, directory: Path, group: Any) -> bool:
    """Collective: whether each file system the ranks write to has room for all their shares (ranks of
    one node, or of a shared file system, add up: they are told apart by host and device)."""
    where = existing_ancestor(directory)
    mine = (socket.gethostname(), os.stat(where).st_dev, _needed(staged), shutil.disk_usage(where).free)
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return mine[3] >= mine[2]
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    needed: dict[tuple[str, int], float] = {}
    for host, device, need, _ in everyone:
        needed[(host, device)] = needed.get((host, device), 0.0) + need
    return all(free >= needed[(host, device)] for host, device, _, free in everyone)


def save(
    path: str | Path,
    model: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer],
    meta: dict[str, Any],
    config: Optional[dict[str, Any]] = None,
    skip_frozen: bool = False,
    lineage: Optional[dict[str, Any]] = None,
    retention: Optional[Retention] = None,
) -> Path:
    """Collective: every rank calls it with the same ``path``; returns once the checkpoint is complete.
    Raises ``NonFiniteStateError``, writing nothing, when any rank's state holds NaN or infinity, and
    ``CheckpointWriteError`` when it could not be written.
    ``skip_frozen``: leave out the parameters that do not train (a LoRA run's base, which its run rebuilds).
    ``lineage``: written as ``lineage.json`` (the checkpoint the run resumed from: ``ckpt_path=last`` follows it).
    ``retention``: the older checkpoints it keeps once complete. In the background: ``BackgroundSaver``."""
    staged = stage(path, model, optimizers, meta, config, skip_frozen, lineage, copy=False)
    return write(staged, None, retention)


def load(path: str | Path, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, Any]:
    """Collective: load model and optimizer state in place (resharding to this layout) and this rank's
    RNG state where the checkpoint has one for it; return the trainer's metadata."""
    path = place(path)
    optimizers = list(optimizers)
    model_state, optim_state = get_state_dict(model, optimizers)
    saved = reader(path).read_metadata().state_dict_metadata
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    absent = {key for key in model_state if key in frozen and f"model.{key}" not in saved}
    model_state = {key: value for key, value in model_state.items() if key not in absent}  # a LoRA base left out
    state = {"model": model_state, "optim": optim_state}
    _load(state, path)
    options = StateDictOptions(strict=not absent)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_path = path / rng_file(rank)
    if rng_path.is_file():
        set_rng_state(_safe_load(rng_path))
    return _safe_load(path / META_FILE)


def load_model(path: str | Path, model: nn.Module) -> int:
    """Collective: the model tensors ``path`` holds, read into ``model`` (any layout: DCP reshards them); the
    ones it does not hold (a LoRA run's base, saved without it) are left as they are. Returns how many
    tensors were read."""
    saved = reader(path).read_metadata().state_dict_metadata
    current = get_model_state_dict(model)
    held = {name: value for name, value in current.items() if MODEL_PREFIX + name in saved}
    state = {"model": {f"model.{name}": value for name, value in held.items()}}
    _load(state, path)
    loaded = {name.removeprefix("model."): value for name, value in state["model"].items()}
    set_model_state_dict(model, loaded, options=StateDictOptions(strict=len(held) == len(current)))
    return len(held)


MODEL_PREFIX = "model.model."  # the LightningModule's `model` attribute, then the state dict's "model" entry


def consolidated_model_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of ``checkpoint``, by their names in the bare model, read in this
    one process whatever layout wrote them (parameters and persistent buffers; no optimizer state)."""
    metadata = reader(checkpoint).read_metadata()
    state = {
        key: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(item, TensorStorageMetadata)
    }
    if not state:
        raise ValueError(f"{checkpoint}: no model tensors under {MODEL_PREFIX!r}")
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process reading, as intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load(state, checkpoint, no_dist=True)
    return {key[len(MODEL_PREFIX) :]: tensor for key, tensor in state.items()}


def saved_step(path: str | Path) -> int:
    """The optimizer steps a checkpoint's run had taken."""
    return int(_safe_load(place(path) / META_FILE)["global_step"])
