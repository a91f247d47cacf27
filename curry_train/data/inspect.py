"""What ``curry-data`` reports of a mixture: each source's documents and tokens, the shares its first
batches draw, document lengths, a decoded row, and the loader's own speed."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from torch.utils.data import DataLoader

from curry_train.data.config import DataConfig
from curry_train.data.loader import TrainBatches
from curry_train.data.mixture import Mixture, StreamedRows, TokenRows, blend, survey
from curry_train.data.sources import ByteTokenizer, make_tokenizer

SCANNED_TOKENS = 1 << 24  # a token file's documents are counted in its head of this many tokens


def _percentiles(lengths: List[int]) -> Optional[Dict[str, int]]:
    if not lengths:
        return None
    values = np.asarray(lengths)
    return {"p50": int(np.percentile(values, 50)), "p90": int(np.percentile(values, 90)), "max": int(values.max())}


def _token_documents(rows: TokenRows, limit: int) -> tuple[Optional[int], List[int]]:
    """Documents (where the whole stream was scanned, else None) and the first ``limit`` documents' lengths."""
    if rows.separator is None:
        return None, []
    stream = rows.train.streams[0]
    ends = np.flatnonzero(np.asarray(stream[:SCANNED_TOKENS]) == rows.separator)
    lengths = np.diff(np.concatenate([[-1], ends]))[:limit].tolist()
    whole = len(rows.train.streams) == 1 and len(stream) <= SCANNED_TOKENS
    return (len(ends) if whole else None), lengths


def _decoder(rows: Any):
    if isinstance(rows, StreamedRows):
        tokenizer = rows.tokenizer
    else:
        name = rows.tokenizer
        try:
            tokenizer = make_tokenizer(name) if name == "byte" or Path(name).exists() else None
        except Exception:  # a tokenizer that no longer loads: show the ids
            tokenizer = None
    if isinstance(tokenizer, ByteTokenizer):
        return lambda ids: bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")
    if tokenizer is None:
        return lambda ids: " ".join(map(str, ids))
    return lambda ids: tokenizer._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _pieces(row: np.ndarray, separator: Optional[int], decode, width: int = 160) -> List[str]:
    """The row's documents (cut after each separator, which is not shown), decoded, each cut to ``width``
    characters."""
    cuts = [i + 1 for i, token in enumerate(row.tolist()) if token == separator] if separator is not None else []
    bounds = [0, *[c for c in cuts if c < len(row)], len(row)]
    pieces = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        piece = row[start:end]
        piece = piece[:-1] if len(piece) and piece[-1] == separator else piece
        text = decode(piece).replace("\n", "\\n")
        pieces.append(text if len(text) <= width else text[: width - 3] + "...")
    return pieces


def inspect_mixture(cfg: DataConfig, seed: int, batches: int, documents: int, workers: int, seconds: float, dp: int):
    """The report's data part (``curry-data``): sources, drawn shares, document lengths, a sample row and
    the loader's speed as rank 0 of ``dp``."""
    counted = {s.name: s for s in survey(cfg).sources}
    mixture = Mixture(cfg, seed)
    states = [s for _, s in itertools.islice(mixture.batches(mixture.start_state(), 0, 1, lambda step: False), batches)]
    drawn = {name: s["taken"] for name, s in states[-1]["sources"].items()}
    total_weight = sum(mixture.weights)
    sources, lengths_by_source = [], {}
    for source, rows in zip(mixture.sources, mixture.rows, strict=True):
        if isinstance(rows, TokenRows):
            count, lengths = _token_documents(rows, documents)
            per_epoch = len(rows.train)
        else:
            count = rows.reader.count()
            lengths = [len(rows._tokens(doc)[0]) for _, doc in itertools.islice(rows.reader.documents(), documents)]
            per_epoch = counted[source.name].train_rows
        lengths_by_source[source.name] = lengths
        sources.append(
            {
                "name": source.name,
                "kind": source.kind,
                "weight": source.weight,
                "share": source.weight / total_weight,
                "documents": count,
                "tokens": counted[source.name].tokens,
                "rows_per_epoch": per_epoch,
                "drawn": drawn[source.name] / sum(drawn.values()),
                "drawn_rows": drawn[source.name],
                "document_lengths": _percentiles(lengths),
            }
        )
    first, _ = next(mixture.batches(mixture.start_state(), 0, 1))
    origin = blend(mixture.weights, [0] * len(mixture.weights), 1)[0]  # the source of the first row
    rows = mixture.rows[origin]
    separator = rows.tokenizer.separator if isinstance(rows, StreamedRows) else rows.separator
    row = first[0] if first.ndim == 2 else first[0, 0]  # a chat mixture's rows carry their flags
    sample = {"source": mixture.names[origin], "documents": _pieces(row, separator, _decoder(rows))}
    return {
        "seq_len": cfg.seq_len,
        "global_batch_size": cfg.global_batch_size,
        "seed": seed,
        "batches": batches,
        "sources": sources,
        "sample": sample,
        "loader": loader_speed(mixture, workers, seconds, dp),
    }, lengths_by_source


def loader_speed(mixture: Mixture, workers: int, seconds: float, dp: int) -> Dict[str, Any]:
    """Global batches/s that rank 0 of ``dp`` loads with ``workers`` loader workers, measured for
    ``seconds`` after the first batch (worker start-up is not the loader's steady speed)."""
    loader = DataLoader(TrainBatches(mixture, mixture.start_state(), 0, dp), batch_size=None, num_workers=workers)
    iterator = iter(loader)
    next(iterator)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(iterator)
        count += 1
    elapsed = time.perf_counter() - start
    del iterator
    per_s = count / elapsed
    g, seq = mixture.cfg.global_batch_size, mixture.cfg.seq_len
    return {
        "workers": workers,
        "dp": dp,
        "measured_batches": count,
        "seconds": elapsed,
        "batches_per_s": per_s,
        "tokens_per_s": per_s * g * seq,
    }


def plot_lengths(lengths_by_source: Dict[str, List[int]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name, lengths in lengths_by_source.items():
        if lengths:
            axis.hist(lengths, bins=50, alpha=0.5, label=f"{name} ({len(lengths)} documents)")
    axis.set_xlabel("document length (tokens)")
    axis.set_ylabel("documents")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title("Document lengths per source (the first documents of each)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
