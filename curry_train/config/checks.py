"""Checks a composed config can run, before any worker starts; every failure is one actionable line.

``check`` also works out what the launcher needs: the accelerator, the layout's ``ParallelDims`` (built
here once and handed to every worker), and the checkpoint to resume from. No torch is imported unless
the accelerator must be found (last, once everything else passed) or a pretrained directory's weights
are checked: a bad input is answered at once.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from curry_train.checkpoint import files
from curry_train.checkpoint.hf_config import MOE_SHAPE_KEYS, PretrainedError, hf_kind, model_config
from curry_train.config import ConfigError
from curry_train.config.resume import resolve
from curry_train.config.schema import ParallelConfig, unknown_keys
from curry_train.data.mixture import DataSurvey, survey
from curry_train.data.sources import TOKENIZER_FILE, DataError
from curry_train.layout.dims import ParallelDims
from curry_train.layout.pipeline import check_microbatches, split_layers, stages_per_rank
from curry_train.model.config import MoEConfig, RopeScalingConfig
from curry_train.options import (
    ACCELERATORS,
    ASYNC_MODES,
    BACKWARD_PREFETCH,
    BALANCING,
    COMPILE_BACKENDS,
    CP_PATTERNS,
    DATA_SOURCES,
    EP_DISPATCHERS,
    EXPERT_SHARDING,
    EXPORT_DTYPES,
    LOGGERS,
    LR_SCHEDULES,
    MIXED_PRECISIONS,
    PRECISIONS,
    RECOMPUTE_KEEP_MATMULS,
    RECOMPUTE_MODES,
    SCORE_FUNCTIONS,
    SHARDING_MODES,
)

log = logging.getLogger(__name__)
MAX_SEED = 2**32 - 1  # what every RNG seeded from it (numpy's included) accepts


@dataclass(frozen=True)
class LaunchPlan:
    accelerator: str  # "cpu" or "cuda"
    dims: ParallelDims  # the layout's degrees on trainer.devices x trainer.num_nodes ranks
    external_launcher: Optional[str]  # "torchrun", "slurm" or None (curry-train starts the workers)
    ckpt_path: Optional[str]  # absolute path of the checkpoint to resume from

    @property
    def world_size(self) -> int:
        return self.dims.world_size


def external_launcher(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """Who started this process, if not curry-train: torchrun (or any launcher with its variables) or srun."""
    if "TORCHELASTIC_RUN_ID" in env or {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= env.keys():
        return "torchrun"
    if "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return None


def enabled_options(cfg: DictConfig) -> list[str]:
    """The ``parallel`` options this run composed (``parallel=fsdp+tp`` -> ``["fsdp", "tp"]``)."""
    return ParallelConfig.of(cfg).options


def pipeline_microbatches(cfg: DictConfig, dims: ParallelDims) -> int:
    """Micro-batches per step on each data-parallel rank of a pipelined run."""
    return ParallelConfig.of(cfg).pipeline_microbatches(cfg.data.global_batch_size, cfg.data.micro_batch_size, dims.dp)


def _check_devices(layout: ParallelConfig, accelerator: str, devices: int) -> None:
    """What the accelerator decides: a GPU's own options, and that the devices asked for exist."""
    if layout.fsdp is not None and layout.fsdp.cpu_offload and accelerator != "cuda":
        raise ConfigError("parallel.fsdp.cpu_offload=true needs a GPU: on a CPU run the state is in CPU memory already")
    if layout.fsdp is not None and layout.fsdp.async_reduce_scatter and accelerator == "cuda":
        raise ConfigError(
            "parallel.fsdp.async_reduce_scatter=true applies to a CPU run: on a GPU FSDP2 overlaps the "
            "reduce-scatter on its own stream; leave it null"
        )
    if accelerator == "cuda":
        import torch  # noqa: PLC0415  (imported by _accelerator already: a GPU run)

        if devices > torch.cuda.device_count():
            raise ConfigError(
                f"trainer.devices={devices} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )


def _check_parallel(layout: ParallelConfig, precision: str) -> None:
    options = layout.options
    if "dp" in options and "fsdp" in options:
        raise ConfigError(
            "parallel=dp+fsdp: fsdp already does data parallelism; for replicas of shards use parallel=fsdp "
            "parallel.fsdp.sharding=hybrid"
        )
    if layout.recompute not in RECOMPUTE_MODES:
        raise ConfigError(f"parallel.recompute={layout.recompute!r}: expected one of {', '.join(RECOMPUTE_MODES)}")
    if layout.recompute_every_n_blocks < 0:
        raise ConfigError(f"parallel.recompute_every_n_blocks={layout.recompute_every_n_blocks} must be >= 0")
    if layout.recompute_keep_matmuls not in RECOMPUTE_KEEP_MATMULS:
        raise ConfigError(
            f"parallel.recompute_keep_matmuls={layout.recompute_keep_matmuls!r}: expected one of "
            f"{', '.join(RECOMPUTE_KEEP_MATMULS)}"
        )
    if layout.recompute_keep_matmuls != "all" and (layout.recompute != "selective" or layout.recompute_every_n_blocks):
        raise ConfigError(
            f"parallel.recompute_keep_matmuls={layout.recompute_keep_matmuls} applies to per-op selective recompute: "
            "set parallel.recompute=selective and parallel.recompute_every_n_blocks=0"
        )
    if layout.dp is not None and layout.dp.bucket_cap_mb < 1:
        raise ConfigError(f"parallel.dp.bucket_cap_mb={layout.dp.bucket_cap_mb} must be positive")
    fsdp = layout.fsdp
    if fsdp is None:
        return
    if fsdp.sharding not in SHARDING_MODES:
        raise ConfigError(f"parallel.fsdp.sharding={fsdp.sharding!r}: expected one of {', '.join(SHARDING_MODES)}")
    if fsdp.mixed_precision not in MIXED_PRECISIONS:
        raise ConfigError(
            f"parallel.fsdp.mixed_precision={fsdp.mixed_precision!r}: expected one of {', '.join(MIXED_PRECISIONS)}"
        )
    if fsdp.backward_prefetch not in BACKWARD_PREFETCH:
        raise ConfigError(
            f"parallel.fsdp.backward_prefetch={fsdp.backward_prefetch!r}: FSDP2 offers {', '.join(BACKWARD_PREFETCH)}"
        )
    if fsdp.sharding == "hybrid" and fsdp.replicas < 1:
        raise ConfigError(f"parallel.fsdp.replicas={fsdp.replicas} must be positive")
    if fsdp.blocks_per_unit < 1:
        raise ConfigError(f"parallel.fsdp.blocks_per_unit={fsdp.blocks_per_unit} must be positive")
    if fsdp.explicit_prefetch and (fsdp.sharding == "optimizer" or layout.pp is not None):
        raise ConfigError(
            "parallel.fsdp.explicit_prefetch=true with "
            + (
                "sharding=optimizer: ZeRO-1 gathers its parameters once per step, with no units to prefetch"
                if fsdp.sharding == "optimizer"
                else "parallel=pp: each stage runs its own share of the blocks; leave it null"
            )
        )
    if fsdp.async_reduce_scatter and fsdp.sharding in ("optimizer", "no_shard", "hybrid"):
        raise ConfigError(
            f"parallel.fsdp.async_reduce_scatter=true with sharding={fsdp.sharding}: "
            + (
                "FSDP2 all-reduces each reduce-scatter's output across the replicas as soon as it returns"
                if fsdp.sharding == "hybrid"
                else "its gradients are all-reduced, with no reduce-scatter to complete later"
            )
        )
    if fsdp.sharding == "optimizer":
        if fsdp.reshard_after_forward:
            raise ConfigError(
                "parallel.fsdp.reshard_after_forward=true with sharding=optimizer: ZeRO-1 keeps full parameters; "
                "use sharding=full to reshard"
            )
        if fsdp.blocks_per_unit != 1:
            raise ConfigError(
                f"parallel.fsdp.blocks_per_unit={fsdp.blocks_per_unit} with sharding=optimizer: ZeRO-1 has no "
                "wrapping units"
            )
    if precision != "32-true" and fsdp.mixed_precision != "fp32":
        raise ConfigError(
            f"trainer.precision={precision} and parallel.fsdp.mixed_precision={fsdp.mixed_precision}:"
            " choose one; with fsdp, mixed precision is parallel.fsdp.mixed_precision"
        )


def _check_tensor_parallel(cfg: DictConfig, layout: ParallelConfig, world_size: int) -> None:
    """Every split dimension must divide evenly over the tensor-parallel ranks (no uneven shards)."""
    if layout.tp is None:
        return
    tp, m = layout.tp.size, cfg.model
    if tp < 1:
        raise ConfigError(f"parallel.tp.size={tp} must be positive")
    if "dp" in layout.options:
        raise ConfigError(
            "parallel=dp+tp: parallel=tp already replicates the model over the ranks tp leaves;"
            " use parallel=tp, or parallel=fsdp+tp to shard them"
        )
    split = {
        "model.n_heads": (m.n_heads, "query heads"),
        "model.n_kv_heads": (m.n_kv_heads, "key/value heads"),
        "model.dim": (m.dim, "embedding columns"),
        "model.ffn_dim": (m.ffn_dim, "MLP hidden units"),
        "model.vocab_size": (m.vocab_size, "vocabulary rows of the embedding and the head"),
    }
    for key, (size, what) in split.items():
        if size % tp:
            raise ConfigError(
                f"parallel.tp.size={tp} does not divide {key}={size} ({what} split over the ranks);"
                f" choose a tp size that divides it"
            )
    if m.qk_norm:
        raise ConfigError(
            "model.qk_norm (Qwen3) with parallel.tp is not supported yet: each rank's heads would train the shared"
            " q/k norm weights apart; use fsdp, pp, cp or ep"
        )
    if world_size % tp:
        raise ConfigError(
            f"parallel.tp.size={tp} does not divide the world size {world_size} (trainer.devices x trainer.num_nodes)"
        )


def _check_keys(cfg: DictConfig) -> None:
    for key, beside in unknown_keys(cfg):
        *parents, name = key.split(".")
        close = difflib.get_close_matches(name, beside, n=1)
        hint = f": did you mean {'.'.join([*parents, close[0]])}?" if close else ""
        raise ConfigError(
            f"{key}: no such key in the schema{hint} (the keys it has are set without '+':"
            " curry_train/config/schema.py)"
        )


def _accelerator(requested: str) -> str:
    """``cpu`` or ``cuda`` for ``trainer.accelerator`` (already one of ``ACCELERATORS``)."""
    if requested == "cpu":
        return "cpu"
    import torch  # noqa: PLC0415  (only a run that is otherwise good waits for torch: the last check)

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={requested} but no CUDA device is visible; use trainer.accelerator=cpu"
            )
        return "cuda"
    return "cpu"


