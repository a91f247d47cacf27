"""The layout vocabulary: the ``parallel`` options, ZeRO's modes, a candidate ``Layout``, and the one
parser of layout strings (``capacity_sweep.py layouts=...`` and ``bench.py --layout ...``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from omegaconf import DictConfig

from curry_train.config import ConfigError
from curry_train.config.schema import ParallelConfig
from curry_train.layout.dims import DIMS, ParallelDims
from curry_train.layout.pipeline import stages_per_rank
from curry_train.options import PARALLEL_OPTIONS

OPTIONS = PARALLEL_OPTIONS
# Keys a layout string may give without the ``parallel.`` prefix: ``fsdp+tp tp.size=4 recompute=full``.
PARALLEL_KEYS = (*OPTIONS, "recompute", "recompute_every_n_blocks", "recompute_keep_matmuls")
ZERO_MODES = ("none", "optimizer", "shard_grad_op", "full")  # DDP, ZeRO-1, ZeRO-2, ZeRO-3
ZERO_NAMES = {"none": "DDP", "optimizer": "ZeRO-1", "shard_grad_op": "ZeRO-2", "full": "ZeRO-3", "hybrid": "HSDP"}
LAYOUT_EXAMPLE = "'tp4: parallel=tp parallel.tp.size=4 trainer.devices=4'"


class PlanningError(ConfigError):
    """A layout string or an option a planning command cannot use: one line naming the value and
    what is expected (the commands print it and exit 2)."""


@dataclass(frozen=True)
class Layout:
    """A candidate: the parallel degrees and the knobs that change a rank's memory."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1  # expert parallelism (MoE models): a split of the dp x cp ranks, not a factor of the world
    zero: str = "none"  # none (DDP) | optimizer | shard_grad_op | full | hybrid
    mixed_precision: str = "fp32"  # fp32 | bf16: compute dtype
    recompute: str = "none"  # none | selective | full
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    pp_schedule: str = "1F1B"
    virtual_stages: Optional[int] = None  # parallel.pp.virtual_stages: None = the schedule's default
    recompute_every_n_blocks: int = 0  # selective: 0 = per op in every block; n = full recompute of every n-th
    recompute_keep_matmuls: str = "all"  # per-op selective: all | every_other
    loss_chunks: int = 1  # model.loss_chunks: the head and the loss over this many chunks of the sequence
    sync_each_microbatch: bool = False  # parallel.fsdp.sync_each_microbatch: reduce-scatter every micro-batch

    @property
    def element_bytes(self) -> int:
        """Bytes of one element in the compute dtype: parameters as gathered, activations, logits."""
        return 2 if self.mixed_precision == "bf16" else 4

    @property
    def recompute_kind(self) -> str:
        """What each recomputing block does: ``none``, ``full``, ``per_op`` (every matmul's output kept),
        ``per_op_half`` (every other one's), or ``every_n`` (full recompute of every n-th block, none
        elsewhere: ``recompute_every_n_blocks``)."""
        if self.recompute != "selective":
            return self.recompute
        if self.recompute_every_n_blocks:
            return "every_n"
        return "per_op_half" if self.recompute_keep_matmuls == "every_other" else "per_op"

    def fully_recomputed(self, blocks: int) -> int:
        """Of ``blocks`` consecutive blocks from the first, how many ``every_n`` recomputes whole (the 1st,
        the (n+1)-th, ...; primitives/recompute.py counts from each rank's first block)."""
        return -(-blocks // self.recompute_every_n_blocks) if self.recompute_kind == "every_n" else 0

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages one rank holds (``pipeline_schedule.stages_per_rank``); 1 without pp."""
        return stages_per_rank(self.pp_schedule, self.virtual_stages) if self.pp > 1 else 1

    @property
    def dims(self) -> ParallelDims:
        """Its degrees as the run would hold them (``ValueError`` for degrees that do not compose)."""
        return ParallelDims.from_degrees(
            dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, cp=self.cp, tp=self.tp, pp=self.pp, ep=self.ep
        )

    @property
    def world(self) -> int:
        return self.dims.world_size

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def shards(self) -> int:
        """Ranks that share one copy of the model state: FSDP shards over dp_shard x cp."""
        return 1 if self.zero == "none" else self.dp_shard * self.cp

    @property
    def expert_shards(self) -> int:
        """Ranks that share one copy of an expert-parallel rank's experts: FSDP shards them over the
        ranks expert parallelism leaves (dp_shard x cp / ep)."""
        return 1 if self.zero == "none" else max(1, self.dp_shard * self.cp // self.ep)

    def sizes(self) -> dict[str, int]:
        """The mesh's degrees by name."""
        return {name: getattr(self.dims, name) for name in DIMS}

    def options(self) -> list[str]:
        """The ``parallel`` options this layout composes, in ``+`` order."""
        others = [name for name in ("tp", "pp", "cp", "ep") if getattr(self, name) > 1]
        if self.zero != "none":
            return ["fsdp", *others]
        # tp, pp and ep replicate over the ranks they leave themselves (parallel=dp+tp is refused).
        return others if {"tp", "pp", "ep"} & set(others) else ["dp", *others]

    def describe(self) -> str:
        parts = [ZERO_NAMES[self.zero] + (f" over {self.shards}" if self.zero != "none" else f" x{self.dp}")]
        parts += [f"{name}={getattr(self, name)}" for name in ("tp", "pp", "cp", "ep") if getattr(self, name) > 1]
        if self.pp > 1 and (self.pp_schedule != "1F1B" or self.stages_per_rank > 1):
            parts.append(f"{self.pp_schedule}" + (f" v={self.stages_per_rank}" if self.stages_per_rank > 1 else ""))
        if self.sequence_parallel:
            parts.append("sequence parallel")
        if self.recompute != "none":
            parts.append(f"recompute={self.recompute}")
        if self.recompute_kind == "every_n":
            parts.append(f"every {self.recompute_every_n_blocks} blocks")
        elif self.recompute_kind == "per_op_half":
            parts.append("every other matmul kept")
        if self.loss_chunks > 1:
            parts.append(f"loss in {self.loss_chunks} chunks")
        if self.sync_each_microbatch:
            parts.append("gradients reduced every micro-batch")
        parts.append(f"{self.mixed_precision}, micro-batch {self.micro_batch_size}")
        return ", ".join(parts)


def microbatches_per_step(cfg: DictConfig, layout: Layout) -> int:
    """Micro-batches per optimizer step on one data-parallel rank."""
    return max(1, cfg.data.global_batch_size // (layout.dp * layout.micro_batch_size))


def loss_chunks_of(cfg: DictConfig) -> int:
    """The run's ``model.loss_chunks`` (1 when unset); ``ConfigError`` below 1, as the run's check says."""
    chunks = cfg.model.get("loss_chunks", 1)
    chunks = 1 if chunks is None else chunks
    if chunks < 1:
        raise ConfigError(f"model.loss_chunks={chunks} must be >= 1 (1: the head and loss at once)")
    return chunks


def current_layout(cfg: DictConfig) -> Layout:
    """The layout ``cfg`` would run (``trainer.devices x trainer.num_nodes`` ranks)."""
    parallel = ParallelConfig.of(cfg)
    deg = parallel.dims(cfg.trainer.devices * cfg.trainer.num_nodes)
    fsdp, tp = parallel.fsdp, parallel.tp
    zero = "none" if fsdp is None or fsdp.sharding == "no_shard" else fsdp.sharding
    bf16 = (fsdp is not None and fsdp.mixed_precision != "fp32") or cfg.trainer.precision.startswith("bf16")
    micro_batch = cfg.data.micro_batch_size
    if parallel.pp is not None and parallel.pp.microbatches:  # the pipeline cuts the local batch its own way
        micro_batch = max(1, cfg.data.global_batch_size // deg.dp // parallel.pp.microbatches)
    return Layout(
        deg.dp_replicate,
        deg.dp_shard,
        deg.tp,
        deg.pp,
        deg.cp,
        deg.ep,
        zero,
        "bf16" if bf16 else "fp32",
        cfg.parallel.recompute,
        bool(tp is not None and tp.sequence_parallel),
        micro_batch,
        **pipeline_knobs(cfg),
        recompute_every_n_blocks=cfg.parallel.get("recompute_every_n_blocks", 0),
        recompute_keep_matmuls=cfg.parallel.get("recompute_keep_matmuls", "all"),
        loss_chunks=loss_chunks_of(cfg),
        sync_each_microbatch=bool(fsdp is not None and fsdp.sync_each_microbatch),
    )


def pipeline_knobs(cfg: DictConfig) -> dict[str, Any]:
    """The run's pipeline schedule and virtual stages (``parallel.pp``), for the layouts advise tries;
    the defaults of ``conf/parallel/pp.yaml`` without pp."""
    pp = ParallelConfig.of(cfg).pp
    return {"pp_schedule": pp.schedule, "virtual_stages": pp.virtual_stages} if pp is not None else {}


def train_command(cfg: DictConfig, layout: Layout, user_overrides: Sequence[str] = ()) -> str:
    """``python train.py ...`` for ``layout``: the user's overrides, less those the layout sets and
    the ``parallel.<option>.*`` keys of options the layout does not compose (the user's
    ``parallel.pp.schedule`` stays with a pipeline; ``parallel.cp.pattern`` goes without cp)."""
    hw = cfg.hardware
    mine = {
        "parallel",
        "parallel.fsdp.sharding",
        "parallel.fsdp.replicas",
        "parallel.fsdp.mixed_precision",
        "parallel.tp.size",
        "parallel.tp.sequence_parallel",
        "parallel.pp.size",
        "parallel.pp.schedule",
        "parallel.pp.virtual_stages",
        "parallel.cp.size",
        "parallel.ep.size",
        "parallel.recompute",
        "trainer.devices",
        "trainer.num_nodes",
        "trainer.precision",
        "data.micro_batch_size",
        "model.loss_chunks",
        "parallel.fsdp.sync_each_microbatch",
    }
    options = set(layout.options())

    def kept(override: str) -> bool:
        key = override.lstrip("+~").partition("=")[0]
        parts = key.split(".")
        if key in mine:
            return False
        if key == "parallel.recompute_keep_matmuls" and layout.recompute != "selective":
            return False  # per-op selective's knob: refused with any other recompute
        return not (parts[0] == "parallel" and len(parts) > 2 and parts[1] not in options)

    args = [o for o in user_overrides if kept(o)]
    args.append(f"parallel={'+'.join(layout.options())}")
    if layout.zero != "none":
        args.append(f"parallel.fsdp.sharding={layout.zero}")
        if layout.zero == "hybrid":
            args.append(f"parallel.fsdp.replicas={layout.dp_replicate}")
        args.append(f"parallel.fsdp.mixed_precision={layout.mixed_precision}")
    elif layout.mixed_precision == "bf16":
        args.append("trainer.precision=bf16-mixed")
    for name in ("tp", "pp", "cp", "ep"):
        if getattr(layout, name) > 1:
            args.append(f"parallel.{name}.size={getattr(layout, name)}")
    if layout.pp > 1 and layout.pp_schedule != "1F1B":  # conf/parallel/pp.yaml's defaults: 1F1B, virtual_stages null
        args.append(f"parallel.pp.schedule={layout.pp_schedule}")
    if layout.pp > 1 and layout.virtual_stages is not None:
        args.append(f"parallel.pp.virtual_stages={layout.virtual_stages}")
    if layout.loss_chunks > 1:
        args.append(f"model.loss_chunks={layout.loss_chunks}")
    if layout.sync_each_microbatch and layout.zero != "none":
        args.append("parallel.fsdp.sync_each_microbatch=true")
    if layout.sequence_parallel:
        args.append("parallel.tp.sequence_parallel=true")
    if layout.recompute != "none":
        args.append(f"parallel.recompute={layout.recompute}")
    user_micro_batch = any(o.lstrip("+~").startswith("data.micro_batch_size") for o in user_overrides)
    if layout.micro_batch_size != cfg.data.micro_batch_size or user_micro_batch:  # the user's was dropped above
        args.append(f"data.micro_batch_size={layout.micro_batch_size}")
    args += [f"trainer.devices={hw.gpus_per_node}", f"trainer.num_nodes={hw.nodes}"]
    return "python train.py " + " ".join(args)


# ----------------------------------------------------------------------------------------------
# Layout strings


@dataclass(frozen=True)
class LayoutSpec:
    """One layout string, parsed: ``[NAME:] [OPTIONS] [KEY=VALUE ...]``."""

    text: str  # as given
    name: str  # the NAME before ``:``; else the text
    options: Optional[str]  # the parallel options, e.g. "fsdp+tp"; None where the overrides name them
    overrides: tuple[str, ...]  # full Hydra overrides (``parallel.`` prefixed where it was left out)

    def hydra_overrides(self) -> tuple[str, ...]:
        """The overrides that run this layout: ``parallel=OPTIONS`` (if given), then the rest."""
        return ((f"parallel={self.options}",) if self.options else ()) + self.overrides


def parse_layout(text: str, where: str, options_first: bool = False) -> LayoutSpec:
    """Parse ``[NAME:] [OPTIONS] [KEY=VALUE ...]``, each error a ``PlanningError`` starting with ``where``.

    * ``NAME:``: a label (what comes before the first ``:``, if it holds no ``=``);
    * ``OPTIONS``: a first word without ``=``: the ``parallel`` options joined by ``+`` (``fsdp+tp``),
      which stands for ``parallel=fsdp+tp``; ``options_first``: required;
    * ``KEY=VALUE``: Hydra overrides (``~KEY`` deletes); a key starting with an option or ``recompute``
      gets the ``parallel.`` prefix (``tp.size=4`` is ``parallel.tp.size=4``).

    ``dp;fsdp fsdp.sharding=optimizer`` items (``capacity_sweep.py``) and ``tp4: parallel=tp
    parallel.tp.size=4 trainer.devices=4`` (``bench.py --layout``) are both layout strings."""
    name, colon, rest = text.partition(":")
    if colon and "=" not in name:
        name, body = name.strip(), rest
    else:
        name, body = text.strip(), text
    words = body.split()
    if options_first and (not words or "=" in words[0]):
        raise PlanningError(f"{where}: start with the parallel options (e.g. 'fsdp+tp tp.size=4')")
    options = None
    if words and "=" not in words[0] and (options_first or not words[0].startswith("~")):
        options = words.pop(0)
        names = options.split("+")
        unknown = [n for n in names if n not in OPTIONS]
        if unknown or len(set(names)) != len(names):
            raise PlanningError(
                f"{where}: unknown or repeated option(s) {unknown or names}; expected {', '.join(OPTIONS)} joined by +"
            )
    overrides = []
    for word in words:
        key, eq, _ = word.partition("=")
        if not eq and not word.startswith("~"):
            raise PlanningError(f"{where}: {word!r} is not key=value")
        overrides.append(f"parallel.{word}" if key.split(".")[0] in PARALLEL_KEYS else word)
    if not name or not (options or overrides):
        raise PlanningError(f"{where}: expected 'NAME: overrides...' or 'overrides...', e.g. {LAYOUT_EXAMPLE}")
    return LayoutSpec(text, name, options, tuple(overrides))
