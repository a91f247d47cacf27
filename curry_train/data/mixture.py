"""A weighted mixture of sources, cut into rows and global batches in an order no layout can change,
with a position (the loader state) that any number of ranks resumes from.

Rows: every source yields rows of ``seq_len + 1`` tokens (input and shifted target), each from one
source. Token sources (``tokens``, ``stdlib``) are random access: the windows of their token streams
(the tail ``val_fraction`` held out), a fresh permutation per epoch (torch's: the rows are read in
loader workers; this module's other parts, which the launch check uses, need no torch). Streamed sources (``files``,
``parquet``, ``datasets``) are packed in corpus order as their documents are read (the first
``val_fraction`` of documents held out), and the rows of each window of ``shuffle_window`` rows are
permuted; an epoch ends where the documents do.

Blend: row ``r`` of the global stream comes from the source whose share is most behind, the source
``k`` maximizing ``w_k (r + 1) - n_k`` (``n_k``: rows it has served; ties to the first), so after any
number of rows every source has served its share to within one row. Global batch ``s`` is rows
``sG .. sG + G - 1``; data-parallel rank ``i`` of ``d`` keeps the ``i``-th ``1/d`` of them.

State: the rows each source has served and, for a streamed source, where its current window starts
(document cursor and token offset) and how much of it is served. Nothing in it depends on the
number of ranks, so a run saved on 4 data-parallel ranks resumes on 1, 2 or 8 with the same next
global batch: every rank rebuilds the global stream and keeps its own slice.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

import numpy as np

from curry_train.data.chat import DOCUMENT_START, TARGET, ChatEncoder, conversation, special_tokens, template_of
from curry_train.data.config import DataConfig, SourceConfig
from curry_train.data.documents import READERS, Cursor
from curry_train.data.sources import (
    CHECK_TEXT_BYTES,
    CHECK_TOKENIZED_BYTES,
    SCAN_TOKENS,
    ByteTokenizer,
    DataError,
    TokenFileMeta,
    check_token_ids,
    held_out,
    is_tokenizer,
    make_tokenizer,
    open_token_file,
    stdlib_files,
    tokenize_documents,
    windows,
)
from curry_train.options import CHAT_ROLES, DATA_EXHAUSTED, DATA_FORMATS, DATA_SOURCES

STATE_VERSION = 1
CHECKED_RECORDS = 100  # the records of a chat source the launch check renders
RANDOM_ACCESS = ("stdlib", "tokens")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a source's name is a metric key's part: train/tokens/<name>


class Exhausted(Exception):
    """A source has served all its rows and ``data.exhausted=stop``."""

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.source = source


@dataclass(frozen=True)
class Source:
    """One source of the mixture, with every default filled in."""

    name: str
    kind: str
    paths: Tuple[str, ...]
    weight: float
    text_key: str
    tokenizer: str
    format: str = "text"  # text | chat

    @property
    def streamed(self) -> bool:
        return self.kind not in RANDOM_ACCESS


def mixture_of(cfg: DataConfig) -> List[Source]:
    """The sources of ``cfg``: ``data.sources`` (a list or a map name -> source), else the one source
    ``data.source`` + ``data.paths``. Raises ``DataError`` (one line) for what cannot be mixed."""
    if cfg.sources is None:
        entries: List[tuple[Optional[str], Any]] = [(cfg.source, {"kind": cfg.source, "paths": list(cfg.paths)})]
    elif isinstance(cfg.sources, Mapping):
        entries = [(str(name), spec) for name, spec in cfg.sources.items()]
    elif isinstance(cfg.sources, Sequence) and not isinstance(cfg.sources, str):
        entries = [(None, spec) for spec in cfg.sources]
    else:
        raise DataError(f"data.sources: a list of sources or a map name -> source, not {cfg.sources!r}")
    if not entries:
        raise DataError("data.sources is empty: give at least one source, or set it to null and use data.paths")
    known = [f.name for f in fields(SourceConfig)]
    sources: List[Source] = []
    for number, (key, spec) in enumerate(entries):
        where = f"data.sources.{key}" if key is not None else f"data.sources[{number}]"
        if not isinstance(spec, Mapping):
            raise DataError(f"{where}: a source is a mapping with keys {', '.join(known)}, not {spec!r}")
        unknown = sorted(set(spec) - set(known))
        if unknown:
            raise DataError(f"{where}: unknown key {unknown[0]!r} (a source has {', '.join(known)})")
        kind = spec.get("kind", "files")
        if kind not in DATA_SOURCES:
            raise DataError(f"{where}.kind={kind!r}: expected one of {', '.join(DATA_SOURCES)}")
        paths = spec.get("paths") or []
        if isinstance(paths, str):
            paths = [paths]
        if kind != "stdlib" and not paths:
            raise DataError(f"{where}: a {kind} source needs paths")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise DataError(f"{where}.weight={weight!r}: a source's weight is a finite number, 0 or more")
        name = spec.get("name") or key or kind
        form = spec.get("format") or cfg.format
        if form not in DATA_FORMATS:
            raise DataError(f"{where}.format={form!r}: expected one of {', '.join(DATA_FORMATS)}")
        if form == "chat" and kind in RANDOM_ACCESS:
            raise DataError(f"{where}: a chat source reads records (files, parquet, datasets), not {kind}")
        sources.append(
            Source(
                name=str(name),
                kind=kind,
                paths=tuple(str(p) for p in paths),
                weight=float(weight),
                text_key=spec.get("text_key") or cfg.text_key,
                tokenizer=spec.get("tokenizer") or cfg.tokenizer,
                format=form,
            )
        )
    names = [s.name for s in sources]
    if len(set(names)) != len(names):  # unnamed sources of one kind: number them
        seen: Dict[str, int] = {}
        for i, source in enumerate(sources):
            if names.count(source.name) > 1:
                seen[source.name] = seen.get(source.name, 0) + 1
                sources[i] = Source(**{**source.__dict__, "name": f"{source.name}{seen[source.name]}"})
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise DataError(f"data.sources: two sources are named alike ({', '.join(names)}); give each a name")
    for name in names:
        if not NAME.match(name):
            raise DataError(f"data.sources: source name {name!r}: use letters, digits, '_', '.' and '-'")
    if sum(s.weight for s in sources) <= 0:
        raise DataError("data.sources: every weight is 0; give at least one source a positive weight")
    unknown_roles = sorted(set(cfg.train_roles) - set(CHAT_ROLES))
    if unknown_roles:
        raise DataError(f"data.train_roles: unknown role {unknown_roles[0]!r} (expected of {', '.join(CHAT_ROLES)})")
    if cfg.exhausted not in DATA_EXHAUSTED:
        raise DataError(f"data.exhausted={cfg.exhausted!r}: expected one of {', '.join(DATA_EXHAUSTED)}")
    return sources


# ----------------------------------------------------------------------------------------------
# Rows of one source


class TokenWindows:
    """Windows of ``seq_len + 1`` tokens, stride ``seq_len``, over one or more token streams. With
    ``vocab_size``, a window holding a token id at or above it raises ``DataError``."""

    def __init__(self, streams: Sequence[np.ndarray], seq_len: int, vocab_size: Optional[int] = None) -> None:
        self.streams = list(streams)
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.offsets = np.cumsum([0, *(windows(len(s), seq_len) for s in self.streams)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        stream = int(np.searchsorted(self.offsets, index, side="right")) - 1
        start = (index - int(self.offsets[stream])) * self.seq_len
        window = self.streams[stream][start : start + self.seq_len + 1]
        if self.vocab_size is not None and len(window) and int(window.max()) >= self.vocab_size:
            raise DataError(
                f"stream {stream}, tokens {start}-{start + len(window)}: token id {int(window.max())} is not below"
                f" the data's vocabulary ({self.vocab_size}); rewrite the token file with scripts/tokenize_data.py"
            )
        return np.asarray(window, dtype=np.int64)


def split_streams(streams: Sequence[np.ndarray], val_fraction: float) -> tuple[List[np.ndarray], List[np.ndarray]]:
    """Hold out the tail ``val_fraction`` of each stream."""
    train, val = [], []
    for stream in streams:
        cut = len(stream) - held_out(len(stream), val_fraction)
        train.append(stream[:cut])
        val.append(stream[cut:])
    return train, val


def permutation(seed: int, *key: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, *key]).permutation(size)


class TokenRows:
    """A random-access source: row ``j`` is window ``perm_e[j mod n]`` of epoch ``e = j // n``."""

    def __init__(self, source: Source, index: int, cfg: DataConfig, seed: int) -> None:
        self.paths = list(source.paths) if source.kind == "tokens" else []
        if source.kind == "stdlib":
            tokenizer = ByteTokenizer()
            streams = [tokenize_documents((p.read_bytes() for p in stdlib_files()), tokenizer)]
            self.vocab_size, self.separator, self.tokenizer = tokenizer.vocab_size, tokenizer.separator, "byte"
        else:
            streams = [open_token_file(p) for p in source.paths]
            metas = [TokenFileMeta.read(p) for p in source.paths]
            self.vocab_size = max(meta.vocab_size for meta in metas)
            self.separator, self.tokenizer = metas[0].separator, metas[0].tokenizer
        train, val = split_streams(streams, cfg.val_fraction)
        self.train = TokenWindows(train, cfg.seq_len, self.vocab_size)
        self.val = TokenWindows(val, cfg.seq_len, self.vocab_size)
        if len(self.train) == 0:
            raise DataError(f"source {source.name}: too few tokens for one row of data.seq_len={cfg.seq_len}")
        self.name, self.index, self.seed = source.name, index, seed
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)
        self.targeted = False

    def start_state(self) -> Dict[str, Any]:
        return {"taken": 0, "epoch": 0}

    def cursor(self, state: Dict[str, Any], stop: bool) -> "TokenCursor":
        return TokenCursor(self, int(state["taken"]), stop)

    def order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s permutation of the windows: torch's, seeded as before mixtures existed (the
        first source's order is the one-source order of earlier runs, so their checkpoints resume on it)."""
        if epoch != self._epoch:  # one permutation per epoch, not per row
            import torch  # noqa: PLC0415  (rows are read in the workers; the launch check stays torch-free)

            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + self.index * 1_000_000_007)
            self._epoch, self._order = epoch, torch.randperm(len(self.train), generator=generator).numpy()
        return self._order

    def val_rows(self) -> Iterator[np.ndarray]:
        return (self.val[i] for i in range(len(self.val)))


