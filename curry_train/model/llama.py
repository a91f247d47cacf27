"""A Llama-style decoder in one file: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

The model holds no distributed code. It declares, in ``Llama.plan``, *what* can be split (which
linears are column- or row-parallel, which module is the attention op, which modules repeat);
``curry_train.parallelize`` decides *how* from the layout. Two choices keep every layout able to reuse it
unchanged:

* Blocks live in an ``nn.ModuleDict`` keyed ``"0".."L-1"`` and the embedding, final norm and head
  may be ``None``: a pipeline stage deletes what it does not own and every parameter keeps its
  fully-qualified name, so checkpoints load across layouts.
* Head counts are read from tensor shapes (``view(b, s, -1, head_dim)``), so a block whose
  projections were split over tensor-parallel ranks runs with its local heads.

Initialization is a pure function of a parameter's name and a generator (``init_parameter``), so
``primitives.materialize`` can produce bit-identical weights for any layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from curry_train.model.config import ModelConfig, MoEConfig, RopeScalingConfig, head_dim
from curry_train.model.documents import document_attention, document_positions
from curry_train.model.moe import Experts, MoE, TopKRouter


@dataclass(frozen=True)
class SplitPlan:
    """What can be split, by module path. Paths in ``column``/``row``/``norms`` are relative to a block."""

    blocks: str = "layers"
    column: tuple[str, ...] = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
    row: tuple[str, ...] = ("attention.wo", "feed_forward.w2")
    attention: str = "attention"
    attention_op: str = "attention.sdpa"
    norms: tuple[str, ...] = ("attention_norm", "ffn_norm")
    embedding: str = "tok_embeddings"
    final_norm: str = "norm"
    head: str = "output"


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScalingConfig] = None, device=None) -> Tensor:
    """The rotation frequency of each pair of a head, (head_dim // 2,) fp32; Llama 3.1's scaling where given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.type != "llama3":
        raise ValueError(f"model.rope_scaling.type={scaling.type!r}: only llama3 is supported")
    wavelength = 2 * math.pi / inv_freq
    low_wavelength = scaling.original_max_seq_len / scaling.low_freq_factor  # longer: slowed by factor
    high_wavelength = scaling.original_max_seq_len / scaling.high_freq_factor  # shorter: unchanged
    smooth = (scaling.original_max_seq_len / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    mixed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelength > low_wavelength, inv_freq / scaling.factor, inv_freq)
    between = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return torch.where(between, mixed, scaled)


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device=None, scaling: Optional[RopeScalingConfig] = None
) -> tuple[Tensor, Tensor]:
    """cos/sin of the rotary angles (Su et al., 2021), shape (max_seq_len, head_dim // 2), fp32."""
    inv_freq = rope_frequencies(head_dim, theta, scaling, device)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x: (batch, seq, heads, head_dim) by the angles of each position;
    cos/sin: (seq, head_dim // 2), or (batch, seq, head_dim // 2) where each row has its own positions."""
    x32 = x.float().unflatten(-1, (-1, 2))
    real, imag = x32[..., 0], x32[..., 1]
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.ndim == 2 else (cos[:, :, None], sin[:, :, None])
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class SDPA(nn.Module):
    """The attention op: causal scaled dot-product attention over (batch, heads, seq, head_dim).

    Key/value heads are shared by groups of query heads (grouped-query attention, Ainslie et al.,
    2023); the kernel reads each key/value head for its group (``enable_gqa``) instead of a copy
    repeated to the query heads. Given ``documents`` (batch, seq), a query attends only to earlier
    keys of its own document (``documents.document_attention``).
    """

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, documents: Optional[Tensor] = None) -> Tensor:
        dropout = self.dropout if self.training else 0.0
        gqa = q.shape[1] != k.shape[1]
        if documents is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=gqa)
        return document_attention(q, k, v, documents, dropout)


