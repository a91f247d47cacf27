"""Mixtures of sources: shares, an order no layout changes, streamed sources, and a loader state that
resumes on any number of ranks. In-process, numpy only (the loader workers in one test)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from curry_train.data.config import DataConfig
from curry_train.data.documents import ParquetFiles, SavedDataset, TextFiles
from curry_train.data.loader import TrainBatches, ValBatches
from curry_train.data.mixture import DataError, Mixture, StreamedRows, blend, mixture_of, survey
from curry_train.data.sources import ByteTokenizer, TokenFileMeta, tokenize_documents

SEQ = 8


def token_file(path: Path, tokens: np.ndarray, vocab: int = 256) -> str:
    tokens.astype(np.uint16).tofile(path)
    TokenFileMeta("uint16", len(tokens), vocab, "byte", 0).write(path)
    return str(path)


def words(n: int, seed: int) -> List[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{int(x)}" for x in rng.integers(0, 500, size=int(rng.integers(2, 30)))) for _ in range(n)]


def jsonl(path: Path, texts: List[str], key: str = "text") -> str:
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Dict[str, Any]:
    """Three sources of distinct token ranges: a token file (ids 128-255), a JSONL file and a Parquet file."""
    root = tmp_path_factory.mktemp("mixture")
    rng = np.random.default_rng(0)
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    parquet = root / "code.parquet"
    pq.write_table(pa.table({"content": words(300, 2), "n": list(range(300))}), parquet, row_group_size=37)
    return {
        "root": root,
        "web": token_file(root / "web.bin", rng.integers(128, 256, size=6000)),
        "math": jsonl(root / "math.jsonl", words(200, 1)),
        "code": str(parquet),
    }


def mixture_cfg(corpus: Dict[str, Any], **overrides: Any) -> DataConfig:
    sources = {
        "web": {"kind": "tokens", "paths": [corpus["web"]], "weight": 0.5},
        "math": {"kind": "files", "paths": [corpus["math"]], "weight": 0.3},
        "code": {"kind": "parquet", "paths": [corpus["code"]], "weight": 0.2, "text_key": "content"},
    }
    settings = dict(sources=sources, tokenizer="byte", seq_len=SEQ, global_batch_size=8, val_fraction=0.05)
    settings.update(overrides)
    settings["shuffle_window"] = settings.get("shuffle_window", 16)
    return DataConfig(**settings)


def global_batches(mixture: Mixture, state: Dict[str, Any], steps: int, size: int = 1) -> List[np.ndarray]:
    """``steps`` global batches from ``state``, as the ``size`` ranks' slices put together in rank order."""
    ranks = [itertools.islice(mixture.batches(state, r, size), steps) for r in range(size)]
    return [np.concatenate([rows for rows, _ in slices]) for slices in zip(*ranks, strict=True)]


def states(mixture: Mixture, steps: int) -> List[Dict[str, Any]]:
    return [s for _, s in itertools.islice(mixture.batches(mixture.start_state(), 0, 1), steps)]


# ----------------------------------------------------------------------------------------------
# Shares and order


def test_blend_serves_each_share_to_within_one_row() -> None:
    weights = [0.5, 0.3, 0.2]
    picks = blend(weights, [0, 0, 0], 5000)
    for count in (10, 97, 1000, 5000):
        served = np.bincount(picks[:count], minlength=3)
        assert np.all(np.abs(served - np.array(weights) * count) <= 1), (count, served)
    # Continuing from counts gives what one long call gives: the blend's state is the rows served.
    first = blend(weights, [0, 0, 0], 333)
    assert first + blend(weights, list(np.bincount(first, minlength=3)), 200) == picks[:533]
    assert blend([2.0, 0.0, 1.0], [0, 0, 0], 30).count(1) == 0


