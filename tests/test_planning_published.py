"""The step-time model against runs whose authors published their layouts and throughput: the table of
docs/planning.md ("Against published runs"), held here figure by figure."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from curry_train.config import compose
from curry_train.planning.advise import estimate
from curry_train.planning.layout import current_layout

SEQ = ("data.seq_len=8192", "data.micro_batch_size=1", "parallel.fsdp.mixed_precision=bf16")
A100_64 = ("hardware=a100_80gb", "hardware.nodes=8", "trainer.devices=8", "trainer.num_nodes=8")
# torchtitan's selective AC: "op" (per op, every other matmul's output kept) and "layer" (every 2nd block whole)
OP_AC = ("parallel.recompute=selective", "parallel.recompute_keep_matmuls=every_other")
LAYER_AC = ("parallel.recompute=selective", "parallel.recompute_every_n_blocks=2")
# Llama 3's table 4 (Dubey et al., 2024): its FSDP keeps the parameters gathered from forward to backward
# (section 3.3.2: "we do not reshard after forward computation"), ZeRO-2's shard_grad_op here.
LLAMA3_405B = (
    "hardware=h100_80gb",
    "trainer.devices=8",
    "model=llama3_405b",
    *SEQ,
    "parallel=fsdp+tp+pp",
    "parallel.fsdp.sharding=shard_grad_op",
    "parallel.tp.size=8",
    "parallel.tp.sequence_parallel=true",
    "parallel.pp.size=16",
    "parallel.pp.schedule=interleaved",
)
# torchtitan's torch.compile in December 2024 (9dec370, the commit of its H100 benchmarks and paper runs)
# compiled each block and left the loss eager ("compiling loss function causes CUDA errors"); from 2025 it
# compiles the loss too, as the product does by default (compile.loss)
COMPILED_2024 = ("compile.enabled=true", "compile.loss=false")
PAPER_8B = (
    "hardware=h100_95gb_hbm2e",
    "trainer.devices=8",
    "model=llama3_8b",
    *SEQ,
    "data.micro_batch_size=2",
    "data.global_batch_size=16",
    "parallel=fsdp",
    *OP_AC,
)


@dataclass(frozen=True)
class Published:
    name: str
    overrides: tuple[str, ...]
    published: float  # tokens/s per GPU, or MFU
    kind: str  # "tokens" | "mfu"
    documented: float  # the estimate docs/planning.md prints
    within: bool = True  # within 15% of the published figure (docs/planning.md says why a row is not)


# the same on 16 hosts (torchtitan's benchmarks/llama3_h100_202412_torchtitan.md, table 3)
PAPER_8B_128 = (
    *(o for o in PAPER_8B if o != "data.global_batch_size=16"),
    "hardware.nodes=16",
    "trainer.num_nodes=16",
    "data.global_batch_size=256",
)


# torchtitan's benchmarks/llama3_h100_202412_torchtitan.md beyond table 1 and 3: its runs with torch.compile and
# Float8 (which the estimate does not model: its GEMMs run at the bf16 rate here), on the 500 W H100.
def titan_long_context(fsdp: int, cp: int) -> tuple[str, ...]:
    """Table 2: Llama 3.1 8B on 8 GPUs, FSDP x CP, local batch 1, full AC, the sequence 32k x cp."""
    return (
        "hardware=h100_95gb_hbm2e",
        "trainer.devices=8",
        "model=llama3_8b",
        f"data.seq_len={32768 * cp}",
        "data.micro_batch_size=1",
        f"data.global_batch_size={fsdp}",
        "parallel=fsdp" if cp == 1 else "parallel=fsdp+cp",
        *(() if cp == 1 else (f"parallel.cp.size={cp}",)),
        "parallel.fsdp.mixed_precision=bf16",
        "parallel.recompute=full",
        *COMPILED_2024,
    )


TITAN_70B_256 = (  # table 4: FSDP 32 x TP 8, local batch 16, full AC
    "hardware=h100_95gb_hbm2e",
    "hardware.nodes=32",
    "trainer.num_nodes=32",
    "trainer.devices=8",
    "model=llama3_70b",
    *SEQ,
    "data.micro_batch_size=16",
    "data.global_batch_size=512",
    "parallel=fsdp+tp",
    "parallel.tp.size=8",
    "parallel.tp.sequence_parallel=true",
    "parallel.fsdp.mixed_precision=bf16",
    "parallel.recompute=full",
    *COMPILED_2024,
)


# torchtitan's benchmarks/asyncTP_llama3_h100_2025-06_torchtitan.md: the same part and torch.compile, bf16
# (its "None (bfloat16)" rows, vanilla TP, which the estimate models; async TP it does not): table 4's 70B
# layout again (TITAN_70B_256), and
TITAN_8B_64_TP8 = (  # FSDP 8 x TP 8, per-op SAC, local batch 12
    "hardware=h100_95gb_hbm2e",
    "hardware.nodes=8",
    "trainer.num_nodes=8",
    "trainer.devices=8",
    "model=llama3_8b",
    *SEQ,
    "data.micro_batch_size=12",
    "data.global_batch_size=96",
    "parallel=fsdp+tp",
    "parallel.tp.size=8",
    "parallel.tp.sequence_parallel=true",
    "parallel.tp.loss_parallel=true",
    *OP_AC,
    "compile.enabled=true",
)
# torchtitan's benchmarks/llama3-8b_h200_202506_trainy-whitefiber.md: 8B on 4 hosts of 8 H200 (700 W), its
# llama3_8b.toml (FSDP, per-op SAC, local batch 2), torch.compile and Float8 (not modeled)
TITAN_8B_H200_32 = (
    "hardware=h200",
    "hardware.nodes=4",
    "trainer.num_nodes=4",
    "trainer.devices=8",
    "model=llama3_8b",
    *SEQ,
    "data.micro_batch_size=2",
    "data.global_batch_size=64",
    "parallel=fsdp",
    *OP_AC,
    "compile.enabled=true",
)


# torchtitan's 405B runs on 64 hosts (tables 5 and 6): TP 8 (+SP) x PP 8, full AC, bf16 FSDP, compiled in 2024
TITAN_405B_512 = (
    "hardware=h100_95gb_hbm2e",
    "hardware.nodes=64",
    "trainer.num_nodes=64",
    "trainer.devices=8",
    "model=llama3_405b",
    "data.micro_batch_size=1",
    "parallel.tp.size=8",
    "parallel.tp.sequence_parallel=true",
    "parallel.pp.size=8",
    "parallel.fsdp.mixed_precision=bf16",
    "parallel.recompute=full",
    *COMPILED_2024,
)


def titan_405b_512(schedule: str) -> tuple[str, ...]:
    """Table 5: FSDP 8 x TP 8 x PP 8, local batch 32 in micro-batches of 1."""
    return (
        *TITAN_405B_512,
        "data.seq_len=8192",
        "data.global_batch_size=256",
        "parallel=fsdp+tp+pp",
        f"parallel.pp.schedule={schedule}",
    )


def titan_405b_4d(fsdp: int, cp: int) -> tuple[str, ...]:
    """Table 6: TP 8 x PP 8 (1F1B) x FSDP x CP, the sequence 32k x cp, local batch 8 in micro-batches of 1."""
    return (
        *TITAN_405B_512,
        f"data.seq_len={32768 * cp}",
        f"data.global_batch_size={8 * fsdp}",
        "parallel=fsdp+tp+pp" if cp == 1 else "parallel=fsdp+tp+pp+cp",
        *(() if cp == 1 else (f"parallel.cp.size={cp}",)),
        "parallel.pp.schedule=1F1B",
    )


ROWS = [
    Published(
        "torchtitan llama3 8B, 64 A100, FSDP, selective op AC",
        (*A100_64, "model=llama3_8b", *SEQ, "data.global_batch_size=64", "parallel=fsdp", *OP_AC),
        2973,
        "tokens",
        2890,
    ),
    Published(
        "torchtitan llama3 70B, 64 A100, FSDP, full AC",
        (*A100_64, "model=llama3_70b", *SEQ, "data.global_batch_size=64", "parallel=fsdp", "parallel.recompute=full"),
        331,
        "tokens",
        335,
    ),
    Published(
        "torchtitan paper llama3.1 8B, 8 H100 at 500 W, FSDP, selective op AC, local batch 2",
        PAPER_8B,
        5762,
        "tokens",
        6661,
        within=False,  # the 500 W part's GEMM rate: docs/planning.md
    ),
    Published(
        "Llama 3 405B, 8192 H100, TP 8, PP 16, DP 64",
        (*LLAMA3_405B, "hardware.nodes=1024", "trainer.num_nodes=1024", "data.global_batch_size=2048"),
        0.43,
        "mfu",
        0.484,
    ),
    # Published runs beyond the four (docs/planning.md, "Against published runs").
    Published(
        "Llama 3 405B, 16384 H100, TP 8, PP 16, DP 128",
        (*LLAMA3_405B, "hardware.nodes=2048", "trainer.num_nodes=2048", "data.global_batch_size=2048"),
        0.41,
        "mfu",
        0.404,
    ),
    Published(
        "Llama 3 405B, 16384 H100, TP 8, CP 16, PP 16, DP 8, seq 131072",
        (
            *LLAMA3_405B,
            "hardware.nodes=2048",
            "trainer.num_nodes=2048",
            "data.seq_len=131072",
            "data.global_batch_size=128",
            "parallel=fsdp+tp+pp+cp",
            "parallel.cp.size=16",
        ),
        0.38,
        "mfu",
        0.434,
    ),
    Published(
        "torchtitan llama3 8B, 64 A100, FSDP, selective layer AC",
        (*A100_64, "model=llama3_8b", *SEQ, "data.global_batch_size=64", "parallel=fsdp", *LAYER_AC),
        2904,
        "tokens",
        2890,
    ),
    Published(
        "torchtitan paper llama3.1 8B, 8 H100 at 500 W, FSDP, torch.compile",
        (*PAPER_8B, *COMPILED_2024),
        6667,
        "tokens",
        9861,
        within=False,
    ),
    Published(
        "torchtitan llama3.1 8B, 128 H100 at 500 W, FSDP, selective op AC, local batch 2",
        PAPER_8B_128,
        5605,
        "tokens",
        6608,
        within=False,
    ),
    Published(
        "torchtitan llama3.1 8B, 128 H100 at 500 W, FSDP, torch.compile",
        (*PAPER_8B_128, *COMPILED_2024),
        6514,
        "tokens",
        9746,
        within=False,
    ),
    Published(
        "torchtitan llama3.1 405B, 128 H100 at 500 W, FSDP 16 x TP 8, full AC, local batch 2",
        (
            "hardware=h100_95gb_hbm2e",
            "hardware.nodes=16",
            "trainer.devices=8",
            "trainer.num_nodes=16",
            "model=llama3_405b",
            *SEQ,
            "data.micro_batch_size=2",
            "data.global_batch_size=32",
            "parallel=fsdp+tp",
            "parallel.tp.size=8",
            "parallel.tp.sequence_parallel=true",
            "parallel.tp.loss_parallel=true",
            "parallel.recompute=full",
        ),
        109,
        "tokens",
        146.1,
        within=False,
    ),
    # torchtitan's table 2, 4 and 5 (compile and Float8; Float8 not modeled: docs/planning.md)
    *(
        Published(
            f"torchtitan llama3.1 8B, 8 H100 at 500 W, FSDP {fsdp} x CP {cp}, seq {32768 * cp}, full AC, Float8",
            titan_long_context(fsdp, cp),
            published,
            "tokens",
            documented,
            within=False,  # long sequences: attention's rate under the ring (docs/planning.md)
        )
        for fsdp, cp, published, documented in (
            (8, 1, 3890, 5060),
            (4, 2, 2540, 3298),
            (2, 4, 1071, 1944),
            (1, 8, 548, 1067),
        )
    ),
    Published(
        "torchtitan llama3.1 70B, 256 H100 at 500 W, FSDP 32 x TP 8, full AC, Float8", TITAN_70B_256, 829, "tokens", 784
    ),
    # tables 1 and 3's third rows: the compiled 8B runs again with Float8
    Published(
        "torchtitan llama3.1 8B, 8 H100 at 500 W, FSDP, torch.compile, Float8",
        (*PAPER_8B, *COMPILED_2024),
        8532,
        "tokens",
        9861,
        within=False,
    ),
    Published(
        "torchtitan llama3.1 8B, 128 H100 at 500 W, FSDP, torch.compile, Float8",
        (*PAPER_8B_128, *COMPILED_2024),
        8380,
        "tokens",
        9746,
        within=False,
    ),
    # table 6: 405B in 4-D (TP 8, PP 8, FSDP x CP), Float8 and async TP; the long sequences as in table 2
    *(
        Published(
            f"torchtitan llama3.1 405B, 512 H100 at 500 W, TP 8 x PP 8 x FSDP {fsdp} x CP {cp}, seq {32768 * cp}",
            titan_405b_4d(fsdp, cp),
            published,
            "tokens",
            documented,
            within=cp == 1,
        )
        for fsdp, cp, published, documented in ((8, 1, 76, 79.1), (4, 2, 47, 64.0), (2, 4, 31, 46.4), (1, 8, 16, 29.9))
    ),
    # the 70B layout again in bf16: the Float8 row above meets its figure only because Float8 is not modeled
    Published(
        "torchtitan llama3.1 70B, 256 H100 at 500 W, FSDP 32 x TP 8, full AC, bf16",
        TITAN_70B_256,
        597.3,
        "tokens",
        784,
        within=False,
    ),
    Published(
        "torchtitan llama3.1 8B, 64 H100 at 500 W, FSDP 8 x TP 8, selective op AC, local batch 12, bf16",
        TITAN_8B_64_TP8,
        4378,
        "tokens",
        6800,
        within=False,
    ),
    Published(
        "torchtitan llama3.1 8B, 32 H200, FSDP, selective op AC, local batch 2, Float8",
        TITAN_8B_H200_32,
        10938,
        "tokens",
        11058,
    ),
    Published(
        "torchtitan llama3.1 405B, 512 H100 at 500 W, FSDP 8 x TP 8 x PP 8 1F1B, full AC, Float8",
        titan_405b_512("1F1B"),
        100,
        "tokens",
        136.4,
        within=False,
    ),
    Published(
        "torchtitan llama3.1 405B, 512 H100 at 500 W, FSDP 8 x TP 8 x PP 8 interleaved, full AC, Float8",
        titan_405b_512("interleaved"),
        128,
        "tokens",
        146.8,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_estimates_against_published_runs(row):
    cfg = compose(list(row.overrides))
    est = estimate(cfg, current_layout(cfg))
    got = est.speed["tokens_per_s_per_device"] if row.kind == "tokens" else est.speed["mfu"]
    assert got == pytest.approx(row.documented, rel=0.005), (
        "docs/planning.md's table no longer says what advise estimates"
    )
    ratio = got / row.published
    assert (abs(ratio - 1) <= 0.15) == row.within, ratio


# torchtitan's 8B runs on the 500 W H100 that report their peak memory: (overrides, published GiB, what
# docs/planning.md says advise estimates). The compiled rows are estimated as the eager ones (the estimate
# counts the eager loss's backward, which the CPU tracker measures; inductor's is not measured).
PUBLISHED_MEMORY = {
    "8 GPUs": (PAPER_8B, 82.4, 75.7),
    "8 GPUs, compiled": ((*PAPER_8B, *COMPILED_2024), 77.0, 75.7),
    "128 GPUs": (PAPER_8B_128, 67.0, 61.7),
    "128 GPUs, compiled": ((*PAPER_8B_128, *COMPILED_2024), 62.0, 61.7),
    # table 2 (Float8): the logits' backward of 32k tokens a rank is 47 of the 77 GiB
    **{
        f"8B, FSDP {f} x CP {c}": (titan_long_context(f, c), pub, 76.8)
        for f, c, pub in ((8, 1, 83.9), (4, 2, 84.2), (2, 4, 84.0), (1, 8, 84.5))
    },
    "8 GPUs, compiled, Float8": ((*PAPER_8B, *COMPILED_2024), 76.8, 75.7),
    "128 GPUs, compiled, Float8": ((*PAPER_8B_128, *COMPILED_2024), 61.8, 61.7),
    # 2025's torch.compile takes the loss too: inductor's cross-entropy holds 4 bytes a bf16 logit, not 12
    # (64.5 GiB estimated before it was counted)
    "8B, 32 H200, FSDP, compiled loss, Float8": (TITAN_8B_H200_32, 47.96, 48.8),
}
# ... and runs it does not meet within 10% (docs/planning.md says what each leaves out)
PUBLISHED_MEMORY_MISSED = {
    "70B, FSDP 32 x TP 8": (TITAN_70B_256, 71.9, 61.7),
    "405B, FSDP 8 x TP 8 x PP 8, 1F1B": (titan_405b_512("1F1B"), 82.5, 51.7),
    "405B, FSDP 8 x TP 8 x PP 8, interleaved": (titan_405b_512("interleaved"), 72.7, 53.4),
    **{
        f"405B, TP 8 x PP 8 x FSDP {f} x CP {c}": (titan_405b_4d(f, c), pub, 67.2)
        for f, c, pub in ((8, 1, 75.3), (4, 2, 75.9), (2, 4, 77.1), (1, 8, 84.9))
    },
}


@pytest.mark.parametrize("name", list(PUBLISHED_MEMORY))
def test_the_8b_memory_estimates_against_the_published_peaks(name):
    """Each within 10% of torchtitan's peak reserved memory (docs/planning.md): the eager loss's backward
    holds 12 bytes a logit (the log-probabilities, their gradient and the logits'); counting its forward's
    10, as the estimate once did, read 0.87 and 0.86 of the eager runs. A compiled loss holds 2 elements a
    logit (tests/test_memory.py)."""
    overrides, published, documented = PUBLISHED_MEMORY[name]
    cfg = compose(list(overrides))
    total = estimate(cfg, current_layout(cfg)).memory["total"] / 2**30
    assert total == pytest.approx(documented, abs=0.1), "docs/planning.md's figure no longer says what advise estimates"
    assert abs(total / published - 1) <= 0.10, total / published


@pytest.mark.parametrize("name", list(PUBLISHED_MEMORY_MISSED))
def test_the_memory_estimates_docs_report_as_missed(name):
    overrides, published, documented = PUBLISHED_MEMORY_MISSED[name]
    cfg = compose(list(overrides))
    total = estimate(cfg, current_layout(cfg)).memory["total"] / 2**30
    assert total == pytest.approx(documented, abs=0.1), "docs/planning.md's figure no longer says what advise estimates"
    assert abs(total / published - 1) > 0.10, "now within 10%: move the row to PUBLISHED_MEMORY and the docs' table"


def test_keeping_every_matmul_output_overshoots_the_published_peak():
    """The 8 GPU run kept every other matmul's output (torchtitan's "op" policy); keeping them all (our
    per-op selective) would hold 94.7 GiB, 15% over what was measured."""
    cfg = compose([*PAPER_8B, "parallel.recompute_keep_matmuls=all"])
    assert estimate(cfg, current_layout(cfg)).memory["total"] / 2**30 == pytest.approx(94.7, abs=0.1)


def test_a_probed_matmul_table_sets_each_gemms_rate():
    """matmul_efficiency_by_size, as curry-bench --estimate writes it: a narrow GEMM at its probed share of
    the peak, interpolated in log2 between sizes and held at the ends; without a table, the scalar."""
    from omegaconf import OmegaConf  # noqa: PLC0415

    from curry_train.planning.step_time import gemm_seconds, matmul_efficiency  # noqa: PLC0415

    cfg = compose(["hardware=cpu"])
    hw = cfg.hardware
    assert matmul_efficiency(hw, 512) == hw.matmul_efficiency
    hw.matmul_efficiency_by_size = {64: 0.25, 256: 0.75, 1024: 1.0}
    assert matmul_efficiency(hw, 32) == 0.25 and matmul_efficiency(hw, 4096) == 1.0
    assert matmul_efficiency(hw, 128) == pytest.approx(0.5)
    layout = current_layout(cfg)
    wide, narrow = gemm_seconds(4096, 1024, 1024, hw, layout), gemm_seconds(4096, 1024, 64, hw, layout)
    # 16x fewer FLOPs at a quarter of the rate: 4x faster, less the fixed latency
    assert wide / narrow == pytest.approx(4, rel=0.05)
    assert OmegaConf.to_container(hw)["matmul_efficiency_by_size"] == {64: 0.25, 256: 0.75, 1024: 1.0}


def test_the_probe_writes_a_complete_hardware_config():
    """One rank's probe (no collectives): every rate positive, the table's best size at efficiency 1, and a
    config the schema takes whole."""
    from omegaconf import OmegaConf  # noqa: PLC0415

    from curry_train.config.schema import HardwareConfig  # noqa: PLC0415
    from curry_train.validation.estimate_bench import MATMUL_SIZES, hardware_config, probe_job  # noqa: PLC0415

    probed = probe_job(heads=2, head_dim=16, seq_len=32, batch=2)
    assert all(value > 0 for value in probed.values())
    base = OmegaConf.to_container(compose(["hardware=cpu"]).hardware)
    hw = hardware_config(probed, 1, base)
    table = hw["matmul_efficiency_by_size"]
    assert sorted(table) == list(MATMUL_SIZES) and max(table.values()) == 1.0
    assert 0 < hw["attention_efficiency"] <= 1 and 0 < hw["memory_efficiency"] <= 1
    merged = OmegaConf.merge(OmegaConf.structured(HardwareConfig), hw)  # every key known, every type right
    assert merged.peak_fp32_flops == max(probed[f"matmul_{n}"] for n in MATMUL_SIZES)


def test_a_collectives_fixed_part_and_bandwidth_are_fitted_over_sizes():
    """curry-bench --estimate times each collective at three sizes inside busy steps and fits a fixed part
    and a part per byte; a line's own points come back exactly, a negative fixed part reads as none."""
    from curry_train.validation.estimate_bench import fit_line  # noqa: PLC0415

    points = [(x, 1e-3 + x / 2e9) for x in (2.6e5, 1.0e6, 4.2e6)]
    fixed, per_byte = fit_line(points)
    assert fixed == pytest.approx(1e-3) and 1 / per_byte == pytest.approx(2e9)
    fixed, per_byte = fit_line([(1.0, 0.5), (2.0, 2.0), (3.0, 3.5)])  # the line crosses 0 below x = 1
    assert fixed == 0.0 and per_byte == pytest.approx(1.5)
    fixed, per_byte = fit_line([(1.0, 2.0), (2.0, 1.0)])  # falling: the slope is held at 1% of the largest
    assert per_byte == pytest.approx(0.01 * 1.0 / 2.0)


