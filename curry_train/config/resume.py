"""Which checkpoint a run resumes from (``ckpt_path``), decided before any worker starts.

* ``null``: none; the run starts fresh.
* ``PATH``: that checkpoint. An incomplete or altered one is an error naming the file.
* ``last``: the newest good checkpoint in this run's directory (``<run_dir>/checkpoints``), else under
  ``checkpoint.search_dir``; one that is incomplete or altered is skipped with a warning.
* ``auto``: the newest good checkpoint in this run's directory, else a fresh start: what a re-run of
  the same command in the same run directory wants (a requeued SLURM job, a restarted crash).

A checkpoint saved by a run whose math differs (``model.*``, ``data.*`` but how it is read, ``seed``)
is refused with the differing keys named, unless ``checkpoint.allow_config_change=true``: resuming
under another layout, more steps or another learning rate is fine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from curry_train.checkpoint import files
from curry_train.config import ConfigError
from curry_train.config.schema import Config

log = logging.getLogger(__name__)

# The keys whose value changes what is computed: a checkpoint of a run with others is not this run's.
MATH_PREFIXES = ("model.", "data.", "seed")
# ... except those that change only how (not what) data is read.
NOT_MATH = ("data.num_workers", "data.micro_batch_size", "model.loss_chunks")


def resolve(cfg: DictConfig, run_dir: Optional[Path], digests: bool = True) -> Optional[str]:
    """The absolute path of the checkpoint to resume from, or None. Raises ConfigError."""
    choice = cfg.ckpt_path
    if choice is None:
        return None
    own = Path(run_dir) / "checkpoints" if run_dir is not None else None
    if choice in ("last", "auto"):
        places = [own] if own is not None else []
        if choice == "last":
            places.append(Path(cfg.checkpoint.search_dir))
        found = _newest_good(places, digests)
        if found is None and choice == "last":
            where = " or ".join(str(p.resolve()) for p in places)
            raise ConfigError(f"ckpt_path=last: no complete checkpoint under {where}")
        if found is None:
            log.info("ckpt_path=auto: no checkpoint in %s; starting fresh", own)
            return None
    else:
        found = Path(choice).expanduser().resolve()
        if not found.is_dir():
            raise ConfigError(f"ckpt_path={choice}: not a curry-train checkpoint directory")
        problem = files.verify(found, digests)
        if problem is not None:
            raise ConfigError(f"ckpt_path={choice}: {problem}")
    _check_same_math(cfg, found)
    return str(found)


def _newest_good(places: list[Path], digests: bool) -> Optional[Path]:
    """The newest checkpoint of the first place that has a good one; bad ones skipped with a warning."""
    for place in places:
        if not place.is_dir():
            continue
        found = [p for p in place.rglob("step-*") if p.is_dir() and files.NAME_PATTERN.match(p.name)]
        for path in sorted(found, key=_finished_then_step, reverse=True):
            problem = files.verify(path, digests)
            if problem is None:
                return path.resolve()
            log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def _finished_then_step(path: Path) -> tuple[float, int]:
    """Newest first: by when its save finished (its manifest; the directory, if it never did), then step."""
    manifest = path / files.MANIFEST_FILE
    finished = (manifest if manifest.is_file() else path).stat().st_mtime
    return finished, int(files.NAME_PATTERN.match(path.name).group(1))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _check_same_math(cfg: DictConfig, checkpoint: Path) -> None:
    saved = files.saved_config(checkpoint)
    if saved is None or cfg.checkpoint.allow_config_change:
        return
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    # A key the schema gained after the checkpoint was saved had its default then (``model.qk_norm``).
    then = {**_flat(OmegaConf.to_container(OmegaConf.structured(Config))), **_flat(saved)}
    differ = sorted(
        key
        for key in set(now) | set(then)
        if key.startswith(MATH_PREFIXES) and key not in NOT_MATH and now.get(key) != then.get(key)
    )
    if differ:
        shown = ", ".join(f"{key}={then.get(key)!r} (now {now.get(key)!r})" for key in differ[:6])
        more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
        raise ConfigError(
            f"{checkpoint} was saved by a run that computes something else: {shown}{more};"
            " resume with the same values, or set checkpoint.allow_config_change=true"
        )
