"""The data's configuration: what a run's ``data`` group sets (no torch: checked before torch is imported)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class DataConfig:
    """Where tokens come from and how they are batched."""

    source: str = "stdlib"  # stdlib (bundled corpus) | files (text/JSONL paths) | tokens (memmap files)
    paths: List[str] = field(default_factory=list)  # input files for source=files or source=tokens
    text_key: str = "text"  # field holding the text in JSONL records
    tokenizer: str = "auto"  # byte | a tokenizer.json | a HF model directory | auto: model.init_from's, else byte
    seq_len: int = 256  # tokens per training sequence
    global_batch_size: int = 32  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    val_fraction: float = 0.02  # tail of the token stream held out for validation
    num_workers: int = 0  # DataLoader worker processes per rank


# ----------------------------------------------------------------------------------------------
# Tokenizers