def _check_model(cfg: DictConfig) -> None:
    m = cfg.model
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
        if m[key] < 1:
            raise ConfigError(f"model.{key}={m[key]} must be positive")
    if m.head_dim is not None:
        if m.head_dim < 2 or m.head_dim % 2:
            raise ConfigError(f"model.head_dim={m.head_dim} must be a positive even number (rotary embeddings)")
    elif m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads} (or set model.head_dim)")
    elif (m.dim // m.n_heads) % 2:
        raise ConfigError(f"head dim model.dim/model.n_heads={m.dim // m.n_heads} must be even for rotary embeddings")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if m.moe is not None:
        _check_moe(m)
    if m.loss_chunks < 1:
        raise ConfigError(f"model.loss_chunks={m.loss_chunks} must be >= 1 (1: the head and loss at once)")
    if m.lora is not None:
        _check_lora(m)
    scaling = m.rope_scaling
    if scaling is not None:
        if scaling.type != "llama3":
            raise ConfigError(f"model.rope_scaling.type={scaling.type!r}: only llama3 is supported (null: plain RoPE)")
        if not (scaling.factor > 0 and 0 < scaling.low_freq_factor < scaling.high_freq_factor):
            raise ConfigError("model.rope_scaling: factor must be positive and 0 < low_freq_factor < high_freq_factor")
        if scaling.original_max_seq_len < 1:
            raise ConfigError(
                f"model.rope_scaling.original_max_seq_len={scaling.original_max_seq_len} must be positive"
            )
    for key in ("norm_eps", "rope_theta", "init_std"):
        if not (math.isfinite(m[key]) and m[key] > 0):
            raise ConfigError(f"model.{key}={m[key]} must be a positive number")


# The linears LoRA adapts, by path suffix (model/llama.py; feed_forward.*: the dense blocks' MLP)
LORA_TARGETS = (
    *(f"attention.{w}" for w in ("wq", "wk", "wv", "wo")),
    *(f"feed_forward.{w}" for w in ("w1", "w2", "w3")),
)
# The routed experts' stacked weights (MoE blocks; one adapter pair per expert)
LORA_EXPERT_TARGETS = tuple(f"feed_forward.experts.{w}" for w in ("w1", "w2", "w3"))


def _check_lora(m: DictConfig) -> None:
    lora = m.lora
    if lora.rank < 1:
        raise ConfigError(f"model.lora.rank={lora.rank} must be at least 1")
    if not (math.isfinite(lora.alpha) and lora.alpha > 0) or not 0 <= lora.dropout < 1:
        raise ConfigError("model.lora.alpha must be positive and model.lora.dropout in [0, 1)")
    if not lora.targets:
        raise ConfigError("model.lora.targets is empty: name the linears to adapt, e.g. [attention.wq, attention.wv]")
    for target in lora.targets:
        if target not in (*LORA_TARGETS, *LORA_EXPERT_TARGETS, "output"):
            raise ConfigError(
                f"model.lora.targets: {target!r} matches no linear layer"
                f" (expected of {', '.join(LORA_TARGETS)}, output; with experts {', '.join(LORA_EXPERT_TARGETS)})"
            )
        if target in LORA_EXPERT_TARGETS:
            if m.moe is None:
                raise ConfigError(f"model.lora.targets: {target!r}: the model has no experts (model.moe is null)")
            continue
        dense = m.moe is None or m.moe.dense_layers > 0
        if target.startswith("feed_forward.") and not dense:
            raise ConfigError(
                f"model.lora.targets: {target!r} matches no linear layer: every block's MLP is a mixture of experts"
                f" (the experts' weights are {', '.join(LORA_EXPERT_TARGETS)})"
            )
    if lora.base_dtype not in ("fp32", "bf16"):
        raise ConfigError(f"model.lora.base_dtype={lora.base_dtype!r}: expected fp32 or bf16")
    if m.init_from is None:
        log.warning("model.lora without model.init_from: the adapters train on a randomly initialized, frozen base")


def _check_bf16_base(cfg: DictConfig, layout: ParallelConfig) -> None:
    lora = cfg.model.lora
    if lora is None or lora.base_dtype != "bf16":
        return
    fsdp_bf16 = layout.fsdp is not None and layout.fsdp.mixed_precision == "bf16"
    if not (fsdp_bf16 or str(cfg.trainer.precision).startswith("bf16")):
        raise ConfigError(
            "model.lora.base_dtype=bf16 computes in bf16: set trainer.precision=bf16-mixed, or"
            " parallel.fsdp.mixed_precision=bf16"
        )


def _check_moe(m: DictConfig) -> None:
    moe = m.moe
    if not 1 <= moe.top_k <= moe.experts:
        raise ConfigError(f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.experts={moe.experts}")
    if moe.expert_ffn_dim < 1 or moe.shared_experts < 0:
        raise ConfigError("model.moe.expert_ffn_dim must be positive and model.moe.shared_experts >= 0")
    if not 0 <= moe.dense_layers <= m.n_layers:
        raise ConfigError(
            f"model.moe.dense_layers={moe.dense_layers} must be between 0 and model.n_layers={m.n_layers}"
        )
    if moe.score_function not in SCORE_FUNCTIONS:
        raise ConfigError(
            f"model.moe.score_function={moe.score_function!r}: expected one of {', '.join(SCORE_FUNCTIONS)}"
        )
    if moe.balancing not in BALANCING:
        raise ConfigError(f"model.moe.balancing={moe.balancing!r}: expected one of {', '.join(BALANCING)}")
    if moe.capacity_factor is not None and not moe.capacity_factor > 0:
        raise ConfigError(f"model.moe.capacity_factor={moe.capacity_factor} must be positive (null: dropless)")
    for key in ("bias_update_rate", "aux_loss_coef", "z_loss_coef"):
        if not (math.isfinite(moe[key]) and moe[key] >= 0):
            raise ConfigError(f"model.moe.{key}={moe[key]} must be a finite number >= 0")


def _check_moe_layout(cfg: DictConfig, layout: ParallelConfig, dims: ParallelDims) -> None:
    moe = cfg.model.moe
    if layout.ep is not None:
        ep = layout.ep.size
        if moe is None:
            raise ConfigError(
                f"parallel.ep needs a mixture-of-experts model (model.moe); model={cfg.model.name} is dense"
            )
        if ep < 2:
            raise ConfigError(f"parallel.ep.size={ep} must be at least 2 (leave ep out for one rank per expert set)")
        if layout.ep.dispatcher not in EP_DISPATCHERS:
            raise ConfigError(
                f"parallel.ep.dispatcher={layout.ep.dispatcher!r}: expected one of {', '.join(EP_DISPATCHERS)}"
            )
        if moe.experts % ep:
            raise ConfigError(f"model.moe.experts={moe.experts} cannot be split evenly over parallel.ep.size={ep}")
        if (dims.dp * dims.cp) % ep:
            raise ConfigError(
                f"parallel.ep.size={ep} must divide the {dims.dp * dims.cp} ranks holding distinct tokens"
                f" (dp={dims.dp} x cp={dims.cp}): expert parallelism borrows its ranks from them"
            )
        if moe.dense_layers >= cfg.model.n_layers:
            raise ConfigError(
                f"parallel.ep with model.moe.dense_layers={moe.dense_layers} = model.n_layers: no block has experts"
            )
        if layout.fsdp is not None and layout.fsdp.sharding not in EXPERT_SHARDING:
            raise ConfigError(
                f"parallel.fsdp.sharding={layout.fsdp.sharding} with parallel.ep: expert parallelism composes with"
                f" {', '.join(EXPERT_SHARDING)} so far"
            )
    if moe is not None and layout.tp is not None and layout.tp.sequence_parallel:
        raise ConfigError(
            "model.moe with parallel.tp.sequence_parallel=true: the experts would see each rank's sequence shard;"
            " use sequence_parallel=false (attention tensor-parallel, experts whole)"
        )


def _survey_data(cfg: DictConfig) -> DataSurvey:
    d = cfg.data
    if d.sources is None:
        if d.source not in DATA_SOURCES:
            raise ConfigError(f"data.source={d.source!r}: expected one of {', '.join(DATA_SOURCES)}")
        if d.source != "stdlib" and not d.paths:
            raise ConfigError(f"data.source={d.source} needs data.paths, e.g. 'data.paths=[/data/corpus.txt]'")
        if d.source == "stdlib" and d.paths:  # else the bundled corpus trains and the paths are never read
            raise ConfigError(
                f"data.paths={list(d.paths)} with data.source=stdlib (the bundled corpus): choose the source the"
                " paths are, e.g. data=files (text, JSONL), data=tokens, data.source=parquet or datasets"
            )
        for path in d.paths if d.source in ("files", "tokens") else ():
            if not Path(path).is_file():
                raise ConfigError(f"data.paths: {path} does not exist (or is not a file)")
    elif d.paths:
        raise ConfigError(
            "data.paths with data.sources: a mixture's sources name their own paths (data.sources[*].paths)"
        )
    try:
        return survey(d)
    except (DataError, ImportError) as error:
        raise ConfigError(str(error)) from None


def check_checkpoint_dir(location: Optional[str]) -> None:
    """A probe write into ``checkpoint.dir`` (and its removal): an unreachable bucket, a denied write or a
    missing fsspec backend is one line now, not a failure at the first save."""
    if not location:
        return
    try:
        directory = files.place(location)
        if files.on_disk(directory):  # an object store has no directories to make (a bucket is not made here)
            directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".curry-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"curry-train checks that it can write here")
        probe.unlink()
    except ImportError as error:  # fsspec knows the protocol, its package is not installed
        raise ConfigError(f"checkpoint.dir={location}: {error}") from None
    except Exception as error:  # denied, no such bucket, an endpoint that does not answer
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        where = " (credentials and endpoint come from the environment: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)"
        raise ConfigError(
            f"checkpoint.dir={location}: cannot write there ({type(error).__name__}: {text})"
            + ("" if files.on_disk(files.place(location)) else where)
        ) from None


def _check_data_fills_batches(cfg: DictConfig, data: DataSurvey) -> None:
    """A batch the data cannot fill is an error; a validation set too short for one batch, a warning."""
    d = cfg.data
    if any(s.train_rows is None for s in data.sources):  # large text, counted when the workers read it
        return
    train = sum(s.train_rows for s in data.sources)
    tokens = sum(s.tokens for s in data.sources)
    if train < d.global_batch_size:
        raise ConfigError(
            f"data: {tokens} tokens make {train} training sequences of data.seq_len={d.seq_len}"
            f" (after data.val_fraction={d.val_fraction} is held out), fewer than one global batch"
            f" (data.global_batch_size={d.global_batch_size}); add data, or lower data.seq_len or the batch size"
        )
    for source in data.sources:
        if source.train_rows == 0:
            raise ConfigError(
                f"data: source {source.name}'s {source.tokens} tokens make no training sequence of"
                f" data.seq_len={d.seq_len} (after data.val_fraction={d.val_fraction} is held out)"
            )
    val = sum(s.val_rows for s in data.sources)
    if d.val_fraction > 0 and cfg.trainer.limit_val_batches > 0 and val < d.global_batch_size:
        log.warning(
            "data: the held-out data make %d validation sequences, fewer than one global batch (%d):"
            " this run validates nothing; raise data.val_fraction, or set trainer.limit_val_batches=0",
            val,
            d.global_batch_size,
        )


def _check_batch(cfg: DictConfig, dims: ParallelDims) -> None:
    d, m = cfg.data, cfg.model
    if d.seq_len < 1 or d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} must be between 1 and model.max_seq_len={m.max_seq_len}")
    if d.micro_batch_size < 1 or d.global_batch_size < 1:
        raise ConfigError("data.micro_batch_size and data.global_batch_size must be positive")
    per_step = d.micro_batch_size * dims.dp
    if d.global_batch_size % per_step:
        raise ConfigError(
            f"data.global_batch_size={d.global_batch_size} is not divisible by "
            f"data.micro_batch_size={d.micro_batch_size}"
            f" x data-parallel ranks {dims.dp} = {per_step}; choose a multiple of {per_step}"
        )
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")


def _check_pipeline(cfg: DictConfig, layout: ParallelConfig, dims: ParallelDims) -> None:
    pp = layout.pp
    if pp is None:
        return
    if pp.size < 1:
        raise ConfigError(f"parallel.pp.size={pp.size} must be positive")
    if cfg.model.loss_chunks > 1:
        raise ConfigError(
            f"model.loss_chunks={cfg.model.loss_chunks} with parallel.pp is not supported yet: the last stage's"
            " schedule computes the loss from whole logits; use model.loss_chunks=1"
        )
    if "dp" in layout.options:
        raise ConfigError(
            "parallel=dp+pp: parallel=pp already replicates the stages over the ranks pp leaves;"
            " use parallel=pp, or parallel=fsdp+pp to shard them"
        )
    try:
        per_rank = stages_per_rank(pp.schedule, pp.virtual_stages)
        n_stages = pp.size * per_rank
        split_layers(cfg.model.n_layers, n_stages, pp.layers_per_stage)
    except ValueError as error:
        raise ConfigError(f"parallel.pp (size={pp.size}, schedule={pp.schedule}): {error}") from None
    if cfg.model.tie_embeddings and pp.size > 1:
        raise ConfigError(
            "model.tie_embeddings=true with parallel=pp: the embedding and the head live on different stages"
        )
    local = cfg.data.global_batch_size // dims.dp
    if pp.microbatches is not None and (pp.microbatches < 1 or local % pp.microbatches):
        raise ConfigError(
            f"parallel.pp.microbatches={pp.microbatches} does not divide the {local} samples each data-parallel rank"
            f" gets per step (data.global_batch_size={cfg.data.global_batch_size} over {dims.dp} ranks)"
        )
    microbatches = layout.pipeline_microbatches(cfg.data.global_batch_size, cfg.data.micro_batch_size, dims.dp)
    try:
        check_microbatches(pp.schedule, microbatches, pp.size, n_stages)
    except ValueError as error:
        raise ConfigError(
            f"parallel.pp: {error} (micro-batches per step: {microbatches}; set parallel.pp.microbatches or"
            " data.global_batch_size / data.micro_batch_size)"
        ) from None


def _check_context_parallel(cfg: DictConfig, layout: ParallelConfig) -> None:
    cp = layout.cp
    if cp is None:
        return
    if cp.size < 1:
        raise ConfigError(f"parallel.cp.size={cp.size} must be positive")
    if cp.pattern not in CP_PATTERNS:
        raise ConfigError(f"parallel.cp.pattern={cp.pattern!r}: expected one of {', '.join(CP_PATTERNS)}")
    parts = 2 * cp.size if cp.load_balance else cp.size
    if cfg.data.seq_len % parts:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is not divisible by {parts}"
            f" ({'2 x ' if cp.load_balance else ''}parallel.cp.size={cp.size}: each rank holds equal chunks)"
        )
    heads = cfg.model.n_heads // layout.size("tp")
    if cp.pattern == "alltoall" and heads % cp.size:
        raise ConfigError(
            f"parallel.cp.pattern=alltoall scatters heads: {heads} heads per rank (model.n_heads / tp)"
            f" do not divide by parallel.cp.size={cp.size}"
        )
    if cp.pattern == "double_ring" and cp.inner_ring is not None and (cp.inner_ring < 1 or cp.size % cp.inner_ring):
        raise ConfigError(f"parallel.cp.inner_ring={cp.inner_ring} does not divide parallel.cp.size={cp.size}")
    if cfg.model.dropout:
        raise ConfigError(
            f"model.dropout={cfg.model.dropout} with parallel=cp: context-parallel attention has no dropout; set 0"
        )
    if "dp" in layout.options and ("tp" in layout.options or "pp" in layout.options):
        raise ConfigError("parallel=dp with tp or pp: those replicate over the ranks they leave already; drop dp")


