"""Shared helpers: run train.py as a user would, read the metrics it leaves."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import pytest
from command_server import start_command

from curry_train.cli import train as train_cli
from curry_train.config import compose
from curry_train.config.checks import check
from curry_train.pool import Pools
from curry_train.runner import train_in_workers

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"

# A small, fast configuration of the default model: 4 data-parallel ranks still get one micro-batch.
FAST = (
    "logger=csv",
    "trainer.log_every_n_steps=1",  # the tests compare each step's row
    "trainer.enable_progress_bar=false",
    "data.seq_len=64",
    "data.global_batch_size=16",
    "data.micro_batch_size=4",
    "trainer.limit_val_batches=0",
)


def short_documents() -> Path:
    """A JSONL corpus of 4,000 short documents (2-12 words each, 35 bytes on average), so that a 64-byte
    row packs several: written once per machine (the same words every time) for the document-mask rows."""
    path = Path(tempfile.gettempdir()) / "curry-train-tests" / "short-documents.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        lines = [
            json.dumps({"text": " ".join(f"w{rng.randrange(300)}" for _ in range(rng.randint(2, 12)))})
            for _ in range(4000)
        ]
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text("\n".join(lines) + "\n")
        partial.replace(path)  # whole or not at all: pytest sessions may share the machine
    return path


# Packed rows of short documents under the document mask (data.document_mask): the masked layouts' data.
DOCUMENTS = ("data=files", f"data.paths=[{short_documents()}]", "data.tokenizer=byte", "data.document_mask=true")

# A chat template that a byte-level tokenizer renders: role headers, the text, an end-of-turn mark.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<' + message['role'] + '>' + message['content'] + '</>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)


def chat_records() -> tuple[Path, Path]:
    """A JSONL corpus of 1,500 short conversations (a system turn in some, one or two exchanges) and its chat
    template's file, written once per machine (the same every time)."""
    root = Path(tempfile.gettempdir()) / "curry-train-tests"
    path, template = root / "chat.jsonl", root / "chat.jinja"
    if not path.is_file() or not template.is_file():
        root.mkdir(parents=True, exist_ok=True)
        rng = random.Random(1)
        words = lambda n: " ".join(f"w{rng.randrange(200)}" for _ in range(n))  # noqa: E731
        lines = []
        for _ in range(1500):
            messages = [{"role": "system", "content": words(3)}] if rng.random() < 0.3 else []
            for _ in range(rng.randint(1, 2)):
                messages += [{"role": "user", "content": words(rng.randint(1, 5))}]
                messages += [{"role": "assistant", "content": words(rng.randint(1, 6))}]
            lines.append(json.dumps({"messages": messages}))
        for target, text in ((path, "\n".join(lines) + "\n"), (template, CHAT_TEMPLATE)):
            partial = target.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(text)
            partial.replace(target)
    return path, template


# Chat records: the loss on the assistant's turns only, the mean over the global batch's targets.
CHAT = (
    "data=files",
    f"data.paths=[{chat_records()[0]}]",
    "data.format=chat",
    "data.tokenizer=byte",
    f"data.chat_template={chat_records()[1]}",
)


def hydra_value(value: object) -> str:
    """``value`` in Hydra's override grammar (strings quoted): ``f"data.sources={hydra_value(sources)}"``."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return f"'{value}'" if isinstance(value, str) else str(value)


def clean_env(extra: Optional[dict] = None) -> dict:
    """The environment of a user's shell: no launcher variables inherited from the test runner."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "TORCHELASTIC_RUN_ID")
    }
    env["WANDB_SILENT"] = "true"
    env.update(extra or {})
    return env


def start_train(args: Sequence[str], cwd: Path, program: Path = TRAIN, quiet: bool = False):
    """``train.py ARGS`` (or another ``program``) started as a user's shell would, in a session of its
    own so that ``kill_group`` ends it with its workers, as a fork of the command server (which has
    imported what it imports: tests/command_server.py); its output comes from ``communicate`` once it has
    ended (``quiet``: discarded)."""
    return start_command(str(program), args, cwd, clean_env(), capture=not quiet)


def kill_group(process) -> None:
    """SIGKILL to ``process``'s whole session (its workers too), if it is still running."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until(condition: Callable[[], bool], process, what: str, timeout: float = 300) -> None:
    """Poll ``condition`` until it holds; fail when ``process`` ended first or ``timeout`` passed."""
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None and time.time() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)


def run_train(
    args: Sequence[str],
    cwd: Path,
    timeout: float = 600,
    env: Optional[dict] = None,
    check: bool = True,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """``train.py ARGS`` run to its end (as ``start_train`` starts it; ``fresh``: as a new interpreter);
    fails the test on a non-zero exit (``check``)."""
    process = start_command(str(TRAIN), args, cwd, clean_env(env), fresh=fresh)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        kill_group(process)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        pytest.fail(f"train.py {' '.join(args)} exited {result.returncode}\n{result.stderr[-4000:]}")
    return result


@dataclass
class Finished:
    """How a command run in this process ended: its exit status and what it printed."""

    code: int
    out: str
    err: str


@pytest.fixture
def curry_train(monkeypatch, capsys) -> Callable[..., Finished]:
    """``curry-train ARGS`` in this process (``cli.train.main`` with its argv, in ``cwd``): how a bad input
    ends, without an interpreter of its own (one test per entry point runs the real command)."""

    def run(args: Sequence[str], cwd: Path, env: Optional[dict] = None) -> Finished:
        monkeypatch.chdir(cwd)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "argv", ["curry-train", *args])
        capsys.readouterr()
        try:
            train_cli.main()
            code = 0
        except SystemExit as stopped:
            code = stopped.code if isinstance(stopped.code, int) else int(stopped.code is not None)
        out, err = capsys.readouterr()
        return Finished(code, out, err)

    return run


def read_metric(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """step -> value of ``key`` from the run's metrics.csv."""
    (path,) = list(run_dir.rglob("metrics.csv"))
    with path.open() as rows:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(rows) if r.get(key)}


