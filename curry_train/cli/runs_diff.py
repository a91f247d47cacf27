"""Compare finished runs: what differs in their configs, what they measured, whether the curves agree.

    python scripts/runs_diff.py RUN_A RUN_B              # two run directories of train.py
    python scripts/runs_diff.py multirun/DATE/TIME       # every job of a sweep against the first
    python scripts/runs_diff.py SWEEP --baseline 2       # ... against job 2
    python scripts/runs_diff.py RUN_A RUN_B --rtol 1e-4 --plot curves.png --json

A run directory holds `.hydra/config.yaml` (the resolved config) and `csv/metrics.csv`. The config
differences come first for `parallel.*` (layout changes are the usual reason to compare runs: the
same seed and batch should give the same curve whatever the layout), then the rest. The loss curves
are drawn with matplotlib to `--plot`, by default `runs_diff.png`
in the sweep directory the baseline comes from, else in the baseline's run directory; the report
names the file. Runs that evaluated while training (`eval.sets`, `eval.harness.tasks`) get a table of
each `eval/...` metric's last value side by side, and those metrics against steps in `<plot>_eval.png`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from omegaconf import OmegaConf

from curry_train.planning.layout import OPTIONS as PARALLEL_OPTIONS
from curry_train.planning.layout import PlanningError
from curry_train.planning.plot import new_figure, save

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ABSENT = "<absent>"
PLOT_NAME = "runs_diff.png"


class RunsDiffError(Exception):
    """A path that cannot be compared; reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------- reading runs


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file()


