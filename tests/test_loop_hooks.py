"""The loop's own cost (``curry-bench --loop``): Lightning's hooks around each batch's transfer, each
micro-batch's backward and each optimizer step are dispatched only where the module, the datamodule or a
callback implements them (``CurryStrategy._implemented``), and the run's metrics.csv keeps its file open
(``run.MetricsCsv``). Both must change nothing a user sees."""

from __future__ import annotations

import csv
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import FAST
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer import call

from curry_train import module
from curry_train.callbacks import StepProgressBar
from curry_train.config import compose
from curry_train.config.checks import check
from curry_train.config.schema import Config
from curry_train.run import MetricsCsv
from curry_train.runner import Measurement, fit

# 3 steps of 2 micro-batches each
TINY = [*FAST, "model.dim=32", "model.n_layers=2", "model.ffn_dim=64", "data.global_batch_size=8"]
STEPS, MICRO = 3, 2
PRUNED = ("on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_after_batch_transfer")


class Run(Measurement):
    def __init__(self, *callbacks: Callback) -> None:
        self.callbacks = list(callbacks)

    def result(self, trainer):
        return trainer.global_step


@pytest.fixture
def dispatched(monkeypatch) -> Counter:
    """The names of the hooks Lightning dispatched to the module and to the callbacks."""
    names: Counter = Counter()
    for name in ("_call_callback_hooks", "_call_lightning_module_hook"):
        original = getattr(call, name)

        def counting(trainer, hook, *args, _original=original, **kwargs):
            names[hook] += 1
            return _original(trainer, hook, *args, **kwargs)

        monkeypatch.setattr(call, name, counting)
    return names


def train(*callbacks: Callback) -> int:
    cfg = compose([*TINY, f"trainer.max_steps={STEPS}"])
    with tempfile.TemporaryDirectory() as run_dir:
        return fit(Config.of(cfg), Path(run_dir), check(cfg), Run(*callbacks))


def test_hooks_nobody_implements_are_not_dispatched(dispatched):
    assert train() == STEPS
    assert dispatched["on_train_batch_end"] == 2 * STEPS  # the counter sees the hooks that are dispatched
    assert not {name: dispatched[name] for name in PRUNED if dispatched[name]}


class Hooks(Callback):
    """Implements the pruned hooks, and checks what each sees."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        assert loss.requires_grad
        self.calls["on_before_backward"] += 1

    def on_after_backward(self, trainer, pl_module) -> None:
        self.calls["on_after_backward"] += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        assert all(p.grad is not None for p in pl_module.model.parameters())  # the step's gradients, whole
        self.calls["on_before_optimizer_step"] += 1


def test_a_callback_that_implements_them_gets_every_call():
    hooks = Hooks()
    assert train(hooks) == STEPS
    assert hooks.calls == {
        "on_before_backward": STEPS * MICRO,
        "on_after_backward": STEPS * MICRO,
        "on_before_optimizer_step": STEPS,
    }


def test_a_datamodule_that_implements_a_transfer_hook_gets_it(monkeypatch, dispatched):
    seen = []

    def on_after_batch_transfer(self, batch, dataloader_idx):
        seen.append(batch.shape)
        return batch

    monkeypatch.setattr(module.LMDataModule, "on_after_batch_transfer", on_after_batch_transfer, raising=False)
    assert train() == STEPS
    assert len(seen) == STEPS  # the datamodule's hook, where Lightning calls it instead of the module's
    assert dispatched["on_after_backward"] == 0  # the others stay pruned


def rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_metrics_csv_is_lightnings_file_written_as_it_goes(tmp_path):
    """Each logged step's row is on disk before the next step (a killed run keeps it); a new column rewrites
    the header; the file is the one Lightning's own CSV logger writes for the same rows."""
    logged = [(0, {"train/loss": 2.5}), (1, {"train/loss": 2.25}), (2, {"train/loss": 2.0, "val/loss": 2.125})]
    ours = MetricsCsv(save_dir=str(tmp_path / "ours"), name="csv", version="", flush_logs_every_n_steps=1)
    theirs = CSVLogger(save_dir=str(tmp_path / "theirs"), name="csv", version="", flush_logs_every_n_steps=1)
    path = Path(ours.log_dir) / "metrics.csv"
    for step, metrics in logged:
        ours.log_metrics(metrics, step=step)
        theirs.log_metrics(metrics, step=step)
        header, written = rows(path)  # read while the writer holds the file open
        assert [int(row["step"]) for row in written] == list(range(step + 1))
        assert header == sorted({"step", *metrics})
    ours.finalize("success")
    theirs.finalize("success")
    assert path.read_text() == (Path(theirs.log_dir) / "metrics.csv").read_text()
    assert rows(path)[1][2] == {"step": "2", "train/loss": "2.0", "val/loss": "2.125"}
    assert ours.experiment._file is None  # closed


class Bar(Measurement):
    def result(self, trainer):
        (bar,) = [callback for callback in trainer.callbacks if isinstance(callback, StepProgressBar)]
        return bar.train_progress_bar


@pytest.mark.parametrize("refresh_s, most", [(1e9, 2), (0.0, 2 * STEPS)], ids=["throttled", "every-step"])
def test_the_progress_bar_is_drawn_at_most_every_refresh_interval_and_at_the_last_step(monkeypatch, refresh_s, most):
    """Lightning's bar draws twice a step; ours at most once per ``REFRESH_S`` (here: never again after the
    first step, then the last) and always ends at the run's last step with its loss."""
    draws = []
    original = Tqdm.refresh

    def counting(self, *args, **kwargs):
        if self.desc.startswith("train"):
            draws.append(self.n)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Tqdm, "refresh", counting)
    monkeypatch.setattr(StepProgressBar, "REFRESH_S", refresh_s)
    steps = 12
    cfg = compose(
        [*TINY, f"trainer.max_steps={steps}", "trainer.enable_progress_bar=true", "trainer.log_every_n_steps=4"]
    )
    with tempfile.TemporaryDirectory() as run_dir:
        bar = fit(Config.of(cfg), Path(run_dir), check(cfg), Bar())
    shown = [n for n in draws if n > 0]
    assert shown[0] == 1 and shown[-1] == steps and bar.n == steps
    assert "loss" in bar.postfix
    assert len(set(shown)) <= (2 if refresh_s else steps) and len(shown) <= most * steps // STEPS, shown


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:  # as a preemption stops the run: after this step
            trainer.should_stop = True


class Rows(Run):
    def loggers(self, run_dir):
        return [MetricsCsv(save_dir=str(run_dir), name="csv", version="")]

    def result(self, trainer):
        return rows(Path(trainer.loggers[0].log_dir) / "metrics.csv")[1]


def test_a_run_stopped_between_logged_steps_logs_the_steps_since_the_last_row():
    """Log every 5 steps, stopped after the 7th of 20: rows at steps 4 and 6, the last the mean of steps 5-6."""
    cfg = compose([*TINY, "trainer.max_steps=20", "trainer.log_every_n_steps=5"])
    with tempfile.TemporaryDirectory() as run_dir:
        written = fit(Config.of(cfg), Path(run_dir), check(cfg), Rows(StopAt(7)))
    assert [int(row["step"]) for row in written] == [4, 6]
    assert all(float(row["train/loss"]) > 0 for row in written)