def test_shares_over_2000_global_batches_are_the_weights_in_every_layout(corpus) -> None:
    mixture = Mixture(mixture_cfg(corpus), seed=3)
    final = states(mixture, 2000)[-1]
    rows = {name: s["taken"] for name, s in final["sources"].items()}
    total = sum(rows.values())
    assert total == 2000 * 8
    for name, weight in (("web", 0.5), ("math", 0.3), ("code", 0.2)):
        assert abs(rows[name] / total - weight) < 0.01 * weight, rows
    assert final["sources"]["math"]["epoch"] > 0 and final["sources"]["code"]["epoch"] > 0  # they repeated
    single = global_batches(mixture, mixture.start_state(), 40)
    for size in (2, 4, 8):
        split = global_batches(mixture, mixture.start_state(), 40, size)
        assert all(np.array_equal(a, b) for a, b in zip(single, split, strict=True))


def test_order_depends_on_the_seed_and_the_mixture_only(corpus) -> None:
    base = global_batches(Mixture(mixture_cfg(corpus), seed=3), {"version": 1, "sources": {}}, 6)
    again = global_batches(Mixture(mixture_cfg(corpus), seed=3), {"version": 1, "sources": {}}, 6)
    other = global_batches(Mixture(mixture_cfg(corpus), seed=4), {"version": 1, "sources": {}}, 6)
    assert all(np.array_equal(a, b) for a, b in zip(base, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(base, other, strict=True))
    # Micro-batch size and workers are how, not what: the config keys that would change it are not read.
    micro_cfg = mixture_cfg(corpus, micro_batch_size=1, num_workers=3)
    micro = global_batches(Mixture(micro_cfg, seed=3), {"version": 1, "sources": {}}, 6)
    assert all(np.array_equal(a, b) for a, b in zip(base, micro, strict=True))


def test_rows_come_whole_from_one_source(corpus) -> None:
    mixture = Mixture(mixture_cfg(corpus), seed=3)
    for batch in global_batches(mixture, mixture.start_state(), 20):
        for row in batch:
            assert row.shape == (SEQ + 1,) and row.dtype == np.int64
            assert row.min() >= 128 or row.max() < 128  # token-file ids are 128-255, text bytes are ASCII


# ----------------------------------------------------------------------------------------------
# Streamed sources


def test_streamed_rows_pack_the_documents_as_one_stream(corpus) -> None:
    cfg = DataConfig(sources=[{"kind": "files", "paths": [corpus["math"]]}], tokenizer="byte", seq_len=SEQ)
    cfg.val_fraction = 0.0
    rows = StreamedRows(mixture_of(cfg)[0], 0, cfg, seed=0)
    stream = tokenize_documents(
        (json.loads(line)["text"] for line in Path(corpus["math"]).read_text().splitlines()), ByteTokenizer()
    )
    packed = list(rows.pack(rows.train_start))
    assert len(packed) == (len(stream) - 1) // SEQ
    for k, (position, row) in enumerate(packed):
        assert row.tolist() == stream[k * SEQ : k * SEQ + SEQ + 1].tolist()
        # Packing again from any row's position gives the rest: a resume seeks, it does not re-read.
        if k % 97 == 0:
            assert [r.tolist() for _, r in itertools.islice(rows.pack(position), 3)] == [
                r.tolist() for _, r in packed[k : k + 3]
            ]


@pytest.mark.parametrize("kind", ["files", "parquet", "datasets"])
def test_readers_resume_at_a_cursor(corpus, kind, tmp_path) -> None:
    texts = words(120, 7)
    if kind == "files":
        reader = TextFiles([jsonl(tmp_path / "a.jsonl", texts[:50]), jsonl(tmp_path / "b.jsonl", texts[50:])], "text")
    elif kind == "parquet":
        pq, pa = pytest.importorskip("pyarrow.parquet"), pytest.importorskip("pyarrow")
        (tmp_path / "p").mkdir()
        pq.write_table(pa.table({"text": texts[:70]}), tmp_path / "p" / "0.parquet", row_group_size=16)
        pq.write_table(pa.table({"text": texts[70:]}), tmp_path / "p" / "1.parquet", row_group_size=16)
        reader = ParquetFiles([tmp_path / "p"], "text")
    else:
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "d"))
        reader = SavedDataset([tmp_path / "d"], "text")
    reader.check()
    assert reader.count() == 120
    docs = list(reader.documents())
    assert [t for _, t in docs] == texts and [c.ordinal for c, _ in docs] == list(range(120))
    for k in (0, 17, 49, 50, 60, 69, 70, 119):  # 60: inside a row group that a smaller one follows
        assert [t for _, t in reader.documents(docs[k][0])] == texts[k:]


