"""What training reads: this rank's slice of each global batch of the mixture, as tensors, in loader
workers ahead of the step; and each source's held-out rows for validation."""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from curry_train.data.mixture import Mixture


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainBatches(IterableDataset):
    """Global batches from ``state`` on: this rank's rows, ``(global_batch_size / dp, seq_len + 1)`` token
    ids, each with the loader state after it (what a checkpoint saved after that step resumes from).

    With ``W`` loader workers, worker ``w`` assembles global batches ``w, w + W, ...`` and reads past the
    others (a token source skips them; a streamed source reads them too, so its tokenizing is not
    spread over workers); the DataLoader takes the workers' batches in turn, so the order is the same."""

    def __init__(self, mixture: Mixture, state: Dict[str, Any], rank: int, size: int) -> None:
        self.mixture, self.state, self.rank, self.size = mixture, state, rank, size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Dict[str, Any]]]:
        worker, workers = _worker()
        batches = self.mixture.batches(self.state, self.rank, self.size, keep=lambda step: step % workers == worker)
        for rows, state in batches:
            if rows is not None:
                yield torch.from_numpy(rows), state


class ValBatches(IterableDataset):
    """Source ``index``'s held-out rows in order, cut into global batches (the last, partial one
    dropped); this rank's slice of each, up to ``limit`` batches."""

    def __init__(self, mixture: Mixture, index: int, rank: int, size: int, limit: Optional[int] = None) -> None:
        self.mixture, self.index, self.rank, self.size, self.limit = mixture, index, rank, size, limit

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker, workers = _worker()
        g = self.mixture.cfg.global_batch_size
        per_rank = g // self.size
        batch, number = [], 0
        for row in self.mixture.val_rows(self.index):
            batch.append(row)
            if len(batch) < g:
                continue
            if self.limit is not None and number >= self.limit:
                return
            if number % workers == worker:
                yield torch.from_numpy(np.stack(batch[self.rank * per_rank : (self.rank + 1) * per_rank]))
            batch, number = [], number + 1
