"""curry-train: a declarative trainer for transformer language models.

The parallelism layout of a run is chosen from YAML (``python train.py parallel=fsdp+tp``); the
strategy (``curry_train.strategy``) composes the primitives of ``curry_train.primitives``.
"""

import curry_train.config  # noqa: F401  (registers the schema and parallel=a+b with Hydra)

__version__ = "0.1.0"
