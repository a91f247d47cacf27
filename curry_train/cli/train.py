"""``curry-train [overrides]`` (and ``python train.py``): compose the run with Hydra, check it, train.

Every argument is a Hydra override of ``conf/`` (``parallel=fsdp+tp trainer.devices=4``,
``recipe=NAME``, ``-m`` for a sweep); ``--help`` lists the config groups, ``--cfg job`` prints the
composed config. See README.md.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from curry_train.config import CONF_DIR, ConfigError
from curry_train.launch import hydra_overrides_for_external_launcher
from curry_train.launch import main as launch_main


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _train(cfg: DictConfig) -> None:
    launch_main(cfg)


def main() -> None:
    try:
        sys.argv += hydra_overrides_for_external_launcher(sys.argv[1:])
    except ConfigError as error:
        sys.exit(f"curry-train: error: {error}")
    _train()


if __name__ == "__main__":
    main()
