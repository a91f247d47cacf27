"""Memory accounting: the bytes each rank holds for the model's state, and its peak activation memory.

Why: the point of sharded data parallelism is memory, so a layout's memory is a result to check,
like its gradients (``whitebox``). Model state is compared with ZeRO's formulas
(``planning.memory.zero_formula_bytes``); activation memory shows what ``parallel.recompute`` saves.

What is measured, per rank, by ``layout_memory.measure_layouts`` (each layout run through the real
training path in as many local processes as it asks for, ``MEASURED_STEP`` optimizer steps):

* model state at the optimizer step (``model_state_bytes``, read in ``on_before_optimizer_step``
  of step ``MEASURED_STEP``): the moment parameters, final gradients and AdamW's state all exist
  (AdamW creates its state in the first step; gradients are set to None after each step);
* model state at the end of the first forward of that step (all of a ``reshard_after_forward=False``
  layout's units are then still gathered);
* peak activation memory of one forward+backward of one micro-batch through the parallelized model,
  with the module's own loss (``peak_memory``), run just before that step (not for a pipelined
  layout: a stage cannot run a micro-batch alone; ``activations`` and ``peak`` are then None);
* with ``timed_steps``, the clock at the end of that step and of the ``timed_steps`` steps after it
  (``step_ends``): the steady-state throughput of the layout, undisturbed by the measurements;
* with ``count_comm``, the collectives of one whole training step (``comm``: calls, elements and
  bytes per collective, ``validation.comm.CommCounter``), in one more step after the timed ones (a
  dispatch mode runs Python for every op, so the counted step is not timed), and for DDP the bytes
  of its gradient buckets (``ddp_bucket_bytes``).

Step 3, not 2: DistributedDataParallel rebuilds its gradient buckets in the forward of the second
iteration, and those allocations would be counted as activations.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from curry_train.model.llama import Llama
from curry_train.primitives.materialize import materialize_and_init
from curry_train.primitives.recompute import apply_recompute

MEASURED_STEP = 3


def count_text(value: Optional[int]) -> str:
    """A byte or parameter count for a table: thousands separated, ``-`` where nothing was measured."""
    return f"{value:,}" if value is not None else "-"


# ----------------------------------------------------------------------------------------------
# Model state


def _add_storages(tensors: Iterable[Optional[torch.Tensor]], seen: set[int]) -> int:
    """Bytes of the storages behind ``tensors`` not already in ``seen`` (local shards of DTensors).

    Storages, not tensors: DDP's gradients are views into its buckets, FSDP2's sharded gradients
    views into one reduce-scatter output per unit and its parameters views into padded shards, tied
    weights are one tensor; a freed storage (a resharded unit's gathered parameters) has no bytes.
    """
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        storage = (tensor.to_local() if isinstance(tensor, DTensor) else tensor).untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _compute_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Parameters held besides the registered ones: ZeRO-1's full values (``ZeroOneModule``)."""
    compute_parameters = getattr(model, "compute_parameters", None)
    return list(compute_parameters()) if compute_parameters is not None else []


def model_state_bytes(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state (keys params, grads,
    optimizer, total), each storage counted once.

    Parameters are those the module exposes and those the optimizers update: the same tensors at
    rest, but while an FSDP2 unit is gathered the module exposes the gathered parameters and the
    optimizer still holds the sharded ones, and the rank holds both. Optimizer state is every tensor
    in ``optimizer.state`` (AdamW: ``exp_avg``, ``exp_avg_sq`` and a 4-byte ``step`` per parameter).
    ZeRO-1 (``sharding="optimizer"``) also holds each parameter's full value, counted here (in fp32
    the shards are views into it). What no tensor references is not counted: DDP's gradient buckets
    while gradients are None.
    """
    params = list(model.parameters()) + [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    params += _compute_parameters(model)
    seen: set[int] = set()
    state = {
        "params": _add_storages(params, seen),
        "grads": _add_storages((p.grad for p in params), seen),
        "optimizer": _add_storages(
            (v for opt in optimizers for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)),
            seen,
        ),
    }
    state["total"] = sum(state.values())
    return state


# ----------------------------------------------------------------------------------------------
# Activations


class _ActivationPeak:
    """Mixed into PyTorch's memory trackers: the most bytes the activation category held at any
    moment, and the most the activations and backward's temporaries (the gradients of activations,
    ``TEMP``) held together. The trackers keep only the breakdown at the moment the *total* peaked,
    whose parts depend on what else (gathered parameters, gradients) happened to be alive then."""

    activation_peak = 0
    transient_peak = 0

    def _update_peak_stats(self, peak_state: Any) -> None:  # called by the tracker after every op
        super()._update_peak_stats(peak_state)
        for snapshot in self._curr_mem_snap.values():
            activations = snapshot[self._ref_class.ACT]
            self.activation_peak = max(self.activation_peak, activations)
            self.transient_peak = max(self.transient_peak, activations + snapshot[self._ref_class.TEMP])


class _Tracker(_ActivationPeak, MemTracker):
    pass


class _FSDPTracker(_ActivationPeak, FSDPMemTracker):
    pass


def peak_memory(
    model: nn.Module,
    forward_backward: Callable[[], None],
    optimizers: Sequence[torch.optim.Optimizer] = (),
    inputs: Sequence[torch.Tensor] = (),
) -> tuple[int, int, dict[str, int]]:
    """Run ``forward_backward`` under PyTorch's memory tracker (``torch.distributed._tools``; it
    follows tensor storages through the dispatcher, so it works on CPU as on GPU). Returns the peak
    activation bytes, the peak of activations and backward's temporaries together (what a device
    holds besides the model state: in the loss's backward, the log-probabilities beside their
    gradient and the logits'), and, by category, the bytes held when the tracked total peaked.

    Activations are the tensors made in forward (and again by recompute in backward), so what
    ``parallel.recompute`` trades away; gradients of activations in backward are ``TEMP``. An FSDP2
    model gets FSDP's tracker, which books gathered parameters and collective buffers under their own
    categories instead of as activations. ``inputs`` (the data) are booked as such: a micro-batch is
    a view of the rank's whole batch, whose storage would otherwise count as an activation.
    """
    if isinstance(model, FSDPModule):
        tracker: MemTracker = _FSDPTracker(model, optimizers[0] if optimizers else None)
        tracker.track_inputs(tuple(inputs))
    else:
        tracker = _Tracker()
        tracker.track_external(model, *optimizers, *inputs, *_compute_parameters(model))
    with tracker:
        forward_backward()
    (peak,) = tracker.get_tracker_snapshot("peak").values()  # one device per rank
    categories = {str(getattr(key, "name", key)): value for key, value in peak.items()}
    return tracker.activation_peak, tracker.transient_peak, categories


def bare_model_activation_bytes(
    model_cfg: DictConfig, recompute: str, every_n_blocks: int, tokens: torch.Tensor, keep_matmuls: str = "all"
) -> int:
    """Peak activation bytes of one forward+backward (of ``logits.sum()``) of a bare ``Llama`` on the
    CPU with ``recompute`` applied to its blocks: recompute's effect without trainer or layout."""

    with torch.device("meta"):
        model = Llama(model_cfg)
    materialize_and_init(model, torch.device("cpu"), 0)
    apply_recompute(list(model.get_submodule(model.plan.blocks).values()), recompute, every_n_blocks, keep_matmuls)
    activations, _, _ = peak_memory(model, lambda: model(tokens).sum().backward(), inputs=[tokens])
    return activations
