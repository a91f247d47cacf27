"""Hugging Face model directories: what their ``config.json`` says (no torch, so that a run's config is checked
before torch is imported), and which of their tensors each of the model's parameters comes from.

* ``model_config(path)``: the ``model.*`` keys of a directory's ``config.json`` (Llama 2/3/3.1/3.2,
  Mistral, Qwen3, Mixtral, Qwen3-MoE); anything the model cannot compute exactly is one
  ``PretrainedError`` line naming the key.
* ``sources(cfg)``: every parameter name of the model and its Hugging Face tensor(s).

Reading the weights: ``hf_load.py``; writing a directory: ``hf_export.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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