def check_eval(cfg: DictConfig, data: Optional[DataSurvey]) -> None:
    """``eval``: its cadence and limits, each named set readable, not empty and in the run's vocabulary
    (``data``: the training data's survey; None: the model's vocabulary), and each harness task known with
    its data loadable (lm-eval is imported only when tasks are named)."""
    e, max_steps = cfg.eval, cfg.trainer.max_steps
    for key, every in (
        ("eval.every_n_steps", e.every_n_steps),
        ("eval.harness.every_n_steps", e.harness.every_n_steps),
    ):
        if every is not None and not 0 <= every <= max_steps:
            raise ConfigError(f"{key}={every}: expected 0 (after the last step only) to trainer.max_steps={max_steps}")
    for key, value, least in (
        ("eval.max_batches", e.max_batches, 1),
        ("eval.harness.limit", e.harness.limit, 1),
        ("eval.harness.num_fewshot", e.harness.num_fewshot, 0),
    ):
        if value is not None and value < least:
            raise ConfigError(f"{key}={value} must be at least {least} (null: no limit)")
    sets = e.sets
    if sets is not None and not isinstance(sets, Mapping):
        raise ConfigError("eval.sets: a map name -> data source, e.g. {wiki: {kind: files, paths: [/data/wiki.txt]}}")
    if data is not None:
        vocab = data.vocab_size
    elif sets:  # no training data (curry-eval): the run's tokenizer's
        from curry_train.data.sources import make_tokenizer  # noqa: PLC0415

        vocab = make_tokenizer(str(cfg.data.tokenizer)).vocab_size
    for name, spec in (sets or {}).items():
        one = OmegaConf.merge(cfg.data, {"sources": None, "val_fraction": 0.0})
        one.sources = {str(name): spec}
        try:
            (found,) = survey(one).sources
        except (DataError, ImportError, ValueError) as error:
            raise ConfigError(f"eval.sets.{name}: {error}") from None
        if found.vocab_size != vocab:
            raise ConfigError(
                f"eval.sets.{name}: its tokens are of another vocabulary ({found.vocab_size} ids; the run's"
                f" {vocab}): read it with the run's tokenizer (its tokenizer: key, or data.tokenizer)"
            )
        if found.tokens == 0 or found.train_rows == 0:
            raise ConfigError(
                f"eval.sets.{name}: empty: {found.tokens} tokens, fewer than one row"
                f" (data.seq_len={cfg.data.seq_len} + 1)"
            )
    if e.harness.tasks:
        from curry_train.config.eval_tasks import HarnessError, check_tasks  # noqa: PLC0415

        try:
            check_tasks(list(e.harness.tasks), e.harness.include_path)
        except HarnessError as error:
            raise ConfigError(str(error)) from None


