"""Which checkpoint a run resumes from (``ckpt_path``), decided before any worker starts.

* ``null``: none; the run starts fresh.
* ``PATH``: that checkpoint. An incomplete or altered one is an error naming the file.
* ``last``: the newest good checkpoint in this run's directory (``<run_dir>/checkpoints``), else the
  newest of the one run under ``checkpoint.search_dir`` that trains the same thing (``LAST_MATH``: model,
  data, optim and its schedule, seed, global batch), named in a warning. Runs that another run resumed
  from count as that run (each checkpoint records the one its run resumed from: ``lineage.json``); two
  such runs or more are refused with the candidates listed, none with what differs. One that is
  incomplete or altered is skipped with a warning.
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
# The model keys that decide its parameters' names and shapes: never changed on resume, even when told.
SHAPE_KEYS = frozenset(
    {f"model.{key}" for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "head_dim")}
    | {"model.tie_embeddings", "model.qk_norm", "model.lora.rank", "model.lora.targets"}
    | {f"model.moe.{key}" for key in ("experts", "shared_experts", "expert_ffn_dim", "dense_layers")}
)
# What ``last`` matches a run of another directory on: all of its training math, the optimizer and the
# schedule's length too (a run resumed by name may change those; one found by ``last`` may not).
LAST_MATH = (*MATH_PREFIXES, "optim.", "trainer.max_steps")


def resolve(cfg: DictConfig, run_dir: Optional[Path], digests: bool = True) -> Optional[str]:
    """The absolute path of the checkpoint to resume from, or None. Raises ConfigError."""
    choice = cfg.ckpt_path
    if choice is None:
        return None
    own = files.checkpoint_dir(run_dir, cfg.checkpoint.dir) if run_dir is not None else None
    if choice in ("last", "auto"):
        found = _newest_good([own], digests) if own is not None else None
        if found is None and choice == "last":
            return str(_same_run_elsewhere(cfg, files.place(cfg.checkpoint.search_dir), own, digests))
        if found is None:
            log.info("ckpt_path=auto: no checkpoint in %s; starting fresh", own)
            return None
    else:
        found = files.absolute(choice)
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
        found = [p for p in place.iterdir() if files.NAME_PATTERN.match(p.name) and p.is_dir()]
        for path in sorted(found, key=_finished_then_step, reverse=True):
            problem = files.verify(path, digests)
            if problem is None:
                return files.absolute(path)
            log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def _run_of(checkpoint: Path) -> Path:
    """The run a checkpoint belongs to, by the directory it saves into: ``<run_dir>/checkpoints``, or its
    ``checkpoint.dir`` (a bucket prefix)."""
    return files.absolute(checkpoint).parent


def _resumed_from(checkpoint: Path) -> Optional[Path]:
    source = files.resumed_from(checkpoint)
    return files.place(source) if source else None


def _same_run_elsewhere(cfg: DictConfig, search_dir: Path, own: Optional[Path], digests: bool) -> Path:
    """``last`` beyond the run's own directory: the newest good checkpoint of the one run under
    ``search_dir`` with this run's training math (``LAST_MATH``), runs that others resumed from left out."""
    where = str(files.absolute(search_dir))
    if own is not None:
        where = f"{files.absolute(own)} or under {where}"
    runs: dict[Path, Path] = {}  # run directory -> its newest good checkpoint
    found = [p for p in search_dir.rglob("step-*") if p.is_dir() and files.NAME_PATTERN.match(p.name)]
    for path in sorted(found, key=_finished_then_step, reverse=True):
        run = _run_of(path)
        if run in runs or (own is not None and str(run) == str(files.absolute(own))):
            continue
        problem = files.verify(path, digests)
        if problem is None:
            runs[run] = files.absolute(path)
        else:
            log.warning("skipping checkpoint %s: %s", path, problem)
    if not runs:
        raise ConfigError(f"ckpt_path=last: no complete checkpoint in {where}")
    differ = {run: _math_differences(cfg, files.saved_config(path), LAST_MATH) for run, path in runs.items()}
    same = [run for run in runs if differ[run] == []]
    if not same:
        run = next(iter(runs))  # the newest
        shown = "; ".join(differ[run][:3]) if differ[run] is not None else "it saved no config"
        raise ConfigError(
            f"ckpt_path=last: no checkpoint in this run's directory, and none of the {len(runs)} run(s) under"
            f" {files.absolute(search_dir)} trains what this one does (model, data, optim, schedule, seed): the newest,"
            f" {run}, has {shown}; start fresh (ckpt_path=null), or name the checkpoint to resume (ckpt_path=PATH)"
        )
    ancestors: set[Path] = set()
    for run in same:  # the runs each resumed from, and theirs: continued by it, not candidates
        path: Optional[Path] = runs[run]
        seen = {run}
        while path is not None and (source := _resumed_from(path)) is not None:
            parent = _run_of(source)
            if parent in seen:
                break
            seen.add(parent)
            ancestors.add(parent)
            path = runs.get(parent, source if source.is_dir() else None)
    heads = [run for run in same if run not in ancestors]
    if len(heads) != 1:
        listed = ", ".join(f"{runs[run]} (step {files.step_of(runs[run])})" for run in heads or same)
        raise ConfigError(
            f"ckpt_path=last: {len(heads or same)} runs under {files.absolute(search_dir)} train what this one does and"
            f" none continues the other(s): {listed}; name the one to resume with ckpt_path=PATH"
        )
    (run,) = heads
    log.warning(
        "ckpt_path=last: resuming %s, the newest checkpoint of the run saved in %s (the one run under %s that"
        " trains the same model, data, optim, schedule and seed)",
        runs[run],
        run,
        files.absolute(search_dir),
    )
    return runs[run]


