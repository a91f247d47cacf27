"""Attention block kernels for context parallelism: one query block against one key/value block,
returning the output and its log-sum-exp (fp32), so partial results can be merged exactly; and the
backward given the final (merged) output and log-sum-exp.

The block kernel is the device's fused attention that returns the log-sum-exp: PyTorch's flash
kernel on CUDA for fp16/bf16 (head dim a multiple of 8, at most 256), else cuDNN's (fp16/bf16, head
dim at most 128), else its memory-efficient kernel (fp32 too; its log-sum-exp is padded to 32 rows,
and trimmed here); PyTorch's CPU flash kernel on CPU; and an exact fp32 math kernel (O(block^2)
memory per block) where none applies. A kernel is used only after it has been checked, once per
process and (device, dtype, head dim), against the math kernel on a probe block laid out as the ring
passes blocks (strided views), forward and backward, causal and not: one that fails or disagrees is
skipped with a warning, and the next is tried (``block_kernel`` names the one in use).

Under a document mask (packed sequences whose documents must not see each other) a block runs the
exact math kernel with the mask (``masked_forward``/``masked_backward``); blocks the mask leaves
empty are not run at all.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    return (torch.exp(scores - lse[..., None]) @ v.float()).to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return _backward_of(dout, q, k, v, out, torch.exp(scores - lse[..., None]), scale)


def _backward_of(dout, q, k, v, out, p: Tensor, scale: float):
    """The gradients of attention whose probabilities were ``p`` (fp32, masked entries 0)."""
    dout32 = dout.float()
    dv = p.transpose(-2, -1) @ dout32
    dp = dout32 @ v.float().transpose(-2, -1)
    delta = (dout32 * out.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    return (ds @ k.float()).to(q.dtype), (ds.transpose(-2, -1) @ q.float()).to(k.dtype), dv.to(v.dtype)


def _cpu_flash_forward(q, k, v, causal: bool, scale: float):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse.float()


def _cpu_flash_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


def _no_dropout_rng(device: torch.device, dtype: torch.dtype, seed_shape: tuple) -> tuple[Tensor, Tensor]:
    """The philox seed and offset the CUDA kernels' backward takes; without dropout they are not read."""
    return torch.zeros(seed_shape, dtype=dtype, device=device), torch.zeros((), dtype=dtype, device=device)


def _cuda_flash_forward(q, k, v, causal: bool, scale: float):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out, lse.float()


def _cuda_flash_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    seed, offset = _no_dropout_rng(
        q.device, torch.int64 if torch.version.hip else torch.uint64, () if torch.version.hip else (2,)
    )
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.contiguous(),
        q,
        k,
        v,
        out.contiguous(),
        lse.contiguous(),
        None,
        None,
        q.shape[2],
        k.shape[2],
        0.0,
        causal,
        seed,
        offset,
        scale=scale,
    )
    return dq, dk, dv


def _cuda_cudnn_forward(q, k, v, causal: bool, scale: float):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale
    )
    return out, lse.reshape(q.shape[:-1]).float()  # cuDNN's lse has a trailing dim of 1


def _cuda_cudnn_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    seed, offset = _no_dropout_rng(q.device, torch.int64, ())
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout.contiguous(),
        q,
        k,
        v,
        out.contiguous(),
        lse.unsqueeze(-1).contiguous(),
        seed,
        offset,
        None,
        None,
        None,
        q.shape[2],
        k.shape[2],
        0.0,
        causal,
        scale=scale,
    )
    return dq, dk, dv


def _lse_rows(rows: int) -> int:
    """Rows of the memory-efficient kernel's log-sum-exp: padded to a multiple of 32 (not on ROCm)."""
    return rows if torch.version.hip else -(-rows // 32) * 32


def _cuda_efficient_forward(q, k, v, causal: bool, scale: float):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return out, lse[..., : q.shape[2]].float()


def _cuda_efficient_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    rows = q.shape[2]
    padded = F.pad(lse, (0, _lse_rows(rows) - rows)).contiguous()  # the padding rows are never read
    seed, offset = _no_dropout_rng(q.device, torch.int64, ())
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout.contiguous(),
        q,
        k,
        v,
        None,
        out.contiguous(),
        padded,
        seed,
        offset,
        0.0,
        [True, True, True, False],
        causal,
        scale=scale,
    )
    return dq, dk, dv


