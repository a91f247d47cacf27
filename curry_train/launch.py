"""One Hydra job of ``curry-train``: check the config, then train, and end with the job's exit status.

Nothing here imports torch or Lightning: a config that fails its check is one line before they load.
A config that passes is trained by ``workers`` (the processes of the run).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from curry_train import worker_server
from curry_train.checkpoint import files
from curry_train.config import ConfigError
from curry_train.config.checks import check, external_launcher
from curry_train.exits import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_PREEMPTED, FORWARDED

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """A job of a sweep that failed, for a launcher that runs jobs elsewhere (submitit, joblib) to record
    as failed; its message is the one line the job printed."""


@dataclass
class Jobs:
    """The Hydra task function of one ``curry-train`` invocation, with what it keeps across the jobs of a
    sweep run in this process: the failed ones, for the closing summary."""

    failures: list[str] = field(default_factory=list)

    def __call__(self, cfg: DictConfig) -> None:
        """The body of one job. A job that fails -- its config check, or a worker -- prints one line. A
        single run then exits with the failure's status (2: the config; 3, 4, 75: see README; 1: anything
        else). A sweep goes on to its next job (``curry-train`` exits 1 at the end, naming the failed
        jobs), except after SIGINT or preemption, which stop the whole sweep."""
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        schedulers = {signum: signal.getsignal(signum) for signum in FORWARDED}
        try:
            code, received = run_job(cfg, run_dir, f"{hydra_cfg.job.name}.log")
        except KeyboardInterrupt:  # the workers were ended by the launcher's SIGINT handler
            last = files.last_checkpoint(run_dir, cfg.checkpoint.dir) or "none"
            print(f"curry-train: interrupted; the last checkpoint: {last}", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        if code == 0:
            return
        if code == EXIT_PREEMPTED:
            pass_on_preemption(received, schedulers)
        if hydra_cfg.mode != RunMode.MULTIRUN or code == EXIT_PREEMPTED:
            sys.exit(code)
        overrides = " ".join(hydra_cfg.overrides.task)
        failure = f"job {hydra_cfg.job.num} ({overrides}): exit {code}"
        if not hydra_cfg.launcher._target_.endswith("BasicLauncher"):
            raise JobFailed(failure)
        self.failures.append(failure)


def run_job(cfg: DictConfig, run_dir: Path, log_name: str) -> tuple[int, list[int]]:
    """Check and train: the job's exit status and the preemption signals it received. A config that
    fails its check is one line, and leaves no run directory behind."""
    try:
        plan = check(cfg, run_dir=run_dir)
    except ConfigError as error:
        print(f"curry-train: error: {error}", file=sys.stderr)
        remove_unused_run_dir(run_dir, log_name)
        return EXIT_BAD_INPUT, []
    if plan.ckpt_path:
        log.info("resuming from %s", plan.ckpt_path)
    if plan.external_launcher is None and plan.world_size > 1:
        worker_server.start()  # it imports what the workers need while this process imports torch
    # torch and Lightning load here, for a run that passed its check
    from curry_train.workers import train_workers  # noqa: PLC0415

    end = train_workers(OmegaConf.to_container(cfg, resolve=True), run_dir, plan)
    return end.code, end.signals


def pass_on_preemption(received: Sequence[int], handlers: dict[int, Any]) -> None:
    """The run saved and stopped on a preemption signal: hand that signal to the handler the process had
    before the run replaced it, if any. That is how a scheduler's own handling still happens after the
    save: submitit (Hydra's submitit launcher) requeues the job from its SIGUSR1 handler, and the
    requeued job, run with ``ckpt_path=auto``, resumes from this checkpoint."""
    for signum in dict.fromkeys(received):
        handler = handlers.get(signum)
        if callable(handler) and handler not in (signal.default_int_handler,):
            log.info("passing %s on to the handler the job had before the run", signal.Signals(signum).name)
            handler(signum, None)


def hydra_overrides_for_external_launcher(argv: Sequence[str], env=os.environ) -> list[str]:
    """Extra Hydra arguments when torchrun/srun starts every rank with the same command line.

    All ranks must agree on one run directory, and only rank 0 writes Hydra's files and log, so a
    run directory named after the launcher's job id replaces Hydra's timestamped default (unless
    the user set ``hydra.run.dir``), and other ranks skip ``.hydra/`` and the log file.
    """
    launcher = external_launcher(env)
    if launcher is None:
        return []
    if any(arg in ("-m", "--multirun") or arg.startswith("hydra.mode=MULTIRUN") for arg in argv):
        raise ConfigError(f"-m (multirun) under {launcher}: start one {launcher} job per configuration instead")
    job_id = env.get("TORCHELASTIC_RUN_ID") if launcher == "torchrun" else env.get("SLURM_JOB_ID")
    extra = []
    if not any(arg.startswith("hydra.run.dir=") for arg in argv):
        extra.append(f"hydra.run.dir=outputs/{launcher}-{job_id or 'run'}")
    if int(env.get("RANK", env.get("SLURM_PROCID", "0"))) != 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return extra


def remove_unused_run_dir(run_dir: Path, log_name: str) -> None:
    """A run that never started leaves no directory behind: only what Hydra wrote before the check
    (``.hydra/`` and the job's log) is there, so nothing of value is lost. A directory with anything
    else in it (an earlier run's checkpoints) is left alone."""
    run_dir, cwd = run_dir.resolve(), Path.cwd().resolve()
    if run_dir == cwd or run_dir in cwd.parents:  # the user's working directory stays, whatever it holds
        return
    if not run_dir.is_dir() or any(p.name not in (".hydra", log_name) for p in run_dir.iterdir()):
        return
    for logger in (logging.getLogger(), *logging.Logger.manager.loggerDict.values()):
        for handler in list(getattr(logger, "handlers", ())):  # the job's log file is open: close it for good
            if isinstance(handler, logging.FileHandler) and run_dir in Path(handler.baseFilename).parents:
                handler.close()
                logger.removeHandler(handler)
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:  # outputs/<date>/ too, when this was its only run
        if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()
