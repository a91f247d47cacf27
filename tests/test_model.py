"""The Llama model: real shapes on the meta device, causality, GQA, tying, the split plan, init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curry_train.config import compose
from curry_train.model.llama import Llama, apply_rope, rope_tables
from curry_train.primitives.materialize import materialize_and_init


def model_cfg(name: str = "debug", **overrides):
    cfg = compose([f"model={name}", *(f"model.{k}={v}" for k, v in overrides.items())]).model
    return cfg


@pytest.mark.parametrize("name, billions", [("llama3_8b", 8.03), ("llama3_70b", 70.55), ("llama3_405b", 405.85)])
def test_llama3_shapes_on_meta_device(name, billions):
    with torch.device("meta"):
        model = Llama(model_cfg(name))
    assert model.num_parameters() / 1e9 == pytest.approx(billions, abs=0.01)
    assert all(p.is_meta for p in model.parameters())


def small_model(seed: int = 0, **overrides) -> Llama:
    with torch.device("meta"):
        model = Llama(model_cfg(**overrides))
    materialize_and_init(model, torch.device("cpu"), seed)
    return model


def test_forward_shape_and_causality():
    model = small_model().eval()
    tokens = torch.randint(0, 256, (2, 32))
    logits = model(tokens)
    assert logits.shape == (2, 32, 256)
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 256
    assert torch.equal(model(changed)[:, :20], logits[:, :20])  # the past never sees the future
    assert not torch.allclose(model(changed)[:, 20:], logits[:, 20:])


def test_head_dim_wider_than_dim_over_heads():
    """model.head_dim (Qwen3: 32 heads of 128 on a 2048 stream): projections n_heads x head_dim wide,
    RoPE over head_dim, the output back to dim; still causal."""
    model = small_model(head_dim=64).eval()  # debug: dim 128, 4 heads (32 wide by default), 2 KV heads
    attention = model.layers["0"].attention
    assert attention.wq.weight.shape == (256, 128) and attention.wk.weight.shape == (128, 128)
    assert attention.wo.weight.shape == (128, 256) and model.rope_cos.shape[-1] == 32
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    assert torch.equal(model(changed)[:, :10], model(tokens)[:, :10])


def test_grouped_query_attention_matches_repeated_heads():
    """GQA with n_kv_heads=2 equals multi-head attention whose K/V heads are the repeated KV heads."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8)
    k, v = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    model = small_model()
    sdpa = model.layers["0"].attention.sdpa
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(sdpa(q, k, v), expected)


def test_rope_rotates_by_position_and_preserves_norm():
    cos, sin = rope_tables(8, 16, 10000.0)
    x = torch.randn(1, 16, 2, 8)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotated[:, 0], x[:, 0])  # position 0: angle 0
    # Relative position property: <R_m q, R_n k> depends on m - n only.
    q, k = torch.randn(8), torch.randn(8)

    def dot(m, n):
        qs = apply_rope(q.expand(1, 16, 1, 8), cos, sin)[0, m, 0]
        ks = apply_rope(k.expand(1, 16, 1, 8), cos, sin)[0, n, 0]
        return float(qs @ ks)

    assert dot(5, 3) == pytest.approx(dot(9, 7), rel=1e-5)


def test_tied_embeddings_share_one_parameter():
    model = small_model(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    names = [name for name, _ in model.named_parameters()]
    assert "output.weight" not in names and "tok_embeddings.weight" in names


def test_split_plan_names_real_modules():
    model = small_model()
    plan = model.plan
    block = model.get_submodule(f"{plan.blocks}.0")
    for path in plan.column + plan.row:
        assert isinstance(block.get_submodule(path), nn.Linear), path
    for path in plan.norms:
        assert block.get_submodule(path).weight.shape == (model.cfg.dim,)
    assert block.get_submodule(plan.attention_op) is not None
    assert isinstance(model.get_submodule(plan.embedding), nn.Embedding)
    assert isinstance(model.get_submodule(plan.head), nn.Linear)
    assert len(model.get_submodule(plan.blocks)) == model.cfg.n_layers


def test_init_is_a_function_of_seed_and_name():
    a, b, c = small_model(seed=1), small_model(seed=1), small_model(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=False):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name
    # Output projections of residual branches are scaled by 1/sqrt(2 * n_layers).
    std_q = a.layers["0"].attention.wq.weight.std().item()
    std_o = a.layers["0"].attention.wo.weight.std().item()
    assert std_o == pytest.approx(std_q / (2 * a.cfg.n_layers) ** 0.5, rel=0.1)


def test_dropping_blocks_keeps_parameter_names():
    """A pipeline stage deletes what it does not own; the rest keep their fully-qualified names."""
    model = small_model()
    full = dict(model.named_parameters())
    del model.layers["0"]
    model.tok_embeddings = None
    kept = dict(model.named_parameters())
    assert kept and all(torch.equal(full[name], p) for name, p in kept.items())
    hidden = torch.randn(1, 8, model.cfg.dim)
    assert model(hidden).shape == (1, 8, 256)


@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_chunked_loss_equals_the_whole_loss(chunks):
    """model.loss_chunks: the head and the cross-entropy over sequence chunks give the whole sequence's
    summed loss and gradients (fp32: rel 1e-6; sums taken in another order)."""
    cfg = compose(["model.vocab_size=1000"]).model
    torch.manual_seed(0)
    model = Llama(cfg)
    tokens = torch.randint(0, 1000, (2, 65))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    whole = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(), reduction="sum")
    whole.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    cfg.loss_chunks = chunks
    chunked = model(inputs, labels=labels)
    chunked.backward()
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_loss_memory_falls_by_the_logits_share():
    """With a vocabulary of 16k the logits dominate: 8 chunks cut the peak the tracker measures (activations
    and backward's temporaries: the loss's peak is in its backward) by what advise's estimate says, within
    10%: the whole loss's 12 bytes a logit, against one chunk's and the chunk's gradient of the head."""
    from curry_train.planning.layout import Layout  # noqa: PLC0415
    from curry_train.planning.memory import activation_bytes  # noqa: PLC0415
    from curry_train.validation.memory import peak_memory  # noqa: PLC0415

    cfg = compose(["model.vocab_size=16384", "data.seq_len=256", "data.micro_batch_size=2"])
    with torch.device("meta"):
        model = Llama(cfg.model)
    materialize_and_init(model, torch.device("cpu"), 0)
    tokens = torch.randint(0, 16384, (2, 257))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def whole() -> None:
        F.cross_entropy(model(inputs).flatten(0, 1).float(), labels.flatten(), reduction="sum").backward()

    def chunked() -> None:
        model(inputs, labels=labels).backward()

    _, measured_whole, _ = peak_memory(model, whole, inputs=[tokens])
    cfg.model.loss_chunks = 8
    _, measured_chunked, _ = peak_memory(model, chunked, inputs=[tokens])
    estimated = {
        chunks: activation_bytes(cfg, Layout(micro_batch_size=2, loss_chunks=chunks), flash_attention=True)["loss"]
        for chunks in (1, 8)
    }
    assert estimated[1] == 12 * 2 * 256 * 16384
    assert estimated[8] == estimated[1] / 8 + 4 * 16384 * cfg.model.dim
    drop = measured_whole - measured_chunked
    assert drop == pytest.approx(estimated[1] - estimated[8], rel=0.10), (measured_whole, measured_chunked, estimated)
