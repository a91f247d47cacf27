"""The parity table: every layout against one process, gradient by gradient.

Each row trains its layout through the real training path (strategy, module, data, optimizer) for
``STEPS`` optimizer steps in the pool of workers of its world size (started once for the whole session),
and the single-process fp32 reference of the same config (one run per distinct reference). At every step
it compares the global loss, the global gradient norm and every parameter's full gradient (sharded ones
gathered), and checks that every rank logged the step's loss and that no gradient is left pending a
reduction; the later steps' losses and gradients follow the optimizer's updates, so each row is also a
few steps of the loss curve. A row that validates compares the validation losses too, and a
mixture-of-experts row the routers' balancing biases at the end (``validation/whitebox.py``).

Tolerances: fp32, relative 1e-5 (a layout reorders sums; a missing, doubled or mis-scaled reduction or a
mis-sliced shard is off by 1e-2 or more: whitebox.py says why). bf16 and inductor rows say theirs.

The rows are grouped by world size; ``--matrix`` adds the rest of each family (more sizes of the same
checks). The tests of each primitive's own contract stay in the per-dimension files.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import CHAT, DOCUMENTS, FAST

from curry_train.validation.whitebox import Case, validate_many

STEPS = 3
DENSE_PARAMETERS = 39  # the debug model's parameter tensors
MOE_PARAMETERS = 55  # moe_debug's
MOE = ("model=moe_debug", "model.moe.bias_update_rate=0.05")  # a rate at which balancing changes the routing
ACCUMULATE = ("data.global_batch_size=32",)  # 2 micro-batches per rank on 4 ranks, 4 on 2
LORA = ("+model/lora=attention", "model.lora.rank=4")
LORA_PARAMETERS = 32  # lora_a and lora_b of q, k, v and o in each of the debug model's 4 blocks
# Adapters on the routed experts' stacked weights (one pair per expert) and on wq
LORA_EXPERTS = (
    "+model/lora=attention",
    "model.lora.rank=4",
    "model.lora.targets=[attention.wq,feed_forward.experts.w1,feed_forward.experts.w2,feed_forward.experts.w3]",
)
LORA_EXPERT_PARAMETERS = 32  # 2 factors x (wq + w1, w2, w3) x moe_debug's 4 blocks


@dataclass(frozen=True)
class Row:
    id: str
    overrides: tuple[str, ...]
    matrix: bool = False
    rtol: float = 1e-5
    grad_rtol: float = 1e-5
    validate_every: int | None = None  # validate (2 batches) every that many steps, and compare the losses
    min_grad_error: float = 0.0  # a lower precision must show: its worst gradient at least this far off
    parameters: int = DENSE_PARAMETERS

    @property
    def world_size(self) -> int:
        devices = [o.split("=", 1)[1] for o in self.overrides if o.startswith("trainer.devices=")]
        return int(devices[-1]) if devices else 1

    def case(self) -> Case:
        return Case((*FAST, *self.overrides), STEPS, self.rtol, self.grad_rtol, self.validate_every)


def fsdp(sharding: str, devices: int, *extra: str, matrix: bool = False) -> Row:
    overrides = ("parallel=fsdp", f"parallel.fsdp.sharding={sharding}", f"trainer.devices={devices}", *ACCUMULATE)
    return Row(f"fsdp-{sharding}-{devices}", (*overrides, *extra), matrix)


def pp(schedule: str, devices: int = 2, *extra: str, validate: bool = False) -> Row:
    overrides = ("parallel=pp", f"parallel.pp.schedule={schedule}", f"trainer.devices={devices}", *extra)
    return Row(f"pp-{schedule}-{devices}", overrides, validate_every=2 if validate else None)


def compiled(name: str, backend: str, *layout: str, matrix: bool = False, parameters: int = DENSE_PARAMETERS) -> Row:
    overrides = (*layout, "compile.enabled=true", f"compile.backend={backend}")
    return Row(f"compiled-{name}-{backend}", overrides, matrix, parameters=parameters)


# bf16 keeps 8 bits of mantissa (relative spacing 2**-8 = 3.9e-3). Units compute in bf16 and reduce
# in fp32, so a gradient entry carries a few bf16 roundings of its inputs: measured on the debug model,
# 1.4e-2 at worst per tensor (norm-wise), 7e-4 on the global gradient norm, 1e-4 on the loss.
BF16_RTOL, BF16_GRAD_RTOL = 2e-3, 3e-2
# aot_eager runs eager kernels: the fp32 tolerance. Inductor's fused C++ kernels reorder fp32 sums inside
# a block (measured on the loss: 1e-7): its rows keep the fp32 tolerance too.

ROWS = [
    # -- 2 ranks ---------------------------------------------------------------------------------
    Row("dp-2", ("trainer.devices=2",)),
    fsdp("full", 2),
    fsdp("optimizer", 2),
    fsdp("shard_grad_op", 2, matrix=True),
    fsdp("no_shard", 2, matrix=True),
    Row(
        "fsdp-bf16-2",
        ("parallel=fsdp", "parallel.fsdp.mixed_precision=bf16", "trainer.devices=2"),
        rtol=BF16_RTOL,
        grad_rtol=BF16_GRAD_RTOL,
        min_grad_error=1e-4,  # bf16 really computed: fp32 would be ~1e-7
    ),
    Row("tp-2", ("parallel=tp", "parallel.tp.size=2", "trainer.devices=2")),
    Row(
        "tp-2-sp-gathered-logits",
        ("parallel=tp", "trainer.devices=2", "parallel.tp.sequence_parallel=true", "parallel.tp.loss_parallel=false"),
    ),
    Row("tp-2-sp", ("parallel=tp", "trainer.devices=2", "parallel.tp.sequence_parallel=true"), matrix=True),
    pp("gpipe", 2, "parallel.pp.microbatches=8"),  # 8 micro-batches of 2, not the module's 4 of micro_batch_size=4
    pp("1F1B"),
    pp("interleaved"),
    pp("interleaved_zb"),
    pp("zbv", validate=True),  # the V-shaped kinds validate through their own forward order
    pp("dualpipev", validate=True),
    Row("cp-ring-2", ("parallel=cp", "trainer.devices=2")),
    Row("cp-alltoall-2", ("parallel=cp", "parallel.cp.pattern=alltoall", "trainer.devices=2")),
    Row("ep-2", (*MOE, "parallel=ep", "trainer.devices=2"), matrix=True, parameters=MOE_PARAMETERS),
    # Attention tensor-parallel, the experts whole: DTensor and plain parameters side by side in the optimizer.
    # The shared expert's w1 gradient sums every token of the row-parallel attention's output, reduced in
    # another order: measured 1.4e-5 (the other 173 tensors within 1e-5), so 3e-5.
    Row(
        "moe-tp-2",
        (*MOE, "parallel=tp", "parallel.tp.size=2", "trainer.devices=2"),
        grad_rtol=3e-5,
        parameters=MOE_PARAMETERS,
    ),
    compiled("fsdp-2", "inductor", "parallel=fsdp", "trainer.devices=2"),
    compiled("cp-ring-2", "aot_eager", "parallel=cp", "trainer.devices=2"),  # the ring: a deliberate graph break
    # DTensor linears, sequence-sharded norms and the vocabulary-parallel embedding and loss in the graphs
    compiled("tp-2-sp", "aot_eager", "parallel=tp", "trainer.devices=2", "parallel.tp.sequence_parallel=true"),
    # Packed documents under the document mask: the mask and the restarted positions in every layout
    Row("docs-fsdp-2", (*DOCUMENTS, "parallel=fsdp", "trainer.devices=2")),
    Row("docs-tp-2-sp", (*DOCUMENTS, "parallel=tp", "trainer.devices=2", "parallel.tp.sequence_parallel=true")),
    Row("docs-pp-1F1B-2", (*DOCUMENTS, "parallel=pp", "trainer.devices=2"), validate_every=2),
    Row(
        "docs-pp-zbv-2", (*DOCUMENTS, "parallel=pp", "parallel.pp.schedule=zbv", "trainer.devices=2"), validate_every=2
    ),
    Row("docs-cp-ring-2", (*DOCUMENTS, "parallel=cp", "trainer.devices=2")),  # blocks the mask empties: skipped
    Row("docs-cp-alltoall-2", (*DOCUMENTS, "parallel=cp", "parallel.cp.pattern=alltoall", "trainer.devices=2")),
    Row("docs-ep-2", (*DOCUMENTS, *MOE, "parallel=ep", "trainer.devices=2"), parameters=MOE_PARAMETERS),
    compiled("docs-fsdp-2", "inductor", *DOCUMENTS, "parallel=fsdp", "trainer.devices=2"),
    # LoRA: adapters on a frozen base, the only parameters with gradients
    Row("lora-fsdp-2", (*LORA, "parallel=fsdp", "trainer.devices=2"), parameters=LORA_PARAMETERS),
    Row("lora-pp-2", (*LORA, "parallel=pp", "trainer.devices=2"), parameters=LORA_PARAMETERS),
    Row("lora-cp-ring-2", (*LORA, "parallel=cp", "trainer.devices=2"), parameters=LORA_PARAMETERS),
    Row("lora-tp-2", (*LORA, "parallel=tp", "trainer.devices=2"), parameters=LORA_PARAMETERS),
    Row(
        "lora-bf16-base-fsdp-2",  # the frozen base stored in bf16, computed in bf16: against the fp32 reference
        (
            *LORA,
            "model.lora.base_dtype=bf16",
            "parallel=fsdp",
            "parallel.fsdp.mixed_precision=bf16",
            "trainer.devices=2",
        ),
        rtol=BF16_RTOL,
        # The base itself is rounded to bf16 (2^-8 relative), so every activation differs from the fp32
        # reference's; lora_a's gradient at step 2 (1e-4 in size, through B one Adam step from zero) carries
        # it at up to 8% (measured). A reduction that halves or doubles a gradient is off by 50% or more.
        grad_rtol=0.15,
        min_grad_error=1e-4,  # bf16 really computed
        parameters=LORA_PARAMETERS,
    ),
    Row(
        "lora-tp-2-sp-head",  # the head's adapters too, on its vocabulary-sharded logits
        (*LORA, "model.lora.targets=[attention.wq,attention.wo,output]", "parallel=tp", "trainer.devices=2")
        + ("parallel.tp.sequence_parallel=true",),
        parameters=18,
    ),
    Row(
        "lora-ep-2",
        (*LORA, *MOE, "parallel=ep", "trainer.devices=2"),
        parameters=LORA_PARAMETERS,
        # lora_a's gradient passes through B, one Adam step from zero at step 2: 1e-4 in size, so the
        # experts' reordered fp32 sums show at 1e-5 of it (measured 1.06e-5); a wrong reduction is 1e-2
        grad_rtol=3e-5,
    ),
    Row(
        "lora-experts-ep-2",  # each rank's experts' adapters split with them; their gradients its own
        (*LORA_EXPERTS, *MOE, "parallel=ep", "trainer.devices=2"),
        parameters=LORA_EXPERT_PARAMETERS,
        grad_rtol=3e-5,  # as lora-ep-2
    ),
    compiled("lora-fsdp-2", "inductor", *LORA, "parallel=fsdp", "trainer.devices=2", parameters=LORA_PARAMETERS),
    # Chat records: only the assistant's turns are targets; the loss is the mean over the global batch's
    Row("chat-fsdp-2", (*CHAT, "parallel=fsdp", "trainer.devices=2")),
    # every other matmul's output recomputed: counted on DTensor linears as on plain ones
    Row(
        "tp-2-sp-every-other-matmul",
        (
            "parallel=tp",
            "trainer.devices=2",
            "parallel.tp.sequence_parallel=true",
            "parallel.recompute=selective",
            "parallel.recompute_keep_matmuls=every_other",
        ),
    ),
    Row("chat-tp-2-sp", (*CHAT, "parallel=tp", "trainer.devices=2", "parallel.tp.sequence_parallel=true")),
    Row("chat-docs-pp-2", (*CHAT, "data.document_mask=true", "parallel=pp", "trainer.devices=2"), validate_every=2),
    # the ring's log-sum-exp merges in another order: 1.2e-5 on an AMD EPYC without AVX-512 (measured)
    Row("chat-docs-cp-ring-2", (*CHAT, "data.document_mask=true", "parallel=cp", "trainer.devices=2"), grad_rtol=3e-5),
    # ZeRO-1 swaps each block's full parameters in around its compiled call
    compiled(
        "zero1-full-recompute",
        "aot_eager",
        "parallel=fsdp",
        "trainer.devices=2",
        "parallel.fsdp.sharding=optimizer",
        "parallel.recompute=full",
    ),
    # the zero-bubble kinds run each compiled backward in two passes (input, then weights)
    compiled(
        "pp-interleaved_zb-2", "aot_eager", "parallel=pp", "trainer.devices=2", "parallel.pp.schedule=interleaved_zb"
    ),
    compiled(
        "zero1-2", "aot_eager", "parallel=fsdp", "trainer.devices=2", "parallel.fsdp.sharding=optimizer", matrix=True
    ),
    compiled("tp-2", "aot_eager", "parallel=tp", "trainer.devices=2", matrix=True),
    compiled("ddp-2", "aot_eager", "parallel=dp", "trainer.devices=2", matrix=True),
    compiled(
        "fsdp-2-selective-recompute",
        "inductor",
        "parallel=fsdp",
        "trainer.devices=2",
        "parallel.recompute=selective",
        matrix=True,
    ),
    *(
        compiled(
            f"pp-{kind}-2", "aot_eager", "parallel=pp", "trainer.devices=2", f"parallel.pp.schedule={kind}", matrix=True
        )
        for kind in ("gpipe", "1F1B", "interleaved", "zbv", "dualpipev")
    ),
    compiled(
        "cp-alltoall-2", "aot_eager", "parallel=cp", "trainer.devices=2", "parallel.cp.pattern=alltoall", matrix=True
    ),
    compiled("moe-ep-2", "aot_eager", *MOE, "parallel=ep", "trainer.devices=2", matrix=True, parameters=MOE_PARAMETERS),
    # -- 4 ranks ---------------------------------------------------------------------------------
    Row("dp-4", ("trainer.devices=4",)),
    fsdp("full", 4),
    fsdp("shard_grad_op", 4),
    fsdp("no_shard", 4),
    fsdp("optimizer", 4),
    Row(
        "fsdp-hybrid-2x2",
        (
            "parallel=fsdp",
            "parallel.fsdp.sharding=hybrid",
            "parallel.fsdp.replicas=2",
            "trainer.devices=4",
            *ACCUMULATE,
        ),
    ),
    Row(
        "tp-4-sp",  # 4 KV heads: the debug model's 2 cannot be split 4 ways
        (
            "parallel=tp",
            "parallel.tp.size=4",
            "trainer.devices=4",
            "model.n_kv_heads=4",
            "parallel.tp.sequence_parallel=true",
        ),
    ),
    Row("fsdp+tp-2x2", ("parallel=fsdp+tp", "parallel.tp.size=2", "trainer.devices=4")),
    # the head and the vocabulary-sharded loss over 4 chunks of each rank's sequence shard, recomputed in
    # backward inside FSDP's root unit
    Row(
        "fsdp+tp-2x2-sp-chunked-loss",
        ("parallel=fsdp+tp", "trainer.devices=4", "parallel.tp.sequence_parallel=true", "model.loss_chunks=4"),
    ),
    # a later stage's input is the sequence shard; its RoPE tables cover the whole sequence
    Row("tp+pp-2x2-sp", ("parallel=tp+pp", "trainer.devices=4", "parallel.tp.sequence_parallel=true")),
    pp("1F1B", 4, "parallel.pp.size=4", "data.micro_batch_size=2"),
    Row("pp+dp-2x2", ("parallel=pp", "trainer.devices=4", "data.micro_batch_size=2")),  # FSDP2 no_shard replicas
    Row(
        "fsdp+pp-interleaved-2x2",
        ("parallel=fsdp+pp", "parallel.pp.schedule=interleaved", "trainer.devices=4", "data.micro_batch_size=2"),
    ),
    Row("cp-ring-4", ("parallel=cp", "parallel.cp.size=4", "trainer.devices=4")),
    Row(
        "cp-double_ring-2x2",
        ("parallel=cp", "parallel.cp.size=4", "parallel.cp.pattern=double_ring", "trainer.devices=4"),
    ),
    Row(
        "cp-alltoall-4",
        ("parallel=cp", "parallel.cp.size=4", "parallel.cp.pattern=alltoall", "trainer.devices=4"),
        matrix=True,
    ),
    Row("cp-contiguous-2+dp", ("parallel=cp", "parallel.cp.load_balance=false", "trainer.devices=4"), matrix=True),
    Row("fsdp+cp-2x2", ("parallel=fsdp+cp", "trainer.devices=4")),
    Row(
        "fsdp-no_shard+cp-2x2",
        ("parallel=fsdp+cp", "parallel.fsdp.sharding=no_shard", "trainer.devices=4"),
        matrix=True,
    ),
    Row("tp+cp-2x2", ("parallel=tp+cp", "trainer.devices=4")),
    Row("lora-fsdp+tp-2x2", (*LORA, "parallel=fsdp+tp", "trainer.devices=4"), parameters=LORA_PARAMETERS),
    Row("docs-tp+cp-2x2", (*DOCUMENTS, "parallel=tp+cp", "trainer.devices=4")),
    Row(
        "fsdp+ep-2x2",
        (*MOE, "parallel=fsdp+ep", "trainer.devices=4"),
        parameters=MOE_PARAMETERS,
        # the shared expert's and the norm's gradients sum the routed experts' outputs in another order:
        # 1.9e-5 of them at steps 2 and 3 on an AMD EPYC without AVX-512 (measured), under 1e-5 on the
        # machines before it; a reduction that misses a rank or double-counts one is off by 1e-2 or more
        grad_rtol=3e-5,
    ),
    Row(
        "lora-experts-fsdp+ep-2x2",  # the experts' adapters sharded over the ranks ep leaves, like the experts
        (*LORA_EXPERTS, *MOE, "parallel=fsdp+ep", "trainer.devices=4"),
        parameters=LORA_EXPERT_PARAMETERS,
        grad_rtol=3e-5,
    ),
    Row(
        "lora-experts-tp+ep-2x2",
        (*LORA_EXPERTS, *MOE, "parallel=tp+ep", "trainer.devices=4"),
        parameters=LORA_EXPERT_PARAMETERS,
        grad_rtol=3e-5,
        matrix=True,
    ),
    # the routed experts' fp32 sums in another order: up to 2.6e-5 on an AMD EPYC without AVX-512 (measured)
    Row("tp+ep-2x2", (*MOE, "parallel=tp+ep", "trainer.devices=4"), parameters=MOE_PARAMETERS, grad_rtol=5e-5),
    Row("pp+ep-2x2", (*MOE, "parallel=pp+ep", "trainer.devices=4"), parameters=MOE_PARAMETERS, grad_rtol=5e-5),
    Row(
        "fsdp+ep-2x2-allgather",
        (*MOE, "parallel=fsdp+ep", "parallel.ep.dispatcher=allgather", "trainer.devices=4"),
        matrix=True,
        parameters=MOE_PARAMETERS,
    ),
    Row(
        "ep-2-replicated-over-2",
        (*MOE, "parallel=ep", "parallel.ep.size=2", "trainer.devices=4"),
        matrix=True,
        parameters=MOE_PARAMETERS,
    ),
    Row(
        "ep-4+cp-2",
        (*MOE, "parallel=ep+cp", "parallel.ep.size=4", "trainer.devices=4"),
        matrix=True,
        parameters=MOE_PARAMETERS,
    ),
    compiled("fsdp+tp-2x2", "inductor", "parallel=fsdp+tp", "trainer.devices=4", matrix=True),
    *(
        compiled(
            f"fsdp-{mode}-4",
            "aot_eager",
            "parallel=fsdp",
            "trainer.devices=4",
            f"parallel.fsdp.sharding={mode}",
            matrix=True,
        )
        for mode in ("shard_grad_op", "no_shard", "hybrid")
    ),
    compiled("fsdp+pp-2x2", "inductor", "parallel=fsdp+pp", "trainer.devices=4", matrix=True),
    compiled(
        "cp-double_ring-2x2",
        "aot_eager",
        "parallel=cp",
        "trainer.devices=4",
        "parallel.cp.size=4",
        "parallel.cp.pattern=double_ring",
        matrix=True,
    ),
    # -- 8 ranks ---------------------------------------------------------------------------------
    Row(
        "fsdp+tp+pp-2x2x2",  # validates through the pipeline's eval; the 3-D checkpoint: test_resume.py
        ("parallel=fsdp+tp+pp", "trainer.devices=8", "data.micro_batch_size=2"),
        validate_every=2,
    ),
    Row("fsdp+tp+pp+cp-8", ("parallel=fsdp+tp+pp+cp", "trainer.devices=8")),
    Row("docs-fsdp+tp+pp+cp-8", (*DOCUMENTS, "parallel=fsdp+tp+pp+cp", "trainer.devices=8"), validate_every=2),
    # as tp+ep-2x2 (it failed at 1e-5 there; its figure was not read)
    Row(
        "fsdp+tp+ep-2x2x2",
        (*MOE, "parallel=fsdp+tp+ep", "trainer.devices=8"),
        parameters=MOE_PARAMETERS,
        grad_rtol=5e-5,
    ),
    Row(
        "fsdp-hybrid+cp-2x2x2",
        ("parallel=fsdp+cp", "parallel.fsdp.sharding=hybrid", "trainer.devices=8", "data.micro_batch_size=2"),
        matrix=True,
    ),
    Row(
        "fsdp+pp+ep-interleaved",
        (*MOE, "parallel=fsdp+pp+ep", "parallel.pp.schedule=interleaved", "trainer.devices=8"),
        matrix=True,
        parameters=MOE_PARAMETERS,
    ),
    Row(
        "tp+pp+cp+ep-4d",
        (*MOE, "parallel=tp+pp+cp+ep", "trainer.devices=8"),
        matrix=True,
        parameters=MOE_PARAMETERS,
        # sums reordered in four dimensions at once, the differences carried through two Adam updates:
        # measured 1.2e-5 on the shared expert's w1 at step 3 (1e-6 at step 1); a wrong reduction is 1e-2
        grad_rtol=3e-5,
    ),
    compiled(
        "fsdp+tp+pp-2x2x2",
        "aot_eager",
        "parallel=fsdp+tp+pp",
        "trainer.devices=8",
        "data.micro_batch_size=2",
        matrix=True,
    ),
    compiled("fsdp+tp+pp+cp-8", "aot_eager", "parallel=fsdp+tp+pp+cp", "trainer.devices=8", matrix=True),
]


def _params() -> list:
    rows = sorted(ROWS, key=lambda row: row.world_size)  # one pool per world size, each used in one stretch
    return [pytest.param(row, id=row.id, marks=[pytest.mark.matrix] if row.matrix else []) for row in rows]


def test_row_ids_are_unique():
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.slow
@pytest.mark.parametrize("row", _params())
def test_layout_matches_one_process(row, pools):
    (report,) = validate_many([row.case()], pools=pools)
    assert report.ok, report.table(only_failures=True)
    gradients = [r for r in report.rows if r.name.startswith("grad ")]
    assert len(gradients) == STEPS * row.parameters  # every parameter compared at every step
    assert sum(r.name.startswith("validation") for r in report.rows) == (
        STEPS // row.validate_every if row.validate_every else 0
    )
    if row.parameters == MOE_PARAMETERS:  # the balancing bias moved by the loads summed over the right ranks
        assert sum(r.name.endswith("router.expert_bias") for r in report.rows) == 4
    if row.min_grad_error:
        assert max(r.error for r in gradients) > row.min_grad_error