STEPS = 10  # length of the loss curves that layouts must reproduce


def transient_peak(record: dict, ddp: bool) -> int:
    """The tracker's peak of activations and backward's temporaries together (what a device holds for one
    micro-batch besides the model state), less DDP's gradient buckets: the tracker books them as
    temporaries when the all-reduce writes them, but they are the model state's gradients."""
    return record["transient"] - (record["state"]["grads"] if ddp else 0)


@pytest.fixture(scope="session")
def pools():
    """Worker pools for the whole session, one per world size (curry_train.pool): every multi-process
    check runs its jobs in them instead of starting interpreters of its own."""
    with Pools() as session_pools:
        yield session_pools


CHECKPOINTED = ("checkpoint.every_n_steps=3", "checkpoint.keep_last=4")  # steps 3, 6, 9 and the last


@pytest.fixture(scope="session")
def single_process_run(tmp_path_factory) -> Path:
    """The reference, as a user runs it (``train.py`` in a new interpreter, one process): FAST for STEPS
    steps, checkpoints of steps 3, 6, 9 and 10."""
    run_dir = tmp_path_factory.mktemp("single")
    overrides = [*FAST, f"trainer.max_steps={STEPS}", *CHECKPOINTED, f"hydra.run.dir={run_dir}"]
    run_train(overrides, cwd=run_dir, fresh=True)
    return run_dir


@pytest.fixture(scope="session")
def single_process_curve(single_process_run) -> dict[int, float]:
    return read_metric(single_process_run)


def train(pools: Pools, overrides: Sequence[str], run_dir: Path) -> Path:
    """Compose, check and train ``overrides`` into ``run_dir`` in the session's pools: the worker body of
    ``curry-train`` (loggers, checkpoints, metrics.csv), without starting interpreters of its own."""
    cfg = compose(overrides)
    train_in_workers(cfg, check(cfg, run_dir=run_dir), run_dir, pools)
    return run_dir


def assert_same_curve(losses: dict[int, float], reference: dict[int, float], rtol: float = 1e-5) -> None:
    assert sorted(losses) == sorted(reference)
    for step, expected in reference.items():
        assert abs(losses[step] - expected) / expected <= rtol, (step, losses[step], expected)


# After an example has printed its verdict: leave without the interpreter's teardown, where destroying gloo's
# still-joinable threads can abort a finished process ("terminate called without an active exception", a
# race in PyTorch's gloo backend that the launcher's workers avoid the same way).
SEED_EXAMPLE_END = """
import os as _os, sys as _sys
_sys.stdout.flush()
_sys.stderr.flush()
_os._exit(0)
"""


def run_seed_example(source: str, tmp_path: Path, nproc: int = 2) -> str:
    """Run an issue's seed example (a script printing "SEED OK ..." per rank) as a user would: under
    torchrun with ``nproc`` CPU processes. Returns its stdout, where the ranks' lines may interleave
    (count "SEED OK", do not split lines); fails on a non-zero exit."""

    script = tmp_path / "seed_example.py"
    script.write_text(textwrap.dedent(source) + SEED_EXAMPLE_END)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(script)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def spawned_workers(parent_pid: int) -> list[int]:
    """The worker processes of the job process ``parent_pid``, in the order of their ranks (the server forks
    them one by one): the children of its worker server (the forkserver ``launch.start_worker_server``
    started)."""
    parents, commands = {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            commands[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    servers = {pid for pid, ppid in parents.items() if ppid == parent_pid and "forkserver" in commands[pid]}
    return sorted(pid for pid, ppid in parents.items() if ppid in servers)


# -- the full parity matrix -------------------------------------------------------------------------
# CI runs one case of each family (every sharding mode, schedule and CP pattern is still checked
# step by step by a whitebox test); the cases marked ``matrix`` -- the same checks at other sizes --
# run with ``--matrix``.


MATRIX = pytest.mark.matrix  # a case that runs with --matrix only


def matrix(values: object, id: str) -> object:  # noqa: A002  (pytest's own name for it)
    """A parametrize case that runs with ``--matrix`` only."""
    return pytest.param(values, id=id, marks=MATRIX)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--matrix", action="store_true", help="also run the parity cases marked matrix")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--matrix"):
        return
    skip = pytest.mark.skip(reason="the rest of a parity matrix: run with --matrix")
    for item in items:
        if "matrix" in item.keywords:
            item.add_marker(skip)
