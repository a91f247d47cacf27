"""A mixture's loader state travels with the checkpoint: a 3-source mixture saved under fsdp on 4 ranks
(at a step, killed with SIGKILL, or preempted with SIGTERM) resumes on 1, 2 and 4 ranks and under tp 2
on the curve of the uninterrupted single-process run.

The source runs and resumes run in the session's worker pools; the two killed runs are real ``train.py``
launches (4 spawned workers), as a cluster sees them.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    FAST,
    STEPS,
    assert_same_curve,
    hydra_value,
    kill_group,
    read_metric,
    start_train,
    train,
    wait_until,
)

from curry_train.checkpoint import dcp, files
from curry_train.data.sources import TokenFileMeta


@pytest.fixture(scope="session")
def mixture(tmp_path_factory) -> tuple[str, ...]:
    """FAST on three sources: token file 0.5, JSONL 0.3, Parquet 0.2. The Parquet source holds about 20
    rows, so it starts its second epoch within the curve's 10 steps (32 of its rows)."""
    pq, pa = pytest.importorskip("pyarrow.parquet"), pytest.importorskip("pyarrow")
    root = tmp_path_factory.mktemp("mixture-data")
    rng = np.random.default_rng(0)
    web = rng.integers(1, 256, size=40_000).astype(np.uint16)
    web.tofile(root / "web.bin")
    TokenFileMeta("uint16", len(web), 256, "byte", 0).write(root / "web.bin")
    text = [" ".join(f"m{int(x)}" for x in rng.integers(0, 99, size=int(rng.integers(3, 40)))) for _ in range(400)]
    (root / "math.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    code = [f"def f{i}(x):\n    return x * {i}\n" for i in range(50)]
    pq.write_table(pa.table({"content": code}), root / "code.parquet", row_group_size=8)
    sources = {
        "web": {"kind": "tokens", "paths": [str(root / "web.bin")], "weight": 0.5},
        "math": {"kind": "files", "paths": [str(root / "math.jsonl")], "weight": 0.3},
        "code": {"kind": "parquet", "paths": [str(root / "code.parquet")], "weight": 0.2, "text_key": "content"},
    }
    return (*FAST, f"data.sources={hydra_value(sources)}", "data.tokenizer=byte", "data.shuffle_window=8")


@pytest.fixture(scope="session")
def mixture_curve(pools, mixture, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted single-process run: STEPS steps."""
    run = train(pools, [*mixture, f"trainer.max_steps={STEPS}"], tmp_path_factory.mktemp("mix-single"))
    tokens = {name: read_metric(run, f"train/tokens/{name}") for name in ("web", "math", "code")}
    for name, weight in (("web", 0.5), ("math", 0.3), ("code", 0.2)):  # the tokens each has served, per step
        for step, served in tokens[name].items():
            assert abs(served - weight * 16 * 64 * (step + 1)) <= 64, (name, step, served)
    return read_metric(run)


@pytest.mark.slow
def test_a_mixture_saved_on_4_ranks_resumes_on_1_2_4_and_under_tp(pools, mixture, mixture_curve, tmp_path):
    saved = train(pools, [*mixture, "trainer.max_steps=4", "parallel=fsdp", "trainer.devices=4"], tmp_path / "saved")
    assert_same_curve(read_metric(saved), {s: mixture_curve[s] for s in range(4)})
    step4 = saved / "checkpoints" / files.checkpoint_name(4)
    layouts = {
        "single": [],
        "fsdp2": ["parallel=fsdp", "trainer.devices=2"],
        "fsdp4": ["parallel=fsdp", "trainer.devices=4"],
        "tp2": ["parallel=tp", "trainer.devices=2"],
    }
    for name, layout in layouts.items():
        resumed = train(pools, [*mixture, f"trainer.max_steps={STEPS}", *layout, f"ckpt_path={step4}"], tmp_path / name)
        curve = read_metric(resumed)
        assert sorted(curve) == list(range(4, STEPS)), name
        assert_same_curve(curve, {s: mixture_curve[s] for s in range(4, STEPS)})


def steps_logged(run_dir: Path) -> int:
    return len(read_metric(run_dir)) if (run_dir / "csv" / "metrics.csv").is_file() else 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, resumed_on",
    [
        pytest.param(signal.SIGKILL, ["parallel=fsdp", "trainer.devices=2"], id="sigkill-to-fsdp2"),
        pytest.param(signal.SIGTERM, [], id="sigterm-to-one-process"),
    ],
)
def test_a_killed_mixture_run_resumes_on_the_uninterrupted_curve(
    pools, mixture, mixture_curve, tmp_path, signum, resumed_on
):
    """fsdp on 4 spawned workers, checkpoints every 2 steps, killed after step 3 (SIGKILL: the last
    periodic checkpoint is what is left; SIGTERM: the preemption save of the step in flight); resumed
    elsewhere, it trains the rest of the uninterrupted curve."""
    run_dir = tmp_path / "killed"
    args = [*mixture, "parallel=fsdp", "trainer.devices=4", "trainer.max_steps=1000", "checkpoint.every_n_steps=2"]
    process = start_train([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    try:
        wait_until(lambda: steps_logged(run_dir) >= 4, process, "step 4")
        os.kill(process.pid if signum == signal.SIGTERM else -process.pid, signum)
        process.communicate(timeout=120)
    finally:
        kill_group(process)
    assert process.returncode == (75 if signum == signal.SIGTERM else -signal.SIGKILL)
    last = files.checkpoints_in(run_dir / "checkpoints")[-1]
    step = dcp.saved_step(last)
    assert 2 <= step < STEPS
    resumed = train(
        pools, [*mixture, f"trainer.max_steps={STEPS}", *resumed_on, f"ckpt_path={last}"], tmp_path / "resumed"
    )
    curve = read_metric(resumed)
    assert sorted(curve) == list(range(step, STEPS))
    assert_same_curve(curve, {s: mixture_curve[s] for s in range(step, STEPS)})


@pytest.mark.slow
def test_each_source_is_validated_on_its_own_held_out_rows(pools, mixture, tmp_path):
    """val/<source>/loss per source that holds out a global batch (code's 10 held-out documents make 5
    rows, none), val/loss over all their tokens; the same numbers under fsdp on 2 ranks."""
    validate = [*mixture, "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=2"]
    runs = {}
    for name, layout in (("single", []), ("fsdp2", ["parallel=fsdp", "trainer.devices=2"])):
        run = train(pools, [*validate, "data.val_fraction=0.2", *layout], tmp_path / name)
        runs[name] = {key: read_metric(run, key) for key in ("val/loss", "val/web/loss", "val/math/loss")}
        with (run / "csv" / "metrics.csv").open() as table:
            assert "val/code/loss" not in table.readline()
        (web,), (math,), (total,) = (runs[name][k].values() for k in ("val/web/loss", "val/math/loss", "val/loss"))
        assert web != math and total == pytest.approx((web + math) / 2, rel=1e-6)  # 2 batches of each, as many tokens
    for key, values in runs["single"].items():
        assert_same_curve(runs["fsdp2"][key], values)


@pytest.mark.slow
def test_a_run_stops_where_a_source_runs_out_under_exhausted_stop(pools, mixture, mixture_curve, tmp_path):
    """data.exhausted=stop: the Parquet source's ~20 rows last 6 steps at 3.2 rows a step; the run ends
    there (not at max_steps), on the curve of the repeating run, with a last checkpoint."""
    run = train(pools, [*mixture, "data.exhausted=stop", "trainer.max_steps=50"], tmp_path / "stopped")
    curve = read_metric(run)
    assert 3 <= len(curve) < STEPS and sorted(curve) == list(range(len(curve)))
    assert_same_curve(curve, {s: mixture_curve[s] for s in curve})
    (last,) = files.checkpoints_in(run / "checkpoints")[-1:]
    assert dcp.saved_step(last) == len(curve)
