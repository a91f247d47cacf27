"""curry-train's entry point: ``python train.py [overrides]`` (see README.md)."""

import sys

import hydra
from omegaconf import DictConfig

import curry_train  # noqa: F401  (registers the config schema and parallel=a+b with Hydra)
from curry_train.config import ConfigError
from curry_train.launch import hydra_overrides_for_external_launcher, main


@hydra.main(config_path="conf", config_name="config", version_base=None)
def train(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    try:
        sys.argv += hydra_overrides_for_external_launcher(sys.argv[1:])
    except ConfigError as error:
        sys.exit(f"curry-train: error: {error}")
    train()
