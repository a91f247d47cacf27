"""Evaluation in the loop: lm-eval's interface over the live model of each layout against lm-eval's own
Hugging Face backend, scores during training against curry-eval on the same checkpoint, a run that
evaluates training bit for bit as one that does not, and one-line refusals. The tasks are the tiny local
ones of tests/data/lm_eval_tasks (nothing is downloaded)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import FAST, hydra_value, read_metric, train

from curry_train.config import ConfigError, compose
from curry_train.config.checks import check, check_evaluation
from curry_train.config.schema import Config

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS_DIR = Path(__file__).parent / "data" / "lm_eval_tasks"
TASKS = ["curry_tiny_choice", "curry_tiny_generate", "curry_tiny_rolling"]
HARNESS = (f"eval.harness.tasks={hydra_value(TASKS)}", f"eval.harness.include_path={TASKS_DIR}")
SEQ = 64  # the window: our data.seq_len, HFLM's max_length
LAYOUTS = {
    "1": (),
    "fsdp-2": ("parallel=fsdp", "trainer.devices=2"),
    "tp-2": ("parallel=tp", "trainer.devices=2"),
    "pp-2": ("parallel=pp", "trainer.devices=2"),
    # beyond the list: context parallelism, sequence parallelism with loss parallelism
    "cp-2": ("parallel=cp", "trainer.devices=2"),
    "tp-2-sp": ("parallel=tp", "parallel.tp.sequence_parallel=true", "trainer.devices=2"),
}


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    from test_hf import write_model  # noqa: PLC0415

    return write_model(tmp_path_factory.mktemp("eval") / "llama3", "llama3")


def _samples(out: dict) -> dict[str, list]:
    """Per task, each document's responses in document order."""
    return {
        task: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in out["samples"].items()
    }


@pytest.fixture(scope="module")
def hf_reference(hf_model) -> tuple[dict, dict]:
    return _hflm(hf_model)


def harness_job(container: dict, dims, checkpoint: str | None = None) -> tuple[dict, dict]:
    """On each rank of a pool: the model in its layout (``checkpoint``'s tensors over it), lm-eval over it;
    every request's answer and the scores."""
    from curry_train.config.eval_tasks import task_manager  # noqa: PLC0415
    from curry_train.evaluation.harness import EvalTokenizer, _quiet_run, curry_lm, metrics_of  # noqa: PLC0415
    from curry_train.evaluation.live import live_step  # noqa: PLC0415
    from curry_train.evaluation.scoring import Scorer  # noqa: PLC0415

    cfg = Config.of(container)
    step = live_step(cfg, dims, torch.device("cpu"), checkpoint)
    rows = cfg.data.global_batch_size // dims.dp
    lm = curry_lm(Scorer(step, rows, cfg.data.seq_len), EvalTokenizer(cfg.data.tokenizer))
    with _quiet_run():
        out = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=task_manager(str(TASKS_DIR), TASKS))
    return _samples(out), metrics_of(out["results"])


def _eval_cfg(hf_model: Path, *layout: str):
    from curry_train.evaluate import eval_config  # noqa: PLC0415

    overrides = [f"data.seq_len={SEQ}", "data.global_batch_size=8", "data.micro_batch_size=2", *layout]
    cfg = eval_config(hf_model, overrides)
    return cfg, check_evaluation(cfg)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_adapter_scores_as_lm_evals_hugging_face_backend(layout, hf_model, hf_reference, pools):
    """Each loglikelihood (multiple choice, every choice) and rolling loglikelihood within 1e-4 of HFLM's
    (fp32: measured ~1e-6), the same greedy flags and generated text, and the same task scores (accuracy and
    exact match identical; perplexities to 1e-5 relative), in one process and split over 2 ranks."""
    cfg, plan = _eval_cfg(hf_model, *LAYOUTS[layout])
    from omegaconf import OmegaConf  # noqa: PLC0415

    container = OmegaConf.to_container(cfg, resolve=True)
    samples, scores = pools.run(plan.dims.world_size, harness_job, container, plan.dims)[0]
    assert_same_answers((samples, scores), hf_reference)


