"""Faults a long run meets, injected as a user would meet them: a diverged run stops with one line
(exit 3) before a NaN is applied, logged as a finite number or saved, and the checkpoints before it
survive; a checkpoint of non-finite state is never written; logs hold only the steps they measured."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import FAST, run_train

from curry_train.cli.export import consolidated_model_state
from curry_train.primitives import dcp

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
    (kept,) = dcp.checkpoints_in(tmp_path / "checkpoints")
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
    assert dcp.checkpoints_in(tmp_path / "checkpoints") == []  # the end-of-training save never ran


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
    """trainer.log_every_n_steps=3: rows at steps 2 and 5, none repeating them at the steps between."""
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
    assert [row["step"] for row in metric_rows(tmp_path)] == ["2", "5"]