# name -> (forward, backward); forward: (q, k, v, causal, scale) -> (out, fp32 lse); backward: the
# gradients of q, k, v given the final (merged) out and lse.
KERNELS = {
    "cuda_flash": (_cuda_flash_forward, _cuda_flash_backward),
    "cuda_cudnn": (_cuda_cudnn_forward, _cuda_cudnn_backward),
    "cuda_efficient": (_cuda_efficient_forward, _cuda_efficient_backward),
    "cpu_flash": (_cpu_flash_forward, _cpu_flash_backward),
    "math": (_math_forward, _math_backward),
}
_CHOSEN: dict[tuple, str] = {}  # (device, dtype, head dim) -> the kernel that passed its check


def _candidates(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Fused kernels to try on ``device``, in order of preference; ``math`` always comes last."""
    names = []
    if device.type == "cuda":
        if dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256:
            names.append("cuda_flash")
        if dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 128:
            names.append("cuda_cudnn")
        names.append("cuda_efficient")
    elif device.type == "cpu":
        names.append("cpu_flash")
    return names + ["math"]


def _check_kernel(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """None if ``name`` agrees with the math kernel on a probe block (forward and backward, causal
    and not), else why not. Tolerance: a few units in the last place of ``dtype`` on values of order 1."""
    forward, backward = KERNELS[name]
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 5e-2)
    generator = torch.Generator(device="cpu").manual_seed(0)
    # Laid out as the ring hands them over: (batch, seq, heads, dim) seen as (batch, heads, seq, dim),
    # then the second of two sequence chunks, so a kernel that mishandles strides fails here too.
    q, k, v, dout = (
        torch.randn(1, 144, 2, head_dim, generator=generator).to(device, dtype).transpose(1, 2).split(72, dim=2)[1]
        for _ in range(4)
    )
    scale = head_dim**-0.5
    try:
        for causal in (True, False):
            out, lse = forward(q, k, v, causal, scale)
            ref_out, ref_lse = _math_forward(q, k, v, causal, scale)
            grads = backward(dout, q, k, v, out, lse, causal, scale)
            ref_grads = _math_backward(dout, q, k, v, ref_out, ref_lse, causal, scale)
            for got, want in ((out, ref_out), (lse, ref_lse), *zip(grads, ref_grads, strict=False)):
                err = (got.float() - want.float()).abs().max().item()
                if not err <= tol * max(1.0, want.float().abs().max().item()):
                    return f"differs from the math kernel by {err:.3g} (causal={causal})"
    except (RuntimeError, TypeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def block_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The kernel blocks of this (device, dtype, head dim) run with: the first candidate that passes
    its check (module docstring), decided once per process."""
    key = (torch.device(device), dtype, head_dim)
    if key not in _CHOSEN:
        for name in _candidates(key[0], dtype, head_dim):
            why = None if name == "math" else _check_kernel(name, key[0], dtype, head_dim)
            if why is None:
                _CHOSEN[key] = name
                break
            warnings.warn(
                f"context parallel: the {name} attention kernel is not used on {key[0]} for {dtype}, "
                f"head dim {head_dim}: {why}",
                stacklevel=2,
            )
    return _CHOSEN[key]


def block_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of one query block over one key/value block (heads equal): output and fp32 lse."""
    return KERNELS[block_kernel(q.device, q.dtype, q.shape[-1])][0](q, k, v, causal, scale)


def block_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    return KERNELS[block_kernel(q.device, q.dtype, q.shape[-1])][1](dout, q, k, v, out, lse, causal, scale)


# ----------------------------------------------------------------------------------------------
# Blocks under a document mask (packed sequences: a query sees only keys of its own document)


def masked_forward(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of one query block over one key/value block where ``allowed`` (broadcast to
    (batch, heads, q, k), boolean) says which pairs attend: the exact fp32 math kernel. A query that
    no key of the block may see gets output 0 and log-sum-exp -inf (it takes nothing from the block
    when blocks are merged)."""
    scores = ((q.float() @ k.float().transpose(-2, -1)) * scale).masked_fill(~allowed, float("-inf"))
    lse = scores.logsumexp(-1)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (torch.exp(scores - finite[..., None]) @ v.float()).to(q.dtype), lse


def masked_backward(dout, q, k, v, out, lse, allowed: Tensor, scale: float):
    """The gradient of ``masked_forward`` given the final (merged) output and log-sum-exp."""
    scores = ((q.float() @ k.float().transpose(-2, -1)) * scale).masked_fill(~allowed, float("-inf"))
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return _backward_of(dout, q, k, v, out, torch.exp(scores - finite[..., None]), scale)