def _finished_then_step(path: Path) -> tuple[float, int]:
    """Newest first: by when its save finished (its manifest; the directory, if it never did), then step."""
    manifest = path / files.MANIFEST_FILE
    try:
        finished = (manifest if manifest.is_file() else path).stat().st_mtime
    except (OSError, AttributeError):  # an object store's prefix without its manifest has no time
        finished = 0.0
    return finished, int(files.NAME_PATTERN.match(path.name).group(1))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _math_differences(
    cfg: DictConfig, saved: Optional[dict[str, Any]], prefixes: tuple[str, ...]
) -> Optional[list[str]]:
    """``key=saved (now current)`` for each key under ``prefixes`` (less ``NOT_MATH``) whose value differs
    between the checkpoint's config ``saved`` and ``cfg``; None when the checkpoint saved no config."""
    if saved is None:
        return None
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    # A key the schema gained after the checkpoint was saved had its default then (``model.qk_norm``).
    then = {**_flat(OmegaConf.to_container(OmegaConf.structured(Config))), **_flat(saved)}
    differ = sorted(
        key
        for key in set(now) | set(then)
        if key.startswith(prefixes) and key not in NOT_MATH and now.get(key) != then.get(key)
    )
    return [f"{key}={then.get(key)!r} (now {now.get(key)!r})" for key in differ]


def _check_same_math(cfg: DictConfig, checkpoint: Path) -> None:
    saved = files.saved_config(checkpoint)
    shape = [line for line in _math_differences(cfg, saved, ("model.",)) or [] if line.split("=")[0] in SHAPE_KEYS]
    if shape:  # even when told: the weights would be dropped or not fit
        raise ConfigError(
            f"{checkpoint} holds a model of another shape: {', '.join(shape)}; its weights fit only that shape"
            " (checkpoint.allow_config_change admits other data, seed or model settings, not another shape)"
        )
    if cfg.checkpoint.allow_config_change:
        return
    differ = _math_differences(cfg, files.saved_config(checkpoint), MATH_PREFIXES)
    if differ:
        shown = ", ".join(differ[:6])
        more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
        raise ConfigError(
            f"{checkpoint} was saved by a run that computes something else: {shown}{more};"
            " resume with the same values, or set checkpoint.allow_config_change=true"
        )
