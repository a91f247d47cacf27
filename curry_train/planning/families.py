"""Model families for capacity sweeps: ladders of Llama-style shapes that grow in width and depth
together (``llama3``: the Llama 3 shapes and points on Llama's rules between them; ``debug``: small
enough to measure on a CPU; ``moe``: the llama3 ladder with the run's mixture of experts in its
blocks, each expert as wide relative to ``dim`` as the run's). The rules are in docs/planning.md
("Families")."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from curry_train.config import CONF_DIR
from curry_train.planning.layout import PlanningError
from curry_train.planning.memory import active_parameter_count, parameter_count

FAMILIES = ("llama3", "debug", "moe")
MEMBER_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")


@dataclass(frozen=True)
class Member:
    """One point of a family: a model's shapes and its parameter count (the run's vocabulary)."""

    name: str  # e.g. "llama3-8.0B"
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    parameters: int
    max_seq_len: Optional[int] = None  # set where the run's sequence is longer than the config's model allows
    preset: Optional[str] = None  # the conf/model file with exactly these shapes, if any
    expert_ffn_dim: Optional[int] = None  # family moe: each routed expert's width
    active: Optional[int] = None  # family moe: the parameters a token goes through

    @property
    def label(self) -> str:
        active = f", {params_text(self.active)} active" if self.active is not None else ""
        return f"{params_text(self.parameters)} (dim {self.dim}, {self.n_layers} layers{active})"

    def model_overrides(self) -> list[str]:
        """``model.*`` overrides that make the run's model this member."""
        overrides = [f"model.{key}={getattr(self, key)}" for key in MEMBER_KEYS] + [f"model.name={self.name}"]
        if self.expert_ffn_dim is not None:
            overrides.append(f"model.moe.expert_ffn_dim={self.expert_ffn_dim}")
        return overrides + ([f"model.max_seq_len={self.max_seq_len}"] if self.max_seq_len else [])

    def apply(self, cfg: DictConfig) -> DictConfig:
        """``cfg`` with this member's shapes (its model's name kept: ``memory`` caches shapes by config)."""
        cfg = cfg.copy()
        for key in MEMBER_KEYS:
            OmegaConf.update(cfg, f"model.{key}", getattr(self, key))
        if self.expert_ffn_dim is not None:
            OmegaConf.update(cfg, "model.moe.expert_ffn_dim", self.expert_ffn_dim)
        if self.max_seq_len:
            OmegaConf.update(cfg, "model.max_seq_len", self.max_seq_len)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def params_text(n: float) -> str:
    """``8.0B``, ``70.6B``, ``853.1K``: a parameter count (or any count) in short form."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def llama_ffn_dim(dim: int, multiplier: float = 1.3, multiple_of: int = 1024) -> int:
    """Llama's SwiGLU width: 2/3 of 4 x dim, times ``ffn_dim_multiplier``, rounded up to ``multiple_of``."""
    hidden = int(multiplier * int(2 * 4 * dim / 3))
    return multiple_of * math.ceil(hidden / multiple_of)


