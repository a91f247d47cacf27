"""The worker pool every multi-process check runs in: many jobs on the same workers, each on a process group
of its own; a job that fails on one rank is reported and the next one runs; nothing of one job's
collectives reaches the next."""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.forkserver
import os
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import FAST, train
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import curry_train.pool
from curry_train import worker_server
from curry_train.pool import JobFailed, Pools, WorkerPool, _threads


def _sum_of_ranks(offset: int) -> tuple[int, float, str, str]:
    value = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(value)
    return dist.get_rank(), float(value), os.environ["MASTER_PORT"], os.environ.get("CURRY_TEST_VALUE", "")


def _fails_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("rank one cannot go on")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a peer that is gone: it must fail too, at once
    return 0


def _dies_on_rank_one() -> int:
    if dist.get_rank() == 1:
        os._exit(9)
    return 0


def _this_workers_threads() -> int:
    return _threads(os.getpid())


def _this_workers_gloo_threads() -> int:
    tasks = Path(f"/proc/{os.getpid()}/task")
    return sum((task / "comm").read_text().startswith(("pt_gloo", "gloo_")) for task in tasks.iterdir())


def _fsdp_backward_on_a_flattened_mesh() -> int:
    """FSDP2's backward over a mesh flattened from a 3-D one (as ParallelState's dp_shard_cp): its groups
    sit in reference cycles that one collection does not free (``pool._collect_and_freeze``)."""
    mesh = init_device_mesh("cpu", (1, 2, 1), mesh_dim_names=("pp", "dp", "tp"))["dp", "tp"]._flatten("dp_tp")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    fully_shard(model, mesh=mesh)
    model(torch.randn(4, 8)).sum().backward()
    return _this_workers_gloo_threads()


def _environment_and_parent() -> tuple[str, str, int]:
    return os.environ.get("CURRY_TEST_LATE", ""), os.environ.get("HOME", "(none)"), os.getppid()


def _frozen_objects() -> int:
    return gc.get_freeze_count()


def _leave_threads(count: int) -> int:
    """Start ``count`` threads that never end (as a job's leftover gloo process groups leave theirs); this
    worker's thread count after."""
    hold = threading.Event()
    for _ in range(count):
        threading.Thread(target=hold.wait, daemon=True).start()
    return _this_workers_threads()


def _scaled_through_a_mesh(scale: float) -> tuple[bool, list[float]]:
    """An op on a DTensor sharded over a 2-rank mesh (its result's layout is what DTensor caches), gathered
    back: whether the result lives on this job's mesh (whose groups are this job's), and its values."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    scaled = distribute_tensor(torch.arange(8, dtype=torch.float32), mesh, [Shard(0)]) * scale
    return scaled.device_mesh is mesh, scaled.redistribute(mesh, [Replicate()]).to_local().tolist()


@pytest.fixture(scope="module")
def pool():
    """A pool of its own (the tests count its starts), shared by this module's tests."""
    with WorkerPool(2) as module_pool:
        yield module_pool


@pytest.mark.slow
def test_jobs_share_the_workers_and_each_gets_its_own_group(pool):
    starts = pool.starts
    first = pool.run(_sum_of_ranks, 1)
    second = pool.run(_sum_of_ranks, 10, env={"CURRY_TEST_VALUE": "set for this job"})
    third = pool.run(_sum_of_ranks, 0)
    assert pool.starts == max(starts, 1)  # every job on the same two workers
    assert [rank for rank, *_ in first] == [0, 1]  # answers in rank order
    assert [total for _, total, *_ in (first[0], second[0], third[0])] == [3.0, 21.0, 1.0]
    assert len({first[0][2], second[0][2], third[0][2]}) == 3  # a fresh rendezvous port per job
    assert [value for *_, value in second] == ["set for this job"] * 2 and third[0][3] == ""


@pytest.mark.slow
def test_workers_are_forks_of_the_worker_server_with_their_starters_environment(monkeypatch):
    """A pool's workers are forked by the worker server, which imported torch and Lightning once for every
    pool of this process, and they have this process's environment as it was when they started, not the
    server's: a variable set since the server started is there, one removed since is not."""
    worker_server.start()
    monkeypatch.setenv("CURRY_TEST_LATE", "set after the server started")
    monkeypatch.delenv("HOME")
    with WorkerPool(2) as fresh:
        answers = fresh.run(_environment_and_parent)
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    assert answers == [("set after the server started", "(none)", server)] * 2 and server != os.getpid()