class TokenCursor:
    def __init__(self, rows: TokenRows, taken: int, stop: bool) -> None:
        self.rows, self.taken, self.stop = rows, taken, stop

    def next(self, keep: bool) -> Optional[np.ndarray]:
        epoch, position = divmod(self.taken, len(self.rows.train))
        if epoch and self.stop:
            raise Exhausted(self.rows.name)
        row = self.rows.train[int(self.rows.order(epoch)[position])] if keep else None
        self.taken += 1
        return row

    def state(self) -> Dict[str, Any]:
        return {"taken": self.taken, "epoch": self.taken // len(self.rows.train)}


@dataclass(frozen=True)
class Position:
    """Where a row starts in a streamed source: its document's cursor and the token offset in it."""

    cursor: Cursor
    offset: int = 0

    def as_list(self) -> List[int]:
        return [*self.cursor.as_list(), self.offset]

    @classmethod
    def of(cls, values: Sequence[int]) -> "Position":
        ordinal, file, place, offset = (int(v) for v in values)
        return cls(Cursor(ordinal, file, place), offset)


class StreamedRows:
    """A streamed source: documents read in corpus order, each one's tokens and a separator, packed into
    rows of ``seq_len + 1`` with stride ``seq_len``; the first ``val_docs`` documents are held out."""

    def __init__(self, source: Source, index: int, cfg: DataConfig, seed: int) -> None:
        chat = source.format == "chat"
        self.reader = READERS[source.kind](list(source.paths), source.text_key, records=chat)
        self.tokenizer = make_tokenizer(source.tokenizer)
        self.chat: Optional[ChatEncoder] = None
        if chat:
            template = template_of(cfg.chat_template, source.tokenizer)
            if template is None:
                raise DataError(
                    f"source {source.name}: no chat template (the tokenizer has none): set data.chat_template"
                )
            special = special_tokens(source.tokenizer) if Path(source.tokenizer).is_dir() else {}
            self.chat = ChatEncoder(template, special, self.tokenizer, cfg.train_roles)
        self.targeted = False  # rows carry their tokens' flags (a mixture with a chat source): set by Mixture
        self.vocab_size = self.tokenizer.vocab_size
        self.name, self.index, self.seed = source.name, index, seed
        self.seq_len, self.window = cfg.seq_len, max(1, cfg.shuffle_window)
        self.val_fraction = cfg.val_fraction
        self._val_docs: Optional[int] = None
        self._train_start: Optional[Position] = None

    @property
    def val_docs(self) -> int:
        if self._val_docs is None:
            self._val_docs = held_out(self.reader.count(), self.val_fraction) if self.val_fraction > 0 else 0
        return self._val_docs

    @property
    def train_start(self) -> Position:
        """The first training document: the one after the held-out ones (found by reading, not tokenizing)."""
        if self._train_start is None:
            start = Position(Cursor(self.val_docs, 0, 0)) if self.val_docs == 0 else None
            if start is None:
                for cursor, _ in self.reader.documents():
                    if cursor.ordinal == self.val_docs:
                        start = Position(cursor)
                        break
            if start is None:
                raise DataError(f"source {self.name}: data.val_fraction holds out all its documents")
            self._train_start = start
        return self._train_start

    def _tokens(self, document: Any) -> tuple[np.ndarray, np.ndarray]:
        """A document's token ids and their flags (``data/chat.py``: targets, the document's start)."""
        if self.chat is not None:
            where, record = document
            return self.chat.encode(conversation(record, where), where)
        tokens = self.tokenizer.encode(document).astype(np.int64, copy=False)
        if self.tokenizer.separator is not None:
            tokens = np.append(tokens, self.tokenizer.separator)
        flags = np.full(len(tokens), TARGET, dtype=np.int64)
        if len(flags):
            flags[0] |= DOCUMENT_START
        return tokens, flags

    def pack(self, start: Position, end: Optional[int] = None) -> Iterator[tuple[Position, np.ndarray]]:
        """Rows from ``start`` on, each with where it starts; documents from ordinal ``end`` on are not read."""
        pending: Deque[tuple[Cursor, np.ndarray]] = deque()  # each document's (2, tokens): ids and flags
        head, have, size = start.offset, -start.offset, self.seq_len + 1
        for cursor, document in self.reader.documents(start.cursor):
            if end is not None and cursor.ordinal >= end:
                break
            pending.append((cursor, np.stack(self._tokens(document))))
            have += pending[-1][1].shape[1]
            while have >= size:
                parts, need, at = [], size, head
                for _, piece in pending:
                    parts.append(piece[:, at : at + need])
                    need -= parts[-1].shape[1]
                    at = 0
                    if need == 0:
                        break
                row = np.concatenate(parts, axis=1)
                yield Position(pending[0][0], head), row if self.targeted else row[0]
                advance = self.seq_len
                while advance:
                    left = pending[0][1].shape[1] - head
                    if left > advance:
                        head, advance = head + advance, 0
                    else:
                        advance -= left
                        pending.popleft()
                        head = 0
                have -= self.seq_len

    def start_state(self) -> Dict[str, Any]:
        return {"taken": 0, "epoch": 0, "window": 0, "start": None, "served": 0}

    def cursor(self, state: Dict[str, Any], stop: bool) -> "StreamCursor":
        return StreamCursor(self, state, stop)

    def val_rows(self) -> Iterator[np.ndarray]:
        if self.val_docs == 0:
            return iter(())
        return (row for _, row in self.pack(Position(Cursor()), end=self.val_docs))


class StreamCursor:
    """The serving position in a streamed source: the current window's rows (permuted), and the packer
    that reads on after them."""

    def __init__(self, rows: StreamedRows, state: Dict[str, Any], stop: bool) -> None:
        self.rows, self.stop = rows, stop
        self.taken, self.epoch, self.number = int(state["taken"]), int(state["epoch"]), int(state["window"])
        self.served = int(state["served"])
        self.start: Optional[Position] = Position.of(state["start"]) if state["start"] is not None else None
        self.current: List[np.ndarray] = []
        self.packer: Optional[Iterator[tuple[Position, np.ndarray]]] = None
        if self.start is not None:  # resumed inside a window: read it again, serve what is left of it
            self.packer = self.rows.pack(self.start)
            self._fill()

    def _fill(self) -> bool:
        """Read the next window of rows; False where the epoch's documents have run out."""
        rows: List[np.ndarray] = []
        for position, row in self.packer:
            if not rows:
                self.start = position
            rows.append(row)
            if len(rows) == self.rows.window:
                break
        if not rows:
            return False
        order = permutation(self.rows.seed, self.rows.index, self.epoch, self.number, size=len(rows))
        self.current = [rows[i] for i in order]
        return True

    def next(self, keep: bool) -> Optional[np.ndarray]:
        while self.packer is None or self.served >= len(self.current):
            if self.packer is not None:
                self.number += 1
            else:  # the first window of the run
                self.packer = self.rows.pack(self.rows.train_start)
            self.served = 0
            if not self._fill():
                if self.number == 0 and self.epoch == 0:
                    raise DataError(f"source {self.rows.name}: too few tokens for one row")
                if self.stop:
                    raise Exhausted(self.rows.name)
                self.epoch, self.number = self.epoch + 1, 0
                self.packer = self.rows.pack(self.rows.train_start)
                if not self._fill():
                    raise DataError(f"source {self.rows.name}: too few tokens for one row")
        row = self.current[self.served]
        self.served += 1
        self.taken += 1
        return row if keep else None

    def state(self) -> Dict[str, Any]:
        start = self.start.as_list() if self.start is not None else None
        return {"taken": self.taken, "epoch": self.epoch, "window": self.number, "start": start, "served": self.served}


# ----------------------------------------------------------------------------------------------
# The mixture


def blend(weights: Sequence[float], taken: Sequence[int], count: int) -> List[int]:
    """The sources of the next ``count`` rows of the global stream, given the rows each has served."""
    if len(weights) == 1:
        return [0] * count
    total = sum(weights)
    shares = [w / total for w in weights]
    served = list(taken)
    picks = []
    for _ in range(count):
        row = sum(served) + 1
        best = max(range(len(shares)), key=lambda k: (shares[k] * row - served[k], -k))
        served[best] += 1
        picks.append(best)
    return picks


class Mixture:
    """The sources of a run, their rows, and the global batches they make."""

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.sources = mixture_of(cfg)
        self.rows = [
            (StreamedRows if s.streamed else TokenRows)(s, index, cfg, seed) for index, s in enumerate(self.sources)
        ]
        vocabularies = {s.name: r.vocab_size for s, r in zip(self.sources, self.rows, strict=True)}
        if len(set(vocabularies.values())) > 1:
            listed = ", ".join(f"{name} {size}" for name, size in vocabularies.items())
            raise DataError(f"data.sources: the sources' vocabularies differ ({listed}); use one tokenizer for all")
        self.vocab_size = max(vocabularies.values())
        self.weights = [s.weight for s in self.sources]
        self.names = [s.name for s in self.sources]
        # With a chat source every row carries its tokens' flags (targets, document starts): (2, seq + 1)
        self.targeted = any(s.format == "chat" for s in self.sources)
        for rows in self.rows:
            rows.targeted = self.targeted

    @property
    def separator(self) -> Optional[int]:
        """The token that ends every source's documents (None where they differ, or one has none)."""
        found = {r.tokenizer.separator if isinstance(r, StreamedRows) else r.separator for r in self.rows}
        return found.pop() if len(found) == 1 else None

    def start_state(self) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "sources": {s.name: r.start_state() for s, r in zip(self.sources, self.rows, strict=True)},
        }

    def check_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """``state`` for this mixture: a source it does not name starts from its beginning (a changed mixture,
        resumed with ``checkpoint.allow_config_change``)."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise DataError(f"the checkpoint's data state is not one this version reads: {state!r}"[:300])
        fresh = self.start_state()
        fresh["sources"].update({k: v for k, v in state["sources"].items() if k in fresh["sources"]})
        return fresh

    def batches(
        self, state: Dict[str, Any], rank: int, size: int, keep: Callable[[int], bool] = lambda step: True
    ) -> Iterator[tuple[Optional[np.ndarray], Dict[str, Any]]]:
        """Global batches from ``state`` on, each as this rank's rows (None where ``keep(step)`` is false:
        read past, not assembled) and the state after it. Ends where a source is exhausted (``stop``)."""
        g = self.cfg.global_batch_size
        if g % size:
            raise DataError(f"global batch {g} is not divisible by {size} data-parallel ranks")
        per_rank = g // size
        state = self.check_state(state)
        cursors = [
            r.cursor(state["sources"][s.name], self.cfg.exhausted == "stop")
            for s, r in zip(self.sources, self.rows, strict=True)
        ]
        step = 0
        while True:
            picks = blend(self.weights, [c.taken for c in cursors], g)
            wanted = keep(step)
            try:
                rows = [
                    cursors[k].next(wanted and rank * per_rank <= i < (rank + 1) * per_rank)
                    for i, k in enumerate(picks)
                ]
            except Exhausted:
                return
            if self.targeted:  # a token source's rows: every label a target, documents after each separator
                rows = [r if r is None or r.ndim == 2 else _flagged(r, self.separator) for r in rows]
            batch = np.stack([r for r in rows if r is not None]) if wanted else None
            after = {
                "version": STATE_VERSION,
                "sources": {s.name: c.state() for s, c in zip(self.sources, cursors, strict=True)},
            }
            yield batch, after
            step += 1

    def state_after(self, steps: int) -> Dict[str, Any]:
        """The state after ``steps`` global batches from the start (for a checkpoint that holds none)."""
        state = self.start_state()
        if steps and len(self.rows) == 1 and isinstance(self.rows[0], TokenRows):
            taken = steps * self.cfg.global_batch_size
            state["sources"][self.names[0]] = {"taken": taken, "epoch": taken // len(self.rows[0].train)}
            return state
        for _, after in itertools.islice(self.batches(state, 0, 1, keep=lambda step: False), steps):
            state = after
        return state

    def holds_out(self, index: int) -> bool:
        """Whether source ``index`` holds rows out for validation."""
        rows = self.rows[index]
        return len(rows.val) > 0 if isinstance(rows, TokenRows) else rows.val_docs > 0

    def val_rows(self, index: int) -> Iterator[np.ndarray]:
        rows = self.rows[index].val_rows()
        if self.targeted and isinstance(self.rows[index], TokenRows):
            return (_flagged(row, self.separator) for row in rows)
        return rows


def _flagged(row: np.ndarray, separator: Optional[int]) -> np.ndarray:
    """A token row with its flags: every token a target; a document starts after each separator."""
    flags = np.full(len(row), TARGET, dtype=np.int64)
    if separator is not None:
        flags[1:][row[:-1] == separator] |= DOCUMENT_START
    return np.stack([row, flags])


def served_tokens(state: Dict[str, Any], seq_len: int) -> Dict[str, int]:
    """Training tokens each source has served (inputs, ``seq_len`` a row), from a loader state."""
    return {name: int(s["taken"]) * seq_len for name, s in state["sources"].items()}


# ----------------------------------------------------------------------------------------------
# What the launch check learns before any worker starts


@dataclass(frozen=True)
class SourceSurvey:
    name: str
    vocab_size: int
    separator: Optional[int]  # the token that ends each document (None: the tokenizer has none)
    tokens: Optional[int]  # all its tokens; None where counting would mean tokenizing much text
    train_rows: Optional[int]  # rows of one epoch (None: not counted)
    val_rows: Optional[int]


@dataclass(frozen=True)
class DataSurvey:
    sources: List[SourceSurvey]

    @property
    def vocab_size(self) -> int:
        return max(s.vocab_size for s in self.sources)


def survey(cfg: DataConfig) -> DataSurvey:
    """What every source holds, as far as it is cheap to know; ``DataError`` (one line) for the first
    source or file that cannot be trained on, and for sources whose vocabularies differ. Token files:
    sidecar, size and every token id (head and tail of files over ``SCAN_TOKENS``; ``TokenWindows``
    checks the windows it serves). Text: all of it when counting is cheap, else the head of each file.
    Parquet and saved datasets: their schema and row count."""
    found, fingerprints = [], {}
    for source in mixture_of(cfg):
        found.append(_survey_source(source, cfg))
        if source.streamed:
            fingerprints[source.name] = _fingerprint(_tokenizer(source, cfg))
    sizes = {s.name: s.vocab_size for s in found}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise DataError(f"data.sources: the sources' vocabularies differ ({listed} tokens); use one tokenizer for all")
    if len(set(fingerprints.values())) > 1:
        listed = ", ".join(
            f"{n} ({s.tokenizer})" for n, s in zip(sizes, mixture_of(cfg), strict=True) if n in fingerprints
        )
        raise DataError(f"data.sources: the sources' tokenizers map text to different ids: {listed}; use one")
    separators = {s.name: s.separator for s in found}
    if cfg.document_mask and (None in separators.values() or len(set(separators.values())) > 1):
        listed = ", ".join(f"{name} {separator}" for name, separator in separators.items())
        raise DataError(
            f"data.document_mask=true needs documents that end with one separator token; the sources' are: {listed}"
        )
    return DataSurvey(found)


def _tokenizer(source: Source, cfg: DataConfig):
    """The source's tokenizer, or a ``DataError`` naming the key that set it."""
    key = "data.tokenizer" if source.tokenizer == cfg.tokenizer else f"data.sources.{source.name}.tokenizer"
    if not is_tokenizer(source.tokenizer):
        raise DataError(
            f"{key}={source.tokenizer}: no such file (use 'byte', a tokenizer.json or a directory holding one)"
        )
    try:
        return make_tokenizer(source.tokenizer)
    except ImportError:
        raise
    except Exception as error:  # the tokenizers library reports an unreadable file as a bare Exception
        raise DataError(f"{key}={source.tokenizer}: not a readable tokenizer.json ({error})") from None


