"""The worker server: one process that imports what every worker needs (torch, Lightning, the model and
the loop) once, and forks this process's workers -- a run's local ranks (``workers``) and the worker
pools' (``pool``) -- instead of each worker being an interpreter that imports them again: seconds per
worker, and N times over where the workers outnumber the cores.

It is multiprocessing's ``forkserver`` with those imports preloaded, started once per process (a sweep's
jobs and every pool of a test session share it). It imports, touches no device and runs no job, so a
fork of it starts clean. Nothing here imports torch: a launcher starts the server as soon as its config
has passed its check, and imports torch itself while the server imports the rest.
"""

from __future__ import annotations

import os
from multiprocessing import forkserver

# What every worker imports before its first job: torch, Lightning, the model, the loop, the pool.
WORKER_IMPORTS = ("curry_train.workers", "curry_train.run")


def start() -> None:
    """Start the server with ``WORKER_IMPORTS`` preloaded, if this process has none running. It lives as
    long as this process (no longer: see ``release``)."""
    forkserver.set_forkserver_preload(list(WORKER_IMPORTS))
    forkserver.ensure_running()


def release() -> None:
    """In a forked worker: close its copy of the pipe by which the server knows that the process that
    started it lives. multiprocessing hands it to every process the server forks, so that the server
    outlives its starter while anything it forked still runs; here that would keep a killed job's workers
    running, since they die with the server (``pool.die_with_parent``) and the server would wait for
    them. Closed, the starter holds the only copy: when it dies, the server ends, and its workers too."""
    server = forkserver._forkserver  # the stdlib's singleton; its fd attribute is there since Python 3.4
    alive = getattr(server, "_forkserver_alive_fd", None)
    if alive is not None:
        os.close(alive)
        server._forkserver_alive_fd = None


def adopt_environment(environment: dict[str, str]) -> None:
    """In a forked worker: make its environment ``environment`` (its starter's when it started the
    worker). A fork has the server's, the starter's when the server started: a later job of a sweep, or
    a later pool of a session, may have set or removed variables since (Hydra's ``hydra.job.env_set``, a
    test's settings). What the preloaded modules read when they were imported (``TORCH_LOGS``, say) stays
    as the server read it: a sweep whose jobs differ in such a variable needs a process per job (Hydra's
    submitit or joblib launchers)."""
    for key in set(os.environ) - set(environment):
        del os.environ[key]
    os.environ.update(environment)
