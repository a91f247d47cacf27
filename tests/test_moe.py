"""Mixture-of-experts primitives on one process: the router's choice, weights, losses and bias
update; the experts against a token-by-token reference; one expert with top-1 is the dense MLP."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from curry_train.model.llama import SwiGLU
from curry_train.primitives import Experts, MoE, TopKRouter

DIM, HIDDEN = 16, 24


def moe_layer(n_experts: int, top_k: int, shared: bool = False, **router) -> MoE:
    torch.manual_seed(0)
    return MoE(
        DIM,
        TopKRouter(DIM, n_experts, top_k, **router),
        Experts(n_experts, DIM, HIDDEN),
        SwiGLU(DIM, HIDDEN) if shared else None,
    ).double()


def token_by_token(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The definition: each token's picked experts, weighted, plus the shared expert."""
    flat = x.reshape(-1, DIM)
    logits = layer.router.gate(flat)
    scores = logits.softmax(-1) if layer.router.score_function == "softmax" else logits.sigmoid()
    rows = []
    for t in range(flat.shape[0]):
        picked = (scores[t] + layer.router.expert_bias).topk(layer.router.top_k).indices
        weights = scores[t, picked] / (scores[t, picked].sum() if layer.router.normalize else 1)
        e = layer.experts
        out = sum(
            w * (F.silu(flat[t] @ e.w1[i].T) * (flat[t] @ e.w3[i].T)) @ e.w2[i].T
            for w, i in zip(weights, picked.tolist(), strict=True)
        )
        rows.append(out + (layer.shared(flat[t]) if layer.shared is not None else 0))
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize(
    "top_k, score_function, normalize, shared",
    [(2, "softmax", False, True), (3, "sigmoid", True, False), (1, "softmax", False, False)],
)
def test_the_layer_is_its_definition_token_by_token(top_k, score_function, normalize, shared):
    layer = moe_layer(6, top_k, shared, score_function=score_function, normalize=normalize)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, 6))  # choice only, not the weights
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    reference_x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    expected = token_by_token(layer, reference_x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    layer.zero_grad()
    expected_grads = torch.autograd.grad(expected.square().sum(), [reference_x, *layer.parameters()])
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_one_expert_with_top_1_is_the_dense_mlp():
    """Outputs and the experts' gradients equal the SwiGLU with the same weights (MegaBlocks' check)."""
    layer = moe_layer(1, 1)
    dense = SwiGLU(DIM, HIDDEN).double()
    with torch.no_grad():
        dense.w1.weight.copy_(layer.experts.w1[0])
        dense.w3.weight.copy_(layer.experts.w3[0])
        dense.w2.weight.copy_(layer.experts.w2[0])
    x = torch.randn(3, 7, DIM, dtype=torch.float64)
    out, want = layer(x), dense(x)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    want.sum().backward()
    for name in ("w1", "w3", "w2"):
        torch.testing.assert_close(getattr(layer.experts, name).grad[0], getattr(dense, name).weight.grad)


def test_dispatch_then_combine_with_identity_experts_weighs_the_input():
    layer = moe_layer(8, 2)
    layer.dispatch = lambda experts, tokens, counts: tokens  # identity experts
    x = torch.randn(4, 6, DIM, dtype=torch.float64)
    routing = layer.router(x.reshape(-1, DIM))
    torch.testing.assert_close(layer(x), x * routing.weights.sum(-1).view(4, 6, 1))


def test_aux_free_bias_moves_against_the_load_summed_over_the_step():
    router = TopKRouter(DIM, 4, 1, bias_update_rate=0.01)
    with torch.no_grad():
        router.expert_load.copy_(torch.tensor([3.0, 1.0, 0.0, 4.0]))
    load = router.update_bias()
    assert load.tolist() == [3.0, 1.0, 0.0, 4.0] and router.expert_load.sum() == 0
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, -0.01]))
    x = torch.randn(10, DIM)
    router(x)
    router(x)  # two micro-batches of one step
    router.eval()
    router(x)  # validation: not the step's load
    assert router.expert_load.sum() == 20 and "expert_bias" in router.state_dict()
    assert "expert_load" not in router.state_dict()


