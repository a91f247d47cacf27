"""Planning for mixture-of-experts models: the real families' parameter counts, what a rank holds
under expert parallelism, active parameters in the FLOPs, advise's expert-parallel step, the MoE
family of capacity sweeps, and the all-to-all bytes the bench measures against the formula."""

from __future__ import annotations

import json
import math

import pytest
from conftest import FAST
from test_bench import load_bench

from curry_train.config import compose
from curry_train.planning.advise import advise, estimate
from curry_train.planning.capacity import run_sweep
from curry_train.planning.families import default_family, family
from curry_train.planning.layout import Layout, PlanningError, current_layout
from curry_train.planning.memory import active_parameter_count, expert_parameter_count, parameter_count
from curry_train.planning.step_time import all_to_all_bytes, flops_parameters

# model config: published total and active parameters, and how far ours may be from them (the
# configs' comments give the reasons: attention approximated where the architecture differs)
PUBLISHED = {
    "mixtral_8x7b": (46.7e9, 12.9e9, 0.02, 0.02),
    "qwen3_30b_a3b": (30.5e9, 3.3e9, 0.02, 0.02),
    "deepseek_v3": (671e9, 37e9, 0.02, 0.05),  # MLA as grouped-query attention: 1.1B more
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_moe_families_have_their_published_parameter_counts(name):
    total, active, total_tolerance, active_tolerance = PUBLISHED[name]
    model = compose([f"model={name}"]).model
    assert abs(parameter_count(model) - total) <= total_tolerance * total
    assert abs(active_parameter_count(model) - active) <= active_tolerance * active


def test_active_parameters_count_top_k_of_each_layers_experts():
    model = compose(["model=moe_debug", "model.moe.dense_layers=1"]).model
    experts = expert_parameter_count(model)
    assert experts == 3 * 3 * 8 * 192 * 128  # 3 MoE blocks, w1 w3 w2, 8 experts of 192 x 128
    assert active_parameter_count(model) == parameter_count(model) - experts * 6 // 8
    # FLOPs: the active parameters less the input embedding's lookup
    assert flops_parameters(model) == active_parameter_count(model) - 256 * 128
    dense = compose(["model=debug"]).model
    assert active_parameter_count(dense) == parameter_count(dense) and expert_parameter_count(dense) == 0


def test_expert_parallelism_divides_the_experts_a_rank_holds():
    """DDP holds 4 bytes per parameter of the whole model; with ep=8 a rank holds 1/8 of each MoE
    layer's experts. ZeRO-3 over 8 already divides everything by 8, so ep=8 leaves the sharded state
    as it is and shrinks the gathered units (transient) instead."""
    cfg = compose(["model=mixtral_8x7b", "hardware=h100_80gb"])
    P, experts = parameter_count(cfg.model), expert_parameter_count(cfg.model)
    ddp = estimate(cfg, Layout(dp_replicate=8, mixed_precision="bf16"))
    ddp_ep = estimate(cfg, Layout(dp_replicate=8, ep=8, mixed_precision="bf16"))
    assert ddp.memory["params"] == 4 * P
    assert ddp_ep.memory["params"] == 4 * (P - experts + experts // 8)
    zero3 = estimate(cfg, Layout(dp_shard=8, zero="full", mixed_precision="bf16"))
    zero3_ep = estimate(cfg, Layout(dp_shard=8, zero="full", ep=8, mixed_precision="bf16"))
    assert zero3_ep.memory["params"] == pytest.approx(zero3.memory["params"], rel=1e-3)
    assert zero3_ep.memory["transient"] < zero3.memory["transient"] / 3
    # and the experts' all-gathers over the 8 ranks give way to all-to-alls
    assert zero3_ep.time["dp_experts"] < zero3.time["dp_experts"] / 7
    assert zero3_ep.time["ep"] > 0 and "ep" not in zero3.time


def test_advise_takes_expert_parallelism_where_the_experts_traffic_dominates():
    # Mixtral 8x7B on one node of 8 H100: the model state alone (16 bytes a parameter over 8) exceeds a device
    one_node = advise(compose(["model=mixtral_8x7b", "hardware=h100_80gb", "hardware.nodes=1"]))
    assert one_node.recommended is None
    assert any("the model state alone" in reason for reason in one_node.reasons)
    # on two nodes ZeRO-3 fits, and gathering every expert every micro-batch is most of its step
    two_nodes = advise(compose(["model=mixtral_8x7b", "hardware=h100_80gb", "hardware.nodes=2"]))
    assert two_nodes.recommended.layout.ep == 8
    assert any(reason.startswith("the experts' data-parallel traffic takes") for reason in two_nodes.reasons)
    assert "parallel.ep.size=8" in two_nodes.command
    # DeepSeek-V3 on 64 nodes: ep within each node
    deepseek = advise(compose(["model=deepseek_v3", "hardware=h100_80gb", "hardware.nodes=64"]))
    assert deepseek.recommended.layout.ep == 8 and "ep" in deepseek.recommended.layout.options()
    # a small MoE model that fits with DDP: all-to-alls would cost more than they save
    small = advise(compose(["model=moe_debug", "hardware=h100_80gb", "hardware.nodes=1"]))
    assert small.recommended.layout.ep == 1
    assert any(reason.startswith("ep not needed: the experts fit") for reason in small.reasons)
    # a dense model is never offered ep
    dense = advise(compose(["model=llama3_8b", "hardware=h100_80gb", "hardware.nodes=2"]))
    assert dense.recommended.layout.ep == 1 and not any("ep" in reason.split()[:2] for reason in dense.reasons)


def test_all_to_all_formula_counts_every_pick_four_times():
    cfg = compose(["model=moe_debug", *FAST, "parallel=ep", "trainer.devices=2"])
    layout = current_layout(cfg)
    assert layout.ep == 2 and layout.dp_replicate == 2
    tokens, k, dim, layers, micro_batches = 64 * 4, 2, 128, 4, 16 // 2 // 4
    per_layer = 4 * tokens * k * dim * 4 + 8 * 8  # fp32 rows out, back, and both gradients; int64 counts
    assert all_to_all_bytes(cfg, layout) == layers * micro_batches * per_layer
    assert all_to_all_bytes(cfg, Layout(dp_replicate=2)) == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_compare_measures_the_all_to_all_bytes_of_the_formula(tmp_path, capsys):
    """bench --compare under ep=2: what each rank puts into all-to-alls depends on the routing (the
    outputs a rank sends back are what its experts received), their sum over the ranks does not."""
    bench = load_bench()
    path = tmp_path / "compare.json"
    common = [*FAST, "model=moe_debug", "model.n_layers=2"]
    layout_args = ["--layout", "ep: parallel=ep trainer.devices=2", "--layout", "dp: parallel=dp trainer.devices=2"]
    assert bench.main(["--compare", "--steps", "2", "--json", str(path), *common, *layout_args]) == 0
    assert "all_to_all" in capsys.readouterr().out
    rows = {row["name"]: row for row in json.loads(path.read_text())["rows"]}
    cfg = compose([*common, "parallel=ep", "trainer.devices=2"])
    expected = all_to_all_bytes(cfg, current_layout(cfg))
    per_rank = [record["comm"]["all_to_all"]["bytes"] for record in rows["ep"]["memory"]["ranks"]]
    assert len(per_rank) == 2 and math.isclose(sum(per_rank), 2 * expected)
    assert math.isclose(rows["ep"]["comm"]["all_to_all"]["bytes"], per_rank[0])
    assert all("all_to_all" not in record["comm"] for record in rows["dp"]["memory"]["ranks"])


def test_capacity_sweep_covers_moe_families():
    """family=moe (the default for a MoE run): the llama3 ladder with the run's experts, each as wide
    relative to dim as the run's; Mixtral's own point is its preset. ZeRO-3 + ep=8 over 16 H100s
    fits a larger member than ZeRO-3 alone (its gathered units hold 1/8 of each layer's experts)."""
    cfg = compose(["model=mixtral_8x7b"])
    assert default_family(cfg) == "moe" and default_family(compose(["model=debug"])) == "llama3"
    members = family("moe", cfg)
    mixtral = next(member for member in members if member.dim == 4096)
    assert mixtral.preset == "mixtral_8x7b" and mixtral.expert_ffn_dim == 14336
    assert mixtral.parameters == parameter_count(cfg.model) and "12.9B active" in mixtral.label
    assert [m.expert_ffn_dim for m in members[:2]] == [1792, 3584]  # 3.5 x dim, as Mixtral's
    with pytest.raises(PlanningError, match="family=moe sweeps the run's mixture of experts"):
        family("moe", compose(["model=debug"]))
    sweep = run_sweep(
        ["model=mixtral_8x7b", "hardware=h100_80gb", "hardware.nodes=2"],
        layouts="fsdp; fsdp+ep ep.size=8",
        mode="estimate",
    )
    assert sweep.family == "moe"
    zero3, with_ep = sweep.rows
    assert with_ep.layout.ep == 8 and zero3.layout.ep == 1
    assert with_ep.largest.candidate.size >= zero3.largest.candidate.size
    assert "active" in with_ep.largest.candidate.label
