"""A pool of worker processes, started once for a world size, that runs many jobs one after another.

Starting a worker and its process group is the costly part of a short distributed check, while a few
steps of a small model take a fraction of a second. So the checks that run many layouts (the parity
table, memory and throughput measurements, the tests' multi-process cases) start ``world_size`` workers
once and hand each of them every job. The workers are forks of the worker server (``worker_server``),
which imported torch and Lightning once for every pool of the process, so a pool starts in a fraction
of a second once the server is up, instead of an interpreter's seconds of imports per worker:

* each job runs on every rank of the pool, on a process group of its own (a fresh rendezvous port
  picked just before the job, the group destroyed after it), so no state of one job's collectives
  reaches the next;
* a job that raises on some rank is reported with each failing rank's traceback (``JobFailed``) and
  the pool goes on to the next job: the failing rank destroys its process group first, so that peers
  blocked in a collective with it fail at once instead of waiting out the timeout;
* a worker that dies, or a job that does not finish within its time, ends the pool's processes; the
  next job starts fresh ones;
* a training job's gloo process groups outlive ``destroy_process_group`` while torch's DTensor caches
  keep its device meshes, or until the job's garbage is collected: a few threads per group that wake
  on their own. After each job a worker clears those caches (``_forget_meshes``) and collects until
  nothing more is freed (``_collect_and_freeze``). Compiled tensor-parallel jobs still leave theirs
  (Dynamo's guards on DTensor specs keep the meshes, past ``torch._dynamo.reset()``: about 28 threads
  per 2-rank job), and so do jobs that run PyTorch's FSDP memory tracker (``validation.memory``:
  its hooks and FSDP's param groups form a cycle through an autograd node, which no collection sees:
  about 19 threads per 2-rank job), so workers that hold more than ``MAX_WORKER_THREADS`` threads are
  replaced before the next job. Left alone, hundreds of jobs left hundreds of threads per worker,
  which on two cores took most of the machine from the job that runs (and idle pools' workers kept
  theirs).

A job is a module-level function (it is pickled by name) called as ``fn(*args)`` on every rank with
the process group initialized and torchrun's environment contract set (``RANK``, ``WORLD_SIZE``, ...);
each rank's return value comes back to the caller in rank order. A pool of one runs its jobs in the
calling process (``inline=True``), on a one-process group, when isolation is not worth a process.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import gc
import os
import pickle
import queue
import signal
import socket
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from curry_train import worker_server

DEFAULT_TIMEOUT_S = 900.0  # a job's whole time on the pool (every rank), and each collective's
FAILURE_GRACE_S = 20.0  # after one rank failed: how long its peers get to fail or finish in turn
# Beyond this, a worker is replaced before the next job (the module's docstring says why). A fresh worker
# holds 4 threads; leftover gloo threads cost about 0.02% of a core each, idle or not (measured on 2 cores:
# 6-8% per worker at 200-240 threads), while replacing a worker costs a fork of the worker server.
MAX_WORKER_THREADS = 128


class JobFailed(RuntimeError):
    """A job failed on some ranks: ``failures`` maps each failing rank to its traceback (or to why it
    gave no answer: it died, or the job ran out of time), the first to fail first: its last line is
    the summary (its peers then fail in the collectives it left)."""

    def __init__(self, name: str, failures: dict[int, str]) -> None:
        self.failures = dict(failures)
        first = next(iter(self.failures.values())).strip().splitlines()
        summary = first[-1] if first else "no output"
        super().__init__(
            f"{name} failed on rank(s) {', '.join(map(str, sorted(self.failures)))}: {summary}\n"
            + "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in sorted(self.failures.items()))
        )


def free_port() -> int:
    """A TCP port free on this machine now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """Linux: have the kernel kill this process when the one that started it dies (SIGKILL: Lightning
    catches SIGTERM and would carry on training with nobody waiting for it)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def local_rank_environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    """torchrun's environment contract for local rank ``rank`` of ``world_size`` on this machine."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def share_cores(world_size: int) -> None:
    """The local ranks share this machine's cores (as torchrun and Lightning's CPU DDP arrange): each
    one's default of a thread per core would oversubscribe them ``world_size`` times over."""
    if world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))


