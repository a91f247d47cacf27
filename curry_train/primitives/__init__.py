"""The parallelism primitives, one file each, composable through a shared ``ParallelState``."""

from curry_train.model.llama import GQAttention
from curry_train.model.moe import Experts, MoE, TopKRouter
from curry_train.primitives.context_parallel import ContextParallel
from curry_train.primitives.distributed_optimizer import DistributedOptimizer
from curry_train.primitives.expert_parallel import ExpertParallel
from curry_train.primitives.parallel_state import ParallelState
from curry_train.primitives.pipeline_schedule import PipelineSchedule
from curry_train.primitives.recompute import apply_recompute
from curry_train.primitives.tp_linear import ColumnParallelLinear, RowParallelLinear

__all__ = [
    "ColumnParallelLinear",
    "ContextParallel",
    "DistributedOptimizer",
    "ExpertParallel",
    "Experts",
    "GQAttention",
    "MoE",
    "ParallelState",
    "PipelineSchedule",
    "RowParallelLinear",
    "TopKRouter",
    "apply_recompute",
]