def _check_training(cfg: DictConfig) -> None:
    t, o, c = cfg.trainer, cfg.optim, cfg.checkpoint
    if t.max_steps < 1:
        raise ConfigError(f"trainer.max_steps={t.max_steps} must be positive")
    if t.timeout < 1:
        raise ConfigError(f"trainer.timeout={t.timeout} must be at least 1 (seconds)")
    if t.hang_timeout < 0:
        raise ConfigError(f"trainer.hang_timeout={t.hang_timeout} must be >= 0 (0 turns the watchdog off)")
    if t.flight_recorder < 0:
        raise ConfigError(f"trainer.flight_recorder={t.flight_recorder} must be >= 0 (0 turns it off)")
    if t.skip_nonfinite_steps < 0:
        raise ConfigError(f"trainer.skip_nonfinite_steps={t.skip_nonfinite_steps} must be >= 0")
    if t.val_check_interval < 1 or t.log_every_n_steps < 1:
        raise ConfigError("trainer.val_check_interval and trainer.log_every_n_steps must be positive")
    if str(t.precision) not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision={t.precision!r}: expected one of {', '.join(PRECISIONS)}"
            " (fp16 needs loss scaling, which the manual optimization loop does not do yet: use bf16-mixed)"
        )
    if o.schedule not in LR_SCHEDULES:
        raise ConfigError(f"optim.schedule={o.schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
    for key in ("lr", "min_lr", "weight_decay", "eps", "grad_clip"):
        if not math.isfinite(o[key]):
            raise ConfigError(f"optim.{key}={o[key]} must be a finite number")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be positive")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be between 0 and optim.lr={o.lr}")
    for key in ("warmup_steps", "grad_clip", "weight_decay"):
        if o[key] < 0:
            raise ConfigError(f"optim.{key}={o[key]} must be >= 0" + (" (0 disables clipping)" * (key == "grad_clip")))
    if o.eps <= 0:
        raise ConfigError(f"optim.eps={o.eps} must be positive (Adam divides by sqrt(v) + eps)")
    if len(o.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed={cfg.seed} must be between 0 and {MAX_SEED}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0 (0: load in the training process)")
    if t.limit_val_batches < 0:
        raise ConfigError(f"trainer.limit_val_batches={t.limit_val_batches} must be >= 0 (0 disables validation)")
    if cfg.logger.kind not in LOGGERS:
        raise ConfigError(f"logger.kind={cfg.logger.kind!r}: expected one of {', '.join(LOGGERS)}")
    if cfg.logger.kind == "tensorboard" and not any(
        importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")
    ):
        raise ConfigError("logger=tensorboard needs the tensorboard package: pip install tensorboard")
    if c.every_n_steps < 0 or c.keep_last < 1:
        raise ConfigError("checkpoint.every_n_steps must be >= 0 and checkpoint.keep_last >= 1")
    if c.keep_every < 0:
        raise ConfigError(f"checkpoint.keep_every={c.keep_every} must be >= 0 (0: keep only the last keep_last)")
    if c.async_mode not in ASYNC_MODES:
        raise ConfigError(f"checkpoint.async_mode={c.async_mode!r}: expected one of {', '.join(ASYNC_MODES)}")
    if cfg.compile.backend not in COMPILE_BACKENDS:
        raise ConfigError(f"compile.backend={cfg.compile.backend!r}: expected one of {', '.join(COMPILE_BACKENDS)}")
    if c.export_hf_dtype is not None and c.export_hf_dtype not in EXPORT_DTYPES:
        raise ConfigError(
            f"checkpoint.export_hf_dtype={c.export_hf_dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}"
        )
    if c.export_hf_on_end:
        if not c.save_on_end:
            raise ConfigError(
                "checkpoint.export_hf_on_end=true exports the final checkpoint: set checkpoint.save_on_end=true too"
            )
        moe = cfg.model.moe
        try:
            hf_kind(cfg.model)
        except PretrainedError as error:
            raise ConfigError(f"checkpoint.export_hf_on_end=true: {error}") from None
        if moe is not None and moe.balancing == "aux_free" and moe.bias_update_rate > 0:
            raise ConfigError(
                "checkpoint.export_hf_on_end=true: balancing=aux_free moves a routing bias that Mixtral and Qwen3-MoE"
                " do not have; use model.moe.balancing=aux_loss or none"
            )


def apply_init_from(cfg: DictConfig, training: bool = True) -> None:
    """``model.init_from=DIR``: set the model's architecture keys from ``DIR/config.json`` (with a mixture of
    experts, its balancing too unless the composed config already has a ``model.moe``), check that the
    directory holds every tensor with its shape and a float dtype (headers only), and make
    ``data.tokenizer=auto`` the directory's tokenizer (without ``init_from``, or a directory without
    one: ``byte``, so that a run saves what it read with). Raises ConfigError naming the file and key."""
    path = cfg.model.get("init_from")
    tokenizer = cfg.data.get("tokenizer")
    if path is None:
        if tokenizer == "auto":
            cfg.data.tokenizer = "byte"
        return
    try:
        keys = model_config(path, seq_len=cfg.data.seq_len)
        moe, scaling = keys.pop("moe"), keys.pop("rope_scaling")
        for key, value in keys.items():
            cfg.model[key] = value
        cfg.model.rope_scaling = OmegaConf.merge(OmegaConf.structured(RopeScalingConfig), scaling) if scaling else None
        if moe is None:
            cfg.model.moe = None
        elif cfg.model.moe is None:  # the directory's balancing too
            cfg.model.moe = OmegaConf.merge(OmegaConf.structured(MoEConfig), moe)
        else:  # the routing math from the directory; how the run balances it stays the run's
            cfg.model.moe = OmegaConf.merge(cfg.model.moe, {key: moe[key] for key in MOE_SHAPE_KEYS})
        # the weights' headers against the model's shapes: torch (a fine-tuning run needs it next anyway)
        from curry_train.checkpoint.hf_load import check_weights  # noqa: PLC0415

        check_weights(path, cfg.model)
    except PretrainedError as error:
        raise ConfigError(str(error)) from None
    has_tokenizer = (Path(path) / TOKENIZER_FILE).is_file()
    if tokenizer == "auto":
        cfg.data.tokenizer = keys["init_from"] if has_tokenizer else "byte"
        if cfg.data.source == "files" and not has_tokenizer:
            log.warning(
                "model.init_from=%s has no %s: data.tokenizer=auto reads the text as bytes", path, TOKENIZER_FILE
            )
    if training and cfg.data.source == "stdlib":
        log.warning("model.init_from=%s with data=stdlib: the data is bytes, not the model's tokens", path)


@dataclass(frozen=True)
class EvalPlan:
    accelerator: str
    dims: ParallelDims


def check_evaluation(cfg: DictConfig) -> EvalPlan:
    """What ``curry-eval`` can check before a worker starts: the model (``model.init_from``'s), the layout on
    ``trainer.devices`` local processes, the batch, and ``eval`` (sets against the tokenizer's vocabulary,
    tasks known and loadable). Raises ConfigError."""
    _check_keys(cfg)
    apply_init_from(cfg, training=False)
    layout = ParallelConfig.of(cfg)
    _check_parallel(layout, cfg.trainer.precision)
    devices = cfg.trainer.devices
    if devices < 1:
        raise ConfigError(f"trainer.devices={devices} must be positive")
    _check_tensor_parallel(cfg, layout, devices)
    try:
        dims = layout.dims(devices)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _check_model(cfg)
    _check_batch(cfg, dims)
    _check_pipeline(cfg, layout, dims)
    _check_context_parallel(cfg, layout)
    _check_moe_layout(cfg, layout, dims)
    check_eval(cfg, None)
    accelerator = _accelerator(cfg.trainer.accelerator)
    _check_devices(layout, accelerator, devices)
    return EvalPlan(accelerator, dims)


def check(cfg: DictConfig, env: Mapping[str, str] = os.environ, run_dir: Optional[Path] = None) -> LaunchPlan:
    """Everything that can be checked without starting a worker. Raises ConfigError. ``run_dir``: the
    run's directory, where ``ckpt_path=last|auto`` look first (``config.resume``)."""
    _check_keys(cfg)
    apply_init_from(cfg)
    if cfg.trainer.accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator!r}: expected one of {', '.join(ACCELERATORS)}")
    layout = ParallelConfig.of(cfg)
    _check_parallel(layout, cfg.trainer.precision)
    devices, num_nodes = cfg.trainer.devices, cfg.trainer.num_nodes
    if devices < 1 or num_nodes < 1:
        raise ConfigError(f"trainer.devices={devices} and trainer.num_nodes={num_nodes} must be positive")
    launcher = external_launcher(env)
    if launcher is None and num_nodes > 1:
        raise ConfigError(
            f"trainer.num_nodes={num_nodes}: start one process per device with torchrun or srun (see README)"
        )
    if launcher is not None:
        world = int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS"))
        if world != devices * num_nodes:
            raise ConfigError(
                f"{launcher} started {world} processes but trainer.devices={devices} x trainer.num_nodes={num_nodes}"
                f" = {devices * num_nodes}; make them agree"
            )
    _check_tensor_parallel(cfg, layout, devices * num_nodes)
    try:
        dims = layout.dims(devices * num_nodes)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _check_model(cfg)
    _check_bf16_base(cfg, layout)
    data = _survey_data(cfg)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the data's vocabulary ({data.vocab_size} tokens) exceeds model.vocab_size={cfg.model.vocab_size}"
        )
    _check_batch(cfg, dims)
    _check_data_fills_batches(cfg, data)
    _check_pipeline(cfg, layout, dims)
    _check_context_parallel(cfg, layout)
    _check_moe_layout(cfg, layout, dims)
    _check_training(cfg)
    check_eval(cfg, data)
    # Under torchrun or srun every process checks: one reads the files through, the others their sizes.
    digests = launcher is None or int(env.get("RANK", env.get("SLURM_PROCID", "0"))) == 0
    if digests:
        check_checkpoint_dir(cfg.checkpoint.dir)
    ckpt_path = resolve(cfg, run_dir, digests)
    # Last: finding the accelerator imports torch, which a bad input above need not wait for.
    accelerator = _accelerator(cfg.trainer.accelerator)
    _check_devices(layout, accelerator, devices)
    return LaunchPlan(accelerator, dims, launcher, ckpt_path)
