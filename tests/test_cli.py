"""The commands as a new user meets them: every console script answers --help with its usage and a
bad argument with one line; the layering the import linter holds covers every module."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest
import tomllib
from conftest import REPO, run_train

import curry_train
from curry_train.config import compose
from curry_train.config.checks import _check_batch
from curry_train.layout.dims import ParallelDims

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


def entry_point(name: str):
    module, function = SCRIPTS[name].split(":")
    return getattr(importlib.import_module(module), function)


def test_every_command_is_a_console_script_with_a_shim():
    assert set(SCRIPTS) == {
        "curry-train",
        "curry-validate",
        "curry-bench",
        "curry-bench-moe",
        "curry-advise",
        "curry-capacity",
        "curry-runs-diff",
        "curry-export",
        "curry-tokenize",
        "curry-gpu-check",
        "curry-data",
        "curry-generate",
        "curry-eval",
    }
    shims = {path.name for path in (REPO / "scripts").glob("*.py")}
    assert shims == {
        "validate.py",
        "bench.py",
        "bench_moe.py",
        "advise.py",
        "capacity_sweep.py",
        "runs_diff.py",
        "export_checkpoint.py",
        "tokenize_data.py",
        "gpu_check.py",
        "show_data.py",
        "generate.py",
        "eval.py",
    }
    for shim in (REPO / "scripts").glob("*.py"):
        text = shim.read_text()
        assert "sys.path" not in text and "from curry_train.cli." in text, shim


@pytest.mark.parametrize("name", sorted(set(SCRIPTS) - {"curry-train"}))
def test_help_prints_usage_and_exits_0(name, capsys):
    main = entry_point(name)
    try:
        code = main(["--help"])
    except SystemExit as exit:  # argparse's --help
        code = exit.code
    assert code in (0, None)
    out = capsys.readouterr().out
    assert "usage" in out.lower() and len(out.splitlines()) >= 3, out


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("curry-advise", ["model=nope"], "Could not find 'model/nope' (available: debug"),
        ("curry-advise", ["parallel.tp.size=2"], "parallel.tp is not part of this run's layout"),
        ("curry-advise", ["symptom=hot"], "symptom=hot: expected oom or slow"),
        ("curry-capacity", ["trainer.devices=x"], "could not be converted to Integer"),
        ("curry-validate", ["model=nope"], "Could not find 'model/nope'"),
        ("curry-bench", ["--memory", "model.nope=1"], "model.nope"),
        ("curry-runs-diff", ["/nonexistent/a", "/nonexistent/b"], "is not a run directory"),
        ("curry-export", ["/nonexistent", "--output", "/tmp/x.safetensors"], "not a complete curry-train checkpoint"),
        ("curry-tokenize", ["/nonexistent.txt", "--output", "/tmp/x.bin"], "no such file or directory"),
        ("curry-bench-moe", ["--steps", "2"], "--steps must be at least 4"),
    ],
)
def test_a_bad_argument_is_one_line(name, argv, message, capsys):
    assert entry_point(name)(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ": error: " in err and message in err, err


def test_train_help_and_a_bad_override(tmp_path):
    """train.py as a new interpreter (the other tests' commands are forks of the command server)."""
    result = run_train(["--help"], cwd=tmp_path, timeout=120, check=False, fresh=True)
    assert (
        result.returncode == 0
        and "Usage: curry-train" in result.stdout
        and "parallel: cp, dp, ep, fsdp" in result.stdout
    )
    result = run_train(["model.dimm=3"], cwd=tmp_path, timeout=120, check=False, fresh=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "curry-train: error: model.dimm: no such key in model; did you mean model.dim?"
    ]
    assert not (tmp_path / "outputs").exists()  # composing failed: Hydra never made a run directory


# What curry-train imports before a config passed its check: torch and Lightning load after it.
LIGHT = ("curry_train.cli.train", "curry_train.launch", "curry_train.config.checks", "curry_train.config.resume")


def test_composing_and_checking_import_neither_torch_nor_lightning(tmp_path):
    """So --help, --cfg job and a bad input answer at once (a fresh interpreter: this one has torch)."""
    code = (
        f"import sys; import {', '.join(LIGHT)}; from curry_train.config import compose; "
        "from curry_train.config.checks import check; "
        "cfg = compose(['trainer.accelerator=cpu']); check(cfg); "
        "print(sorted(m for m in ('torch', 'lightning', 'lightning.pytorch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_a_run_that_fails_its_check_leaves_no_run_directory(tmp_path, curry_train):
    result = curry_train(["trainer.devices=3", "logger=csv"], cwd=tmp_path)
    assert result.code == 2 and "is not divisible by" in result.err
    assert list(tmp_path.iterdir()) == []  # neither outputs/<date>/<time>/ nor the emptied outputs/<date>/
    # A directory that holds more than Hydra's files (an earlier run's) is left as it was.
    run_dir = tmp_path / "kept"
    (run_dir / "checkpoints").mkdir(parents=True)
    result = curry_train(["trainer.devices=3", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.code == 2 and (run_dir / "checkpoints").is_dir() and (run_dir / ".hydra").is_dir()


def test_the_layers_contract_names_every_module():
    """A module the contract does not name is unchecked by the linter: every top-level one is named."""
    (contract,) = PYPROJECT["tool"]["importlinter"]["contracts"]
    named = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    modules = {f"curry_train.{info.name}" for info in pkgutil.iter_modules(curry_train.__path__)}
    assert modules == named


def test_presets_compose_with_the_default_model():
    for data in ("stdlib", "files", "tokens"):
        cfg = compose([f"data={data}"])
        assert cfg.data.seq_len <= cfg.model.max_seq_len, data
        _check_batch(cfg, ParallelDims(1))  # raises on a batch the default model cannot run
        assert cfg.data.global_batch_size * cfg.data.seq_len <= 32 * 256, data  # debug-sized steps