def _kv_heads(n_heads: int, most: int = 8) -> int:
    kv = min(most, max(1, n_heads // 4))
    while n_heads % kv:
        kv -= 1
    return kv


# (dim, n_layers, (n_heads, n_kv_heads, ffn_dim) where they are a published shape, else by rule)
LLAMA3_LADDER: tuple[tuple[int, int, Optional[tuple[int, int, int]]], ...] = (
    (512, 8, None),
    (1024, 12, None),
    (1536, 16, None),
    (2048, 16, (32, 8, 8192)),  # Llama 3.2 1B (tied there)
    (3072, 28, (24, 8, 8192)),  # Llama 3.2 3B (tied there)
    (4096, 32, (32, 8, 14336)),  # Llama 3.1 8B
    (5120, 40, None),
    (6144, 48, None),
    (7168, 60, None),
    (8192, 80, (64, 8, 28672)),  # Llama 3 70B
    (10240, 96, None),
    (12288, 112, None),
    (16384, 126, (128, 8, 53248)),  # Llama 3.1 405B
)
DEBUG_DIMS = (64, 128, 192, 256, 384, 512, 768, 1024)


def _family_shapes(name: str) -> list[tuple[int, int, int, int, int]]:
    """(dim, n_layers, n_heads, n_kv_heads, ffn_dim) of each member, smallest first."""
    if name in ("llama3", "moe"):
        shapes = []
        for dim, layers, given in LLAMA3_LADDER:
            heads = dim // 128
            n_heads, n_kv, ffn = given or (heads, _kv_heads(heads), llama_ffn_dim(dim))
            shapes.append((dim, layers, n_heads, n_kv, ffn))
        return shapes
    if name == "debug":
        return [(dim, dim // 32, dim // 32, dim // 64, 3 * dim) for dim in DEBUG_DIMS]
    raise PlanningError(f"family={name!r}: expected one of {', '.join(FAMILIES)}")


def _presets() -> dict[str, DictConfig]:
    return {path.stem: OmegaConf.load(path) for path in sorted((CONF_DIR / "model").glob("*.yaml"))}


def _is_preset(preset: DictConfig, member: Member, cfg: DictConfig) -> bool:
    """Whether the ``conf/model`` file ``preset`` is ``member`` for ``cfg``'s run."""
    return (
        all(preset.get(k) == getattr(member, k) for k in MEMBER_KEYS)
        and preset.get("vocab_size") == cfg.model.vocab_size
        and bool(preset.get("tie_embeddings")) == bool(cfg.model.tie_embeddings)
        and preset.get("max_seq_len", 0) >= cfg.data.seq_len
        and all(preset.get(k) == cfg.model.get(k) for k in ("norm_eps", "rope_theta", "dropout", "init_std"))
        and _same_experts(preset.get("moe"), member, cfg)
    )


def _same_experts(preset_moe: Optional[DictConfig], member: Member, cfg: DictConfig) -> bool:
    """Whether a preset's ``moe`` is the member's: the run's, at the member's expert width."""
    run_moe = cfg.model.get("moe")
    if member.expert_ffn_dim is None:  # a dense family's member keeps the run's experts, if any
        return preset_moe is None and run_moe is None
    if preset_moe is None or run_moe is None:
        return False
    mine = {**OmegaConf.to_container(run_moe), "expert_ffn_dim": member.expert_ffn_dim}
    return OmegaConf.to_container(preset_moe) == mine


def default_family(cfg: DictConfig) -> str:
    """``moe`` for a mixture-of-experts run, else ``llama3``."""
    return "moe" if cfg.model.get("moe") is not None else "llama3"


def expert_width(moe: DictConfig, run_dim: int, dim: int) -> int:
    """A member's expert width: the run's ``expert_ffn_dim / dim`` at ``dim``, a multiple of 64."""
    return max(64, 64 * round(moe.expert_ffn_dim * dim / run_dim / 64))


def family(name: str, cfg: DictConfig) -> list[Member]:
    """The members of family ``name`` for ``cfg``'s vocabulary and sequence, smallest first."""
    moe = cfg.model.get("moe")
    if name == "moe" and moe is None:
        raise PlanningError(
            "family=moe sweeps the run's mixture of experts over the llama3 ladder: give a MoE model"
            " (model=mixtral_8x7b, model=moe_debug, or model.moe=...)"
        )
    presets = _presets()
    members = []
    max_seq_len = cfg.data.seq_len if cfg.data.seq_len > cfg.model.max_seq_len else None
    for dim, layers, heads, kv, ffn in _family_shapes(name):
        probe = Member("", dim, layers, heads, kv, ffn, 0, max_seq_len)
        if name == "moe":
            probe = replace(probe, expert_ffn_dim=expert_width(moe, cfg.model.dim, dim))
        model = probe.apply(cfg).model
        parameters = parameter_count(model)
        active = active_parameter_count(model) if name == "moe" else None
        preset = next((key for key, m in presets.items() if _is_preset(m, probe, cfg)), None)
        label = f"{name}-{params_text(parameters)}"
        members.append(replace(probe, name=label, parameters=parameters, preset=preset, active=active))
    return members
