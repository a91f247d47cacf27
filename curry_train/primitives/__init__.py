"""The parallelism primitives, one file each, composable through a shared ``ParallelState``."""

from curry_train.primitives.parallel_state import ParallelState

__all__ = ["ParallelState"]
