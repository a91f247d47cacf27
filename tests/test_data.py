"""Data pipeline: sampler order across layouts and resumes, packing, sources, and the tokenizer script."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import List

import numpy as np
import pytest
import torch

from curry_train.cli import tokenize_data as tokenize_cli
from curry_train.config.schema import DataConfig
from curry_train.data.mixture import Mixture, TokenWindows, split_streams
from curry_train.data.sources import (
    ByteTokenizer,
    DataError,
    HFTokenizer,
    TokenFileMeta,
    iter_documents,
    open_token_file,
    stdlib_files,
    tokenize_documents,
)
from curry_train.module import LMDataModule

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "tokenize_data.py"


# ----------------------------------------------------------------------------------------------
# Packing and splitting


def test_packed_windows_over_several_streams() -> None:
    seq_len = 4
    first = np.arange(0, 25, dtype=np.uint16)  # 6 windows: the 25th token is only a target
    second = np.arange(1000, 1013, dtype=np.uint16)  # 3 windows; values above uint8 survive
    tiny = np.arange(5000, 5004, dtype=np.uint16)  # shorter than seq_len + 1: no window
    data = TokenWindows([first, tiny, second], seq_len)
    assert len(data) == 9
    windows = [data[i] for i in range(len(data))]
    assert all(w.dtype == np.int64 and w.shape == (seq_len + 1,) for w in windows)
    for i in range(6):
        assert windows[i].tolist() == list(range(4 * i, 4 * i + 5))
    for i in range(3):
        assert windows[6 + i].tolist() == list(range(1000 + 4 * i, 1000 + 4 * i + 5))


def test_packed_targets_continue_into_the_next_window() -> None:
    stream = np.random.default_rng(0).integers(0, 256, size=101, dtype=np.uint8)
    data = TokenWindows([stream], seq_len=10)
    assert len(data) == 10
    for i in range(len(data) - 1):
        # The last target of window i is the first input of window i+1: no token is skipped or doubled.
        assert data[i][-1] == data[i + 1][0]
    inputs = np.concatenate([data[i][:-1] for i in range(len(data))])
    assert inputs.tolist() == stream[:100].tolist()
    assert data[len(data) - 1][-1] == stream[100]


def test_packed_length_at_the_edges() -> None:
    assert len(TokenWindows([np.zeros(5, np.uint8)], 4)) == 1
    assert len(TokenWindows([np.zeros(4, np.uint8)], 4)) == 0
    assert len(TokenWindows([np.zeros(0, np.uint8)], 4)) == 0


def test_split_streams_holds_out_the_tail_fraction() -> None:
    streams = [np.arange(100), np.arange(50) + 100]
    train, val = split_streams(streams, 0.1)
    assert [len(t) for t in train] == [90, 45] and [len(v) for v in val] == [10, 5]
    for stream, t, v in zip(streams, train, val, strict=False):
        assert np.array_equal(np.concatenate([t, v]), stream)
    train, val = split_streams(streams, 0.0)
    assert [len(v) for v in val] == [0, 0]


# ----------------------------------------------------------------------------------------------
# Documents and tokenizers


def test_iter_documents_reads_text_and_jsonl(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("first document\nwith two lines\n", encoding="utf-8")
    records = tmp_path / "b.jsonl"
    records.write_text('{"body": "héllo", "id": 1}\n\n   \n{"body": "second"}\n', encoding="utf-8")
    docs = list(iter_documents([text, records], text_key="body"))
    assert docs == [b"first document\nwith two lines\n", "héllo", "second"]


def test_iter_documents_names_a_missing_key(tmp_path: Path) -> None:
    records = tmp_path / "r.jsonl"
    records.write_text('{"body": "ok"}\n{"text": "no body"}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:2: no field 'body'"):
        list(iter_documents([records], text_key="body"))


def test_byte_tokenizer_round_trip() -> None:
    tokenizer = ByteTokenizer()
    text = "naïve café ∑ 🙂\n"
    tokens = tokenizer.encode(text)
    assert tokens.dtype == np.uint8
    assert tokens.tobytes().decode("utf-8") == text
    assert np.array_equal(tokenizer.encode(text.encode("utf-8")), tokens)
    assert tokenizer.separator == 0 and tokenizer.vocab_size == 256


def test_tokenize_documents_separates_documents() -> None:
    stream = tokenize_documents(["ab", b"c", ""], ByteTokenizer())
    assert stream.dtype == np.uint8
    assert stream.tolist() == [97, 98, 0, 99, 0, 0]
    assert len(tokenize_documents([], ByteTokenizer())) == 0


class StubTokenizer:
    """A tokenizer of a given vocabulary that emits its largest id and has no separator."""

    separator = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray([self.vocab_size - 1], dtype=np.int64)


@pytest.mark.parametrize(
    "vocab_size,dtype", [(256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)]
)
def test_stream_dtype_is_the_smallest_that_holds_the_vocabulary(vocab_size: int, dtype: type) -> None:
    stream = tokenize_documents(["x", "y"], StubTokenizer(vocab_size))
    assert stream.dtype == dtype
    assert stream.tolist() == [vocab_size - 1] * 2  # no separator, largest id intact


def test_stdlib_corpus_is_sorted_python_without_tests() -> None:
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100
    assert files == sorted(files)
    assert all(p.suffix == ".py" for p in files)
    assert any(p == root / "os.py" for p in files)
    for path in files:
        assert not {"test", "tests", "site-packages", "__pycache__"}.intersection(path.relative_to(root).parts[:-1])


# ----------------------------------------------------------------------------------------------
# scripts/tokenize_data.py


@pytest.fixture(scope="module")
def script() -> ModuleType:
    """The command's module, so most cases run ``main`` in-process instead of paying a new interpreter."""
    return tokenize_cli


