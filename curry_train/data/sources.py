"""Tokenizers, text documents and token files (no torch).

* The bundled corpus (``stdlib``): this Python's own standard-library source files, present on every
  machine (no download). Byte-level.
* Text: ``.txt`` files (one document each) and ``.jsonl`` files (one document per record, the
  ``text_key`` field), read through bytes, a Hugging Face ``tokenizer.json``, or a Hugging Face model
  directory's tokenizer (``model.init_from``'s by default). Every document's tokens end with a separator.
* Token files: a flat numpy memmap (``.bin``) with a ``.json`` sidecar naming its dtype and vocabulary,
  as written by ``scripts/tokenize_data.py``.

How sources are mixed, packed into rows and ordered: ``mixture.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence

import numpy as np

BYTE_SEPARATOR = 0  # NUL never occurs in text files, so it marks document boundaries in byte streams
TOKEN_SUFFIX = ".bin"
META_SUFFIX = ".json"
SCAN_TOKENS = 1 << 28  # token files up to this many tokens are scanned whole at the check; larger: head and tail
CHECK_TEXT_BYTES = 256 << 20  # byte-level text up to this size is read whole (and counted) at the check
CHECK_TOKENIZED_BYTES = 4 << 20  # text read through a tokenizer file: the same, up to this size
TEXT_SAMPLE = 1 << 16  # bytes of a large text file the check samples


class DataError(ValueError):
    """Input data that cannot be trained on; the message names the file, what is wrong with it and the fix."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, token 0 (NUL) separates documents."""

    vocab_size = 256
    separator: Optional[int] = BYTE_SEPARATOR
    name = "byte"

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8)


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer: a ``tokenizer.json`` file, or a model directory holding one.

    A file: documents are encoded without special tokens and separated by the first of
    ``SEPARATOR_CANDIDATES`` it knows. A model directory: as its own configuration says: the tokenizer's
    post-processor adds what it adds (Llama 3's BOS; ``add_bos_token: true`` adds BOS where it does
    not), and every document ends with the EOS token of ``tokenizer_config.json`` (else
    ``config.json``'s ``eos_token_id``, else a candidate). An instruct model's EOS is its end of turn.
    """

    SEPARATOR_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer  # noqa: PLC0415  (an optional dependency)
        except ImportError as error:  # optional dependency
            raise ImportError("data.tokenizer is a tokenizer file: `pip install tokenizers` to use it") from error
        self.name = str(path)
        directory = Path(path) if Path(path).is_dir() else None
        file = directory / TOKENIZER_FILE if directory is not None else Path(path)
        self._tokenizer = Tokenizer.from_file(str(file))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens = directory is not None
        settings = _tokenizer_config(directory) if directory is not None else {}
        eos = _directory_eos(directory, settings, self._tokenizer) if directory is not None else None
        ids = (self._tokenizer.token_to_id(token) for token in self.SEPARATOR_CANDIDATES)
        self.separator = eos if eos is not None else next((i for i in ids if i is not None), None)
        # add_bos_token: true, for a tokenizer.json whose post-processor does not add it (older Llama 2 files)
        bos = _token_id(settings.get("bos_token"), self._tokenizer)
        self.bos = bos if settings.get("add_bos_token") is True else None

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self._tokenizer.encode(text, add_special_tokens=self.special_tokens).ids
        if self.special_tokens and ids and ids[-1] == self.separator:  # the post-processor ends it already
            ids = ids[:-1]
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids = [self.bos, *ids]
        return np.asarray(ids, dtype=np.int64)


TOKENIZER_FILE = "tokenizer.json"


def _tokenizer_config(directory: Path) -> dict:
    """A model directory's ``tokenizer_config.json`` ({} where it has none); ``DataError`` if unreadable."""
    file = directory / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        settings = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{file}: not JSON ({error})") from None
    return settings if isinstance(settings, dict) else {}


def _token_id(token, tokenizer) -> Optional[int]:
    """The id of a special token as ``tokenizer_config.json`` writes it (a string, or {"content": ...})."""
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def _directory_eos(directory: Path, settings: dict, tokenizer) -> Optional[int]:
    """The EOS token id of a Hugging Face model directory: ``tokenizer_config.json``'s ``eos_token``,
    else ``config.json``'s ``eos_token_id`` (the first, where it lists several); None where neither says."""
    eos = _token_id(settings.get("eos_token"), tokenizer)
    if eos is not None:
        return eos
    config = directory / "config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token_id")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return None
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int):
            return eos
    return None


