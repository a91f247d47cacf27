"""Context parallelism: our ring / double-ring / all-to-all attention, and parallel=cp."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from curry_train.config import ConfigError, compose
from curry_train.config.checks import check
from curry_train.primitives import attention_kernels
from curry_train.primitives.attention_kernels import KERNELS, _candidates
from curry_train.primitives.context_parallel import (
    ContextParallelAttention,
    default_inner_ring,
    sequence_layout,
    sequence_positions,
    shard_sequence,
)


def test_zigzag_layout_balances_causal_work():
    assert [list(r) for r in sequence_layout(8, 2, 0)] == [[0, 1], [6, 7]]
    assert [list(r) for r in sequence_layout(8, 2, 1)] == [[2, 3], [4, 5]]
    assert [list(r) for r in sequence_layout(8, 2, 1, load_balance=False)] == [[4, 5, 6, 7]]
    # causal work of rank r: for each query position, the keys it sees; zigzag makes it equal
    for cp in (2, 4):
        work = [sum(p + 1 for p in sequence_positions(64, cp, r).tolist()) for r in range(cp)]
        assert len(set(work)) == 1, work
        contiguous = [sum(p + 1 for p in sequence_positions(64, cp, r, load_balance=False).tolist()) for r in range(cp)]
        assert contiguous[-1] > 2 * contiguous[0]
    x = torch.arange(16).view(2, 8)
    assert shard_sequence(x, 2, 0).tolist() == [[0, 1, 6, 7], [8, 9, 14, 15]]
    with pytest.raises(ValueError, match="sequence length 10 is not divisible by 8"):
        sequence_layout(10, 4, 0)


def _attention_against_full(cases: list) -> dict[str, list[float]]:
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, pattern, causal, load_balance in cases:
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(2, 4, 32, 8, generator=generator, requires_grad=True)
        k = torch.randn(2, 2, 32, 8, generator=generator, requires_grad=True)  # grouped: 2 query heads per kv head
        v = torch.randn(2, 2, 32, 8, generator=generator, requires_grad=True)
        dout = torch.randn(2, 4, 32, 8, generator=generator)
        reference = F.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal
        )
        reference.backward(dout)
        attention = ContextParallelAttention(dist.group.WORLD, pattern, causal=causal, load_balance=load_balance)
        local = [shard_sequence(t.detach(), world, rank, load_balance, dim=2).requires_grad_() for t in (q, k, v)]
        out = attention(*local)
        out.backward(shard_sequence(dout, world, rank, load_balance, dim=2))
        expected = [shard_sequence(t, world, rank, load_balance, dim=2) for t in (reference, q.grad, k.grad, v.grad)]
        got = [out, *(t.grad for t in local)]
        results[name] = [((g - e).norm() / e.norm()).item() for g, e in zip(got, expected, strict=False)]
    return results


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, cases",
    [
        (
            2,
            [
                ("ring", "ring", True, True),
                ("ring-contiguous", "ring", True, False),
                ("ring-full", "ring", False, True),
                ("alltoall", "alltoall", True, True),
            ],
        ),
        (
            4,
            [
                ("ring", "ring", True, True),
                ("double_ring", "double_ring", True, True),
                ("alltoall-4", "alltoall", True, True),
            ],
        ),
    ],
    ids=["cp2", "cp4"],
)
def test_attention_op_matches_unsharded_attention(world, cases, pools):
    """Outputs and the gradients of q, k and v (grouped key/value heads) of every pattern equal
    PyTorch's attention over the whole sequence, shard by shard."""

    for rank, results in enumerate(pools.run(world, _attention_against_full, cases)):
        for name, errors in results.items():
            assert max(errors) < 1e-5, (rank, name, errors)  # out, dq, dk, dv


def test_default_inner_ring_is_the_largest_divisor_up_to_the_square_root():

    assert default_inner_ring(4) == 2 and default_inner_ring(8) == 2 and default_inner_ring(9) == 3
    assert default_inner_ring(2) == 2 and default_inner_ring(7) == 7


# -- parallel=cp's configuration (its layouts' parity: test_parity.py) ---------------------------

