"""scripts/bench.py: both loops run, in one process, and compute the same steps.

No assertion on speed: the figures depend on the machine and whatever else runs on it.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from conftest import FAST, transient_peak
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from curry_train.cli import bench as bench_cli
from curry_train.config import compose
from curry_train.model.llama import Llama
from curry_train.options import PIPELINE_SCHEDULES as KINDS
from curry_train.planning import step_time
from curry_train.planning.advise import estimate
from curry_train.planning.layout import current_layout
from curry_train.planning.memory import activation_bytes
from curry_train.primitives.materialize import materialize_and_init
from curry_train.validation import layouts, throughput
from curry_train.validation.checkpoint_bench import checkpoint_bench
from curry_train.validation.comm import CommCounter
from curry_train.validation.loop_bench import PARTS, loop_bench

# The debug model, narrower and shallower, on short sequences: seconds per run even on a busy machine.
SMALL = [
    "model.dim=64",
    "model.n_layers=2",
    "model.ffn_dim=192",
    "data.global_batch_size=8",
    "data.micro_batch_size=4",
    "data.seq_len=64",
]


def load_bench():
    return bench_cli


@pytest.mark.timeout(300)
def test_bench_runs_both_loops_on_the_same_steps():
    steps, warmup, repeats = 2, 1, 2  # two repeats: curry-train's Trainer runs twice in this process
    result = throughput.bench(SMALL, steps=steps, warmup=warmup, repeats=repeats, loggers="csv")

    assert result.tokens_per_step == 8 * 64
    assert [(run.repeat, run.loop) for run in result.runs] == [
        (r, loop) for r in range(repeats) for loop in ("hand", "curry")
    ]
    for run in result.runs:
        assert len(run.step_ends) == len(run.losses) == warmup + steps
        assert run.timed_steps == steps
        assert all(b > a for a, b in zip(run.step_ends, run.step_ends[1:], strict=False))
        assert math.isfinite(run.tokens_per_s) and run.tokens_per_s > 0
        assert math.isfinite(run.ms_per_step) and run.ms_per_step > 0
    hand, curry = result.tokens_per_s("hand"), result.tokens_per_s("curry")
    assert math.isfinite(hand) and hand > 0 and math.isfinite(curry) and curry > 0
    assert result.ratio == pytest.approx(curry / hand, rel=1e-12)

    # Apples to apples: the hand loop reproduces curry-train's loss at every step, in every repeat.
    reference = result.losses("curry", 0)
    assert all(math.isfinite(x) for x in reference) and reference[-1] < reference[0]
    for run in result.runs:
        for step, (loss, ref) in enumerate(zip(run.losses, reference, strict=True)):
            assert abs(loss - ref) <= 1e-5 * abs(ref), f"{run.loop} repeat {run.repeat} step {step}: {loss} vs {ref}"
    assert result.max_loss_rel_diff <= 1e-5

    figures = json.loads(json.dumps(result.to_dict()))
    assert figures["ratio"] == pytest.approx(figures["curry_tokens_per_s"] / figures["hand_tokens_per_s"])
    assert len(figures["runs"]) == 2 * repeats
    table = result.table()
    assert "ratio curry/hand" in table and "hand" in table and "curry" in table
    assert not dist.is_initialized()  # the strategy's one-process group was torn down


def test_bench_rejects_bad_arguments(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--warmup", "0"])
    assert exit_info.value.code == 2
    assert bench.main(["trainer.devices=2"]) == 2
    assert "one device" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# --layouts: dp, tp, tp with sequence parallelism and fsdp+tp on the same run


def tensor_parallel_oracle(overrides, tp: int) -> tuple[int, int, int, bool]:
    """From the parameters' shapes: P, the parameters one of ``tp`` ranks holds (everything split
    but the norms), the number of parameter tensors, and whether every split shape's first dimension
    divides by 2 again (FSDP over 2 ranks adds no padding)."""

    with torch.device("meta"):
        named = list(Llama(compose(list(overrides)).model).named_parameters())
    P = sum(p.numel() for _, p in named)
    split, even = 0, True
    for name, p in named:
        if name.endswith("norm.weight"):
            split += p.numel()
            even &= p.shape[0] % 2 == 0
            continue
        assert p.numel() % tp == 0, name
        split += p.numel() // tp
        local_rows = p.shape[0] // tp if not name.endswith(("wo.weight", "w2.weight")) else p.shape[0]
        even &= local_rows % 2 == 0
    return P, split, len(named), even


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_bench_layouts_side_by_side(tmp_path, capsys):
    bench = load_bench()
    path = tmp_path / "layouts.json"
    assert bench.main(["--layouts", "--steps", "1", "--json", str(path), *FAST]) == 0
    table = capsys.readouterr().out
    for header in ("layout", "tokens/s", "params", "grads", "optimizer", "activations", "vs no SP"):
        assert header in table
    figures = json.loads(path.read_text())
    rows = {row["name"]: row for row in figures["rows"]}
    assert list(rows) == ["dp", "tp", "tp+sp", "fsdp+tp"]
    assert {name: (row["ranks"], row["dp"], row["tp"]) for name, row in rows.items()} == {
        "dp": (2, 2, 1),
        "tp": (2, 1, 2),
        "tp+sp": (2, 1, 2),
        "fsdp+tp": (4, 2, 2),
    }
    for row in rows.values():
        assert row["tokens_per_step"] == 16 * 64 and row["timed_steps"] == 1
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert row["activations"] > 0

    # Model state per rank, from the shapes: fp32 parameters and gradients, AdamW's two moments and
    # a 4-byte step counter per parameter tensor.
    P, P_tp, tensors, even = tensor_parallel_oracle(FAST, 2)
    assert P_tp < P and even

    def state(n: int) -> dict[str, int]:
        expected = {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n + 4 * tensors}
        return {**expected, "total": sum(expected.values())}

    expected = {"dp": state(P), "tp": state(P_tp), "tp+sp": state(P_tp), "fsdp+tp": state(P_tp // 2)}
    for name, row in rows.items():
        for record in row["memory"]["ranks"]:
            assert record["state"] == expected[name], (name, record["rank"])
    assert rows["tp"]["params"] < rows["dp"]["params"]
    # fsdp+tp: tp's state halved (no padding in these shapes), but for the step counters on every rank.
    assert rows["fsdp+tp"]["total"] - 4 * tensors == (rows["tp"]["total"] - 4 * tensors) // 2
    for name in ("tp", "tp+sp", "fsdp+tp"):
        assert rows[name]["memory"]["tp_parameters"] == P_tp

    # Sequence parallelism: the activations between blocks are sequence shards.
    tp_acts = {r["activations"] for r in rows["tp"]["memory"]["ranks"]}
    assert all(r["activations"] < min(tp_acts) for r in rows["tp+sp"]["memory"]["ranks"])
    assert rows["tp+sp"]["sp_activation_ratio"] == pytest.approx(
        rows["tp+sp"]["activations"] / rows["tp"]["activations"]
    )
    assert 0 < rows["tp+sp"]["sp_activation_ratio"] < 1
    assert all(rows[name]["sp_activation_ratio"] is None for name in ("dp", "tp", "fsdp+tp"))
    assert not dist.is_initialized()

    # advise's activation and loss estimate against the memory tracker's peak of activations and backward's
    # temporaries (test_memory.transient_peak: DDP's buckets are the model state's gradients): dp and tensor
    # parallelism within 3%, FSDP within 7% (its reduce-scatter buffer, in the estimate's model state, is a
    # temporary to the tracker).
    for name, rtol in (("dp", 0.03), ("tp", 0.03), ("tp+sp", 0.03), ("fsdp+tp", 0.07)):
        cfg = compose([*FAST, *figures["config"]["layouts"][name]])
        estimate = activation_bytes(cfg, current_layout(cfg), flash_attention=True)
        for record in rows[name]["memory"]["ranks"]:
            measured = transient_peak(record, ddp=name == "dp")
            assert estimate["activations"] + estimate["loss"] == pytest.approx(measured, rel=rtol), name


def test_bench_layouts_reject_bad_input(capsys):
    bench = load_bench()
    assert layouts.parse_layout("tp4: parallel=tp parallel.tp.size=4 trainer.devices=4") == (
        "tp4",
        ("parallel=tp", "parallel.tp.size=4", "trainer.devices=4"),
    )
    assert layouts.parse_layout("parallel=dp trainer.devices=2") == (
        "parallel=dp trainer.devices=2",
        ("parallel=dp", "trainer.devices=2"),
    )
    assert bench.main(["--layouts", "parallel=tp"]) == 2
    assert "each layout sets parallel, trainer.devices" in capsys.readouterr().err
    assert bench.main(["--layouts", "--layout", "empty:"]) == 2
    assert "expected 'NAME: overrides...'" in capsys.readouterr().err
    assert bench.main(["--layouts", "--layout", "a: parallel=tp trainer.devices=3"]) == 2  # 3 ranks, tp=2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--memory", "--layouts"])


# ----------------------------------------------------------------------------------------------
# --pipeline: every schedule kind's bubble, measured, next to its formula


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_pipeline_bubbles_next_to_formulas(tmp_path, capsys):

    bench = load_bench()
    path = tmp_path / "bubbles.json"
    # 4 blocks: P=2 ranks of one stage (2 blocks each) or of two (1 block each): equal stages.
    assert (
        bench.main(
            ["--pipeline", "--microbatches", "4", "--steps", "1", "--json", str(path), *FAST, "model.n_layers=4"]
        )
        == 0
    )
    table = capsys.readouterr().out
    rows = json.loads(path.read_text())["rows"]
    assert [row["kind"] for row in rows] == list(KINDS)
    P, M = 2, 4
    for row in rows:
        assert (row["pp"], row["microbatches"]) == (P, M)
        v = row["virtual_stages"]
        assert row["layers_per_stage"] == [4 // (P * v)] * (P * v)
        if row["kind"] in ("gpipe", "1F1B"):
            assert v == 1 and row["formula"] == pytest.approx((P - 1) / (M + P - 1))
        elif row["kind"] == "interleaved":
            assert v == 2 and row["formula"] == pytest.approx((P - 1) / (v * M + P - 1))
        else:
            assert row["formula"] is None and row["formula_text"] == "~0"
        assert len(row["measured"]) == P and all(0 <= m < 1 for m in row["measured"])
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0 and row["step_ms"] > 0
    lines = {line.split()[0]: line for line in table.splitlines() if line.split() and line.split()[0] in KINDS}
    assert set(lines) == set(KINDS)
    assert "20.0%" in lines["gpipe"] and "20.0%" in lines["1F1B"] and "11.1%" in lines["interleaved"]
    assert all(" ~0 " in lines[kind] for kind in ("interleaved_zb", "zbv", "dualpipev"))


def test_bench_pipeline_rejects_bad_input(capsys):
    bench = load_bench()
    assert bench.main(["--pipeline", "--pp", "1"]) == 2
    assert "at least 2 ranks" in capsys.readouterr().err
    assert bench.main(["--pipeline", "--microbatches", "2"]) == 2  # V-shaped: 4 stages need 4 micro-batches
    assert "at least as many micro-batches as stages" in capsys.readouterr().err
    assert bench.main(["--pipeline", "model.n_layers=2"]) == 2
    assert "raise model.n_layers" in capsys.readouterr().err
    for bad in (["--kinds", "gpipe,pipedream"], ["--microbatches", "4,x"], ["--microbatches", "0"]):
        with pytest.raises(SystemExit):
            bench.main(["--pipeline", *bad])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_context_mode_memory_falls_with_cp(tmp_path, capsys):
    """Per-rank activation memory of context-parallel attention (measured by PyTorch's memory
    tracker, not by time) falls about linearly with cp: at cp=4 at most about a third of cp=1."""
    bench = load_bench()
    path = tmp_path / "context.json"
    assert bench.main(["--context", "--seq-len", "2048", "--cp", "1,2,4", "--steps", "1", "--json", str(path)]) == 0
    assert "exposed comm" in capsys.readouterr().out
    rows = {row["cp"]: row for row in json.loads(path.read_text())["rows"]}
    assert sorted(rows) == [1, 2, 4] and len(rows[4]["activations"]) == 4
    assert rows[2]["max_activations"] < 0.6 * rows[1]["max_activations"]
    assert rows[4]["max_activations"] <= 0.34 * rows[1]["max_activations"]
    assert all(0.0 <= share < 1.0 for row in rows.values() for share in row["exposed_comm"])
    assert bench.main(["--context", "--seq-len", "1020", "--cp", "4"]) == 2  # 1020 tokens do not split into 8 chunks


# ----------------------------------------------------------------------------------------------
# --compare: layouts side by side with MFU, peak memory, communication volume and bubble


def test_compare_flops_per_token_hand_count():
    """6N + 12*L*h*s against a hand count of the debug model, and against PyTorch's FLOP counter."""

    # Debug model: dim 128, 4 heads of 32, 2 key/value heads (kv dim 64), ffn 384, vocabulary 256, 4 blocks.
    per_block = 128 * 128 + 128 * 64 + 128 * 64 + 128 * 128 + 3 * 128 * 384  # wq, wk, wv, wo, w1, w3, w2
    assert per_block == 196_608
    matmuls = 4 * per_block + 256 * 128  # and the head
    norms = (2 * 4 + 1) * 128
    embedding = 256 * 128
    assert matmuls + norms + embedding == 853_120  # P of the debug model (README)
    s = 256
    attention = 4 * (2 * s * 128 + 2 * s * 128)  # per token and layer, forward: QK^T and the weighted sum of V
    assert step_time.flops_per_token(matmuls, 4, 128, s) == 3 * (2 * matmuls + attention) == 6_488_064
    # What the bench uses for N: every parameter but the input embedding (the norms are in, 0.1% here).
    cfg = compose([]).model
    assert step_time.flops_parameters(cfg) == matmuls + norms == 820_352
    assert (
        step_time.flops_parameters(compose(["model.tie_embeddings=true"]).model) == matmuls + norms
    )  # the head is the table

    # PyTorch's FLOP counter over a real forward+backward (math attention: matmuls it can count).
    with torch.device("meta"):
        model = Llama(cfg)
    materialize_and_init(model, torch.device("cpu"), 0)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (1, s))).sum().backward()
    assert counter.get_total_flops() == s * step_time.flops_per_token(matmuls, 4, 128, s)


