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
from curry_train.pool import Pools
from curry_train.runner import Measurement, fit_layouts

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
REFERENCE_OVERRIDES = ("parallel=dp", "trainer.devices=1", "trainer.num_nodes=1", "trainer.precision=32-true")


def clean_name(name: str) -> str:
    """A parameter's name as the bare model has it, whatever wrappers the layout added."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class StepRecorder(Callback, Measurement):
    """Records loss, gradient norm and full gradients right before each optimizer step; with validation
    on, each validation's loss."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.val_losses: list[float] = []
        self.buffers: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        loss = module.step.last_loss.clone()
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
            {"loss": float(loss), "grad_norm": float(module.step.last_grad_norm), "grads": grads, "pending": pending}
        )

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        # What this rank logged for the step (every rank logs the loss, pipeline stages included).
        logged = trainer.callback_metrics.get("train/loss")
        if self.records and logged is not None:
            self.records[-1]["logged_loss"] = float(logged)

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        logged = trainer.callback_metrics.get("val/loss")
        if logged is not None:
            self.val_losses.append(float(logged))

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # The state that is not a parameter but trains (a MoE router's balancing bias, moved by the
        # loads summed over the ranks): what a checkpoint holds of it, at the end.
        persistent = set(module.model.state_dict())
        self.buffers = {
            clean_name(name): full_tensor(buffer).detach().double().cpu()
            for name, buffer in module.model.named_buffers()
            if name in persistent
        }

    # As the runner's measurement: itself, and what this rank holds after the run.
    @property
    def callbacks(self) -> list[Callback]:
        return [self]

    def result(self, trainer: pl.Trainer) -> dict[str, Any]:
        return {"steps": self.records, "val_losses": self.val_losses, "buffers": self.buffers}


def recorder(cfg: DictConfig) -> StepRecorder:
    """The whitebox's probe for ``runner.fit_layouts``."""
    return StepRecorder()


