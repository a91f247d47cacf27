"""``Evaluation``: the run's evaluation sets and lm-eval tasks, every ``eval.every_n_steps`` steps and after
the last, on the live model in the run's layout.

Each set is logged as ``eval/<name>/loss`` and ``eval/<name>/ppl``, each task's metric as
``eval/<task>/<metric>``, to every logger (metrics.csv included) in the row of the step whose weights
they score; the last values close the run's summary. Evaluating leaves training as it was: eval mode
and no gradients while it runs, and every random generator (lm-eval seeds them) restored after, so a run
that evaluates trains bit for bit as one that does not.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from curry_train.checkpoint.dcp import rng_state, set_rng_state
from curry_train.config.schema import Config
from curry_train.data.eval_sets import EvalSet
from curry_train.data.mixture import mixture_of
from curry_train.evaluation.harness import EvalTokenizer, curry_lm, run_tasks
from curry_train.evaluation.scoring import Scorer
from curry_train.evaluation.sets import set_loss
from curry_train.train_step import TrainStep

log = logging.getLogger(__name__)


def run_tokenizer(cfg: Config) -> str:
    """The tokenizer the run's data is read with (its first source's): a directory, a file, or ``byte``."""
    spec = str(mixture_of(cfg.data)[0].tokenizer)
    return "byte" if spec in ("byte", "stdlib") else spec


class Evaluator:
    """The run's evaluation sets and harness tasks on a live step (built once, at the first evaluation)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.set_specs = dict(cfg.eval.sets or {})
        self.tasks = list(cfg.eval.harness.tasks)
        self.sets: Optional[list[EvalSet]] = None
        self.lm: Any = None

    def run(self, step: TrainStep, sets: bool = True, tasks: bool = True) -> dict[str, float]:
        """``eval/<set>/loss`` and ``/ppl``, ``eval/<task>/<metric>``: collective over every rank of the run.
        Every random generator is as it was after (lm-eval seeds them)."""
        generators = rng_state()
        metrics: dict[str, float] = {}
        try:
            if sets and self.set_specs:
                metrics.update(self._sets(step))
            if tasks and self.tasks:
                metrics.update(self._tasks(step))
        finally:
            set_rng_state(generators)
        return metrics

    def _sets(self, step: TrainStep) -> dict[str, float]:
        if self.sets is None:
            self.sets = [EvalSet(name, spec, self.cfg.data, self.cfg.seed) for name, spec in self.set_specs.items()]
        metrics = {}
        for eval_set in self.sets:
            result = set_loss(step, eval_set, self.cfg.data.global_batch_size, self.cfg.eval.max_batches)
            metrics[f"eval/{eval_set.name}/loss"] = result.loss
            metrics[f"eval/{eval_set.name}/ppl"] = result.ppl
        return metrics

    def _tasks(self, step: TrainStep) -> dict[str, float]:
        h = self.cfg.eval.harness
        if self.lm is None:
            rows = self.cfg.data.global_batch_size // step.parallel_state.dp_size
            self.lm = curry_lm(Scorer(step, rows, self.cfg.data.seq_len), EvalTokenizer(run_tokenizer(self.cfg)))
        scores = run_tasks(self.lm, self.tasks, h.include_path, h.limit, h.num_fewshot, self.cfg.seed)
        return {f"eval/{task}/{metric}": value for task, values in scores.items() for metric, value in values.items()}


def describe(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key.removeprefix('eval/')} {value:.4g}" for key, value in metrics.items())


class Evaluation(Callback):
    def __init__(self, cfg: Config) -> None:
        self.evaluator = Evaluator(cfg)
        e = cfg.eval
        self.every = e.every_n_steps
        self.harness_every = e.harness.every_n_steps if e.harness.every_n_steps is not None else e.every_n_steps
        self.last: dict[str, float] = {}  # the latest values, for the closing summary

    @property
    def enabled(self) -> bool:
        return bool(self.evaluator.set_specs or self.evaluator.tasks)

    @staticmethod
    def _due(every: int, step: int, last: bool) -> bool:
        return last or (every > 0 and step % every == 0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        step, last = trainer.global_step, trainer.global_step >= trainer.max_steps
        sets, tasks = self._due(self.every, step, last), self._due(self.harness_every, step, last)
        if not (sets or tasks):
            return
        started = time.perf_counter()
        metrics = self.evaluator.run(pl_module.step, sets, tasks)
        if not metrics:
            return
        self.last.update(metrics)
        for logger in trainer.loggers:  # in the row of the step whose weights they score (metrics.csv's step)
            logger.log_metrics(metrics, step=trainer.global_step - 1)
        if trainer.is_global_zero:
            log.info("eval after step %d (%.1f s): %s", step, time.perf_counter() - started, describe(metrics))
        pl_module._last_log_time = time.perf_counter()  # evaluation time is not training throughput

    def closing_line(self) -> Optional[str]:
        return "eval: " + describe(self.last) if self.last else None