def _count_collectives() -> dict:
    """Each kind of collective once, through torch.distributed and the functional collectives."""

    rank, group = dist.get_rank(), dist.group.WORLD
    mesh = init_device_mesh("cpu", (2,))
    x = torch.ones(3, 5)  # 15 fp32 elements, 60 bytes
    sharded = distribute_tensor(torch.ones(4, 5, dtype=torch.float64), mesh, [Shard(0)])  # 10 elements per rank
    with CommCounter() as comm:
        dist.all_reduce(x.clone())  # c10d: input, 15
        dist.all_gather_into_tensor(torch.empty(6, 5), x)  # c10d: output, 30
        dist.reduce_scatter_tensor(torch.empty(3, 5), torch.ones(6, 5))  # c10d: input, 30
        dist.broadcast(x.clone(), src=0)  # 15
        funcol.all_reduce(x, "sum", group).wait()  # functional: input, 15
        funcol.all_gather_tensor(x, 0, group).wait()  # functional: output, 30
        sharded.redistribute(mesh, [Replicate()]).to_local()  # DTensor: all-gather of 2 x 10 fp64
        dist.all_to_all_single(torch.empty(6, 5), torch.ones(6, 5))  # input, 30
        if rank == 0:
            dist.send(x, dst=1)  # 15
        else:
            dist.recv(torch.empty(3, 5), src=0)
    return comm.to_dict()


