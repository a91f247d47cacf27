"""Starting the processes of a run.

* ``python train.py trainer.devices=N``: the Hydra job process checks the config, then starts N
  workers with ``torch.multiprocessing`` (``spawn``), each given the resolved config and the run
  directory, and waits. Workers never run Hydra again, so under ``-m`` each job of a sweep runs
  once and writes one run directory. When a worker fails, the others are terminated and the job
  fails instead of hanging; workers also die with their parent.
* Under torchrun or srun every process is already a worker: it joins the others instead.
* With one process, the job process trains itself.

Workers get torchrun's environment contract (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ...), so every path below is the same code from there on.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

from curry_train.callbacks import Preempted, Watchdog, report
from curry_train.checkpoint import files
from curry_train.checkpoint.dcp import NonFiniteStateError
from curry_train.config import ConfigError
from curry_train.config.checks import LaunchPlan, check, external_launcher
from curry_train.config.schema import Config
from curry_train.data.sources import DataError
from curry_train.pool import die_with_parent, free_port, local_rank_environment, share_cores
from curry_train.run import configure_worker_logging, train
from curry_train.train_step import NonFiniteError

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
EXIT_NONFINITE = 3  # a NaN/inf gradient norm or loss stopped the run (README: "Nothing silent")
EXIT_PREEMPTED = 75  # SIGTERM/SIGUSR1: the run saved a checkpoint and stopped; re-run with ckpt_path=auto
EXIT_DATA = 2  # a worker found its data unusable past what the check reads (README: "Bad input")
WORKER_EXIT_CODES = (EXIT_DATA, EXIT_NONFINITE, Watchdog.EXIT_HUNG, EXIT_PREEMPTED)
EXIT_INTERRUPTED = 130  # SIGINT, as a shell reports it
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)  # the launcher passes these on to its workers
RECEIVED: list[int] = []  # the preemption signals this process got (a scheduler's notice)


def _worker(rank: int, world_size: int, port: int, target: Callable[..., Any], args: Sequence[Any]) -> None:
    die_with_parent()
    os.environ.update(local_rank_environment(rank, world_size, port))
    share_cores(world_size)
    target(*args)
    # Done: run the exit handlers (loggers, trackers), flush, and leave without the interpreter's
    # teardown, where destroying gloo's still-joinable threads can abort a finished worker in
    # std::terminate ("terminate called without an active exception") and fail a good run.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world_size: int, target: Callable[..., Any], *args: Any) -> None:
    """Run ``target(*args)`` in ``world_size`` local worker processes; raise if any fails."""

    port = free_port()
    context = mp.start_processes(
        _worker, args=(world_size, port, target, args), nprocs=world_size, start_method="spawn", join=False
    )
    # SIGTERM and SIGUSR1 (a scheduler's notice) go on to the workers, which save and stop together;
    # SIGINT (Ctrl-C, kill -INT) ends them at once.
    previous = {signum: signal.getsignal(signum) for signum in (*FORWARDED, signal.SIGINT)}

    def forward(signum: int, frame: Any) -> None:
        RECEIVED.append(signum)
        for pid in context.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def interrupt(signum: int, frame: Any) -> None:
        _end_workers(context.pids())
        raise KeyboardInterrupt

    for signum in FORWARDED:
        signal.signal(signum, forward)
    signal.signal(signal.SIGINT, interrupt)
    try:
        # When one worker fails, its peers are usually blocked in a collective that will never complete:
        # give them a few seconds to exit, then SIGTERM, then SIGKILL.
        while not context.join(grace_period=SHUTDOWN_GRACE_S):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _end_workers(pids: Sequence[int]) -> None:
    """SIGINT to each worker (Lightning stops its loop), then SIGKILL to what is left a moment later."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_worker(container: dict, run_dir: str, plan: LaunchPlan) -> None:
    """The body of every worker process (also of the job process when it trains itself): the run of the
    resolved config ``container`` (typed once, here) on the layout the check planned."""

    cfg = Config.of(container)
    rank = int(os.environ.get("RANK", "0"))
    configure_worker_logging(Path(run_dir), rank)
    if cfg.trainer.flight_recorder:  # read when the process groups are made; the user's setting stands
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(cfg.trainer.flight_recorder))
    try:
        train(cfg, Path(run_dir), plan.accelerator, plan.dims, plan.ckpt_path)
    except (NonFiniteError, NonFiniteStateError) as error:  # every rank sees it: the values are global
        if rank == 0:
            kept = files.checkpoints_in(Path(run_dir) / "checkpoints")
            report(f"curry-train: error: {error}; the last good checkpoint: {kept[-1] if kept else 'none'}")
        sys.exit(EXIT_NONFINITE)
    except DataError as error:  # a token id or a document past what the check read
        report(f"curry-train: error: {error}")
        sys.exit(EXIT_DATA)
    except Preempted as stopped:  # every rank stopped at the same step
        if stopped.signum is not None:
            RECEIVED.append(stopped.signum)
        if rank == 0:
            kept = files.checkpoints_in(Path(run_dir) / "checkpoints")
            report(
                f"curry-train: preempted ({stopped}): {kept[-1] if kept else 'no checkpoint'};"
                f" exit {EXIT_PREEMPTED}; the same command with ckpt_path=auto continues"
            )
        sys.exit(EXIT_PREEMPTED)


