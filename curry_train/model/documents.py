"""Packed documents: which document each position of a row belongs to, its position inside it, and
attention that stays inside each document (``data.document_mask``).

The kernel: on CUDA, FlexAttention with a block mask built from the documents (tiles the mask empties
are skipped, no dense mask is kept), used only after it has been checked, once per process and
(device, dtype, head dim), against the dense-mask kernel on a probe of packed rows, forward and
backward; one that fails or disagrees is skipped with a warning. Elsewhere, and as that fallback,
SDPA under a dense boolean mask (batch x seq x seq).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def document_ids(inputs: Tensor, separator: int) -> Tensor:
    """(batch, seq) token ids of packed documents, each ending with ``separator`` -> the number of the
    document each position belongs to (0, 1, ... along each row; a separator belongs to the document it ends)."""
    ends = (inputs == separator).long()
    return torch.cumsum(ends, dim=1) - ends


def document_positions(documents: Tensor) -> Tensor:
    """(batch, seq) document numbers -> each position's index within its document (RoPE restarts at 0)."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values


def document_mask(documents_q: Tensor, documents_k: Tensor, causal_offset: Optional[int] = 0) -> Tensor:
    """Which (query, key) pairs attend: same document and, with ``causal_offset`` (the keys' start minus the
    queries' start; None: no causal part), not a later position. (batch, 1, q, k), boolean."""
    allowed = documents_q[:, :, None] == documents_k[:, None, :]
    if causal_offset is not None:
        q, k = documents_q.shape[1], documents_k.shape[1]
        allowed &= torch.ones(q, k, dtype=torch.bool, device=allowed.device).tril(-causal_offset)
    return allowed[:, None]


def _dense(q: Tensor, k: Tensor, v: Tensor, documents: Tensor, dropout: float) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    mask = document_mask(documents, documents)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)


_FLEX: list[Callable] = []  # flex_attention, compiled once per process


def _flex(q: Tensor, k: Tensor, v: Tensor, documents: Tensor, dropout: float) -> Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415

    if not _FLEX:
        _FLEX.append(torch.compile(flex_attention, dynamic=False))

    def same_document_causal(b, h, q_index, kv_index):
        return (documents[b, q_index] == documents[b, kv_index]) & (q_index >= kv_index)

    batch, seq = documents.shape
    block_mask = create_block_mask(same_document_causal, batch, None, seq, seq, device=q.device)
    return _FLEX[0](q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


KERNELS = {"flex": _flex, "dense": _dense}
_CHOSEN: dict[tuple, str] = {}


def _check_flex(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why FlexAttention cannot serve (device, dtype, head dim), or None: a probe of two packed rows
    against the dense kernel, forward and backward."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, head_dim, generator=generator).to(device, dtype) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # grouped key/value heads, as the model's
    lengths = torch.randint(1, 80, (2, 64), generator=generator).cumsum(1)
    documents = (torch.arange(256)[None, :, None] >= lengths[:, None, :]).sum(-1).to(device)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    try:
        results = []
        for kernel in (_flex, _dense):
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = kernel(*leaves, documents, 0.0)
            results.append((out, *torch.autograd.grad(out.float().square().sum(), leaves)))
        for got, want in zip(*results, strict=True):
            error = (got.float() - want.float()).abs().max().item()
            if not error <= tol * max(1.0, want.float().abs().max().item()):
                return f"differs from the dense-mask kernel by {error:.3g}"
    except Exception as error:  # a kernel that cannot compile or run here is skipped, whatever it raises
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def kernel_for(device: torch.device, dtype: torch.dtype, head_dim: int, dropout: float = 0.0) -> str:
    """The kernel document-masked attention runs with on (device, dtype, head dim), decided once."""
    if torch.device(device).type != "cuda" or dropout > 0:  # FlexAttention has no dropout
        return "dense"
    key = (torch.device(device), dtype, head_dim)
    if key not in _CHOSEN:
        why = _check_flex(*key)
        if why is not None:
            warnings.warn(
                f"document mask: FlexAttention is not used on {key[0]} for {dtype}, head dim {head_dim}: {why};"
                " attention runs under a dense mask",
                stacklevel=2,
            )
        _CHOSEN[key] = "flex" if why is None else "dense"
    return _CHOSEN[key]


def document_attention(q: Tensor, k: Tensor, v: Tensor, documents: Tensor, dropout: float = 0.0) -> Tensor:
    """Causal attention over (batch, heads, seq, head_dim) that stays inside each document of ``documents``
    (batch, seq); key/value heads may be fewer (grouped)."""
    return KERNELS[kernel_for(q.device, q.dtype, q.shape[-1], dropout)](q, k, v, documents, dropout)