from conftest import FAST, run_seed_example  # noqa: E402


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["parallel.cp.size=3", "trainer.devices=3", "data.global_batch_size=15", "data.micro_batch_size=5"],
            "data.seq_len=64 is not divisible by 6 (2 x parallel.cp.size=3",
        ),
        (
            [
                "parallel.cp.size=4",
                "parallel.cp.pattern=alltoall",
                "model.n_heads=2",
                "model.n_kv_heads=2",
                "model.dim=64",
                "trainer.devices=4",
            ],
            "2 heads per rank (model.n_heads / tp) do not divide by parallel.cp.size=4",
        ),
        (["parallel.cp.pattern=zigzag", "trainer.devices=2"], "parallel.cp.pattern='zigzag'"),
        (["model.dropout=0.1", "trainer.devices=2"], "context-parallel attention has no dropout"),
        (
            ["parallel.cp.size=4", "parallel.cp.pattern=double_ring", "parallel.cp.inner_ring=3", "trainer.devices=4"],
            "parallel.cp.inner_ring=3 does not divide parallel.cp.size=4",
        ),
    ],
)
def test_context_parallel_config_errors(overrides, message):

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(compose([*FAST, "parallel=cp", *overrides]))


SEED_EXAMPLE = """
import torch
import torch.distributed as dist
from curry_train.model.llama import rope_tables
from curry_train.primitives import GQAttention, ParallelState
from curry_train.primitives.context_parallel import sequence_positions, shard_sequence

dist.init_process_group("gloo")
ps = ParallelState(cp=2)
torch.manual_seed(0)
reference = GQAttention(dim=64, n_heads=4, n_kv_heads=2, dropout=0.0)
x_full = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(1))
cos, sin = rope_tables(16, 32, 10000.0)
positions = sequence_positions(32, 2, ps.cp_rank)   # this rank's (zigzag) positions
x = shard_sequence(x_full, 2, ps.cp_rank)
torch.manual_seed(0)  # the same weights as the reference

# -- the seed example, as written --
from curry_train.primitives import ContextParallel
cp_attn = ContextParallel.wrap(
    inner_attention=GQAttention(dim=64, n_heads=4, n_kv_heads=2, dropout=0.0),
    cp_group=ps.get_cp_group(),
    pattern="ring",             # one of: ring, double_ring
    causal=True,
)
y = cp_attn(x, cos[positions], sin[positions])
# -- end of the seed example --

attention = cp_attn

expected = shard_sequence(reference(x_full, cos, sin), 2, ps.cp_rank)
assert torch.allclose(y, expected, rtol=1e-5, atol=1e-6), (y - expected).abs().max()
y.square().sum().backward()
reference(x_full, cos, sin).square().sum().backward()
for (name, p), q in zip(attention.named_parameters(), reference.parameters()):
    grad = p.grad.clone()
    dist.all_reduce(grad, group=ps.get_cp_group())  # each rank's tokens contribute their part
    # fp32 sums: the error scales with the gradient's largest terms, not with each element (wv's gradient
    # reaches 23 and differs by 9.5e-6 on some machines: 5 ulps of 23)
    scale = q.grad.abs().max().item()
    assert torch.allclose(grad, q.grad, rtol=1e-4, atol=1e-6 * max(1.0, scale)), (name, (grad - q.grad).abs().max())
print("SEED OK", dist.get_rank())
"""


@pytest.mark.slow
def test_seed_example_runs_unchanged_under_torchrun(tmp_path):
    assert run_seed_example(SEED_EXAMPLE, tmp_path).count("SEED OK") == 2


# ----------------------------------------------------------------------------------------------
# Block kernels: the fused kernel of each device, used only once checked against the math kernel


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("cuda_flash", torch.bfloat16),
        ("cuda_flash", torch.float16),
        ("cuda_cudnn", torch.bfloat16),
        ("cuda_cudnn", torch.float16),
        ("cuda_efficient", torch.float32),
        ("cuda_efficient", torch.bfloat16),
    ],
)
def test_cuda_kernels_call_the_ops_as_their_schemas_declare(name, dtype):
    """No GPU here: the CUDA kernels' calls run on meta tensors, whose kernels check every argument
    against the op's schema and give the outputs' shapes and dtypes."""

    forward, backward = KERNELS[name]
    q, dout = (torch.empty(2, 4, 40, 64, device="meta", dtype=dtype) for _ in range(2))
    k, v = (torch.empty(2, 4, 24, 64, device="meta", dtype=dtype) for _ in range(2))
    for causal in (False,):  # causal blocks have as many keys as queries; these do not
        out, lse = forward(q, k, v, causal, 0.125)
        assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, dtype, q.shape[:-1], torch.float32)
        grads = backward(dout, q, k, v, out, lse, causal, 0.125)
        assert [(g.shape, g.dtype) for g in grads] == [(t.shape, dtype) for t in (q, k, v)]


