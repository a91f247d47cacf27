"""Named evaluation sets (``eval.sets``): each a data source of any kind the mixture reads, all of it
held out, read in order as rows of ``seq_len + 1`` tokens with their flags (every token a target, or a
chat source's trained roles only), so one training step's shape scores them in every layout."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np

from curry_train.data.config import DataConfig
from curry_train.data.documents import Cursor
from curry_train.data.mixture import Mixture, Position, TokenRows, _flagged
from curry_train.data.sources import DataError


def set_config(data: DataConfig, name: str, spec: Mapping[str, Any]) -> DataConfig:
    """The data config that reads the eval set ``name`` (its source ``spec``) whole: no rows held out."""
    return dataclasses.replace(data, sources={name: dict(spec)}, val_fraction=0.0)


class EvalSet:
    """One eval set's rows, in order: (2, seq_len + 1) arrays of token ids and flags."""

    def __init__(self, name: str, spec: Mapping[str, Any], data: DataConfig, seed: int) -> None:
        self.name = name
        self.mixture = Mixture(set_config(data, name, spec), seed)
        self.vocab_size = self.mixture.vocab_size

    def rows(self) -> Iterator[np.ndarray]:
        source = self.mixture.rows[0]
        found = False
        if isinstance(source, TokenRows):
            for index in range(len(source.train)):
                found = True
                yield _flagged(source.train[index], source.separator)
        else:
            source.targeted = True  # rows with their flags: a chat set's targets are its trained roles
            for _, row in source.pack(Position(Cursor())):
                found = True
                yield row
        if not found:
            raise DataError(
                f"eval.sets.{self.name}: too few tokens for one row of data.seq_len={self.mixture.cfg.seq_len}"
            )
