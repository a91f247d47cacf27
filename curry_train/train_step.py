"""One optimizer step's mechanics on this rank, whatever the layout: micro-batches, the sequence
shard of context parallelism, the pipeline schedule's inputs, the global gradient norm.

Loss normalization, the convention every layout relies on: a micro-batch's loss is its token
losses *summed* and divided by the token count of the whole global batch (``CausalLM.token_loss``).
Summed over a rank's micro-batches and over the data-parallel ranks -- every reduction sums, none
averages -- that is exactly the mean token loss of the global batch, so gradient accumulation and
any data-parallel layout compute the gradient of one big batch.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import cached_property
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor.parallel import loss_parallel

from curry_train.config.schema import ParallelConfig
from curry_train.parallelize import ParallelModel
from curry_train.primitives.context_parallel import shard_sequence
from curry_train.primitives.data_parallel import gradient_sync
from curry_train.primitives.parallel_state import ParallelState
from curry_train.primitives.pipeline_schedule import PipelineSchedule
from curry_train.primitives.tp_linear import reduce_partial_gradients

TokenLoss = Callable[[Tensor, Tensor], Tensor]  # (logits, labels) -> this micro-batch's share of the step's loss


def _plain(tensor: Tensor) -> Tensor:
    """A loss as a plain tensor (under loss parallelism it is a replicated DTensor)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class TrainStep:
    """Forward, backward and the gradient norm of a step for one layout (built by the strategy)."""

    def __init__(
        self,
        parallel: ParallelModel,
        ps: ParallelState,
        layout: ParallelConfig,
        token_loss: TokenLoss,
        backward: Callable[[Tensor], None],
        device: torch.device,
        pipeline_microbatches: Optional[int] = None,
        scale_loss: Optional[Callable[[Tensor], Tensor]] = None,
    ):
        self.model = parallel.model
        self.stages = parallel.stages
        self.parallel_state = ps
        self.layout = layout
        self.token_loss = token_loss
        self.backward = backward  # the LightningModule's manual_backward: through the precision plugin
        self.device = device
        self.pipeline_microbatches = pipeline_microbatches
        # model.loss_chunks > 1: the model computes the summed loss itself (its head over sequence chunks),
        # and this turns that sum into the micro-batch's share of the step's loss
        self.scale_loss = scale_loss

    # ------------------------------------------------------------------------------------------
    # What the module and the metrics need to know

    @property
    def pipelined(self) -> bool:
        return self.stages is not None

    @property
    def metrics_group(self) -> dist.ProcessGroup:
        """Ranks that hold distinct tokens of a global batch: losses and token counts are summed over it."""
        return self.parallel_state.submesh("dp_cp").get_group()

    @property
    def token_fraction(self) -> float:
        """The share of each sample's tokens this rank computes (1 / cp)."""
        return 1.0 / self.layout.cp.size if self.layout.cp is not None else 1.0

    def loss_context(self) -> AbstractContextManager:
        """Loss parallelism: the loss and its backward run on vocabulary-sharded logits."""
        return loss_parallel() if self.layout.tp is not None and self.layout.tp.loss_parallel else nullcontext()

    # ------------------------------------------------------------------------------------------
    # Forward and backward

    def micro_batch_loss(self, tokens: Tensor) -> Tensor:
        """This micro-batch's share of the step's loss; under context parallelism from this rank's
        share of each sequence (the model knows its positions: ``Llama.positions``)."""
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        if self.layout.cp is not None:
            inputs, labels = self._cp_shard(inputs), self._cp_shard(labels)
        if self.scale_loss is not None:
            return self.scale_loss(self.model(inputs, labels=labels))
        return self.token_loss(self.model(inputs), labels)

    def forward_backward(self, micro_batches: list[Tensor]) -> Tensor:
        """Forward and backward over this rank's micro-batches; returns their summed (detached) loss.
        Gradients are reduced over the data-parallel ranks once, in the last micro-batch's backward;
        those tensor parallelism left pending are summed last."""
        if self.pipelined:
            with self.loss_context():
                loss = self.schedule.train_step(*self._pipeline_inputs(micro_batches)).loss
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
            reduce_partial_gradients(self.model.parameters())
        return loss

    @torch.no_grad()
    def forward_eval(self, micro_batches: list[Tensor]) -> Tensor:
        """The summed loss of this rank's micro-batches, no gradients."""
        if self.pipelined:
            with self.loss_context():
                return self.schedule.eval_step(*self._pipeline_inputs(micro_batches)).loss
        loss = torch.zeros((), device=self.device)
        for batch in micro_batches:
            with self.loss_context():
                loss += _plain(self.micro_batch_loss(batch))
        return loss

    @cached_property
    def schedule(self) -> PipelineSchedule:
        """The schedule of this rank's stages, built at the first step that needs it."""
        pp = self.layout.pp
        return PipelineSchedule(
            pp.schedule,
            self.pipeline_microbatches,
            self.stages,
            self.parallel_state.get_pp_group(),
            loss_fn=self.token_loss,
            virtual_stages=pp.virtual_stages,
            device=self.device,
        )

    def _cp_shard(self, x: Tensor) -> Tensor:
        cp = self.layout.cp
        return shard_sequence(x, cp.size, self.parallel_state.cp_rank, cp.load_balance)

    def _pipeline_inputs(self, micro_batches: list[Tensor]) -> tuple:
        """What the schedule's step takes: whole micro-batches, or with context parallelism this
        rank's shards of their inputs and labels. ``parallel.pp.microbatches`` cuts the rank's batch
        its own way (the module cuts it by ``data.micro_batch_size``); the loss is over the global
        token count either way."""
        n = self.schedule.n_microbatches
        if len(micro_batches) != n:
            micro_batches = list(torch.cat(micro_batches).tensor_split(n))
        if self.layout.cp is None:
            return (micro_batches,)
        return [self._cp_shard(mb[:, :-1]) for mb in micro_batches], [self._cp_shard(mb[:, 1:]) for mb in micro_batches]

    # ------------------------------------------------------------------------------------------
    # The gradient norm

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip to ``max_norm`` (0: measure only); returns the global gradient norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = max_norm if max_norm > 0 else float("inf")
        groups: dict[Any, list[Tensor]] = {}  # torch's foreach kernels take one kind of tensor at a time
        for param in params:
            groups.setdefault(getattr(param.grad, "device_mesh", None), []).append(param.grad)
        pipelined = self.pipelined and self.parallel_state.mesh["pp"].size() > 1
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
        scale = min(1.0, max_norm / (float(norm) + 1e-6))  # torch's clip coefficient
        if scale < 1.0:
            for grads in groups.values():
                torch._foreach_mul_(grads, scale)
        return norm
