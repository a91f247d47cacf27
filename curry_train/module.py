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
from torch.utils.data import DataLoader
from torchmetrics.aggregation import SumMetric

from curry_train.config.schema import Config
from curry_train.data.config import DataConfig
from curry_train.data.loader import TrainBatches, ValBatches
from curry_train.data.mixture import Mixture, served_tokens
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
        self.val_sums: dict[int, tuple[SumMetric, SumMetric]] = {}

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.cfg.optim
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:  # LoRA: frozen weights get no optimizer state
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
        datamodule = self.trainer.datamodule
        if len(getattr(datamodule, "names", ())) > 1:  # a mixture: the tokens each source has served so far
            metrics.update({f"train/tokens/{name}": n for name, n in datamodule.served_tokens().items()})
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

    def on_train_epoch_end(self) -> None:
        # The training loader is endless unless a source ran out under data.exhausted=stop.
        if self.trainer.global_step < self.trainer.max_steps and not self.trainer.should_stop:
            if self.trainer.is_global_zero:
                log.warning(
                    "data: a source has served all its rows (data.exhausted=stop); training ends at step %d of %d",
                    self.trainer.global_step,
                    self.trainer.max_steps,
                )
            self.trainer.should_stop = True

    def validation_step(self, batch: Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        loss, labels = self.step.forward_eval(batch)  # summed over the labels this rank counts
        loss_sum, token_sum = self._val_sums(dataloader_idx, loss.device)
        loss_sum.update(loss)
        token_sum.update(labels)

    def _val_sums(self, index: int, device: torch.device) -> tuple[SumMetric, SumMetric]:
        """The sums of validation loader ``index`` (one per source that holds rows out)."""
        if index not in self.val_sums:
            group = self.step.metrics_group
            self.val_sums[index] = tuple(
                SumMetric(process_group=group, sync_on_compute=True, nan_strategy="disable").to(device)
                for _ in range(2)
            )
        return self.val_sums[index]

    def on_validation_epoch_end(self) -> None:
        datamodule = self.trainer.datamodule
        names = getattr(datamodule, "val_sources", [])
        metrics, total_loss, total_tokens = {}, 0.0, 0.0
        for index in sorted(self.val_sums):  # every rank ran the same loaders: the sums sync in one order
            loss_sum, token_sum = self.val_sums[index]
            loss, tokens = loss_sum.compute(), token_sum.compute()
            loss_sum.reset()
            token_sum.reset()
            if tokens > 0:
                total_loss, total_tokens = total_loss + loss, total_tokens + tokens
                if len(getattr(datamodule, "names", ())) > 1:
                    metrics[f"val/{names[index]}/loss"] = (loss / tokens).float()
        if total_tokens > 0:
            loss = (total_loss / total_tokens).float()
            self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True)
            if metrics:
                self.log_dict(metrics)
        self._last_log_time = time.perf_counter()  # validation time is not training throughput


class LMDataModule(pl.LightningDataModule):
    """Train and validation loaders whose batches are this rank's slice of a global batch of the mixture.

    Each training batch is a ``(global_batch_size / dp, seq_len + 1)`` tensor of token ids; the training
    step cuts it into micro-batches. Data-parallel rank and size come from the strategy
    (``trainer.distributed_sampler_kwargs``), which takes them from the data-parallel sub-mesh, so
    ranks that hold the same batch (tensor, pipeline or context parallel peers) read the same data.

    The loader state (``data/mixture.py``) is the position after the last batch training took: it is in
    every checkpoint (``state_dict``, under this class's name) and a resumed run starts there, on any
    number of ranks. Validation: one loader per source that holds rows out.
    """

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.mixture: Optional[Mixture] = None
        self.vocab_size: Optional[int] = None
        self.resumed: Optional[dict[str, Any]] = None  # the state a checkpoint handed over
        self.state: Optional[dict[str, Any]] = None  # after the last batch training took
        self.val_sources: list[str] = []  # the sources of the validation loaders, in order

    def setup(self, stage: str) -> None:
        if self.mixture is None:
            self.mixture = Mixture(self.cfg, self.seed)
            self.vocab_size = self.mixture.vocab_size

    @property
    def names(self) -> list[str]:
        return self.mixture.names

    @property
    def separator(self) -> Optional[int]:
        """The token that ends each document of every source (for ``data.document_mask``)."""
        return self.mixture.separator

    def state_dict(self) -> dict[str, Any]:
        state = self.state if self.state is not None else self.resumed
        return {"mixture": state} if state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resumed = state_dict["mixture"]

    def served_tokens(self) -> dict[str, int]:
        """Training tokens each source has served, over the whole run (resumed ones included)."""
        return served_tokens(self.state, self.cfg.seq_len) if self.state is not None else {}

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, (tuple, list)):
            return batch  # a validation batch
        tokens, state = batch
        before = self.state["sources"] if self.state is not None else {}
        for name, source in state["sources"].items():
            if name in before and source["epoch"] > before[name]["epoch"]:
                log.info("data: source %s has served all its rows; epoch %d of it starts", name, source["epoch"])
        self.state = state
        return tokens

    def _dp(self) -> tuple[int, int]:
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not kwargs:
            return 0, 1
        return kwargs["rank"], kwargs["num_replicas"]

    def _start(self) -> dict[str, Any]:
        if self.resumed is not None:
            return self.resumed
        steps = self.trainer.global_step if self.trainer is not None else 0
        if steps:
            log.warning("data: the checkpoint holds no loader state (an older run's); reading past %d steps", steps)
        return self.mixture.state_after(steps)

    def train_dataloader(self) -> DataLoader:
        rank, size = self._dp()
        self.state = self._start()
        return DataLoader(
            TrainBatches(self.mixture, self.state, rank, size),
            batch_size=None,
            num_workers=self.cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> list[DataLoader]:
        rank, size = self._dp()
        limit = self.trainer.limit_val_batches if self.trainer is not None else None
        if self.cfg.val_fraction <= 0 or limit == 0:
            self.val_sources = []
            return []
        loaders, self.val_sources = [], []
        for index, name in enumerate(self.mixture.names):
            if not self.mixture.holds_out(index):
                continue
            loaders.append(
                DataLoader(
                    ValBatches(self.mixture, index, rank, size, limit if isinstance(limit, int) else None),
                    batch_size=None,
                    num_workers=self.cfg.num_workers,
                    pin_memory=torch.cuda.is_available(),
                    persistent_workers=self.cfg.num_workers > 0,
                )
            )
            self.val_sources.append(name)
        return loaders
