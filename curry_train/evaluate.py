"""``curry-eval``'s body: a checkpoint or a Hugging Face model in a layout, evaluated on the run's sets and
lm-eval tasks by the same code as evaluation during training (``evaluation.callback.Evaluator``).

The config: a checkpoint's run's model, seed, tokenizer, batch and ``eval`` section (so a bare
``curry-eval CKPT`` evaluates what its run evaluated), or ``model.init_from=DIR`` for a Hugging Face
directory; the user's overrides (``parallel=...``, ``trainer.devices=N``, ``eval.*``) on top. Each rank of
a pool of ``trainer.devices`` local processes builds its part of the model (``evaluation.live``) and runs
the evaluator; the first rank's results come back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from curry_train.checkpoint import files
from curry_train.config import ConfigError, compose
from curry_train.config.schema import Config
from curry_train.evaluation.callback import Evaluator
from curry_train.evaluation.live import live_step
from curry_train.layout.dims import ParallelDims
from curry_train.pool import WorkerPool

# What a checkpoint's run fixes about its evaluation: the model, how text became tokens and rows, its seed
_RUN_DATA_KEYS = (
    "tokenizer",
    "seq_len",
    "global_batch_size",
    "micro_batch_size",
    "format",
    "chat_template",
    "train_roles",
    "document_mask",
)


def is_checkpoint(source: Path) -> bool:
    return (source / files.MANIFEST_FILE).is_file()


def eval_config(source: Path, overrides: Sequence[str]) -> DictConfig:
    """The config that evaluates ``source`` (a checkpoint or a Hugging Face directory) with ``overrides``."""
    overrides = list(overrides)
    given = {o.lstrip("+").split("=", 1)[0] for o in overrides}
    if not is_checkpoint(source):
        extra = [f"model.init_from={source}"] if "model.init_from" not in given else []
        extra += [f"data.tokenizer={source}"] if "data.tokenizer" not in given else []
        return compose([*overrides, *extra])
    saved = files.saved_config(source)
    if not saved or "model" not in saved:
        raise ConfigError(f"{source}: saved without its run's config, so its model is unknown")
    cfg = compose(overrides)
    cfg.model = OmegaConf.merge(cfg.model, saved["model"])
    cfg.seed = saved.get("seed", cfg.seed)
    for key in _RUN_DATA_KEYS:
        if f"data.{key}" not in given and key in saved.get("data", {}):
            cfg.data[key] = saved["data"][key]
    if not any(key == "eval" or key.startswith("eval.") for key in given) and "eval" in saved:
        cfg.eval = OmegaConf.merge(cfg.eval, saved["eval"])
    return cfg


def _evaluate_job(container: dict, dims: ParallelDims, checkpoint: Optional[str], device_type: str) -> dict:
    """On each rank of the pool: its part of the model, then every set and task."""
    cfg = Config.of(container)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device_type, local) if device_type == "cuda" else torch.device("cpu")
    step = live_step(cfg, dims, device, checkpoint)
    return Evaluator(cfg).run(step)


def evaluate(
    cfg: DictConfig, dims: ParallelDims, accelerator: str, checkpoint: Optional[Path], pools: Any = None
) -> dict[str, float]:
    """``eval/...`` metrics of ``cfg``'s model (``checkpoint``'s tensors over it) in ``cfg.parallel``: one
    process runs in this one; more in a pool of local processes (``pools``: a ``pool.Pools`` to reuse)."""
    args = (OmegaConf.to_container(cfg, resolve=True), dims, str(checkpoint) if checkpoint else None, accelerator)
    if pools is not None:
        return pools.run(dims.world_size, _evaluate_job, *args, accelerator=accelerator)[0]
    with WorkerPool(dims.world_size, accelerator, inline=dims.world_size == 1) as pool:
        return pool.run(_evaluate_job, *args)[0]
