"""lm-evaluation-harness's tasks, as a run's ``eval.harness`` names them: found in lm-eval's registry or a
directory of task YAMLs, and their data loadable, checked before any worker starts. No torch here until
lm-eval itself is imported (only for a run that names tasks)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Optional, Sequence


class HarnessError(ValueError):
    """A task or request the harness cannot run: one line, before or instead of a score."""


def require_lm_eval() -> Any:
    try:
        import lm_eval  # noqa: PLC0415
    except ImportError as error:
        raise HarnessError(
            "eval.harness.tasks needs lm-evaluation-harness: pip install 'curry-train[eval]' (or lm-eval)"
        ) from error
    return lm_eval


def quiet_lm_eval() -> None:
    """lm-eval's notices about the defaults it fills in are not the run's business: its errors only."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=8)
def _manager(include_path: Optional[str], defaults: bool) -> Any:
    require_lm_eval()
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    quiet_lm_eval()
    return TaskManager(include_path=include_path, include_defaults=defaults)


def task_manager(include_path: Optional[str], tasks: Sequence[str] = ()) -> Any:
    """lm-eval's task index: ``include_path``'s YAMLs alone where they hold every task named (indexing the
    whole registry takes seconds), else the registry with them. One per process and directory."""
    if include_path is not None and tasks:
        local = _manager(include_path, False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return _manager(include_path, True)


def check_tasks(tasks: Sequence[str], include_path: Optional[str]) -> None:
    """``HarnessError`` (one line) for a missing ``include_path``, a task neither the registry nor it knows,
    and a task whose data cannot be loaded (a missing local file; a hub dataset on a machine without it)."""
    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"eval.harness.include_path={include_path}: not a directory of task YAMLs")
    manager = task_manager(include_path, tasks)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            where = f"lm-eval's registry or {include_path}" if include_path else "lm-eval's registry"
            close = sorted(t for t in known if task.split("_")[0] and t.startswith(task.split("_")[0]))[:4]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise HarnessError(f"eval.harness.tasks: unknown task {task!r}: not in {where}{hint}")
    for task in tasks:
        try:
            manager.load([task])
        except Exception as error:  # noqa: BLE001  (lm-eval and datasets raise many kinds)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise HarnessError(f"eval.harness.tasks: {task}: its data could not be loaded: {reason}") from None
