"""End to end, as a user runs it: layouts reproduce the single-process loss curve, sweeps leave one
directory per job, a killed run resumes with the same losses, bad input fails in one line."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    FAST,
    STEPS,
    TRAIN,
    assert_same_curve,
    clean_env,
    kill_group,
    read_metric,
    run_train,
    spawned_workers,
    start_train,
    wait_until,
)

from curry_train.config import compose


@pytest.mark.slow
def test_default_run_directory(single_process_run, single_process_curve):
    """The single-process run leaves config, log, metrics and a checkpoint, and its loss falls."""
    run_dir = single_process_run
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "train.log").is_file()
    assert (run_dir / "checkpoints" / f"step-{STEPS:08d}" / ".metadata").is_file()
    losses = single_process_curve
    assert sorted(losses) == list(range(STEPS))
    assert losses[0] == pytest.approx(5.55, abs=0.2)  # ln(256): uniform over bytes at init
    assert losses[STEPS - 1] < losses[0] - 1.0


@pytest.mark.slow
def test_a_run_says_what_it_is_and_how_it_ended(single_process_run, single_process_curve):
    """Its start names the model size, layout and tokens per step; its last lines the final loss,
    tokens/s, the run directory and the last checkpoint, which exists."""
    lines = [line.split(" - ", 1)[-1] for line in (single_process_run / "train.log").read_text().splitlines()]
    start = next(line for line in lines if " parameters | parallel=" in line)
    assert re.fullmatch(
        r"debug: [\d,]+ parameters \| parallel=dp \(pp=1 x dp_replicate=1 x dp_shard=1 x cp=1 x tp=1\) on 1 cpu"
        rf" process\(es\) \| 1,024 tokens per step \(16 x 64\), micro-batch 4, 4 accumulation step\(s\) \| {STEPS}"
        rf" steps -> {re.escape(str(single_process_run))}",
        start,
    ), start
    done, where, checkpoint = lines[-3:]
    assert re.fullmatch(rf"done: step {STEPS}, train loss {single_process_curve[STEPS - 1]:.4f}, [\d,]+ tokens/s", done)
    assert where == f"run directory: {single_process_run}"
    assert checkpoint == f"last checkpoint: {single_process_run / 'checkpoints' / f'step-{STEPS:08d}'}"


@pytest.mark.slow
def test_spawned_workers_reproduce_single_process_curve(single_process_curve, tmp_path):
    """The launcher's own path end to end (train.py starts 2 workers): the single-process curve. Every
    layout's parity, gradient by gradient: test_parity.py."""
    run_train([*FAST, f"trainer.max_steps={STEPS}", "trainer.devices=2", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert_same_curve(read_metric(tmp_path), single_process_curve)


@pytest.mark.slow
def test_a_sweep_runs_each_job_once_and_a_failing_job_ends_its_workers(single_process_curve, tmp_path):
    """-m with 2 workers per job: a worker killed mid-run fails its job promptly and ends its peer; the
    sweep goes on to the next job (Hydra's behaviour), which runs once with its own overrides and trains
    the single-process curve; nothing but the job directories is written; the failure is reported at the
    end (the sweep launcher's path end to end)."""
    sweep_dir = tmp_path / "sweep"
    process = start_train(
        ["-m", *FAST, "trainer.max_steps=400,2", "trainer.devices=2", f"hydra.sweep.dir={sweep_dir}"], tmp_path
    )
    try:
        wait_until(lambda: list((sweep_dir / "0").rglob("metrics.csv")), process, "job 0 training")
        workers = spawned_workers(process.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = process.communicate(timeout=240)
    finally:
        kill_group(process)
    assert process.returncode != 0
    assert "process 1 terminated with signal SIGKILL" in stderr
    assert "1 job(s) of the sweep failed" in stderr, stderr[-3000:]
    assert re.search(r"job 0 \(.*trainer\.max_steps=400 .*\): exit", stderr), stderr[-3000:]
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0", "1", "multirun.yaml"]
    assert max(read_metric(sweep_dir / "0")) < 399  # job 0 did not finish
    # job 1 ran whole, on the single-process curve (warmup: the learning rates do not depend on max_steps)
    assert_same_curve(read_metric(sweep_dir / "1"), {step: single_process_curve[step] for step in (0, 1)})
    for job, steps in (("0", 400), ("1", 2)):
        assert f"max_steps: {steps}" in (sweep_dir / job / ".hydra" / "config.yaml").read_text()


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_losses(single_process_curve, tmp_path):
    """2 workers killed after their step-4 checkpoint; ckpt_path=last continues from it on the curve of
    the single-process run (its first 8 steps: the warmup's learning rates do not depend on max_steps)."""
    steps = 8
    common = [*FAST, f"trainer.max_steps={steps}", "checkpoint.every_n_steps=2", "checkpoint.keep_last=5"]
    killed_dir, resumed_dir = tmp_path / "killed", tmp_path / "resumed"
    reference = single_process_curve
    assert compose(list(FAST)).optim.warmup_steps >= steps

    process = start_train([*common, "trainer.devices=2", f"hydra.run.dir={killed_dir}"], tmp_path, quiet=True)
    try:
        step4 = killed_dir / "checkpoints" / "step-00000004" / "meta.pt"
        wait_until(step4.exists, process, "the step-4 checkpoint")
    finally:
        kill_group(process)

    run_train(
        [
            *common,
            "trainer.devices=2",
            "ckpt_path=last",
            f"checkpoint.search_dir={killed_dir}",
            f"hydra.run.dir={resumed_dir}",
        ],
        cwd=tmp_path,
    )
    resumed = read_metric(resumed_dir)
    assert resumed and min(resumed) >= 4 and max(resumed) == steps - 1
    for step, loss in resumed.items():
        assert abs(loss - reference[step]) / reference[step] <= 1e-5, (step, loss, reference[step])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.devices=3"], "data.global_batch_size=16 is not divisible"),
        (["data.seq_len=4096"], "data.seq_len=4096 must be between 1 and model.max_seq_len=1024"),
        (["data=files", "data.paths=[/nonexistent/corpus.txt]"], "/nonexistent/corpus.txt does not exist"),
        (["trainer.accelerator=gpu"], "no CUDA device is visible"),
        (["trainer.num_nodes=2"], "torchrun or srun"),
        (["model.n_heads=3"], "model.dim=128 is not divisible by model.n_heads=3"),
        (["ckpt_path=last", "checkpoint.search_dir=/nonexistent"], "no complete checkpoint"),
    ],
)
def test_bad_input_fails_in_one_line(overrides, message, tmp_path, curry_train):
    result = curry_train([*FAST, *overrides, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.code == 2
    assert "Traceback" not in result.err
    error_lines = [line for line in result.err.splitlines() if line.startswith("curry-train: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.err
    assert not (tmp_path / "run").exists()


def test_world_size_mismatch_under_torchrun(tmp_path, curry_train):
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "t"}
    result = curry_train([*FAST, "trainer.devices=2", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env)
    assert result.code == 2
    assert "torchrun started 4 processes but trainer.devices=2 x trainer.num_nodes=1 = 2" in result.err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel=nope"], "Could not find 'parallel/nope'"),
        (["model.dimm=3"], "model.dimm"),
        (["model.dim=abc"], "model.dim"),
    ],
)
def test_config_errors_name_the_key(overrides, message, tmp_path, curry_train):
    result = curry_train([*overrides, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.code == 2
    assert message in result.err
    assert "Traceback" not in result.err


@pytest.mark.slow
def test_torchrun_processes_join_one_run(single_process_curve, tmp_path):
    """Under torchrun every rank runs train.py: they agree on one run directory and reproduce the curve."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(TRAIN),
            *FAST,
            f"trainer.max_steps={STEPS}",
            "trainer.devices=2",
        ],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = list((tmp_path / "outputs").iterdir())
    assert run_dir.name.startswith("torchrun-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
    assert_same_curve(read_metric(run_dir), single_process_curve)


@pytest.mark.slow
def test_default_logger_is_wandb_offline(tmp_path):
    run_train(
        ["logger=wandb", *FAST[1:], "trainer.max_steps=2", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        env={"WANDB_API_KEY": "", "HOME": str(tmp_path)},
    )
    (offline_run,) = list((tmp_path / "wandb").glob("offline-run-*"))
    assert list(offline_run.glob("*.wandb"))
    assert sorted(read_metric(tmp_path)) == [0, 1]  # metrics.csv is written whatever the logger


@pytest.mark.slow
def test_workers_die_with_their_launcher(tmp_path):
    """Killing the job process (an OOM kill, a scheduler's kill) takes its workers with it."""
    args = [*FAST, "trainer.max_steps=400", "trainer.devices=2", f"hydra.run.dir={tmp_path}"]
    process = start_train(args, tmp_path, quiet=True)
    try:
        wait_until(lambda: list(tmp_path.rglob("metrics.csv")), process, "training")
        workers = spawned_workers(process.pid)
        assert len(workers) == 2
        process.kill()
        process.wait()
        deadline = time.time() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        kill_group(process)


@pytest.mark.slow
def test_tensorboard_logger_runs_or_names_its_package(tmp_path):

    installed = any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX"))
    result = run_train(
        ["logger=tensorboard", *FAST[1:], "trainer.max_steps=2", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        check=False,
        timeout=300,
    )
    if installed:
        assert result.returncode == 0, result.stderr[-2000:]
        assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    else:
        assert result.returncode == 2 and "pip install tensorboard" in result.stderr
