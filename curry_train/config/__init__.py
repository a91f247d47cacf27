"""Configuration: the typed schema, the ``+`` combinations of ``parallel`` options, the checks.

Importing this module registers with Hydra what ``conf/config.yaml`` refers to (the schema and the
``parallel-combos://`` config source), so ``hydra.main`` and the compose API both see them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from omegaconf import DictConfig

from curry_train.config.combos import ParallelCombosSource
from curry_train.config.schema import Config

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SCHEMA_NAME = "curry_train_schema"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the keys, the sizes and the fix."""


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
    Plugins.instance().register(ParallelCombosSource)


def compose(overrides: Sequence[str] = (), config_dir: Optional[Path] = None) -> DictConfig:
    """The config ``python train.py <overrides>`` would run with, through Hydra's compose API."""

    with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base=None):
        try:
            return hydra_compose(config_name="config", overrides=list(overrides))
        except AssertionError as error:  # OmegaConf's answer to a key under a null subtree
            raise ConfigError(_unset_option(overrides) or str(error)) from None


def _unset_option(overrides: Sequence[str]) -> Optional[str]:
    """The message for ``parallel.tp.size=2`` when the run's layout has no ``tp``."""
    for override in overrides:
        parts = override.split("=", 1)[0].lstrip("+~").split(".")
        if len(parts) > 2 and parts[0] == "parallel":
            return (
                f"{override}: parallel.{parts[1]} is not part of this run's layout;"
                f" compose it: parallel={parts[1]}, or parallel=<options>+{parts[1]}"
            )
    return None


register()
