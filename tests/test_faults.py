"""Faults a long run meets, injected as a user would meet them: a diverged run stops with one line
(exit 3) before a NaN is applied, logged as a finite number or saved, and the checkpoints before it
survive; a checkpoint of non-finite state is never written; logs hold only the steps they measured."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import pickle
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from conftest import FAST, kill_group, run_train, spawned_workers, start_train, wait_until
from omegaconf import OmegaConf

from curry_train.checkpoint import dcp, files
from curry_train.checkpoint.dcp import consolidated_model_state
from curry_train.cli import export as export_cli
from curry_train.config import ConfigError, compose
from curry_train.config.resume import resolve
from curry_train.exits import EXIT_BAD_INPUT
from curry_train.stragglers import RankTimes, report
from curry_train.watchdog import is_collective_timeout

DIVERGE = ("optim.lr=1e4", "optim.grad_clip=0", "trainer.max_steps=20")  # NaN gradients from step 1


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open() as rows:
        return list(csv.DictReader(rows))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "curry-train: error:" in line]


@pytest.mark.slow
def test_a_diverged_run_stops_in_one_line_and_keeps_its_good_checkpoints(tmp_path):
    result = run_train(
        [
            *FAST,
            *DIVERGE,
            "trainer.devices=2",
            "checkpoint.every_n_steps=1",
            "checkpoint.keep_last=2",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)  # one line, from rank 0 only
    assert "non-finite gradient norm (nan) at step 1: stopped before applying it" in line
    assert f"the last good checkpoint: {tmp_path / 'checkpoints' / 'step-00000001'}" in line
    rows = metric_rows(tmp_path)
    assert [row["step"] for row in rows] == ["0"]  # the diverged step is not logged as a finite one
    assert all(math.isfinite(float(row["train/loss"])) and float(row["train/loss"]) > 1 for row in rows)
    (kept,) = files.checkpoints_in(tmp_path / "checkpoints")
    assert kept.name == "step-00000001"
    assert all(torch.isfinite(tensor).all() for tensor in consolidated_model_state(kept).values())


@pytest.mark.slow
def test_skipped_steps_are_logged_as_they_were_and_counted(tmp_path):
    result = run_train(
        [*FAST, *DIVERGE, "trainer.skip_nonfinite_steps=2", "checkpoint.every_n_steps=0", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 3
    (line,) = error_lines(result.stderr)
    assert "at step 3" in line and "2 step(s) skipped before, trainer.skip_nonfinite_steps=2" in line
    rows = {row["step"]: row for row in metric_rows(tmp_path)}
    assert sorted(rows) == ["0", "1", "2"]
    assert math.isfinite(float(rows["0"]["train/grad_norm"])) and rows["0"]["train/skipped_steps"] == ""
    for step, skipped in (("1", "1.0"), ("2", "2.0")):
        assert math.isnan(float(rows[step]["train/grad_norm"])) and rows[step]["train/skipped_steps"] == skipped
    assert (result.stdout + result.stderr).count("step skipped") == 2  # one warning each, on rank 0
    assert files.checkpoints_in(tmp_path / "checkpoints") == []  # the end-of-training save never ran


def test_a_checkpoint_of_non_finite_state_is_not_written(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    assert dcp.state_is_finite(model, [optimizer])
    with torch.no_grad():
        model.weight[1, 2] = float("inf")
    assert not dcp.state_is_finite(model, [optimizer])
    with pytest.raises(dcp.NonFiniteStateError, match="step-00000007: the model or optimizer state holds NaN"):
        dcp.save(tmp_path / "step-00000007", model, [optimizer], {})
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary directory


@pytest.mark.slow
def test_rows_only_at_logged_steps(tmp_path):
    """trainer.log_every_n_steps=3: rows at steps 2 and 5 and at the last (6), none repeating them at the
    steps between."""
    run_train(
        [
            *FAST,
            "trainer.max_steps=7",
            "trainer.log_every_n_steps=3",
            "checkpoint.save_on_end=false",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert [row["step"] for row in metric_rows(tmp_path)] == ["2", "5", "6"]


# ----------------------------------------------------------------------------------------------
# Safe, verified checkpoints


def _saved(tmp_path: Path, steps=(2, 4)) -> list[Path]:
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    config = compose(["data.seq_len=64"])
    container = OmegaConf.to_container(config, resolve=True)
    return [
        dcp.save(
            tmp_path / "run" / "checkpoints" / files.checkpoint_name(s),
            model,
            [optimizer],
            {"global_step": s},
            container,
        )
        for s in steps
    ]


def test_verify_names_what_is_missing_cut_short_or_altered(tmp_path):
    (path,) = _saved(tmp_path, (2,))
    assert files.is_checkpoint(path) and files.verify(path) is None
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    middle = slice(len(data) // 2, len(data) // 2 + 4096)
    data[middle] = bytes(b ^ 0xFF for b in data[middle])  # 4 KiB of garbage inside a shard: same size
    shard.write_bytes(bytes(data))
    assert files.verify(path, digests=False) is None  # the size alone cannot tell
    assert files.verify(path) == f"{shard}: its contents differ from when it was saved (digest mismatch)"
    shard.write_bytes(bytes(data[:-10]))
    assert files.verify(path, digests=False).startswith(f"{shard}: {len(data) - 10} bytes, the manifest says")
    shard.unlink()
    assert files.verify(path) == f"{shard}: missing"
    (path / files.MANIFEST_FILE).unlink()
    assert "incomplete" in files.verify(path) and not files.is_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_crafted_checkpoint_file_cannot_run_code(tmp_path):
    (path,) = _saved(tmp_path, (2,))
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")
    torch.save({"global_step": 2, "x": payload}, path / files.META_FILE)
    model = torch.nn.Linear(8, 8)
    with pytest.raises(files.CheckpointError, match="meta.pt: not loadable as plain data"):
        dcp.load(path, model, [torch.optim.AdamW(model.parameters())])
    assert not (tmp_path / "pwned").exists()


def test_a_crafted_dcp_metadata_cannot_run_code_on_resume_or_export(tmp_path, capsys):
    """DCP's .metadata is a pickle: one that calls Path.touch, with the manifest's digest rewritten to
    match (so verify passes), is refused on resume and by curry-export, naming the file and the call."""
    (path,) = _saved(tmp_path, (2,))
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")
    metadata = path / files.DCP_METADATA
    genuine = metadata.read_bytes()
    metadata.write_bytes(pickle.dumps(payload))
    manifest = json.loads((path / files.MANIFEST_FILE).read_text())
    manifest["files"].update(files.describe_files([metadata]))
    (path / files.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert files.verify(path) is None  # a forger's checkpoint passes the digests
    model = torch.nn.Linear(8, 8)
    with pytest.raises(files.CheckpointError, match=r"\.metadata: refers to pathlib\.\w*Path\.touch"):
        dcp.load(path, model, [torch.optim.AdamW(model.parameters())])
    capsys.readouterr()
    assert export_cli.main([str(path), "--output", str(tmp_path / "out.safetensors")]) == EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("export_checkpoint: error:") and "may not run code" in line
    assert not (tmp_path / "pwned").exists()
    metadata.write_bytes(genuine)  # the genuine metadata still loads
    dcp.load(path, model, [torch.optim.AdamW(model.parameters())])


def test_bytes_in_a_checkpoint_cannot_run_code(tmp_path):
    """What DCP stores as bytes (any non-tensor value) it reads back with weights_only=False: a pickle
    there that calls Path.touch is refused by SafeLoadPlanner instead, naming the key."""
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")
    torch_dcp.save({"model": {"w": torch.ones(2)}, "extra": payload}, checkpoint_id=tmp_path / "forged", no_dist=True)
    state = {"model": {"w": torch.zeros(2)}, "extra": None}
    with pytest.raises(files.CheckpointError, match=r"extra: not loadable as plain data"):
        dcp._load(state, tmp_path / "forged", no_dist=True)
    assert not (tmp_path / "pwned").exists()
    plain = {"model": {"w": torch.ones(2)}, "extra": "adamw"}
    torch_dcp.save(plain, checkpoint_id=tmp_path / "plain", no_dist=True)
    dcp._load(state, tmp_path / "plain", no_dist=True)  # plain values still load
    assert state["extra"] == "adamw" and torch.equal(state["model"]["w"], torch.ones(2))


def test_curry_export_to_a_path_it_cannot_write_is_one_line(tmp_path, capsys):
    (path,) = _saved(tmp_path, (2,))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = ((blocker / "out.safetensors", "is not a directory"), (tmp_path, "exists and is a directory"))
    for output, problem in cases:
        capsys.readouterr()
        assert export_cli.main([str(path), "--output", str(output)]) == EXIT_BAD_INPUT
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"export_checkpoint: error: --output {output}:") and problem in line, line


def test_last_skips_a_corrupt_checkpoint_and_auto_starts_fresh_without_one(tmp_path, caplog):
    older, newer = _saved(tmp_path)
    run_dir = tmp_path / "run"
    shard = newer / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one bit flipped by a disk or a network: the same size, another digest
    shard.write_bytes(bytes(data))
    cfg = compose(["data.seq_len=64", "ckpt_path=last", f"checkpoint.search_dir={tmp_path / 'none'}"])
    with caplog.at_level(logging.WARNING):
        assert resolve(cfg, run_dir) == str(older.resolve())
    assert f"skipping checkpoint {newer}" in caplog.text
    with pytest.raises(ConfigError, match="__0_0.distcp"):
        resolve(compose(["data.seq_len=64", f"ckpt_path={newer}"]), run_dir)
    assert resolve(compose(["data.seq_len=64", "ckpt_path=auto"]), tmp_path / "elsewhere") is None


def _run_checkpoint(root: Path, run: str, overrides=(), step: int = 2, resumed_from: Optional[Path] = None) -> Path:
    model = torch.nn.Linear(8, 8)
    config = OmegaConf.to_container(compose(["data.seq_len=64", *overrides]), resolve=True)
    lineage = {"resumed_from": str(resumed_from) if resumed_from else None}
    path = root / run / "checkpoints" / files.checkpoint_name(step)
    return dcp.save(
        path, model, [torch.optim.AdamW(model.parameters())], {"global_step": step}, config, lineage=lineage
    )


def test_last_resumes_only_the_one_run_that_trains_the_same_thing(tmp_path, caplog):
    """ckpt_path=last from a new run directory: a run of other optimizer settings is never taken (the
    refusal suggests no other run); the one run of the same math is, named; two unrelated ones are
    refused with both listed; a run and the run that resumed it are one run, the later one taken."""
    outputs, new_run = tmp_path / "outputs", tmp_path / "outputs" / "new"
    last = ["data.seq_len=64", "ckpt_path=last", f"checkpoint.search_dir={outputs}"]
    other = _run_checkpoint(outputs, "other-lr", ["optim.lr=1e-4"], step=8)
    with pytest.raises(ConfigError) as refused:
        resolve(compose(last), new_run)
    message = str(refused.value)
    assert "optim.lr=0.0001 (now 0.003)" in message and message.endswith("(ckpt_path=PATH)"), message
    assert "allow_config_change" not in message and f"ckpt_path={other}" not in message
    first = _run_checkpoint(outputs, "first", step=4)
    with caplog.at_level(logging.WARNING):
        assert resolve(compose(last), new_run) == str(first.resolve())
    assert f"of the run saved in {first.parent} " in caplog.text
    rival = _run_checkpoint(outputs, "rival", step=3)
    with pytest.raises(ConfigError, match="2 runs under .* none continues") as ambiguous:
        resolve(compose(last), new_run)
    assert str(first.resolve()) in str(ambiguous.value) and str(rival.resolve()) in str(ambiguous.value)
    rival.parent.parent.rename(tmp_path / "rival")  # away: one lineage again
    second = _run_checkpoint(outputs, "second", step=6, resumed_from=first)
    third = _run_checkpoint(outputs, "third", step=9, resumed_from=second)
    assert resolve(compose(last), new_run) == str(third.resolve())
    # a rerun in place records what its run continued, not itself
    assert files.lineage((third.resolve(), str(second)), outputs / "third" / "checkpoints" / "step-00000012") == str(
        second
    )
    assert files.lineage((third.resolve(), str(second)), new_run / "checkpoints" / "step-00000012") == str(
        third.resolve()
    )


def test_a_checkpoint_of_other_math_is_refused_unless_allowed(tmp_path):
    (path,) = _saved(tmp_path, (2,))
    with pytest.raises(ConfigError, match=r"data.seq_len=64 \(now 128\), seed=1234 \(now 7\)"):
        resolve(compose(["data.seq_len=128", "seed=7", f"ckpt_path={path}"]), None)
    allowed = ["data.seq_len=128", "checkpoint.allow_config_change=true", f"ckpt_path={path}"]
    assert resolve(compose(allowed), None) == str(path.resolve())
    # another shape is refused even when told: half the checkpoint's layers would be dropped
    with pytest.raises(ConfigError, match=r"another shape: model\.n_layers=4 \(now 2\); its weights fit only"):
        resolve(compose([*allowed, "model.n_layers=2"]), None)
    # Another layout, more steps, another learning rate or micro-batch: the same run, resumed.
    same = ["data.seq_len=64", "parallel=fsdp", "trainer.max_steps=999", "optim.lr=1e-4", "data.micro_batch_size=2"]
    assert resolve(compose([*same, f"ckpt_path={path}"]), None) == str(path.resolve())


@pytest.mark.slow
def test_a_rerun_of_the_same_command_resumes_in_place_on_the_same_curve(tmp_path):
    """A re-run with ckpt_path=auto in the same run directory (a requeued job): it skips a corrupt
    newest checkpoint, removes an interrupted save's debris, keeps the metrics rows before the step
    it resumes from and continues on the uninterrupted curve."""
    common = [*FAST, "checkpoint.every_n_steps=2", "ckpt_path=auto", f"hydra.run.dir={tmp_path}"]
    run_train([*common, "trainer.max_steps=6"], cwd=tmp_path)
    first = {row["step"]: row["train/loss"] for row in metric_rows(tmp_path)}
    newest = tmp_path / "checkpoints" / "step-00000006"
    shard = newest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100:110] = bytes(b ^ 0xFF for b in data[100:110])
    shard.write_bytes(bytes(data))
    (tmp_path / "checkpoints" / "step-00000008.tmp").mkdir()
    result = run_train([*common, "trainer.max_steps=8"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert f"skipping checkpoint {newest}" in output and "resuming from" in output and "step-00000004" in output
    assert not (tmp_path / "checkpoints" / "step-00000008.tmp").exists()
    rows = metric_rows(tmp_path)
    assert [row["step"] for row in rows] == [str(s) for s in range(8)]
    for row in rows[:6]:  # steps 4 and 5 trained again from step 4's checkpoint: the same losses
        assert row["train/loss"] == first[row["step"]], row


# ----------------------------------------------------------------------------------------------
# Preemption and interruption


# A job under a scheduler that handles SIGUSR1 itself, as submitit does (it requeues the job from its
# handler): the handler records when it ran.
SCHEDULED_JOB = """
import signal, sys, time
from pathlib import Path
marker = Path(sys.argv.pop(1))
signal.signal(signal.SIGUSR1, lambda signum, frame: marker.write_text(f"{signum} {time.time()}"))
from curry_train.cli.train import main
main()
"""


def _wait_for_steps(process: subprocess.Popen, run_dir: Path, steps: int) -> None:
    def reached() -> bool:
        return (run_dir / "csv" / "metrics.csv").is_file() and len(metric_rows(run_dir)) >= steps

    wait_until(reached, process, f"step {steps}")


@pytest.mark.slow
@pytest.mark.parametrize("signum, devices", [(signal.SIGTERM, 2), (signal.SIGUSR1, 1)])
def test_preemption_saves_the_current_step_and_exits_75(signum, devices, tmp_path):
    """SIGTERM to the launcher of 2 workers (it passes the signal on), SIGUSR1 to a one-process run
    under a scheduler's SIGUSR1 handler: the step in flight finishes, its checkpoint is saved, the
    scheduler's handler gets the signal after the save, the job exits 75; ckpt_path=auto continues. The
    2-worker run saves every other step in the background: the preemption waits for the save in flight,
    writes its own whole, and says how long that took."""
    saves = ["checkpoint.every_n_steps=1000"]
    if devices == 2:
        saves = ["checkpoint.every_n_steps=2", "checkpoint.keep_last=1", "checkpoint.async_mode=thread"]
    common = [*FAST, f"trainer.devices={devices}", *saves, f"hydra.run.dir={tmp_path}"]
    marker = tmp_path / "scheduler-handled"
    if signum == signal.SIGUSR1:
        (tmp_path / "job.py").write_text(SCHEDULED_JOB)
        process = start_train([str(marker), *common, "trainer.max_steps=1000"], tmp_path, tmp_path / "job.py")
    else:
        process = start_train([*common, "trainer.max_steps=1000"], tmp_path)
    try:
        _wait_for_steps(process, tmp_path, 3)
        os.kill(process.pid, signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        kill_group(process)
    assert process.returncode == 75, stderr[-3000:]
    (saved,) = files.checkpoints_in(tmp_path / "checkpoints")
    stopped = dcp.saved_step(saved)
    assert [int(row["step"]) for row in metric_rows(tmp_path)][-1] == stopped - 1  # the last step run is saved
    if signum == signal.SIGUSR1:  # passed on once the checkpoint was complete
        handled_signal, handled_at = marker.read_text().split()
        assert int(handled_signal) == signum and float(handled_at) >= (saved / "manifest.json").stat().st_mtime
    (line,) = [line for line in stderr.splitlines() if "curry-train: preempted" in line]
    assert f"{signal.Signals(signum).name}: stopped after step {stopped}" in line and str(saved) in line
    if devices == 2:
        log = (tmp_path / "train.log").read_text()
        waited = r"(waited [\d.]+ s for the save in flight, then )?"
        saved_line = rf"checkpoint saved: {re.escape(str(saved))} \({waited}saved in [\d.]+ s\), preempted"
        assert re.search(saved_line, log), log[-2000:]
    result = run_train([*common, f"trainer.max_steps={stopped + 2}", "ckpt_path=auto"], cwd=tmp_path)
    assert f"resuming from {saved}" in result.stdout + result.stderr
    assert [int(row["step"]) for row in metric_rows(tmp_path)] == list(range(stopped + 2))


@pytest.mark.slow
def test_sigint_to_the_launcher_ends_its_workers_within_seconds(tmp_path):
    process = start_train([*FAST, "trainer.devices=2", "trainer.max_steps=1000", f"hydra.run.dir={tmp_path}"], tmp_path)
    try:
        _wait_for_steps(process, tmp_path, 2)
        workers = spawned_workers(process.pid)
        assert len(workers) == 2
        os.kill(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        deadline = time.time() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        kill_group(process)
    assert process.returncode == 130 and "curry-train: interrupted" in stderr
    assert "Traceback" not in stderr


def _stop_rank_one(overrides: list[str], run_dir: Path) -> tuple[subprocess.Popen, str, float]:
    """Two workers train; after step 2 the second is stopped (SIGSTOP). Returns the ended job, its stderr
    and the seconds from the stop to its end."""
    args = [*FAST, "trainer.devices=2", "trainer.max_steps=5000", *overrides, f"hydra.run.dir={run_dir}"]
    process = start_train(args, run_dir)
    try:
        _wait_for_steps(process, run_dir, 2)
        os.kill(sorted(spawned_workers(process.pid))[1], signal.SIGSTOP)
        began = time.time()
        _, stderr = process.communicate(timeout=120)
        return process, stderr, time.time() - began
    finally:
        for pid in spawned_workers(process.pid) if process.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        kill_group(process)


@pytest.mark.slow
def test_a_stopped_rank_is_named_and_the_job_ends(tmp_path):
    """SIGSTOP one of two workers: within trainer.hang_timeout (plus the stacks' dump and the
    workers' shutdown) the job ends with status 4, names rank 1, and rank 0's stacks are on disk."""
    process, stderr, ended = _stop_rank_one(["trainer.hang_timeout=4"], tmp_path)
    assert process.returncode == 4, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if "no rank advanced" in line]
    assert "rank(s) 1 stopped beating" in line and str(tmp_path / "stacks-rank00000.txt") in line
    assert "File" in (tmp_path / "stacks-rank00000.txt").read_text()
    # Rank 0's flight recorder names the collective it waits in for rank 1, and holds the step's others.
    assert re.search(r"the others wait in gloo:\w+ #\d+ of \S+ \(flight-rank\*\.json\)", line), line
    entries = json.loads((tmp_path / "flight-rank00000.json").read_text())["entries"]
    assert len(entries) > 10 and all(entry["profiling_name"].startswith("gloo:") for entry in entries)
    assert ended < 4 + 60


@pytest.mark.slow
def test_a_stopped_rank_is_named_when_the_collective_timeout_fires_first(tmp_path):
    """trainer.timeout below the watchdog's: the collective's timeout ends the job, and the one line
    names the stopped rank from the heartbeats, not gloo's traceback blaming the rank that waited."""
    process, stderr, _ = _stop_rank_one(["trainer.timeout=3"], tmp_path)
    assert process.returncode == 4, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert "a collective waited trainer.timeout=3 s for its peers: rank(s) 1 stopped beating" in line, line
    assert "Traceback" not in stderr, stderr[-3000:]


@pytest.mark.parametrize(
    "text, timed_out",
    [
        ("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 3000ms for recv operation to complete", True),
        # gloo closes every pair after a timeout: an operation in flight beside the one that timed out
        # (here DDP's bucket all-reduce, reported through its comm hook's callback) reads this instead
        (
            "Got the following error when running the callback: RuntimeError: Application timeout caused pair"
            " closure\n\nAt:\n  curry_train/primitives/data_parallel.py(25): <lambda>",
            True,
        ),
        ("NCCL watchdog: collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE)", True),
        ("Connection closed by peer [127.0.0.1]:29500", False),  # a peer that died: the launcher names it
        ("CUDA out of memory", False),
    ],
)
def test_a_collective_timeout_is_told_from_other_errors(text, timed_out):
    assert is_collective_timeout(RuntimeError(text)) is timed_out
    assert not is_collective_timeout(ValueError(text))


def test_the_straggler_report_names_the_late_rank():
    """Lateness is measured per collective against the earliest rank that issued it; a rank late on
    every collective is named, jitter below the floor is not."""

    def times(rank: int, late_ns: int) -> RankTimes:
        return RankTimes(rank, 10, 5.0, [("0", seq, seq * 10**9 + late_ns) for seq in range(1, 51)])

    line = report([times(0, 0), times(1, 40_000_000), times(2, 1_000_000), times(3, 500_000)])
    assert "0: 0.0, 1: 40.0, 2: 1.0, 3: 0.5" in line and line.endswith("the others wait for rank(s) 1"), line
    assert report([times(0, 0), times(1, 2_000_000)]).endswith("no straggler")
    assert "no lateness measured" in report([RankTimes(0, 1, 1.0), RankTimes(1, 1, 1.0)])


@pytest.mark.slow
def test_a_rank_held_back_is_named_in_the_straggler_report(tmp_path):
    """Rank 1 of 2 is stopped for 0.3 s of every 0.4 s while it trains: the others wait for it, the run
    still ends normally, and its last lines name rank 1 as the one waited for."""
    process = start_train([*FAST, "trainer.devices=2", "trainer.max_steps=40", f"hydra.run.dir={tmp_path}"], tmp_path)
    try:
        _wait_for_steps(process, tmp_path, 2)
        rank1 = sorted(spawned_workers(process.pid))[1]
        while process.poll() is None and len(metric_rows(tmp_path)) < 30:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank1, signal.SIGSTOP)
                time.sleep(0.3)
                os.kill(rank1, signal.SIGCONT)
            time.sleep(0.1)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        kill_group(process)
    assert process.returncode == 0, stderr[-3000:]
    (line,) = [line for line in (stdout + stderr).splitlines() if "straggler report" in line]
    assert line.endswith("the others wait for rank(s) 1"), line
