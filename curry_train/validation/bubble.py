"""The pipeline bubble, measured: each stage's idle share of a step, next to the schedule's formula.

A rank of a pipeline is *busy* while it computes one of its stages' forward or backward chunks or a
micro-batch's loss, and idle otherwise (waiting for activations or gradients from a neighbour, or in
the schedule's own bookkeeping). ``measure_bubbles`` runs each schedule kind on the same model, P
ranks and M micro-batches, times every compute chunk of every stage
(``PipelineStage.forward_one_chunk``, ``backward_one_chunk``, ``backward_weight_one_chunk``, and the
loss) and the whole step, and reports ``1 - busy / step`` per rank next to the formula:

* ``gpipe``, ``1F1B``: (P-1) / (M+P-1): the pipeline fills for P-1 slots and drains for P-1;
* ``interleaved``: (P-1) / (v*M+P-1): v virtual stages per rank make each slot v times shorter
  (Narayanan et al., 2021, "Efficient Large-Scale Language Model Training on GPU Clusters");
* zero-bubble kinds (``interleaved_zb``, ``zbv``, ``dualpipev``): the weight-gradient chunks fill the
  drain (Qi et al., 2023, "Zero Bubble Pipeline Parallelism"); no closed formula, printed ``~0``
  (what remains depends on the forward / input-gradient / weight-gradient cost ratio).

The formulas assume every stage costs the same, so stages get equal layer counts when the layers
divide evenly (choose ``model.n_layers`` so that they do: the embedding and the head are then the
only imbalance); otherwise the default balanced split. The measured figure also counts, as idle,
the time to send activations and gradients between processes and the schedule's per-chunk
overhead, so it sits above the formula, the more so the more (and smaller) chunks a schedule runs.

Each rank runs on one thread (``torch.set_num_threads(1)``): the stages of a real pipeline do not
share a device. Kinds and micro-batch counts run one after the other in one set of P processes.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from curry_train.config import ConfigError, compose
from curry_train.layout.pipeline import check_microbatches, split_layers, stages_per_rank
from curry_train.model.llama import Llama
from curry_train.options import PIPELINE_SCHEDULES as KINDS
from curry_train.planning.step_time import bubble_formula
from curry_train.pool import WorkerPool
from curry_train.primitives.materialize import materialize_and_init
from curry_train.primitives.pipeline_schedule import PipelineSchedule, next_token_loss, pipeline_stages
from curry_train.validation.defaults import PIPELINE_DEFAULTS

WARMUP_STEPS = 2  # untimed steps per kind: shape inference, the allocator, gloo's first connections


@dataclass
class BubbleRow:
    """One kind at one (P, M): the formula, the measured idle share per rank, step time and tokens/s."""

    kind: str
    pp: int
    microbatches: int
    virtual_stages: int
    layers_per_stage: list[int]
    formula: Optional[float]  # None: zero-bubble kind
    measured: list[float]  # per rank: 1 - busy / step
    step_ms: float  # mean over the timed steps, of the slowest rank
    tokens_per_s: float

    @property
    def mean(self) -> float:
        return sum(self.measured) / len(self.measured)

    @property
    def formula_text(self) -> str:
        return f"{self.formula:.1%}" if self.formula is not None else "~0"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": self.mean, "formula_text": self.formula_text}


class _BusyClock:
    """Wall time spent inside the wrapped calls; nested calls (a loss computed inside a chunk) count once."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._start = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                self._start = time.perf_counter()
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - self._start

        return timed


