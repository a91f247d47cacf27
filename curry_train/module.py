"""The Lightning pieces: the LightningModule (next-token loss, the optimizer and its schedule, metrics;
no parallelism here) and the LightningDataModule that feeds it this rank's slice of each global batch.

Loss normalization: every micro-batch's loss is its token losses *summed* and divided by the
number of tokens in the whole global batch (``global_batch_size * seq_len``); see
``curry_train.train_step`` for why every layout then computes one big batch's gradient.

The model is built on the meta device (``configure_model``); the strategy parallelizes it and hands
back this rank's part with the step mechanics of the layout (``attach``), which ``training_step``
drives. Metrics (torchmetrics ``SumMetric``) are summed over the step's ``metrics_group``: the ranks
that hold distinct tokens. Ranks that hold the same tokens (tensor-parallel peers) are not in it,
so nothing is counted twice.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.aggregation import SumMetric

from curry_train.data import DataConfig, GlobalBatchSampler, PackedSequences, load_streams, split_streams
from curry_train.model import Llama
from curry_train.moe import MoE
from curry_train.train_step import TrainStep

log = logging.getLogger(__name__)


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """The summed next-token cross-entropy of ``logits`` (batch, seq, vocab) against ``labels``, in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


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


class NonFiniteError(RuntimeError):
    """A step's gradient norm or loss is NaN or infinite: the run stops (exit status 3) before the
    value is applied, logged or saved as a finite one."""


