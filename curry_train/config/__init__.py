"""Configuration: the typed schema, the ``+`` combinations of ``parallel`` options, the checks.

Importing this module registers with Hydra what ``conf/config.yaml`` refers to (the schema and the
``parallel-combos://`` config source), so ``hydra.main`` and the compose API both see them.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Optional, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.errors import ConfigCompositionException
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
    """The config ``python train.py <overrides>`` would run with, through Hydra's compose API.

    Hydra's own errors (a misspelt key, a wrong type, a missing option) propagate as they are; the two
    that OmegaConf reports without naming the override become a ``ConfigError`` that names it."""
    overrides = list(overrides)
    try:
        with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base=None):
            return hydra_compose(config_name="config", overrides=overrides)
    except (AssertionError, ValueError, ConfigCompositionException) as error:
        converted = composition_error(error, overrides, config_dir)
        if converted is error:
            raise
        raise converted from None


def composition_error(error: Exception, overrides: Sequence[str], config_dir: Optional[Path] = None) -> Exception:
    """What to report for an error composing ``overrides``: the two that OmegaConf reports without naming
    the override (a key under a null subtree, a key into a list) as a ``ConfigError`` that names it; any
    other error as it is."""
    if isinstance(error, AssertionError):  # OmegaConf's answer to a key under a null subtree
        return ConfigError(_unset_option(list(overrides), config_dir))
    misspelt = re.match(r"Could not override '([^']+)'", str(error))
    if misspelt:  # Hydra's answer to a key the config does not have: the did-you-mean it does not give
        return ConfigError(_unknown_key(misspelt.group(1), list(overrides), config_dir))
    if isinstance(error, ValueError) and not isinstance(error, ConfigError):  # a key into a list (data.paths.x=1)
        culprits = [o for o in overrides if o.split("=", 1)[0].count(".") > 1] or list(overrides)
        return ConfigError(f"{' '.join(culprits)}: {error}")
    return error


def _unknown_key(key: str, overrides: list[str], config_dir: Optional[Path]) -> str:
    """``key`` is not in the config: the closest key at the level where it leaves the config."""
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        node: object = compose(rest, config_dir) if len(rest) < len(overrides) else None
    except Exception:  # the rest fails too: its own error comes next
        node = None
    parts = key.split(".")
    depth = 0
    while depth < len(parts) and isinstance(node, DictConfig) and parts[depth] in node:
        node = node[parts[depth]]
        depth += 1
    if depth == len(parts):
        return f"{key}: could not override it"
    part = parts[depth]
    if not isinstance(node, DictConfig):
        return f"{key}: no such key (to add one the schema lacks: +{key}=..., which the check refuses)"
    prefix = ".".join(parts[:depth])
    where = prefix or "the config"
    close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=1, cutoff=0.6)
    if close:
        return f"{key}: no such key in {where}; did you mean {'.'.join([*parts[:depth], close[0]])}?"
    return f"{key}: no such key in {where} (it has: {', '.join(str(k) for k in node.keys())})"


def _unset_option(overrides: list[str], config_dir: Optional[Path]) -> str:
    """The message for an override of a key under a null subtree (``parallel.tp.size=2`` when the
    run's layout has no ``tp``): the override and the part of the config that is not there."""
    nested = [o for o in overrides if o.split("=", 1)[0].count(".") > 1]
    try:
        composed = compose([o for o in overrides if o not in nested], config_dir)
    except Exception:  # the rest fails too: name the overrides that reach under a key
        composed = None
    for override in nested if composed is not None else ():
        parts = override.split("=", 1)[0].lstrip("+~").split(".")
        node = composed
        for depth, part in enumerate(parts[:-1], 1):
            node = node.get(part) if isinstance(node, DictConfig) else None
            if node is None:
                prefix = ".".join(parts[:depth])
                if depth == 2 and parts[0] == "parallel":
                    return (
                        f"{override}: {prefix} is not part of this run's layout;"
                        f" compose it: parallel={parts[1]}, or parallel=<options>+{parts[1]}"
                    )
                return f"{override}: {prefix} is null in this run; set it whole ({prefix}=...)"
    return f"{' '.join(nested or overrides)}: a key under a part of the config that this run does not have"


register()
