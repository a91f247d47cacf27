"""The Lightning pieces: the LightningModule (the model, the optimizer and its schedule, Lightning's
hooks and the metrics they log; no parallelism and no collective here) and the LightningDataModule that
feeds it this rank's slice of each global batch.

The model is built on the meta device (``configure_model``); the strategy parallelizes it and hands
over the layout's step (``attach``: ``curry_train.train_step.TrainStep``, which owns the whole optimizer
step, its loss and every reduction), which ``training_step`` runs. Metrics (torchmetrics ``SumMetric``)
are summed over the step's ``metrics_group``: the ranks that hold distinct tokens. Ranks that hold the
same tokens (tensor-parallel peers) are not in it, so nothing is counted twice.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.aggregation import SumMetric

from curry_train.config.schema import Config
from curry_train.data.config import DataConfig
from curry_train.data.loader import GlobalBatchSampler, PackedSequences, split_streams
from curry_train.data.sources import load_streams
from curry_train.model.llama import Llama
from curry_train.train_step import NonFiniteError, StepResult, TrainStep

log = logging.getLogger(__name__)


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warmup, then the decay ``schedule``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLM(pl.LightningModule):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.automatic_optimization = False  # TrainStep drives micro-batches (and, with pipelines, the schedule)
        self.model: Optional[nn.Module] = None
        self.step: Optional[TrainStep] = None  # the layout's step, from the strategy (attach)
        self._last_log_time: Optional[float] = None
        self._steps_since_log = 0
        self._skipped_since_log = 0
        self.moe_metrics: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------------------
    # Model and optimizer

    def configure_model(self) -> None:
        if self.model is None:  # built under the strategy's meta-device context
            self.model = Llama(self.cfg.model)
            self.num_parameters = self.model.num_parameters()  # of the whole model, before any layout splits it

    def attach(self, step: TrainStep) -> None:
        """Take the layout's step and this rank's part of the parallelized model it runs (the strategy's
        setup calls this; metrics are summed over the ranks that hold distinct tokens)."""
        self.model, self.step = step.model, step
        # nan_strategy="disable": a NaN is summed as a NaN, never dropped (which would log 0 as the loss).
        group, nan = step.metrics_group, "disable"
        self.train_loss = SumMetric(process_group=group, sync_on_compute=True, nan_strategy=nan)
        self.train_tokens = SumMetric(process_group=group, sync_on_compute=True, nan_strategy=nan)
        self.val_loss = SumMetric(process_group=group, sync_on_compute=True, nan_strategy=nan)
        self.val_tokens = SumMetric(process_group=group, sync_on_compute=True, nan_strategy=nan)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.data.global_batch_size * self.cfg.data.seq_len

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.cfg.optim
        decay, no_decay = [], []
        for param in self.model.parameters():
            (decay if param.ndim >= 2 else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
        )
        total = self.cfg.trainer.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, o.warmup_steps, total, o.schedule, o.min_lr / o.lr)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------
    # Steps

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        optimizer = self.optimizers()
        lr = optimizer.param_groups[0]["lr"]
        result = self.step.run(batch, optimizer, self.lr_schedulers(), self.trainer.global_step)
        if result.skipped:
            self._skipped_since_log += 1  # its loss, logged as it is (NaN), is no reason to stop
            if self.trainer.is_global_zero:
                log.warning(
                    "step %d: non-finite gradient norm (%s), step skipped (%d of %d allowed)",
                    self.trainer.global_step - 1,
                    float(result.grad_norm),
                    self.step.skipped_steps,
                    self.cfg.trainer.skip_nonfinite_steps,
                )
        self.moe_metrics = result.moe_metrics
        self.train_loss.update(result.loss)
        self.train_tokens.update(torch.tensor(result.tokens, dtype=torch.float64, device=result.loss.device))
        self._steps_since_log += 1
        if self.trainer.global_step % self.cfg.trainer.log_every_n_steps == 0:
            self._log_train(result, lr)

    def _log_train(self, result: StepResult, lr: float) -> None:
        now = time.perf_counter()
        loss = self.train_loss.compute() / self._steps_since_log
        skipped, self._skipped_since_log = self._skipped_since_log, 0
        if not skipped and not bool(torch.isfinite(loss)):  # reduced over the ranks with distinct tokens: all agree
            raise NonFiniteError(
                f"non-finite loss ({float(loss)}) at step {self.trainer.global_step - 1}: stopped before logging"
                " or saving it; lower optim.lr or set optim.grad_clip"
            )
        tokens = self.train_tokens.compute()
        self.train_loss.reset()
        self.train_tokens.reset()
        metrics = {"train/loss": loss, "train/ppl": loss.exp(), "train/grad_norm": result.grad_norm, "train/lr": lr}
        metrics.update(self.moe_metrics)  # MoE models: the last step's expert balance
        if self.step.skipped_steps:  # a column only in runs that skipped a step: each row the count so far
            metrics["train/skipped_steps"] = self.step.skipped_steps
        if self._last_log_time is not None:
            metrics["train/tokens_per_s"] = tokens / (now - self._last_log_time)
        self._last_log_time, self._steps_since_log = now, 0
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()}, prog_bar=False)
        self.log("loss", loss.float(), prog_bar=True, logger=False)
        if "train/tokens_per_s" in metrics:
            self.log("tokens/s", float(metrics["train/tokens_per_s"]), prog_bar=True, logger=False)

    def on_train_epoch_start(self) -> None:
        self._last_log_time, self._steps_since_log = time.perf_counter(), 0

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        loss = self.step.forward_eval(batch)
        self.val_loss.update(loss * self.tokens_per_step)  # back to a plain sum of token losses
        tokens = batch[:, 1:].numel() * self.step.token_fraction
        self.val_tokens.update(torch.tensor(tokens, dtype=torch.float64, device=loss.device))

    def on_validation_epoch_end(self) -> None:
        tokens = self.val_tokens.compute()
        if tokens > 0:
            loss = (self.val_loss.compute() / tokens).float()
            self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True)
        self.val_loss.reset()
        self.val_tokens.reset()
        self._last_log_time = time.perf_counter()  # validation time is not training throughput


class LMDataModule(pl.LightningDataModule):
    """Train and validation loaders whose batches are this rank's slice of a global batch.

    Each batch is a ``(global_batch_size / dp, seq_len + 1)`` tensor of token ids; the training step
    cuts it into micro-batches. Data-parallel rank and size come from the strategy
    (``trainer.distributed_sampler_kwargs``), which takes them from the data-parallel sub-mesh, so
    ranks that hold the same batch (tensor, pipeline or context parallel peers) read the same data.
    """

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.train_set: Optional[PackedSequences] = None
        self.val_set: Optional[PackedSequences] = None
        self.vocab_size: Optional[int] = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        streams, self.vocab_size = load_streams(self.cfg)
        train, val = split_streams(streams, self.cfg.val_fraction)
        self.train_set = PackedSequences(train, self.cfg.seq_len, self.vocab_size)
        self.val_set = PackedSequences(val, self.cfg.seq_len, self.vocab_size)

    def _dp(self) -> tuple[int, int]:
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not kwargs:
            return 0, 1
        return kwargs["rank"], kwargs["num_replicas"]

    def _loader(self, dataset: Dataset, sampler: GlobalBatchSampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=torch.stack,
            num_workers=self.cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        rank, size = self._dp()
        trainer = self.trainer
        sampler = GlobalBatchSampler(
            len(self.train_set),
            self.cfg.global_batch_size,
            rank,
            size,
            self.seed,
            start_step=(lambda: trainer.global_step) if trainer is not None else (lambda: 0),
        )
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader | list:
        rank, size = self._dp()
        batches = len(self.val_set) // self.cfg.global_batch_size
        if self.trainer is not None and isinstance(self.trainer.limit_val_batches, int):
            batches = min(batches, self.trainer.limit_val_batches)
        if batches == 0:  # validation off, or a held-out tail shorter than one global batch
            return []
        sampler = GlobalBatchSampler(
            len(self.val_set), self.cfg.global_batch_size, rank, size, self.seed, shuffle=False, num_steps=batches
        )
        return self._loader(self.val_set, sampler)
