"""``parallel=fsdp+tp``: any ``+``-joined set of ``parallel`` options, composed on the fly.

Hydra selects one config per group. Rather than one YAML file per combination of layouts, this
config source answers for the name ``parallel/<a>+<b>+...`` with a generated config whose defaults
list is ``[a, b, ..., _self_]``: Hydra then loads each option's own file into the ``parallel``
package as usual. Every option owns a disjoint subtree (``parallel.fsdp``, ``parallel.tp``, ...),
so the order of the names does not matter. Because the answer comes from a config source, the
combination works wherever Hydra looks up a config: the command line, ``-m`` sweeps, recipes'
defaults lists (``override /parallel: fsdp+tp``) and the compose API.

``conf/config.yaml`` puts the source on the search path (``hydra.searchpath: [parallel-combos://]``);
importing ``curry_train`` registers it.
"""

from __future__ import annotations

from typing import List, Optional

from hydra.core.object_type import ObjectType
from hydra.errors import ConfigCompositionException
from hydra.plugins.config_source import ConfigResult, ConfigSource
from omegaconf import OmegaConf

GROUP = "parallel"
SEPARATOR = "+"


def split_combo(name: str) -> List[str]:
    """``"fsdp+tp"`` -> ``["fsdp", "tp"]``, rejecting empty and repeated parts."""
    parts = [part.strip() for part in name.split(SEPARATOR)]
    if any(not part for part in parts):
        raise ConfigCompositionException(f"parallel={name!r}: an empty option name around '+'")
    repeated = sorted({part for part in parts if parts.count(part) > 1})
    if repeated:
        raise ConfigCompositionException(f"parallel={name!r}: option(s) {repeated} given more than once")
    return parts


class ParallelCombosSource(ConfigSource):
    @staticmethod
    def scheme() -> str:
        return "parallel-combos"

    def _parts(self, config_path: str) -> Optional[List[str]]:
        path = self._normalize_file_name(config_path.rstrip("/"))[: -len(".yaml")]
        group, _, name = path.rpartition("/")
        if group != GROUP or SEPARATOR not in name:
            return None
        return split_combo(name)

    def load_config(self, config_path: str) -> ConfigResult:
        parts = self._parts(config_path)
        assert parts is not None, config_path
        return ConfigResult(
            config=OmegaConf.create({"defaults": [*parts, "_self_"]}),
            path=f"{self.scheme()}://{self.path}",
            provider=self.provider,
            header={"package": None},
        )

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        return False

    def is_config(self, config_path: str) -> bool:
        return self._parts(config_path) is not None

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        return []
