"""Hugging Face model directories in and out: ``config.json``, safetensors weights, the tokenizer.

* ``model_config(path)``: the ``model.*`` keys of a directory's ``config.json`` (Llama 2/3/3.1/3.2,
  Mistral, Qwen3, Mixtral, Qwen3-MoE); anything the model cannot compute exactly is one
  ``PretrainedError`` line naming the key.
* ``check_weights(path, model)``: every tensor the model needs is in the directory with its shape,
  read from the safetensors headers alone (no weights), so a missing tensor fails before any worker.
* ``load_pretrained(model, device, path)``: fills a meta-device model, already split by any layout
  (DTensor parameters), with the directory's weights. Each rank reads only the box of each tensor its
  shard covers, through safetensors' lazy slices of the memory-mapped file: host memory holds this
  rank's shards plus the tensor being read, never the model. (DCP's Hugging Face reader would need
  the checkpoint's own names and shapes; the model stacks experts and orders RoPE pairs differently.)
* ``export(state, cfg, out)``: the consolidated weights of a checkpoint as a directory that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads: ``config.json``, safetensors shards
  with ``model.safetensors.index.json``.

RoPE: Hugging Face's q/k projections rotate the halves of each head (channel ``i`` with ``i + d/2``),
the model rotates interleaved pairs (``2i`` with ``2i+1``). Loading permutes the rows of each head so
that HF row ``c * d/2 + i`` becomes row ``2i + c``; attention scores are dot products over a head's
channels, unchanged by permuting q and k alike, and the permutation moves values without arithmetic,
so the conversion is exact in both directions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from curry_train.model import Llama, ModelConfig, head_dim
from curry_train.primitives.dcp import consolidated_model_state, saved_config
from curry_train.primitives.host_memory import reset_peak, resident

log = logging.getLogger(__name__)

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # what generation reads from config.json
# architecture -> what the model needs to compute it: qk_norm (Qwen3) and the MoE convention
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
# the keys of model.moe that set what the layer computes (the rest: how training balances it)
MOE_SHAPE_KEYS = (
    "experts",
    "top_k",
    "shared_experts",
    "expert_ffn_dim",
    "dense_layers",
    "score_function",
    "normalize",
    "capacity_factor",
)
SHARD_BYTES = 5 * 10**9  # the largest safetensors file an export writes (Hugging Face's default, 5GB)
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # safetensors' names of the dtypes a checkpoint may hold


class PretrainedError(ValueError):
    """A Hugging Face directory the model cannot load; the message is one line naming the file and key."""


# ----------------------------------------------------------------------------------------------
# config.json


def read_config(path: str | Path) -> dict[str, Any]:
    directory = Path(path)
    file = directory / CONFIG
    if not directory.is_dir():
        raise PretrainedError(f"model.init_from={path}: not a directory (a Hugging Face model directory)")
    if not file.is_file():
        raise PretrainedError(f"model.init_from={path}: no {CONFIG} (a Hugging Face model directory)")
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PretrainedError(f"{file}: not JSON ({error})") from None
    if not isinstance(config, dict):
        raise PretrainedError(f"{file}: not a JSON object")
    return config


def architecture(config: dict[str, Any], file: Path) -> str:
    names = config.get("architectures") or []
    names = [names] if isinstance(names, str) else names
    name = names[0] if isinstance(names, list) and names else None
    if name not in ARCHITECTURES:
        given = name or f"model_type {config.get('model_type')!r}"
        raise PretrainedError(
            f"{file}: architecture {given} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[name]


def _rope(config: dict[str, Any], file: Path) -> tuple[float, Optional[dict[str, Any]]]:
    """rope_theta and the llama3 scaling, from transformers 4's keys (rope_theta, rope_scaling) or 5's
    (rope_parameters)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise PretrainedError(f"{file}: rope_scaling type {kind!r} is not supported (supported: default, llama3)")
    return theta, {
        "type": "llama3",
        "factor": float(scaling["factor"]),
        "low_freq_factor": float(scaling["low_freq_factor"]),
        "high_freq_factor": float(scaling["high_freq_factor"]),
        "original_max_seq_len": int(scaling["original_max_position_embeddings"]),
    }