def _job_order(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def expand(path: Path) -> list[Path]:
    """A run directory as itself; a multirun sweep directory as its job directories, in job order."""
    if is_run_dir(path):
        return [path]
    jobs = sorted((p for p in path.iterdir() if p.is_dir() and is_run_dir(p)), key=_job_order) if path.is_dir() else []
    if not jobs:
        raise RunsDiffError(
            f"{path} is not a run directory (no .hydra/config.yaml) nor a multirun sweep directory "
            "(no job directory holding one)"
        )
    return jobs


def read_metrics(run: Path) -> list[dict[str, float]]:
    """The rows of the run's metrics.csv, empty cells dropped; no file reads as no rows."""
    path = run / "csv" / "metrics.csv"
    if not path.is_file():
        found = sorted(p for p in run.rglob("metrics.csv") if "checkpoints" not in p.parts)
        if not found:
            return []
        path = found[0]
    with path.open(newline="") as handle:
        return [{k: float(v) for k, v in row.items() if k and v not in (None, "")} for row in csv.DictReader(handle)]


def series(rows: list[dict[str, float]], key: str) -> dict[int, float]:
    """step -> last value of ``key`` logged at that step."""
    return {int(row["step"]): row[key] for row in rows if key in row and "step" in row}


def load_run(path: Path, label: str) -> dict[str, Any]:
    config = OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"), resolve=True)
    config.pop("hydra", None)  # the run directory and launcher settings differ between any two runs
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    rows = read_metrics(path)
    return {"label": label, "path": str(path), "config": config, "overrides": overrides or [], "rows": rows}


def parallel_set(config: dict) -> str:
    """The `+` string of the parallel options in force: those whose subtree is set, not null."""
    parallel = config.get("parallel") or {}
    names = [name for name in PARALLEL_OPTIONS if isinstance(parallel.get(name), dict)]
    names += [name for name, value in parallel.items() if isinstance(value, dict) and name not in PARALLEL_OPTIONS]
    return "+".join(names) or "none"


# ------------------------------------------------------------------------------------- comparing


def config_diff(a: Any, b: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Dotted keys whose values differ; a subtree set on one side and null on the other is one entry."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in list(a) + [k for k in b if k not in a]:
            name = f"{prefix}.{key}" if prefix else str(key)
            found += config_diff(a.get(key, ABSENT), b.get(key, ABSENT), name)
        return found
    return [] if a == b else [{"key": prefix, "baseline": a, "other": b}]


def summarize(rows: list[dict[str, float]]) -> dict[str, Any]:
    loss, val = series(rows, "train/loss"), series(rows, "val/loss")
    speeds = [row["train/tokens_per_s"] for row in rows if "train/tokens_per_s" in row]
    memory_keys = sorted({k for row in rows for k in row if "mem" in k.lower()})
    peak = max((row[k] for row in rows for k in memory_keys if k in row), default=None)
    last = max(loss) if loss else None
    finite = {step: value for step, value in loss.items() if math.isfinite(value)}
    best = min(finite, key=finite.get) if finite else None
    return {
        "logged_steps": len(loss),  # rows: one every trainer.log_every_n_steps steps
        "final_train_loss": loss[last] if loss else None,
        "final_step": last,
        "best_train_loss": finite[best] if finite else None,
        "best_step": best,
        "final_val_loss": val[max(val)] if val else None,
        "mean_tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "peak_memory": peak,
        "peak_memory_columns": memory_keys,
    }


def compare_curves(baseline: dict[int, float], other: dict[int, float], rtol: float) -> dict[str, Any]:
    """Max relative difference of ``other`` from ``baseline`` over the steps both logged."""
    common = sorted(set(baseline) & set(other))
    worst, worst_step = 0.0, None
    for step in common:
        scale = abs(baseline[step]) or 1.0
        diff = abs(other[step] - baseline[step]) / scale if math.isfinite(other[step]) else math.inf
        if diff > worst or worst_step is None:
            worst, worst_step = diff, step
    return {
        "common_steps": len(common),
        "only_baseline_steps": len(set(baseline) - set(other)),
        "only_other_steps": len(set(other) - set(baseline)),
        "max_rel_diff": worst if common else None,
        "max_rel_diff_step": worst_step,
        "rtol": rtol,
        "agree": bool(common) and worst <= rtol,
    }


def compare(baseline: dict, other: dict, rtol: float) -> dict[str, Any]:
    diffs = config_diff(baseline["config"], other["config"])

    def is_parallel(d: dict[str, Any]) -> bool:
        return d["key"] == "parallel" or d["key"].startswith("parallel.")

    return {
        "baseline": baseline["label"],
        "other": other["label"],
        "parallel": {"baseline": parallel_set(baseline["config"]), "other": parallel_set(other["config"])},
        "parallel_differences": [d for d in diffs if is_parallel(d)],
        "other_differences": [d for d in diffs if not is_parallel(d)],
        "loss_curves": compare_curves(
            series(baseline["rows"], "train/loss"), series(other["rows"], "train/loss"), rtol
        ),
    }


# ------------------------------------------------------------------------------------------ plot


def plot_curves(curves: list[dict[int, float]], labels: list[str], path: Path) -> Figure:
    """train/loss of each run against step, one line per run through its finite points, written as PNG
    to ``path``. The baseline (the first) is drawn thick beneath the others, so curves that agree
    stay visible."""
    figure, axes = new_figure()
    for index, (curve, label) in enumerate(zip(curves, labels, strict=False)):
        steps = [step for step in sorted(curve) if math.isfinite(curve[step])]
        baseline = index == 0
        axes.plot(
            steps,
            [curve[step] for step in steps],
            label=label,
            color=f"C{index}",
            marker="o",
            markersize=5 if baseline else 3,
            linewidth=5 if baseline else 1.5,
            alpha=0.45 if baseline else 1.0,
            zorder=2 if baseline else 3,
        )
    axes.set_xlabel("step")
    axes.set_ylabel("train loss (nats per token)")
    axes.set_title("train/loss per step: run [1], the baseline, thick")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    save(figure, path)
    return figure


def eval_keys(runs: list[dict]) -> list[str]:
    """The ``eval/...`` metrics any run logged (evaluation while training: sets and lm-eval tasks), sorted."""
    return sorted({key for run in runs for row in run["rows"] for key in row if key.startswith("eval/")})


def eval_table(runs: list[dict]) -> dict[str, list[Optional[dict[str, float]]]]:
    """Per eval metric, each run's last value and its step (None: the run did not log it)."""
    table = {}
    for key in eval_keys(runs):
        cells = []
        for run in runs:
            values = series(run["rows"], key)
            cells.append({"step": max(values), "value": values[max(values)]} if values else None)
        table[key] = cells
    return table


def plot_eval(runs: list[dict], labels: list[str], path: Path) -> Optional[Figure]:
    """Each eval metric against step, one panel per metric (at most 12), one line per run; PNG at ``path``.
    None (nothing written) where no run logged one."""
    keys = eval_keys(runs)[:12]
    if not keys:
        return None
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure, first = new_figure(4.0 * columns, 3.0 * rows + 0.6)
    figure.delaxes(first)
    for index, key in enumerate(keys):
        axes = figure.add_subplot(rows, columns, index + 1)
        for number, (run, label) in enumerate(zip(runs, labels, strict=True)):
            values = series(run["rows"], key)
            steps = [step for step in sorted(values) if math.isfinite(values[step])]
            if steps:
                axes.plot(
                    steps, [values[step] for step in steps], marker="o", markersize=3, color=f"C{number}", label=label
                )
        axes.set_title(key.removeprefix("eval/"), fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.grid(alpha=0.3)
        if index == 0:
            axes.legend(fontsize=7)
    save(figure, path)
    return figure


def default_plot(paths: list[Path], runs: list[dict]) -> Path:
    """Where the plot goes unless ``--plot`` says: beside the runs, not in the current directory: in
    the sweep directory the baseline comes from, else in the baseline's run directory."""
    baseline = Path(runs[0]["path"]).resolve()
    sweeps = {path.resolve() for path in paths if not is_run_dir(path)}
    return (baseline.parent if baseline.parent in sweeps else baseline) / PLOT_NAME


# ---------------------------------------------------------------------------------------- report


def collect(paths: list[Path], baseline: Optional[str] = None) -> list[dict]:
    """The runs to compare, baseline first."""
    runs = []
    for path in paths:
        runs += [load_run(job, str(job)) for job in expand(path)]
    if baseline is not None:
        chosen = [
            i
            for i, r in enumerate(runs)
            if baseline in (r["label"], Path(r["path"]).name) or Path(baseline).resolve() == Path(r["path"]).resolve()
        ]
        if chosen:
            runs.insert(0, runs.pop(chosen[0]))
        elif Path(baseline).exists():
            job = expand(Path(baseline))[0]
            runs.insert(0, load_run(job, str(job)))
        else:
            raise RunsDiffError(
                f"--baseline {baseline}: neither one of the runs (by path or job name) nor a run directory"
            )
    if len(runs) < 2:
        raise RunsDiffError(
            f"need at least two runs to compare, got {len(runs)}: {', '.join(r['label'] for r in runs)}"
        )
    return runs


def run_label(index: int, run: dict) -> str:
    """``[2] NAME (parallel=fsdp)``: run ``index`` (1-based, as the text report numbers them) in the plot's legend."""
    return f"[{index}] {Path(run['label']).name} (parallel={parallel_set(run['config'])})"


def build_report(runs: list[dict], rtol: float, plot: Path) -> dict[str, Any]:
    plot = Path(plot).resolve()
    labels = [run_label(index, run) for index, run in enumerate(runs, 1)]
    plot_curves([series(run["rows"], "train/loss") for run in runs], labels, plot)
    eval_plot = plot.with_name(plot.stem + "_eval" + plot.suffix)
    drawn = plot_eval(runs, labels, eval_plot) is not None
    return {
        "baseline": runs[0]["label"],
        "rtol": rtol,
        "runs": [
            {
                "label": r["label"],
                "parallel": parallel_set(r["config"]),
                "overrides": r["overrides"],
                "metrics": summarize(r["rows"]),
            }
            for r in runs
        ],
        "comparisons": [compare(runs[0], other, rtol) for other in runs[1:]],
        "eval": eval_table(runs),
        "plot": str(plot),
        "eval_plot": str(eval_plot) if drawn else None,
    }


def _value(value: Any) -> str:
    return value if value == ABSENT else json.dumps(value, separators=(", ", ": "))


def _number(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(report: dict[str, Any]) -> str:
    lines = ["runs (the first is the baseline):"]
    for index, run in enumerate(report["runs"], 1):
        overrides = " ".join(run["overrides"]) or "none"
        lines.append(f"  [{index}] {run['label']}  parallel={run['parallel']}  (overrides: {overrides})")
    labels = {run["label"]: index for index, run in enumerate(report["runs"], 1)}
    for comparison in report["comparisons"]:
        base, other = labels[comparison["baseline"]], labels[comparison["other"]]
        lines += ["", f"== [{other}] vs [{base}] =="]
        sets = comparison["parallel"]
        same = "same" if sets["baseline"] == sets["other"] else "differs"
        lines.append(f"parallelism ({same}): {sets['baseline']} -> {sets['other']}")
        lines += [
            f"  {d['key']}: {_value(d['baseline'])} -> {_value(d['other'])}" for d in comparison["parallel_differences"]
        ]
        lines.append("other config differences:" + ("" if comparison["other_differences"] else " none"))
        lines += [
            f"  {d['key']}: {_value(d['baseline'])} -> {_value(d['other'])}" for d in comparison["other_differences"]
        ]
        curves = comparison["loss_curves"]
        if not curves["common_steps"]:
            lines.append("loss curves: no common steps with train/loss; cannot tell whether they agree")
        else:
            verdict = "AGREE" if curves["agree"] else "DISAGREE"
            sign = "<=" if curves["agree"] else ">"
            extra = (
                f" (steps in one run only: {curves['only_baseline_steps']} + {curves['only_other_steps']})"
                if curves["only_baseline_steps"] or curves["only_other_steps"]
                else ""
            )
            lines.append(
                f"loss curves: {verdict}: max relative difference of train/loss {curves['max_rel_diff']:.3g} "
                f"(step {curves['max_rel_diff_step']}) {sign} rtol {curves['rtol']:g} over {curves['common_steps']} "
                f"common steps{extra}"
            )
    lines += [
        "",
        "metrics:",
        f"  {'run':<5} {'final train loss':>18} {'best train loss':>18} {'final val loss':>15} {'mean tokens/s':>14} "
        f"{'peak memory':>12}",
    ]
    for index, run in enumerate(report["runs"], 1):
        m = run["metrics"]
        final = f"{_number(m['final_train_loss'])} @{m['final_step']}" if m["final_train_loss"] is not None else "n/a"
        best = f"{_number(m['best_train_loss'])} @{m['best_step']}" if m["best_train_loss"] is not None else "n/a"
        peak = "n/a" if m["peak_memory"] is None else f"{m['peak_memory']:.4g}"
        lines.append(
            f"  [{index}]{'':<2} {final:>18} {best:>18} {_number(m['final_val_loss']):>15} "
            f"{_number(m['mean_tokens_per_s'], 1):>14} {peak:>12}"
        )
    if report["eval"]:
        width = max(len(key) for key in report["eval"]) - len("eval/")
        runs = range(1, len(report["runs"]) + 1)
        lines += [
            "",
            "eval (the last value of each run, @step):",
            f"  {'metric':<{width}} " + " ".join(f"{f'[{i}]':>16}" for i in runs),
        ]
        for key, cells in report["eval"].items():
            shown = [f"{cell['value']:.4g} @{cell['step']}" if cell else "n/a" for cell in cells]
            lines.append(f"  {key.removeprefix('eval/'):<{width}} " + " ".join(f"{text:>16}" for text in shown))
    lines += ["", f"plot: {report['plot']} (train/loss; colour i = run [i], the baseline thick)"]
    if report.get("eval_plot"):
        lines.append(f"eval plot: {report['eval_plot']} (each eval metric against step)")
    return "\n".join(lines)


def _strict_json(value: Any) -> Any:
    """NaN and infinity (a diverged run) as strings, so the output parses as standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict_json(v) for v in value]
    return value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, or a multirun sweep directory")
    parser.add_argument(
        "--baseline", help="the run the others are compared with: a path or a job name (default: the first)"
    )
    parser.add_argument(
        "--rtol", type=float, default=1e-5, help="relative tolerance for the loss curves to agree (default 1e-5)"
    )
    parser.add_argument(
        "--plot",
        type=Path,
        help=f"where to write the PNG of the loss curves (default: {PLOT_NAME} in"
        " the sweep directory of the baseline, else in the baseline's run directory)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    args = parser.parse_args(argv)
    try:
        runs = collect(args.runs, args.baseline)
        report = build_report(runs, args.rtol, args.plot or default_plot(args.runs, runs))
    except (RunsDiffError, PlanningError) as error:
        print(f"runs_diff.py: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(_strict_json(report), indent=2, allow_nan=False) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
