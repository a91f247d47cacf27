"""The model's weights as a Hugging Face directory: ``export(state, cfg, out)`` writes the consolidated weights
of a checkpoint as a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads
(``config.json``, safetensors shards with ``model.safetensors.index.json``, the tokenizer's files), RoPE
rows back in Hugging Face's order (``hf_load``'s module docstring).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor

from curry_train.checkpoint.files import saved_config
from curry_train.checkpoint.hf_config import (
    ARCHITECTURES,
    CONFIG,
    INDEX,
    SHARD_BYTES,
    TOKEN_IDS,
    TOKENIZER_FILES,
    PretrainedError,
    hf_kind,
    sources,
)
from curry_train.checkpoint.hf_load import rope_rows_back
from curry_train.checkpoint.model import checkpoint_model_config, checkpoint_state
from curry_train.model.config import head_dim
from curry_train.options import EXPORT_DTYPES
from curry_train.primitives.lora import adapted_weight, is_adapter, lora_b_of

log = logging.getLogger(__name__)


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


DTYPES = dict(zip(EXPORT_DTYPES, (torch.float32, torch.bfloat16, torch.float16), strict=True))  # options' names
_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def export_dtype(cfg: Any) -> str:
    """The dtype an export writes by default: the pretrained directory's (``model.init_from``), else fp32."""
    if cfg.init_from and (Path(cfg.init_from) / CONFIG).is_file():
        config = json.loads((Path(cfg.init_from) / CONFIG).read_text())
        return _HF_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), "fp32")
    return "fp32"


def merge_adapters(state: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """The weights of a LoRA-trained model with each adapted linear's adapters merged into it:
    ``W + (alpha / rank) B A`` (in fp32), the adapters dropped."""
    scale = cfg.lora.alpha / cfg.lora.rank
    merged = {name: tensor for name, tensor in state.items() if not is_adapter(name)}
    for name, a in state.items():
        target = adapted_weight(name)
        if target is not None:  # (out, rank) @ (rank, in); stacked experts: one product per expert
            weight, b = state[target], state[lora_b_of(name)]
            merged[target] = (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)
    return merged


PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def export_peft(state: dict[str, Tensor], cfg: Any, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A LoRA-trained model's adapters as a Hugging Face PEFT adapter directory ``out`` (``adapter_config.json``
    and ``adapter_model.safetensors``, the modules named as the base model's): ``PeftModel.from_pretrained``
    loads it onto the base. ``B``'s rows follow their weight's rows into HF's order (the RoPE heads')."""
    table, lora = sources(cfg), cfg.lora
    tensors, modules = {}, set()
    for name, a in state.items():
        if name.endswith(("_lora_a", "_lora_b")):
            raise PretrainedError(
                "the checkpoint holds adapters on routed experts, which a PEFT adapter directory does not"
                " describe as they are trained here: export the merged model with --format hf"
            )
        if not name.endswith(".lora_a"):
            continue
        layer = name.removesuffix(".lora_a")
        source = table[layer + ".weight"]
        module = "lm_head" if layer == "output" else source.keys[0].removesuffix(".weight")
        b = state[layer + ".lora_b"]
        if source.heads > 0:
            b = rope_rows_back(b, source.heads)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype).contiguous()
        modules.add(module.rsplit(".", 1)[-1])
    if not tensors:
        raise PretrainedError("the checkpoint holds no LoRA adapters (its run had model.lora null)")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": cfg.init_from,
        "inference_mode": True,
    }
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(partial / PEFT_WEIGHTS), metadata={"format": "pt"})
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


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
    state = checkpoint_state(checkpoint)  # a LoRA run's base rebuilt where it was not saved
    if cfg.lora is not None:  # a LoRA run: the merged model
        state = merge_adapters(state, cfg)
    return export(state, cfg, out, torch_dtype, tokenizer, shard_bytes, ids)
