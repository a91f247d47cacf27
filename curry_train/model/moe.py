"""Mixture of experts: a token-choice top-k router, stacked experts, and the layer that joins them.

* ``TopKRouter``: scores each token against every expert (softmax or sigmoid of a linear gate, in
  fp32), picks its top-k, and weighs the picked experts' outputs by their scores (optionally
  renormalized over the k). Balancing, one of ``BALANCING``:

  - ``aux_free`` (DeepSeek-V3; Wang et al., 2024): a per-expert bias is added to the scores for the
    choice only (the weights stay the scores), and after each optimizer step it moves by
    ``bias_update_rate * sign(mean load - load)``: overloaded experts get picked less. The loads are
    counted over the step's micro-batches and summed over the ranks that hold distinct tokens, so
    every rank applies the same update.
  - ``aux_loss`` (Switch / GShard): ``coef * E * sum_e f_e P_e``, f_e the fraction of the picks that
    went to expert e and P_e its mean score, added to the training loss.
  - ``none``.

  A z-loss (``z_loss_coef * mean(logsumexp(logits)^2)``, ST-MoE) keeps the gate's logits small.

* ``Experts``: E SwiGLU experts as stacked weights ``(E, hidden, dim)``; tokens arrive sorted by
  expert with a count per expert. In fp32 (and on any device) each expert runs as its own matmuls,
  exactly; in bf16 on CUDA one grouped GEMM (``torch._grouped_mm``) runs them all.

* ``MoE``: route, sort the (token, expert) picks by expert, run the experts (through a dispatcher,
  which expert parallelism replaces with one that sends the tokens to their experts' ranks), weigh,
  add each token's k outputs back in place, plus the shared experts' output. ``capacity_factor``
  (null: dropless) caps each expert at ``ceil(factor * tokens * k / E)`` picks, in token order;
  the picks beyond it are dropped (the token keeps its other experts and the residual).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from curry_train.options import BALANCING, SCORE_FUNCTIONS

_UNCOUNTED = [0]  # > 0 inside ``uncounted()``


@contextmanager
def uncounted() -> Iterator[None]:
    """Forwards inside do not count towards the step's expert loads (a pipeline stage's metadata
    inference runs its first micro-batch once more; validation runs in eval mode anyway)."""
    _UNCOUNTED[0] += 1
    try:
        yield
    finally:
        _UNCOUNTED[0] -= 1


@dataclass
class Routing:
    """A router's decision for T tokens."""

    weights: Tensor  # (T, k) fp32: the weight of each picked expert's output
    experts: Tensor  # (T, k) int64: the picked experts
    counts: Tensor  # (E,) int64: picks per expert
    aux_loss: Optional[Tensor]  # the balancing loss (aux_loss) plus the z-loss, or None when both are off