def _hflm(directory: Path) -> tuple[dict, dict]:
    """lm-eval's own Hugging Face backend on ``directory``: each request's answer, and the task scores."""
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

    from curry_train.config.eval_tasks import task_manager  # noqa: PLC0415
    from curry_train.evaluation.harness import metrics_of  # noqa: PLC0415

    model = HFLM(pretrained=str(directory), device="cpu", batch_size=4, dtype="float32", max_length=SEQ)
    out = lm_eval.simple_evaluate(model=model, tasks=TASKS, task_manager=task_manager(str(TASKS_DIR), TASKS))
    return _samples(out), metrics_of(out["results"])


def assert_same_answers(ours: tuple[dict, dict], reference: tuple[dict, dict]) -> None:
    samples, scores = ours
    want_samples, want_scores = reference
    assert samples.keys() == want_samples.keys() == set(TASKS)
    compared = 0
    for task in TASKS:
        for ours, theirs in zip(samples[task], want_samples[task], strict=True):
            for got, want in zip(ours, theirs, strict=True):
                got, want = got[0], want[0]
                if isinstance(want, str):  # generation
                    assert got == want, task
                elif isinstance(want, (tuple, list)):  # (loglikelihood, is_greedy)
                    assert abs(got[0] - want[0]) <= 1e-4, (task, got, want)
                    assert got[1] == want[1], (task, got, want)
                else:  # rolling loglikelihood
                    assert abs(got - want) <= 1e-4, (task, got, want)
                compared += 1
    assert compared == 12 * 3 + 4 * 1 + 8 * 1 + 6  # every choice of every question, every text, every prompt
    assert scores.keys() == want_scores.keys()
    for task, metrics in want_scores.items():
        for metric, value in metrics.items():
            if metric in ("acc", "acc_norm", "exact_match"):
                assert scores[task][metric] == value, (task, metric)
            else:
                # a perplexity is exp of a mean log-likelihood, so it carries the fp32 noise of the sums:
                # 1.3e-6 relative on an AMD EPYC without AVX-512 (measured), 1e-7 on the machines before;
                # a window or token count off by one moves it by 1e-2 or more
                assert math.isclose(scores[task][metric], value, rel_tol=1e-5), (task, metric)