@pytest.mark.slow
def test_a_failing_rank_is_reported_and_the_next_job_runs(pool):
    pool.run(_sum_of_ranks, 0)
    starts = pool.starts
    with pytest.raises(JobFailed) as failed:
        pool.run(_fails_on_rank_one, timeout_s=120)
    assert str(failed.value).splitlines()[0].endswith("ValueError: rank one cannot go on")  # the first to fail
    assert set(failed.value.failures) == {0, 1}  # its peer failed in the collective it left
    assert pool.run(_sum_of_ranks, 0)[0][1] == 1.0  # the same workers go on
    assert pool.starts == starts
    with pytest.raises(JobFailed, match="exited with code 9"):
        pool.run(_dies_on_rank_one, timeout_s=120)
    assert pool.run(_sum_of_ranks, 0)[1][1] == 1.0  # fresh workers for the next job
    assert pool.starts == starts + 1


@pytest.mark.slow
def test_equal_meshes_of_later_jobs_use_their_own_groups(pool):
    """DTensor caches its sharding decisions by mesh, and meshes of the same shape compare equal: without
    the pool emptying those caches between jobs, the second job's result would live on the first job's
    mesh, whose groups are destroyed (and whose group names this job may give to other groups)."""
    for scale in (1.0, 2.0):
        for on_this_jobs_mesh, values in pool.run(_scaled_through_a_mesh, scale):
            assert on_this_jobs_mesh and values == [scale * i for i in range(8)]


@pytest.mark.slow
def test_workers_holding_too_many_threads_are_replaced_before_the_next_job(pool, monkeypatch):
    before = max(pool.run(_this_workers_threads))
    starts = pool.starts
    after = max(pool.run(_leave_threads, 40))
    assert after >= before + 40
    monkeypatch.setattr(curry_train.pool, "MAX_WORKER_THREADS", before + 20)
    fresh = max(pool.run(_this_workers_threads))  # the threads are gone with the old workers
    assert pool.starts == starts + 1 and fresh <= before + 5
    assert pool.run(_sum_of_ranks, 0)[0][1] == 1.0 and pool.starts == starts + 1  # under the bound: kept


@pytest.mark.slow
def test_an_idle_pool_holding_too_many_threads_is_ended_when_another_is_asked_for(monkeypatch):
    with Pools() as pools:
        (held,) = pools.run(1, _leave_threads, 40)
        single = pools.get(1)
        monkeypatch.setattr(curry_train.pool, "MAX_WORKER_THREADS", held + 10)
        pools.run(2, _sum_of_ranks, 0)
        assert pools.get(1) is single  # under the bound: kept for later
        monkeypatch.setattr(curry_train.pool, "MAX_WORKER_THREADS", held - 30)
        pools.run(2, _sum_of_ranks, 0)
        assert pools.get(1) is not single and not single._alive()


@pytest.mark.slow
def test_a_training_job_leaves_no_gloo_threads_in_the_workers(pools, tmp_path):
    """A 2x2 fsdp+tp training job: DTensor's caches keep its device meshes, and with them the threads of
    its gloo groups (31 per worker), unless the pool clears them after the job. Its workers then hold
    the gloo threads they held before it, give or take those of the asking job's own group (which
    starts 1 to 3 as it goes)."""
    before = pools.run(4, _this_workers_gloo_threads)
    train(pools, [*FAST, "trainer.max_steps=1", "trainer.devices=4", "parallel=fsdp+tp"], tmp_path / "run")
    after = pools.run(4, _this_workers_gloo_threads)
    assert all(now <= then + 2 for now, then in zip(after, before, strict=True)), (before, after)


@pytest.mark.slow
def test_fsdp_jobs_on_flattened_meshes_leave_no_gloo_threads(pool):
    """Each such job left 6 to 12 gloo threads per worker while workers froze after a single collection."""
    before = pool.run(_this_workers_gloo_threads)
    during = [pool.run(_fsdp_backward_on_a_flattened_mesh) for _ in range(3)]
    after = pool.run(_this_workers_gloo_threads)
    assert all(max(d) > max(before) for d in during)  # the jobs' own groups were there while they ran
    assert all(now <= then + 2 for now, then in zip(after, before, strict=True)), (before, during, after)


@pytest.mark.slow
def test_a_worker_freezes_what_survives_a_job(pool):
    """Its later collections (one after every job, to free the job's meshes) skip its own state."""
    pool.run(_sum_of_ranks, 0)
    assert min(pool.run(_frozen_objects)) > 10_000


_KEPT: list = []


def _a_named_lock() -> str:
    """What tqdm does when inductor draws its progress bar in a job: an interprocess lock, whose named
    semaphore the resource tracker watches; kept alive until the worker leaves."""
    lock = multiprocessing.get_context("forkserver").RLock()
    _KEPT.append(lock)
    return lock._semlock.name


@pytest.mark.slow
def test_a_closed_pool_leaves_no_semaphore_of_its_jobs_behind():
    """A worker leaves through the exit handlers, so what a job made is released: otherwise the resource
    tracker unlinks the semaphore only when this process ends, and warns of it as leaked."""
    with WorkerPool(1) as one:
        (name,) = one.run(_a_named_lock)
        semaphore = Path("/dev/shm") / f"sem.{name.lstrip('/')}"
        assert semaphore.exists()
    assert not semaphore.exists()
