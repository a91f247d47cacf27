"""Saves in the background (``checkpoint.async_mode``): the same curve and the same checkpoints as saves
that stall training; a checkpoint is complete only when all of it is, so a run killed at any moment of a
background write resumes from the newest complete one on the uninterrupted curve; a save that cannot be
written (a full disk) fails in one line and keeps the checkpoint before it."""

from __future__ import annotations

import errno
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, STEPS, assert_same_curve, kill_group, read_metric, start_train, train, wait_until
from omegaconf import OmegaConf

from curry_train.checkpoint import dcp, files
from curry_train.checkpoint.background import BackgroundSaver
from curry_train.checkpoint.dcp import CheckpointWriteError, Retention, consolidated_model_state
from curry_train.config import ConfigError, compose
from curry_train.config.checks import check

EVERY_STEP = ("checkpoint.every_n_steps=1", "checkpoint.keep_last=3")


def _same_checkpoints(a: Path, b: Path) -> None:
    """The same complete checkpoints, holding the same model tensors, bit for bit."""
    names = [p.name for p in files.checkpoints_in(a / "checkpoints")]
    assert names == [p.name for p in files.checkpoints_in(b / "checkpoints")] and names
    for name in names:
        assert files.verify(b / "checkpoints" / name) is None
        first, second = (consolidated_model_state(run / "checkpoints" / name) for run in (a, b))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first), name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_background_saves_every_step_change_nothing(pools, single_process_curve, tmp_path, mode):
    """1 process and fsdp 2, saving every step: the losses equal those of saves that stall training, bit for
    bit, and so do the checkpoints (each written while the next steps changed the parameters: staging
    copies them). The fsdp checkpoint resumes in one process on the reference curve."""
    for name, layout in (("single", []), ("fsdp2", ["parallel=fsdp", "trainer.devices=2"])):
        common = [*FAST, "trainer.max_steps=6", *EVERY_STEP, *layout]
        stalled = train(pools, common, tmp_path / f"{name}-off")
        background = train(pools, [*common, f"checkpoint.async_mode={mode}"], tmp_path / f"{name}-{mode}")
        assert read_metric(background) == read_metric(stalled)
        assert_same_curve(read_metric(background), {s: single_process_curve[s] for s in range(6)})
        _same_checkpoints(stalled, background)
    last = files.checkpoints_in(tmp_path / f"fsdp2-{mode}" / "checkpoints")[-1]
    resumed = train(pools, [*FAST, f"trainer.max_steps={STEPS}", f"ckpt_path={last}"], tmp_path / "resumed")
    assert_same_curve(read_metric(resumed), {s: single_process_curve[s] for s in range(6, STEPS)})


@pytest.mark.slow
def test_a_run_killed_during_background_writes_resumes_from_the_newest_complete(single_process_curve, tmp_path):
    """kill -9 to the whole job at random moments while it saves every step in the background: what is
    left is complete checkpoints and at most one unfinished ``.tmp``; the same command with ckpt_path=auto
    resumes the newest complete one and the run's metrics are the uninterrupted curve (1e-5)."""
    chance = random.Random(int(os.environ.get("CURRY_TEST_SEED", "0")) or None)
    for trial, (early, late) in enumerate([(0.0, 0.3), (0.3, 0.6)]):  # a kill in each half of the window
        run_dir = tmp_path / f"trial-{trial}"
        common = [*FAST, f"trainer.max_steps={STEPS}", *EVERY_STEP, "checkpoint.async_mode=thread"]
        process = start_train([*common, f"hydra.run.dir={run_dir}"], tmp_path)
        try:
            wait_until(lambda run_dir=run_dir: (run_dir / "checkpoints").is_dir(), process, "the first save")
            time.sleep(chance.uniform(early, late))
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=60)
        finally:
            kill_group(process)
        left = files.checkpoints_in(run_dir / "checkpoints")
        assert all(files.verify(path) is None for path in left)
        assert len([p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(files.TMP_SUFFIX)]) <= 1
        resumed = start_train([*common, "ckpt_path=auto", f"hydra.run.dir={run_dir}"], tmp_path)
        _, stderr = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, stderr[-3000:]
        assert_same_curve(read_metric(run_dir), single_process_curve)
        assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(files.TMP_SUFFIX)]


class _Module(torch.nn.Module):  # as the LightningModule holds the model: under ``model``
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _state(tmp_path: Path):
    model = _Module()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    return model, [optimizer], tmp_path / "run" / "checkpoints"


