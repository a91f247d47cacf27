"""The typed schema of a run's configuration.

Hydra merges every YAML file of ``conf/`` (and every recipe and command-line override) into
these dataclasses, so a misspelt key or a value of the wrong type is rejected while the config
is composed, with the full key in the message. Each field's comment is its documentation.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from curry_train.data.config import DataConfig
from curry_train.layout.dims import ParallelDims
from curry_train.model.config import ModelConfig
from curry_train.options import PARALLEL_OPTIONS


@dataclass
class OptimConfig:
    """AdamW with linear warmup and a decay schedule."""

    lr: float = 3e-3  # peak learning rate, reached after warmup
    min_lr: float = 3e-4  # learning rate at the end of the decay
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not on norms)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    warmup_steps: int = 10  # linear warmup from 0 to lr
    schedule: str = "cosine"  # decay after warmup: cosine | linear | constant
    grad_clip: float = 1.0  # clip the global gradient norm to this value; 0 disables


@dataclass
class TrainerConfig:
    """Arguments of the Lightning Trainer that curry-train drives."""

    accelerator: str = "auto"  # auto | cpu | gpu | cuda
    devices: int = 1  # processes (one per device) per node
    num_nodes: int = 1  # nodes; more than one needs torchrun or SLURM to start the processes
    max_steps: int = 120  # optimizer steps to train
    precision: str = "32-true"  # Lightning precision: 32-true | bf16-mixed
    log_every_n_steps: int = 10  # a metrics row (and one host read) every N optimizer steps, and the last step
    val_check_interval: int = 40  # run validation every this many optimizer steps
    limit_val_batches: int = 8  # validation batches per check (0 disables validation)
    enable_progress_bar: bool = True  # Lightning's progress bar on rank 0
    timeout: int = 600  # seconds a collective may wait for its peers before the run fails
    hang_timeout: int = 300  # seconds without any rank advancing before the watchdog ends the job (0: off)
    flight_recorder: int = 2000  # collectives each rank remembers (TORCH_FR_BUFFER_SIZE), dumped on a hang (0: off)
    skip_nonfinite_steps: int = 0  # steps with a NaN/inf gradient norm skipped (no update) before the run stops


@dataclass
class LoggerConfig:
    """Experiment tracker. A per-step metrics.csv is written in the run directory whatever this is."""

    kind: str = "wandb"  # wandb | csv | tensorboard | none
    project: str = "curry-train"  # wandb project
    entity: Optional[str] = None  # wandb entity (team or user)
    offline: Optional[bool] = None  # wandb offline mode; null: offline unless an account is configured
    tags: List[str] = field(default_factory=list)  # wandb tags


@dataclass
class CheckpointConfig:
    """Checkpoints under ``<run_dir>/checkpoints``."""

    every_n_steps: int = 40  # save every this many optimizer steps (0: only at the end)
    dir: Optional[str] = None  # a path or an fsspec URL (s3://bucket/prefix); null: <run_dir>/checkpoints
    keep_last: int = 2  # keep this many most recent checkpoints
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    async_mode: str = "off"  # off | thread | process: write saves in the background (checkpoint/background.py)
    save_on_end: bool = True  # save when training ends
    search_dir: str = "outputs"  # where ckpt_path=last looks when the run's own directory has no checkpoint
    allow_config_change: bool = False  # resume a checkpoint whose run had other model/data/seed values
    export_hf_on_end: bool = False  # also write the final checkpoint as a Hugging Face directory, <run_dir>/hf
    export_hf_dtype: Optional[str] = None  # fp32 | bf16 | fp16; null: model.init_from's dtype, else fp32
    save_base: bool = False  # LoRA: also save the frozen base (else the adapters alone; the base is rebuilt)


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks run on the live model while it trains (``curry_train.evaluation``)."""

    tasks: List[str] = field(default_factory=list)  # lm-eval task names (its registry, or include_path's YAMLs)
    include_path: Optional[str] = None  # a directory of task YAMLs (local data files: README, "Evaluation")
    every_n_steps: Optional[int] = None  # null: eval.every_n_steps
    limit: Optional[int] = None  # examples per task (null: all)
    num_fewshot: Optional[int] = None  # null: each task's own


