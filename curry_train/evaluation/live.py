"""A run's model in its layout, without a Trainer: for evaluating a checkpoint or a Hugging Face model
(``curry-eval``) through the same ``parallelize`` and ``TrainStep`` as training."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from curry_train.checkpoint.dcp import load_model
from curry_train.config.schema import Config
from curry_train.layout.dims import ParallelDims
from curry_train.model.llama import Llama
from curry_train.parallelize import parallelize
from curry_train.primitives.parallel_state import ParallelState
from curry_train.train_step import StepSettings, TrainStep


def _no_backward(loss: Tensor) -> None:
    raise RuntimeError("an evaluation step has no backward")


def live_step(
    cfg: Config,
    dims: ParallelDims,
    device: torch.device,
    checkpoint: Optional[str | Path] = None,
    separator: Optional[int] = None,
) -> TrainStep:
    """This rank's part of ``cfg``'s model in ``cfg.parallel`` (on the initialized process group), drawn from
    the seed or read from ``model.init_from``, then (``checkpoint``) the checkpoint's model tensors over it,
    resharded to this layout; wrapped in the layout's step (eval only: no optimizer)."""
    ps = ParallelState(dims, device.type)
    with torch.device("meta"):
        model = Llama(cfg.model)
    parallel = parallelize(
        model,
        ps,
        cfg.parallel,
        device=device,
        seed=cfg.seed,
        seq_len=cfg.data.seq_len,
        init_from=cfg.model.init_from,
        lora=cfg.model.lora,
    )
    if checkpoint is not None:
        load_model(checkpoint, parallel.model)
    settings = StepSettings.of(cfg, dims.dp, separator)
    return TrainStep(parallel, ps, cfg.parallel, settings, _no_backward, device)
