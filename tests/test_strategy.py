"""The strategy's collectives are Lightning's: reduce sums when asked to sum, whatever form the
operation takes (a string or a ``ReduceOp``), and averages only when asked to."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies.parallel import ParallelStrategy
from torch.distributed import ReduceOp

from curry_train.config import compose
from curry_train.config.checks import check
from curry_train.config.schema import Config
from curry_train.strategy import CurryStrategy


def _reduce_worker() -> dict:
    cfg = compose(["trainer.devices=2"])
    strategy = CurryStrategy(Config.of(cfg), check(cfg).dims)
    value = float(dist.get_rank() + 1)  # 1 and 2
    results = {
        str(op): float(strategy.reduce(torch.tensor(value), reduce_op=op))
        for op in ("sum", "mean", "max", ReduceOp.SUM, ReduceOp.MAX)
    }
    results["broadcast"] = strategy.broadcast({"rank": dist.get_rank()})["rank"]
    return results


@pytest.mark.slow
def test_reduce_and_broadcast_on_two_ranks(pools):
    for rank, results in enumerate(pools.run(2, _reduce_worker)):
        assert results == {
            "sum": 3.0,
            "mean": 1.5,
            "max": 2.0,
            str(ReduceOp.SUM): 3.0,
            str(ReduceOp.MAX): 2.0,
            "broadcast": 0,
        }, (rank, results)


def test_a_failed_teardown_does_not_hide_the_error_that_ended_the_run(monkeypatch):
    """Lightning tears the strategy down inside its handler of the error that ended the fit. An FSDP2 unit
    stopped mid-gather by a collective's timeout cannot be moved to the CPU there; the timeout, not that,
    must reach the worker (which names the stuck rank and exits 4). Outside such a handler a teardown
    error is raised as it is."""
    cfg = compose([])
    strategy = CurryStrategy(Config.of(cfg), check(cfg).dims)

    def failing_teardown(self):
        raise AttributeError("'Parameter' object has no attribute '_local_tensor'")

    monkeypatch.setattr(ParallelStrategy, "teardown", failing_teardown)
    with pytest.raises(RuntimeError, match="Timed out waiting"):
        try:
            raise RuntimeError("Timed out waiting 3000ms for send operation to complete")
        except RuntimeError:
            strategy.teardown()
            raise
    with pytest.raises(AttributeError, match="_local_tensor"):
        strategy.teardown()