def test_streamed_validation_is_the_first_documents_and_training_never_reads_them(corpus) -> None:
    texts = [f"doc{i:03d} " + "x" * 20 for i in range(100)]
    path = jsonl(Path(corpus["root"]) / "val.jsonl", texts)
    cfg = DataConfig(sources=[{"kind": "files", "paths": [path]}], tokenizer="byte", seq_len=SEQ, val_fraction=0.1)
    mixture = Mixture(cfg, seed=0)
    val = b"".join(bytes(r[:-1].astype(np.uint8)) for r in mixture.val_rows(0))
    assert val.startswith(b"doc000") and b"doc009" in val and b"doc010" not in val
    trained = b"".join(bytes(r.astype(np.uint8)) for b in global_batches(mixture, mixture.start_state(), 60) for r in b)
    assert b"doc010" in trained and not any(f"doc{i:03d}".encode() in trained for i in range(10))


def test_a_source_that_runs_out_repeats_or_stops(corpus) -> None:
    cfg = mixture_cfg(corpus, seq_len=64)
    repeat = states(Mixture(cfg, seed=3), 400)
    assert repeat[-1]["sources"]["code"]["epoch"] >= 1
    cfg.exhausted = "stop"
    stopped = states(Mixture(cfg, seed=3), 400)
    assert 0 < len(stopped) < 400
    assert all(s["epoch"] == 0 for s in stopped[-1]["sources"].values())
    # The steps before the stop are those of the repeating run.
    assert stopped == repeat[: len(stopped)]


# ----------------------------------------------------------------------------------------------
# The loader state


@pytest.mark.parametrize("saved_on, resumed_on", [(4, 1), (4, 2), (1, 8), (2, 4)])
def test_a_state_saved_on_some_ranks_resumes_on_others(corpus, saved_on, resumed_on) -> None:
    mixture = Mixture(mixture_cfg(corpus), seed=3)
    uninterrupted = global_batches(mixture, mixture.start_state(), 90)
    for stop in range(1, 90, 6):  # inside shuffle windows and row groups, across the streamed sources' epochs
        start = mixture.start_state()
        ranks = [list(itertools.islice(mixture.batches(start, r, saved_on), stop)) for r in range(saved_on)]
        saved = [slices[-1][1] for slices in ranks]
        assert all(s == saved[0] for s in saved)  # the state is global: every rank holds the same
        state = json.loads(json.dumps(saved[0]))  # what a checkpoint holds
        resumed = global_batches(Mixture(mixture_cfg(corpus), seed=3), state, 90 - stop, resumed_on)
        assert all(np.array_equal(a, b) for a, b in zip(uninterrupted[stop:], resumed, strict=True)), stop


def test_a_changed_mixture_resumes_each_source_where_it_was(corpus) -> None:
    state = states(Mixture(mixture_cfg(corpus), seed=3), 30)[-1]
    cfg = mixture_cfg(corpus)
    cfg.sources["math"]["weight"] = 0.0
    cfg.sources["books"] = {"kind": "tokens", "paths": [corpus["web"]], "weight": 0.1}
    after = states_from(Mixture(cfg, seed=3), state, 10)
    assert after["sources"]["math"] == state["sources"]["math"]  # weight 0: untouched
    assert after["sources"]["web"]["taken"] > state["sources"]["web"]["taken"]
    assert after["sources"]["books"]["taken"] > 0  # new: from its start


def states_from(mixture: Mixture, state: Dict[str, Any], steps: int) -> Dict[str, Any]:
    return [s for _, s in itertools.islice(mixture.batches(state, 0, 1), steps)][-1]


def test_state_after_steps_reads_past_them(corpus) -> None:
    mixture = Mixture(mixture_cfg(corpus), seed=3)
    assert mixture.state_after(25) == states(mixture, 25)[-1]
    single = Mixture(DataConfig(source="tokens", paths=[corpus["web"]], seq_len=SEQ, global_batch_size=8), seed=1)
    assert single.state_after(100) == states(single, 100)[-1]


