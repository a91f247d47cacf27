"""Whitebox check: does a parallel layout compute the same step as one process?

Most parallelism bugs do not crash; they produce slightly wrong gradients. This harness runs the
configured layout for K optimizer steps through the real training path (strategy, module, data,
optimizer), and a single-process reference with the same seed and global batch in fp32. At every
step, just before the optimizer updates the weights, it records the global loss, the global
gradient norm and every parameter's full gradient (sharded gradients are gathered); then compares:

* loss and gradient norm: relative difference at most ``rtol`` (default 1e-5);
* each parameter's gradient: ``||g - g_ref|| / ||g_ref||`` at most ``grad_rtol`` (default 1e-5);
* every rank logged the step's loss (``train/loss``), not a placeholder: pipeline stages that do
  not compute the loss must still report it;
* no gradient is left pending a reduction (laid out unlike its parameter).

Why these tolerances: fp32 carries ~7 significant digits (eps = 1.2e-7). A layout changes only
the order of additions (a data-parallel sum, a sharded matmul's partial sums), and re-ordering a
sum of n terms moves the result by about sqrt(n) * eps relative to the terms' magnitude. For the
sums in a step of the debug model (thousands of terms per gradient entry) that is 1e-6 to 1e-5 in
the worst entries of a tensor, and far less in its norm (measured: 1e-7 for dp on 2 ranks); a real
bug (a missing or doubled reduction, a wrong scale, a mis-sliced shard) shows as a relative error of
1e-2 or more.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from curry_train.config import compose
from curry_train.config.checks import check
from curry_train.launch import spawn
from curry_train.module import CausalLM, LMDataModule
from curry_train.run import build_trainer

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
REFERENCE_OVERRIDES = ("parallel=dp", "trainer.devices=1", "trainer.num_nodes=1", "trainer.precision=32-true")


def clean_name(name: str) -> str:
    """A parameter's name as the bare model has it, whatever wrappers the layout added."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class StepRecorder(Callback):
    """Records loss, gradient norm and full gradients right before each optimizer step."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        loss = module.last_step_loss.clone()
        if dist.is_initialized():
            dist.all_reduce(loss, group=module.step.metrics_group)
        grads = {
            clean_name(name): full_tensor(param.grad).detach().double().cpu()
            for name, param in module.model.named_parameters()
            if param.grad is not None
        }
        # A gradient still pending a reduction (Partial) gathers to the right value here, but the
        # optimizer would see each rank's part: the layout must hand over gradients laid out like
        # their parameters.
        pending = [
            f"the gradient of {clean_name(name)} is {list(param.grad.placements)}, its parameter "
            f"{list(param.placements)}"
            for name, param in module.model.named_parameters()
            if hasattr(param.grad, "placements") and param.grad.placements != param.placements
        ]
        self.records.append(
            {"loss": float(loss), "grad_norm": float(module.last_grad_norm), "grads": grads, "pending": pending}
        )

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        # What this rank logged for the step (every rank logs the loss, pipeline stages included).
        logged = trainer.callback_metrics.get("train/loss")
        if self.records and logged is not None:
            self.records[-1]["logged_loss"] = float(logged)


def _capture(container: dict, out_dir: str, accelerator: str) -> None:
    """Worker body: train ``max_steps`` steps, recording each; every rank writes what it holds."""

    cfg = OmegaConf.create(container)
    pl.seed_everything(cfg.seed, verbose=False)
    recorder = StepRecorder()
    trainer = build_trainer(cfg, Path(out_dir), accelerator, callbacks=[recorder], checkpoints=False, loggers=[])
    trainer.fit(CausalLM(cfg), datamodule=LMDataModule(cfg.data, cfg.seed))
    rank = dist.get_rank() if dist.is_initialized() else trainer.global_rank
    torch.save(recorder.records, Path(out_dir) / f"records-rank{rank:05d}.pt")


def _merge(out_dir: Path) -> list[dict[str, Any]]:
    """One record per step: loss and norm from rank 0, gradients from every rank (pipeline stages
    hold different parameters; replicated holders must agree, which is itself checked)."""
    files = sorted(out_dir.glob("records-rank*.pt"))
    per_rank = [torch.load(f, weights_only=False) for f in files]
    merged = []
    for step, first in enumerate(per_rank[0]):
        grads: dict[str, torch.Tensor] = {}
        for records in per_rank:
            for name, grad in records[step]["grads"].items():
                if name in grads and not torch.equal(grads[name], grad):
                    diff = (grads[name] - grad).abs().max().item()
                    raise AssertionError(
                        f"step {step + 1}: ranks disagree on the gradient of {name} (max diff {diff:.3e})"
                    )
                grads[name] = grad
        pending = sorted({text for records in per_rank for text in records[step].get("pending", [])})
        logged = [records[step].get("logged_loss") for records in per_rank]
        merged.append(
            {
                "loss": first["loss"],
                "grad_norm": first["grad_norm"],
                "grads": grads,
                "pending": pending,
                "logged_losses": logged,
            }
        )
    return merged


def measurement_config(cfg: DictConfig, steps: int) -> DictConfig:
    """``cfg`` for a measured run of ``steps`` steps: no validation, no progress bar."""
    cfg = cfg.copy()
    OmegaConf.update(cfg, "trainer.max_steps", steps)
    OmegaConf.update(cfg, "trainer.limit_val_batches", 0)
    OmegaConf.update(cfg, "trainer.enable_progress_bar", False)
    OmegaConf.update(cfg, "trainer.log_every_n_steps", 1)
    return cfg


def run_layout(cfg: DictConfig, steps: int) -> list[dict[str, Any]]:
    """Run ``cfg`` for ``steps`` steps in as many local processes as it asks for; return merged records."""

    cfg = measurement_config(cfg, steps)
    OmegaConf.update(cfg, "optim.grad_clip", 0.0)  # clipping would hide a wrongly scaled gradient
    plan = check(cfg)
    container = OmegaConf.to_container(cfg, resolve=True)
    with tempfile.TemporaryDirectory(prefix="curry-whitebox-") as out_dir:
        spawn(plan.world_size, _capture, container, out_dir, plan.accelerator)
        return _merge(Path(out_dir))


@dataclass
class Row:
    step: int
    name: str
    value: float
    reference: float
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(row.ok for row in self.rows)

    def table(self, only_failures: bool = False) -> str:
        header = f"{'step':>4}  {'quantity':<48} {'value':>14} {'reference':>14} {'rel. error':>11} {'tol':>8}  ok"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            if only_failures and row.ok:
                continue
            lines.append(
                f"{row.step:>4}  {row.name:<48} {row.value:>14.7g} {row.reference:>14.7g} {row.error:>11.3e}"
                f" {row.tolerance:>8.0e}  {'yes' if row.ok else 'NO'}"
            )
        lines += [f"problem: {p}" for p in self.problems]
        failures = sum(not row.ok for row in self.rows)
        lines.append(f"{'PASS' if self.ok else 'FAIL'}: {len(self.rows) - failures}/{len(self.rows)} within tolerance")
        return "\n".join(lines)


def relative_error(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-30)


def compare(records: Sequence[dict], reference: Sequence[dict], rtol: float = 1e-5, grad_rtol: float = 1e-5) -> Report:
    report = Report()
    if len(records) != len(reference):
        report.problems.append(f"{len(records)} steps recorded, reference has {len(reference)}")
    for step, (got, ref) in enumerate(zip(records, reference, strict=False), 1):
        report.problems += [f"step {step}: {text}" for text in got.get("pending", [])]
        for rank, logged in enumerate(got.get("logged_losses", [])):
            if logged is None or relative_error(logged, got["loss"]) > rtol:
                report.problems.append(
                    f"step {step}: rank {rank} logged train/loss={logged}, the step's loss is {got['loss']:.7g}"
                )
        for key in ("loss", "grad_norm"):
            report.rows.append(Row(step, key, got[key], ref[key], relative_error(got[key], ref[key]), rtol))
        missing = sorted(set(ref["grads"]) - set(got["grads"]))
        extra = sorted(set(got["grads"]) - set(ref["grads"]))
        if missing or extra:
            report.problems.append(f"step {step}: gradients missing {missing}, unexpected {extra}")
        for name in sorted(set(ref["grads"]) & set(got["grads"])):
            g, r = got["grads"][name], ref["grads"][name]
            if g.shape != r.shape:
                report.problems.append(f"step {step}: {name} has shape {tuple(g.shape)}, reference {tuple(r.shape)}")
                continue
            error = float((g - r).norm() / r.norm().clamp_min(1e-30))
            report.rows.append(Row(step, f"grad {name}", float(g.norm()), float(r.norm()), error, grad_rtol))
    return report


def reference_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides of the single-process fp32 reference: the same run, without the layout."""
    layout_keys = ("parallel", "trainer.devices", "trainer.num_nodes", "trainer.precision")
    kept = [o for o in overrides if not o.lstrip("+~").split("=")[0].split(".")[0] == "parallel"]
    kept = [o for o in kept if o.lstrip("+~").split("=")[0] not in layout_keys]
    return kept + list(REFERENCE_OVERRIDES)


def validate(
    overrides: Sequence[str],
    steps: int = 1,
    rtol: float = 1e-5,
    grad_rtol: float = 1e-5,
    config_dir: Optional[Path] = None,
) -> Report:
    """Run the layout of ``overrides`` and its single-process reference; compare them."""
    cfg = compose(overrides, config_dir)
    reference_cfg = compose(reference_overrides(overrides), config_dir)
    records = run_layout(cfg, steps)
    key = json.dumps([OmegaConf.to_container(reference_cfg, resolve=True), steps], sort_keys=True, default=str)
    if key not in _REFERENCES:  # deterministic: one run serves every layout with the same reference
        _REFERENCES[key] = run_layout(reference_cfg, steps)
    return compare(records, _REFERENCES[key], rtol, grad_rtol)


_REFERENCES: dict[str, list[dict[str, Any]]] = {}