def test_a_large_bias_changes_the_choice_but_not_the_weights():
    router = TopKRouter(DIM, 4, 1)
    x = torch.randn(10, DIM)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    routing = router(x)
    scores = router.gate(x).softmax(-1)
    assert (routing.experts == 2).all()
    torch.testing.assert_close(routing.weights[:, 0], scores[:, 2])


def test_aux_loss_and_z_loss_follow_their_formulas():
    router = TopKRouter(DIM, 4, 2, balancing="aux_loss", aux_loss_coef=0.1, z_loss_coef=0.01)
    x = torch.randn(12, DIM)
    routing = router(x)
    logits = router.gate(x)
    scores = logits.softmax(-1)
    f = torch.bincount(routing.experts.flatten(), minlength=4).float() / 24
    expected = 0.1 * 4 * (f * scores.mean(0)).sum() + 0.01 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(routing.aux_loss, expected)
    with torch.no_grad():  # uniform scores and balanced picks: the balancing term is its coefficient
        router.gate.weight.zero_()
    balanced = TopKRouter(DIM, 4, 4, balancing="aux_loss", aux_loss_coef=0.1)
    with torch.no_grad():
        balanced.gate.weight.zero_()
    torch.testing.assert_close(balanced(x).aux_loss, torch.tensor(0.1))
    assert TopKRouter(DIM, 4, 2, balancing="none")(x).aux_loss is None


def test_capacity_factor_drops_the_picks_past_each_experts_capacity_in_token_order():
    layer = moe_layer(2, 1)
    layer.capacity_factor = 1.0  # capacity: 8 picks / 2 experts = 4
    layer.dispatch = lambda experts, tokens, counts: tokens
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([10.0, 0.0]))  # every token picks expert 0
    x = torch.randn(1, 8, DIM, dtype=torch.float64)
    out = layer(x)[0]
    weights = layer.router.gate(x[0]).softmax(-1)[:, 0]
    torch.testing.assert_close(out[:4], x[0, :4] * weights[:4, None])
    assert (out[4:] == 0).all()


def test_the_grouped_gemm_equals_one_matmul_per_expert():
    """The CUDA path's grouped GEMM (bf16) against the exact loop, some experts without tokens."""
    torch.manual_seed(0)
    experts = Experts(4, 16, 32).bfloat16()
    x = torch.randn(24, 16, dtype=torch.bfloat16)
    counts = torch.tensor([10, 0, 14, 0])
    torch.testing.assert_close(experts.grouped(x, counts), experts(x, counts), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rank", [4, 8])
def test_the_grouped_gemm_adds_each_experts_lora_adapters(rank):
    """LoRA on the stacked weights: the grouped path (its low-rank GEMMs padded to 16-byte rows at rank 4)
    against the loop, each expert's own adapters, and the adapters really adding something."""
    from curry_train.primitives.lora import apply_lora  # noqa: PLC0415

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.experts = Experts(4, 16, 32)
    apply_lora(holder, ["experts.w1", "experts.w2", "experts.w3"], rank, alpha=2.0 * rank)
    with torch.no_grad():
        for name, param in holder.named_parameters():
            if "lora" in name:
                param.copy_(torch.randn(param.shape) * 0.3)
    experts = holder.experts.bfloat16()
    x = torch.randn(24, 16, dtype=torch.bfloat16)
    counts = torch.tensor([10, 0, 8, 6])
    looped = experts(x, counts)
    torch.testing.assert_close(experts.grouped(x, counts, experts.adapters()), looped, rtol=2e-2, atol=2e-2)
    assert (experts.grouped(x, counts) - looped).abs().max() > 0.1  # without them: another output


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 5}, "top_k=5 must be between 1 and the 4 experts"),
        ({"score_function": "relu"}, "score function 'relu'"),
        ({"balancing": "loss"}, "balancing 'loss'"),
    ],
)
def test_router_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TopKRouter(DIM, 4, **{"top_k": 2, **kwargs})