def merge(per_rank: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step: loss and norm from rank 0, gradients from every rank (pipeline stages
    hold different parameters; replicated holders must agree, which is itself checked), the
    validation losses (rank 0's) and the trained buffers at the end (every rank's, which must agree)
    with the last step's record."""
    steps = [rank["steps"] for rank in per_rank]
    merged = []
    for step, first in enumerate(steps[0]):
        grads = _agreed([records[step]["grads"] for records in steps], f"step {step + 1}: the gradient of")
        pending = sorted({text for records in steps for text in records[step].get("pending", [])})
        logged = [records[step].get("logged_loss") for records in steps]
        merged.append(
            {
                "loss": first["loss"],
                "grad_norm": first["grad_norm"],
                "grads": grads,
                "pending": pending,
                "logged_losses": logged,
            }
        )
    if merged:
        merged[-1]["val_losses"] = per_rank[0]["val_losses"]
        merged[-1]["buffers"] = _agreed([rank["buffers"] for rank in per_rank], f"step {len(merged)}: buffer")
    return merged


def _agreed(per_rank: Sequence[dict[str, torch.Tensor]], what: str) -> dict[str, torch.Tensor]:
    """The union of every rank's tensors by name; ranks holding the same name must hold the same value."""
    union: dict[str, torch.Tensor] = {}
    for tensors in per_rank:
        for name, tensor in tensors.items():
            if name in union and not torch.equal(union[name], tensor):
                diff = (union[name] - tensor).abs().max().item()
                raise AssertionError(f"{what} {name}: ranks disagree (max diff {diff:.3e})")
            union[name] = tensor
    return union


def measurement_config(cfg: DictConfig, steps: int) -> DictConfig:
    """``cfg`` for a measured run of ``steps`` steps: no validation, no progress bar."""
    cfg = cfg.copy()
    OmegaConf.update(cfg, "trainer.max_steps", steps)
    OmegaConf.update(cfg, "trainer.limit_val_batches", 0)
    OmegaConf.update(cfg, "trainer.enable_progress_bar", False)
    OmegaConf.update(cfg, "trainer.log_every_n_steps", 1)
    return cfg


def whitebox_config(cfg: DictConfig, steps: int, validate_every: Optional[int] = None) -> DictConfig:
    """``cfg`` as the whitebox runs it: ``steps`` measured steps, no clipping (it would hide a wrongly
    scaled gradient); ``validate_every``: validation (2 batches) every that many steps."""
    cfg = measurement_config(cfg, steps)
    OmegaConf.update(cfg, "optim.grad_clip", 0.0)
    if validate_every is not None:
        OmegaConf.update(cfg, "trainer.limit_val_batches", 2)
        OmegaConf.update(cfg, "trainer.val_check_interval", validate_every)
    return cfg


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
        got_buffers, ref_buffers = got.get("buffers", {}), ref.get("buffers", {})
        if set(got_buffers) != set(ref_buffers):
            report.problems.append(f"step {step}: buffers {sorted(got_buffers)}, the reference's {sorted(ref_buffers)}")
        for name in sorted(set(got_buffers) & set(ref_buffers)):
            b, r = got_buffers[name], ref_buffers[name]
            error = float((b - r).norm() / r.norm().clamp_min(1e-30)) if b.shape == r.shape else math.inf
            report.rows.append(Row(step, f"buffer {name}", float(b.norm()), float(r.norm()), error, grad_rtol))
        got_val, ref_val = got.get("val_losses", []), ref.get("val_losses", [])
        if len(got_val) != len(ref_val):
            report.problems.append(f"step {step}: {len(got_val)} validation losses, the reference has {len(ref_val)}")
        for index, (value, expected) in enumerate(zip(got_val, ref_val, strict=False), 1):
            report.rows.append(
                Row(step, f"validation {index} loss", value, expected, relative_error(value, expected), rtol)
            )
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
    layout_keys = (
        "parallel",
        "trainer.devices",
        "trainer.num_nodes",
        "trainer.precision",
        "compile.enabled",
        "model.lora.base_dtype",  # a precision, like trainer.precision: the reference's base is fp32
    )
    kept = [o for o in overrides if not o.lstrip("+~").split("=")[0].split(".")[0] == "parallel"]
    kept = [o for o in kept if o.lstrip("+~").split("=")[0] not in layout_keys]
    return kept + list(REFERENCE_OVERRIDES)


@dataclass
class Case:
    """One layout to check: its overrides and tolerances (``validate_every``: validate every that many
    steps, and compare the validation losses too)."""

    overrides: Sequence[str]
    steps: int = 1
    rtol: float = 1e-5
    grad_rtol: float = 1e-5
    validate_every: Optional[int] = None


def validate_many(
    cases: Sequence[Case], config_dir: Optional[Path] = None, pools: Optional[Pools] = None
) -> list[Report]:
    """Run every case's layout and its single-process reference (one reference per distinct one) through
    ``runner.fit_layouts``, the layouts of a world size in one pool; compare each. A layout that fails
    is a report with its error as the problem."""
    layouts, references, keys = [], {}, []
    for case in cases:
        cfg = whitebox_config(compose(case.overrides, config_dir), case.steps, case.validate_every)
        layouts.append((cfg, check(cfg)))
        reference = whitebox_config(
            compose(reference_overrides(case.overrides), config_dir), case.steps, case.validate_every
        )
        key = json.dumps(OmegaConf.to_container(reference, resolve=True), sort_keys=True, default=str)
        keys.append(key)
        if key not in _REFERENCES and key not in references:  # deterministic: one run serves every layout
            references[key] = (reference, check(reference))
    outcomes = fit_layouts([*layouts, *references.values()], recorder, pools)
    for key, outcome in zip(references, outcomes[len(layouts) :], strict=True):
        if not outcome.ok:
            raise RuntimeError(f"the single-process reference failed: {outcome.error}")
        _REFERENCES[key] = merge(outcome.ranks)
    reports = []
    for case, key, outcome in zip(cases, keys, outcomes, strict=False):
        if outcome.ok:
            reports.append(compare(merge(outcome.ranks), _REFERENCES[key], case.rtol, case.grad_rtol))
        else:
            reports.append(Report(problems=[f"the layout failed: {outcome.error}"]))
    return reports


def validate(
    overrides: Sequence[str],
    steps: int = 1,
    rtol: float = 1e-5,
    grad_rtol: float = 1e-5,
    config_dir: Optional[Path] = None,
    pools: Optional[Pools] = None,
) -> Report:
    """Run the layout of ``overrides`` and its single-process reference; compare them."""
    (report,) = validate_many([Case(overrides, steps, rtol, grad_rtol)], config_dir, pools)
    return report


_REFERENCES: dict[str, list[dict[str, Any]]] = {}