def test_a_full_disk_is_one_line_with_the_bytes_and_keeps_the_checkpoint_before(tmp_path, monkeypatch):
    """Too little room (as the file system reports it): refused before anything is written. Room that
    runs out during the write (torch.save's "unexpected pos" from a short write): the same one line, the
    unfinished directory removed, the checkpoint before it still the newest complete one."""
    model, optimizers, directory = _state(tmp_path)
    first = dcp.save(directory / "step-00000001", model, optimizers, {"global_step": 1})
    real = dcp.shutil.disk_usage
    monkeypatch.setattr(dcp.shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    with pytest.raises(CheckpointWriteError) as full:
        dcp.save(directory / "step-00000002", model, optimizers, {"global_step": 2})
    line = str(full.value)
    assert "\n" not in line and line.startswith(f"{directory}: the disk is full: the checkpoint of step 2 needs about")
    assert "MiB on this rank, 0.0 MiB free" in line and f"the newest complete checkpoint stays {first}" in line
    monkeypatch.setattr(dcp.shutil, "disk_usage", real)

    def short_write(obj, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")

    monkeypatch.setattr(dcp.torch, "save", short_write)
    with pytest.raises(CheckpointWriteError, match=r"the disk is full: the checkpoint of step 3 needs about"):
        dcp.save(directory / "step-00000003", model, optimizers, {"global_step": 3})
    assert files.checkpoints_in(directory) == [first] and sorted(p.name for p in directory.iterdir()) == [first.name]


def test_a_failed_background_write_is_raised_when_the_ranks_wait_and_prunes_nothing(tmp_path, monkeypatch):
    """A denied write in the background: polling at each step does not raise it (each rank would notice
    at another step, and leave the others in a collective); the next wait, which every rank reaches at
    the same step, does. Retention, which runs only after a save is complete, deleted nothing."""
    model, optimizers, directory = _state(tmp_path)
    saver = BackgroundSaver("thread")
    retention = Retention(keep_last=1)
    for step in (1, 2):
        staged = dcp.stage(directory / files.checkpoint_name(step), model, optimizers, {"global_step": step})
        saver.save(staged, retention)
        assert saver.wait() is not None
    (kept,) = files.checkpoints_in(directory)
    assert kept.name == "step-00000002" and saver.written and len(saver.written) == 2

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(dcp.dcp, "save", denied)
    saver.save(dcp.stage(directory / files.checkpoint_name(3), model, optimizers, {"global_step": 3}), retention)
    deadline = time.time() + 30
    while not saver._inflight.future.done() and time.time() < deadline:
        saver.poll()
        time.sleep(0.01)
    saver.poll()  # done, failed: not raised here
    with pytest.raises(CheckpointWriteError, match=r"step 3 could not be written \(Permission denied\)") as failed:
        saver.wait()
    assert "the newest complete checkpoint stays" in str(failed.value)
    assert files.checkpoints_in(directory) == [kept]
    saver.close()


def test_staging_copies_what_the_next_step_changes(tmp_path):
    """A staged save holds the parameters of its step, whatever the step after it does to them."""
    model, optimizers, directory = _state(tmp_path)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    staged = dcp.stage(directory / "step-00000001", model, optimizers, {"global_step": 1})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    dcp.write(staged)
    saved = consolidated_model_state(directory / "step-00000001")
    assert all(torch.equal(saved[key], before[key]) for key in before)


def test_retention_keeps_the_last_and_every_nth(tmp_path):
    model, optimizers, directory = _state(tmp_path)
    for step in range(1, 8):
        dcp.save(
            directory / files.checkpoint_name(step), model, optimizers, {"global_step": step}, retention=Retention(2, 3)
        )
    assert [files.step_of(p) for p in files.checkpoints_in(directory)] == [3, 6, 7]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["checkpoint.async_mode=yes"], r"checkpoint\.async_mode='yes': expected one of off, thread, process"),
        (["checkpoint.keep_every=-1"], r"checkpoint\.keep_every=-1 must be >= 0"),
    ],
)
def test_bad_checkpoint_settings_are_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check(compose(["logger=csv", *overrides]), env={}, run_dir=tmp_path)


def test_the_config_documents_the_new_keys():
    checkpoint = OmegaConf.to_container(compose().checkpoint)
    assert checkpoint["async_mode"] == "off" and checkpoint["keep_every"] == 0
