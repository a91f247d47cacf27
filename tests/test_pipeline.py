"""Pipeline parallelism: PipelineSchedule on torch.distributed.pipelining, stage splitting, parallel=pp."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import run_seed_example

from curry_train.config import ConfigError, compose
from curry_train.config.checks import check, pipeline_microbatches
from curry_train.layout.pipeline import canonical_kind, check_microbatches, split_layers, stage_to_rank, stages_per_rank
from curry_train.model.llama import Llama
from curry_train.primitives import PipelineSchedule
from curry_train.primitives.materialize import materialize_and_init
from curry_train.primitives.pipeline_schedule import pipeline_stages
from curry_train.validation.whitebox import compare


def test_balanced_split_weighs_embedding_and_head_as_layers():
    assert [len(r) for r in split_layers(4, 2)] == [2, 2]
    assert [len(r) for r in split_layers(6, 4)] == [1, 2, 2, 1]  # loads 2, 2, 2, 2
    assert max(len(r) + (i == 0) + (i == 3) for i, r in enumerate(split_layers(8, 4))) == 3  # 10 units over 4
    assert [list(r) for r in split_layers(5, 2, layers_per_stage=[1, 4])] == [[0], [1, 2, 3, 4]]
    ranges = split_layers(30, 8)
    assert [i for r in ranges for i in r] == list(range(30)) and all(len(r) >= 1 for r in ranges)
    loads = [len(r) + (i == 0) + (i == 7) for i, r in enumerate(ranges)]
    assert max(loads) == 4  # 32 units over 8 stages


@pytest.mark.parametrize(
    "args, message",
    [
        ((4, 5), "5 pipeline stages but the model has 4 layers"),
        ((4, 2, [1, 2]), "summing to 4 layers"),
        ((4, 2, [1, 2, 1]), "expected 2 non-negative counts"),
    ],
)
def test_split_errors(args, message):
    with pytest.raises(ValueError, match=message):
        split_layers(*args)


def test_stage_maps_and_schedule_constraints():
    assert stage_to_rank("interleaved", 2, 6) == [0, 1, 0, 1, 0, 1]
    assert stage_to_rank("zbv", 3, 6) == [0, 1, 2, 2, 1, 0]
    assert stages_per_rank("1F1B") == 1 and stages_per_rank("interleaved", 3) == 3 and stages_per_rank("dualpipev") == 2
    assert canonical_kind("1f1b") == canonical_kind("1F1B") == "1f1b"
    with pytest.raises(ValueError, match="expected one of gpipe, 1F1B"):
        canonical_kind("2F2B")
    with pytest.raises(ValueError, match="one stage per rank"):
        stages_per_rank("1F1B", 2)
    with pytest.raises(ValueError, match="at least as many micro-batches as stages: 2 < 4"):
        check_microbatches("1F1B", 2, 4, 4)
    with pytest.raises(ValueError, match="use a multiple of 2"):
        check_microbatches("interleaved", 5, 2, 4)
    with pytest.raises(ValueError, match="3 < 4"):
        check_microbatches("zbv", 3, 2, 4)
    check_microbatches("gpipe", 1, 4, 4)  # GPipe takes any count


def test_stages_keep_parameter_names_and_cover_the_model():
    cfg = compose().model
    with torch.device("meta"):
        names = {n for n, _ in Llama(cfg).named_parameters()}
    for kind in ("1F1B", "interleaved", "zbv"):
        held = []
        for rank in range(2):
            with torch.device("meta"):
                local, stages = pipeline_stages(Llama(cfg), kind, 2, rank)
            held.append({n for n, _ in local.named_parameters()})
            local_stages = [s for s in stages if s is not None]
            assert len(local_stages) == stages_per_rank(kind)
            # the views share the rank's modules: their parameters are the container's
            assert {id(p) for s in local_stages for p in s.parameters()} == {id(p) for p in local.parameters()}
        assert held[0] | held[1] == names and not held[0] & held[1], kind
    with torch.device("meta"):
        local, _ = pipeline_stages(Llama(cfg), "zbv", 2, 0)
    assert local.tok_embeddings is not None and local.output is not None  # V: first and last stage on rank 0


def _pipeline_against_reference(kinds: list[str], n_microbatches: int, n_layers: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = compose([f"model.n_layers={n_layers}"]).model
    results = {}
    for kind in kinds:
        with torch.device("meta"):
            model = Llama(cfg)
        materialize_and_init(model, torch.device("cpu"), 0)
        reference = copy.deepcopy(model)
        local, stages = pipeline_stages(model, kind, world, rank)
        optimizer = torch.optim.SGD(local.parameters(), lr=0.0)  # stepped and zeroed by train_step
        schedule = PipelineSchedule(kind, n_microbatches, stages, pp_group=dist.group.WORLD)
        tokens = torch.randint(0, cfg.vocab_size, (2 * n_microbatches, 17), generator=torch.Generator().manual_seed(1))
        result = schedule.train_step(list(tokens.split(2)))
        grads = {n: p.grad.clone() for n, p in local.named_parameters()}
        logits = reference(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum") / tokens[:, 1:].numel()
        loss.backward()
        errors = {
            n: ((g - reference.get_parameter(n).grad).norm() / reference.get_parameter(n).grad.norm()).item()
            for n, g in grads.items()
        }
        micro = (
            torch.stack(
                [
                    F.cross_entropy(reference(mb[:, :-1]).flatten(0, 1), mb[:, 1:].flatten(), reduction="sum")
                    for mb in tokens.split(2)
                ]
            ).detach()
            / tokens[:, 1:].numel()
        )
        results[kind] = {
            "loss": (result.loss.item(), loss.item()),
            "errors": errors,
            "micro": (result.losses.tolist(), micro.tolist()),
            "stepped": result.stepped,
            "optimizer": optimizer,
        }
        schedule.optimizer = optimizer
        schedule.train_step(tokens)  # one batch tensor, split by the schedule; the optimizer zeroes gradients
        results[kind]["zeroed"] = all(p.grad is None for p in local.parameters())
        del results[kind]["optimizer"]
    return results


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, kinds, n_microbatches, n_layers",
    [
        (2, ["gpipe", "1F1B", "interleaved", "interleaved_zb", "zbv", "dualpipev"], 4, 4),
        (4, ["1F1B", "interleaved"], 4, 8),
    ],
    ids=["2-ranks", "4-ranks"],
)
def test_every_schedule_matches_one_process(world, kinds, n_microbatches, n_layers, pools):
    """The loss (on every rank, per micro-batch too) and every gradient of one pipelined step equal
    one process's on the whole batch: no missing or doubled 1/M factor."""

    results = pools.run(world, _pipeline_against_reference, kinds, n_microbatches, n_layers)
    with torch.device("meta"):
        n_params = len(list(Llama(compose([f"model.n_layers={n_layers}"]).model).parameters()))
    for kind in kinds:
        names = set()
        for rank, result in enumerate(results):
            r = result[kind]
            got, expected = r["loss"]
            assert abs(got - expected) / expected < 1e-6, (kind, rank, got, expected)
            torch.testing.assert_close(torch.tensor(r["micro"][0]), torch.tensor(r["micro"][1]), rtol=1e-5, atol=0)
            assert max(r["errors"].values()) < 1e-5, (kind, rank, r["errors"])
            assert not r["stepped"] and r["zeroed"]
            names |= set(r["errors"])
        assert len(names) == n_params, kind