def test_the_aux_loss_trains_as_if_added_to_the_loss(monkeypatch):
    """The layer's output carries the router's loss into backward: the same gradients as adding it."""
    import curry_train.model.moe as moe  # noqa: PLC0415

    layer = moe_layer(4, 2, balancing="aux_loss", aux_loss_coef=0.5, z_loss_coef=0.1)
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    attached = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()))
    assert float(layer.aux_loss_sum) > 0
    captured = []
    layer.router.register_forward_hook(lambda module, args, routing: captured.append(routing))
    monkeypatch.setattr(moe, "attach_aux_loss", lambda output, aux: output)
    added = layer(x).square().sum() + captured[0].aux_loss
    for got, want in zip(attached, torch.autograd.grad(added, list(layer.parameters())), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# -- the MoE model in training ---------------------------------------------------------------------

from conftest import FAST, assert_same_curve, read_metric, train  # noqa: E402

from curry_train.config import ConfigError, compose  # noqa: E402
from curry_train.config.checks import check  # noqa: E402
from curry_train.model.llama import Llama  # noqa: E402


def test_moe_debug_has_experts_in_every_block_and_a_dense_one_below_dense_layers():
    model = Llama(compose(["model=moe_debug", "model.moe.dense_layers=1"]).model)
    assert isinstance(model.layers["0"].feed_forward, SwiGLU)
    assert all(isinstance(model.layers[str(i)].feed_forward, MoE) for i in (1, 2, 3))
    assert model.layers["1"].feed_forward.experts.w1.shape == (8, 192, 128)
    assert "layers.1.feed_forward.router.expert_bias" in model.state_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.moe.top_k=9"], "model.moe.top_k=9 must be between 1 and model.moe.experts=8"),
        (["model.moe.balancing=loss"], "model.moe.balancing='loss': expected one of aux_free, aux_loss, none"),
        (["model.moe.capacity_factor=0"], "model.moe.capacity_factor=0.0 must be positive"),
    ],
)
def test_moe_settings_are_checked_before_any_worker(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(compose(["model=moe_debug", "logger=csv", *overrides]), env={}, run_dir=tmp_path)


@pytest.mark.slow
@pytest.mark.matrix  # test_expert_parallel covers fsdp beside ep, and resuming the balancing bias
def test_moe_debug_trains_the_same_curve_on_two_ranks_and_resumes_its_balancing(tmp_path, pools):
    """One process, fsdp on 2 ranks (experts sharded, loads summed over the ranks before the bias
    moves), and a 2-rank run resumed from its step-5 checkpoint: the same 10 losses (rel 1e-5). The
    balancing bias is part of the checkpoint, so the resumed run routes as the uninterrupted one."""
    common = [*FAST, "model=moe_debug", "trainer.max_steps=10", "model.moe.bias_update_rate=0.05"]
    single, fsdp, resumed = (tmp_path / name for name in ("single", "fsdp", "resumed"))
    train(pools, common, single)
    reference = read_metric(single)
    assert reference[9] < reference[0] - 1.0  # it learns
    train(pools, [*common, "parallel=fsdp", "trainer.devices=2"], fsdp)
    assert_same_curve(read_metric(fsdp), reference)
    imbalance = read_metric(fsdp, "train/moe_load_imbalance")
    assert all(value >= 1.0 for value in imbalance.values())
    first = [*common, "trainer.devices=2", "checkpoint.every_n_steps=5"]
    train(pools, [*first[:-1], "trainer.max_steps=5", first[-1]], resumed)
    train(pools, [*first, "ckpt_path=auto"], resumed)
    assert_same_curve(read_metric(resumed), reference)
