"""What training reads: packed windows of a token stream, and the layout-independent order of global
batches (each data-parallel rank reads its slice)."""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from curry_train.data.sources import DataError, held_out, windows


class PackedSequences(Dataset):
    """Windows of ``seq_len + 1`` tokens, stride ``seq_len``, over one or more token streams. With
    ``vocab_size``, a window holding a token id at or above it raises ``DataError``."""

    def __init__(self, streams: Sequence[np.ndarray], seq_len: int, vocab_size: Optional[int] = None) -> None:
        self.streams = list(streams)
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.offsets = np.cumsum([0, *(windows(len(s), seq_len) for s in self.streams)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> torch.Tensor:
        stream = int(np.searchsorted(self.offsets, index, side="right")) - 1
        start = (index - int(self.offsets[stream])) * self.seq_len
        window = self.streams[stream][start : start + self.seq_len + 1]
        if self.vocab_size is not None and len(window) and int(window.max()) >= self.vocab_size:
            raise DataError(
                f"stream {stream}, tokens {start}-{start + len(window)}: token id {int(window.max())} is not below"
                f" the data's vocabulary ({self.vocab_size}); rewrite the token file with scripts/tokenize_data.py"
            )
        return torch.from_numpy(window.astype(np.int64))


def split_streams(streams: Sequence[np.ndarray], val_fraction: float) -> tuple[List[np.ndarray], List[np.ndarray]]:
    """Hold out the tail ``val_fraction`` of each stream."""
    train, val = [], []
    for stream in streams:
        cut = len(stream) - held_out(len(stream), val_fraction)
        train.append(stream[:cut])
        val.append(stream[cut:])
    return train, val


class GlobalBatchSampler(Sampler[List[int]]):
    """This data-parallel rank's slice of each global batch, from ``start_step()`` on, without end.

    Global batch ``s`` holds the indices ``perm_e[k*G:(k+1)*G]`` where ``e, k = divmod(s, n // G)`` and
    ``perm_e`` is a permutation of the ``n`` sequences seeded by ``(seed, e)`` (``shuffle=False``:
    sequential order). The data position of a resumed run is therefore a function of its step alone.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
        start_step: Callable[[], int] = lambda: 0,
        num_steps: Optional[int] = None,
    ) -> None:
        if global_batch_size % dp_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {dp_size} data-parallel ranks")
        if num_samples < global_batch_size:
            raise ValueError(f"{num_samples} sequences cannot fill one global batch of {global_batch_size}")
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.start_step, self.num_steps = start_step, num_steps
        self.steps_per_epoch = num_samples // global_batch_size

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def global_batch(self, step: int) -> torch.Tensor:
        """The indices of global batch ``step`` (all ranks' slices together)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        return self._order(epoch)[position * self.global_batch_size : (position + 1) * self.global_batch_size]

    def __iter__(self) -> Iterator[List[int]]:
        per_rank = self.global_batch_size // self.dp_size
        step = self.start_step()
        end = None if self.num_steps is None else step + self.num_steps
        cached_epoch, order = -1, torch.empty(0)
        while end is None or step < end:
            epoch, position = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:  # one permutation per epoch, not per step
                cached_epoch, order = epoch, self._order(epoch)
            start = position * self.global_batch_size + self.dp_rank * per_rank
            yield order[start : start + per_rank].tolist()
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless sampler has no length")
        return self.num_steps