@dataclass
class EvalConfig:
    """Evaluation while the run trains: named held-out sets and lm-eval tasks, logged as ``eval/...``."""

    sets: Optional[typing.Any] = (
        None  # name -> a data source ({kind, paths, text_key, format, tokenizer}, as data.sources)
    )
    every_n_steps: int = 0  # evaluate every this many optimizer steps, and at the last (0: at the last only)
    max_batches: Optional[int] = None  # per set, global batches of rows (null: the whole set)
    harness: HarnessConfig = field(default_factory=HarnessConfig)


@dataclass
class DPConfig:
    """parallel=dp: replicated data parallelism (DistributedDataParallel)."""

    bucket_cap_mb: int = 25  # gradient all-reduce bucket size
    static_graph: bool = False  # tell DDP the graph never changes (enables extra overlap)


@dataclass
class FSDPConfig:
    """parallel=fsdp: sharded data parallelism (ZeRO) with FSDP2, see primitives/distributed_optimizer.py."""

    sharding: str = "full"  # full (ZeRO-3) | shard_grad_op (ZeRO-2) | optimizer (ZeRO-1) | no_shard | hybrid (HSDP)
    replicas: int = 2  # hybrid only: replica groups (dp_replicate); each shards over the rest
    mixed_precision: str = "fp32"  # fp32 | bf16 | fp16: compute dtype of the units; gradients reduce in fp32
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in CPU memory (GPU runs)
    reshard_after_forward: Optional[bool] = None  # null: true for full/hybrid, false otherwise (optimizer: never)
    backward_prefetch: str = "backward_pre"  # backward_pre (gather the next unit early) | none
    explicit_prefetch: Optional[bool] = None  # async all-gather a unit ahead; null: on a CPU (no streams), not with pp
    async_reduce_scatter: Optional[bool] = None  # CPU: complete each unit's reduce-scatter later; null: on a CPU
    blocks_per_unit: int = 1  # transformer blocks per FSDP unit (one all-gather / reduce-scatter each)
    sync_each_microbatch: bool = False  # reduce-scatter after every micro-batch (less memory, more traffic)


@dataclass
class TPConfig:
    """parallel=tp: tensor parallelism (Megatron-LM), see primitives/tp_linear.py."""

    size: int = 2  # ranks that split each matmul (heads, KV heads, dim, ffn_dim and vocab divisible by it)
    sequence_parallel: bool = (
        False  # norms and dropout on sequence shards: all-gather / reduce-scatter instead of all-reduce
    )
    loss_parallel: bool = True  # cross-entropy on vocabulary-sharded logits: no rank holds the full logits


@dataclass
class PPConfig:
    """parallel=pp: pipeline parallelism, see primitives/pipeline_schedule.py."""

    size: int = 2  # pipeline ranks (stages x virtual_stages in all)
    schedule: str = "1F1B"  # gpipe | 1F1B | interleaved | interleaved_zb | zbv | dualpipev
    microbatches: Optional[int] = None  # per step and data-parallel rank; null: local batch / data.micro_batch_size
    virtual_stages: Optional[int] = None  # stages per rank: null = 1 (gpipe, 1F1B), 2 (interleaved*, zbv, dualpipev)
    layers_per_stage: Optional[list[int]] = None  # explicit split (one count per stage); null: balanced


@dataclass
class CPConfig:
    """parallel=cp: context parallelism, see primitives/context_parallel.py."""

    size: int = 2  # ranks that share each sequence
    pattern: str = "ring"  # ring | double_ring | alltoall
    load_balance: bool = True  # zigzag layout: rank r holds chunks r and 2cp-1-r (equal causal work)
    inner_ring: Optional[int] = None  # double_ring: ranks per inner ring (null: largest divisor <= sqrt(size))