@pytest.fixture
def corpus(tmp_path: Path) -> List[Path]:
    text = tmp_path / "notes.txt"
    text.write_text("Ünïcode text\nover lines\n", encoding="utf-8")
    records = tmp_path / "records.jsonl"
    lines = [json.dumps({"text": t, "n": i}) for i, t in enumerate(["one", "twó", "", "a longer record"])]
    records.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return [text, records]


@pytest.mark.slow
def test_script_subprocess_writes_the_tokens_of_tokenize_documents(tmp_path: Path, corpus: List[Path]) -> None:
    out = tmp_path / "nested" / "corpus.bin"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, corpus), "--output", str(out), "--quiet"],
        cwd=tmp_path,  # runnable from anywhere: the package is installed
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # --quiet: no summary line
    expected = tokenize_documents(iter_documents(corpus, "text"), ByteTokenizer())
    tokens = open_token_file(out)
    assert tokens.dtype == np.uint8
    assert np.array_equal(tokens, expected)
    assert TokenFileMeta.read(out) == TokenFileMeta("uint8", len(expected), 256, "byte", 0)
    assert not out.with_name("corpus.bin.partial").exists()


def test_missing_input_is_a_one_line_error(script: ModuleType, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "absent.txt"
    out = tmp_path / "out.bin"
    assert script.main([str(missing), "--output", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "no such file" in lines[0]
    assert not out.exists() and not TokenFileMeta.path_for(out).exists()


def test_script_directory_input_is_recursive_sorted_and_filtered(script: ModuleType, tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    taken = {
        "z.txt": "last by name",
        "b/deep/code.py": "print('hi')\n",
        "a/readme.md": "# Title\n",
        "b/rows.jsonl": '{"text": "row one"}\n{"text": "row two"}\n',
    }
    for name, content in taken.items():
        (root / name).write_text(content, encoding="utf-8")
    (root / "a" / "skip.csv").write_text("x,y\n")
    (root / "a" / "skip.bin").write_bytes(b"\xff\xfe")
    single = tmp_path / "single.txt"
    single.write_text("given as a file\n")

    out = tmp_path / "out.bin"
    assert script.main([str(root), str(single), "--output", str(out), "--quiet"]) == 0
    order = [root / "a/readme.md", root / "b/deep/code.py", root / "b/rows.jsonl", root / "z.txt", single]
    expected = tokenize_documents(iter_documents(order, "text"), ByteTokenizer())
    assert np.array_equal(open_token_file(out), expected)
    assert b"\xff\xfe" not in open_token_file(out).tobytes() and b"x,y" not in open_token_file(out).tobytes()


def test_script_reads_another_text_key(script: ModuleType, tmp_path: Path) -> None:
    records = tmp_path / "r.jsonl"
    records.write_text('{"body": "alpha"}\n{"body": "beta"}\n')
    out = tmp_path / "r.bin"
    assert script.main([str(records), "--output", str(out), "--text-key", "body", "--quiet"]) == 0
    assert open_token_file(out).tobytes() == b"alpha\0beta\0"


def test_script_shows_progress_unless_quiet(script: ModuleType, tmp_path: Path, corpus: List[Path], capsys) -> None:
    assert script.main([*map(str, corpus), "--output", str(tmp_path / "loud.bin")]) == 0
    captured = capsys.readouterr()
    total = sum(p.stat().st_size for p in corpus)
    assert "100%" in captured.err and f"{total}" in captured.err  # the bar counts input bytes to the end
    assert "tokens from 2 files" in captured.out
    assert script.main([*map(str, corpus), "--output", str(tmp_path / "quiet.bin"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def one_line_error(script: ModuleType, argv: List[str], capsys) -> str:
    assert script.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[-1]


def test_script_usage_errors(script: ModuleType, tmp_path: Path, corpus: List[Path], capsys) -> None:
    text = str(corpus[0])
    assert ".bin" in one_line_error(script, [text, "--output", str(tmp_path / "out.npy")], capsys)
    empty = tmp_path / "empty_dir"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "data.csv").write_text("ignored")
    assert "no input files" in one_line_error(script, [str(empty), "--output", str(tmp_path / "o.bin")], capsys)
    absent = tmp_path / "none" / "tokenizer.json"
    message = one_line_error(script, [text, "--output", str(tmp_path / "o.bin"), "--tokenizer", str(absent)], capsys)
    assert str(absent) in message and "no such file" in message
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    message = one_line_error(script, [str(blank), "--output", str(tmp_path / "o.bin"), "--quiet"], capsys)
    assert "no documents" in message
    keyless = tmp_path / "keyless.jsonl"
    keyless.write_text('{"body": "x"}\n')
    assert "'text'" in one_line_error(script, [str(keyless), "--output", str(tmp_path / "o.bin"), "--quiet"], capsys)
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "o.bin.partial").exists()


def test_script_failure_keeps_the_previous_token_file(
    script: ModuleType, tmp_path: Path, corpus: List[Path], capsys
) -> None:
    out = tmp_path / "kept.bin"
    assert script.main([*map(str, corpus), "--output", str(out), "--quiet"]) == 0
    before = open_token_file(out).copy()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    message = one_line_error(script, [str(bad), "--output", str(out), "--quiet"], capsys)
    assert str(bad) in message
    assert np.array_equal(open_token_file(out), before)


def test_script_without_tokenizers_package(
    script: ModuleType, tmp_path: Path, corpus: List[Path], monkeypatch, capsys
) -> None:
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer_file.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    argv = [str(corpus[0]), "--output", str(tmp_path / "o.bin"), "--tokenizer", str(tokenizer_file)]
    assert "pip install tokenizers" in one_line_error(script, argv, capsys)


def test_token_source_loads_the_written_file(script: ModuleType, tmp_path: Path, corpus: List[Path]) -> None:
    out = tmp_path / "corpus.bin"
    assert script.main([*map(str, corpus), "--output", str(out), "--quiet"]) == 0
    expected = tokenize_documents(iter_documents(corpus, "text"), ByteTokenizer())
    cfg = DataConfig(source="tokens", paths=[str(out)], seq_len=16, val_fraction=0.0)
    (rows,) = Mixture(cfg, seed=0).rows
    assert rows.vocab_size == 256 and np.array_equal(rows.train.streams[0], expected)
    # The files source packs the same inputs into the same rows, read as it trains.
    files = DataConfig(source="files", paths=[str(p) for p in corpus], seq_len=16, val_fraction=0.0)
    (streamed,) = Mixture(files, seed=0).rows
    packed = [row for _, row in streamed.pack(streamed.train_start)]
    assert len(packed) == len(rows.train) and all(np.array_equal(p, rows.train[k]) for k, p in enumerate(packed))


def test_data_module_batches_from_a_token_file(script: ModuleType, tmp_path: Path) -> None:
    text = tmp_path / "big.txt"
    text.write_bytes(("".join(map(chr, range(1, 128))) + "é∑🙂").encode() * 8)  # 1088 bytes of UTF-8, no NUL
    out = tmp_path / "big.bin"
    assert script.main([str(text), "--output", str(out), "--quiet"]) == 0
    cfg = DataConfig(source="tokens", paths=[str(out)], seq_len=16, global_batch_size=4, val_fraction=0.25)
    module = LMDataModule(cfg, seed=0)
    module.setup("fit")
    assert module.vocab_size == 256
    stream = open_token_file(out)
    cut = len(stream) - int(len(stream) * 0.25)
    (rows,) = module.mixture.rows
    assert len(rows.train) == (cut - 1) // 16
    windows = {tuple(stream[k * 16 : k * 16 + 17].tolist()) for k in range(len(rows.train))}
    batch, state = next(iter(module.train_dataloader()))
    assert state["sources"]["tokens"]["taken"] == 4
    assert batch.shape == (4, 17) and batch.dtype == torch.int64
    assert all(tuple(row.tolist()) in windows for row in batch)  # stride-aligned windows of the training part
    (loader,) = module.val_dataloader()
    val = list(loader)
    assert [b.shape for b in val] == [(4, 17)] * ((len(stream) - cut - 1) // 16 // 4)
    assert val[0][0].tolist() == stream[cut : cut + 17].tolist()


def test_hf_tokenizer_and_script_with_a_tokenizer_file(script: ModuleType, tmp_path: Path, corpus: List[Path]) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    texts = ["the quick brown fox", "jumps over the lazy dog", "twó one a longer record", "Ünïcode text over lines"]
    trained = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"], show_progress=False)
    trained.train_from_iterator(texts, trainer)
    trained.add_tokens([f"<extra_{i}>" for i in range(300)])  # past 256 ids: the file needs uint16
    path = tmp_path / "tokenizer.json"
    trained.save(str(path))

    tokenizer = HFTokenizer(str(path))
    assert tokenizer.separator == trained.token_to_id("</s>") == 1
    assert tokenizer.vocab_size == trained.get_vocab_size(with_added_tokens=True) > 256
    ids = tokenizer.encode("the lazy fox <extra_299>")
    assert ids.dtype == np.int64 and int(ids.max()) < tokenizer.vocab_size
    assert ids[-1] == trained.token_to_id("<extra_299>") > 256
    assert tokenizer.separator not in ids.tolist()  # no special tokens added around a document
    assert np.array_equal(tokenizer.encode("the lazy fox".encode("utf-8")), tokenizer.encode("the lazy fox"))

    out = tmp_path / "bpe.bin"
    assert script.main([*map(str, corpus), "--output", str(out), "--tokenizer", str(path), "--quiet"]) == 0
    expected = tokenize_documents(iter_documents(corpus, "text"), tokenizer)
    tokens = open_token_file(out)
    assert tokens.dtype == np.uint16 and np.array_equal(tokens, expected)
    assert TokenFileMeta.read(out) == TokenFileMeta("uint16", len(expected), tokenizer.vocab_size, str(path), 1)
    assert int((tokens == 1).sum()) == 5  # one separator after each of the five documents
