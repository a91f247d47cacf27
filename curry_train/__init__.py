"""curry-train: a declarative trainer for transformer language models.

The parallelism layout of a run is chosen from YAML (``python train.py parallel=fsdp+tp``);
``curry_train.parallelize`` applies it to the model with the primitives of ``curry_train.primitives``
(see docs/architecture.md for the flow of a run and where each concern lives).
"""

import curry_train.config  # noqa: F401  (registers the schema and parallel=a+b with Hydra)

__version__ = "0.1.0"