def model_config(path: str | Path, seq_len: Optional[int] = None) -> dict[str, Any]:
    """The ``model.*`` keys of the Hugging Face directory ``path`` (``init_from`` among them); ``seq_len``:
    the training sequence length, which a sliding attention window must cover."""
    directory = Path(path)
    config = read_config(directory)
    file = directory / CONFIG
    try:
        return _model_config(directory, config, file, seq_len)
    except KeyError as error:
        raise PretrainedError(f"{file}: no {error.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as error:
        raise PretrainedError(f"{file}: a value of the wrong type or size ({type(error).__name__}: {error})") from None


def _model_config(directory: Path, config: dict[str, Any], file: Path, seq_len: Optional[int]) -> dict[str, Any]:
    kind = architecture(config, file)
    quantized = config.get("quantization_config")
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else quantized
        raise PretrainedError(
            f"{file}: quantized weights (quantization_config: {method}) are not supported; use the bf16/fp32 release"
        )

    def need(key: str) -> Any:
        if key not in config:
            raise PretrainedError(f"{file}: no {key!r}")
        return config[key]

    if config.get("hidden_act", "silu") != "silu":
        raise PretrainedError(f"{file}: hidden_act {config['hidden_act']!r} is not supported (the MLP is SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise PretrainedError(f"{file}: {key}=true is not supported (the projections have no bias)")
    if config.get("use_sliding_window"):
        raise PretrainedError(f"{file}: use_sliding_window=true is not supported (attention is full causal)")
    window = config.get("sliding_window")
    if kind in ("mistral", "mixtral") and window and seq_len and seq_len > window:
        raise PretrainedError(
            f"{file}: sliding_window={window} is shorter than data.seq_len={seq_len}; attention here is full causal,"
            f" which equals the window only up to {window} tokens: train with data.seq_len<={window}"
        )
    theta, scaling = _rope(config, file)
    dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head = config.get("head_dim") or dim // n_heads
    keys: dict[str, Any] = {
        "name": directory.resolve().name,
        "dim": dim,
        "n_layers": int(need("num_hidden_layers")),
        "n_heads": n_heads,
        "n_kv_heads": int(config.get("num_key_value_heads") or n_heads),
        "ffn_dim": int(need("intermediate_size")),
        "vocab_size": int(need("vocab_size")),
        "max_seq_len": int(config.get("max_position_embeddings") or 2048),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "init_std": float(config.get("initializer_range", 0.02)),
        "head_dim": int(head) if head * n_heads != dim else None,
        "qk_norm": kind in ("qwen3", "qwen3_moe"),
        "moe": None,
        "init_from": str(directory.resolve()),
    }
    if kind == "mixtral":
        keys["moe"] = _moe(config, "num_local_experts", int(config["intermediate_size"]), True, 0)
    elif kind == "qwen3_moe":
        n_layers = keys["n_layers"]
        step = int(config.get("decoder_sparse_step", 1))
        dense = set(config.get("mlp_only_layers") or ())
        sparse = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
        first = n_layers - len(sparse)
        if sparse != list(range(first, n_layers)):
            raise PretrainedError(
                f"{file}: mixture-of-experts layers {sparse} (mlp_only_layers, decoder_sparse_step) are not the"
                " last layers; the model supports dense layers first (model.moe.dense_layers), then MoE"
            )
        experts_key = "num_experts" if "num_experts" in config else "num_local_experts"
        expert_ffn = int(need("moe_intermediate_size"))
        keys["moe"] = _moe(config, experts_key, expert_ffn, bool(config.get("norm_topk_prob", False)), first)
    return keys


def _moe(config: dict[str, Any], experts_key: str, expert_ffn: int, normalize: bool, dense: int) -> dict[str, Any]:
    """Softmax top-k routing without shared experts; trained with an auxiliary balancing loss."""
    return {
        "experts": int(config[experts_key]),
        "top_k": int(config["num_experts_per_tok"]),
        "shared_experts": 0,
        "expert_ffn_dim": expert_ffn,
        "dense_layers": dense,
        "score_function": "softmax",
        "normalize": normalize,
        "balancing": "aux_loss",
        "aux_loss_coef": float(config.get("router_aux_loss_coef", 0.01)),
        "capacity_factor": None,
    }


# ----------------------------------------------------------------------------------------------
# Names: this model's parameters <-> the Hugging Face tensors


@dataclass(frozen=True)
class Source:
    """Where a parameter of the model comes from: one HF tensor, or one per expert (stacked on dim 0);
    ``heads`` > 0: the rows of each of that many heads are in rotate-half order (``rope_rows``); -1: a
    head-wide vector in that order (qk norms)."""

    keys: tuple[str, ...]
    heads: int = 0
    stacked: bool = False


def _block_sources(cfg: Any, index: int, hf: str) -> dict[str, Source]:
    """A block's parameters (``layers.{index}.``-relative names) and their HF tensors."""
    kind = hf
    p = f"model.layers.{index}."
    sources = {
        "attention_norm.weight": Source((p + "input_layernorm.weight",)),
        "ffn_norm.weight": Source((p + "post_attention_layernorm.weight",)),
        "attention.wq.weight": Source((p + "self_attn.q_proj.weight",), heads=cfg.n_heads),
        "attention.wk.weight": Source((p + "self_attn.k_proj.weight",), heads=cfg.n_kv_heads),
        "attention.wv.weight": Source((p + "self_attn.v_proj.weight",)),
        "attention.wo.weight": Source((p + "self_attn.o_proj.weight",)),
    }
    if cfg.qk_norm:
        sources["attention.q_norm.weight"] = Source((p + "self_attn.q_norm.weight",), heads=-1)
        sources["attention.k_norm.weight"] = Source((p + "self_attn.k_norm.weight",), heads=-1)
    moe = cfg.moe
    if moe is None or index < moe.dense_layers:
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            sources[f"feed_forward.{ours}.weight"] = Source((p + f"mlp.{theirs}.weight",))
        return sources
    if kind == "mixtral":
        gate, experts, names = "block_sparse_moe.gate.weight", "block_sparse_moe.experts", ("w1", "w3", "w2")
    else:
        gate, experts, names = "mlp.gate.weight", "mlp.experts", ("gate_proj", "up_proj", "down_proj")
    sources["feed_forward.router.gate.weight"] = Source((p + gate,))
    for ours, theirs in zip(("w1", "w3", "w2"), names, strict=True):
        keys = tuple(f"{p}{experts}.{e}.{theirs}.weight" for e in range(moe.experts))
        sources[f"feed_forward.experts.{ours}"] = Source(keys, stacked=True)
    return sources


def hf_kind(cfg: Any) -> str:
    """The Hugging Face architecture (``ARCHITECTURES``' values) that computes the model ``cfg``."""
    moe = cfg.moe
    if moe is None:
        if cfg.qk_norm:
            return "qwen3"
        return "llama"
    if moe.shared_experts or moe.score_function != "softmax" or moe.capacity_factor is not None:
        raise PretrainedError(
            "a mixture of experts with shared experts, sigmoid scores or a capacity factor has no Hugging Face"
            " architecture here (Mixtral and Qwen3-MoE: softmax top-k, no shared experts, dropless)"
        )
    if cfg.qk_norm:
        return "qwen3_moe"
    if moe.dense_layers or not moe.normalize:
        raise PretrainedError(
            "a mixture of experts without qk_norm exports as Mixtral, which renormalizes the top-k weights"
            " (model.moe.normalize=true) and has no dense layers (model.moe.dense_layers=0)"
        )
    return "mixtral"


def sources(cfg: Any, kind: Optional[str] = None) -> dict[str, Source]:
    """Every parameter name of the whole model ``cfg`` and its Hugging Face tensors."""
    kind = kind or hf_kind(cfg)
    result = {
        "tok_embeddings.weight": Source(("model.embed_tokens.weight",)),
        "norm.weight": Source(("model.norm.weight",)),
    }
    embed = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    result["output.weight"] = Source((embed,))
    for index in range(cfg.n_layers):
        for name, source in _block_sources(cfg, index, kind).items():
            result[f"layers.{index}.{name}"] = source
    return result


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


# ----------------------------------------------------------------------------------------------
# Writing


def hf_config(cfg: Any, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` for the model ``cfg`` (transformers 4's keys, which transformers 5 also reads)."""
    kind = hf_kind(cfg)
    arch = next(name for name, value in ARCHITECTURES.items() if value == kind)
    config: dict[str, Any] = {
        "architectures": [arch],
        "model_type": kind,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": head_dim(cfg),
        "intermediate_size": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."),  # transformers 4's key
        "dtype": str(dtype).removeprefix("torch."),  # transformers 5's
    }
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }
    moe = cfg.moe
    if kind == "mixtral":
        config.update(
            num_local_experts=moe.experts,
            num_experts_per_tok=moe.top_k,
            intermediate_size=moe.expert_ffn_dim,
            router_aux_loss_coef=moe.aux_loss_coef,
            sliding_window=None,
        )
    elif kind == "qwen3_moe":
        config.update(
            num_experts=moe.experts,
            num_experts_per_tok=moe.top_k,
            moe_intermediate_size=moe.expert_ffn_dim,
            norm_topk_prob=bool(moe.normalize),
            decoder_sparse_step=1,
            mlp_only_layers=list(range(moe.dense_layers)),
            router_aux_loss_coef=moe.aux_loss_coef,
            use_sliding_window=False,
        )
    elif kind == "qwen3":
        config["use_sliding_window"] = False
    return config


def hf_state(state: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """The model's full tensors ``state`` under their Hugging Face names, in HF's layout."""
    if cfg.moe is not None and cfg.moe.balancing == "aux_free":
        moved = [name for name, t in state.items() if name.endswith("router.expert_bias") and bool(t.any())]
        if moved:
            raise PretrainedError(
                f"{moved[0]} is not zero: balancing=aux_free moved the routing bias, which Mixtral and Qwen3-MoE"
                " do not have; fine-tune with model.moe.balancing=aux_loss (or none) to export"
            )
    out: dict[str, Tensor] = {}
    for name, source in sources(cfg).items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        if name not in state:
            raise PretrainedError(f"the checkpoint has no {name}")
        tensor = state[name]
        if source.stacked:
            out.update(zip(source.keys, tensor.unbind(0), strict=True))
            continue
        if source.heads == -1:
            tensor = rope_rows_back(tensor, 1)
        elif source.heads > 0:
            tensor = rope_rows_back(tensor, source.heads)
        out[source.keys[0]] = tensor
    return {key: t.contiguous() for key, t in out.items()}


def save_sharded(tensors: dict[str, Tensor], out: Path, shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """``tensors`` as safetensors files of at most ``shard_bytes`` each (a tensor larger than that gets
    its own) and, with more than one file, ``model.safetensors.index.json``."""
    groups: list[list[str]] = [[]]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    if len(groups) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    for name, keys in zip(names, groups, strict=True):
        save_file({k: tensors[k] for k in keys}, str(out / name), metadata={"format": "pt"})
        weight_map.update((k, name) for k in keys)
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [out / name for name in names]


def tokenizer_files(source: Optional[str | Path]) -> list[Path]:
    """The tokenizer files of a HF directory, or a ``tokenizer.json`` itself; none for ``byte``/``None``."""
    if source is None or str(source) in ("byte", "auto"):
        return []
    path = Path(source)
    if path.is_file():
        return [path]
    return [path / name for name in TOKENIZER_FILES if (path / name).is_file()]


def token_ids(directories: Iterable[Optional[str | Path]]) -> dict[str, Any]:
    """``bos_token_id``, ``eos_token_id``, ``pad_token_id`` for an exported ``config.json``: from the first of
    ``directories`` whose ``config.json`` names any (the pretrained model's, the tokenizer's)."""
    for directory in directories:
        file = Path(directory) / CONFIG if directory else None
        if file is not None and file.is_file():
            try:
                config = json.loads(file.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            ids = {key: config[key] for key in TOKEN_IDS if config.get(key) is not None}
            if ids:
                return ids
    return {}


EXPORTED = (CONFIG, INDEX, *TOKENIZER_FILES)


def _replaceable(out: Path) -> None:
    """``out`` is absent, empty, or an earlier export (only files an export writes), which is replaced
    whole: stale shards of another size or dtype never outlive it."""
    if not out.exists():
        return
    if not out.is_dir():
        raise PretrainedError(f"{out}: is a file; the export writes a directory")
    for entry in out.iterdir():
        ours = entry.name in EXPORTED or (entry.name.startswith("model") and entry.name.endswith(".safetensors"))
        if not ours or not entry.is_file():
            raise PretrainedError(f"{out}: holds {entry.name}, which is not part of an export; choose another output")


def export(
    state: dict[str, Tensor],
    cfg: Any,
    out: str | Path,
    dtype: torch.dtype = torch.float32,
    tokenizer: Iterable[Path] = (),
    shard_bytes: int = SHARD_BYTES,
    ids: Optional[dict[str, Any]] = None,
) -> list[Path]:
    """Write the model ``cfg`` with the full weights ``state`` as a Hugging Face directory ``out``: into
    ``out.partial``, then renamed into place (an earlier export there is replaced), so an interrupted
    export never leaves a directory that looks whole. ``ids``: the special token ids for ``config.json``."""
    out = Path(out)
    _replaceable(out)
    config = {**hf_config(cfg, dtype), **(ids or {})}
    tensors = {key: t.to(dtype) for key, t in hf_state(state, cfg).items()}
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    written = save_sharded(tensors, partial, shard_bytes)
    for file in tokenizer:
        shutil.copyfile(file, partial / file.name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return [out / path.name for path in written]


def checkpoint_model_config(checkpoint: str | Path) -> Any:
    """The model config a curry-train checkpoint was saved with, typed (``ModelConfig``'s defaults filled)."""
    saved = saved_config(checkpoint)
    if not saved or "model" not in saved:
        raise PretrainedError(f"{checkpoint}: saved without its run's config; the Hugging Face config needs it")
    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with(saved["model"])
    return cfg


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def export_dtype(cfg: Any) -> str:
    """The dtype an export writes by default: the pretrained directory's (``model.init_from``), else fp32."""
    if cfg.init_from and (Path(cfg.init_from) / CONFIG).is_file():
        config = json.loads((Path(cfg.init_from) / CONFIG).read_text())
        return _HF_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), "fp32")
    return "fp32"


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, dtype: Optional[str] = None, shard_bytes: int = SHARD_BYTES
) -> list[Path]:
    """A curry-train checkpoint (any layout) as a Hugging Face directory ``out``, in ``dtype`` (fp32, bf16,
    fp16; None: ``export_dtype``), with the tokenizer the run trained with where it had one. Reads the whole
    model into this process."""
    cfg = checkpoint_model_config(checkpoint)
    hf_kind(cfg)  # an unexportable model fails before the weights are read
    _replaceable(Path(out))
    data = (saved_config(checkpoint) or {}).get("data") or {}
    # Text read at start-up: the tokenizer it was read with; token files: the pretrained model's.
    source = data.get("tokenizer") if data.get("source") == "files" else cfg.init_from
    tokenizer = tokenizer_files(source)
    directory = source if source and Path(source).is_dir() else None
    ids = token_ids([cfg.init_from, directory])
    torch_dtype = DTYPES[dtype or export_dtype(cfg)]
    return export(consolidated_model_state(checkpoint), cfg, out, torch_dtype, tokenizer, shard_bytes, ids)
