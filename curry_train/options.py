"""The allowed values of every choice a run's config makes, each defined once, here.

No torch: ``config/checks.py`` holds a config to these before any process starts (and before torch is
imported). The module that implements a choice imports its tuple from here, and maps each value to what
it does (the comment names that module), so a value added here without an implementation fails there.
"""

from __future__ import annotations

# The parallel group's options (config/schema.py: ParallelConfig's subtrees)
PARALLEL_OPTIONS = ("dp", "fsdp", "tp", "pp", "cp", "ep")
# parallel.fsdp.sharding (primitives/distributed_optimizer.py)
SHARDING_MODES = ("full", "shard_grad_op", "optimizer", "no_shard", "hybrid")
# the sharding modes expert parallelism composes with (primitives/distributed_optimizer.py: shard_experts)
EXPERT_SHARDING = ("full", "shard_grad_op", "no_shard")
# parallel.fsdp.mixed_precision (primitives/distributed_optimizer.py: PARAM_DTYPES)
MIXED_PRECISIONS = ("fp32", "bf16", "fp16")
# parallel.fsdp.backward_prefetch (primitives/distributed_optimizer.py)
BACKWARD_PREFETCH = ("backward_pre", "none")
# parallel.pp.schedule (primitives/pipeline_schedule.py; layout/pipeline.py accepts a few other spellings)
PIPELINE_SCHEDULES = ("gpipe", "1F1B", "interleaved", "interleaved_zb", "zbv", "dualpipev")
# parallel.cp.pattern (primitives/context_parallel.py)
CP_PATTERNS = ("ring", "double_ring", "alltoall")
# parallel.ep.dispatcher (primitives/expert_parallel.py: DISPATCHERS)
EP_DISPATCHERS = ("alltoall", "allgather")
# parallel.recompute (primitives/recompute.py)
RECOMPUTE_MODES = ("none", "full", "selective")
# parallel.recompute_keep_matmuls: per-op selective recompute keeps every matmul's output, or every other one's
RECOMPUTE_KEEP_MATMULS = ("all", "every_other")
# compile.backend (primitives/compile.py)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# model.moe.score_function and model.moe.balancing (model/moe.py)
SCORE_FUNCTIONS = ("softmax", "sigmoid")
BALANCING = ("aux_free", "aux_loss", "none")
# data.source and each mixture source's kind (data/mixture.py: READERS)
DATA_SOURCES = ("stdlib", "files", "tokens", "parquet", "datasets")
# data.format and a source's format: documents of text, or chat records (data/chat.py)
DATA_FORMATS = ("text", "chat")
# the roles a chat record's messages may have (data/chat.py), and of them data.train_roles
CHAT_ROLES = ("system", "user", "assistant", "tool")
# data.exhausted: what a mixture does when one of its sources has served all its rows (data/mixture.py)
DATA_EXHAUSTED = ("repeat", "stop")
# checkpoint.export_hf_dtype and curry-export --dtype (checkpoint/hf_export.py: DTYPES)
EXPORT_DTYPES = ("fp32", "bf16", "fp16")
ASYNC_MODES = ("off", "thread", "process")  # checkpoint.async_mode (checkpoint/background.py)
# trainer.accelerator, trainer.precision, logger.kind, optim.schedule (run.py, module.py)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
PRECISIONS = ("32-true", "32", "bf16-mixed")
LOGGERS = ("wandb", "csv", "tensorboard", "none")
LR_SCHEDULES = ("cosine", "linear", "constant")
