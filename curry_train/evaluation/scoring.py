"""Scoring token rows on the live model of any layout: the one primitive evaluation needs.

A request (``Row``) is a sequence of token ids and which of them are scored (each given the tokens before
it). ``Scorer.score`` runs every rank's share through ``TrainStep.score`` in the training batch's shape
(``global_batch_size / dp`` rows of ``seq_len + 1`` tokens, so a pipeline's micro-batches and context
parallelism's sequence shards are what training uses): the data-parallel ranks take distinct rows, their
tensor, pipeline and context parallel peers the same rows, and the results are gathered so every rank
holds every row's. Every rank must call it with the same rows, in the same order (it is collective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from curry_train.data.chat import DOCUMENT_START, TARGET
from curry_train.train_step import TrainStep


@dataclass(frozen=True)
class Row:
    """Token ids, and for each one whether it is scored (the first never is: nothing predicts it)."""

    tokens: Sequence[int]
    scored: Sequence[bool]


@dataclass(frozen=True)
class RowScore:
    logprob: float  # the summed log-probability of the scored tokens
    greedy: bool  # every scored token is the model's greedy pick
    targets: int  # how many tokens were scored
    next_token: int  # the greedy pick at the scored token (meaningful where exactly one is scored)


class Scorer:
    """``TrainStep.score`` over any number of rows, in batches of the training batch's shape."""

    def __init__(self, step: TrainStep, rows_per_rank: int, seq_len: int, pad_id: int = 0) -> None:
        self.step, self.rows_per_rank, self.seq_len, self.pad_id = step, rows_per_rank, seq_len, pad_id
        ps = step.parallel_state
        self.dp_rank, self.dp_size = ps.dp_rank, ps.dp_size
        self.dp_group = ps.get_dp_group() if ps.dp_size > 1 else None

    @property
    def width(self) -> int:
        """The most tokens a row holds (longer requests are cut from the left by the caller)."""
        return self.seq_len + 1

    def score(self, rows: Sequence[Row]) -> list[RowScore]:
        per_step = self.rows_per_rank * self.dp_size
        out: list[Tensor] = []
        for start in range(0, len(rows), per_step):
            chunk = rows[start : start + per_step]
            mine = chunk[self.dp_rank * self.rows_per_rank : (self.dp_rank + 1) * self.rows_per_rank]
            scores = self.step.score(self._batch(mine).to(self.step.device))
            if self.dp_group is not None:
                gathered = torch.empty(self.dp_size * self.rows_per_rank, 4, dtype=scores.dtype, device=scores.device)
                dist.all_gather_into_tensor(gathered, scores.contiguous(), group=self.dp_group)
                scores = gathered
            out.append(scores[: len(chunk)].cpu())
        table = torch.cat(out) if out else torch.zeros(0, 4, dtype=torch.float64)
        return [
            RowScore(float(lp), bool(greedy == targets), int(targets), int(round(float(nxt))))
            for lp, greedy, targets, nxt in table.tolist()
        ]

    def _batch(self, rows: Sequence[Row]) -> Tensor:
        """(rows_per_rank, 2, seq_len + 1): the rows' tokens and flags, padded (on the right: causal
        attention keeps the padding out of every scored token); missing rows score nothing."""
        batch = torch.zeros(self.rows_per_rank, 2, self.width, dtype=torch.int64)
        batch[:, 0] = self.pad_id
        batch[:, 1, 0] = DOCUMENT_START  # one document per row (under a document mask)
        for i, row in enumerate(rows):
            if len(row.tokens) > self.width:
                raise ValueError(f"a row of {len(row.tokens)} tokens: at most {self.width}")
            n = len(row.tokens)
            batch[i, 0, :n] = torch.as_tensor(list(row.tokens), dtype=torch.int64)
            batch[i, 1, :n] |= torch.as_tensor([TARGET if s else 0 for s in row.scored], dtype=torch.int64)
        return batch
