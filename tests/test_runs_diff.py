"""scripts/runs_diff.py on run directories written by hand: composed configs, known loss curves."""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from curry_train.cli import runs_diff as runs_diff_cli
from curry_train.config import compose

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "runs_diff.py"
LOSSES = [5.5, 4.0, 3.2, 2.9, 2.5, 2.7]  # best (2.5 at step 4) differs from final (2.7 at step 5)
HEADER = "epoch,step,train/grad_norm,train/loss,train/lr,train/ppl,train/tokens_per_s,val/loss,val/ppl"


def load_runs_diff():
    return runs_diff_cli


runs_diff = load_runs_diff()


@pytest.fixture(scope="module")
def configs():
    return {name: compose([f"parallel={name}"]) for name in ("dp", "fsdp")}


def make_run(
    directory: Path, config, losses, tokens_per_s: float = 1000.0, val_loss: float = 3.0, overrides=()
) -> Path:
    """What train.py leaves that runs_diff reads: the resolved config and a CSVLogger metrics file."""
    (directory / ".hydra").mkdir(parents=True)
    OmegaConf.save(config, directory / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), directory / ".hydra" / "overrides.yaml")
    rows = [f"0,{step},1.0,{loss!r},0.001,2.0,{tokens_per_s + step}" + ",," for step, loss in enumerate(losses)]
    rows.append(f"0,{len(losses) - 1},,,,,,{val_loss!r},20.0")  # validation is logged on a row of its own
    (directory / "csv").mkdir()
    (directory / "csv" / "metrics.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    return directory


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def main_json(capsys, *args) -> dict:
    assert runs_diff.main([*map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 640 and height >= 400


def spy_on_plot(monkeypatch) -> list:
    """The figures main draws, as ``plot_curves`` returns them."""
    figures = []
    draw = runs_diff.plot_curves
    monkeypatch.setattr(runs_diff, "plot_curves", lambda *args: figures.append(draw(*args)) or figures[-1])
    return figures


def assert_curves(figure, curves) -> None:
    """One line per run, through the run's (step, train/loss) points, each named in the legend."""
    (axes,) = figure.axes
    lines = axes.get_lines()
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in lines] == [
        (list(range(len(losses))), losses) for losses in curves
    ]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend == [line.get_label() for line in lines] and [name[:4] for name in legend] == [
        f"[{i}] " for i in range(1, len(curves) + 1)
    ]
    assert axes.get_xlabel() == "step" and "loss" in axes.get_ylabel() and "nats" in axes.get_ylabel()


def test_dp_vs_fsdp_names_parallelism_first_and_agrees(tmp_path, configs, capsys, monkeypatch):
    a = make_run(tmp_path / "a", configs["dp"], LOSSES, overrides=["parallel=dp"])
    fsdp = copy.deepcopy(configs["fsdp"])
    fsdp.trainer.devices = 2
    b = make_run(
        tmp_path / "b", fsdp, [x * (1 + 3e-7) for x in LOSSES], tokens_per_s=2000.0, overrides=["parallel=fsdp"]
    )
    plot = tmp_path / "out" / "curves.png"
    figures = spy_on_plot(monkeypatch)

    assert runs_diff.main([str(a), str(b), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "parallelism (differs): dp -> fsdp" in text
    assert (
        text.index("parallel.dp:")
        < text.index("parallel.fsdp:")
        < text.index("other config differences")
        < text.index("trainer.devices: 1 -> 2")
    )
    assert "loss curves: AGREE" in text
    assert_png(plot)
    assert f"plot: {plot.resolve()} " in text
    assert_curves(figures[0], [LOSSES, [x * (1 + 3e-7) for x in LOSSES]])

    report = main_json(capsys, a, b, "--plot", plot)
    assert set(report) == {"baseline", "rtol", "runs", "comparisons", "eval", "plot", "eval_plot"}
    assert report["eval"] == {} and report["eval_plot"] is None  # runs that did not evaluate: no table, no plot
    (comparison,) = report["comparisons"]
    assert set(comparison) == {
        "baseline",
        "other",
        "parallel",
        "parallel_differences",
        "other_differences",
        "loss_curves",
    }
    assert comparison["parallel"] == {"baseline": "dp", "other": "fsdp"}
    assert [d["key"] for d in comparison["parallel_differences"]] == ["parallel.dp", "parallel.fsdp"]
    assert comparison["parallel_differences"][0]["other"] is None
    assert comparison["parallel_differences"][1]["other"]["sharding"] == "full"
    assert comparison["other_differences"] == [{"key": "trainer.devices", "baseline": 1, "other": 2}]
    curves = comparison["loss_curves"]
    assert (
        curves["agree"]
        and curves["common_steps"] == len(LOSSES)
        and curves["max_rel_diff"] == pytest.approx(3e-7, rel=1e-3)
    )
    metrics = report["runs"][0]["metrics"]
    assert metrics["final_train_loss"] == 2.7 and metrics["final_step"] == 5
    assert metrics["best_train_loss"] == 2.5 and metrics["best_step"] == 4
    assert metrics["final_val_loss"] == 3.0
    assert metrics["mean_tokens_per_s"] == pytest.approx(1002.5)
    assert metrics["peak_memory"] is None
    assert report["runs"][1]["parallel"] == "fsdp" and report["runs"][1]["overrides"] == ["parallel=fsdp"]


def test_disagreeing_curves_and_tolerance(tmp_path, configs, capsys):
    a = make_run(tmp_path / "a", configs["dp"], LOSSES)
    b = make_run(tmp_path / "b", configs["dp"], [*LOSSES[:3], LOSSES[3] * 1.01, *LOSSES[4:]])
    plot = tmp_path / "p.png"
    report = main_json(capsys, a, b, "--plot", plot)
    (comparison,) = report["comparisons"]
    assert comparison["parallel_differences"] == [] and comparison["other_differences"] == []
    curves = comparison["loss_curves"]
    assert not curves["agree"] and curves["max_rel_diff_step"] == 3 and curves["max_rel_diff"] == pytest.approx(0.01)
    assert main_json(capsys, a, b, "--plot", plot, "--rtol", "0.02")["comparisons"][0]["loss_curves"]["agree"]
    assert runs_diff.main([str(a), str(b), "--plot", str(plot)]) == 0
    assert "loss curves: DISAGREE" in capsys.readouterr().out

    diverged = make_run(tmp_path / "nan", configs["dp"], [*LOSSES[:2], float("nan"), *LOSSES[3:]])
    curves = main_json(capsys, a, diverged, "--plot", plot)["comparisons"][0]["loss_curves"]
    assert not curves["agree"] and curves["max_rel_diff"] == "inf" and curves["max_rel_diff_step"] == 2


def test_peak_memory_reported_when_logged(tmp_path, configs):
    run = make_run(tmp_path / "a", configs["dp"], LOSSES[:2])
    metrics = run / "csv" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    metrics.write_text(
        "\n".join([lines[0] + ",train/peak_memory_bytes", lines[1] + ",100", lines[2] + ",300", lines[3] + ","]) + "\n"
    )
    summary = runs_diff.summarize(runs_diff.read_metrics(run))
    assert summary["peak_memory"] == 300 and summary["peak_memory_columns"] == ["train/peak_memory_bytes"]


def test_sweep_directory_against_first_and_chosen_baseline(tmp_path, configs, capsys, monkeypatch):
    sweep = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    for job, (name, scale) in enumerate([("dp", 1.0), ("fsdp", 1.0), ("fsdp", 1.1)]):
        make_run(sweep / str(job), configs[name], [x * scale for x in LOSSES])
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    plot = tmp_path / "sweep.png"
    figures = spy_on_plot(monkeypatch)

    report = main_json(capsys, sweep, "--plot", plot)
    assert [Path(r["label"]).name for r in report["runs"]] == ["0", "1", "2"]
    assert [c["loss_curves"]["agree"] for c in report["comparisons"]] == [True, False]
    assert [c["parallel"]["other"] for c in report["comparisons"]] == ["fsdp", "fsdp"]

    report = main_json(capsys, sweep, "--baseline", "1", "--plot", plot)
    assert Path(report["baseline"]).name == "1"
    assert [Path(c["other"]).name for c in report["comparisons"]] == ["0", "2"]
    assert report["comparisons"][0]["parallel"] == {"baseline": "fsdp", "other": "dp"}
    assert_png(plot)
    assert_curves(figures[-1], [LOSSES, LOSSES, [x * 1.1 for x in LOSSES]])  # job 1 (the baseline), 0, 2


def test_plot_defaults_beside_the_runs_and_is_named(tmp_path, configs, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    for job in range(2):
        make_run(sweep / str(job), configs["dp"], LOSSES)
    figures = spy_on_plot(monkeypatch)
    report = main_json(capsys, sweep)
    assert report["plot"] == str((sweep / "runs_diff.png").resolve()) and (sweep / "runs_diff.png").is_file()
    assert_png(sweep / "runs_diff.png")
    assert_curves(figures[-1], [LOSSES, LOSSES])
    a, b = make_run(tmp_path / "a", configs["dp"], LOSSES), make_run(tmp_path / "b", configs["dp"], LOSSES[:3])
    assert runs_diff.main([str(a), str(b)]) == 0
    assert f"plot: {(a / 'runs_diff.png').resolve()} " in capsys.readouterr().out and (a / "runs_diff.png").is_file()
    assert_curves(figures[-1], [LOSSES, LOSSES[:3]])
    assert not (tmp_path / "runs_diff.png").exists()


def test_bad_paths_exit_2_with_one_line(tmp_path, configs, capsys, monkeypatch):
    good = make_run(tmp_path / "good", configs["dp"], LOSSES)
    (tmp_path / "empty").mkdir()
    result = run_script(str(good), str(tmp_path / "missing"), cwd=tmp_path)  # the command as a user runs it
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a run directory" in lines[0] and str(tmp_path / "missing") in lines[0]
    monkeypatch.chdir(tmp_path)
    assert runs_diff.main([str(good), str(tmp_path / "empty")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is not a run directory" in line and str(tmp_path / "empty") in line
    assert not (tmp_path / "runs_diff.png").exists()
    assert runs_diff.main([str(good)]) == 2
    assert "at least two runs" in capsys.readouterr().err


def test_eval_metrics_side_by_side_and_against_steps(tmp_path, configs, capsys):
    """Runs that evaluated while training: each eval/... metric's last value per run (n/a where a run did not
    log it) in the report and its JSON, and every metric against steps in <plot>_eval.png."""
    a = make_run(tmp_path / "a", configs["dp"], LOSSES)
    b = make_run(tmp_path / "b", configs["dp"], LOSSES)
    for run, values in ((a, {1: (2.5, 0.25), 3: (2.0, 0.5)}), (b, {1: (2.4, 0.5)})):
        path = run / "csv" / "metrics.csv"
        header, *rows = path.read_text().splitlines()
        header += ",eval/held/loss,eval/arc/acc"
        rows = [row + ",," for row in rows]
        rows += [f"0,{step}" + "," * (header.count(",") - 3) + f",{loss},{acc}" for step, (loss, acc) in values.items()]
        path.write_text("\n".join([header, *rows]) + "\n")
    plot = tmp_path / "out" / "curves.png"
    assert runs_diff.main([str(a), str(b), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "eval (the last value of each run, @step):" in text
    (held,) = [line for line in text.splitlines() if line.strip().startswith("held/loss")]
    assert held.split()[1:] == ["2", "@3", "2.4", "@1"]
    (arc,) = [line for line in text.splitlines() if line.strip().startswith("arc/acc")]
    assert arc.split()[1:] == ["0.5", "@3", "0.5", "@1"]
    eval_plot = tmp_path / "out" / "curves_eval.png"
    assert f"eval plot: {eval_plot.resolve()}" in text
    assert_png(eval_plot)
    report = main_json(capsys, a, b, "--plot", plot)
    assert report["eval"]["eval/held/loss"] == [{"step": 3, "value": 2.0}, {"step": 1, "value": 2.4}]
    figure = runs_diff.plot_eval(runs_diff.collect([a, b]), ["[1] a", "[2] b"], tmp_path / "again.png")
    panels = {axes.get_title(): [list(line.get_ydata()) for line in axes.get_lines()] for axes in figure.axes}
    assert panels == {"arc/acc": [[0.25, 0.5], [0.5]], "held/loss": [[2.5, 2.0], [2.4]]}