class TopKRouter(nn.Module):
    """Token-choice top-k routing with aux-loss-free or auxiliary-loss balancing (module docstring)."""

    def __init__(
        self,
        dim: int,
        n_experts: int,
        top_k: int,
        score_function: str = "softmax",
        normalize: bool = False,
        balancing: str = "aux_free",
        bias_update_rate: float = 1e-3,
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 0.0,
    ) -> None:
        super().__init__()
        if score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"score function {score_function!r}: expected one of {', '.join(SCORE_FUNCTIONS)}")
        if balancing not in BALANCING:
            raise ValueError(f"balancing {balancing!r}: expected one of {', '.join(BALANCING)}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and the {n_experts} experts")
        self.n_experts, self.top_k = n_experts, top_k
        self.score_function, self.normalize, self.balancing = score_function, normalize, balancing
        self.bias_update_rate, self.aux_loss_coef, self.z_loss_coef = bias_update_rate, aux_loss_coef, z_loss_coef
        self.gate = nn.Linear(dim, n_experts, bias=False)
        # The balancing bias is state (checkpointed); the loads are the current step's (not saved).
        self.register_buffer("expert_bias", torch.zeros(n_experts), persistent=balancing == "aux_free")
        self.register_buffer("expert_load", torch.zeros(n_experts), persistent=False)

    def forward(self, x: Tensor) -> Routing:
        """x: (T, dim)."""
        logits = self.gate(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 scores would tie and drift
        scores = logits.softmax(-1) if self.score_function == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias if self.balancing == "aux_free" else scores
        experts = choice.detach().topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        counts = torch.bincount(experts.flatten(), minlength=self.n_experts)
        if self.training and not _UNCOUNTED[0]:  # the step's load; validation's tokens do not move the bias
            with torch.no_grad():
                self.expert_load += counts.to(self.expert_load.dtype)
        aux = None
        if self.balancing == "aux_loss":
            picked = counts.to(scores.dtype) / experts.numel()  # f_e
            probability = scores / scores.sum(-1, keepdim=True)  # P_e: a distribution also for sigmoid scores
            aux = self.aux_loss_coef * self.n_experts * (picked * probability.mean(0)).sum()
        if self.z_loss_coef:
            z = self.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
            aux = z if aux is None else aux + z
        return Routing(weights, experts, counts, aux)

    @torch.no_grad()
    def update_bias(self, group: Optional[dist.ProcessGroup] = None) -> Tensor:
        """After an optimizer step: sum the step's loads over ``group`` (the ranks holding distinct
        tokens), move the bias (``aux_free``) and start counting afresh. Returns the summed loads."""
        load = self.expert_load.clone()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(load, group=group)
        self.apply_load(load)
        return load

    @torch.no_grad()
    def apply_load(self, load: Tensor, applied: bool | Tensor = True) -> None:
        """Move the bias by the step's summed ``load`` (not for a step that was not ``applied``: a flag, or a
        boolean tensor on the device, read by no one on the host) and reset the count."""
        if self.balancing == "aux_free" and applied is not False:
            move = self.bias_update_rate * torch.sign(load.mean() - load)
            self.expert_bias += move if applied is True else torch.where(applied, move, 0.0)
        self.expert_load.zero_()


class Experts(nn.Module):
    """E SwiGLU experts, ``w2_e(silu(w1_e x) * w3_e x)``, as stacked weights (module docstring)."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        for weight in (self.w1, self.w3, self.w2):  # nn.Linear's default, per expert
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(w1, w3, w2) of the experts this rank holds: all of them, or its shard under expert
        parallelism (where the stacked weights are ``Shard(0)`` DTensors)."""
        return tuple(_local(w) for w in (self.w1, self.w3, self.w2))

    def adapters(self) -> dict[str, tuple[Tensor, Tensor]]:
        """LoRA (``curry_train.primitives.lora``): weight name -> this rank's (A, B), A (E, rank, in)
        and B (E, out, rank), for each stacked weight that has adapters."""
        found = {}
        for name in ("w1", "w3", "w2"):
            a, b = getattr(self, f"{name}_lora_a", None), getattr(self, f"{name}_lora_b", None)
            if a is not None:
                found[name] = (_local(a), _local(b))
        return found

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """x: (N, dim), sorted by expert; counts: tokens per expert this rank holds, summing to N."""
        w1, w3, w2 = self.weights()
        if counts.numel() != w1.shape[0]:
            raise ValueError(f"{counts.numel()} token counts for {w1.shape[0]} experts")
        adapters = self.adapters()
        if x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
            return self.grouped(x, counts, adapters)
        outputs = []
        for expert, part in enumerate(torch.split(x, counts.tolist())):
            hidden = F.silu(self._matmul(part, w1, "w1", expert, adapters)) * self._matmul(
                part, w3, "w3", expert, adapters
            )
            outputs.append(self._matmul(hidden, w2, "w2", expert, adapters))
        return torch.cat(outputs) if outputs else x.new_zeros(0, w2.shape[1])

    def _matmul(self, x: Tensor, weight: Tensor, name: str, expert: int, adapters: dict) -> Tensor:
        """``x`` through one expert's weight, plus its adapters' ``scale * B (A dropout(x))``."""
        out = x @ weight[expert].T
        if name in adapters:
            a, b = adapters[name]
            out = out + (self.lora_dropout(x) @ a[expert].T) @ b[expert].T * self.lora_scale
        return out

    def grouped(self, x: Tensor, counts: Tensor, adapters: Optional[dict] = None) -> Tensor:
        """All experts in one grouped GEMM per weight (CUDA, bf16; on CPU its forward runs too)."""
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        adapters = adapters or {}

        def matmul(inputs: Tensor, weight: Tensor, name: str) -> Tensor:
            out = torch._grouped_mm(inputs, weight.to(inputs.dtype).transpose(-2, -1), offs=offsets)
            if name in adapters:
                a, b = (f.to(inputs.dtype) for f in adapters[name])
                pad = -a.shape[1] % (16 // inputs.element_size())  # the GEMMs want 16-byte rows: zero ranks added
                a, b = F.pad(a, (0, 0, 0, pad)).transpose(-2, -1), F.pad(b, (0, pad)).transpose(-2, -1)
                low = torch._grouped_mm(self.lora_dropout(inputs), a, offs=offsets)
                out = out + torch._grouped_mm(low, b, offs=offsets) * self.lora_scale
            return out

        w1, w3, w2 = self.weights()
        hidden = F.silu(matmul(x, w1, "w1")) * matmul(x, w3, "w3")
        return matmul(hidden, w2, "w2")


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class _AttachAuxLoss(torch.autograd.Function):
    """The output unchanged; in backward, the auxiliary loss gets the gradient 1, as if it had been
    added to the training loss (so every layout, pipelines included, trains it without plumbing)."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, aux: Tensor) -> Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


def attach_aux_loss(output: Tensor, aux: Tensor) -> Tensor:
    return _AttachAuxLoss.apply(output, aux)


# A dispatcher runs the experts on tokens sorted by expert: (experts, tokens, counts) -> outputs, in the
# tokens' order. The local one calls the experts; expert parallelism's sends tokens to their owners.
Dispatcher = Callable[[Experts, Tensor, Tensor], Tensor]


def local_dispatch(experts: Experts, tokens: Tensor, counts: Tensor) -> Tensor:
    return experts(tokens, counts)


class MoE(nn.Module):
    """Routed experts plus optional shared experts, in place of a block's dense MLP."""

    def __init__(
        self,
        dim: int,
        router: TopKRouter,
        experts: Experts,
        shared: Optional[nn.Module] = None,
        capacity_factor: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.router, self.experts, self.shared = router, experts, shared
        self.capacity_factor = capacity_factor
        self.dispatch: Dispatcher = local_dispatch
        # The router's losses enter the gradient through the layer's output (``attach_aux_loss``),
        # weighted by this forward's share of the step's tokens: tokens x ``aux_scale`` (1 / the
        # step's tokens, set by the training step; None: the mean over this forward alone).
        self.aux_scale: Optional[float] = None
        self.aux_loss_sum: Optional[Tensor] = None  # the weighted losses of the forwards since the last reset

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing = self.router(flat)
        k = routing.experts.shape[-1]
        picks = routing.experts.flatten()
        order = torch.argsort(picks, stable=True)  # by expert, token order within each
        counts = routing.counts
        if self.capacity_factor is not None:
            order, counts = self._drop_over_capacity(picks, order, counts, flat.shape[0] * k)
        token = order // k
        out = self.dispatch(self.experts, flat[token], counts)
        out = out * routing.weights.flatten()[order].unsqueeze(-1).to(out.dtype)
        combined = torch.zeros_like(flat).index_add_(0, token, out.to(flat.dtype))
        if self.shared is not None:
            combined = combined + self.shared(flat)
        if routing.aux_loss is not None and torch.is_grad_enabled() and not _UNCOUNTED[0]:
            aux = routing.aux_loss * (flat.shape[0] * self.aux_scale if self.aux_scale is not None else 1.0)
            self.aux_loss_sum = aux.detach() if self.aux_loss_sum is None else self.aux_loss_sum + aux.detach()
            combined = attach_aux_loss(combined, aux)
        return combined.view_as(x)

    def _drop_over_capacity(self, picks: Tensor, order: Tensor, counts: Tensor, n_picks: int) -> tuple[Tensor, Tensor]:
        capacity = math.ceil(self.capacity_factor * n_picks / self.router.n_experts)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(len(order), device=order.device) - starts[picks[order]]
        keep = position < capacity
        return order[keep], counts.clamp(max=capacity)