def is_tokenizer(spec: str) -> bool:
    """``data.tokenizer`` names something loadable: ``byte``/``auto``, a tokenizer.json, or a directory with one."""
    path = Path(spec)
    return spec in ("byte", "auto") or path.is_file() or (path / TOKENIZER_FILE).is_file()


def make_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``byte`` (and ``auto``, which the launch check resolves to ``model.init_from``'s tokenizer where it
    has one), a ``tokenizer.json``, or a Hugging Face model directory."""
    return ByteTokenizer() if spec in ("byte", "auto") else HFTokenizer(spec)


# ----------------------------------------------------------------------------------------------
# Documents and token streams


def stdlib_files() -> List[Path]:
    """The bundled corpus: the standard library's ``.py`` files, less tests and bundled packages."""
    skipped = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    found = []
    # A walk that never enters the skipped directories: site-packages, under the standard library's
    # directory, can hold hundreds of thousands of files (a glob over it took a second per process).
    for directory, subdirectories, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subdirectories[:] = [name for name in subdirectories if name not in skipped]
        found += [Path(directory, name) for name in names if name.endswith(".py")]
    return sorted(found)


def _not_text(path: Path, data: bytes) -> Optional[str]:
    """Why ``data`` (a text file's bytes, or its head) is not UTF-8 text, or None."""
    nul = data.find(b"\0")
    if nul >= 0:
        return f"{path}: a NUL byte at offset {nul}: a binary file, not text (token files are read with data=tokens)"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(data) - 3 or error.reason != "unexpected end of data":  # not a sample's cut character
            return (
                f"{path}: byte 0x{data[error.start]:02x} at offset {error.start} is not UTF-8: a binary file, or text"
                " in another encoding (convert it: iconv -t utf-8)"
            )
    return None


def iter_documents(paths: Sequence[str | Path], text_key: str = "text") -> Iterator[str | bytes]:
    """Documents of text files: a ``.jsonl`` file gives one per record, any other file one in all.

    Raises ``DataError`` naming the file (and line) for what is not UTF-8 text or not a JSON record
    with a string ``text_key``."""
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            with path.open("rb") as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    yield _record_text(path, number, line, text_key)
        else:
            data = path.read_bytes()
            problem = _not_text(path, data)
            if problem:
                raise DataError(problem)
            yield data


def _record(path: Path, line: bytes, number: Optional[int] = None) -> Any:
    """A JSONL line's value; ``DataError`` naming the file (and line) where it is not JSON."""
    where = f"{path}:{number}" if number is not None else str(path)
    try:
        return json.loads(line)
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not a JSON record ({error.msg}, column {error.colno})") from None


def _record_text(path: Path, number: int, line: bytes, text_key: str) -> str:
    record = _record(path, line, number)
    if not isinstance(record, dict):
        raise DataError(f"{path}:{number}: a JSONL line must be an object with a {text_key!r} field")
    if text_key not in record:
        raise DataError(f"{path}:{number}: no field {text_key!r} (set data.text_key)")
    if not isinstance(record[text_key], str):
        raise DataError(f"{path}:{number}: field {text_key!r} holds {type(record[text_key]).__name__}, not text")
    return record[text_key]


def tokenize_documents(documents: Iterable[str | bytes], tokenizer) -> np.ndarray:
    """One stream of tokens: each document's tokens, then the separator (where the tokenizer has one)."""
    dtype = np.uint8 if tokenizer.vocab_size <= 256 else np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    pieces: List[np.ndarray] = []
    separator = np.asarray([tokenizer.separator], dtype=dtype) if tokenizer.separator is not None else None
    for document in documents:
        pieces.append(tokenizer.encode(document).astype(dtype, copy=False))
        if separator is not None:
            pieces.append(separator)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


