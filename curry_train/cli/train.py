"""``curry-train [overrides]`` (and ``python train.py``): compose the run with Hydra, check it, train.

Every argument is a Hydra override of ``conf/`` (``parallel=fsdp+tp trainer.devices=4``,
``recipe=NAME``, ``-m`` for a sweep); ``--help`` lists the config groups, ``--cfg job`` prints the
composed config. See README.md.

Hydra composes the config once; a composition error reaches here (``HYDRA_FULL_ERROR``: Hydra raises it
instead of printing its own report) and is one line, status 2. Nothing imported before the check loads
torch or Lightning, so ``--help``, ``--cfg job`` and a bad input answer at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import hydra
from omegaconf import DictConfig

from curry_train.cli.common import error_line, fail, is_config_error
from curry_train.config import CONF_DIR, ConfigError, composition_error
from curry_train.config.checks import external_launcher
from curry_train.launch import Jobs, hydra_overrides_for_external_launcher


def main() -> None:
    try:
        sys.argv += hydra_overrides_for_external_launcher(sys.argv[1:])
    except ConfigError as error:
        sys.exit(fail("curry-train", str(error)))
    arguments = sys.argv[1:]
    flags = {arg for arg in arguments if arg.startswith("-")}
    if flags <= {"-m", "--multirun"}:  # a run or a sweep, not --help or --cfg
        problem = unwritable_output_dir(arguments, "hydra.sweep.dir" if flags else "hydra.run.dir")
        if problem:
            sys.exit(fail("curry-train", problem))
    jobs = Jobs()

    def train(cfg: DictConfig) -> None:  # Hydra names the job, and its log (train.log), after this function's file
        jobs(cfg)

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # a composition error is raised to here, not printed by Hydra
    try:
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(train)()
    except Exception as raised:
        error = composition_error(raised, [arg for arg in arguments if not arg.startswith("-")])
        if not is_config_error(error):
            raise
        sys.exit(fail("curry-train", error_line(error)))
    if jobs.failures:  # a sweep ran every job; the failed ones printed their line when they failed
        print(f"curry-train: {len(jobs.failures)} job(s) of the sweep failed:", file=sys.stderr)
        for failure in jobs.failures:
            print(f"  {failure}", file=sys.stderr)
        sys.exit(1)


def unwritable_output_dir(arguments: Sequence[str], key: str) -> Optional[str]:
    """Why the run (or sweep) directory cannot be written, or None (Hydra would fail there with a
    traceback). The part of its path before the first ``${...}`` is created, a file written in it,
    and what was created removed again (Hydra makes the directory itself when the job starts)."""
    default = {"hydra.run.dir": "outputs/${now:%Y-%m-%d}", "hydra.sweep.dir": "multirun/${now:%Y-%m-%d}"}[key]
    value = next((arg.split("=", 1)[1] for arg in arguments if arg.startswith(f"{key}=")), default)
    static = value.split("${", 1)[0]
    folder = Path(static or ".") if "${" not in value or static.endswith("/") else Path(static).parent
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"{key}={value}: cannot write {folder} ({error.strerror}); choose a writable directory"
    finally:
        # Under torchrun or srun every rank checks at once: one must not remove what another tests.
        for path in created if external_launcher(os.environ) is None else ():  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
    return None
