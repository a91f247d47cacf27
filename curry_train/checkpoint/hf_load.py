"""Hugging Face weights into the model, under any layout.

* ``check_weights(path, model)``: every tensor the model needs is in the directory with its shape,
  read from the safetensors headers alone (no weights), so a missing tensor fails before any worker.
* ``load_pretrained(model, device, path)``: fills a meta-device model, already split by any layout
  (DTensor parameters), with the directory's weights. Each rank reads only the box of each tensor its
  shard covers, through safetensors' lazy slices of the memory-mapped file: host memory holds this
  rank's shards plus the tensor being read, never the model. (DCP's Hugging Face reader would need
  the checkpoint's own names and shapes; the model stacks experts and orders RoPE pairs differently.)

RoPE: Hugging Face's q/k projections rotate the halves of each head (channel ``i`` with ``i + d/2``),
the model rotates interleaved pairs (``2i`` with ``2i+1``). Loading permutes the rows of each head so
that HF row ``c * d/2 + i`` becomes row ``2i + c``; attention scores are dot products over a head's
channels, unchanged by permuting q and k alike, and the permutation moves values without arithmetic,
so the conversion is exact in both directions (``hf_export`` permutes them back).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from curry_train.checkpoint.hf_config import (
    CONFIG,
    FLOAT_DTYPES,
    INDEX,
    PretrainedError,
    Source,
    architecture,
    read_config,
    sources,
)
from curry_train.model.llama import Llama
from curry_train.primitives.host_memory import reset_peak, resident
from curry_train.primitives.lora import is_adapter


def rope_rows(rows: Tensor, heads: int) -> Tensor:
    """HF's rotate-half row order of each head -> interleaved pairs (rows: (heads * d, ...))."""
    return rows.unflatten(0, (heads, 2, -1)).transpose(1, 2).flatten(0, 2)


def rope_rows_back(rows: Tensor, heads: int) -> Tensor:
    """Interleaved pairs -> HF's rotate-half order (the inverse of ``rope_rows``)."""
    return rows.unflatten(0, (heads, -1, 2)).transpose(1, 2).flatten(0, 2)


# ----------------------------------------------------------------------------------------------
# Reading


class _Files:
    """The directory's safetensors tensors by name: which file holds each, opened lazily."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise PretrainedError(f"{index}: not a safetensors index ({error})") from None
            self.where = {key: directory / file for key, file in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise PretrainedError(f"{directory}: no *.safetensors weights (PyTorch .bin checkpoints are not read)")
            self.where = {}
            for file in files:
                self.where.update((key, file) for key in _open(file).keys())
        self._open: dict[Path, Any] = {}
        self.bytes_read = 0
        self.largest_read = 0

    def handle(self, key: str) -> Any:
        file = self.where[key]
        if file not in self._open:
            if not file.is_file():
                raise PretrainedError(f"{file}: missing (named by {INDEX} for {key})")
            self._open[file] = _open(file)
        return self._open[file]

    def shape(self, key: str) -> list[int]:
        return list(self.handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self.handle(key).get_slice(key).get_dtype()

    def read(self, key: str, box: tuple[slice, ...]) -> Tensor:
        tensor = self.handle(key).get_slice(key)[box]
        size = tensor.numel() * tensor.element_size()
        self.bytes_read += size
        self.largest_read = max(self.largest_read, size)
        return tensor

    def release(self) -> None:
        """Close the files (unmapping them): the pages read so far stop counting as this process's memory."""
        self._open.clear()


def _open(file: Path) -> Any:
    try:
        return safe_open(str(file), "pt")
    except Exception as error:  # safetensors raises its own SafetensorError for a damaged file
        raise PretrainedError(f"{file}: not a readable safetensors file ({error})") from None