class KVCache:
    """The keys and values of the tokens a generation has seen, per block, (batch, kv_heads, max_len,
    head_dim) each, allocated at a block's first call; ``length`` tokens are filled."""

    def __init__(self, max_len: int) -> None:
        self.max_len, self.length = max_len, 0
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def extend(self, block: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append block ``block``'s new keys and values (batch, kv_heads, new, head_dim) after the
        ``length`` cached ones; the keys and values of every token so far."""
        if block not in self.keys:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys[block], self.values[block] = k.new_zeros(shape), v.new_zeros(shape)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"{end} tokens exceed the cache's {self.max_len} (model.max_seq_len)")
        self.keys[block][:, :, self.length : end] = k
        self.values[block][:, :, self.length : end] = v
        return self.keys[block][:, :, :end], self.values[block][:, :, :end]


class GQAttention(nn.Module):
    """Grouped-query self-attention with rotary positions (``head_dim``: default ``dim / n_heads``)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        dropout: float,
        head_dim: Optional[int] = None,
        qk_norm_eps: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim or dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.sdpa = SDPA(dropout)
        # qk_norm (Qwen3): one weight per head channel, shared by every head, in the interleaved order of
        # the rotary pairs like the projections' rows.
        self.q_norm = RMSNorm(self.head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(self.head_dim, qk_norm_eps) if qk_norm_eps is not None else None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        documents: Optional[Tensor] = None,
        cache: Optional[tuple[KVCache, int]] = None,
    ) -> Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: attend to every token so far, the new ones causally
            out = _cached_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), *cache)
            return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))
        extra = () if documents is None else (documents,)  # packed documents: the op masks across them
        out = self.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), *extra)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


def _cached_attention(q: Tensor, k: Tensor, v: Tensor, cache: KVCache, block: int) -> Tensor:
    """The new queries (batch, heads, new, head_dim) against the cached keys and values and their own."""
    seen = cache.length
    k, v = cache.extend(block, k, v)
    new, total = q.shape[2], k.shape[2]
    mask = None if new == 1 else torch.ones(new, total, dtype=torch.bool, device=q.device).tril(seen)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer, 2020)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def moe_layer(dim: int, moe: MoEConfig) -> nn.Module:
    """A block's mixture of experts, from ``model.moe``."""
    router = TopKRouter(
        dim,
        moe.experts,
        moe.top_k,
        moe.score_function,
        moe.normalize,
        moe.balancing,
        moe.bias_update_rate,
        moe.aux_loss_coef,
        moe.z_loss_coef,
    )
    shared = SwiGLU(dim, moe.shared_experts * moe.expert_ffn_dim) if moe.shared_experts else None
    return MoE(dim, router, Experts(moe.experts, dim, moe.expert_ffn_dim), shared, moe.capacity_factor)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        qk_norm_eps = cfg.norm_eps if getattr(cfg, "qk_norm", False) else None
        self.attention = GQAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.dropout, head_dim(cfg), qk_norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        moe = cfg.moe
        if moe is not None and index >= moe.dense_layers:
            self.feed_forward: nn.Module = moe_layer(cfg.dim, moe)
        else:
            self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        documents: Optional[Tensor] = None,
        cache: Optional[tuple[KVCache, int]] = None,
    ) -> Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, documents, cache))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