@dataclass
class EPConfig:
    """parallel=ep: expert parallelism for MoE models, see primitives/expert_parallel.py."""

    size: int = 2  # ranks that split each MoE layer's experts; taken from the dp x cp ranks, divides them
    dispatcher: str = "alltoall"  # alltoall (counts first, dropless) | allgather (gather all, reduce-scatter back)


@dataclass
class ParallelConfig:
    """The layout. Each option of the ``parallel`` group fills its own subtree; ``+`` joins options.

    Built once from a run's config (``ParallelConfig.of(cfg)``), it answers the questions about the
    layout that the rest of the code asks: which options are on (``layout.tp is not None``), their
    sizes (``size``); ``config.checks`` turns it into the run's ``ParallelDims`` (``dims``) once.
    """

    dp: Optional[DPConfig] = None
    fsdp: Optional[FSDPConfig] = None
    tp: Optional[TPConfig] = None
    pp: Optional[PPConfig] = None
    cp: Optional[CPConfig] = None
    ep: Optional[EPConfig] = None
    recompute: str = "none"  # activation recompute, any layout: none | full | selective
    recompute_every_n_blocks: int = 0  # selective: 0 = per op in every block; n = full recompute of every n-th block
    recompute_keep_matmuls: str = "all"  # per-op selective: keep all matmul outputs | every_other (recompute the rest)

    @classmethod
    def of(cls, cfg: DictConfig) -> ParallelConfig:
        """The typed layout of a run's config (composed, or the plain container a worker gets)."""
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), cfg.parallel))

    @property
    def options(self) -> list[str]:
        """The options this run composed (``parallel=fsdp+tp`` -> ``["fsdp", "tp"]``)."""
        return [name for name in PARALLEL_OPTIONS if getattr(self, name) is not None]

    def size(self, option: str) -> int:
        """Ranks of a model-parallel option (``tp``, ``pp``, ``cp``, ``ep``); 1 when it is off."""
        sub = getattr(self, option)
        return sub.size if sub is not None else 1

    def dims(self, world_size: int) -> ParallelDims:
        """The layout's degrees on ``world_size`` ranks (``ValueError`` naming the sizes when they do not
        divide). Data parallelism takes the ranks no other axis uses: replicated (DDP, or FSDP's no_shard),
        sharded (FSDP), or both (FSDP's hybrid). Expert parallelism borrows its ranks from the data- and
        context-parallel ones."""
        if self.fsdp is None or self.fsdp.sharding == "no_shard":
            dp_replicate, dp_shard = -1, 1
        elif self.fsdp.sharding == "hybrid":
            dp_replicate, dp_shard = self.fsdp.replicas, -1
        else:
            dp_replicate, dp_shard = 1, -1
        return ParallelDims(
            world_size,
            dp_replicate=dp_replicate,
            dp_shard=dp_shard,
            cp=self.size("cp"),
            tp=self.size("tp"),
            pp=self.size("pp"),
            ep=self.size("ep"),
        )

    def pipeline_microbatches(self, global_batch_size: int, micro_batch_size: int, dp: int) -> int:
        """Micro-batches per step on each data-parallel rank of a pipelined run."""
        if self.pp.microbatches is not None:
            return self.pp.microbatches
        return global_batch_size // dp // micro_batch_size