def check_weights(path: str | Path, cfg: Any) -> None:
    """Every tensor the model ``cfg`` needs is in the directory with the shape the model expects
    (safetensors headers only); else one ``PretrainedError`` line naming the tensor."""
    directory = Path(path)
    files = _Files(directory)
    shapes = _expected_shapes(cfg)
    for name, source in sources(cfg, _kind_of(directory)).items():
        expected = shapes[name]
        if source.stacked:
            expected = expected[1:]
        elif source.heads == -1:
            expected = expected[-1:]
        for key in source.keys:
            if key not in files.where:
                raise PretrainedError(f"{directory}: tensor {key} is missing (the model's {name})")
            got = files.shape(key)
            if files.dtype(key) not in FLOAT_DTYPES:
                raise PretrainedError(
                    f"{directory}: tensor {key} is {files.dtype(key)}; the weights must be one of"
                    f" {', '.join(FLOAT_DTYPES)} (a quantized checkpoint is not supported)"
                )
            if got != list(expected):
                raise PretrainedError(
                    f"{directory}: tensor {key} has shape {got}, config.json implies {list(expected)}"
                    f" (the model's {name})"
                )


def _kind_of(directory: Path) -> str:
    return architecture(read_config(directory), directory / CONFIG)


def _expected_shapes(cfg: Any) -> dict[str, list[int]]:
    with torch.device("meta"):
        model = Llama(cfg)
    shapes = {name: list(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    return shapes


def _box(param: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shape and global offset of this rank's part of ``param`` (a DTensor's local shard, or all of it)."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return tuple(shape), tuple(offset)
    return tuple(param.shape), (0,) * param.dim()


def _read_box(files: _Files, source: Source, shape: tuple[int, ...], offset: tuple[int, ...]) -> Tensor:
    """The box ``offset : offset + shape`` of the model's parameter, from its HF tensor(s)."""
    box = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
    if source.stacked:  # experts offset[0] .. offset[0] + shape[0], each its own tensor
        parts = [files.read(source.keys[e], box[1:]) for e in range(box[0].start, box[0].stop)]
        return torch.stack(parts) if parts else torch.empty(shape)
    key = source.keys[0]
    if source.heads == -1:  # a head-wide norm weight: tiny, read whole
        return rope_rows(files.read(key, (slice(None),)), 1)[box]
    if source.heads > 0:  # whole heads around the rows, reordered, then the rows
        width = files.shape(key)[0] // source.heads
        first = box[0].start // width
        last = max(first, math.ceil(box[0].stop / width))
        rows = files.read(key, (slice(first * width, last * width), *box[1:]))
        rows = rope_rows(rows, last - first) if last > first else rows
        return rows[box[0].start - first * width : box[0].stop - first * width]
    return files.read(key, box)


@dataclass
class LoadReport:
    tensors: int
    shard_bytes: int  # the bytes of this rank's parameters
    bytes_read: int  # read from the files (whole heads around a shard of q/k rows: a little more)
    largest_read: int  # the largest single read: the transient above the shards
    rss_before: Optional[int]  # this process's resident memory before the load, bytes (None: not measured)
    peak_rss: Optional[int]  # its peak resident memory during the load


@torch.no_grad()
def load_pretrained(model: nn.Module, device: torch.device, path: str | Path) -> LoadReport:
    """Allocate the meta-device ``model`` on ``device`` and fill every parameter's local part from the
    Hugging Face directory ``path`` (module docstring); then ``tie_weights`` and ``reset_buffers``."""
    directory = Path(path)
    files = _Files(directory)
    table = sources(model.cfg, _kind_of(directory))
    measured = reset_peak()
    before = resident().get("VmRSS") if measured else None
    model.to_empty(device=device)
    model.tie_weights()
    shard_bytes = count = 0
    for name, param in model.named_parameters():
        if is_adapter(name):  # LoRA adapters are not pretrained: the caller draws them
            continue
        if name not in table:
            raise PretrainedError(f"{directory}: nothing maps to the model's {name}")
        local = param.to_local() if isinstance(param, DTensor) else param
        shape, offset = _box(param)
        value = _read_box(files, table[name], shape, offset)
        if tuple(value.shape) != tuple(local.shape):
            raise PretrainedError(
                f"{directory}: {table[name].keys[0]} gives {tuple(value.shape)} for the model's {name}, whose part"
                f" here is {tuple(local.shape)}"
            )
        local.copy_(value)
        del value
        files.release()
        shard_bytes += local.numel() * local.element_size()
        count += 1
    model.reset_buffers()
    peak = resident().get("VmHWM") if measured else None
    return LoadReport(count, shard_bytes, files.bytes_read, files.largest_read, before, peak)