def stage_layers(n_layers: int, n_stages: int) -> Optional[list[int]]:
    """Equal layer counts per stage if the layers divide evenly, else None (the balanced default split)."""
    return [n_layers // n_stages] * n_stages if n_layers % n_stages == 0 else None


def _bubble_worker(container: dict, runs: Sequence[tuple[int, str]], steps: int) -> list[dict[str, Any]]:
    """A pool job: every run on this rank; the rows (the same on every rank)."""
    torch.set_num_threads(1)  # one core per stage: the stages of a real pipeline do not share a device
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = OmegaConf.create(container)
    results = []
    for microbatches, kind in runs:
        with torch.device("meta"):
            model = Llama(cfg.model)
        n_stages = world * stages_per_rank(kind)
        layers = stage_layers(cfg.model.n_layers, n_stages)
        local, stages = pipeline_stages(model, kind, world, rank, layers_per_stage=layers)
        materialize_and_init(local, torch.device("cpu"), cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        batch = torch.randint(
            0,
            cfg.model.vocab_size,
            (microbatches * cfg.data.micro_batch_size, cfg.data.seq_len + 1),
            generator=generator,
        )
        busy = _BusyClock()
        loss_fn = busy.wrap(next_token_loss(batch[:, 1:].numel()))
        schedule = PipelineSchedule(kind, microbatches, stages, pp_group=dist.group.WORLD, loss_fn=loss_fn)
        for stage in schedule.pipeline_stages:
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                setattr(stage, name, busy.wrap(getattr(stage, name)))
        for _ in range(WARMUP_STEPS):
            schedule.train_step(batch)
            local.zero_grad(set_to_none=True)
        busy.seconds, total = 0.0, 0.0
        for _ in range(steps):
            dist.barrier()  # every rank starts the step together: its wait for the first activation is bubble
            start = time.perf_counter()
            schedule.train_step(batch)
            total += time.perf_counter() - start
            local.zero_grad(set_to_none=True)
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, (1.0 - busy.seconds / total, total / steps))
        step_s = max(s[1] for s in shares)
        results.append(
            BubbleRow(
                kind=kind,
                pp=world,
                microbatches=microbatches,
                virtual_stages=stages_per_rank(kind),
                layers_per_stage=[len(r) for r in split_layers(cfg.model.n_layers, n_stages, layers)],
                formula=bubble_formula(kind, world, microbatches, stages_per_rank(kind)),
                measured=[s[0] for s in shares],
                step_ms=1e3 * step_s,
                tokens_per_s=batch[:, 1:].numel() / step_s,
            ).to_dict()
        )
    return results


def check_bubble_runs(n_layers: int, kinds: Sequence[str], pp: int, microbatches: Sequence[int], steps: int) -> None:
    """Every (kind, M) the schedules accept on ``pp`` ranks of a model of ``n_layers`` layers; else
    a ValueError that says which and why, before any process starts."""

    if pp < 2:
        raise ValueError(f"pp={pp}: a pipeline needs at least 2 ranks")
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    if not kinds or not microbatches:
        raise ValueError("no schedule kinds or no micro-batch counts to measure")
    for kind in kinds:
        n_stages = pp * stages_per_rank(kind)  # raises on an unknown kind
        if n_stages > n_layers:
            raise ValueError(
                f"schedule {kind} on pp={pp} has {n_stages} stages but the model has {n_layers} layers; "
                f"raise model.n_layers (a multiple of {n_stages} makes the stages equal)"
            )
        for m in microbatches:
            check_microbatches(kind, m, pp, n_stages)


def measure_bubbles(
    overrides: Sequence[str], kinds: Sequence[str], pp: int, microbatches: int | Sequence[int], steps: int = 5
) -> list[BubbleRow]:
    """Run each kind at each micro-batch count on ``pp`` local processes (one thread each), ``steps``
    timed steps after ``WARMUP_STEPS``, and measure its bubble; rows ordered by M, then kind.
    ``overrides`` (Hydra, as for ``train.py``) give the model and ``data.micro_batch_size`` x
    ``data.seq_len`` tokens per micro-batch; the layout keys are not read."""

    counts = [microbatches] if isinstance(microbatches, int) else list(microbatches)
    cfg = compose(list(overrides))
    check_bubble_runs(cfg.model.n_layers, kinds, pp, counts, steps)
    container = OmegaConf.to_container(cfg, resolve=True)
    runs = [(m, kind) for m in counts for kind in kinds]
    with WorkerPool(pp) as pool:
        raw = pool.run(_bubble_worker, container, runs, steps)[0]
    return [BubbleRow(**{k: v for k, v in r.items() if k not in ("mean", "formula_text")}) for r in raw]


def bubble_table(rows: Sequence[BubbleRow]) -> str:
    """One line per row: the formula, the measured mean and per-rank bubble, ms/step and tokens/s."""
    lines = [
        f"{'schedule':<16}{'P':>3}{'M':>4}{'v':>3}  {'layers/stage':<14}{'formula':>9}{'measured':>10}  "
        f"{'per rank':<16}{'ms/step':>9}{'tokens/s':>11}"
    ]
    for row in rows:
        per_rank = " ".join(f"{m:.1%}" for m in row.measured)
        layers = ",".join(map(str, row.layers_per_stage))
        lines.append(
            f"{row.kind:<16}{row.pp:>3}{row.microbatches:>4}{row.virtual_stages:>3}  {layers:<14}"
            f"{row.formula_text:>9}{row.mean:>10.1%}  {per_rank:<16}{row.step_ms:>9.1f}{row.tokens_per_s:>11,.0f}"
        )
    return "\n".join(lines)


@dataclass
class BubbleResult:
    config: dict[str, Any]
    rows: list[BubbleRow]

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "rows": [row.to_dict() for row in self.rows]}

    def table(self) -> str:
        c = self.config
        lines = [
            f"model={c['model']} ({c['n_layers']} blocks)  P={c['pp']} processes, one thread each, on {c['cores']} "
            "cores;"
            f" micro-batch {c['micro_batch_size']} x {c['seq_len']} tokens; {c['steps']} timed steps per row",
            "bubble: each rank's idle share of a step, 1 - (time in forward, backward, weight-gradient chunks and "
            "the loss)"
            " / step time",
            "",
            bubble_table(self.rows),
            "",
            "formula: (P-1)/(M+P-1) for gpipe and 1F1B, (P-1)/(v*M+P-1) for interleaved; ~0 for the zero-bubble kinds.",
            "The measured bubble counts sending activations and gradients between processes and each chunk's schedule",
            "overhead as idle, and the embedding and head make the first and last stages heavier than the others.",
        ]
        return "\n".join(lines)


def pipeline_bench(
    overrides: Sequence[str] = (),
    pp: int = 2,
    microbatches: Sequence[int] = (4, 8),
    steps: int = 5,
    kinds: Sequence[str] = KINDS,
) -> BubbleResult:
    """Every schedule kind at the same P and each M (``validation.bubble.measure_bubbles``), on the
    model of ``PIPELINE_DEFAULTS`` + ``overrides``."""
    overrides = [*PIPELINE_DEFAULTS, *overrides]
    cfg = compose(overrides)
    try:
        check_bubble_runs(cfg.model.n_layers, kinds, pp, list(microbatches), steps)
    except ValueError as error:  # a (kind, M, P) the schedules do not accept: said like a config error
        raise ConfigError(str(error)) from error
    rows = measure_bubbles(overrides, kinds, pp, list(microbatches), steps)
    return BubbleResult(
        config={
            "overrides": list(overrides),
            "model": cfg.model.name,
            "n_layers": cfg.model.n_layers,
            "pp": pp,
            "microbatches": list(microbatches),
            "micro_batch_size": cfg.data.micro_batch_size,
            "seq_len": cfg.data.seq_len,
            "steps": steps,
            "cores": os.cpu_count() or 1,
        },
        rows=rows,
    )
