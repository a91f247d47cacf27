"""``curry-bench-moe`` (``python scripts/bench_moe.py``): what expert parallelism and load balancing do
to ``model=moe_debug``.

1. Throughput and memory: tokens/s and per-rank peak memory for ep = 1, 2, 4 on 4 ranks at the same
   global batch (``bench.py --layouts``: every layout through the real training path, side by side).
2. Balance: the worst MoE layer's max/mean expert load over ``--steps`` steps of one process,
   with ``model.moe.balancing=aux_free`` (the bias moved by the loads), ``aux_loss`` and ``none``:
   the mean of the last quarter of the steps, and the loss at the end.

Extra arguments are Hydra overrides for every run (e.g. ``data.seq_len=256``).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from curry_train.cli.bench import main as bench_main
from curry_train.cli.common import fail

TRAIN = Path(__file__).resolve().parents[2] / "train.py"  # the checkout's entry point (pip install -e .)
BASE = ("model=moe_debug", "logger=csv", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0")
BALANCING = {
    "aux_free": ("model.moe.balancing=aux_free", "model.moe.bias_update_rate=0.01"),
    "aux_loss": ("model.moe.balancing=aux_loss", "model.moe.aux_loss_coef=0.01"),
    "none": ("model.moe.balancing=none",),
}


def _run(args: Sequence[str], cwd: Path) -> None:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        sys.stderr.write(result.stdout[-2000:] + result.stderr[-4000:])
        raise SystemExit(f"bench_moe: {' '.join(args[:1])} exited {result.returncode}")


def _metric(run_dir: Path, key: str) -> list[float]:
    (path,) = run_dir.rglob("metrics.csv")
    with path.open() as rows:
        return [float(row[key]) for row in csv.DictReader(rows) if row.get(key)]


def layouts(overrides: Sequence[str], steps: int) -> None:
    print("== tokens/s and per-rank peak memory, 4 ranks, the same global batch", flush=True)
    specs = [
        "ep1: parallel=dp trainer.devices=4",
        "ep2: parallel=ep parallel.ep.size=2 trainer.devices=4",
        "ep4: parallel=ep parallel.ep.size=4 trainer.devices=4",
    ]
    args = ["--layouts", "--steps", str(steps), *BASE, *overrides]
    for spec in specs:
        args += ["--layout", spec]
    code = bench_main(args)
    if code:
        raise SystemExit(f"bench_moe: bench --layouts exited {code}")


def balance(overrides: Sequence[str], steps: int, work: Path) -> dict[str, tuple[float, float]]:
    print(f"== worst layer's max/mean expert load over {steps} steps, one process", flush=True)
    results = {}
    for name, settings in BALANCING.items():
        run_dir = work / f"balance-{name}"
        args = [str(TRAIN), *BASE, f"trainer.max_steps={steps}", "checkpoint.save_on_end=false"]
        args += ["checkpoint.every_n_steps=0", *settings, *overrides, f"hydra.run.dir={run_dir}"]
        _run(args, work)
        imbalance = _metric(run_dir, "train/moe_load_imbalance")
        tail = imbalance[-max(1, len(imbalance) // 4) :]
        results[name] = (statistics.mean(tail), _metric(run_dir, "train/loss")[-1])
    print(f"{'balancing':<10}{'max/mean load (last quarter)':>30}{'final loss':>12}")
    for name, (load, loss) in results.items():
        print(f"{name:<10}{load:>30.3f}{loss:>12.4f}")
    on, off = results["aux_free"][0], results["none"][0]
    print(f"aux_free leaves the busiest expert {on:.2f}x the mean load against {off:.2f}x without balancing")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each balancing run (default 300)")
    parser.add_argument("--layout-steps", type=int, default=10, help="timed steps per layout (default 10)")
    parser.add_argument("--skip-layouts", action="store_true", help="only the balancing runs")
    args = parser.parse_args(argv)
    if args.steps < 4 or args.layout_steps < 1:
        return fail(parser.prog, "--steps must be at least 4 and --layout-steps at least 1")
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        work = Path(tmp)
        if not args.skip_layouts:
            layouts(args.overrides, args.layout_steps)
        balance(args.overrides, args.steps, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
