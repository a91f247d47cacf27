"""The Lightning pieces: the LightningModule (the model, the optimizer and its schedule, Lightning's
hooks and the metrics they log; no parallelism and no collective here) and the LightningDataModule that
feeds it this rank's slice of each global batch.

The model is built on the meta device (``configure_model``); the strategy parallelizes it and hands
over the layout's step (``attach``: ``curry_train.train_step.TrainStep``, which owns the whole optimizer
step, its loss and every reduction), which ``training_step`` runs. Metrics are summed over the step's
``metrics_group``: the ranks that hold distinct tokens. Ranks that hold the same tokens (tensor-parallel
peers) are not in it, so nothing is counted twice.

Host reads. Between logged steps (``trainer.log_every_n_steps``) the loop reads nothing from the device:
the loss accumulates there, and a step with a non-finite gradient norm is skipped there (``TrainStep``).
At a logged step every metric -- the summed loss and tokens (one all-reduce), the gradient norm, the
skipped steps, the experts' balance -- comes to the host in one read, and goes to the loggers as Python
numbers. Lightning's ``self.log`` would read each logged tensor from the device on its own (a
synchronization each), so training metrics bypass it: they go to ``self.loggers`` directly, into
``trainer.callback_metrics`` (for callbacks that monitor them) and to the progress bar (``progress``).
Validation, which is not the steady state, logs through ``self.log`` (torchmetrics ``SumMetric``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
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


def fused_supported(params: list[Tensor]) -> bool:
    """Whether torch's fused AdamW takes ``params``: one kernel per device and dtype for the whole update, and
    a step skipped on the device (``found_inf``) without the host reading the gradient norm. On CPU and CUDA,
    floating point."""
    devices = torch.utils._foreach_utils._get_fused_kernels_supported_devices()
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


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


@dataclass
class LogInterval:
    """This rank's steps since the last logged step (a plain object: a module attribute set at every step
    would go through ``nn.Module.__setattr__``)."""

    loss_sum: Optional[Tensor] = None  # their summed losses, on the device
    tokens: float = 0.0
    steps: int = 0


class CausalLM(pl.LightningModule):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.automatic_optimization = False  # TrainStep drives micro-batches (and, with pipelines, the schedule)
        self.model: Optional[nn.Module] = None
        self.step: Optional[TrainStep] = None  # the layout's step, from the strategy (attach)
        self._last_log_time: Optional[float] = None
        self.interval = LogInterval()
        self.log_every_n_steps = cfg.trainer.log_every_n_steps  # read at every step: not through the config
        self.max_steps = cfg.trainer.max_steps
        self.moe_metrics: dict[str, Tensor] = {}
        self.progress: dict[str, float] = {}  # the progress bar's training metrics (StepProgressBar)
        self.last_step: Optional[tuple[StepResult, float]] = None  # the last step's result and learning rate

    # Attributes set during training that are never a parameter, buffer or submodule: Lightning names the
    # running hook twice at each hook call (~30 times a step), the logged steps reset their interval. They skip
    # nn.Module's checks, a few microseconds each.
    _PLAIN = frozenset({"_current_fx_name", "_last_log_time", "interval", "progress", "moe_metrics", "last_step"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._PLAIN:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

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
        self.val_sums: dict[int, tuple[SumMetric, SumMetric]] = {}

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.cfg.optim
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:  # LoRA: frozen weights get no optimizer state
                (decay if param.ndim >= 2 else no_decay).append(param)
        # The fused (and foreach) kernels take a group's tensors in one call, which DTensor refuses when plain
        # tensors and DTensors, or DTensors of different meshes, are mixed (a MoE model under tensor
        # parallelism: its attention sharded, its experts whole). Such a layout steps tensor by tensor, and
        # reads the gradient norm's finiteness at every step; the two groups stay as they are in every layout,
        # so a checkpoint's optimizer and schedule resume under any other.
        mixed = any(len({getattr(p, "device_mesh", None) for p in group}) > 1 for group in (decay, no_decay))
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            fused=fused_supported(decay + no_decay) and not mixed,
            foreach=False if mixed else None,
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
        if result.moe_metrics:
            self.moe_metrics = result.moe_metrics
        loss = result.loss.detach().double()  # a NaN is summed as a NaN, never dropped
        interval = self.interval
        interval.loss_sum = loss if interval.loss_sum is None else interval.loss_sum + loss
        interval.tokens += result.tokens
        interval.steps += 1
        self.last_step = (result, lr)
        step = self.trainer.global_step  # steps done, this one included
        if step % self.log_every_n_steps == 0 or step == self.max_steps:  # a short run still has its row
            self._log_train(result, lr)

    def settle(self) -> None:
        """Count (or stop at) the steps skipped since the last logged step; before a checkpoint is saved
        between logged steps. A host read: not in the steady state. The next logged step warns of them."""
        if self.step is not None:
            self.step.settle()

    def _warn_skipped(self, steps: list[int]) -> None:
        if steps and self.trainer.is_global_zero:  # its loss, logged as it is (NaN), is no reason to stop
            log.warning(
                "non-finite gradient norm at step(s) %s: step skipped (%d of %d allowed so far)",
                ", ".join(map(str, steps)),
                self.step.skipped_steps,
                self.cfg.trainer.skip_nonfinite_steps,
            )

    def _read_train_metrics(self, result: StepResult) -> tuple[float, float, float, list[int], dict[str, float]]:
        """The logged step's one host read: the loss and tokens summed since the last logged step over the
        ranks that hold distinct tokens (one all-reduce), the gradient norm, the skipped steps (settled
        here: ``NonFiniteError`` past ``trainer.skip_nonfinite_steps``) and the experts' balance."""
        device = result.loss.device
        interval = self.interval
        group = self.step.metrics_peers
        if group is not None:
            sums = torch.stack([interval.loss_sum, torch.tensor(interval.tokens, dtype=torch.float64, device=device)])
            dist.all_reduce(sums, group=group)
        else:  # one rank holds all the tokens: its count is the host's
            sums = interval.loss_sum.view(1)
        pending = self.step.pending()
        norms = 0 if pending is None else pending.numel()
        moe = list(self.moe_metrics.items())
        parts = [sums, result.grad_norm.detach().double().view(1), *(v.double().view(1) for _, v in moe)]
        values = torch.cat([part.to(device) for part in [*parts, *([pending] if norms else [])]]).tolist()
        if group is None:
            values.insert(1, interval.tokens)
        loss_sum, tokens, grad_norm = values[:3]
        self.step.settle(values[len(values) - norms :])
        skipped = self.step.take_skipped()  # settled here or earlier in the interval (a save, no fused optimizer)
        self._warn_skipped(skipped)
        named = zip((name for name, _ in moe), values[3 : 3 + len(moe)], strict=True)
        return loss_sum, tokens, grad_norm, skipped, dict(named)

    def _log_train(self, result: StepResult, lr: float) -> None:
        now = time.perf_counter()
        loss_sum, tokens, grad_norm, skipped, moe = self._read_train_metrics(result)
        loss = loss_sum / self.interval.steps
        if not skipped and not math.isfinite(loss):  # reduced over the ranks with distinct tokens: all agree
            raise NonFiniteError(
                f"non-finite loss ({loss}) at step {self.trainer.global_step - 1}: stopped before logging"
                " or saving it; lower optim.lr or set optim.grad_clip"
            )
        ppl = math.inf if loss >= 700 else math.exp(loss)  # NaN stays NaN
        metrics = {"train/loss": loss, "train/ppl": ppl, "train/grad_norm": grad_norm, "train/lr": lr}
        metrics.update(moe)  # MoE models: the last step's expert balance
        datamodule = self.trainer.datamodule
        if len(getattr(datamodule, "names", ())) > 1:  # a mixture: the tokens each source has served so far
            metrics.update({f"train/tokens/{name}": n for name, n in datamodule.served_tokens().items()})
        if self.step.skipped_steps:  # a column only in runs that skipped a step: each row the count so far
            metrics["train/skipped_steps"] = self.step.skipped_steps
        if self._last_log_time is not None:
            metrics["train/tokens_per_s"] = tokens / (now - self._last_log_time)
        self._last_log_time, self.interval = now, LogInterval()
        self._to_loggers(metrics)
        self.progress = {"loss": loss}
        if "train/tokens_per_s" in metrics:
            self.progress["tokens/s"] = metrics["train/tokens_per_s"]

    def _to_loggers(self, metrics: dict[str, float]) -> None:
        """``metrics`` (Python numbers) to every logger at this step, as Lightning's logging would write
        them (with the epoch), and into ``trainer.callback_metrics`` as host tensors. Each logger writes to
        disk at its own pace (the run's metrics.csv: every logged step, ``run.make_loggers``)."""
        rows = {name: float(value) for name, value in metrics.items()}
        self.trainer.callback_metrics.update({name: torch.tensor(value) for name, value in rows.items()})
        rows.setdefault("epoch", self.current_epoch)
        for logger in self.loggers:
            logger.log_metrics(rows, step=self.trainer.global_step - 1)

    def on_train_end(self) -> None:
        if self.interval.steps and self.last_step is not None:  # stopped early (preemption, data exhausted)
            self._log_train(*self.last_step)  # the steps since the last row: their row, at the last of them
        self.settle()  # the steps after the last logged one: a non-finite one past the allowance stops the run
        if self.step is not None:
            self._warn_skipped(self.step.take_skipped())  # no logged step comes after them

    def on_train_epoch_start(self) -> None:
        self._last_log_time, self.interval = time.perf_counter(), LogInterval()

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
