"""Bad input fails fast, once, clearly: every input a user can get wrong (data files, token files,
optimizer ranges, sizes, paths, recipe names, a ``+key`` the schema lacks) is refused by the check
that runs before any worker starts, with one line naming the key or the file; a sweep reports a job
that failed in its check as it reports one that failed in a worker, and goes on."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, assert_same_curve, read_metric, run_train

from curry_train.cli.common import error_line, is_config_error
from curry_train.config import compose
from curry_train.config.checks import check
from curry_train.data.mixture import TokenWindows
from curry_train.data.sources import DataError, TokenFileMeta


def _token_file(path: Path, tokens: np.ndarray, **meta) -> None:
    tokens.tofile(path)
    fields = dict(dtype=tokens.dtype.name, num_tokens=len(tokens), vocab_size=256, tokenizer="byte", separator=0)
    TokenFileMeta.path_for(path).write_text(json.dumps({**fields, **meta}))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input")
    (root / "empty.txt").write_text("")
    (root / "tiny.txt").write_text("hello world\n")
    (root / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 2000)
    (root / "broken.jsonl").write_text('{"text": "a fine record"}\n{not json}\n')
    (root / "other-key.jsonl").write_text('{"body": "x"}\n')
    (root / "number.jsonl").write_text('{"text": 5}\n')
    (root / "list.jsonl").write_text("[1, 2]\n")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 100)
    (root / "latin1.txt").write_bytes(("caf\xe9 " * 5000).encode("latin-1"))
    (root / "tokenizer.json").write_text("{}")
    tokens = np.random.default_rng(0).integers(1, 256, 100_000).astype(np.uint16)
    _token_file(root / "good.bin", tokens)
    high = tokens.copy()
    high[777] = 5000
    _token_file(root / "high-id.bin", high)
    _token_file(root / "short.bin", tokens[:1000], num_tokens=len(tokens))
    _token_file(root / "few.bin", tokens[:100])
    _token_file(root / "float.bin", tokens, dtype="float32")
    _token_file(root / "zero-vocab.bin", tokens, vocab_size=0)
    tokens.tofile(root / "no-sidecar.bin")
    tokens.tofile(root / "broken-sidecar.bin")
    (root / "broken-sidecar.json").write_text("{nope")
    tokens.tofile(root / "thin-sidecar.bin")
    (root / "thin-sidecar.json").write_text('{"dtype": "uint16"}')
    return root


def _files(name: str) -> list[str]:
    return ["data=files", f"data.paths=[{{root}}/{name}]"]


def _tokens(name: str) -> list[str]:
    return ["data=tokens", f"data.paths=[{{root}}/{name}]"]


# (overrides, what the one line must say). {root} is the data directory above.
BAD_INPUTS = [
    # text files
    (_files("empty.txt"), r"empty\.txt: an empty file"),
    (_files("tiny.txt"), r"13 tokens make 0 training sequences of data\.seq_len=256 .* fewer than one global batch"),
    (_files("broken.jsonl"), r"broken\.jsonl:2: not a JSON record"),
    (_files("other-key.jsonl"), r"other-key\.jsonl:1: no field 'text' \(set data\.text_key\)"),
    (_files("number.jsonl"), r"number\.jsonl:1: field 'text' holds int, not text"),
    (_files("list.jsonl"), r"list\.jsonl:1: a JSONL line must be an object with a 'text' field"),
    ([*_files("broken.jsonl"), "data.text_key=body"], r"broken\.jsonl:1: no field 'body'"),
    (_files("binary.txt"), r"binary\.txt: a NUL byte at offset 0: a binary file, not text"),
    (_files("latin1.txt"), r"latin1\.txt: byte 0xe9 at offset 3 is not UTF-8"),
    (_files("missing.txt"), r"data\.paths: .*missing\.txt does not exist"),
    (["data=files", "data.paths=[{root}]"], r"data\.paths: .* does not exist \(or is not a file\)"),
    (["data=files", "data.paths=[]"], r"data\.source=files needs data\.paths"),
    ([*_files("text.txt"), "data.tokenizer={root}/tokenizer.json"], r"data\.tokenizer=.*not a readable tokenizer"),
    ([*_files("text.txt"), "data.tokenizer={root}/none.json"], r"data\.tokenizer=.*no such file"),
    # token files
    (_tokens("high-id.bin"), r"high-id\.bin: token id 5000 at position 777 is not below the vocabulary .*\(256\)"),
    (_tokens("short.bin"), r"short\.bin: 2000 bytes, but its sidecar says 100000 uint16 tokens"),
    (_tokens("few.bin"), r"100 tokens make 0 training sequences"),
    (_tokens("float.bin"), r"float\.json: dtype 'float32' is not an unsigned integer type"),
    (_tokens("zero-vocab.bin"), r"zero-vocab\.json: vocab_size=0 must be a positive integer"),
    (_tokens("no-sidecar.bin"), r"no-sidecar\.bin: no sidecar no-sidecar\.json"),
    (_tokens("broken-sidecar.bin"), r"broken-sidecar\.json: not a token-file sidecar"),
    (_tokens("thin-sidecar.bin"), r"thin-sidecar\.json: a token-file sidecar holds dtype, num_tokens"),
    (_tokens("text.txt"), r"text\.txt: no sidecar"),
    ([*_tokens("good.bin"), "model.vocab_size=200"], r"the data's vocabulary \(256 tokens\) exceeds model\.vocab_size"),
    # optimizer ranges
    (["optim.betas=[2.0,0.95]"], r"optim\.betas=\[2\.0, 0\.95\] must be two numbers in \[0, 1\)"),
    (["optim.betas=[0.9]"], r"optim\.betas=\[0\.9\] must be two numbers"),
    (["optim.eps=-1e-8"], r"optim\.eps=-1e-08 must be positive"),
    (["optim.eps=0"], r"optim\.eps=0\.0 must be positive"),
    (["optim.weight_decay=-0.1"], r"optim\.weight_decay=-0\.1 must be >= 0"),
    (["optim.lr=nan"], r"optim\.lr=nan must be a finite number"),
    (["optim.lr=inf"], r"optim\.lr=inf must be a finite number"),
    (["optim.lr=0"], r"optim\.lr=0\.0 must be positive"),
    (["optim.min_lr=0.1"], r"optim\.min_lr=0\.1 must be between 0 and optim\.lr=0\.003"),
    (["optim.grad_clip=-1"], r"optim\.grad_clip=-1\.0 must be >= 0"),
    (["optim.warmup_steps=-1"], r"optim\.warmup_steps=-1 must be >= 0"),
    (["optim.schedule=step"], r"optim\.schedule='step': expected one of cosine, linear, constant"),
    # sizes and counts
    (["seed=-1"], r"seed=-1 must be between 0 and 4294967295"),
    (["seed=4294967296"], r"seed=4294967296 must be between 0 and 4294967295"),
    (["data.num_workers=-1"], r"data\.num_workers=-1 must be >= 0"),
    (["data.val_fraction=1.0"], r"data\.val_fraction=1\.0 must be in \[0, 1\)"),
    (["data.seq_len=0"], r"data\.seq_len=0 must be between 1 and model\.max_seq_len"),
    (["data.micro_batch_size=0"], r"data\.micro_batch_size and data\.global_batch_size must be positive"),
    (["data.global_batch_size=12"], r"data\.global_batch_size=12 is not divisible by data\.micro_batch_size=8"),
    (["trainer.devices=0"], r"trainer\.devices=0 .* must be positive"),
    (["trainer.max_steps=0"], r"trainer\.max_steps=0 must be positive"),
    (["trainer.limit_val_batches=-1"], r"trainer\.limit_val_batches=-1 must be >= 0"),
    (["trainer.timeout=0"], r"trainer\.timeout=0 must be at least 1"),
    (["checkpoint.keep_last=0"], r"checkpoint\.keep_last >= 1"),
    (["model.dim=0"], r"model\.dim=0 must be positive"),
    (["model.norm_eps=-1"], r"model\.norm_eps=-1\.0 must be a positive number"),
    (["model.rope_theta=0"], r"model\.rope_theta=0\.0 must be a positive number"),
    (["model.head_dim=3"], r"model\.head_dim=3 must be a positive even number"),
    (["model.init_std=-0.02"], r"model\.init_std=-0\.02 must be a positive number"),
    (["parallel.dp.bucket_cap_mb=0"], r"parallel\.dp\.bucket_cap_mb=0 must be positive"),
    (["trainer.num_nodes=2"], r"trainer\.num_nodes=2: start one process per device with torchrun or srun"),
    # choices, names and keys
    (["parallel.tp.size=2"], r"parallel\.tp is not part of this run's layout; compose it: parallel=tp"),
    (["parallel=fsdp", "parallel.fsdp.sharding=zero4"], r"parallel\.fsdp\.sharding='zero4': expected one of full"),
    (["parallel.recompute=half"], r"parallel\.recompute='half': expected one of none, full, selective"),
    (["trainer.precision=16"], r"trainer\.precision='16': expected one of"),
    (["logger.kind=mlflow"], r"logger\.kind='mlflow': expected one of"),
    (["recipe=debug-dp3"], r"Could not find 'recipe/debug-dp3' \(available: debug-dp2"),
    (["model=llama9"], r"Could not find 'model/llama9' \(available: debug"),
    (["trainer.max_step=10"], r"trainer\.max_step: no such key in trainer; did you mean trainer\.max_steps\?"),
    (["model.dimm=3"], r"model\.dimm: no such key in model; did you mean model\.dim\?"),
    (
        ["parallel=fsdp", "parallel.fsdp.shardin=full"],
        r"no such key in parallel\.fsdp; did you mean parallel\.fsdp\.sharding\?",
    ),
    (["modle.dim=3"], r"modle\.dim: no such key in the config; did you mean model\?"),
    (["+trainer.max_step=10"], r"trainer\.max_step: no such key in the schema: did you mean trainer\.max_steps\?"),
    (["+sed=3"], r"sed: no such key in the schema: did you mean seed\?"),
    (["parallel=tp", "trainer.devices=2", "+parallel.tp.sise=2"], r"did you mean parallel\.tp\.size\?"),
    (["trainer.max_steps=ten"], r"trainer\.max_steps=ten: Value 'ten' of type 'str' could not be converted"),
    # paths
    (["ckpt_path=/nonexistent"], r"ckpt_path=/nonexistent: not a curry-train checkpoint directory"),
    (["ckpt_path=last", "checkpoint.search_dir=/nonexistent"], r"ckpt_path=last: no complete checkpoint in"),
    # a source's paths where the source reads none
    (["data.paths=[{root}/text.txt]"], r"data\.paths=\[.*text\.txt'\] with data\.source=stdlib .*choose the source"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_a_bad_input_is_one_line_naming_it(data_dir, tmp_path, overrides, message):
    overrides = [o.replace("{root}", str(data_dir)) for o in overrides]
    with pytest.raises(Exception) as caught:
        check(compose(["logger=csv", *overrides]), env={}, run_dir=tmp_path)
    error = caught.value
    assert is_config_error(error), f"{type(error).__name__}: {error}"
    line = error_line(error)
    assert "\n" not in line and re.search(message, line), line


def test_the_good_files_of_the_table_pass(data_dir, tmp_path):
    """The table's bad files are bad for the reason named: their good twins pass the same check."""
    for overrides in (_files("text.txt"), _tokens("good.bin")):
        cfg = compose(["logger=csv", *(o.replace("{root}", str(data_dir)) for o in overrides)])
        check(cfg, env={}, run_dir=tmp_path)