def test_efficient_kernel_log_sum_exp_is_trimmed_and_padded_back(monkeypatch):
    """The memory-efficient kernel's contract, emulated on the CPU with the math kernel: its lse has
    rows padded to a multiple of 32, and its backward wants them so. The block kernel trims them for
    the merge and pads them back for backward, and the result passes the check against math."""

    def forward(q, k, v, bias, compute_lse, dropout, causal, *, scale):
        out, lse = attention_kernels._math_forward(q, k, v, causal, scale)
        rows = q.shape[2]
        padded = torch.cat([lse, torch.full((*lse.shape[:-1], -rows % 32), float("nan"))], dim=-1)
        return out, padded, torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)

    def backward(dout, q, k, v, bias, out, lse, seed, offset, dropout, mask, causal, *, scale):
        assert lse.shape[-1] % 32 == 0 and lse.is_contiguous() and mask == [True, True, True, False]
        return (*attention_kernels._math_backward(dout, q, k, v, out, lse[..., : q.shape[2]], causal, scale), None)

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", forward)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_efficient_attention_backward", backward)
    assert attention_kernels._check_kernel("cuda_efficient", torch.device("cpu"), torch.float32, 32) is None
    out, lse = attention_kernels.KERNELS["cuda_efficient"][0](*(torch.randn(1, 2, 40, 32) for _ in range(3)), True, 0.2)
    assert lse.shape == (1, 2, 40) and torch.isfinite(lse).all()


def test_a_kernel_that_disagrees_with_math_is_not_used(monkeypatch):

    def wrong_forward(q, k, v, causal, scale):
        out, lse = attention_kernels._math_forward(q, k, v, causal, scale)
        return out, lse + 1e-2  # a log-sum-exp off by 1%: merged outputs would be silently wrong

    monkeypatch.setitem(attention_kernels.KERNELS, "cpu_flash", (wrong_forward, attention_kernels._cpu_flash_backward))
    monkeypatch.setattr(attention_kernels, "_CHOSEN", {})
    with pytest.warns(UserWarning, match="cpu_flash attention kernel is not used.*differs from the math kernel"):
        assert attention_kernels.block_kernel(torch.device("cpu"), torch.float32, 16) == "math"
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    out, _ = attention_kernels.block_forward(q, k, v, True, 0.25)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25), atol=1e-6)

    def failing_forward(q, k, v, causal, scale):
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setitem(
        attention_kernels.KERNELS, "cpu_flash", (failing_forward, attention_kernels._cpu_flash_backward)
    )
    monkeypatch.setattr(attention_kernels, "_CHOSEN", {})
    with pytest.warns(UserWarning, match="RuntimeError: No available kernel"):
        assert attention_kernels.block_kernel(torch.device("cpu"), torch.float32, 16) == "math"


def test_cpu_flash_kernel_passes_its_check():

    for dtype in (torch.float32, torch.bfloat16):
        assert attention_kernels._check_kernel("cpu_flash", torch.device("cpu"), dtype, 64) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_fused_kernels_pass_their_check(dtype):
    """On a GPU: the fused kernel of each dtype agrees with the math kernel and is the one chosen."""

    device = torch.device("cuda")
    expected = "cuda_flash" if dtype != torch.float32 else "cuda_efficient"
    assert attention_kernels._check_kernel(expected, device, dtype, 64) is None
    assert attention_kernels.block_kernel(device, dtype, 64) == expected


def test_kernel_candidates_by_device_dtype_and_head_dim():

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _candidates(cuda, torch.bfloat16, 64) == ["cuda_flash", "cuda_cudnn", "cuda_efficient", "math"]
    assert _candidates(cuda, torch.float16, 192) == ["cuda_flash", "cuda_efficient", "math"]  # cuDNN: <= 128
    assert _candidates(cuda, torch.float32, 64) == ["cuda_efficient", "math"]
    assert _candidates(cuda, torch.bfloat16, 60) == ["cuda_efficient", "math"]  # not a multiple of 8
    assert _candidates(cpu, torch.float32, 64) == ["cpu_flash", "math"]


def test_the_check_probes_strided_blocks_as_the_ring_passes_them(monkeypatch):
    """The ring hands kernels views (heads and sequence transposed, one chunk of two): a kernel that
    only handles contiguous blocks must fail its check, not the training step."""

    def contiguous_only(q, k, v, causal, scale):
        if not (q.is_contiguous() and k.is_contiguous()):
            raise RuntimeError("expected contiguous inputs")
        return attention_kernels._math_forward(q, k, v, causal, scale)

    monkeypatch.setitem(
        attention_kernels.KERNELS, "cpu_flash", (contiguous_only, attention_kernels._cpu_flash_backward)
    )
    assert "expected contiguous inputs" in attention_kernels._check_kernel(
        "cpu_flash", torch.device("cpu"), torch.float32, 16
    )
