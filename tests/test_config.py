"""The config tree: the typed schema, parallel=a+b in every place Hydra composes, recipes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, clean_env
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import curry_train  # noqa: F401  (registers the combos source)
from curry_train.config import ConfigError, compose
from curry_train.config.checks import enabled_options


def write_tree(root: Path) -> Path:
    """A config tree whose `parallel` group has three options, each owning its own subtree."""
    files = {
        "config.yaml": """
            defaults:
              - parallel: a
              - _self_
              - optional recipe: null
            hydra:
              searchpath:
                - parallel-combos://
            seed: 0
        """,
        "parallel/a.yaml": "a:\n  size: 1\n",
        "parallel/b.yaml": "b:\n  size: 2\n",
        "parallel/c.yaml": "c:\n  size: 3\n",
        "recipe/team.yaml": """
            # @package _global_
            defaults:
              - override /parallel: c+a
            seed: 7
        """,
    }
    for name, text in files.items():
        path = root / "conf" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root / "conf"


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_tree(tmp_path)


@pytest.mark.parametrize("choice, expected", [("a", {"a"}), ("a+b", {"a", "b"}), ("c+a+b", {"a", "b", "c"})])
def test_combination_composes_each_option_subtree(tree, choice, expected):
    cfg = compose([f"parallel={choice}"], tree)
    assert set(cfg.parallel) == expected
    sizes = {"a": 1, "b": 2, "c": 3}
    assert all(cfg.parallel[name].size == sizes[name] for name in expected)


def test_order_of_options_does_not_matter(tree):
    assert compose(["parallel=a+b+c"], tree) == compose(["parallel=c+b+a"], tree)


@pytest.mark.parametrize(
    "choice, message", [("a+a", "more than once"), ("a+", "empty option"), ("a+nope", "parallel/nope")]
)
def test_bad_combinations_are_rejected(tree, choice, message):
    with pytest.raises(Exception) as error:
        compose([f"parallel={choice}"], tree)
    assert message in str(error.value) + str(error.value.__cause__)


def test_recipe_defaults_list_can_name_a_combination(tree):
    cfg = compose(["recipe=team"], tree)
    assert set(cfg.parallel) == {"a", "c"} and cfg.seed == 7


def test_combination_in_a_multirun_sweep(tree, tmp_path):
    app = tmp_path / "app.py"
    app.write_text(
        textwrap.dedent(f"""
        import hydra
        import curry_train  # registers parallel=a+b
        from omegaconf import OmegaConf

        @hydra.main(config_path={str(tree)!r}, config_name="config", version_base=None)
        def main(cfg):
            print("JOB", ",".join(sorted(cfg.parallel)))

        main()
    """)
    )
    out = subprocess.run(
        [sys.executable, str(app), "-m", "parallel=a,b+a,a+b+c", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    jobs = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("JOB")]
    assert jobs == ["a", "a,b", "a,b,c"]


def test_project_tree_defaults():
    cfg = compose()
    assert enabled_options(cfg) == ["dp"]
    assert cfg.model.name == "debug" and cfg.data.source == "stdlib" and cfg.logger.kind == "wandb"


def test_project_recipe_runs_from_recipes_folder():
    assert (REPO / "conf" / "recipe").resolve() == (REPO / "recipes").resolve()
    cfg = compose(["recipe=debug-dp2"])
    assert cfg.trainer.devices == 2 and cfg.logger.kind == "csv"
    assert cfg.checkpoint.every_n_steps == 50  # a recipe overrides conf/config.yaml's own keys too


def test_shipped_recipes_compose_under_the_schema():
    cfg = compose(["recipe=llama3-8b-fsdp", "data.paths=[/data/corpus.bin]"])
    assert cfg.model.name == "llama3_8b" and cfg.parallel.fsdp.mixed_precision == "bf16"
    assert cfg.data.source == "tokens" and cfg.trainer.devices == 8 and cfg.parallel.recompute == "selective"


@pytest.mark.parametrize(
    "override, key, kind",
    [
        ("model.dimm=3", "model.dimm", ConfigError),
        ("trainer.devices=two", "trainer.devices", ConfigCompositionException),
    ],
)
def test_schema_rejects_misspelt_keys_and_wrong_types(override, key, kind):
    with pytest.raises(kind) as error:
        compose([override])
    assert key in str(error.value) + str(error.value.__cause__)


def test_schema_rejects_unknown_key_in_a_yaml_file(tmp_path):
    """A recipe with a typo is caught by the schema too, not only command-line overrides."""
    conf = tmp_path / "conf"

    shutil.copytree(REPO / "conf", conf, symlinks=False)
    (conf / "recipe" / "typo.yaml").write_text("# @package _global_\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(Exception) as error:
        compose(["recipe=typo"], conf)
    assert "learning_rate" in str(error.value) + str(error.value.__cause__)


def test_every_yaml_key_is_documented_by_the_schema():
    """Every option file of every group composes under the schema."""
    for group in ("model", "data", "optim", "trainer", "logger", "parallel"):
        for path in sorted((REPO / "conf" / group).glob("*.yaml")):
            overrides = [f"{group}={path.stem}"]
            if group == "data" and path.stem != "stdlib":
                overrides.append("data.paths=[x]")
            cfg = compose(overrides)
            assert OmegaConf.to_container(cfg[group] if group != "parallel" else cfg.parallel, resolve=True)