@pytest.mark.slow
def test_compare_comm_counter_books_each_collective(pools):
    """All-gather by its output, all-reduce, reduce-scatter and all-to-all by their input; c10d,
    functional and DTensor-issued collectives alike, each once."""

    _, counts = pools.run(2, _count_collectives)  # rank 1's
    assert counts == {
        "all_reduce": {"ops": 2, "elements": 30, "bytes": 120},
        "all_gather": {"ops": 3, "elements": 80, "bytes": 30 * 4 + 30 * 4 + 20 * 8},
        "reduce_scatter": {"ops": 1, "elements": 30, "bytes": 120},
        "all_to_all": {"ops": 1, "elements": 30, "bytes": 120},
        "broadcast": {"ops": 1, "elements": 15, "bytes": 60},
        "recv": {"ops": 1, "elements": 15, "bytes": 60},  # rank 1's side of the send
    }


def fsdp_units_oracle(overrides) -> tuple[int, int, int, int]:
    """From the parameters' shapes: P, the parameters of the transformer blocks (one FSDP unit each),
    those of the root unit (embedding, final norm, head), and the number of parameter tensors."""

    with torch.device("meta"):
        model = Llama(compose(list(overrides)).model)
    named = list(model.named_parameters())
    blocks = sum(p.numel() for name, p in named if name.startswith(f"{model.plan.blocks}."))
    P = sum(p.numel() for _, p in named)
    return P, blocks, P - blocks, len(named)


