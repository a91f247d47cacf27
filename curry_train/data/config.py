"""The data's configuration: what a run's ``data`` group sets (no torch: checked before torch is imported)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class DataConfig:
    """Where tokens come from and how they are batched.

    One source (``source`` + ``paths``), or a mixture (``sources``: a list, or a map name -> source),
    each source a mapping with the keys of ``SourceConfig``; ``data/mixture.py`` reads either form."""

    source: str = "stdlib"  # stdlib (bundled corpus) | files (text, JSONL) | tokens | parquet | datasets
    paths: List[str] = field(default_factory=list)  # input files (or directories: parquet, datasets)
    sources: Optional[Any] = (
        None  # a mixture: [{kind, paths, weight, ...}, ...] or {name: {...}}; replaces source/paths
    )
    text_key: str = "text"  # field holding the text in JSONL records, Parquet columns and datasets rows
    format: str = "text"  # text | chat: records of messages (role/content) or prompt/completion (data/chat.py)
    chat_template: Optional[str] = None  # a Jinja chat template, or a file holding one (null: the tokenizer's)
    train_roles: List[str] = field(default_factory=lambda: ["assistant"])  # chat: the roles whose turns are targets
    tokenizer: str = "auto"  # byte | a tokenizer.json | a HF model directory | auto: model.init_from's, else byte
    seq_len: int = 256  # tokens per training sequence
    global_batch_size: int = 32  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    val_fraction: float = 0.02  # held out for validation: a token file's tail, a streamed source's first documents
    exhausted: str = "repeat"  # a source that has served all its rows: repeat (its next epoch) | stop (the run)
    document_mask: bool = False  # attention stays inside each packed document, positions restart at its start
    shuffle_window: int = 1024  # a streamed source's rows are shuffled within windows of this many rows
    num_workers: int = 0  # DataLoader worker processes per rank


@dataclass
class SourceConfig:
    """One source of a mixture (``data.sources``)."""

    kind: str = "files"  # files (.txt / .jsonl) | tokens (token files) | parquet | datasets (save_to_disk) | stdlib
    paths: List[str] = field(default_factory=list)  # its files (parquet: files or directories; datasets: one directory)
    weight: float = 1.0  # its share of training rows (and tokens), relative to the others' weights
    text_key: Optional[str] = None  # null: data.text_key
    format: Optional[str] = None  # null: data.format
    tokenizer: Optional[str] = None  # null: data.tokenizer; every source must produce the same vocabulary
    name: Optional[str] = None  # null: the map's key, else the kind (numbered where two share it)
