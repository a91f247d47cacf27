"""scripts/advise.py: the decision guide's answers on known cases, from arithmetic alone (fast)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from curry_train.advise import Layout, diagnose, estimate
from curry_train.config import compose

ROOT = Path(__file__).resolve().parents[1]
ONE_B = ["model.dim=2048", "model.n_layers=16", "model.n_heads=32", "model.n_kv_heads=8", "model.ffn_dim=8192",
         "model.vocab_size=128256", "model.name=llama_1b"]


def load_advise():
    spec = importlib.util.spec_from_file_location("advise_script", ROOT / "scripts" / "advise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_8b_at_256k_needs_context_parallelism(capsys):
    code, result = run_json(capsys, ["model=llama3_8b", "data.seq_len=262144"])
    assert code == 0
    assert_own_estimate_fits(result)
    assert "cp" in result["parallel"].split("+") and result["sizes"]["cp"] > 1
    assert result["sizes"]["tp"] == result["sizes"]["pp"] == 1
    assert f"parallel.cp.size={result['sizes']['cp']}" in result["command"]


def test_70b_full_finetune_on_8x80gb_does_not_fit_and_says_what_would(capsys):
    code, result = run_json(capsys, ["model=llama3_70b", "hardware=a100_80gb", "data.seq_len=4096"])
    assert code == 1 and result["fits"] is False and result["command"] is None
    text = " ".join(result["reasons"])
    assert "nothing fits" in text and "offload" in text and "more devices" in text


def test_1b_on_one_gpu_needs_no_parallelism(capsys):
    code, result = run_json(capsys, [*ONE_B, "hardware.gpus_per_node=1", "data.seq_len=2048", "data.micro_batch_size=4"])
    assert code == 0
    assert_own_estimate_fits(result)
    assert result["parallel"] == "dp" and set(result["sizes"].values()) == {1}
    assert "trainer.devices=1" in result["command"]


def test_text_output_explains_and_prints_the_command(capsys):
    assert load_advise().main(["model=llama3_8b", "data.seq_len=8192"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-1" in out and "tp, pp, cp not needed" in out and "python train.py model=llama3_8b" in out


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
    none, full = estimate(cfg, base), estimate(cfg, Layout(dp_shard=8, zero="full", mixed_precision="bf16", recompute="full"))
    assert full.memory["activations"] < none.memory["activations"] / 5
    assert full.time["compute"] > none.time["compute"]
    cp2 = estimate(cfg, Layout(dp_shard=4, cp=2, zero="full", mixed_precision="bf16"))
    assert cp2.memory["activations"] == pytest.approx(none.memory["activations"] / 2, rel=0.01)
    tp2 = estimate(cfg, Layout(dp_shard=4, tp=2, zero="full", mixed_precision="bf16", sequence_parallel=True))
    assert tp2.memory["activations"] == pytest.approx(none.memory["activations"] / 2, rel=0.01)
    assert tp2.memory["params"] == pytest.approx(none.memory["params"], rel=0.01)  # 16P/(tp x dp) either way