def test_loader_workers_keep_the_order(corpus) -> None:
    mixture = Mixture(mixture_cfg(corpus), seed=3)
    expected = global_batches(mixture, mixture.start_state(), 12, size=1)
    for workers in (0, 3):
        # forkserver: the workers do not inherit the threads earlier in-process runs left in this process
        # (a fork while one of them holds a lock can hang the child)
        context = {"multiprocessing_context": "forkserver"} if workers else {}
        loader = DataLoader(
            TrainBatches(mixture, mixture.start_state(), 0, 1), batch_size=None, num_workers=workers, **context
        )
        got = list(itertools.islice(iter(loader), 12))
        assert all(torch.equal(t, torch.from_numpy(e)) for (t, _), e in zip(got, expected, strict=True))
        assert got[-1][1] == states(mixture, 12)[-1]
        val = DataLoader(ValBatches(mixture, 1, 1, 2), batch_size=None, num_workers=workers, **context)
        rows = list(mixture.val_rows(1))
        whole = [rows[k * 8 : (k + 1) * 8][4:] for k in range(len(rows) // 8)]
        assert [b.tolist() for b in val] == [np.stack(w).tolist() for w in whole]


# ----------------------------------------------------------------------------------------------
# What cannot be mixed: one line each


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["web"].update(weight=-1), r"data\.sources\.web\.weight=-1: .* 0 or more"),
        (lambda s: [v.update(weight=0) for v in s.values()], r"every weight is 0"),
        (lambda s: s["web"].update(kind="csv"), r"data\.sources\.web\.kind='csv': expected one of"),
        (lambda s: s["web"].update(wieght=1), r"data\.sources\.web: unknown key 'wieght'"),
        (lambda s: s["code"].update(text_key="body"), r"code\.parquet: no column 'body' \(it has content, n\)"),
        (lambda s: s["math"].update(text_key="body"), r"math\.jsonl:1: no field 'body'"),
        (lambda s: s["web"].update(paths=[]), r"data\.sources\.web: a tokens source needs paths"),
        (lambda s: s["web"].update(name="web/2"), r"source name 'web/2'"),
    ],
)
def test_bad_mixtures_are_one_line(corpus, change, message) -> None:
    cfg = mixture_cfg(corpus)
    change(cfg.sources)
    with pytest.raises(DataError, match=message):
        survey(cfg)


def test_sources_with_other_vocabularies_are_refused(corpus, tmp_path) -> None:
    cfg = mixture_cfg(corpus)
    cfg.sources["web"]["paths"] = [token_file(tmp_path / "big.bin", np.arange(100), vocab=32000)]
    with pytest.raises(DataError, match=r"vocabularies differ \(web 32000, math 256, code 256 tokens\)"):
        survey(cfg)


def test_empty_and_mislabelled_sources_are_refused(corpus, tmp_path) -> None:
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    (tmp_path / "notparquet").mkdir()
    (tmp_path / "notparquet" / "x.txt").write_text("hi")
    (tmp_path / "fake.parquet").write_text("not parquet")
    (tmp_path / "notdataset").mkdir()
    cases = [
        ({"kind": "files", "paths": [str(tmp_path / "blank.jsonl")]}, r"source files: no documents"),
        ({"kind": "parquet", "paths": [str(tmp_path / "notparquet")]}, r"notparquet: a directory without \.parquet"),
        ({"kind": "parquet", "paths": [str(tmp_path / "fake.parquet")]}, r"fake\.parquet: not a Parquet file"),
        ({"kind": "datasets", "paths": [str(tmp_path / "notdataset")]}, r"notdataset: not a directory written by"),
    ]
    for source, message in cases:
        with pytest.raises(DataError, match=message):
            survey(DataConfig(sources=[source], tokenizer="byte", seq_len=SEQ))