def chunked_cross_entropy(head: nn.Module, h: Tensor, labels: Tensor, chunks: int) -> Tensor:
    """The summed next-token cross-entropy of ``head(h)`` against ``labels``, taken ``chunks`` sequence
    chunks at a time: each chunk's logits (and their fp32 copy) exist only while its loss is computed,
    in forward and again in backward (``checkpoint``), so no rank ever holds the logits of the whole
    sequence. The price: the head's matmul once more in backward.

    Under sequence parallelism ``h`` is this rank's ``1/shards`` of the sequence and the head gathers
    each chunk from every rank (rank-major), so each chunk's labels are taken from every rank's part.
    Under loss parallelism the logits, and each chunk's loss, are vocabulary-sharded DTensors.
    """
    batch, local = h.shape[0], h.shape[1]
    shards = labels.shape[1] // local
    by_rank = labels.reshape(batch, shards, local)
    size = -(-local // max(1, chunks))
    total: Optional[Tensor] = None
    for start in range(0, local, size):
        part = by_rank[:, :, start : start + size].reshape(batch, -1)
        loss = checkpoint(_head_loss, head, h[:, start : start + size], part, use_reentrant=False)
        total = loss if total is None else total + loss
    return total


def _head_loss(head: nn.Module, h: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(head(h).flatten(0, 1).float(), labels.flatten(), reduction="sum")


class Llama(nn.Module):
    plan = SplitPlan()

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: Optional[nn.Linear] = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        scaling = getattr(cfg, "rope_scaling", None)
        cos, sin = rope_tables(head_dim(cfg), cfg.max_seq_len, cfg.rope_theta, scaling=scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # The positions of the tokens this rank holds when they are not 0..seq-1 (context
        # parallelism shards the sequence); forward uses them when called without positions.
        self.register_buffer("positions", None, persistent=False)
        # Sequence parallelism: hidden states between stages (a pipeline stage's input) are this rank's
        # shard of the sequence, 1/sequence_shards of it; set by apply_tensor_parallel.
        self.sequence_shards = 1

    def forward(
        self,
        tokens: Tensor,
        positions: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        documents: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> Tensor:
        """tokens: (batch, seq) ids, or hidden states (batch, seq, dim) on a stage without the embedding.

        positions: (seq,) indices into the RoPE tables; default 0..seq-1. documents: (batch, whole seq)
        the document of each position of packed rows (``document_ids``): attention stays inside each
        document and positions restart at its start (context parallelism: the rows whole, not this
        rank's shard). Returns logits (batch, seq, vocab), or hidden states on a stage without the
        head; given ``labels`` (batch, seq), the summed cross-entropy instead, over ``loss_chunks``
        chunks (``chunked_cross_entropy``). cache: generation's keys and values so far (``KVCache``): the
        tokens are the next ones after them (their positions follow), and the cache takes theirs.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if cache is not None:
            positions = torch.arange(cache.length, cache.length + tokens.shape[1], device=h.device)
        if positions is None:
            positions = self.positions
        if documents is not None:  # each row's own positions: restarting at each document
            within = document_positions(documents)
            within = within[:, positions] if positions is not None else within
            cos, sin = self.rope_cos[within], self.rope_sin[within]
        elif positions is None:  # the whole sequence's length, not that of a sequence-parallel shard
            seq = tokens.shape[1] * (self.sequence_shards if tokens.ndim == 3 else 1)
            cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for index, block in enumerate(self.layers.values()):
            if cache is not None:
                h = block(h, cos, sin, None, (cache, index))
            elif documents is not None:
                h = block(h, cos, sin, documents)
            else:
                h = block(h, cos, sin)
        if cache is not None:
            cache.length += tokens.shape[1]
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        if labels is not None:
            return chunked_cross_entropy(self.output, h, labels, getattr(self.cfg, "loss_chunks", 1))
        return self.output(h)

    def tie_weights(self) -> None:
        """Share the embedding with the head (``tie_embeddings``); again after moving off the meta
        device, which allocates each module's parameters separately."""
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the RoPE tables (after materializing from the meta device)."""
        cfg = self.cfg
        scaling = getattr(cfg, "rope_scaling", None)
        cos, sin = rope_tables(head_dim(cfg), cfg.max_seq_len, cfg.rope_theta, self.rope_cos.device, scaling)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for name, buffer in self.named_buffers():
            if name.endswith(("router.expert_bias", "router.expert_load")):  # balancing starts level
                buffer.zero_()

    def init_parameter(self, name: str, full: Tensor, generator: torch.Generator) -> None:
        """Fill ``full``, the whole (unsharded) value of parameter ``name``, drawing from ``generator``.

        GPT-2's scheme: N(0, init_std) everywhere, output projections of each residual branch scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth; norms at one.
        """
        if name.endswith("norm.weight"):
            full.fill_(1.0)
            return
        if name.endswith("lora_b"):  # LoRA: the adapters add nothing at the start
            full.zero_()
            return
        if name.endswith("lora_a"):  # as PEFT draws it: uniform in +-1/sqrt(in)
            bound = 1.0 / math.sqrt(full.shape[-1])  # (rank, in), or (E, rank, in) on experts
            full.uniform_(-bound, bound, generator=generator)
            return
        std = self.cfg.init_std
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "experts.w2", "shared.w2.weight")):
            std /= math.sqrt(2 * self.cfg.n_layers)
        full.normal_(0.0, std, generator=generator)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
