"""Scoring token rows on the live model of any layout: the one primitive evaluation needs.

A request (``Row``) is a sequence of token ids and which of them are scored (each given the tokens before
it). ``Scorer.score`` runs every rank's share through ``TrainStep.score`` in the training batch's shape
(``global_batch_size / dp`` rows of ``seq_len + 1`` tokens, so a pipeline's micro-batches and context
parallelism's sequence shards are what training uses; other layouts take rows cut to the batch's
longest, the longest rows first): the data-parallel ranks take distinct rows, their
tensor, pipeline and context parallel peers the same rows, and the results are gathered so every rank
holds every row's. Every rank must call it with the same rows, in the same order (it is collective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from curry_train.data.chat import DOCUMENT_START, TARGET
from curry_train.primitives.parallel_state import all_gather_single
from curry_train.train_step import TrainStep

SHORT_ROWS = 64  # where a layout takes rows shorter than training's, their inputs are a multiple of this


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

    @property
    def fixed_width(self) -> bool:
        """A pipeline's stages and context parallelism's sequence shards expect the training row's length;
        other layouts take shorter rows (a multiple of ``SHORT_ROWS``: tensor parallelism's sequence shards)."""
        return self.step.pipelined or self.step.layout.cp is not None

    def score(self, rows: Sequence[Row]) -> list[RowScore]:
        """Every row's score, in the order given. The rows run longest first, so that (where the layout
        allows rows shorter than training's) each batch is as wide as its longest row needs."""
        per_step = self.rows_per_rank * self.dp_size
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
        out: list[Tensor] = []
        for start in range(0, len(rows), per_step):
            chunk = [rows[i] for i in order[start : start + per_step]]
            width = self.width
            if not self.fixed_width:
                width = min(self.width, math.ceil((len(chunk[0].tokens) - 1) / SHORT_ROWS) * SHORT_ROWS + 1)
            mine = chunk[self.dp_rank * self.rows_per_rank : (self.dp_rank + 1) * self.rows_per_rank]
            scores = self.step.score(self._batch(mine, width).to(self.step.device))
            if self.dp_group is not None:
                gathered = torch.empty(self.dp_size * self.rows_per_rank, 4, dtype=scores.dtype, device=scores.device)
                all_gather_single(gathered, scores.contiguous(), group=self.dp_group)
                scores = gathered
            out.append(scores[: len(chunk)].cpu())
        table = torch.cat(out) if out else torch.zeros(0, 4, dtype=torch.float64)
        found: list[RowScore] = [None] * len(rows)  # type: ignore[list-item]
        for position, (lp, greedy, targets, nxt) in zip(order, table.tolist(), strict=True):
            found[position] = RowScore(float(lp), bool(greedy == targets), int(targets), int(round(float(nxt))))
        return found

    def _batch(self, rows: Sequence[Row], width: int) -> Tensor:
        """(rows_per_rank, 2, width): the rows' tokens and flags, padded (on the right: causal attention
        keeps the padding out of every scored token); missing rows score nothing."""
        batch = torch.zeros(self.rows_per_rank, 2, width, dtype=torch.int64)
        batch[:, 0] = self.pad_id
        batch[:, 1, 0] = DOCUMENT_START  # one document per row (under a document mask)
        for i, row in enumerate(rows):
            if len(row.tokens) > width:
                raise ValueError(f"a row of {len(row.tokens)} tokens: at most {width}")
            n = len(row.tokens)
            batch[i, 0, :n] = torch.as_tensor(list(row.tokens), dtype=torch.int64)
            batch[i, 1, :n] |= torch.as_tensor([TARGET if s else 0 for s in row.scored], dtype=torch.int64)
        return batch
