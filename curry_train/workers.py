"""The processes of a run, once its config passed its check (``launch``):

* ``trainer.devices=N``: the Hydra job process starts N workers with ``torch.multiprocessing``, each
  given the resolved config, the run directory, the check's plan (the layout's ``ParallelDims``) and
  the job's environment, and waits. The workers are forks of the worker server (``worker_server``,
  started by ``launch`` as soon as the check passed), which imported torch and Lightning once, not
  interpreters that each import them again. Workers never run Hydra again, so under ``-m`` each job
  of a sweep runs once and writes one run directory. When a worker fails, the others are terminated
  and the job fails instead of hanging; workers die with the server, and the server with the job
  process.
* Under torchrun or srun every process is already a worker: it trains in place.
* With one process, the job process trains itself.

Workers get torchrun's environment contract (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ...), so every path below is the same code from there on.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

from curry_train import worker_server
from curry_train.checkpoint import files
from curry_train.config.checks import LaunchPlan
from curry_train.exits import (
    EXIT_BAD_INPUT,
    EXIT_HUNG,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    EXIT_SAVE_FAILED,
    FORWARDED,
    WORKER_EXIT_CODES,
    report,
)
from curry_train.pool import die_with_parent, free_port, local_rank_environment, share_cores

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0


@dataclass
class JobEnd:
    """How one job's training ended: its exit status, and the preemption signals it received (a
    scheduler's notice, to be passed on to the scheduler's own handler)."""

    code: int
    signals: list[int] = field(default_factory=list)


def train_workers(container: dict, run_dir: Path, plan: LaunchPlan) -> JobEnd:
    """Train the checked run: in this process, or in ``plan.world_size`` local workers. Every failure
    is reported in one line on stderr (a worker's traceback above it) and is the returned status."""
    received: list[int] = []
    try:
        if plan.external_launcher is not None or plan.world_size == 1:
            run_worker(container, str(run_dir), plan, received)
        else:
            log.info("starting %d workers (%s) in %s", plan.world_size, plan.dims, run_dir)
            spawn(plan.world_size, run_worker, container, str(run_dir), plan, received=received)
    except SystemExit as stopped:  # the job process trained itself and said why it stopped
        return JobEnd(stopped.code if isinstance(stopped.code, int) else int(stopped.code is not None), received)
    except ProcessRaisedException as error:  # a worker raised: its traceback is in the message
        print(error, file=sys.stderr)
        print(f"curry-train: error: rank {error.error_index} failed (its traceback is above)", file=sys.stderr)
        return JobEnd(1, received)
    except ProcessExitedException as error:
        if error.exit_code in WORKER_EXIT_CODES:  # the workers said why
            return JobEnd(error.exit_code, received)
        print(f"curry-train: error: {error}; see {run_dir}", file=sys.stderr)
        return JobEnd(1, received)
    return JobEnd(0, received)


def _worker(
    rank: int, world_size: int, port: int, environment: dict[str, str], target: Callable[..., Any], args: Sequence[Any]
) -> None:
    die_with_parent()
    worker_server.release()
    worker_server.adopt_environment(environment)
    os.environ.update(local_rank_environment(rank, world_size, port))
    share_cores(world_size)
    try:
        target(*args)
        code = 0
    except SystemExit as stopped:  # the worker said why it stopped (preempted: 75, non-finite: 3, ...)
        code = stopped.code if isinstance(stopped.code, int) else int(stopped.code is not None)
    # Done: run the exit handlers (loggers, trackers), flush, and leave without the interpreter's
    # teardown, where destroying gloo's still-joinable threads can abort a finished worker in
    # std::terminate ("terminate called without an active exception") and turn its status into SIGABRT.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn(world_size: int, target: Callable[..., Any], *args: Any, received: Optional[list[int]] = None) -> None:
    """Run ``target(*args)`` in ``world_size`` local worker processes; raise if any fails. ``received``:
    where the preemption signals passed on to the workers are noted."""

    port = free_port()
    worker_server.start()  # already running when launch started it
    context = mp.start_processes(
        _worker,
        args=(world_size, port, dict(os.environ), target, args),
        nprocs=world_size,
        start_method="forkserver",
        join=False,
    )
    # SIGTERM and SIGUSR1 (a scheduler's notice) go on to the workers, which save and stop together;
    # SIGINT (Ctrl-C, kill -INT) ends them at once.
    previous = {signum: signal.getsignal(signum) for signum in (*FORWARDED, signal.SIGINT)}

    def forward(signum: int, frame: Any) -> None:
        if received is not None:
            received.append(signum)
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


def run_worker(container: dict, run_dir: str, plan: LaunchPlan, received: Optional[list[int]] = None) -> None:
    """The body of every worker process (also of the job process when it trains itself): the run of the
    resolved config ``container`` (typed once, here) on the layout the check planned. ``received``: where
    the job process, training itself, notes the preemption signal it got."""
    # Lightning and the training code load here, in the process that trains: a launcher of N workers only
    # starts them and waits, so it skips seconds of imports before the workers start (and they skip none).
    from curry_train.callbacks import Preempted  # noqa: PLC0415
    from curry_train.checkpoint.dcp import CheckpointWriteError, NonFiniteStateError  # noqa: PLC0415
    from curry_train.checkpoint.files import CheckpointError  # noqa: PLC0415
    from curry_train.config.schema import Config  # noqa: PLC0415
    from curry_train.data.sources import DataError  # noqa: PLC0415
    from curry_train.run import configure_worker_logging, train  # noqa: PLC0415
    from curry_train.train_step import NonFiniteError  # noqa: PLC0415
    from curry_train.watchdog import is_collective_timeout, timed_out  # noqa: PLC0415

    cfg = Config.of(container)
    rank = int(os.environ.get("RANK", "0"))

    def last_good() -> object:
        return files.last_checkpoint(run_dir, cfg.checkpoint.dir)

    configure_worker_logging(Path(run_dir), rank)
    if cfg.trainer.flight_recorder:  # read when the process groups are made; the user's setting stands
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(cfg.trainer.flight_recorder))
    try:
        train(cfg, Path(run_dir), plan.accelerator, plan.dims, plan.ckpt_path)
    except (NonFiniteError, NonFiniteStateError) as error:  # every rank sees it: the values are global
        if rank == 0:
            report(f"curry-train: error: {error}; the last good checkpoint: {last_good() or 'none'}")
        sys.exit(EXIT_NONFINITE)
    except DataError as error:  # a token id or a document past what the check read: the rank that read it
        report(f"curry-train: error: {error}")
        sys.exit(EXIT_BAD_INPUT)
    except CheckpointError as error:  # a checkpoint refused: every rank reads the same files
        if rank == 0:
            report(f"curry-train: error: {error}")
        sys.exit(EXIT_BAD_INPUT)
    except CheckpointWriteError as error:  # every rank sees it (the writes agree); the last complete one stays
        if rank == 0:
            report(f"curry-train: error: {error}")
        sys.exit(EXIT_SAVE_FAILED)
    except RuntimeError as error:
        if not is_collective_timeout(error):
            raise
        # trainer.timeout fired before the hang watchdog: the stuck rank is named all the same
        world = cfg.trainer.devices * cfg.trainer.num_nodes
        reports, line = timed_out(Path(run_dir), rank, world, cfg.trainer.timeout)
        if reports:
            report(f"{line}; the last good checkpoint: {last_good() or 'none'}")
        sys.exit(EXIT_HUNG)
    except Preempted as stopped:  # every rank stopped at the same step
        if stopped.signum is not None and received is not None:
            received.append(stopped.signum)
        if rank == 0:
            report(
                f"curry-train: preempted ({stopped}): {last_good() or 'no checkpoint'};"
                f" exit {EXIT_PREEMPTED}; the same command with ckpt_path=auto continues"
            )
        sys.exit(EXIT_PREEMPTED)