def test_a_token_id_past_the_scanned_head_and_tail_stops_its_window():
    """Token files too large to scan whole at the check are checked window by window as they are read."""
    stream = np.array([1, 2, 3, 4, 300, 5, 6, 7, 8], dtype=np.uint16)
    windows = TokenWindows([stream], seq_len=2, vocab_size=256)
    assert windows[0].tolist() == [1, 2, 3]
    with pytest.raises(DataError, match=r"token id 300 is not below the data's vocabulary \(256\)"):
        windows[1]


def test_a_validation_tail_too_short_for_a_batch_is_a_warning(data_dir, tmp_path, caplog):
    cfg = compose(["logger=csv", *(o.replace("{root}", str(data_dir)) for o in _files("text.txt"))])
    check(cfg, env={}, run_dir=tmp_path)
    assert "this run validates nothing; raise data.val_fraction" in caplog.text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.betas=[2.0,0.95]"], "optim.betas=[2.0, 0.95] must be two numbers in [0, 1)"),
        (["+trainer.max_step=10"], "did you mean trainer.max_steps?"),
        (["model.dimm=3"], "model.dimm: no such key in model; did you mean model.dim?"),
        (["recipe=debug-dp3"], "Could not find 'recipe/debug-dp3'"),
        (["hydra.run.dir={file}/run"], "cannot write"),
    ],
)
def test_the_command_prints_one_line_and_starts_nothing(tmp_path, overrides, message, curry_train):
    """As a user meets it: exit 2, one line on stderr, no traceback, no run directory left behind."""
    (tmp_path / "file").write_text("not a directory")
    overrides = [o.replace("{file}", str(tmp_path / "file")) for o in overrides]
    result = curry_train([*FAST, *overrides], cwd=tmp_path)
    assert result.code == 2, result.err[-2000:]
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("curry-train: error: ") and message in lines[0], lines
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_sweep_reports_check_and_worker_failures_alike_and_goes_on(tmp_path):
    """Job 0 fails its check (lr nan), job 1 diverges in its worker (exit 3), job 2 trains: every job
    runs, each failure is one line, and the sweep ends with status 1 naming the two."""
    result = run_train(
        [
            "-m",
            *FAST,
            "optim.lr=nan,1e4,3e-3",
            "optim.grad_clip=0",
            "trainer.max_steps=3",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "curry-train: error:" in line]
    assert len(errors) == 2 and "optim.lr=nan must be a finite number" in errors[0], errors
    assert "non-finite" in errors[1]
    assert "2 job(s) of the sweep failed" in result.stderr
    assert re.search(r"job 0 \(.*optim\.lr=nan.*\): exit 2", result.stderr)
    assert re.search(r"job 1 \(.*optim\.lr=10000\.0.*\): exit 3", result.stderr)  # as Hydra writes 1e4
    assert not (tmp_path / "sweep" / "0").exists()  # the job that never started leaves nothing
    assert any((tmp_path / "sweep" / "2" / "checkpoints").iterdir())
    assert os.path.isfile(tmp_path / "sweep" / "multirun.yaml")


@pytest.mark.slow
def test_a_sweep_under_hydras_submitit_launcher_reports_its_failed_job(single_process_curve, tmp_path):
    """The same sweep through Hydra's submitit launcher (its local executor: each job a process of its
    own, as on SLURM): every job runs, the failed one is reported failed to the launcher by name, and the
    good one trains the single-process curve (the submitit launcher's path end to end)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = run_train(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            *FAST,
            "trainer.max_steps=2",
            "optim.eps=-1,1e-8",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert re.search(r"JobFailed: job 0 \(.*optim\.eps=-1\): exit 2", result.stderr), result.stderr[-3000:]
    assert any((tmp_path / "sweep" / "1" / "checkpoints").iterdir())
    assert_same_curve(read_metric(tmp_path / "sweep" / "1"), {step: single_process_curve[step] for step in (0, 1)})
    job_errors = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*_0_log.err"))
    assert "curry-train: error: optim.eps=-1.0 must be positive" in job_errors