def end_process_group() -> None:
    """Leave the default process group together: a barrier, then ``destroy_process_group``. A rank
    that tears gloo down while a peer still talks to it (the peer's last sends of a pipeline step, a
    result being written) can make the peer abort in std::terminate."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _join_process_group(accelerator: str, timeout_s: float) -> None:
    """The default process group of one job, from the environment (``MASTER_PORT`` is the job's)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if accelerator == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", timeout=timeout)
    elif int(os.environ["WORLD_SIZE"]) == 1:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def _after_job(ok: bool) -> None:
    """Leave the job's process group (together when it went well; at once when not, which fails the
    peers still waiting on this rank) and forget what the job left in process-wide caches: its compiled
    graphs, and DTensor's sharding decisions. Those are keyed by device meshes, which compare equal by
    shape and names alone, and hold the job's meshes in their results: the next job's equal mesh would
    be handed the destroyed (or, by name, another) process group."""
    if dist.is_initialized():
        if ok:
            end_process_group()
        else:
            dist.destroy_process_group()
    torch._dynamo.reset()
    _forget_meshes()


def _forget_meshes() -> None:
    """Drop what DTensor's process-wide caches keep of the job's device meshes. A mesh keeps its process
    groups alive, and each gloo group its threads, which wake on their own: left in the caches, every
    4-rank fsdp+tp job left 31 threads in each worker, and an idle worker's CPU grew by about 1.8% of a
    core per job (measured on 2 cores). Cleared, and the job's garbage collected (``_collect_and_freeze``),
    an idle worker is back to its 4 threads and no CPU. torch clears its sharding-propagation caches with
    a public function; the redistribute planners, the mesh topology and the tensor-meta propagation are
    private caches, cleared where this torch has them (where it does not, ``MAX_WORKER_THREADS`` still
    bounds what is left)."""
    # Imported here, not at the top: DTensor takes seconds to import, and a run's launcher imports this
    # module for its process helpers alone (curry_train.workers).
    from torch.distributed.tensor import _collective_utils, _redistribute, _sharding_prop  # noqa: PLC0415
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache  # noqa: PLC0415

    _clear_sharding_prop_cache()
    planners = getattr(_redistribute, "_planner_cache", None)
    if isinstance(planners, dict):
        planners.clear()
    for cached in (
        getattr(_redistribute, "_gen_transform_infos", None),
        getattr(getattr(_collective_utils, "MeshTopoInfo", None), "build_from_mesh", None),
        getattr(getattr(_sharding_prop, "ShardingPropagator", None), "_propagate_tensor_meta_cached", None),
    ):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def _run_job(fn: Callable[..., Any], args: tuple, accelerator: str, timeout_s: float) -> tuple[bool, Any]:
    """One job on this rank: (True, its pickled return value) or (False, (when it failed, the traceback)).
    The job may set its own thread count (a benchmark's one core per rank): the next starts from ours."""
    threads = torch.get_num_threads()
    try:
        return _run_job_with(fn, args, accelerator, timeout_s)
    finally:
        torch.set_num_threads(threads)


def _run_job_with(fn: Callable[..., Any], args: tuple, accelerator: str, timeout_s: float) -> tuple[bool, Any]:
    try:
        _join_process_group(accelerator, timeout_s)
        value = pickle.dumps(fn(*args))
    except BaseException:  # noqa: B036  (a job's SystemExit or KeyboardInterrupt is its failure too)
        failure = (time.time(), traceback.format_exc())
        with contextlib.suppress(Exception):
            _after_job(ok=False)
        return False, failure
    try:
        _after_job(ok=True)
    except Exception:
        return False, (time.time(), traceback.format_exc())
    return True, value


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in the environment for the length of one job (a variable read when the job's process
    group is made: ``TORCH_FR_BUFFER_SIZE``)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _collect_and_freeze(rounds: int = 4) -> None:
    """In a worker, after a job: collect the job's garbage, then freeze what survives.

    The job's device meshes and process groups sit in reference cycles. One collection is not enough: it
    runs the finalizers of the job's objects, and what they held (the meshes, their groups) is freed by
    the next one (measured: 3,500-5,400 objects, then 31, then none). Frozen after a single collection,
    those 31 were never collected, and each FSDP job's backward left its groups' threads in the worker (6
    to 12 per job, each waking on its own: 0.45% of a core per job per worker). So: collect until a round
    frees nothing (at most ``rounds``).

    What survives is then the worker's own state (imports, caches): frozen, later collections skip it, so
    each takes a fraction of the 0.4-0.5 s a full one took (half a million objects). Only in a worker: a
    caller running jobs inline keeps its own objects collectable."""
    for _ in range(rounds):
        if not gc.collect():
            break
    gc.freeze()


def _serve(rank: int, world_size: int, tasks: Any, results: Any, accelerator: str, environment: dict[str, str]) -> None:
    """A worker: run each job it is handed on a fresh process group until it is handed None."""
    die_with_parent()
    worker_server.release()
    worker_server.adopt_environment(environment)
    share_cores(world_size)
    while True:
        task = tasks.get()
        if task is None:
            break
        job, port, fn, args, timeout_s, env = task
        os.environ.update(local_rank_environment(rank, world_size, port))
        with _environment(env):
            ok, payload = _run_job(fn, args, accelerator, timeout_s)
        results.put((job, rank, ok, payload))
        sys.stdout.flush()
        sys.stderr.flush()
        _collect_and_freeze()
    # The interpreter's teardown can abort on gloo's still-joinable threads ("terminate called without an
    # active exception"): leave without it, as launch's workers do, after the exit handlers. Among them
    # multiprocessing's, which release what a job made in this process: inductor's progress bar makes
    # tqdm's interprocess lock, whose semaphore the resource tracker otherwise reports as leaked.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _threads(pid: Optional[int]) -> int:
    """How many threads process ``pid`` has (0 where /proc does not tell)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _death(exitcode: Optional[int]) -> str:
    """Why a worker gave no answer, in the words of torch.multiprocessing (which capacity trials read)."""
    if exitcode is not None and exitcode < 0:
        return f"the worker terminated with signal {signal.Signals(-exitcode).name}"
    return f"the worker exited with code {exitcode} before answering"


class WorkerPool:
    """``world_size`` local worker processes (``accelerator``: cpu with gloo, or cuda with NCCL, one GPU
    per rank), started at the first job and reused for every later one. Use it as a context manager,
    or ``close()`` it."""

    def __init__(self, world_size: int, accelerator: str = "cpu", inline: bool = False) -> None:
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be positive")
        if inline and world_size != 1:
            raise ValueError("only a pool of one runs its jobs in the calling process")
        self.world_size, self.accelerator, self.inline = world_size, accelerator, inline
        self._processes: list[Any] = []
        self._tasks: list[Any] = []
        self._results: Any = None
        self._jobs = 0
        self.starts = 0  # how many times workers were started

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        env: Optional[dict[str, str]] = None,
    ) -> list[Any]:
        """``fn(*args)`` on every rank, with ``env`` added to the environment for the job; each rank's
        return value, in rank order. Raises ``JobFailed``."""
        self._jobs += 1
        name = f"{getattr(fn, '__qualname__', fn)} (job {self._jobs} of the pool of {self.world_size})"
        if self.inline:
            with _environment(dict(env or {})):
                return [self._run_inline(name, fn, args, timeout_s)]
        if self._alive() and self.bloated():
            self.close()
        if not self._alive():
            self._start()
        port = free_port()  # picked just before the job: no earlier connection can have taken it since
        for tasks in self._tasks:
            tasks.put((self._jobs, port, fn, args, timeout_s, dict(env or {})))
        answers, failures = self._collect(self._jobs, timeout_s)
        if failures:
            raise JobFailed(name, failures)
        return [pickle.loads(answers[rank]) for rank in range(self.world_size)]

    def bloated(self) -> bool:
        """Whether a worker holds more than ``MAX_WORKER_THREADS`` threads (read from /proc; elsewhere, never)."""
        return any(_threads(process.pid) > MAX_WORKER_THREADS for process in self._processes if process.is_alive())

    def close(self) -> None:
        """End the workers: each leaves after its current job; any still there a moment later is killed."""
        for tasks in self._tasks:
            with contextlib.suppress(Exception):
                tasks.put(None)
        deadline = time.monotonic() + 10
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        self._kill()

    # ------------------------------------------------------------------------------------------

    def _run_inline(self, name: str, fn: Callable[..., Any], args: tuple, timeout_s: float) -> Any:
        if dist.is_initialized():
            raise RuntimeError(f"{name}: this process is already in a process group")
        with _environment(local_rank_environment(0, 1, 0)):
            # No full collection after the job (workers collect, _serve): in the caller's process (a test
            # session, a benchmark) it would scan everything the caller holds, which is not frozen; a
            # one-rank job's groups wait for the interpreter's own next collection.
            ok, payload = _run_job(fn, args, self.accelerator, timeout_s)
        if not ok:
            raise JobFailed(name, {0: payload[1]})
        return pickle.loads(payload)

    def _alive(self) -> bool:
        return bool(self._processes) and all(process.is_alive() for process in self._processes)

    def _start(self) -> None:
        self._kill()
        worker_server.start()
        context = mp.get_context("forkserver")
        self._results = context.Queue()
        self._tasks = [context.Queue() for _ in range(self.world_size)]
        self._processes = [
            context.Process(
                target=_serve,
                args=(rank, self.world_size, self._tasks[rank], self._results, self.accelerator, dict(os.environ)),
            )
            for rank in range(self.world_size)
        ]
        for process in self._processes:
            process.start()
        self.starts += 1

    def _kill(self) -> None:
        for process in self._processes:
            if process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
            process.join(timeout=10)
        for handle in (*self._tasks, *([self._results] if self._results is not None else [])):
            handle.close()
            handle.cancel_join_thread()
        self._processes, self._tasks, self._results = [], [], None

    def _collect(self, job: int, timeout_s: float) -> tuple[dict[int, bytes], dict[int, str]]:
        """Every rank's answer to ``job``; a rank that fails gives its peers ``FAILURE_GRACE_S`` more, then
        the pool is ended (its workers may be stuck in a collective that will never complete). Failures
        in the order they happened."""
        answers: dict[int, bytes] = {}
        failures: dict[int, tuple[float, str]] = {}
        deadline = time.monotonic() + timeout_s
        while len(answers) + len(failures) < self.world_size:
            try:
                answered, rank, ok, payload = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = {
                    rank: _death(process.exitcode)
                    for rank, process in enumerate(self._processes)
                    if not process.is_alive() and rank not in answers and rank not in failures
                }
                if dead or time.monotonic() > deadline:
                    missing = set(range(self.world_size)) - set(answers) - set(failures)
                    gave_up = f"no answer within {timeout_s:.0f} s" if not failures else "no answer after a peer failed"
                    failures.update({rank: (time.time(), dead.get(rank, gave_up)) for rank in missing})
                    self._kill()
                continue
            if answered != job:
                continue
            if ok:
                answers[rank] = payload
            else:
                failures[rank] = payload
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        in_order = sorted(failures.items(), key=lambda item: item[1][0])
        return answers, {rank: text for rank, (_, text) in in_order}


class Pools:
    """One ``WorkerPool`` per world size and accelerator, each started the first time it is asked for
    (``inline_single``: a world size of one runs in the calling process). Close them all with
    ``close()`` (or use it as a context manager)."""

    def __init__(self, inline_single: bool = False) -> None:
        self.inline_single = inline_single
        self._pools: dict[tuple[int, str], WorkerPool] = {}

    def __enter__(self) -> Pools:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def get(self, world_size: int, accelerator: str = "cpu") -> WorkerPool:
        key = (world_size, accelerator)
        for other in [other for other in self._pools if other != key and self._pools[other].bloated()]:
            self._pools.pop(other).close()  # idle, its leftover threads still take cores from this one
        if key not in self._pools:
            inline = self.inline_single and world_size == 1
            self._pools[key] = WorkerPool(world_size, accelerator, inline=inline)
        return self._pools[key]

    def run(
        self,
        world_size: int,
        fn: Callable[..., Any],
        *args: Any,
        accelerator: str = "cpu",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        env: Optional[dict[str, str]] = None,
    ) -> list[Any]:
        """``fn(*args)`` on every rank of the pool of ``world_size`` (``WorkerPool.run``)."""
        return self.get(world_size, accelerator).run(fn, *args, timeout_s=timeout_s, env=env)

    def close(self, world_size: Optional[int] = None) -> None:
        """End the pools of ``world_size`` (None: every pool)."""
        for key in [key for key in self._pools if world_size in (None, key[0])]:
            self._pools.pop(key).close()
