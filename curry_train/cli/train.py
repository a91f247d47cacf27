"""``curry-train [overrides]`` (and ``python train.py``): compose the run with Hydra, check it, train.

Every argument is a Hydra override of ``conf/`` (``parallel=fsdp+tp trainer.devices=4``,
``recipe=NAME``, ``-m`` for a sweep); ``--help`` lists the config groups, ``--cfg job`` prints the
composed config. See README.md.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from curry_train.cli.common import error_line, fail, is_config_error
from curry_train.config import CONF_DIR, ConfigError, compose
from curry_train.launch import hydra_overrides_for_external_launcher
from curry_train.launch import main as launch_main


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _train(cfg: DictConfig) -> None:
    launch_main(cfg)


def main() -> None:
    try:
        sys.argv += hydra_overrides_for_external_launcher(sys.argv[1:])
    except ConfigError as error:
        sys.exit(fail("curry-train", str(error)))
    arguments = sys.argv[1:]
    if not any(arg.startswith("-") for arg in arguments):  # Hydra's flags (-m, --cfg, --help) are Hydra's to answer
        try:
            compose(arguments)  # a bad override is one line here, not Hydra's report of it
        except Exception as error:
            if not is_config_error(error):
                raise
            sys.exit(fail("curry-train", error_line(error)))
    _train()


if __name__ == "__main__":
    main()