def test_one_source_config_is_a_mixture_of_one(corpus) -> None:
    (only,) = mixture_of(DataConfig(source="tokens", paths=[corpus["web"]]))
    assert (only.name, only.kind, only.weight, only.paths) == ("tokens", "tokens", 1.0, (corpus["web"],))
    listed = mixture_of(DataConfig(sources=[{"kind": "files", "paths": ["a"]}, {"kind": "files", "paths": ["b"]}]))
    assert [s.name for s in listed] == ["files1", "files2"]


# ----------------------------------------------------------------------------------------------
# curry-data


def test_curry_data_shows_the_mixture_and_the_loader_speed(corpus, tmp_path, capsys, monkeypatch) -> None:
    from conftest import hydra_value  # noqa: PLC0415

    from curry_train.cli import data as data_cli  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    sources = mixture_cfg(corpus).sources
    args = [f"data.sources={hydra_value(sources)}", "data.tokenizer=byte", "data.seq_len=8", "data.global_batch_size=8"]
    plot = tmp_path / "lengths.png"
    assert data_cli.main([*args, "batches=100", "seconds=1", "documents=50", f"plot={plot}"]) == 0
    out = capsys.readouterr().out
    lines = {
        line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["web"], ["math"], ["code"])
    }
    for name, weight in (("web", 0.5), ("math", 0.3), ("code", 0.2)):
        kind, share, drawn = lines[name][1], float(lines[name][2]), float(lines[name][6])
        assert kind == sources[name]["kind"] and share == weight and abs(drawn - weight) < 0.01
    assert lines["math"][3] == "200" and lines["code"][3] == "300"  # documents
    assert "sample row: global batch 0, row 0, from web" in out
    assert "global batches/s" in out and "tokens/s" in out and "advise's estimate" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data_cli.main([*args, "format=json", "seconds=1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["loader"]["tokens_per_s"] > 0 and report["layout"]["tokens_per_s"] > 0
    # Bad input: one line, exit 2, before anything is read.
    assert data_cli.main([*args, "batches=0"]) == 2
    assert capsys.readouterr().err.strip() == "curry-data: error: batches=0: expected a whole number, at least 1"
    sources["web"]["weight"] = -1
    assert data_cli.main([f"data.sources={hydra_value(sources)}", "data.tokenizer=byte"]) == 2
    assert "data.sources.web.weight=-1" in capsys.readouterr().err


def test_the_document_mask_needs_one_separator(corpus, tmp_path) -> None:
    cfg = mixture_cfg(corpus)
    cfg.document_mask = True
    survey(cfg)  # bytes and the token file both end documents with 0
    unseparated = tmp_path / "plain.bin"
    np.arange(100, dtype=np.uint16).tofile(unseparated)
    TokenFileMeta("uint16", 100, 256, "byte", None).write(unseparated)
    cfg.sources["web"]["paths"] = [str(unseparated)]
    with pytest.raises(DataError, match=r"document_mask=true needs .* web None, math 0, code 0"):
        survey(cfg)


def test_a_bad_mixture_is_one_line_before_any_worker_starts(corpus, tmp_path, curry_train) -> None:
    from conftest import hydra_value  # noqa: PLC0415

    sources = mixture_cfg(corpus).sources
    sources["code"]["text_key"] = "body"
    result = curry_train([f"data.sources={hydra_value(sources)}", "data.tokenizer=byte", "logger=csv"], cwd=tmp_path)
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        f"curry-train: error: {corpus['code']}: no column 'body' (it has content, n); set the source's text_key"
    ]
    assert list(tmp_path.iterdir()) == []  # no run directory, no worker


def test_a_saved_dataset_without_the_text_column_is_refused(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["a b c"] * 4}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"d: no column 'text' \(it has body\); set the source's text_key"):
        survey(DataConfig(sources=[{"kind": "datasets", "paths": [str(tmp_path / "d")]}], tokenizer="byte"))
    datasets.Dataset.from_dict(
        {"text": []}, features=datasets.Features({"text": datasets.Value("string")})
    ).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"empty: not a readable saved dataset"):  # the library cannot load it
        survey(DataConfig(sources=[{"kind": "datasets", "paths": [str(tmp_path / "empty")]}], tokenizer="byte"))