@dataclass(frozen=True)
class TokenFileMeta:
    """The sidecar of a token file: how to read it and what produced it."""

    dtype: str
    num_tokens: int
    vocab_size: int
    tokenizer: str
    separator: Optional[int]

    @staticmethod
    def path_for(token_path: str | Path) -> Path:
        return Path(token_path).with_suffix(META_SUFFIX)

    def write(self, token_path: str | Path) -> None:
        self.path_for(token_path).write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def read(cls, token_path: str | Path) -> "TokenFileMeta":
        meta = cls.path_for(token_path)
        if not meta.is_file():
            raise DataError(f"{token_path}: no sidecar {meta.name} (write token files with scripts/tokenize_data.py)")
        fix = "rewrite the file with scripts/tokenize_data.py"
        try:
            fields = json.loads(meta.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{meta}: not a token-file sidecar ({error}); {fix}") from None
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(fields, dict) or sorted(fields) != sorted(names):
            got = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
            raise DataError(f"{meta}: a token-file sidecar holds {', '.join(names)}; this one has {got}; {fix}")
        result = cls(**fields)
        try:
            dtype = np.dtype(result.dtype)
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind != "u":
            raise DataError(f"{meta}: dtype {result.dtype!r} is not an unsigned integer type; {fix}")
        for key in ("num_tokens", "vocab_size"):
            value = fields[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DataError(f"{meta}: {key}={value!r} must be a positive integer; {fix}")
        return result


def open_token_file(path: str | Path) -> np.ndarray:
    meta = TokenFileMeta.read(path)
    expected = meta.num_tokens * np.dtype(meta.dtype).itemsize
    size = Path(path).stat().st_size
    if size != expected:
        raise DataError(
            f"{path}: {size} bytes, but its sidecar says {meta.num_tokens} {meta.dtype} tokens ({expected} bytes):"
            " cut short, or not the file its sidecar describes; rewrite it with scripts/tokenize_data.py"
        )
    return np.memmap(path, dtype=np.dtype(meta.dtype), mode="r", shape=(meta.num_tokens,))


def check_token_ids(path: str | Path, tokens: np.ndarray, vocab_size: int, start: int = 0) -> None:
    """Raise ``DataError`` for the first token id of ``tokens`` (at ``start`` in the file) >= ``vocab_size``."""
    chunk = 1 << 24
    for offset in range(0, len(tokens), chunk):
        part = np.asarray(tokens[offset : offset + chunk])
        if len(part) and int(part.max()) >= vocab_size:
            at = offset + int(np.argmax(part >= vocab_size))
            raise DataError(
                f"{path}: token id {int(part[at - offset])} at position {start + at} is not below the vocabulary"
                f" of its sidecar ({vocab_size}): the file and its sidecar disagree; rewrite it with"
                " scripts/tokenize_data.py"
            )


def check_head(path: Path, text_key: str) -> None:
    """The first ``TEXT_SAMPLE`` bytes of a large text file: text, and (JSONL) whole records."""
    with path.open("rb") as file:
        head = file.read(TEXT_SAMPLE)
    if path.suffix != ".jsonl":
        problem = _not_text(path, head)
        if problem:
            raise DataError(problem)
        return
    for number, line in enumerate(head.splitlines(keepends=True)[:-1], 1):  # the last may be cut
        if line.strip():
            _record_text(path, number, line, text_key)


def windows(num_tokens: int, seq_len: int) -> int:
    """Training windows (``seq_len + 1`` tokens, stride ``seq_len``) in a stream of ``num_tokens``."""
    return max(0, (num_tokens - 1) // seq_len)


def held_out(count: int, val_fraction: float) -> int:
    """Of ``count`` tokens (a token stream's tail) or documents (a streamed source's head), those held out
    for validation."""
    return int(count * val_fraction)
