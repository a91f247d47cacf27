"""The strategy's collectives are Lightning's: reduce sums when asked to sum, whatever form the
operation takes (a string or a ``ReduceOp``), and averages only when asked to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from curry_train.config import compose
from curry_train.launch import end_process_group, spawn
from curry_train.strategy import CurryStrategy


def _reduce_worker(out_dir: str) -> None:
    dist.init_process_group("gloo")
    strategy = CurryStrategy(compose(["trainer.devices=2"]))
    value = float(dist.get_rank() + 1)  # 1 and 2
    results = {
        str(op): float(strategy.reduce(torch.tensor(value), reduce_op=op))
        for op in ("sum", "mean", "max", ReduceOp.SUM, ReduceOp.MAX)
    }
    results["broadcast"] = strategy.broadcast({"rank": dist.get_rank()})["rank"]
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    end_process_group()


@pytest.mark.slow
def test_reduce_and_broadcast_on_two_ranks(tmp_path):
    spawn(2, _reduce_worker, str(tmp_path))
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results == {
            "sum": 3.0,
            "mean": 1.5,
            "max": 2.0,
            str(ReduceOp.SUM): 3.0,
            str(ReduceOp.MAX): 2.0,
            "broadcast": 0,
        }, (rank, results)
