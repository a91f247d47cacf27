"""PipelineSchedule: pipeline parallelism on ``torch.distributed.pipelining``.

The model is cut into stages, each held by one rank of the pipeline group, and a step's
micro-batches stream through them. Kinds (``kind=``):

================  =====================================  ==========  ====================================
kind              schedule (torch.distributed.pipelining)  stages/rank  bubble, P stages-ranks, M micro-batches
================  =====================================  ==========  ====================================
``gpipe``         ScheduleGPipe: all forwards, then all    1           (P-1)/(M+P-1); keeps M micro-batches'
                  backwards                                            activations
``1F1B``          Schedule1F1B: one forward, one backward  1           (P-1)/(M+P-1); at most P in flight
``interleaved``   ScheduleInterleaved1F1B                  v (looped)  (P-1)/(v*M+P-1)
``interleaved_zb``  ScheduleInterleavedZeroBubble          v (looped)  near zero: weight gradients fill it
``zbv``           ScheduleZBVZeroBubble                    2 (V)       near zero
``dualpipev``     ScheduleDualPipeV (DeepSeek's DualPipe)  2 (V)       near zero
================  =====================================  ==========  ====================================

Stage-to-rank maps: *looped* puts stage s on rank s mod P; *V-shaped* puts stages r and 2P-1-r on
rank r, so the first and the last stage share rank 0.

Gradient scaling, the known trap: the schedule calls the loss function once per micro-batch and
backpropagates each result. Here each micro-batch's loss is its *contribution* to the step's loss
(the default: summed token cross-entropy over the step's total token count), so the step's loss is
the sum of the micro-batch losses and its gradient needs no further factor: the schedules run with
``scale_grads=False`` and gradients equal those of one big batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from curry_train.layout.pipeline import (
    LOOPED,
    V_SHAPED,
    canonical_kind,
    check_microbatches,
    split_layers,
    stage_to_rank,
    stages_per_rank,
)
from curry_train.model.moe import uncounted

SCHEDULES = {  # layout.pipeline.SCHEDULE_KEYS: the names canonical_kind gives
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}


def pipeline_stages(
    model: nn.Module,
    kind: str,
    pp_size: int,
    pp_rank: int,
    virtual_stages: Optional[int] = None,
    layers_per_stage: Optional[Sequence[int]] = None,
) -> tuple[nn.Module, list[Optional[nn.Module]]]:
    """Cut ``model`` (one with a ``plan``, such as ``Llama``; on the meta device or not) into the
    stages of ``kind`` on ``pp_size`` ranks and keep this rank's.

    Returns ``(local, stages)``: ``local`` is ``model`` itself, pruned in place to the blocks,
    embedding, final norm and head this rank's stages hold, so parameter names are unchanged (a
    checkpoint of any layout loads into any other); ``stages`` lists every stage, None where another
    rank holds it, and for this rank's stages a module that runs its part: ``local`` itself when the
    rank holds one stage, else views sharing ``local``'s submodules (and buffers): apply tensor
    parallelism before (it may replace modules), FSDP and materialization after.
    """
    plan = model.plan
    per_rank = stages_per_rank(kind, virtual_stages)
    n_stages = pp_size * per_rank
    blocks = model.get_submodule(plan.blocks)
    names = list(blocks.keys())
    ranges = split_layers(len(names), n_stages, layers_per_stage)
    owner = stage_to_rank(kind, pp_size, n_stages)
    local_stages = [s for s in range(n_stages) if owner[s] == pp_rank]
    keep = {names[i] for s in local_stages for i in ranges[s]}
    for name in names:
        if name not in keep:
            del blocks[name]
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False) and owner[0] != owner[-1]:
        raise ValueError("tie_embeddings with pipeline parallelism: the embedding and the head are on different ranks")
    if 0 not in local_stages:
        setattr(model, plan.embedding, None)
    if n_stages - 1 not in local_stages:
        setattr(model, plan.final_norm, None)
        setattr(model, plan.head, None)
    stages: list[Optional[nn.Module]] = [None] * n_stages
    if len(local_stages) == 1:
        stages[local_stages[0]] = model
        return model, stages
    for s in local_stages:
        view = copy.copy(model)
        for key, value in list(vars(view).items()):  # own module, parameter and hook tables ...
            if isinstance(value, (dict, set)) and key not in ("_buffers", "_non_persistent_buffers_set"):
                vars(view)[key] = copy.copy(value)
        # ... but the buffers' table shared, so the views see the buffers materialization allocates.
        setattr(view, plan.blocks, type(blocks)({names[i]: blocks[names[i]] for i in ranges[s]}))
        if s != 0:
            setattr(view, plan.embedding, None)
        if s != n_stages - 1:
            setattr(view, plan.final_norm, None)
            setattr(view, plan.head, None)
        stages[s] = view
    return model, stages


def next_token_loss(total_tokens: int) -> Callable[[Tensor, Tensor], Tensor]:
    """A micro-batch's contribution to the step's mean next-token cross-entropy."""

    def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum") / total_tokens

    return loss_fn


def _plain(loss: Tensor) -> Tensor:
    """A loss as a plain tensor (under tensor parallelism's loss parallel it is a replicated DTensor)."""
    return loss.full_tensor() if hasattr(loss, "full_tensor") else loss


@dataclass
class PipelineResult:
    """What a step returns on every rank of the pipeline: the step's loss (the sum of the micro-batch
    contributions) and each micro-batch's contribution, sent from the rank holding the last stage."""

    loss: Tensor
    losses: Tensor
    stepped: bool


class _Stage(PipelineStage):
    """A ``PipelineStage`` whose metadata inference (a real forward of the first micro-batch, once)
    does not count towards the MoE routers' expert loads: the bias moves by the step's tokens only."""

    def _forward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
        with uncounted():
            return super()._forward_metadata_inference(*args, **kwargs)


class PipelineSchedule:
    """Runs a step's micro-batches through the pipeline (see the module docstring).

    ``stages``: every stage of the model in order, ``len(stages) == P * stages_per_rank(kind)``;
    each rank uses those ``stage_to_rank`` assigns it and ignores the others, which may be None.
    ``loss_fn(output, target)``: a micro-batch's contribution to the step's loss (default: next-token
    cross-entropy over the step's tokens, inputs ``mb[:, :-1]``, targets ``mb[:, 1:]``).
    ``optimizer``: stepped (and its gradients zeroed) at the end of ``train_step`` if given.
    """

    def __init__(
        self,
        kind: str = "1F1B",
        n_microbatches: int = 8,
        stages: Sequence[Optional[nn.Module]] = (),
        pp_group: Optional[dist.ProcessGroup] = None,
        *,
        loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        virtual_stages: Optional[int] = None,
        device: Optional[Union[torch.device, str]] = None,
    ) -> None:
        self.kind = canonical_kind(kind)
        self.group = pp_group if pp_group is not None else dist.group.WORLD
        self.pp_size = dist.get_world_size(self.group)
        self.pp_rank = dist.get_rank(self.group)
        self.n_stages = len(stages)
        per_rank = self.n_stages // self.pp_size if self.n_stages % self.pp_size == 0 else None
        expected = stages_per_rank(
            kind, virtual_stages if virtual_stages is not None else per_rank if self.kind in LOOPED else None
        )
        if self.n_stages != expected * self.pp_size:
            raise ValueError(
                f"schedule {kind} on {self.pp_size} pipeline ranks needs {expected * self.pp_size} stages "
                f"({expected} per rank), got {self.n_stages}"
            )
        check_microbatches(kind, n_microbatches, self.pp_size, self.n_stages)
        self.n_microbatches = n_microbatches
        self.stage_ranks = stage_to_rank(kind, self.pp_size, self.n_stages)
        self.local_indices = [s for s, r in enumerate(self.stage_ranks) if r == self.pp_rank]
        missing = [s for s in self.local_indices if stages[s] is None]
        if missing:
            raise ValueError(
                f"pipeline rank {self.pp_rank} holds stages {self.local_indices} but stages {missing} are None"
            )
        self.modules = [stages[s] for s in self.local_indices]
        if device is None:
            device = next((p.device for m in self.modules for p in m.parameters()), torch.device("cpu"))
        self.device = torch.device(device)
        self.pipeline_stages = [
            _Stage(stages[s], s, self.n_stages, self.device, group=self.group) for s in self.local_indices
        ]
        self.has_first = 0 in self.local_indices
        self.has_last = self.n_stages - 1 in self.local_indices
        self._user_loss = loss_fn
        self._loss: Callable[[Tensor, Tensor], Tensor] = loss_fn or next_token_loss(1)
        self.optimizer = optimizer
        schedule_cls = SCHEDULES[self.kind]
        multi = self.kind in LOOPED or self.kind in V_SHAPED
        self._schedule = schedule_cls(
            self.pipeline_stages if multi else self.pipeline_stages[0],
            n_microbatches=n_microbatches,
            loss_fn=lambda output, target: self._loss(output, target),
            scale_grads=False,
        )

    def parameters(self):
        """This rank's parameters (of its stages), for an optimizer."""
        seen = set()
        for module in self.modules:
            for param in module.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield param

    def _split(
        self, microbatches: Union[Tensor, Sequence[Tensor]], targets: Optional[Sequence[Tensor]]
    ) -> tuple[Tensor, Tensor]:
        if isinstance(microbatches, Tensor):
            microbatches = list(microbatches.tensor_split(self.n_microbatches))
        if len(microbatches) != self.n_microbatches:
            raise ValueError(f"{len(microbatches)} micro-batches given to a schedule built for {self.n_microbatches}")
        if len({tuple(mb.shape) for mb in microbatches}) != 1:
            raise ValueError(
                f"micro-batches of different shapes {[tuple(mb.shape) for mb in microbatches]}: the pipeline needs "
                "equal ones"
            )
        if targets is None:
            inputs = torch.cat([mb[:, :-1] for mb in microbatches])
            labels = torch.cat([mb[:, 1:] for mb in microbatches])
        else:
            inputs, labels = torch.cat(list(microbatches)), torch.cat(list(targets))
        return inputs.to(self.device), labels.to(self.device)

    def _run(self, run: Callable, microbatches, targets, loss_fn, documents=None) -> Tensor:
        inputs, labels = self._split(microbatches, targets)
        if self._user_loss is None:
            self._loss = next_token_loss(labels.numel())
        elif loss_fn is not None:
            self._loss = loss_fn
        losses: list[Tensor] = []
        args = (inputs,) if self.has_first else ()
        kwargs = {"target": labels, "losses": losses} if self.has_last else {}
        if documents is not None:  # keyword inputs reach every stage, cut into micro-batches like the inputs
            kwargs["documents"] = torch.cat(list(documents)).to(self.device)
        run(*args, **kwargs)
        per_microbatch = torch.zeros(self.n_microbatches, device=self.device)
        if self.has_last:
            per_microbatch = torch.stack([_plain(loss.detach()).float().reshape(()) for loss in losses]).to(self.device)
        # The loss is visible on every pipeline rank: sent from the one holding the last stage.
        dist.all_reduce(per_microbatch, group=self.group)
        return per_microbatch

    def train_step(
        self,
        microbatches: Union[Tensor, Sequence[Tensor]],
        targets: Optional[Sequence[Tensor]] = None,
        loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        documents: Optional[Sequence[Tensor]] = None,
    ) -> PipelineResult:
        """Forward and backward of every micro-batch through the pipeline, then the optimizer's step
        (if the schedule has one). ``microbatches``: a list of ``n_microbatches`` equal tensors, or one
        batch tensor split into that many. ``documents``: each micro-batch's document numbers (packed
        rows under a document mask), handed to every stage with its micro-batch."""
        losses = self._run(self._schedule.step, microbatches, targets, loss_fn, documents)
        stepped = self.optimizer is not None
        if stepped:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return PipelineResult(loss=losses.sum(), losses=losses, stepped=stepped)

    @torch.no_grad()
    def eval_step(
        self,
        microbatches: Union[Tensor, Sequence[Tensor]],
        targets: Optional[Sequence[Tensor]] = None,
        loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        documents: Optional[Sequence[Tensor]] = None,
    ) -> PipelineResult:
        """Forward only: the loss of every micro-batch, no gradients."""
        run = self._forward_only if self.kind in V_SHAPED else self._schedule.eval
        losses = self._run(run, microbatches, targets, loss_fn, documents)
        return PipelineResult(loss=losses.sum(), losses=losses, stepped=False)

    def _forward_only(
        self,
        *args: Tensor,
        target: Optional[Tensor] = None,
        losses: Optional[list] = None,
        documents: Optional[Tensor] = None,
    ) -> None:
        """Every micro-batch forward through the stages in order, each activation sent to the rank of
        the next stage (kept when that is this rank): the V-shaped kinds' evaluation. (torch's runtime
        for them still runs the backward's same-rank hand-offs of activation gradients when there is no
        backward, and fails.) Sequential: an evaluation is a small share of a run."""
        m = self.n_microbatches
        inputs = list(args[0].tensor_split(m)) if args else [None] * m
        targets = list(target.tensor_split(m)) if target is not None else [None] * m
        extras = [{"documents": d} for d in documents.tensor_split(m)] if documents is not None else [{}] * m
        modules = dict(zip(self.local_indices, self.modules, strict=True))
        for mb in range(m):
            x = inputs[mb]
            for s in self.local_indices:
                source = self.stage_ranks[s - 1] if s > 0 else self.pp_rank
                if source != self.pp_rank:
                    x = _receive(self.device, dist.get_global_rank(self.group, source), self.group)
                x = modules[s](x, **extras[mb])
                if s == self.n_stages - 1:
                    losses.append(self._loss(x, targets[mb]))
                    continue
                destination = self.stage_ranks[s + 1]
                if destination != self.pp_rank:
                    _send(x, dist.get_global_rank(self.group, destination), self.group)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _send(x: Tensor, dst: int, group: dist.ProcessGroup) -> None:
    """An activation and, first, its dtype and shape (a fixed-size header)."""
    header = torch.zeros(8, dtype=torch.int64, device=x.device)
    header[0], header[1] = _DTYPES.index(x.dtype), x.ndim
    header[2 : 2 + x.ndim] = torch.tensor(x.shape)
    dist.send(header, dst, group=group)
    dist.send(x.contiguous(), dst, group=group)


def _receive(device: torch.device, src: int, group: dist.ProcessGroup) -> Tensor:
    header = torch.empty(8, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    x = torch.empty(header[2 : 2 + ndim].tolist(), dtype=dtype, device=device)
    dist.recv(x, src, group=group)
    return x
