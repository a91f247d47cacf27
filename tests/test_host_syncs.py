"""The steady state of training reads the device at most once per logged step (``curry_train.module``),
counted on CPU by ``curry_train.validation.host_syncs``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from conftest import FAST

from curry_train import module
from curry_train.config import compose
from curry_train.config.checks import check
from curry_train.config.schema import Config
from curry_train.runner import fit
from curry_train.train_step import NonFiniteError
from curry_train.validation.host_syncs import HostReads, SyncCount

TINY = [*FAST, "model.dim=32", "model.n_layers=2", "model.ffn_dim=64", "data.global_batch_size=4"]


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.ones(3)
    with HostReads() as reads:
        assert t.sum().item() == 3.0
        assert bool(t[0] > 0) and float(t[1]) == 1.0 and int(t[2]) == 1
        assert t.tolist() == [1.0, 1.0, 1.0] and t.cpu() is t
        assert torch.equal(t, t)
        t.add_(1)  # not a read
    assert len(reads.reads) == 7, reads.reads
    assert all("test_host_syncs.py" in read for read in reads.reads)
    assert torch.Tensor.tolist is not reads._counting  # unpatched after


def count(*overrides: str, steps: int = 10, after: int = 3):
    cfg = compose([*TINY, f"trainer.max_steps={steps}", *overrides])
    plan = check(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        return fit(Config.of(cfg), Path(run_dir), plan, SyncCount(after=after))


def test_one_host_read_per_logged_step_and_none_between():
    steps = count("trainer.log_every_n_steps=3", "trainer.skip_nonfinite_steps=2")
    assert [step for step, _, _ in steps] == list(range(3, 9))  # the last step (the run's end) left out
    for step, logged, reads in steps:
        assert len(reads) == (1 if logged else 0), (step, logged, reads)
    assert sum(logged for _, logged, _ in steps) == 2


def test_logging_every_step_reads_once_a_step_with_the_progress_bar_on():
    steps = count("trainer.log_every_n_steps=1", "trainer.enable_progress_bar=true", steps=6)
    assert steps and all(logged and len(reads) == 1 for _, logged, reads in steps), steps


DIVERGE = ("optim.lr=1e4", "optim.grad_clip=0")  # NaN gradients from step 1 (tests/test_faults.py)


class Parameters(SyncCount):
    """The measurement that keeps the module, to look at its parameters after the run stopped."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.module = pl_module


@pytest.mark.parametrize("fused", [True, False], ids=["skipped-on-the-device", "read-each-step"])
def test_a_non_finite_step_found_at_the_logged_step_was_never_applied(monkeypatch, fused):
    """Log every 3 steps, one skip allowed: steps 1 and 2 diverge; the run stops at the logged step
    naming step 2 (the one past the allowance), and no parameter took a non-finite update. Without a
    fused optimizer (read-each-step) the same line comes at step 2 itself."""
    if not fused:
        monkeypatch.setattr(module, "fused_supported", lambda params: False)
    measurement = Parameters(after=100)
    cfg = compose(
        [*TINY, *DIVERGE, "trainer.max_steps=9", "trainer.log_every_n_steps=3", "trainer.skip_nonfinite_steps=1"]
    )
    with tempfile.TemporaryDirectory() as run_dir, pytest.raises(NonFiniteError) as stopped:
        fit(Config.of(cfg), Path(run_dir), check(cfg), measurement)
    assert "non-finite gradient norm (nan) at step 2: stopped before applying it" in str(stopped.value)
    assert "1 step(s) skipped before, trainer.skip_nonfinite_steps=1" in str(stopped.value)
    optimizer = measurement.module.optimizers().optimizer
    assert optimizer.defaults["fused"] is fused
    assert all(torch.isfinite(p).all() for p in measurement.module.model.parameters())
    assert measurement.module.trainer.global_step == (3 if fused else 2)


class SettleAtStep2(Parameters):
    """Settles at the end of step 2, between logged steps, as a checkpoint's save does."""

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == 2:
            pl_module.settle()


@pytest.mark.parametrize("fused", [True, False], ids=["skipped-on-the-device", "read-each-step"])
def test_skips_settled_between_logged_steps_within_the_allowance_let_the_run_go_on(monkeypatch, fused):
    """Every step from 1 on diverges, ten skips allowed, logged every 3: the skips settled before a logged
    step (by a save's settle, or at each step without a fused optimizer) are that interval's, so its NaN
    loss is no reason to stop; all five are counted and none applied."""
    if not fused:
        monkeypatch.setattr(module, "fused_supported", lambda params: False)
    measurement = SettleAtStep2(after=100)
    allowed = ("trainer.max_steps=6", "trainer.log_every_n_steps=3", "trainer.skip_nonfinite_steps=10")
    cfg = compose([*TINY, *DIVERGE, *allowed])
    with tempfile.TemporaryDirectory() as run_dir:
        fit(Config.of(cfg), Path(run_dir), check(cfg), measurement)
    lightning_module = measurement.module
    assert lightning_module.trainer.global_step == 6 and lightning_module.step.skipped_steps == 5
    assert all(torch.isfinite(p).all() for p in lightning_module.model.parameters())
