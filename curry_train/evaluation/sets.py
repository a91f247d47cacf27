"""The loss of each named evaluation set on the live model: every row of the set (or its first
``max_batches`` global batches), this rank's slice of each global batch through ``TrainStep.forward_eval``
as validation runs it, the sums reduced over the ranks that hold distinct tokens."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from curry_train.data.eval_sets import EvalSet
from curry_train.train_step import TrainStep


@dataclass(frozen=True)
class SetLoss:
    loss: float  # the mean token loss over the set's targets
    tokens: int  # the targets it was taken over

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def _batches(rows: Iterable[np.ndarray], size: int) -> Iterable[list[np.ndarray]]:
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def set_loss(step: TrainStep, eval_set: EvalSet, global_batch: int, max_batches: Optional[int] = None) -> SetLoss:
    """Collective over every rank of the run. The last global batch is filled with rows without targets."""
    ps = step.parallel_state
    per_rank = global_batch // ps.dp_size
    sums = torch.zeros(2, dtype=torch.float64, device=step.device)
    batches = _batches(eval_set.rows(), global_batch)
    with step.evaluating():
        for batch in itertools.islice(batches, max_batches):
            filler = np.zeros_like(batch[0])  # flags 0: nothing scored
            batch = batch + [filler] * (global_batch - len(batch))
            mine = torch.from_numpy(np.stack(batch[ps.dp_rank * per_rank : (ps.dp_rank + 1) * per_rank]))
            loss, labels = step.forward_eval(mine.to(step.device))
            sums += torch.stack([loss.detach().double().reshape(()), labels.double().reshape(())])
    dist.all_reduce(sums, group=step.metrics_group)
    loss, tokens = float(sums[0]), int(sums[1])
    return SetLoss(loss / tokens if tokens else math.nan, tokens)
