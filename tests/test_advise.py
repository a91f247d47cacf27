"""scripts/advise.py: the decision guide's answers on known cases, from arithmetic alone (fast)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import torch

from curry_train.cli import advise as advise_cli
from curry_train.config import compose
from curry_train.layout.pipeline import check_microbatches, stage_to_rank
from curry_train.model.llama import Llama
from curry_train.planning import advise as planning_advise
from curry_train.planning.advise import MEMORY_PARTS, diagnose, estimate
from curry_train.planning.layout import Layout, current_layout, microbatches_per_step, train_command
from curry_train.planning.memory import activation_bytes, block_forwards_per_rank, chunks_in_flight, rank_shapes
from curry_train.planning.memory import transient_state as _transient_state
from curry_train.primitives.pipeline_schedule import SCHEDULES, pipeline_stages

ONE_B = [
    "model.dim=2048",
    "model.n_layers=16",
    "model.n_heads=32",
    "model.n_kv_heads=8",
    "model.ffn_dim=8192",
    "model.vocab_size=128256",
    "model.name=llama_1b",
]


def load_advise():
    return advise_cli


def run_json(capsys, args):
    code = load_advise().main([*args, "format=json"])
    return code, json.loads(capsys.readouterr().out)


def assert_own_estimate_fits(result):
    assert result["fits"] and result["memory_per_rank_bytes"] <= result["capacity_bytes"]
    assert result["memory_per_rank_bytes"] <= compose(["hardware=h100_80gb"]).hardware.memory_bytes


def test_8b_at_8k_on_one_h100_node_needs_sharded_data_parallel_only(capsys):
    code, result = run_json(capsys, ["model=llama3_8b", "hardware=h100_80gb", "data.seq_len=8192"])
    assert code == 0
    assert_own_estimate_fits(result)
    assert result["parallel"] == "fsdp" and result["layout"]["zero"] in ("optimizer", "shard_grad_op", "full")
    assert result["sizes"] == {"dp_replicate": 1, "dp_shard": 8, "tp": 1, "pp": 1, "cp": 1}
    assert result["command"].startswith("python train.py model=llama3_8b")
    assert "parallel=fsdp " in result["command"] and "trainer.devices=8" in result["command"]
    assert_command_runs_the_layout(result)


def test_8b_at_256k_needs_context_parallelism(capsys):
    code, result = run_json(capsys, ["model=llama3_8b", "data.seq_len=262144"])
    assert code == 0
    assert_own_estimate_fits(result)
    assert "cp" in result["parallel"].split("+") and result["sizes"]["cp"] > 1
    assert result["sizes"]["tp"] == result["sizes"]["pp"] == 1
    assert f"parallel.cp.size={result['sizes']['cp']}" in result["command"]
    assert_command_runs_the_layout(result)


def test_logits_that_outweigh_the_blocks_are_chunked_before_recompute_goes_further(capsys):
    """A 1B model with Llama 3's 128k vocabulary at 32k tokens on one H100: selective recompute leaves the
    logits' backward (12 bytes each, 47 GiB) the largest term, so the walk computes the loss in chunks
    (one more GEMM of the head) rather than recompute every block whole; the command says how many."""
    args = [
        *ONE_B,
        "hardware.gpus_per_node=1",
        "data.seq_len=32768",
        "data.micro_batch_size=1",
        "data.global_batch_size=8",
    ]
    code, result = run_json(capsys, args)
    assert code == 0
    assert_own_estimate_fits(result)
    steps = [row["step"] for row in result["tried"]]
    assert steps[-1].startswith("loss in chunks") and "recompute=full" not in steps
    assert result["layout"]["recompute"] == "selective" and result["layout"]["loss_chunks"] > 1
    assert f"model.loss_chunks={result['layout']['loss_chunks']}" in result["command"]
    assert_command_runs_the_layout(result)
    chunked = compose(result["command"].split()[2:])
    whole = compose([*result["command"].split()[2:], "model.loss_chunks=1"])
    loss_of = lambda cfg: activation_bytes(cfg, current_layout(cfg), flash_attention=True)["loss"]  # noqa: E731
    assert loss_of(whole) == 12 * 32768 * 128256  # the loss's backward: 12 bytes a logit
    assert loss_of(chunked) < loss_of(whole) / 2


def test_70b_full_finetune_on_8x80gb_does_not_fit_and_says_what_would(capsys):
    code, result = run_json(capsys, ["model=llama3_70b", "hardware=a100_80gb", "data.seq_len=4096"])
    assert code == 1 and result["fits"] is False and result["command"] is None
    text = " ".join(result["reasons"])
    assert "nothing fits" in text and "offload" in text and "more devices" in text


def test_1b_on_one_gpu_needs_no_parallelism(capsys):
    code, result = run_json(
        capsys, [*ONE_B, "hardware.gpus_per_node=1", "data.seq_len=2048", "data.micro_batch_size=4"]
    )
    assert code == 0
    assert_own_estimate_fits(result)
    assert result["parallel"] == "dp" and set(result["sizes"].values()) == {1}
    assert "trainer.devices=1" in result["command"]
    assert_command_runs_the_layout(result)


def test_text_output_explains_and_prints_the_command(capsys):
    assert load_advise().main(["model=llama3_8b", "data.seq_len=8192"]) == 0
    out = capsys.readouterr().out
    assert (
        "ZeRO-1" in out
        and "tp and cp not needed" in out
        and "pp not needed: one node" in out
        and "python train.py model=llama3_8b" in out
    )


def test_symptoms_name_the_next_primitive():
    overrides = ["model=llama3_8b", "data.seq_len=8192", "parallel=dp", "trainer.devices=8"]
    oom = diagnose(compose(overrides), "oom", overrides)
    assert oom["next"]["layout"]["zero"] == "optimizer" and "sharding=optimizer" in oom["command"]
    full = ["model=llama3_8b", "data.seq_len=8192", "parallel=fsdp", "trainer.devices=8"]
    assert diagnose(compose(full), "oom", full)["next"]["layout"]["recompute"] == "full"
    slow = diagnose(compose(full), "slow", full)
    assert slow["advice"]
    with pytest.raises(ValueError, match="symptom"):
        diagnose(compose(full), "sad")


def test_estimate_divides_by_tp_and_cp_and_recompute_shrinks_activations():
    cfg = compose(["model=llama3_8b", "data.seq_len=8192", "data.micro_batch_size=1"])
    base = Layout(dp_shard=8, zero="full", mixed_precision="bf16")
    none, full = (
        estimate(cfg, base),
        estimate(cfg, Layout(dp_shard=8, zero="full", mixed_precision="bf16", recompute="full")),
    )
    assert full.memory["activations"] < none.memory["activations"] / 5
    assert full.time["compute"] > none.time["compute"]
    cp2 = estimate(cfg, Layout(dp_shard=4, cp=2, zero="full", mixed_precision="bf16"))
    # Half of each sequence: the ring, like the model's SDPA, reads k and v unrepeated (test_memory
    # measures 0.50x of dp).
    assert cp2.memory["activations"] / none.memory["activations"] == pytest.approx(0.5, rel=1e-3)
    tp2 = estimate(cfg, Layout(dp_shard=4, tp=2, zero="full", mixed_precision="bf16", sequence_parallel=True))
    # All but the norms' outputs, which the column-parallel matmuls keep gathered over the sequence.
    assert 0.5 < tp2.memory["activations"] / none.memory["activations"] < 0.55
    assert tp2.memory["params"] == pytest.approx(none.memory["params"], rel=0.01)  # 16P/(tp x dp) either way


SLOW_LINKS = ["hardware.inter_node_bandwidth=1.25e10"]  # 100 Gb/s Ethernet per GPU instead of InfiniBand
# A large run's batch: 256 sequences per step in micro-batches of 2 (data=tokens' presets fit the debug model).
LARGE_BATCH = ["data=tokens", "data.global_batch_size=256", "data.micro_batch_size=2"]
SEVENTY_B_4_NODES = ["model=llama3_70b", "hardware.nodes=4", "data.seq_len=8192", *LARGE_BATCH]
# A pipeline stage keeps its units gathered and its gradients unsharded in fp32 from its first backward to
# its last (torch.distributed.pipelining with FSDP): 70B in 4 stages holds 17.5B parameters' worth on a rank
# (105 GB), in 16 stages 4.4B.
SEVENTY_B_16_NODES = ["model=llama3_70b", "hardware.nodes=16", "data.seq_len=8192", *LARGE_BATCH]


def test_pipeline_across_nodes_when_data_parallel_traffic_saturates_slow_links(capsys):
    code, result = run_json(capsys, [*SEVENTY_B_16_NODES, *SLOW_LINKS])
    assert code == 0
    assert_own_estimate_fits(result)
    sizes = result["sizes"]
    assert sizes["pp"] > 1 and 16 % sizes["pp"] == 0  # stages across nodes
    assert (sizes["dp_shard"] * sizes["dp_replicate"] * sizes["tp"] * sizes["cp"]) * sizes["pp"] == 128
    assert 8 % (sizes["tp"] * sizes["cp"]) == 0  # tp and cp stay inside a node
    assert "pp" in result["parallel"].split("+") and f"parallel.pp.size={sizes['pp']}" in result["command"]
    assert "trainer.num_nodes=16" in result["command"]
    # The ZeRO-3 layout over all 128 ranks also fits, but its gathers cross the slow links every micro-batch.
    cfg = compose([*SEVENTY_B_16_NODES, *SLOW_LINKS])
    flat = estimate(
        cfg, Layout(dp_shard=128, zero="full", mixed_precision="bf16", recompute="full", micro_batch_size=2)
    )
    assert flat.fits and flat.time["dp_exposed"] > 0
    assert result["step_time_s"]["total"] < 0.9 * flat.time["total"]
    assert any("not hidden by compute" in reason for reason in result["reasons"])
    assert_command_runs_the_layout(result)
    # Interleaving (2 stages per rank) halves the bubble; it fits, so it beats 1F1B's longer step.
    layout = Layout(**result["layout"])
    assert (layout.pp_schedule, layout.virtual_stages) == ("interleaved", 2)
    assert "parallel.pp.schedule=interleaved parallel.pp.virtual_stages=2" in result["command"]
    one_f_one_b = estimate(cfg, replace(layout, pp_schedule="1F1B", virtual_stages=None))
    assert result["step_time_s"]["bubble"] == pytest.approx(one_f_one_b.time["bubble"] / 2)
    assert result["step_time_s"]["total"] < one_f_one_b.time["total"]


def test_a_pipeline_it_recommends_computes_the_loss_whole(capsys):
    """The run chunks its loss, but a pipeline's last stage computes it from whole logits (the check refuses
    model.loss_chunks with pp): the pipeline advise recommends across nodes does not chunk it."""
    code, result = run_json(capsys, [*SEVENTY_B_16_NODES, *SLOW_LINKS, "model.loss_chunks=4"])
    assert code == 0 and result["sizes"]["pp"] > 1
    assert result["layout"]["loss_chunks"] == 1 and "model.loss_chunks" not in result["command"]
    assert_command_runs_the_layout(result)


def test_a_bad_loss_chunk_count_is_one_line(capsys):
    assert load_advise().main(["model.loss_chunks=0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "advise: error: model.loss_chunks=0 must be >= 1 (1: the head and loss at once)"
    )


def assert_command_runs_the_layout(result):
    """The printed command composes to exactly the recommended layout."""

    cfg = compose(result["command"].split()[2:])
    assert asdict(current_layout(cfg)) == result["layout"]


def test_no_pipeline_when_data_parallel_traffic_hides_behind_compute(capsys):
    code, result = run_json(capsys, SEVENTY_B_16_NODES)
    assert code == 0 and result["sizes"]["pp"] == 1
    # hidden but for the first unit's gather and the last reduce-scatter, which nothing runs beside
    assert result["step_time_s"]["dp_exposed"] < 0.02 * result["step_time_s"]["total"]
    assert any(reason.startswith("pp not needed: across 16 nodes") for reason in result["reasons"])


@pytest.mark.slow
def test_405b_on_16_nodes_splits_blocks_with_tp_inside_a_node(capsys):
    code, result = run_json(capsys, ["model=llama3_405b", "hardware.nodes=16", "data.seq_len=8192", *LARGE_BATCH])
    assert code == 0
    assert_own_estimate_fits(result)
    assert 1 < result["sizes"]["tp"] <= 8 and "parallel.tp.sequence_parallel=true" in result["command"]
    assert_command_runs_the_layout(result)


def test_hybrid_sharding_keeps_gathers_inside_a_node():
    cfg = compose([*SEVENTY_B_4_NODES, *SLOW_LINKS])
    flat = estimate(cfg, Layout(dp_shard=32, zero="full", mixed_precision="bf16", recompute="full"))
    hsdp = estimate(cfg, Layout(dp_shard=8, dp_replicate=4, zero="hybrid", mixed_precision="bf16", recompute="full"))
    # Gathers and reduce-scatters over NVLink (36x the slow link) plus one all-reduce of 1/8 of the gradients.
    assert hsdp.time["dp"] < flat.time["dp"] / 10
    assert hsdp.memory["params"] > flat.memory["params"]  # sharded 8 ways, not 32
    assert "parallel.fsdp.replicas=4" in train_command_for(cfg, hsdp.layout)


def train_command_for(cfg, layout):

    return train_command(cfg, layout)


def test_slow_symptom_on_slow_links_moves_traffic_inside_nodes():
    overrides = [
        *SEVENTY_B_16_NODES,
        *SLOW_LINKS,
        "parallel=fsdp",
        "parallel.recompute=full",
        "parallel.fsdp.mixed_precision=bf16",
        "data.micro_batch_size=2",
        "trainer.devices=8",
        "trainer.num_nodes=16",
    ]
    result = diagnose(compose(overrides), "slow", overrides)
    assert "not hidden by compute" in result["advice"]
    nxt = result["next"]["layout"]
    assert nxt["pp"] > 1 or nxt["zero"] == "hybrid"
    assert result["next"]["step_time"]["total"] < result["current"]["step_time"]["total"]


def test_slow_symptom_with_a_large_bubble_names_a_schedule_with_less():
    """1F1B over 4 stages with 4 micro-batches idles (pp - 1) / M = 75% of the compute: slow names the
    schedule (of those that run M = 4 and fit) with the shortest step, and its command."""
    overrides = [
        "model=llama3_8b",
        "hardware.nodes=4",
        "data.seq_len=8192",
        *LARGE_BATCH,
        "parallel=fsdp+pp",
        "parallel.pp.size=4",
        "parallel.recompute=full",
        "parallel.fsdp.mixed_precision=bf16",
        "data.global_batch_size=32",
        "data.micro_batch_size=1",
        "trainer.devices=8",
        "trainer.num_nodes=4",
    ]
    result = diagnose(compose(overrides), "slow", overrides)
    now = result["current"]["step_time"]
    assert now["bubble"] == pytest.approx(0.75 * now["compute"])
    assert result["advice"].startswith("the pipeline bubble takes")
    nxt = Layout(**result["next"]["layout"])
    assert nxt.pp_schedule in ("interleaved", "interleaved_zb", "zbv") and result["next"]["fits"]
    assert result["next"]["step_time"]["bubble"] < now["bubble"] / 2
    assert result["next"]["step_time"]["total"] < 0.9 * now["total"]
    assert f"parallel.pp.schedule={nxt.pp_schedule}" in result["command"]
    assert_command_runs_the_layout({"command": result["command"], "layout": result["next"]["layout"]})


GIB = 2**30
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def spy_on_plot(monkeypatch):
    """The figures the command draws, as ``plot_memory`` returns them."""
    figures = []
    draw = planning_advise.plot_memory
    monkeypatch.setattr(planning_advise, "plot_memory", lambda *args: figures.append(draw(*args)) or figures[-1])
    return figures


def stacked_bars(axes):
    """Per part (the legend's label of each bar series): each bar's (bottom, height), in GiB."""
    return {bars.get_label(): [(bar.get_y(), bar.get_height()) for bar in bars.patches] for bars in axes.containers}


def test_memory_breakdown_plot_stacks_each_part_by_its_bytes(tmp_path, capsys, monkeypatch):

    figures = spy_on_plot(monkeypatch)
    path = tmp_path / "memory.png"
    code, result = run_json(capsys, ["model=llama3_8b", "data.seq_len=8192", f"plot={path}"])
    assert code == 0 and path.read_bytes().startswith(PNG_SIGNATURE)
    (figure,) = figures
    (axes,) = figure.axes
    # One bar per candidate tried, its parts stacked bottom up in MEMORY_PARTS' order, each as tall as
    # its bytes: the bar's top is the candidate's total.
    bars = stacked_bars(axes)
    assert list(bars) == list(MEMORY_PARTS)
    for index, tried in enumerate(result["tried"]):
        top = 0.0
        for part in MEMORY_PARTS:
            bottom, height = bars[part][index]
            assert bottom == pytest.approx(top) and height == pytest.approx(tried["memory"][part] / GIB), part
            top += height
        assert top == pytest.approx(tried["memory"]["total"] / GIB)
    assert len(axes.get_xticklabels()) == len(result["tried"])
    # The device's memory and the capacity a recommendation may use, as horizontal lines.
    lines = {line.get_label(): set(line.get_ydata()) for line in axes.get_lines()}
    device = compose(["hardware=h100_80gb"]).hardware.memory_bytes
    assert lines == {
        "device memory 80.0 GiB": {device / GIB},
        "usable capacity 72.0 GiB (less 10% headroom)": {result["capacity_bytes"] / GIB},
    }
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert sorted(legend) == sorted([*MEMORY_PARTS, *lines])
    assert "GiB" in axes.get_ylabel() and axes.get_xlabel() and "llama3_8b" in axes.get_title()


def test_symptom_plot_shows_current_and_next(tmp_path, monkeypatch):
    figures = spy_on_plot(monkeypatch)
    path = tmp_path / "oom.png"
    overrides = ["model=llama3_8b", "data.seq_len=8192", "parallel=dp", "trainer.devices=8"]
    assert load_advise().main([*overrides, "symptom=oom", f"plot={path}"]) == 0
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    (axes,) = figures[0].axes
    assert [label.get_text().split(":")[0] for label in axes.get_xticklabels()] == ["current", "next"]
    # ZeRO-1 (next) shards the optimizer state DDP (current) replicates: 8 ranks, an eighth of it.
    (_, current), (_, nxt) = stacked_bars(axes)["optimizer"]
    assert 0 < nxt < current / 7
    assert load_advise().main([*overrides, "format=yaml"]) == 2


def test_command_keeps_the_users_settings_of_the_options_it_composes(capsys):
    overrides = [
        *SEVENTY_B_16_NODES,
        *SLOW_LINKS,
        "parallel=pp+cp",
        "parallel.cp.pattern=alltoall",
        "parallel.pp.schedule=interleaved",
        "parallel.recompute_every_n_blocks=0",
        "parallel.pp.size=4",
    ]
    code, result = run_json(capsys, overrides)
    assert code == 0 and result["sizes"]["pp"] > 1 and result["sizes"]["cp"] == 1
    command = result["command"]
    assert "parallel.pp.schedule=interleaved" in command and "parallel.recompute_every_n_blocks=0" in command
    assert "parallel.cp.pattern" not in command and "parallel=pp+cp" not in command and command.count("pp.size=") == 1
    assert result["layout"]["pp_schedule"] == "interleaved"  # the run's schedule, estimated as such
    assert_command_runs_the_layout(result)


# ----------------------------------------------------------------------------------------------
# Pipeline schedules: what a rank holds and waits for, per kind


def _schedule_order(kind: str, pp: int, v: int, microbatches: int, rank: int):
    """Rank ``rank``'s actions as PyTorch's multi-stage schedule orders them (its ``pipeline_order``,
    which the schedule computes from the stages' indices alone, so stand-in stages suffice)."""

    n = pp * v
    owner = stage_to_rank(kind, pp, n)
    stages = [
        SimpleNamespace(
            group_size=pp,
            group_rank=rank,
            num_stages=n,
            stage_index=s,
            is_first=s == 0,
            is_last=s == n - 1,
            submod=torch.nn.Linear(1, 1),
        )
        for s in range(n)
        if owner[s] == rank
    ]
    actions = []
    for action in SCHEDULES[kind](stages, microbatches).pipeline_order[rank]:
        if action is not None:
            actions += list(getattr(action, "sub_actions", None) or [action])  # dualpipev overlaps F and B
    return actions


def _peak_in_flight(actions) -> int:
    """Most stage forwards alive at once: from F to the backward that frees them (B, or W where the
    backward is split into input and weight gradients: W still reads the stored inputs)."""
    split = any(a.computation_type.value == "W" for a in actions)
    alive, peak = set(), 0
    for action in actions:
        kind, key = action.computation_type.value, (action.stage_index, action.microbatch_index)
        if kind == "F":
            alive.add(key)
        elif kind == "B" or kind == ("W" if split else "I"):
            alive.discard(key)
        peak = max(peak, len(alive))
    return peak


@pytest.mark.parametrize(
    "kind, vs", [("interleaved", (1, 2, 3)), ("interleaved_zb", (2, 3)), ("zbv", (2,)), ("dualpipev", (2,))]
)
def test_activations_in_flight_follow_pytorchs_schedule_order(kind, vs):

    checked = 0
    for pp in (2, 3, 4):
        for v in vs:
            for M in (pp, 2 * pp, 3 * pp, 4 * pp, 8 * pp):
                try:
                    check_microbatches(kind, M, pp, pp * v)
                except ValueError:
                    continue
                for rank in range(pp):
                    replayed = _peak_in_flight(_schedule_order(kind, pp, v, M, rank))
                    assert chunks_in_flight(kind, pp, v, M, rank) == replayed, (kind, pp, v, M, rank)
                checked += 1
    assert checked >= 10


def test_single_stage_schedules_in_flight():

    assert [chunks_in_flight("gpipe", 4, 1, m) for m in (2, 8)] == [2, 8]  # every forward before any backward
    assert [chunks_in_flight("1F1B", 4, 1, m) for m in (4, 8)] == [4, 4]
    assert [chunks_in_flight("1F1B", 4, 1, 8, rank) for rank in range(4)] == [4, 3, 2, 1]
    assert chunks_in_flight("1F1B", 1, 1, 8) == 1  # no pipeline: one micro-batch at a time


@pytest.mark.parametrize(
    "kind, v",
    [
        ("1F1B", None),
        ("gpipe", None),
        ("interleaved", 2),
        ("interleaved", 3),
        ("interleaved_zb", 2),
        ("zbv", None),
        ("dualpipev", None),
    ],
)
def test_rank_shapes_are_the_stages_the_strategy_keeps(kind, v):
    """advise's per-rank parameters are those ``pipeline_stages`` keeps on each rank (a V-shaped
    schedule's rank 0 holds the embedding and the head)."""

    cfg = compose(["model.n_layers=12"]).model
    for pp in (2, 3):
        for rank in range(pp):
            with torch.device("meta"):
                local, _ = pipeline_stages(Llama(cfg), kind, pp, rank, v)
            expected = [tuple(p.shape) for p in local.parameters()]
            assert rank_shapes(cfg, 1, pp, rank, kind, v) == expected, (kind, v, pp, rank)
    if kind in ("zbv", "dualpipev"):
        first = rank_shapes(cfg, 1, 2, 0, kind, v)
        assert (cfg.vocab_size, cfg.dim) in first and first.count((cfg.vocab_size, cfg.dim)) == 2


def test_interleaving_halves_the_bubble_for_more_activations_and_sends():
    """At the same M, v = 2 stages per rank: bubble (pp - 1) / (2M) of the compute, not (pp - 1) / M;
    the first micro-batch crosses pp * v - 1 stage boundaries, not pp - 1 (the sends on the critical
    path); more forwards in flight on rank 0; zero-bubble kinds none."""
    cfg = compose([*SEVENTY_B_4_NODES])
    base = Layout(dp_replicate=8, pp=4, mixed_precision="bf16", recompute="full")
    one = estimate(cfg, base)
    two = estimate(cfg, replace(base, pp_schedule="interleaved", virtual_stages=2))
    zb = estimate(cfg, replace(base, pp_schedule="interleaved_zb", virtual_stages=2))
    M = cfg.data.global_batch_size // (8 * base.micro_batch_size)
    assert one.time["bubble"] == pytest.approx(one.time["compute"] * 3 / M)
    assert two.time["bubble"] == pytest.approx(one.time["bubble"] / 2)
    assert two.time["pp"] == pytest.approx(one.time["pp"] * (4 * 2 - 1) / (4 - 1))
    assert zb.time["bubble"] == 0.0
    # Rank 0 of 4 with v = 2 keeps 1 + (pp - 1) / (pp * v) = 11/8 of 1F1B's block activations (the
    # final norm, the same for both, makes the whole a little less than 11/8).
    kept = [estimate(cfg, replace(layout, recompute="none")).memory["activations"] for layout in (base, two.layout)]
    assert 1.3 < kept[1] / kept[0] <= 11 / 8
    assert Layout(pp=4, pp_schedule="interleaved", virtual_stages=2).stages_per_rank == 2


def test_only_the_last_stage_holds_the_loss():
    """1F1B: rank 0 keeps pp micro-batches of its blocks, the last rank one micro-batch and the
    loss; the fullest rank is counted, with its own loss (none on rank 0). A V-shaped schedule puts
    the last stage on rank 0, which then holds both."""

    cfg = compose([*SEVENTY_B_4_NODES])
    layout = Layout(dp_replicate=8, pp=4, mixed_precision="bf16")
    per_rank = block_forwards_per_rank(layout, cfg.model.n_layers, 16)
    assert [holds_last for _, holds_last in per_rank] == [False, False, False, True]
    assert per_rank[0][0] > 3 * per_rank[-1][0]  # 4 forwards in flight against 1
    one_f_one_b = activation_bytes(cfg, layout, flash_attention=True)
    assert one_f_one_b["loss"] == 0 and one_f_one_b["activations"] > 0
    # With full recompute a block keeps its input only, and the loss (logits over 128k words) decides.
    full = replace(layout, recompute="full")
    assert activation_bytes(cfg, full, flash_attention=True)["loss"] > 0  # the last rank is the fullest
    zbv = replace(full, pp_schedule="zbv")
    assert [last for _, last in block_forwards_per_rank(zbv, cfg.model.n_layers, 16)] == [True, False, False, False]
    assert activation_bytes(cfg, zbv, flash_attention=True)["loss"] > 0
    # Without a pipeline the one rank holds everything, the loss included.
    assert activation_bytes(cfg, Layout(dp_replicate=32, mixed_precision="bf16"), flash_attention=True)["loss"] > 0


def test_zero3_keeps_gathered_only_the_root_a_stage_holds():
    """ZeRO-3 keeps the embedding and head gathered through forward and backward: on a pipeline, only
    the rank that holds each (1F1B: the embedding on the first, the head on the last)."""

    cfg = compose(["model=llama3_8b"]).model
    flat = Layout(dp_shard=8, zero="full", mixed_precision="bf16")
    piped = Layout(dp_shard=2, pp=4, zero="full", mixed_precision="bf16")
    table = 2 * cfg.vocab_size * cfg.dim  # one of the two in bf16
    shapes = rank_shapes(cfg, 1, 4, 1)
    middle = _transient_state(cfg, shapes, piped, stage=1)
    assert _transient_state(cfg, shapes, piped, stage=0) == middle + table
    assert _transient_state(cfg, shapes, piped, stage=3) == middle + table
    assert _transient_state(cfg, shapes, flat) == middle + 2 * table


def test_the_pipelines_own_micro_batch_count_sets_the_planned_micro_batch():
    """parallel.pp.microbatches cuts each rank's batch its own way: the plan's micro-batch (and so its
    activations and bubble) follows it, not data.micro_batch_size."""
    base = ["parallel=pp", "trainer.devices=2", "data.global_batch_size=32", "data.micro_batch_size=8"]
    assert current_layout(compose(base)).micro_batch_size == 8
    layout = current_layout(compose([*base, "parallel.pp.microbatches=8"]))
    assert layout.micro_batch_size == 4 and microbatches_per_step(compose(base), layout) == 8
    default, finer = (
        estimate(compose(o), current_layout(compose(o))) for o in (base, [*base, "parallel.pp.microbatches=8"])
    )
    assert finer.memory["activations"] < default.memory["activations"]


def test_advise_reads_the_device_count_of_a_run_and_refuses_none(capsys):
    """``trainer.devices`` and ``trainer.num_nodes`` given to curry-advise set what it plans for; 0 is one line."""
    for args, message in (
        (["trainer.devices=0"], "trainer.devices=0 must be positive"),
        (["trainer.num_nodes=0"], "trainer.num_nodes=0 must be positive"),
    ):
        assert advise_cli.main(args) == 2
        captured = capsys.readouterr()
        assert captured.err.strip() == f"advise: error: {message}" and captured.out == ""
    code, result = run_json(capsys, ["model=llama3_8b", "hardware=h100_80gb", "trainer.devices=4"])
    assert code == 0 and "trainer.devices=4 " in result["command"]
    assert math.prod(result["sizes"].values()) == 4
