"""Document masking: a packed row computes what its documents compute alone; the masked block kernels
and their merge are exact. The layouts are held to one process under the mask by test_parity.py's
``docs`` rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from curry_train.config import compose
from curry_train.config.schema import Config
from curry_train.model.documents import document_ids, document_mask, document_positions
from curry_train.model.llama import Llama
from curry_train.primitives.attention_kernels import masked_backward, masked_forward
from curry_train.primitives.context_parallel import _merge
from curry_train.primitives.materialize import materialize_and_init

SEP = 0


def test_document_numbers_and_positions() -> None:
    inputs = torch.tensor([[5, 6, SEP, 7, SEP, SEP, 8, 9], [SEP, 1, 2, 3, 4, 5, 6, 7]])
    assert document_ids(inputs, SEP).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_positions(document_ids(inputs, SEP)).tolist() == [
        [0, 1, 2, 0, 1, 0, 0, 1],
        [0, 0, 1, 2, 3, 4, 5, 6],
    ]


@pytest.fixture(scope="module")
def model() -> Llama:
    cfg = Config.of(compose(["model.vocab_size=64"]))
    with torch.device("meta"):
        llama = Llama(cfg.model)
    materialize_and_init(llama, torch.device("cpu"), seed=5)
    return llama.eval()


def test_a_packed_row_computes_what_its_documents_compute_alone(model) -> None:
    generator = torch.Generator().manual_seed(0)
    documents = [torch.randint(1, 64, (n,), generator=generator) for n in (9, 1, 17, 5)]
    documents = [torch.cat([d, torch.tensor([SEP])]) for d in documents]  # each ends with its separator
    row = torch.cat(documents)[None]  # (1, 36): inputs row[:, :-1], labels row[:, 1:]
    inputs, labels = row[:, :-1], row[:, 1:].clone()
    labels[inputs == SEP] = -100  # a separator is not asked to predict the next document's first token
    numbers = document_ids(inputs, SEP)
    with torch.no_grad():
        packed = model(inputs, documents=numbers)
        packed_loss = model(inputs, labels=labels, documents=numbers)
        unmasked = model(inputs)
        start, alone_loss = 0, torch.zeros(())
        for document in documents:
            alone = model(document[None, :-1])  # the document by itself: positions from 0, nothing before it
            torch.testing.assert_close(packed[:, start : start + len(document) - 1], alone, rtol=1e-5, atol=1e-5)
            alone_loss += F.cross_entropy(alone[0], document[1:], reduction="sum")
            start += len(document)
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-5)
    # Without the mask the later documents see the earlier ones: the check above can fail.
    assert not torch.allclose(unmasked[:, 11:], packed[:, 11:], atol=1e-3)


def test_masked_blocks_merge_to_the_whole_masked_attention() -> None:
    """Keys cut in two blocks, each run under its part of the mask and merged by log-sum-exp: the
    output and gradients of one masked attention over all keys, with queries that a block leaves empty
    (they take nothing from it) and a block empty for every query of a document."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 12, 8, generator=generator, dtype=torch.float32) for _ in range(3))
    numbers = torch.tensor([[0] * 3 + [1] * 6 + [2] * 3, [0] * 12])
    mask = document_mask(numbers, numbers)
    scale = 8**-0.5
    for tensor in (q, k, v):
        tensor.requires_grad_(True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    dout = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    out = torch.zeros_like(q, dtype=torch.float32)
    lse = torch.full(q.shape[:-1], float("-inf"))
    blocks = (slice(0, 6), slice(6, 12))
    with torch.no_grad():
        for keys in blocks:
            o, block_lse = masked_forward(q, k[:, :, keys], v[:, :, keys], mask[..., keys], scale)
            assert torch.isinf(block_lse).any()  # some queries see nothing of this block
            out, lse = _merge(out, lse, o, block_lse)
    torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-6)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for keys in blocks:
        dq_b, dk_b, dv_b = masked_backward(dout, q, k[:, :, keys], v[:, :, keys], out, lse, mask[..., keys], scale)
        dq += dq_b
        dk[:, :, keys] += dk_b
        dv[:, :, keys] += dv_b
    for got, expected in zip((dq, dk, dv), want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_ring_leaves_out_the_blocks_the_mask_empties() -> None:
    """Rank 0 of cp 2 (zigzag: chunks 0 and 3 of 4): against its own chunks, chunk 3 reaches back into
    chunk 0 only where a document spans them."""
    from curry_train.primitives.context_parallel import _block_masks, sequence_layout  # noqa: PLC0415

    q_ranges = sequence_layout(16, 2, 0)
    spanning = torch.tensor([[0] * 4 + [1] * 8 + [2] * 4, [0] * 16])  # row 1: one document over all
    apart = torch.tensor([[0] * 4 + [1] * 8 + [2] * 4, [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4])
    assert set(_block_masks(spanning, q_ranges, q_ranges, causal=True)) == {(0, 0), (1, 0), (1, 1)}
    assert set(_block_masks(apart, q_ranges, q_ranges, causal=True)) == {(0, 0), (1, 1)}  # (1, 0): skipped
    assert _block_masks(None, q_ranges, q_ranges, causal=True) == {}


def test_flex_attention_serves_only_where_its_check_passes(monkeypatch) -> None:
    from curry_train.model import documents as kernels  # noqa: PLC0415

    monkeypatch.setattr(kernels, "_CHOSEN", {})
    assert kernels.kernel_for(torch.device("cpu"), torch.float32, 16) == "dense"
    monkeypatch.setattr(kernels, "_check_flex", lambda *key: "differs from the dense-mask kernel by 1")
    with pytest.warns(UserWarning, match="FlexAttention is not used on cuda .* by 1; attention runs under a dense"):
        assert kernels.kernel_for(torch.device("cuda"), torch.bfloat16, 64) == "dense"
    monkeypatch.setattr(kernels, "_check_flex", lambda *key: None)
    assert kernels.kernel_for(torch.device("cuda"), torch.float16, 64) == "flex"
    assert kernels.kernel_for(torch.device("cuda"), torch.float16, 64, dropout=0.1) == "dense"  # flex has none


def test_flex_attention_block_mask_is_the_dense_mask() -> None:
    """FlexAttention's forward runs on CPU (its backward does not): its block mask from the documents
    gives the dense-mask kernel's output, grouped key/value heads and all."""
    from curry_train.model.documents import _dense, _flex  # noqa: PLC0415

    generator = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 128, 16, generator=generator)
    k, v = (torch.randn(2, 2, 128, 16, generator=generator) for _ in range(2))
    lengths = torch.randint(1, 40, (2, 32), generator=generator).cumsum(1)
    numbers = (torch.arange(128)[None, :, None] >= lengths[:, None, :]).sum(-1)
    with torch.no_grad():
        torch.testing.assert_close(_flex(q, k, v, numbers, 0.0), _dense(q, k, v, numbers, 0.0), rtol=1e-5, atol=1e-5)