SEED_EXAMPLE = """
import torch
import torch.distributed as dist
from curry_train.config import compose
from curry_train.model.llama import Llama
from curry_train.primitives import ParallelState
from curry_train.primitives.pipeline_schedule import pipeline_stages
from curry_train.primitives.materialize import materialize_and_init

dist.init_process_group("gloo")
ps = ParallelState(pp=2)
with torch.device("meta"):
    model = Llama(compose().model)
local, stage_modules = pipeline_stages(model, "1F1B", 2, dist.get_rank(ps.get_pp_group()))
materialize_and_init(local, torch.device("cpu"), seed=0)
microbatches = list(torch.randint(0, 256, (16, 33)).split(2))

# -- the seed example, as written --
from curry_train.primitives import PipelineSchedule
schedule = PipelineSchedule(
    kind="1F1B",                # or "interleaved" or "gpipe"
    n_microbatches=8,
    stages=stage_modules,       # list of nn.Module per stage
    pp_group=ps.get_pp_group(),
)
result = schedule.train_step(microbatches)   # full forward + backward + step
# -- end of the seed example --

assert 4.5 < result.loss.item() < 6.5, result.loss  # about ln(256) at initialization
assert all(p.grad is not None for p in local.parameters())
print(f"SEED OK {dist.get_rank()} {result.loss.item():.6f};", flush=True)  # one write: ranks' lines may interleave
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_seed_example_runs_unchanged_under_torchrun(tmp_path):
    found = re.findall(r"SEED OK (\d) ([0-9.]+);", run_seed_example(SEED_EXAMPLE, tmp_path))
    assert (
        sorted(rank for rank, _ in found) == ["0", "1"] and len({loss for _, loss in found}) == 1
    )  # one loss, both stages


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["parallel.pp.size=8", "trainer.devices=8", "data.global_batch_size=64"],
            "8 pipeline stages but the model has 4 layers",
        ),
        (
            ["parallel.pp.schedule=interleaved", "parallel.pp.virtual_stages=4", "trainer.devices=2"],
            "8 pipeline stages but the model has 4 layers",
        ),
        (
            ["parallel.pp.microbatches=3", "trainer.devices=2"],
            "parallel.pp.microbatches=3 does not divide the 16 samples",
        ),
        (
            ["parallel.pp.size=4", "trainer.devices=4", "data.micro_batch_size=8"],
            "at least as many micro-batches as stages: 2 < 4",
        ),
        (
            ["parallel.pp.schedule=zbv", "parallel.pp.microbatches=2", "trainer.devices=2"],
            "zbv needs at least as many micro-batches as stages: 2 < 4",
        ),
        (["parallel.pp.schedule=2F2B", "trainer.devices=2"], "pipeline schedule '2F2B'"),
        (["parallel.pp.layers_per_stage=[1,2]", "trainer.devices=2"], "summing to 4 layers"),
        (["parallel.pp.schedule=1F1B", "parallel.pp.virtual_stages=2", "trainer.devices=2"], "one stage per rank"),
        (["model.tie_embeddings=true", "trainer.devices=2"], "tie_embeddings=true with parallel=pp"),
        (["parallel.pp.size=3", "trainer.devices=4"], "not divisible"),
    ],
)
def test_pipeline_config_errors_are_one_line_and_name_the_sizes(overrides, message):

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check(compose(["data.global_batch_size=16", "data.micro_batch_size=4", "parallel=pp", *overrides]))


def test_pipeline_layout_degrees_and_microbatches():

    plan = check(compose(["parallel=pp", "trainer.devices=4", "data.global_batch_size=32", "data.micro_batch_size=4"]))
    assert plan.dims.pp == 2 and plan.dims.dp == 2
    cfg = compose(["parallel=pp", "trainer.devices=4", "data.global_batch_size=32", "data.micro_batch_size=4"])
    assert pipeline_microbatches(cfg, plan.dims) == 4  # 16 samples per data-parallel rank, 4 each


# -- the whitebox's check of what each pipeline rank logs (the layouts: test_parity.py) ------------


def test_whitebox_flags_a_rank_that_logs_a_placeholder_loss():

    grads = {"w": torch.ones(2, dtype=torch.float64)}
    reference = [{"loss": 5.0, "grad_norm": 1.0, "grads": grads}]
    good = [{**reference[0], "logged_losses": [5.0, 5.0]}]
    placeholder = [{**reference[0], "logged_losses": [5.0, -1.0]}]
    assert compare(good, reference).ok
    report = compare(placeholder, reference)
    assert not report.ok and "rank 1 logged train/loss=-1.0" in report.problems[0]