@dataclass
class HardwareConfig:
    """The machines a run is planned for (``conf/hardware``): read by ``scripts/advise.py``, which
    sizes layouts against them; training itself takes its devices from ``trainer``."""

    name: str = "h100_80gb"  # label of the accelerator type
    accelerator: str = "gpu"  # gpu | cpu
    memory_bytes: int = 85899345920  # memory of one device
    peak_bf16_flops: float = 9.89e14  # dense bf16 FLOP/s of one device
    intra_node_bandwidth: float = 4.5e11  # bytes/s per device and direction between devices of a node
    inter_node_bandwidth: float = 5.0e10  # bytes/s per device and direction between nodes
    nodes: int = 1  # nodes in the allocation
    gpus_per_node: int = 8  # devices per node
    peak_fp32_flops: float = 6.7e13  # dense fp32 FLOP/s (no tensor cores): a run that computes in fp32
    matmul_efficiency: float = 0.8  # share of the peak a large GEMM reaches (measured: MAMF)
    matmul_efficiency_by_size: Optional[Dict[int, float]] = None  # the same by the GEMM's narrower side (a probe's)
    attention_efficiency: float = 0.4  # share of the peak the fused causal attention reaches, forward and backward
    memory_bandwidth: float = 3.35e12  # bytes/s of the device's memory
    memory_efficiency: float = 0.8  # share of it the memory-bound kernels (elementwise, optimizer) reach
    kernel_latency: float = 5.0e-6  # seconds any kernel takes at least (launch and tail)
    collective_efficiency: float = 0.8  # share of NVLink's bandwidth a ring collective reaches (NCCL's bus bandwidth)
    inter_node_efficiency: float = 0.92  # the same between nodes, over the network
    collective_latency: float = 2.0e-5  # seconds a collective call takes beyond its bytes
    # host seconds a tensor-parallel linear adds over a plain one per micro-batch, forward and backward
    # (DTensor's dispatch, from_local and to_local, redistribution's Python), where nothing hides it
    tp_linear_overhead: float = 0.0
    # host seconds an FSDP unit's hooks add per micro-batch (gathers' copy-in and copy-out, the reduce's
    # copies, resharding), beyond its collectives' bytes and latency
    fsdp_unit_overhead: float = 0.0
    # host seconds a context-parallel ring attention adds over plain attention per micro-batch (its steps'
    # kernels and merges, the autograd Function's Python), beyond its transfers' bytes and latency
    cp_ring_overhead: float = 0.0
    comm_overlap: float = 1.0  # share of the compute communication can run beside (GPU: 1; gloo on the same cores: 0)
    reserved_bytes: int = 2147483648  # per device, outside the model (runtime, communication buffers)
    flash_attention: bool = True  # the attention kernel keeps no s x s scores
    mixed_precision: str = "bf16"  # compute dtype advise recommends here: bf16 | fp32


@dataclass
class CompileConfig:
    """compile: torch.compile each transformer block (``curry_train/primitives/compile.py``); off by default."""

    enabled: bool = False  # compile every block's forward, in any layout
    loss: bool = True  # also compile the cross-entropy (with enabled; not under loss parallelism or loss_chunks)
    backend: str = "inductor"  # inductor (C++ on CPU, Triton on CUDA) | aot_eager | eager


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 1234  # seeds init, data order and dropout; the layout never changes what it seeds
    ckpt_path: Optional[str] = None  # resume: a checkpoint directory, "last" or "auto" (config/resume.py)

    @classmethod
    def of(cls, source: DictConfig | dict) -> Config:
        """The typed config of a composed one, or of the plain container a worker is handed: what the
        training path reads (attributes, dataclasses), converted once per process."""
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), source))


def unknown_keys(cfg: DictConfig, schema: type = Config, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys of ``cfg`` that ``schema`` does not have (Hydra's ``+key=value`` adds them to a typed config
    without a word), each with the keys it sits beside, for a did-you-mean."""
    hints = typing.get_type_hints(schema)
    found = []
    for key in cfg.keys():
        if key not in hints:
            found.append((f"{prefix}{key}", list(hints)))
            continue
        kind = hints[key]
        if typing.get_origin(kind) is typing.Union:  # Optional[XConfig]
            kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        node = cfg._get_node(key)
        if dataclasses.is_dataclass(kind) and isinstance(node, DictConfig) and not node._is_none():
            found += unknown_keys(node, kind, f"{prefix}{key}.")
    return found
