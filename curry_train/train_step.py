"""TrainStep: one optimizer step on this rank, whole, whatever the layout.

It owns everything a step does between a batch and the next: cutting this rank's batch into
micro-batches, the loss (and its chunked form), the sequence shard of context parallelism, the
pipeline schedule's inputs, the data-parallel gradient sync on the last micro-batch, the partial
gradients tensor parallelism leaves, the global gradient norm and clipping, skipping a step whose
gradients are not finite, the optimizer and schedule step, and the experts' balancing update. The
LightningModule only calls ``run`` and logs what it returns; the strategy builds it from the layout.

Loss normalization, the convention every layout relies on: a micro-batch's loss is its token
losses *summed* and divided by the token count of the whole global batch (``tokens_per_step``).
Summed over a rank's micro-batches and over the data-parallel ranks -- every reduction sums, none
averages -- that is exactly the mean token loss of the global batch, so gradient accumulation and
any data-parallel layout compute the gradient of one big batch.
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor.parallel import loss_parallel

from curry_train.config.schema import Config, ParallelConfig
from curry_train.data.chat import DOCUMENT_START, TARGET
from curry_train.model.documents import document_ids
from curry_train.model.moe import MoE
from curry_train.parallelize import ParallelModel
from curry_train.primitives.context_parallel import shard_sequence
from curry_train.primitives.data_parallel import gradient_sync
from curry_train.primitives.distributed_optimizer import ZeroOneModule
from curry_train.primitives.parallel_state import ParallelState
from curry_train.primitives.pipeline_schedule import PipelineSchedule
from curry_train.primitives.tp_linear import reduce_partial_gradients

log = logging.getLogger(__name__)


IGNORE_INDEX = -100  # a label the cross-entropy skips (torch's default ignore_index)


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """The summed next-token cross-entropy of ``logits`` (batch, seq, vocab) against ``labels``, in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def row_scores(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row (fp64, rows x 4): the summed log-probability of the labels not ignored, how many are the
    argmax, how many there are, and the sum of the argmax at them. Vocabulary- or sequence-sharded logits
    (tensor parallelism) are gathered first."""
    if hasattr(logits, "full_tensor"):
        logits = logits.full_tensor()
    logits = logits.float()
    scored = labels != IGNORE_INDEX
    picked = logits.log_softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    greedy = logits.argmax(-1)
    return torch.stack(
        [
            torch.where(scored, picked, 0.0).double().sum(-1),
            (scored & (greedy == labels)).double().sum(-1),
            scored.double().sum(-1),
            torch.where(scored, greedy, 0).double().sum(-1),
        ],
        dim=-1,
    )


def _plain(tensor: Tensor) -> Tensor:
    """A loss as a plain tensor (under loss parallelism it is a replicated DTensor)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class NonFiniteError(RuntimeError):
    """A step's gradient norm or loss is NaN or infinite: the run stops (exit status 3) before the
    value is applied, logged or saved as a finite one."""


@dataclass(frozen=True)
class StepSettings:
    """What a step needs to know of the run, besides its layout."""

    tokens_per_step: int  # global batch x sequence length: the loss's denominator
    micro_batch_size: int  # sequences per forward/backward on one rank
    grad_clip: float = 0.0  # clip the global gradient norm to this (0: measure only)
    skip_nonfinite_steps: int = 0  # steps with non-finite gradients skipped (not applied) before the run stops
    loss_chunks: int = 1  # > 1: the model computes the summed loss itself, its head over sequence chunks
    compile_loss: Optional[str] = None  # torch.compile the cross-entropy with this backend (None: eager)
    pipeline_microbatches: Optional[int] = None  # a pipelined run's micro-batches per step and rank
    mixture_of_experts: bool = False  # the model routes tokens to experts (some pipeline ranks may hold none)
    router_losses: bool = False  # its routers add losses (balancing=aux_loss, or a z-loss): reported
    document_separator: Optional[int] = None  # packed documents end with this token: masked apart (None: off)

    @classmethod
    def of(cls, cfg: Config, dp: int, separator: Optional[int] = None) -> StepSettings:
        """The settings of the run ``cfg`` on ``dp`` data-parallel ranks (``separator``: the data's document
        separator, for ``data.document_mask``)."""
        layout, moe, data = cfg.parallel, cfg.model.moe, cfg.data
        return cls(
            tokens_per_step=data.global_batch_size * data.seq_len,
            micro_batch_size=data.micro_batch_size,
            grad_clip=cfg.optim.grad_clip,
            skip_nonfinite_steps=cfg.trainer.skip_nonfinite_steps,
            loss_chunks=cfg.model.loss_chunks,
            compile_loss=cfg.compile.backend if cfg.compile.enabled and cfg.compile.loss else None,
            pipeline_microbatches=(
                layout.pipeline_microbatches(data.global_batch_size, data.micro_batch_size, dp)
                if layout.pp is not None
                else None
            ),
            mixture_of_experts=moe is not None,
            router_losses=moe is not None and (moe.balancing == "aux_loss" or moe.z_loss_coef > 0),
            document_separator=separator if data.document_mask else None,
        )


@dataclass
class StepResult:
    """What one step did on this rank: its loss (this rank's share, summed), the global gradient norm,
    the tokens this rank computed, and the experts' balance (MoE models). All tensors stay on the device:
    whether the step was applied is known to the host at the next ``TrainStep.settle``."""

    loss: Tensor
    grad_norm: Tensor
    tokens: float
    moe_metrics: dict[str, Tensor] = field(default_factory=dict)


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind Lightning's ``LightningOptimizer`` wrapper (or ``optimizer`` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def skips_on_device(optimizer: Any) -> bool:
    """The optimizer skips a step on the device when told (``found_inf``): torch's fused Adam/AdamW.
    Then a non-finite gradient norm needs no host read to keep the step from being applied."""
    return all(group.get("fused") for group in inner_optimizer(optimizer).param_groups)


class TrainStep:
    """The optimizer step of one layout on this rank (built by the strategy, run by the module)."""

    def __init__(
        self,
        parallel: ParallelModel,
        ps: ParallelState,
        layout: ParallelConfig,
        settings: StepSettings,
        backward: Callable[[Tensor], None],
        device: torch.device,
    ):
        self.model = parallel.model
        self.stages = parallel.stages
        self.parallel_state = ps
        self.layout = layout
        self.settings = settings
        self.backward = backward  # through Lightning's precision plugin (the strategy's backward)
        self.device = device
        self.skipped_steps = 0  # steps whose non-finite gradients were not applied (counted at each settle)
        self.skipped_since_log: list[int] = []  # those of them since the module last logged (take_skipped)
        # The gradient norms of the steps since the last settle (on the device) and their steps: the host reads
        # them with the logged metrics (``settle``), not at every step.
        self.unsettled_norms: list[Tensor] = []
        self.unsettled_steps: list[int] = []
        self.last_loss: Optional[Tensor] = None  # this rank's share of the step's loss, from its backward on
        self.last_grad_norm: Optional[Tensor] = None  # the global gradient norm (before clipping)
        # compile_loss: inductor fuses the fp32 upcast, log-softmax and gather (not under loss parallelism,
        # whose cross-entropy runs on vocabulary-sharded DTensors)
        compiled = settings.compile_loss is not None and not self.loss_parallel
        self.cross_entropy = (
            torch.compile(cross_entropy_sum, backend=settings.compile_loss) if compiled else cross_entropy_sum
        )
        # The loss's denominator: the global batch's tokens, or (rows with a target mask: chat data) the
        # global batch's target tokens, counted at the start of each step.
        self.denominator: float | Tensor = float(settings.tokens_per_step)
        self.moe_layers = [module for module in self.model.modules() if isinstance(module, MoE)]
        zero1 = [module for module in self.model.modules() if isinstance(module, ZeroOneModule)]
        # (trained ones only: a frozen shard that never changes need not be gathered again)
        trained = (p for module in zero1 for p in module.parameters() if p.requires_grad)
        self.zero1_shards = list({id(p): p for p in trained}.values())
        for layer in self.moe_layers:  # each forward's router losses weigh by its share of the step's tokens
            layer.aux_scale = 1.0 / settings.tokens_per_step

    # ------------------------------------------------------------------------------------------
    # What the module and the metrics need to know

    @cached_property
    def parameters(self) -> list[Tensor]:
        """This rank's parameters, listed once: walking the module tree at every step costs more host time
        than the rest of a small model's gradient norm (the layout is fixed once the step is built)."""
        return list(self.model.parameters())

    @property
    def pipelined(self) -> bool:
        return self.stages is not None

    @cached_property
    def metrics_group(self) -> dist.ProcessGroup:
        """Ranks that hold distinct tokens of a global batch: losses and token counts are summed over it."""
        return self.parallel_state.submesh("dp_cp").get_group()

    @cached_property
    def metrics_peers(self) -> Optional[dist.ProcessGroup]:
        """``metrics_group`` where it has more than one rank (None: this rank's sums are the global ones)."""
        if not dist.is_initialized():
            return None
        return self.metrics_group if dist.get_world_size(self.metrics_group) > 1 else None

    @property
    def token_fraction(self) -> float:
        """The share of each sample's tokens this rank computes (1 / cp)."""
        return 1.0 / self.layout.cp.size if self.layout.cp is not None else 1.0

    @property
    def loss_parallel(self) -> bool:
        return self.layout.tp is not None and self.layout.tp.loss_parallel

    def loss_context(self) -> AbstractContextManager:
        """Loss parallelism: the loss and its backward run on vocabulary-sharded logits."""
        return loss_parallel() if self.loss_parallel else nullcontext()

    def micro_batches(self, batch: Tensor) -> list[Tensor]:
        """This rank's batch, cut by ``data.micro_batch_size``."""
        return list(batch.split(self.settings.micro_batch_size))

    # ------------------------------------------------------------------------------------------
    # The step

    def run(self, batch: Tensor, optimizer: Any, scheduler: Any, step: int) -> StepResult:
        """One optimizer step on this rank's slice of the global batch ``step``: forward and backward,
        gradients reduced and clipped, then the optimizer (not for non-finite gradients, within
        ``skip_nonfinite_steps``; ``NonFiniteError`` past it), the LR schedule and the experts' balance."""
        if batch.ndim == 3:  # (rows, tokens | targets, seq + 1): the mean over the global batch's targets
            self.denominator = self._global_targets(batch)
        loss = self.forward_backward(self.micro_batches(batch))
        grad_norm = self.clip_grad_norm_(self.settings.grad_clip)
        # the step's values from here on (whitebox reads them in Lightning's optimizer hooks)
        self.last_loss, self.last_grad_norm = loss, grad_norm
        # The norm is global (reduced over every rank's gradients), so every rank takes the same decision; a
        # non-finite loss makes non-finite gradients, so it shows here too. No gradient, no update: the step
        # count and LR schedule go on.
        finite = torch.isfinite(grad_norm)
        self._tally(grad_norm, step)
        if skips_on_device(optimizer):  # the fused kernels skip the update (and their step count) on the device
            inner = inner_optimizer(optimizer)
            inner.found_inf = (~finite).to(torch.float32)
            try:
                optimizer.step()
            finally:
                inner.found_inf = None
            if self.zero1_shards:  # the fused kernels write without bumping version counters, which tell
                torch.autograd.graph.increment_version(self.zero1_shards)  # ZeRO-1 its shards changed
            applied: Any = finite
        else:  # an optimizer without it: one host read of one flag per step
            applied = bool(finite)
            if not applied:
                self.settle()  # stops the run here if no more skips are allowed
                optimizer.zero_grad(set_to_none=True)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        moe_metrics = self._balance_experts(applied)
        rows = batch[:, 0] if batch.ndim == 3 else batch
        tokens = rows[:, 1:].numel() * self.token_fraction  # context parallel: this rank's share
        return StepResult(loss, grad_norm, tokens, moe_metrics)

    def _tally(self, grad_norm: Tensor, step: int) -> None:
        """Keep the step's gradient norm (on the device) for the next settle: no work on the device."""
        self.unsettled_norms.append(grad_norm.detach())
        self.unsettled_steps.append(step)
        if len(self.unsettled_norms) > 256:  # a long log interval: one tensor instead of many
            self.unsettled_norms = [self.pending()]

    def pending(self) -> Optional[Tensor]:
        """The gradient norms of the steps since the last settle, one fp64 vector on the device (None: none)."""
        if not self.unsettled_norms:
            return None
        return torch.cat([norm.reshape(-1) for norm in self.unsettled_norms]).double()

    def settle(self, norms: Optional[list[float]] = None) -> int:
        """Count the steps skipped since the last settle -- those whose gradient norm was not finite
        (``norms``: ``pending()`` already read by the caller, with its other metrics in one host read; None:
        read here) -- and stop the run with ``NonFiniteError`` at the one past ``skip_nonfinite_steps``.
        Returns how many were skipped since the last."""
        if not self.unsettled_steps:
            return 0
        norms = self.pending().tolist() if norms is None else norms
        steps, self.unsettled_steps, self.unsettled_norms = self.unsettled_steps, [], []
        skipped = [(step, norm) for step, norm in zip(steps, norms, strict=True) if not math.isfinite(norm)]
        allowed = self.settings.skip_nonfinite_steps
        left = allowed - self.skipped_steps
        if len(skipped) > left:
            step, norm = skipped[left]
            raise NonFiniteError(
                f"non-finite gradient norm ({norm}) at step {step}: stopped before applying it"
                + (f" ({allowed} step(s) skipped before, trainer.skip_nonfinite_steps={allowed})" if allowed else "")
                + "; lower optim.lr or set optim.grad_clip, or skip such steps with trainer.skip_nonfinite_steps=N"
            )
        self.skipped_steps += len(skipped)
        self.skipped_since_log += [step for step, _ in skipped]
        return len(skipped)

    def take_skipped(self) -> list[int]:
        """The steps skipped since the last call, wherever they were settled (a logged step, a checkpoint's
        save, an optimizer without a device-side skip); the module logs and warns of them."""
        taken, self.skipped_since_log = self.skipped_since_log, []
        return taken

    def _global_targets(self, batch: Tensor) -> Tensor:
        """The labels of the global batch that are targets: this rank's, summed over the data-parallel
        ranks (its tensor, pipeline and context parallel peers hold the same rows). At least 1: a batch
        without a target adds nothing."""
        _, labels, _ = self.packed(batch)
        count = (labels != IGNORE_INDEX).sum().to(self.device, torch.float64)
        dist.all_reduce(count, group=self.parallel_state.get_dp_group())
        return count.clamp(min=1.0).float()  # on the device: the loss divides by it without a host read

    # ------------------------------------------------------------------------------------------
    # Forward and backward

    def token_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Summed next-token cross-entropy of ``logits`` over the step's denominator (the global batch's
        tokens, or its target tokens; a pipeline's last stage calls this on each micro-batch's output)."""
        return self.cross_entropy(logits, labels) / self.denominator

    def packed(self, batch: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Inputs, labels and (``data.document_mask``) each position's document, of rows of tokens
        (rows, seq + 1), or of rows with their target mask (rows, 2, seq + 1): chat data, whose labels
        outside the trained roles' turns are ignored. Under the document mask a separator's label (the
        next document's first token) is ignored: no document is asked to predict the next one. Ignored
        labels add nothing to the loss; its denominator is the same in every layout (``denominator``)."""
        tokens = batch[:, 0] if batch.ndim == 3 else batch
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        separator = self.settings.document_separator
        if batch.ndim == 3:  # the rows' flags say which labels are targets and where documents start
            flags = batch[:, 1]
            labels = labels.masked_fill((flags[:, 1:] & TARGET) == 0, IGNORE_INDEX)
            if separator is None:
                return inputs, labels, None
            starts = (flags[:, :-1] & DOCUMENT_START) != 0
            documents = torch.cumsum(starts.long(), dim=1)
            labels = labels.masked_fill((flags[:, 1:] & DOCUMENT_START) != 0, IGNORE_INDEX)
            return inputs, labels, documents - documents[:, :1]
        if separator is None:
            return inputs, labels, None
        return inputs, labels.masked_fill(inputs == separator, IGNORE_INDEX), document_ids(inputs, separator)

    def micro_batch_loss(self, tokens: Tensor) -> Tensor:
        """This micro-batch's share of the step's loss; under context parallelism from this rank's
        share of each sequence (the model knows its positions: ``Llama.positions``; the documents go
        whole)."""
        inputs, labels, documents = self.packed(tokens)
        if self.layout.cp is not None:
            inputs, labels = self._cp_shard(inputs), self._cp_shard(labels)
        extra = {} if documents is None else {"documents": documents}
        if self.settings.loss_chunks > 1:  # the model sums its chunks' cross-entropy itself
            return self.model(inputs, labels=labels, **extra) / self.denominator
        return self.token_loss(self.model(inputs, **extra), labels)

    def forward_backward(self, micro_batches: list[Tensor]) -> Tensor:
        """Forward and backward over this rank's micro-batches; returns their summed (detached) loss.
        Gradients are reduced over the data-parallel ranks once, in the last micro-batch's backward;
        those tensor parallelism left pending are summed last."""
        if self.pipelined:
            with self.loss_context():
                args, documents = self._pipeline_inputs(micro_batches)
                loss = self.schedule.train_step(*args, documents=documents).loss
        else:
            sync_each = self.layout.fsdp is not None and self.layout.fsdp.sync_each_microbatch
            loss = torch.zeros((), device=self.device)
            for index, batch in enumerate(micro_batches):
                with gradient_sync(self.model, last=index == len(micro_batches) - 1, sync_each_microbatch=sync_each):
                    with self.loss_context():
                        micro_loss = self.micro_batch_loss(batch)
                        self.backward(micro_loss)
                loss += _plain(micro_loss.detach())
        if self.layout.tp is not None:
            reduce_partial_gradients(self.parameters)
        return loss

    @torch.no_grad()
    def forward_eval(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """The summed cross-entropy of this rank's batch (in micro-batches), no gradients, and the labels
        it counts (not ignored; under context parallelism this rank's share of each row)."""
        micro_batches = self.micro_batches(batch)
        step_denominator, self.denominator = self.denominator, 1.0  # sums, not the step's mean
        try:
            if self.pipelined:
                with self.loss_context():
                    args, documents = self._pipeline_inputs(micro_batches)
                    loss = self.schedule.eval_step(*args, documents=documents).loss
            else:
                loss = torch.zeros((), device=self.device)
                for micro_batch in micro_batches:
                    with self.loss_context():
                        loss += _plain(self.micro_batch_loss(micro_batch))
        finally:
            self.denominator = step_denominator
        _, labels, _ = self.packed(batch)
        if self.layout.cp is not None:
            labels = self._cp_shard(labels)
        return loss, (labels != IGNORE_INDEX).sum().to(loss.device, torch.float64)

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode (no dropout, no expert loads counted) and no gradients; the modes as they were after."""
        modules = [self.model, *(stage for stage in self.stages or () if stage is not None)]
        modes = [module.training for module in modules]
        for module in modules:
            module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.train(mode)

    def score(self, batch: Tensor) -> Tensor:
        """Per row of this rank's ``batch`` (rows, 2, seq + 1: tokens and their flags, ``TARGET`` on the
        tokens scored), in fp64 (rows, 4): the summed log-probability of its target tokens, how many of
        them are the model's greedy pick, how many there are, and the sum of the greedy picks at them
        (a row with one target: the model's next token). Whole on every rank: summed over context
        parallelism's sequence shards, and sent from the pipeline's last stage. In eval mode, no gradients."""
        records: list[Tensor] = []
        with self.evaluating():
            if self.pipelined:  # the last stage hands each micro-batch's logits to the loss: recorded there
                original = self.cross_entropy

                def recording(logits: Tensor, labels: Tensor) -> Tensor:
                    records.append(row_scores(logits, labels))
                    return original(logits, labels)

                self.cross_entropy = recording
                try:
                    with self.loss_context():
                        args, documents = self._pipeline_inputs(self.micro_batches(batch))
                        self.schedule.eval_step(*args, documents=documents)
                finally:
                    self.cross_entropy = original
            else:
                for micro_batch in self.micro_batches(batch):
                    inputs, labels, documents = self.packed(micro_batch)
                    if self.layout.cp is not None:
                        inputs, labels = self._cp_shard(inputs), self._cp_shard(labels)
                    extra = {} if documents is None else {"documents": documents}
                    with self.loss_context():
                        records.append(row_scores(self.model(inputs, **extra), labels))
        scores = torch.cat(records) if records else torch.zeros(batch.shape[0], 4, dtype=torch.float64)
        scores = scores.to(self.device)
        if self.layout.cp is not None:
            dist.all_reduce(scores, group=self.parallel_state.get_cp_group())
        if self.pipelined:  # only the last stage recorded: the others add zeros
            dist.all_reduce(scores, group=self.parallel_state.get_pp_group())
        return scores

    @cached_property
    def schedule(self) -> PipelineSchedule:
        """The schedule of this rank's stages, built at the first step that needs it."""
        pp = self.layout.pp
        return PipelineSchedule(
            pp.schedule,
            self.settings.pipeline_microbatches,
            self.stages,
            self.parallel_state.get_pp_group(),
            loss_fn=self.token_loss,
            virtual_stages=pp.virtual_stages,
            device=self.device,
        )

    def _cp_shard(self, x: Tensor) -> Tensor:
        cp = self.layout.cp
        return shard_sequence(x, cp.size, self.parallel_state.cp_rank, cp.load_balance)

    def _pipeline_inputs(self, micro_batches: list[Tensor]) -> tuple[tuple, Optional[list[Tensor]]]:
        """What the schedule's step takes: whole micro-batches, or (context parallelism, or a document
        mask) this rank's shards of their inputs and labels; and each micro-batch's documents (whole),
        which travel with it to every stage. ``parallel.pp.microbatches`` cuts the rank's batch its own
        way (``data.micro_batch_size`` cuts it otherwise); the loss is over the global token count either way."""
        n = self.schedule.n_microbatches
        if len(micro_batches) != n:
            micro_batches = list(torch.cat(micro_batches).tensor_split(n))
        if self.layout.cp is None and self.settings.document_separator is None and micro_batches[0].ndim == 2:
            return (micro_batches,), None
        inputs, labels, documents = zip(*(self.packed(mb) for mb in micro_batches), strict=True)
        if self.layout.cp is not None:
            inputs, labels = [self._cp_shard(x) for x in inputs], [self._cp_shard(y) for y in labels]
        return (list(inputs), list(labels)), None if documents[0] is None else list(documents)

    # ------------------------------------------------------------------------------------------
    # The gradient norm

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip to ``max_norm`` (0: measure only); returns the global gradient norm before clipping."""
        params = [p for p in self.parameters if p.grad is not None]
        max_norm = max_norm if max_norm > 0 else float("inf")
        groups: dict[Any, list[Tensor]] = {}  # torch's foreach kernels take one kind of tensor at a time
        for param in params:
            groups.setdefault(getattr(param.grad, "device_mesh", None), []).append(param.grad)
        pipelined = self.pipelined and self.parallel_state.dims.pp_enabled
        if len(groups) == 1 and not pipelined:
            return _plain(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        # Tensor parallelism without FSDP: DTensor gradients beside plain (replicated) ones; and
        # pipeline stages: each rank holds some parameters, the norm is over all of them.
        norms = [_plain(torch.nn.utils.get_total_norm(grads, foreach=True)) for grads in groups.values()]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=self.device)
        if pipelined:
            squared = norm.double().square()
            dist.all_reduce(squared, group=self.parallel_state.get_pp_group())
            norm = squared.sqrt().float()
        if max_norm < float("inf"):  # torch's clip coefficient, on the device (no host read of the norm)
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for grads in groups.values():
                torch._foreach_mul_(grads, scale)
        return norm

    # ------------------------------------------------------------------------------------------
    # Mixture of experts

    def _balance_experts(self, applied: bool | Tensor) -> dict[str, Tensor]:
        """After the optimizer step: the step's expert loads, summed over the ranks that hold distinct
        tokens (one all-reduce for every MoE layer), move each router's bias (not for a skipped step);
        the worst layer's max/mean load and the routers' losses are returned for the metrics."""
        if not self.settings.mixture_of_experts:
            return {}
        loads = torch.stack([layer.router.expert_load for layer in self.moe_layers]) if self.moe_layers else None
        aux = sum(layer.aux_loss_sum.float() for layer in self.moe_layers if layer.aux_loss_sum is not None)
        aux = torch.as_tensor(aux, dtype=torch.float32, device=self.device).view(1)
        imbalance = torch.zeros((), device=self.device)
        if loads is not None:  # a pipeline rank whose stages are all dense has none
            packed = torch.cat([loads.flatten(), aux])
            if self.metrics_peers is not None:
                dist.all_reduce(packed, group=self.metrics_peers)
            loads, aux = packed[:-1].view_as(loads), packed[-1:]
            for layer, load in zip(self.moe_layers, loads, strict=True):
                layer.router.apply_load(load, applied)
                layer.aux_loss_sum = None
            imbalance = (loads.max(1).values / loads.mean(1)).max()
        if self.pipelined and self.parallel_state.dims.pp_enabled:
            # each pipeline rank holds some of the layers: the worst of all, the losses of all
            pp = self.parallel_state.get_pp_group()
            dist.all_reduce(imbalance, op=dist.ReduceOp.MAX, group=pp)
            dist.all_reduce(aux, group=pp)
        metrics = {"train/moe_load_imbalance": imbalance}
        if self.settings.router_losses:
            metrics["train/moe_aux_loss"] = aux[0]
        return metrics