def test_a_trained_checkpoint_scores_as_lm_eval_scores_its_export(pools, tmp_path, hf_model):
    """Two steps of fine-tuning from the tiny model, exported with --format hf: lm-eval's Hugging Face
    backend on the export and our adapter on the checkpoint under tp 2 give the same answers and scores."""
    from omegaconf import OmegaConf  # noqa: PLC0415

    from curry_train.checkpoint import files  # noqa: PLC0415
    from curry_train.cli import export as export_cli  # noqa: PLC0415
    from curry_train.evaluate import eval_config  # noqa: PLC0415

    text = _held_out_text(tmp_path / "text.txt")
    tune = [
        *FAST,
        f"model.init_from={hf_model}",
        f"data.tokenizer={hf_model}",
        "data.source=files",
        f"data.paths=[{text}]",
    ]
    checkpoint = files.last_checkpoint(train(pools, [*tune, "trainer.max_steps=2", "optim.lr=1e-2"], tmp_path / "run"))
    assert export_cli.main([str(checkpoint), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    reference = _hflm(tmp_path / "hf")
    cfg = eval_config(checkpoint, ["parallel=tp", "trainer.devices=2"])
    plan = check_evaluation(cfg)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert_same_answers(pools.run(2, harness_job, container, plan.dims, str(checkpoint))[0], reference)
    assert reference[0] != _hflm(hf_model)[0]  # the two steps changed the answers


def _held_out_text(path: Path) -> Path:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(30)) for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _eval_rows(run: Path) -> dict[int, dict[str, float]]:
    (path,) = list(run.rglob("metrics.csv"))
    rows: dict[int, dict[str, float]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            values = {k: float(v) for k, v in row.items() if k.startswith("eval/") and v}
            if values:
                rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def test_scores_during_training_equal_curry_eval_on_the_checkpoint(pools, tmp_path):
    """fsdp on 2 ranks evaluates a held-out set and the three tasks every 2 steps; curry-eval on the
    checkpoint of step 2, in the same layout, gives the same numbers (in the row of step 2's weights), and
    the closing values are the last evaluation's. In one process curry-eval agrees to fp32 noise."""
    from curry_train.evaluate import eval_config, evaluate  # noqa: PLC0415

    held = _held_out_text(tmp_path / "held.txt")
    sets = f"eval.sets={hydra_value({'held': {'kind': 'files', 'paths': [str(held)]}})}"
    layout = ("parallel=fsdp", "trainer.devices=2")
    overrides = [*FAST, *layout, "trainer.max_steps=4", "eval.every_n_steps=2", sets, *HARNESS]
    run = train(pools, [*overrides, "checkpoint.every_n_steps=2", "checkpoint.keep_last=3"], tmp_path / "run")
    during = _eval_rows(run)
    assert sorted(during) == [1, 3]  # after steps 2 and 4 (metrics.csv counts steps from 0)
    assert {
        "eval/held/loss",
        "eval/held/ppl",
        "eval/curry_tiny_choice/acc",
        "eval/curry_tiny_rolling/word_perplexity",
    } <= set(during[1])
    assert during[3]["eval/held/loss"] < during[1]["eval/held/loss"]  # training moved it
    checkpoint = run / "checkpoints" / "step-00000002"
    cfg = eval_config(checkpoint, list(layout))  # the run's own sets and tasks
    plan = check_evaluation(cfg)
    after = evaluate(cfg, plan.dims, plan.accelerator, checkpoint, pools=pools)
    assert after == during[1]
    cfg = eval_config(checkpoint, [])
    plan = check_evaluation(cfg)
    alone = evaluate(cfg, plan.dims, plan.accelerator, checkpoint, pools=pools)
    assert alone.keys() == during[1].keys()
    for key, value in during[1].items():
        assert math.isclose(alone[key], value, rel_tol=1e-5), key


def test_evaluating_does_not_change_the_training_curve(pools, tmp_path):
    """With dropout (whose masks draw from the generators lm-eval seeds), a run that evaluates a set and a
    task every 2 steps trains bit for bit as the same run without evaluation."""
    held = _held_out_text(tmp_path / "held.txt")
    common = [*FAST, "model.dropout=0.1", "trainer.max_steps=6", "checkpoint.every_n_steps=0"]
    plain = train(pools, common, tmp_path / "plain")
    evaluated = train(
        pools,
        [
            *common,
            "eval.every_n_steps=2",
            f"eval.sets={hydra_value({'held': {'kind': 'files', 'paths': [str(held)]}})}",
            "eval.harness.tasks=[curry_tiny_choice]",
            f"eval.harness.include_path={TASKS_DIR}",
            "eval.harness.limit=4",
        ],
        tmp_path / "evaluated",
    )
    assert len(_eval_rows(evaluated)) == 3
    for key in ("train/loss", "train/grad_norm"):
        assert read_metric(evaluated, key) == read_metric(plain, key), key


def _task_copy(tmp_path: Path, drop_data: bool) -> Path:
    """The tiny tasks in a directory of their own, their data files left out if ``drop_data``."""
    directory = tmp_path / "tasks"
    directory.mkdir()
    for path in TASKS_DIR.iterdir():
        if path.suffix != ".jsonl" or not drop_data:
            (directory / path.name).write_bytes(path.read_bytes())
    return directory


@pytest.mark.parametrize(
    "case, message",
    [
        ("every-negative", "eval.every_n_steps=-1: expected 0 (after the last step only) to trainer.max_steps=8"),
        ("every-too-far", "eval.harness.every_n_steps=9: expected 0"),
        ("max-batches", "eval.max_batches=0 must be at least 1"),
        ("unknown-task", "eval.harness.tasks: unknown task 'curry_tiny_chioce'"),
        ("missing-data", "eval.harness.tasks: curry_tiny_choice: its data could not be loaded"),
        ("no-include-path", "eval.harness.include_path="),
        ("empty-set", "eval.sets.tiny: empty"),
        ("missing-set", "eval.sets.gone:"),
        ("other-vocabulary", "eval.sets.bpe: its tokens are of another vocabulary"),
        ("not-a-map", "eval.sets: a map name -> data source"),
    ],
)
def test_bad_eval_settings_are_one_line(case, message, tmp_path, hf_model):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short\n")
    bpe = {"kind": "files", "paths": [str(_held_out_text(tmp_path / "h.txt"))], "tokenizer": str(hf_model)}
    overrides = {
        "every-negative": ["eval.every_n_steps=-1"],
        "every-too-far": ["eval.harness.every_n_steps=9"],
        "max-batches": ["eval.max_batches=0"],
        "unknown-task": ["eval.harness.tasks=[curry_tiny_chioce]", f"eval.harness.include_path={TASKS_DIR}"],
        "missing-data": [
            "eval.harness.tasks=[curry_tiny_choice]",
            f"eval.harness.include_path={_task_copy(tmp_path, True)}",
        ],
        "no-include-path": ["eval.harness.tasks=[curry_tiny_choice]", f"eval.harness.include_path={tmp_path / 'none'}"],
        "empty-set": [f"eval.sets={hydra_value({'tiny': {'kind': 'files', 'paths': [str(tiny)]}})}"],
        "missing-set": [f"eval.sets={hydra_value({'gone': {'kind': 'files', 'paths': [str(tmp_path / 'no.txt')]}})}"],
        "other-vocabulary": [f"eval.sets={hydra_value({'bpe': bpe})}"],
        "not-a-map": ["eval.sets=[1,2]"],
    }[case]
    cfg = compose([*FAST, "trainer.max_steps=8", *overrides])
    with pytest.raises(ConfigError) as error:
        check(cfg, env={}, run_dir=tmp_path / "run")
    (line,) = str(error.value).splitlines()
    assert message in line, line


def test_curry_eval_command(hf_model, tmp_path, capsys):
    """curry-eval on a Hugging Face directory in one process: a line per metric and the JSON file; bad
    arguments are one line and exit status 2, before any model is built."""
    from curry_train.cli import eval as eval_cli  # noqa: PLC0415

    out = tmp_path / "scores.json"
    args = [str(hf_model), "tasks=curry_tiny_choice", f"include_path={TASKS_DIR}", "limit=6", f"data.seq_len={SEQ}"]
    assert eval_cli.main([*args, "--output", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["eval/curry_tiny_choice/acc", "eval/curry_tiny_choice/acc_norm"]
    saved = json.loads(out.read_text())["metrics"]
    assert [f"{key}\t{value:.6g}" for key, value in saved.items()] == lines
    # split over 2 local processes, as a user runs it (the command's own pool): the same scores
    assert eval_cli.main([*args, "parallel=fsdp", "trainer.devices=2"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == lines
    for bad, message in [
        ([str(tmp_path / "nowhere"), "tasks=x"], "no such directory"),
        ([str(tmp_path)], "neither a curry-train checkpoint nor a Hugging Face model directory"),
        ([str(hf_model)], "nothing to evaluate"),
        ([str(hf_model), "tasks=nope_task"], "unknown task 'nope_task'"),
        ([str(hf_model), "tasks"], "expected key=value"),
    ]:
        assert eval_cli.main(bad) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("curry-eval: error:") and message in line, line
