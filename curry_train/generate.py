"""Text from a model: a curry-train checkpoint or a Hugging Face directory, one process, with a KV cache.

Each prompt is encoded (through the chat template for a chat model), run through the model once
(prefill), then one token at a time against the cache of every earlier token's keys and values
(``model.llama.KVCache``): greedy (``temperature=0``) or sampled at a temperature, after top-k and
top-p filtering; it stops at an end token or after ``max_new_tokens``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import Tensor
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from curry_train.checkpoint import files
from curry_train.checkpoint.dcp import MODEL_PREFIX, load_model, reader
from curry_train.checkpoint.hf_config import PretrainedError, model_config
from curry_train.checkpoint.hf_load import load_pretrained
from curry_train.checkpoint.model import checkpoint_model, checkpoint_model_config
from curry_train.data.chat import render, special_tokens, template_of
from curry_train.data.sources import ByteTokenizer, HFTokenizer, make_tokenizer
from curry_train.layout.dims import ParallelDims
from curry_train.model.config import ModelConfig
from curry_train.model.llama import KVCache, Llama
from curry_train.parallelize import materialize
from curry_train.pool import WorkerPool
from curry_train.primitives.lora import apply_lora
from curry_train.primitives.parallel_state import ParallelState
from curry_train.primitives.tp_linear import apply_tensor_parallel


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: every token
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches this
    seed: int = 0

    def check(self) -> Optional[str]:
        """What is wrong with these settings, or None."""
        if self.max_new_tokens < 1:
            return f"max_new_tokens={self.max_new_tokens}: at least 1"
        if self.temperature < 0:
            return f"temperature={self.temperature}: 0 (greedy) or more"
        if self.top_k < 0:
            return f"top_k={self.top_k}: 0 (off) or more"
        if not 0 < self.top_p <= 1:
            return f"top_p={self.top_p}: in (0, 1]"
        return None


@dataclass
class Loaded:
    model: Optional[Llama]  # None: loaded without weights
    tokenizer: ByteTokenizer | HFTokenizer
    template: Optional[str]  # the chat template, where the tokenizer directory has one
    special: dict[str, str]
    stop: set[int]  # token ids that end a generation


def _stop_ids(directory: Optional[Path], tokenizer) -> set[int]:
    stop = {tokenizer.separator} if tokenizer.separator is not None else set()
    for name in ("generation_config.json", "config.json"):
        if directory is not None and (directory / name).is_file():
            eos = json.loads((directory / name).read_text()).get("eos_token_id")
            stop.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return stop


CPU = torch.device("cpu")


def load(source: str | Path, device: torch.device = CPU, weights: bool = True) -> Loaded:
    """A Hugging Face directory (``config.json``) or a curry-train checkpoint (``manifest.json``), its
    tokenizer (the directory's, or the run's ``data.tokenizer``; else bytes) and its chat template
    (``weights=False``: no model, for a tensor-parallel run that reads each rank's shards itself)."""
    source = Path(source)
    model: Optional[Llama] = None
    if (source / files.MANIFEST_FILE).is_file():
        model = checkpoint_model(source, device) if weights else None
        data = (files.saved_config(source) or {}).get("data") or {}
        spec = str(data.get("tokenizer") or "byte")
        spec = spec if spec != "auto" and (spec == "byte" or Path(spec).exists()) else "byte"
        directory = Path(spec) if Path(spec).is_dir() else None
        run_template = data.get("chat_template")  # the template the run trained with, where it set one
    elif (source / "config.json").is_file():
        if weights:
            cfg = OmegaConf.structured(ModelConfig)
            cfg.merge_with(model_config(source))
            with torch.device("meta"):
                model = Llama(cfg)
            load_pretrained(model, device, source)
        spec, directory, run_template = str(source), source, None
    else:
        raise PretrainedError(f"{source}: neither a curry-train checkpoint nor a Hugging Face model directory")
    tokenizer = make_tokenizer(spec)
    template = template_of(run_template, str(directory) if directory is not None else spec)
    special = special_tokens(directory) if directory is not None else {}
    model = model.eval() if model is not None else None
    return Loaded(model, tokenizer, template, special, _stop_ids(directory, tokenizer))


def encode(loaded: Loaded, prompt: str, chat: bool = True) -> list[int]:
    """A prompt's token ids: as the user's turn of a conversation through the chat template (a chat
    model, unless ``chat`` is false), else the text as the tokenizer encodes a document (BOS where it adds one)."""
    if chat and loaded.template is not None:
        text = render(loaded.template, [{"role": "user", "content": prompt}], True, loaded.special)
        if isinstance(loaded.tokenizer, ByteTokenizer):
            return list(text.encode("utf-8"))
        return loaded.tokenizer._tokenizer.encode(text, add_special_tokens=False).ids
    return [int(i) for i in loaded.tokenizer.encode(prompt)]


def decode(loaded: Loaded, ids: Sequence[int]) -> str:
    if isinstance(loaded.tokenizer, ByteTokenizer):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
    return loaded.tokenizer._tokenizer.decode(list(ids), skip_special_tokens=True)


def _pick(logits: Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = logits.sort(descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        cut = cumulative - ordered.softmax(-1) >= sampling.top_p  # tokens after the nucleus is full
        logits = logits.scatter(0, order, ordered.masked_fill(cut, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@dataclass
class Generated:
    prompt: list[int]
    tokens: list[int]  # the new ones (an end token included where it stopped there)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")


@torch.no_grad()
def generate(model: Llama, prompt: Sequence[int], sampling: Sampling, stop: set[int] = frozenset()) -> Generated:
    """New tokens after ``prompt``: the prefill, then one token at a time against the KV cache."""
    if not prompt:
        raise ValueError("an empty prompt: give at least one token")
    device = model.rope_cos.device
    total = len(prompt) + sampling.max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"{len(prompt)} prompt tokens + max_new_tokens={sampling.max_new_tokens} exceed the model's"
            f" {model.cfg.max_seq_len} positions"
        )
    generator = torch.Generator().manual_seed(sampling.seed)
    cache = KVCache(total)
    start = time.perf_counter()
    logits = model(torch.tensor([list(prompt)], device=device), cache=cache)[0, -1]
    new: list[int] = []
    while True:
        token = _pick(logits.cpu(), sampling, generator)
        new.append(token)
        if token in stop or len(new) == sampling.max_new_tokens:
            break
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]
    return Generated(list(prompt), new, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# Tensor parallel: a model that does not fit one device


def _tensor_parallel_job(
    source: str, prompts: list[list[int]], sampling: Sampling, stop: set[int], device_type: str
) -> list[Generated]:
    """On each rank of a pool of tp: this rank's shards of the model (a Hugging Face directory's, read
    shard by shard; a checkpoint's, resharded by DCP), then the same generation as one process (the
    logits are gathered on every rank, so every rank picks the same tokens)."""
    tp = dist.get_world_size()
    device = torch.device(device_type, int(os.environ.get("LOCAL_RANK", 0))) if device_type == "cuda" else CPU
    ps = ParallelState(ParallelDims(tp, tp=tp), device_type)
    path = Path(source)
    if (path / files.MANIFEST_FILE).is_file():
        cfg = checkpoint_model_config(path)
    else:
        cfg = OmegaConf.structured(ModelConfig)
        cfg.merge_with(model_config(path))
    with torch.device("meta"):
        model = Llama(cfg)
    apply_tensor_parallel(model, ps.mesh["tp"], sequence_parallel=False, loss_parallel=False)
    if (path / files.MANIFEST_FILE).is_file():
        _load_checkpoint_shards(model, cfg, path, device)
    else:
        load_pretrained(model, device, path)
    model.eval()
    return [generate(model, prompt, sampling, stop) for prompt in prompts]


def _load_checkpoint_shards(model: Llama, cfg, path: Path, device: torch.device) -> None:
    """This rank's shards of a checkpoint's model, resharded by DCP. A LoRA run's adapters follow their
    layers' splits; a base its checkpoint left out is rebuilt as the run built it (``model.init_from``,
    read shard by shard, or drawn from the run's seed), then the saved tensors are read over it."""
    if cfg.lora is not None:
        apply_lora(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha)
    saved = reader(path).read_metadata().state_dict_metadata
    if all(MODEL_PREFIX + name in saved for name in get_model_state_dict(model)):
        model.to_empty(device=device)
        model.reset_buffers()
    else:  # a LoRA run's adapters alone: the base first, as the run built it
        seed = int((files.saved_config(path) or {}).get("seed", 0))
        materialize(model, device, seed, cfg.init_from, adapters=cfg.lora is not None)
    load_model(path, model)
    model.tie_weights()


def generate_tensor_parallel(
    source: str | Path, prompts: list[list[int]], sampling: Sampling, tp: int, stop: set[int] = frozenset()
) -> list[Generated]:
    """``generate`` for each prompt with the model split over ``tp`` local processes (tensor parallel)."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    with WorkerPool(tp, device_type) as pool:
        return pool.run(_tensor_parallel_job, str(source), prompts, sampling, set(stop), device_type)[0]