def _fingerprint(tokenizer) -> Any:
    if isinstance(tokenizer, ByteTokenizer):
        return "byte"
    return hash(tuple(sorted(tokenizer._tokenizer.get_vocab(with_added_tokens=True).items())))


def _survey_source(source: Source, cfg: DataConfig) -> SourceSurvey:
    if source.kind == "stdlib":
        return SourceSurvey(source.name, ByteTokenizer.vocab_size, ByteTokenizer.separator, None, None, None)
    if source.kind == "tokens":
        counts, vocab, separators = [], 0, set()
        for path in source.paths:
            if not Path(path).is_file():
                raise DataError(f"source {source.name}: {path} does not exist (or is not a file)")
            meta, tokens = TokenFileMeta.read(path), open_token_file(path)
            if len(tokens) <= SCAN_TOKENS:
                check_token_ids(path, tokens, meta.vocab_size)
            else:
                half = SCAN_TOKENS // 2
                check_token_ids(path, tokens[:half], meta.vocab_size)
                check_token_ids(path, tokens[-half:], meta.vocab_size, start=len(tokens) - half)
            counts.append(len(tokens))
            vocab = max(vocab, meta.vocab_size)
            separators.add(meta.separator)
        held = [held_out(n, cfg.val_fraction) for n in counts]
        train = sum(windows(n - h, cfg.seq_len) for n, h in zip(counts, held, strict=True))
        separator = separators.pop() if len(separators) == 1 else None
        val = sum(windows(h, cfg.seq_len) for h in held)
        return SourceSurvey(source.name, vocab, separator, sum(counts), train, val)
    tokenizer = _tokenizer(source, cfg)
    reader = READERS[source.kind](list(source.paths), source.text_key, records=source.format == "chat")
    reader.check()
    if source.format == "chat":  # its template, and its first records rendered and masked
        template = template_of(cfg.chat_template, source.tokenizer)
        if template is None:
            raise DataError(
                f"source {source.name}: the tokenizer {source.tokenizer} has no chat template; set data.chat_template"
            )
        special = special_tokens(source.tokenizer) if Path(source.tokenizer).is_dir() else {}
        encoder = ChatEncoder(template, special, tokenizer, cfg.train_roles)
        checked = 0
        for _, (where, record) in itertools.islice(reader.documents(), CHECKED_RECORDS):
            encoder.encode(conversation(record, where), where)
            checked += 1
        if not checked:
            raise DataError(f"source {source.name}: no records in {', '.join(source.paths)}")
        return SourceSurvey(source.name, tokenizer.vocab_size, tokenizer.separator, None, None, None)
    if source.kind != "files":
        if reader.count() == 0:
            raise DataError(f"source {source.name}: no documents")
        return SourceSurvey(source.name, tokenizer.vocab_size, tokenizer.separator, None, None, None)
    byte_level = isinstance(tokenizer, ByteTokenizer)
    size = sum(Path(p).stat().st_size for p in source.paths)
    if size > (CHECK_TEXT_BYTES if byte_level else CHECK_TOKENIZED_BYTES):
        return SourceSurvey(source.name, tokenizer.vocab_size, tokenizer.separator, None, None, None)
    lengths = []
    for _, document in reader.documents():
        if byte_level:
            length = len(document.encode("utf-8") if isinstance(document, str) else document)
        else:
            length = len(tokenizer.encode(document))
        lengths.append(length + (tokenizer.separator is not None))
    if not lengths:
        raise DataError(f"source {source.name}: no documents in {', '.join(source.paths)}")
    val_docs = held_out(len(lengths), cfg.val_fraction)
    train, val = sum(lengths[val_docs:]), sum(lengths[:val_docs])
    return SourceSurvey(
        source.name,
        tokenizer.vocab_size,
        tokenizer.separator,
        sum(lengths),
        windows(train, cfg.seq_len),
        windows(val, cfg.seq_len),
    )