@pytest.mark.parametrize(
    "layout, part, count",
    [
        # one data-parallel rank: 4 micro-batches of 8; 4 blocks of 7 sharded linears, the embedding, the head
        (("parallel=tp", "trainer.devices=2"), "tp_dispatch", 4 * (7 * 4 + 2)),
        # dp 2: 2 micro-batches a rank, each through 4 block units and the root
        (("parallel=fsdp", "trainer.devices=2"), "fsdp_hooks", 2 * (4 + 1)),
        # cp 2: both ranks hold the same samples (4 micro-batches of 8), each block one ring attention
        (("parallel=cp", "trainer.devices=2"), "cp_dispatch", 4 * 4),
    ],
    ids=["tp", "fsdp", "cp"],
)
def test_host_work_per_sharded_linear_fsdp_unit_and_ring_is_counted(layout, part, count):
    """The probed host cost of a tensor-parallel linear, of an FSDP unit's hooks and of a ring attention,
    counted per micro-batch: on this CPU (hardware=cpu) they are on the step's path; on a GPU the host runs
    ahead (0)."""
    cfg = compose(["hardware=cpu", *layout])
    key = {"tp_dispatch": "tp_linear_overhead", "fsdp_hooks": "fsdp_unit_overhead", "cp_dispatch": "cp_ring_overhead"}[
        part
    ]
    times = estimate(cfg, current_layout(cfg)).time
    assert times[part] == pytest.approx(cfg.hardware[key] * count)
    plain = compose(["hardware=cpu", *layout, f"hardware.{key}=0"])
    without = estimate(plain, current_layout(plain)).time
    assert part not in without and times["total"] - without["total"] == pytest.approx(times[part])
    gpu = compose(["hardware=h100_80gb", *layout])
    assert part not in estimate(gpu, current_layout(gpu)).time


def test_recompute_variants_add_the_forward_gemms_they_run_again():
    """Step time by recompute: full runs each block's forward GEMMs again; every 2nd block whole, half of
    them; per-op selective none, or with every other matmul's output kept, wk, wo and w3's (19,456 of a
    Llama 3 8B block's 53,248 output columns)."""
    base = ["hardware=h100_80gb", "model=llama3_8b", "data.seq_len=8192", "parallel=fsdp", "trainer.devices=8"]

    def matmul(*overrides):
        cfg = compose([*base, *overrides])
        return estimate(cfg, current_layout(cfg)).time["compute/matmul"]

    none = matmul()
    forward = matmul("parallel.recompute=full") - none  # the blocks' forward GEMMs (the head's are not run again)
    head = (none - 3 * forward) / 3
    assert 0 < head < forward / 10  # forward, then backward's two GEMMs per forward one
    assert matmul(*LAYER_AC) - none == pytest.approx(forward / 2, rel=1e-9)  # 16 of 32 blocks
    assert matmul("parallel.recompute=selective") == pytest.approx(none, rel=1e-9)
    assert matmul(*OP_AC) - none == pytest.approx(forward * 19456 / 53248, rel=0.03)