COMPARE = [*FAST, "model.dim=64", "model.n_layers=2", "model.ffn_dim=192"]  # 16 x 64 tokens, micro-batches of 4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compare_dp_and_fsdp(tmp_path, capsys):
    """dp and fsdp on 2 ranks: DDP all-reduces 4P bytes a step; FSDP (ZeRO-3) all-gathers every unit
    in each micro-batch's forward and again, but the root unit, in its backward, and reduce-scatters
    4P once a step (gradients synchronized in the last micro-batch only)."""
    bench = load_bench()
    path = tmp_path / "compare.json"
    assert (
        bench.main(
            [
                "--compare",
                "--steps",
                "2",
                "--json",
                str(path),
                *COMPARE,
                "--layout",
                "dp: parallel=dp trainer.devices=2",
                "--layout",
                "fsdp: parallel=fsdp trainer.devices=2",
                "--layout",
                "cp: parallel=cp trainer.devices=2",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    for header in (
        "tokens/s",
        "ms/step",
        "MFU",
        "peak MB",
        "est MB",
        "state MB",
        "acts MB",
        "all_reduce",
        "all_gather",
        "reduce_sc.",
        "all_to_all",
        "send+recv",
        "broadcast",
        "bubble",
        "DDP's bucketed all-reduce",
    ):
        assert header in table, header
    figures = json.loads(path.read_text())
    config, rows = figures["config"], {row["name"]: row for row in figures["rows"]}
    assert list(rows) == ["dp", "fsdp", "cp"]

    P, P_blocks, P_root, tensors = fsdp_units_oracle(COMPARE)
    assert config["parameters"] == P
    seq_len, dim, n_layers, vocab = 64, 64, 2, 256
    tokens = 16 * seq_len
    assert config["tokens_per_step"] == tokens
    n_flops = P - vocab * dim  # less the input embedding
    assert config["flops_per_token"] == 6 * n_flops + 12 * n_layers * dim * seq_len
    assert config["peak_flops"] is None and config["device"] == "cpu"
    M = 16 // 2 // 4  # micro-batches per rank and step

    for name, row in rows.items():
        for key in (
            "tokens_per_s",
            "ms_per_step",
            "mfu",
            "peak_memory",
            "model_state",
            "activations",
            "comm",
            "ddp_bucket_bytes",
            "bubble",
            "bubble_text",
            "flops_per_step",
            "pp",
            "cp",
            "estimated_peak",
        ):
            assert key in row, (name, key)
    for name, row in ((name, rows[name]) for name in ("dp", "fsdp")):
        assert (row["ranks"], row["dp"], row["tp"], row["pp"], row["cp"], row["timed_steps"]) == (2, 2, 1, 1, 1, 2)
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert row["ms_per_step"] == pytest.approx(1e3 * tokens / row["tokens_per_s"])
        assert row["mfu"] is None  # not a GPU
        assert row["flops_per_step"] == tokens * config["flops_per_token"]
        assert row["bubble"] is None and row["bubble_text"] == "-"
        assert row["model_state"] == row["total"]
        # The tracked total at its peak held at least the parameters, AdamW's state and the activations' peak.
        assert row["peak_memory"] >= row["params"] + row["optimizer"] + row["activations"]
        # advise's estimate bounds that peak from above, within 20%: it budgets every gradient at once, ZeRO-3's
        # prefetched unit, the loss's and a block's backward at their peaks (measured here: dp 8%, fsdp 17% above).
        # The tracker measures one micro-batch from no gradients; of 2 micro-batches a step FSDP's second also
        # holds the first's gradients unsharded (fp32), which the estimate adds: 4P in place of the shard 4P/2.
        cfg = compose([*COMPARE, *figures["config"]["layouts"][name]])
        reducing_each = replace(current_layout(cfg), sync_each_microbatch=True)
        one_micro_batch = estimate(cfg, reducing_each).memory["total"] - cfg.hardware.reserved_bytes
        held = row["estimated_peak"] - one_micro_batch
        assert held == (pytest.approx(2 * P, rel=0.02) if name == "fsdp" else 0), name
        assert row["peak_memory"] <= one_micro_batch <= 1.2 * row["peak_memory"], name
        assert row["cuda_peak"] is None  # not a GPU
        comm = row["comm"]
        assert all(comm[c]["bytes"] == 0 for c in ("all_to_all", "broadcast", "send", "recv")), name
        for record in row["memory"]["ranks"]:  # every rank moves the same
            assert {c: v["bytes"] for c, v in record["comm"].items()} == {
                c: v["bytes"] for c, v in comm.items() if v["ops"]
            }

    # DDP: one all-reduce of every fp32 gradient (one bucket: 4P bytes is under bucket_cap_mb), as its
    # reducer's buckets say; besides it only the logged step's metrics: one all-reduce of the loss and token
    # sums (two fp64).
    dp = rows["dp"]["comm"]
    assert dp["all_reduce"] == {"ops": 2, "elements": P + 2, "bytes": 4 * P + 16}
    assert rows["dp"]["ddp_bucket_bytes"] == 4 * P
    assert dp["reduce_scatter"]["bytes"] == 0 and dp["all_gather"]["bytes"] <= 64
    assert f"DDP's bucketed all-reduce: {4 * P:,} bytes" in table

    # FSDP full (ZeRO-3), one unit per block and the root: per micro-batch, every unit gathered for
    # forward and the blocks again for backward (FSDP2 keeps the root unit gathered between them);
    # one reduce-scatter per unit of the whole fp32 gradients (no padding: every dim0 is even).
    fsdp = rows["fsdp"]["comm"]
    gathered = 4 * M * (2 * P_blocks + P_root)
    assert 0 <= fsdp["all_gather"]["bytes"] - gathered <= 64  # + the metrics' scalars
    assert fsdp["all_gather"]["ops"] >= M * (2 * n_layers + 1)
    assert fsdp["reduce_scatter"] == {"ops": n_layers + 1, "elements": P, "bytes": 4 * P}
    # only the gradient norm (one fp32 per parameter tensor) and the logged step's two fp64 metric sums
    assert fsdp["all_reduce"]["bytes"] <= 4 * tensors + 16
    assert rows["fsdp"]["ddp_bucket_bytes"] is None
    # Model state: ZeRO-3 halves DDP's (no padding here), but for AdamW's step counters on each rank.
    assert rows["fsdp"]["total"] - 4 * tensors == (rows["dp"]["total"] - 4 * tensors) // 2
    lines = {line.split()[0]: line.split() for line in table.splitlines() if line.split()[:1] in (["dp"], ["fsdp"])}
    assert lines["dp"][11] == "-" and lines["fsdp"][11] == "-"  # MFU on CPU (after "2 x 1 x 1 x 1", tokens/s, ms/step)

    # Ring attention, cp = 2 (one data-parallel rank: each of the 16 samples' 4 micro-batches on both
    # ranks). Per block and micro-batch a rank sends its key/value block (K and V stacked: 2 x b x
    # kv_heads x s/cp x head_dim fp32) cp - 1 times forward and again backward, and the blocks'
    # gradients (the same size, fp32) travel cp moves home; it receives as much. DDP all-reduces the
    # gradients over the cp ranks, as over data-parallel ones.
    cp = rows["cp"]
    assert (cp["ranks"], cp["dp"], cp["cp"]) == (2, 1, 2)
    kv_block = 2 * 4 * 2 * (seq_len // 2) * (dim // 4) * 4
    per_block = ((2 - 1) + (2 - 1) + 2) * kv_block
    micro_batches = 16 // 4
    assert cp["comm"]["send"]["bytes"] == cp["comm"]["recv"]["bytes"] == n_layers * micro_batches * per_block
    assert cp["comm"]["all_reduce"]["bytes"] - 4 * P <= 4 * tensors + 16  # + the gradient norm's, the metrics
    assert 0.5 * rows["dp"]["activations"] < cp["activations"] < 0.6 * rows["dp"]["activations"]
    assert cp["peak_memory"] <= cp["estimated_peak"] <= 1.15 * cp["peak_memory"]
    assert not dist.is_initialized()


def test_compare_rejects_bad_input(capsys):
    bench = load_bench()
    assert bench.main(["--compare", "parallel=fsdp"]) == 2
    assert "each layout sets parallel, trainer.devices" in capsys.readouterr().err
    assert (
        bench.main(
            [
                "--compare",
                "--layout",
                "a: parallel=dp trainer.devices=2",
                "--layout",
                "a: parallel=fsdp trainer.devices=2",
            ]
        )
        == 2
    )
    assert "a layout named 'a' is already given" in capsys.readouterr().err
    assert (
        bench.main(
            [
                "--compare",
                "--layout",
                "a: parallel=dp trainer.devices=2",
                "--layout",
                "b: parallel=fsdp trainer.devices=2 model.dim=64",
            ]
        )
        == 2
    )
    assert "differ in model or batch" in capsys.readouterr().err
    for bad in (
        ["--compare", "--layouts"],
        ["--compare", "--memory"],
        ["--compare", "--steps", "0"],
        ["--context", "--layout", "a: parallel=dp trainer.devices=2"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(bad)
        assert exit_info.value.code == 2


def test_the_checkpoint_bench_times_both_kinds_of_save(tmp_path):
    """``--checkpoint`` on the tiny run in one process: a row per mode with the save's figures, the same
    checkpoint bytes whichever wrote them, and the ratio it prints (its values are the bench's to show)."""
    result = checkpoint_bench(FAST, models=("debug",), steps=8, every=3, layouts={"1 process": ()})
    off, thread = result.rows
    assert (off.mode, thread.mode) == ("off", "thread") and off.bytes > 100_000
    assert abs(off.bytes - thread.bytes) < 100  # the same state; the saved config differs in async_mode only
    assert off.blocked_ms == off.written_ms and thread.written_ms > 0 and thread.blocked_ms > 0
    assert all(math.isfinite(value) for value in (off.step_ms, thread.step_ms, thread.overlapped_ms))
    assert result.ratio("debug", "1 process") == thread.blocked_ms / off.blocked_ms
    assert "a background save holds training" in result.table()


def test_the_loop_bench_splits_each_loop_and_the_three_agree():
    """curry-bench --loop: hand, Lightning's bare loop and curry-train on the tiny model do the same steps
    (the same losses, bit for bit), and each part of a step is measured where it happens."""
    lines: list[str] = []
    result = loop_bench(["trainer.log_every_n_steps=2"], steps=6, warmup=2, repeats=1, log=lines.append)
    assert result.loops == ["hand", "lightning", "curry"] and len(lines) == 3
    assert result.max_loss_rel_diff == 0.0, result.table()  # fused AdamW in all three, the same arithmetic
    for loop in result.loops:
        parts = result.parts(loop)
        assert set(parts) == set(PARTS)
        assert parts["forward+backward"] > 0 and parts["optimizer"] > 0 and parts["data"] > 0
        assert sum(parts.values()) == pytest.approx(result.ms_per_step(loop), rel=1e-9)
    curry, hand = result.parts("curry"), result.parts("hand")
    assert curry["logging"] > 0 and hand["logging"] == 0 and hand["checkpoint"] == 0
    assert result.ratio == pytest.approx(result.ms_per_step("curry") / result.ms_per_step("hand"))
    figures = json.loads(json.dumps(result.to_dict()))
    assert set(figures["parts_ms_per_step"]) == {"hand", "lightning", "curry"}
    assert "hooks+loop" in result.table() and "Lightning's own loop" in result.table()


def test_every_layout_goes_with_compile_only(capsys):
    with pytest.raises(SystemExit):
        bench_cli.main(["--loop", "--every-layout"])
    assert "--every-layout goes with --compile" in capsys.readouterr().err