class CausalLM(pl.LightningModule):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.automatic_optimization = False  # TrainStep drives micro-batches (and, with pipelines, the schedule)
        self.model: Optional[nn.Module] = None
        self.step: Optional[TrainStep] = None  # the layout's step mechanics, from the strategy (attach)
        self.tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        self._last_log_time: Optional[float] = None
        self._steps_since_log = 0
        self.skipped_steps = 0  # steps whose non-finite gradients were not applied (trainer.skip_nonfinite_steps)
        self._skipped_since_log = 0
        self.moe_layers: list[MoE] = []
        self.moe_metrics: dict[str, Tensor] = {}
        # compile.loss: inductor fuses the fp32 upcast, log-softmax and gather (not under loss parallelism,
        # whose cross-entropy runs on vocabulary-sharded DTensors)
        c, tp = cfg.get("compile"), cfg.parallel.get("tp")
        loss_parallel = tp is not None and tp.get("loss_parallel", False)
        compiled = c is not None and c.enabled and c.loss and not loss_parallel
        self.cross_entropy = torch.compile(cross_entropy_sum, backend=c.backend) if compiled else cross_entropy_sum

    # ------------------------------------------------------------------------------------------
    # Model and loss

    def configure_model(self) -> None:
        if self.model is None:  # built under the strategy's meta-device context
            self.model = Llama(self.cfg.model)
            self.num_parameters = self.model.num_parameters()  # of the whole model, before any layout splits it

    def attach(self, model: nn.Module, step: TrainStep) -> None:
        """Take this rank's part of the parallelized model and the step that runs it (the strategy's
        setup calls this; metrics are summed over the ranks that hold distinct tokens)."""
        self.model, self.step = model, step
        # nan_strategy="disable": a NaN is summed as a NaN, never dropped (which would log 0 as the loss).
        group, nan = step.metrics_group, "disable"
        self.train_loss = SumMetric(process_group=group, sync_on_compute=True, nan_strategy=nan)
        self.train_tokens = SumMetric(process_group=group, sync_on_compute=True, nan_strategy=nan)
        self.val_loss = SumMetric(process_group=group, sync_on_compute=True, nan_strategy=nan)
        self.val_tokens = SumMetric(process_group=group, sync_on_compute=True, nan_strategy=nan)
        self.moe_layers = [module for module in model.modules() if isinstance(module, MoE)]
        for layer in self.moe_layers:  # each forward's router losses weigh by its share of the step's tokens
            layer.aux_scale = 1.0 / self.tokens_per_step

    def micro_batches(self, batch: Tensor) -> list[Tensor]:
        return list(batch.split(self.cfg.data.micro_batch_size))

    def token_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Summed next-token cross-entropy of ``logits`` over the global batch's token count (a
        pipeline's last stage calls this on each micro-batch's output)."""
        return self.scale_loss(self.cross_entropy(logits, labels))

    def scale_loss(self, loss_sum: Tensor) -> Tensor:
        """A micro-batch's summed cross-entropy as its share of the step's loss (model.loss_chunks > 1: the
        model sums it over its chunks)."""
        return loss_sum / self.tokens_per_step

    # ------------------------------------------------------------------------------------------
    # Optimizer

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
        scheduler = self.lr_schedulers()
        loss = self.step.forward_backward(self.micro_batches(batch))
        grad_norm = self.step.clip_grad_norm_(self.cfg.optim.grad_clip)
        self.last_step_loss, self.last_grad_norm = loss, grad_norm  # read by validation.whitebox
        lr = optimizer.param_groups[0]["lr"]
        # One host read of one flag. The norm is global (reduced over every rank's gradients), so every
        # rank takes the same decision; a non-finite loss makes non-finite gradients, so it shows here too.
        applied = bool(torch.isfinite(grad_norm))
        if not applied:
            self._skip_step(grad_norm)
            optimizer.zero_grad(set_to_none=True)  # no gradient, no update: the step count and LR schedule go on
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self._balance_experts(applied)

        self.train_loss.update(loss)
        tokens = batch[:, 1:].numel() * self.step.token_fraction  # context parallel: this rank's share
        self.train_tokens.update(torch.tensor(tokens, dtype=torch.float64, device=loss.device))
        self._steps_since_log += 1
        if self.trainer.global_step % self.cfg.trainer.log_every_n_steps == 0:
            self._log_train(grad_norm, lr)

    def _balance_experts(self, applied: bool) -> None:
        """After the optimizer step: the step's expert loads, summed over the ranks that hold distinct
        tokens (one all-reduce for every MoE layer), move each router's bias (not for a skipped step);
        the worst layer's max/mean load and the routers' losses are kept for the metrics."""
        moe = self.cfg.model.moe
        if moe is None:
            return
        device = self.step.device
        loads = torch.stack([layer.router.expert_load for layer in self.moe_layers]) if self.moe_layers else None
        aux = sum(layer.aux_loss_sum.float() for layer in self.moe_layers if layer.aux_loss_sum is not None)
        aux = torch.as_tensor(aux, dtype=torch.float32, device=device).view(1)
        imbalance = torch.zeros((), device=device)
        if loads is not None:  # a pipeline rank whose stages are all dense has none
            packed = torch.cat([loads.flatten(), aux])
            group = self.step.metrics_group
            if dist.is_initialized() and dist.get_world_size(group) > 1:
                dist.all_reduce(packed, group=group)
            loads, aux = packed[:-1].view_as(loads), packed[-1:]
            for layer, load in zip(self.moe_layers, loads, strict=True):
                layer.router.apply_load(load if applied else None)
                layer.aux_loss_sum = None
            imbalance = (loads.max(1).values / loads.mean(1)).max()
        if self.step.pipelined and self.step.parallel_state.mesh["pp"].size() > 1:
            # each pipeline rank holds some of the layers: the worst of all, the losses of all
            pp = self.step.parallel_state.get_pp_group()
            dist.all_reduce(imbalance, op=dist.ReduceOp.MAX, group=pp)
            dist.all_reduce(aux, group=pp)
        self.moe_metrics = {"train/moe_load_imbalance": imbalance}
        if moe.balancing == "aux_loss" or moe.z_loss_coef:
            self.moe_metrics["train/moe_aux_loss"] = aux[0]

    def _skip_step(self, grad_norm: Tensor) -> None:
        """Skip a step with non-finite gradients, within ``trainer.skip_nonfinite_steps``; else stop."""
        allowed = self.cfg.trainer.skip_nonfinite_steps
        step = self.trainer.global_step
        if self.skipped_steps >= allowed:
            raise NonFiniteError(
                f"non-finite gradient norm ({float(grad_norm)}) at step {step}: stopped before applying it"
                + (
                    f" ({self.skipped_steps} step(s) skipped before, trainer.skip_nonfinite_steps={allowed})"
                    if allowed
                    else ""
                )
                + "; lower optim.lr or set optim.grad_clip, or skip such steps with trainer.skip_nonfinite_steps=N"
            )
        self.skipped_steps += 1
        self._skipped_since_log += 1  # its loss, logged as it is (NaN), is no reason to stop
        if self.trainer.is_global_zero:
            log.warning(
                "step %d: non-finite gradient norm (%s), step skipped (%d of %d allowed)",
                step,
                float(grad_norm),
                self.skipped_steps,
                allowed,
            )

    def _log_train(self, grad_norm: Tensor, lr: float) -> None:
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
        metrics = {"train/loss": loss, "train/ppl": loss.exp(), "train/grad_norm": grad_norm, "train/lr": lr}
        metrics.update(self.moe_metrics)  # MoE models: the last step's expert balance
        if self.skipped_steps:  # a column only in runs that skipped a step: each row the count so far
            metrics["train/skipped_steps"] = self.skipped_steps
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
        loss = self.step.forward_eval(self.micro_batches(batch))
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