def launch(cfg: DictConfig, run_dir: Path) -> None:
    """Check ``cfg``, then train: in this process, or in ``trainer.devices`` local workers."""
    plan: LaunchPlan = check(cfg, run_dir=run_dir)
    container = OmegaConf.to_container(cfg, resolve=True)
    if plan.ckpt_path:
        log.info("resuming from %s", plan.ckpt_path)
    if plan.external_launcher is not None or plan.world_size == 1:
        run_worker(container, str(run_dir), plan)
        return
    log.info("starting %d workers (%s) in %s", plan.world_size, plan.dims, run_dir)
    spawn(plan.world_size, run_worker, container, str(run_dir), plan)


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


class JobFailed(RuntimeError):
    """A job of a sweep that failed, for a launcher that runs jobs elsewhere (submitit, joblib) to record
    as failed; its message is the one line the job printed."""


SWEEP_FAILURES: list[str] = []  # the failed jobs of a sweep run in this process, for its closing summary


def main(cfg: DictConfig) -> None:
    """The body of ``python train.py``: one Hydra job.

    A job that fails -- its config check, or a worker -- prints one line. A single run then exits
    with the failure's status (2: the config; 3, 4, 75: see README; 1: anything else). A sweep goes
    on to its next job (``curry-train`` exits 1 at the end, naming the failed jobs), except after
    SIGINT or preemption, which stop the whole sweep."""

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    schedulers = {signum: signal.getsignal(signum) for signum in FORWARDED}
    try:
        code = _run_job(cfg, run_dir, f"{hydra_cfg.job.name}.log")
    except KeyboardInterrupt:  # the workers were ended by the launcher's SIGINT handler
        kept = files.checkpoints_in(run_dir / "checkpoints")
        print(f"curry-train: interrupted; the last checkpoint: {kept[-1] if kept else 'none'}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    if code == 0:
        return
    if code == EXIT_PREEMPTED:
        pass_on_preemption(schedulers)
    if hydra_cfg.mode != RunMode.MULTIRUN or code == EXIT_PREEMPTED:
        sys.exit(code)
    overrides = " ".join(hydra_cfg.overrides.task)
    failure = f"job {hydra_cfg.job.num} ({overrides}): exit {code}"
    if not hydra_cfg.launcher._target_.endswith("BasicLauncher"):
        raise JobFailed(failure)
    SWEEP_FAILURES.append(failure)


def pass_on_preemption(handlers: dict[int, Any]) -> None:
    """The run saved and stopped on a preemption signal: hand that signal to the handler the process had
    before the run replaced it, if any. That is how a scheduler's own handling still happens after the
    save: submitit (Hydra's submitit launcher) requeues the job from its SIGUSR1 handler, and the
    requeued job, run with ``ckpt_path=auto``, resumes from this checkpoint."""
    for signum in dict.fromkeys(RECEIVED):
        handler = handlers.get(signum)
        if callable(handler) and handler not in (signal.default_int_handler,):
            log.info("passing %s on to the handler the job had before the run", signal.Signals(signum).name)
            handler(signum, None)


def _run_job(cfg: DictConfig, run_dir: Path, log_name: str) -> int:
    """Check and train; the job's exit status, every failure reported in one line on stderr."""
    try:
        launch(cfg, run_dir)
    except ConfigError as error:
        print(f"curry-train: error: {error}", file=sys.stderr)
        remove_unused_run_dir(run_dir, log_name)
        return 2
    except SystemExit as stopped:  # the job process trained itself and said why it stopped
        return stopped.code if isinstance(stopped.code, int) else int(stopped.code is not None)
    except ProcessRaisedException as error:  # a worker raised: its traceback is in the message
        print(error, file=sys.stderr)
        print(f"curry-train: error: rank {error.error_index} failed (its traceback is above)", file=sys.stderr)
        return 1
    except ProcessExitedException as error:
        if error.exit_code in WORKER_EXIT_CODES:  # the workers said why
            return error.exit_code
        print(f"curry-train: error: {error}; see {run_dir}", file=sys.stderr)
        return 1
    return 0


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
