"""Documents of the streamed source kinds, read in corpus order from any document on (no torch).

A streamed source is never read whole: its loader reads documents as it packs rows, and a resumed run
reopens it at a saved ``Cursor``: which file, and where in it (a ``.jsonl`` file's byte offset, a
Parquet file's or a saved dataset's row), so resuming costs one seek, not a re-read of the corpus.

* ``files``: ``.txt`` files (a document each) and ``.jsonl`` files (a document per record).
* ``parquet``: Parquet files, or directories of them; the ``text_key`` column, a document per row.
* ``datasets``: a directory written by Hugging Face ``datasets``' ``save_to_disk``; the ``text_key``
  column (Arrow files, memory-mapped by the library).

With ``records=True`` (a chat source) a reader yields each record whole, as ``(where, record)``: a
JSONL line's object, a Parquet or dataset row's columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence

from curry_train.data.sources import DataError, _not_text, _record, _record_text, check_head

PARQUET_BATCH = 1024  # rows read from a Parquet file at a time


@dataclass(frozen=True)
class Cursor:
    """Where a document starts: its number in the corpus, its file, and its place in that file."""

    ordinal: int = 0
    file: int = 0
    place: int = 0  # .jsonl: byte offset; Parquet: row in the file; datasets: row; .txt: 0

    def as_list(self) -> List[int]:
        return [self.ordinal, self.file, self.place]


class TextFiles:
    """``.txt`` files, a document each, and ``.jsonl`` files, a document per non-blank record."""

    kind = "files"

    def __init__(self, paths: Sequence[str | Path], text_key: str, records: bool = False) -> None:
        self.paths, self.text_key, self.records = [Path(p) for p in paths], text_key, records

    def check(self) -> None:
        for path in self.paths:
            if not path.is_file():
                raise DataError(f"{path}: does not exist (or is not a file)")
            if path.stat().st_size == 0:
                raise DataError(f"{path}: an empty file")
            if self.records and path.suffix != ".jsonl":
                raise DataError(f"{path}: a chat source reads .jsonl records, not text files")
            if not self.records:
                check_head(path, self.text_key)

    def count(self) -> int:
        total = 0
        for path in self.paths:
            if path.suffix != ".jsonl":
                total += 1
                continue
            with path.open("rb") as lines:
                total += sum(1 for line in lines if line.strip())
        return total

    def documents(self, start: Cursor = Cursor()) -> Iterator[tuple[Cursor, str | bytes]]:
        ordinal = start.ordinal
        for index in range(start.file, len(self.paths)):
            path = self.paths[index]
            if path.suffix != ".jsonl":
                data = path.read_bytes()
                problem = _not_text(path, data)
                if problem:
                    raise DataError(problem)
                yield Cursor(ordinal, index, 0), data
                ordinal += 1
                continue
            with path.open("rb") as lines:
                offset = start.place if index == start.file else 0
                lines.seek(offset)
                number = 0
                for line in lines:
                    number += 1
                    if line.strip():
                        if self.records:
                            yield Cursor(ordinal, index, offset), (f"{path} (byte {offset})", _record(path, line))
                        else:
                            yield Cursor(ordinal, index, offset), _record_text(path, number, line, self.text_key)
                        ordinal += 1
                    offset += len(line)


class ParquetFiles:
    """Parquet files (a directory stands for its ``*.parquet`` files, sorted); a document per row."""

    kind = "parquet"

    def __init__(self, paths: Sequence[str | Path], text_key: str, records: bool = False) -> None:
        files: List[Path] = []
        for path in map(Path, paths):
            files.extend(sorted(path.rglob("*.parquet")) if path.is_dir() else [path])
        self.paths, self.text_key, self.given = files, text_key, [Path(p) for p in paths]
        self.records = records

    def _open(self, path: Path):
        import pyarrow.parquet as pq  # noqa: PLC0415  (the data extra; imported where a Parquet source is read)

        return pq.ParquetFile(path)

    def check(self) -> None:
        for path in self.given:
            if not path.exists():
                raise DataError(f"{path}: does not exist")
            if path.is_dir() and not any(path.rglob("*.parquet")):
                raise DataError(f"{path}: a directory without .parquet files, not a Parquet dataset")
        try:
            import pyarrow  # noqa: F401, PLC0415
        except ImportError:
            raise DataError("a parquet source needs pyarrow: pip install 'curry-train[data]'") from None
        for path in self.paths:
            try:
                schema = self._open(path).schema_arrow
            except Exception as error:  # pyarrow's ArrowInvalid and OSError both mean: not Parquet
                raise DataError(f"{path}: not a Parquet file ({str(error).splitlines()[0]})") from None
            if self.records:
                continue
            if self.text_key not in schema.names:
                raise DataError(
                    f"{path}: no column {self.text_key!r} (it has {', '.join(schema.names)}); set the source's text_key"
                )
            if str(schema.field(self.text_key).type) not in ("string", "large_string"):
                raise DataError(f"{path}: column {self.text_key!r} holds {schema.field(self.text_key).type}, not text")
        if self.count() == 0:
            raise DataError(f"{', '.join(map(str, self.given))}: no rows")

    def count(self) -> int:
        return sum(self._open(path).metadata.num_rows for path in self.paths)

    def documents(self, start: Cursor = Cursor()) -> Iterator[tuple[Cursor, str | bytes]]:
        ordinal = start.ordinal
        for index in range(start.file, len(self.paths)):
            file = self._open(self.paths[index])
            row = start.place if index == start.file else 0
            # Skip whole row groups before the cursor's row: a resume seeks, it does not re-read.
            groups, first = [], 0
            for group in range(file.metadata.num_row_groups):
                size = file.metadata.row_group(group).num_rows
                if groups or first + size > row:
                    groups.append(group)
                else:
                    first += size
            if not groups:
                continue
            at = first
            columns = None if self.records else [self.text_key]
            for batch in file.iter_batches(PARQUET_BATCH, row_groups=groups, columns=columns):
                for value in batch.to_pylist() if self.records else batch.column(0).to_pylist():
                    if at >= row:
                        if self.records:
                            value = (f"{self.paths[index]} (row {at})", value)
                        elif value is None:
                            raise DataError(f"{self.paths[index]}: row {at}: {self.text_key!r} is null")
                        yield Cursor(ordinal, index, at), value
                        ordinal += 1
                    at += 1


class SavedDataset:
    """A directory written by ``datasets.Dataset.save_to_disk``; a document per row."""

    kind = "datasets"

    def __init__(self, paths: Sequence[str | Path], text_key: str, records: bool = False) -> None:
        if len(paths) != 1:
            raise DataError(f"a datasets source reads one save_to_disk directory; got {len(paths)} paths")
        self.path, self.text_key, self._dataset, self.records = Path(paths[0]), text_key, None, records

    def _data(self):
        if self._dataset is None:
            from datasets import load_from_disk  # noqa: PLC0415  (the data extra)

            self._dataset = load_from_disk(str(self.path))
        return self._dataset

    def check(self) -> None:
        if not self.path.is_dir() or not (self.path / "dataset_info.json").is_file():
            raise DataError(f"{self.path}: not a directory written by datasets' save_to_disk (no dataset_info.json)")
        if (self.path / "dataset_dict.json").is_file():
            raise DataError(f"{self.path}: a DatasetDict; name one of its splits' directories")
        try:
            import datasets  # noqa: F401, PLC0415
        except ImportError:
            raise DataError("a datasets source needs the datasets library: pip install 'curry-train[data]'") from None
        try:
            data = self._data()
        except Exception as error:  # the library raises several kinds for a damaged directory
            raise DataError(f"{self.path}: not a readable saved dataset ({str(error).splitlines()[0]})") from None
        if not self.records and self.text_key not in data.column_names:
            raise DataError(
                f"{self.path}: no column {self.text_key!r} (it has {', '.join(data.column_names)}); set the source's"
                " text_key"
            )
        if len(data) == 0:
            raise DataError(f"{self.path}: no rows")

    def count(self) -> int:
        return len(self._data())

    def documents(self, start: Cursor = Cursor()) -> Iterator[tuple[Cursor, str | bytes]]:
        data = self._data() if self.records else self._data().select_columns([self.text_key])
        ordinal = start.ordinal
        for first in range(start.place, len(data), PARQUET_BATCH):
            part = data[first : first + PARQUET_BATCH]
            if self.records:  # columns -> one mapping per row
                for offset, values in enumerate(zip(*part.values(), strict=True)):
                    yield (
                        Cursor(ordinal, 0, first + offset),
                        (f"{self.path} (row {first + offset})", dict(zip(part, values, strict=True))),
                    )
                    ordinal += 1
                continue
            for offset, text in enumerate(part[self.text_key]):
                if text is None:
                    raise DataError(f"{self.path}: row {first + offset}: {self.text_key!r} is null")
                yield Cursor(ordinal, 0, first + offset), text
                ordinal += 1


READERS = {"files": TextFiles, "parquet": ParquetFiles, "datasets": SavedDataset}
