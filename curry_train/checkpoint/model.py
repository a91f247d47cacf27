"""A checkpoint's whole model in one process, whatever layout wrote it: its tensors, and, for a LoRA run
saved without its frozen base (``checkpoint.save_base=false``), the base rebuilt as the run built it:
read from ``model.init_from``, or drawn from the run's seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from curry_train.checkpoint.dcp import consolidated_model_state
from curry_train.checkpoint.files import saved_config
from curry_train.checkpoint.hf_config import PretrainedError
from curry_train.checkpoint.hf_load import load_pretrained
from curry_train.model.config import ModelConfig
from curry_train.model.llama import Llama
from curry_train.primitives.lora import apply_lora, is_adapter
from curry_train.primitives.materialize import materialize_and_init


def checkpoint_model_config(checkpoint: str | Path) -> Any:
    """The model config a curry-train checkpoint was saved with, typed (``ModelConfig``'s defaults filled)."""
    saved = saved_config(checkpoint)
    if not saved or "model" not in saved:
        raise PretrainedError(f"{checkpoint}: saved without its run's config; the Hugging Face config needs it")
    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with(saved["model"])
    return cfg


def checkpoint_model(checkpoint: str | Path, device: torch.device) -> Llama:
    """The model ``checkpoint`` holds (eval mode), on ``device``."""
    cfg = checkpoint_model_config(checkpoint)
    with torch.device("meta"):
        model = Llama(cfg)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha)
    state = consolidated_model_state(checkpoint)
    base = [name for name, _ in model.named_parameters() if not is_adapter(name)]
    if all(name in state for name in base):
        model.to_empty(device=device)
        model.reset_buffers()  # the RoPE tables; the saved buffers (routing biases) load below
    elif cfg.init_from:
        load_pretrained(model, device, cfg.init_from)
    else:
        materialize_and_init(model, device, int((saved_config(checkpoint) or {}).get("seed", 0)))
    model.load_state_dict({name: tensor.to(device) for name, tensor in state.items()}, strict=False)
    model.tie_weights()
    return model.eval()


def checkpoint_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's model by name, the rebuilt base's too (on the CPU)."""
    cfg = checkpoint_model_config(checkpoint)
    state = consolidated_model_state(checkpoint)
    if cfg.lora is None:
        return state
    return {
        name: tensor.detach() for name, tensor in checkpoint_model(checkpoint, torch.device("cpu")).state_dict().items()
    }
