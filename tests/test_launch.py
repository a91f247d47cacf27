"""How processes are found: curry-train's own workers, torchrun, srun."""

from __future__ import annotations

import pytest

from curry_train.config import ConfigError
from curry_train.config.checks import external_launcher
from curry_train.launch import hydra_overrides_for_external_launcher


@pytest.mark.parametrize(
    "env, launcher",
    [
        ({}, None),
        ({"TORCHELASTIC_RUN_ID": "abc", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "torchrun"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "torchrun"),
        ({"SLURM_NTASKS": "16", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3"}, "slurm"),
        ({"SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}, None),  # one task: an interactive allocation
        ({"SLURM_NTASKS": "16", "SLURM_JOB_ID": "7"}, None),  # sbatch script itself, not under srun
    ],
)
def test_external_launcher_detection(env, launcher):
    assert external_launcher(env) == launcher


def test_ranks_of_an_external_launcher_agree_on_one_run_directory():
    rank0 = {"TORCHELASTIC_RUN_ID": "job9", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    rank1 = {**rank0, "RANK": "1", "LOCAL_RANK": "1"}
    assert hydra_overrides_for_external_launcher([], rank0) == ["hydra.run.dir=outputs/torchrun-job9"]
    assert hydra_overrides_for_external_launcher([], rank1) == [
        "hydra.run.dir=outputs/torchrun-job9",
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
    ]
    slurm = {"SLURM_NTASKS": "8", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_JOB_ID": "42"}
    assert hydra_overrides_for_external_launcher(["hydra.run.dir=/shared/run"], slurm) == [
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
    ]
    assert hydra_overrides_for_external_launcher(["seed=1"], {}) == []


def test_multirun_under_an_external_launcher_is_refused():
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    with pytest.raises(ConfigError, match="start one torchrun job per configuration"):
        hydra_overrides_for_external_launcher(["-m", "seed=1,2"], env)
