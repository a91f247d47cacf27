"""The model's configuration: what a run's ``model`` group sets (``curry_train/model/llama.py`` builds it).

Plain dataclasses, no torch: a run's config is composed and checked before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING


@dataclass
class MoEConfig:
    """Mixture of experts in place of the dense MLP (``curry_train.primitives.moe``); null: dense."""

    experts: int = 8  # routed experts per MoE block
    top_k: int = 2  # experts each token is sent to
    shared_experts: int = 1  # experts every token goes through (0: none), each expert_ffn_dim wide
    expert_ffn_dim: int = 192  # hidden width of each expert's SwiGLU
    dense_layers: int = 0  # the first this many blocks keep the dense MLP (ffn_dim)
    score_function: str = "softmax"  # softmax | sigmoid
    normalize: bool = False  # renormalize the top-k weights to sum to one
    balancing: str = "aux_free"  # aux_free (a bias on the choice, moved by the load) | aux_loss | none
    bias_update_rate: float = 1e-3  # aux_free: the bias moves by this times sign(mean load - load) per step
    aux_loss_coef: float = 1e-2  # aux_loss: its weight in the training loss
    z_loss_coef: float = 0.0  # weight of the router's z-loss (0: off)
    capacity_factor: Optional[float] = None  # picks an expert takes, x tokens*top_k/experts; null: dropless


@dataclass
class RopeScalingConfig:
    """Llama 3.1's long-context RoPE frequencies (``rope_scaling`` of type llama3 in a Hugging Face config).

    Wavelengths shorter than ``original_max_seq_len / high_freq_factor`` keep their frequency, those longer
    than ``original_max_seq_len / low_freq_factor`` are slowed by ``factor``, and the band between is a
    smooth mix of the two.
    """

    type: str = "llama3"  # the only kind supported
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192  # the context length the model was pre-trained at


@dataclass
class LoRAConfig:
    """Low-rank adapters on a frozen base (``curry_train.primitives.lora``); null: every weight trains."""

    rank: int = 8  # the adapters' inner width
    alpha: float = 16.0  # their output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input
    targets: List[str] = field(
        default_factory=lambda: ["attention.wq", "attention.wk", "attention.wv", "attention.wo"]
    )  # by path suffix: attention.wq/wk/wv/wo, feed_forward.w1/w2/w3 (dense blocks), output,
    # feed_forward.experts.w1/w2/w3 (a MoE model's routed experts: one adapter pair per expert)
    base_dtype: str = "fp32"  # fp32 | bf16: the frozen base's storage (bf16 needs bf16 compute: autocast or FSDP's)


@dataclass
class ModelConfig:
    """A Llama-style decoder (see ``curry_train.model``)."""

    name: str = MISSING  # label of the size, used in run names and logs
    dim: int = MISSING  # residual stream width
    n_layers: int = MISSING  # number of transformer blocks
    n_heads: int = MISSING  # query heads
    n_kv_heads: int = MISSING  # key/value heads (grouped-query attention); divides n_heads
    ffn_dim: int = MISSING  # hidden width of the SwiGLU MLP
    vocab_size: int = MISSING  # rows of the embedding; at least the tokenizer's vocabulary
    max_seq_len: int = 2048  # longest sequence the model accepts (RoPE table length)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    tie_embeddings: bool = False  # share the input embedding with the output head
    dropout: float = 0.0  # dropout on attention probabilities and residual branches
    init_std: float = 0.02  # std of the normal init; output projections get std/sqrt(2*n_layers)
    moe: Optional[MoEConfig] = None  # mixture of experts (model=moe_debug); null: every block dense
    head_dim: Optional[int] = None  # width of each attention head; null: dim / n_heads (Qwen3: 128 on dim 2048)
    rope_scaling: Optional[RopeScalingConfig] = None  # Llama 3.1+ long-context RoPE (null: plain RoPE)
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    init_from: Optional[str] = None  # a Hugging Face model directory: config.json sets the shape, its weights the model
    loss_chunks: int = 1  # >1: the head and the loss over this many sequence chunks, logits recomputed in backward
    lora: Optional[LoRAConfig] = None  # low-rank adapters on a frozen base (model.lora.rank=8 ...); null: off


def head_dim(cfg: ModelConfig) -> int:
    """The width of each attention head: ``model.head_dim``, or ``dim / n_heads``."""
    return getattr(cfg, "head_dim", None) or cfg.dim // cfg.n_heads
