"""How a run ends: its exit statuses (README, "Exit statuses"), the signals a launcher passes on to its
workers, and the one line that says why it stopped."""

from __future__ import annotations

import logging
import signal
import sys

EXIT_BAD_INPUT = 2  # a config or data that cannot run, or a bad argument of any command: one line, nothing started
EXIT_NONFINITE = 3  # a NaN/inf gradient norm or loss stopped the run before it was applied, logged or saved
EXIT_HUNG = 4  # no rank advanced for trainer.hang_timeout seconds (the watchdog), or a collective's timeout
EXIT_SAVE_FAILED = 5  # a checkpoint could not be written (a full disk, a denied write); the one before it stays
EXIT_PREEMPTED = 75  # SIGTERM/SIGUSR1: the run saved a checkpoint and stopped; re-run with ckpt_path=auto
EXIT_INTERRUPTED = 130  # SIGINT, as a shell reports it
# a worker said why it stopped
WORKER_EXIT_CODES = (EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_HUNG, EXIT_SAVE_FAILED, EXIT_PREEMPTED)
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)  # a scheduler's notice: the launcher passes these on to its workers

log = logging.getLogger(__name__)


def report(line: str) -> None:
    """An error line into the run's log and onto stderr (once: Hydra's console handler writes to stdout)."""
    log.error(line)
    handlers = logging.getLogger().handlers
    if not any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr for h in handlers):
        print(line, file=sys.stderr, flush=True)
