"""Hugging Face in and out: tiny random models written by transformers itself (nothing downloaded) load with
``model.init_from`` and give transformers' logits; a fine-tuned run exports a directory transformers loads
with the same logits; every layout starts from the same loss; a bad directory is one line before any worker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MATRIX, REPO, clean_env, read_metric, run_seed_example, train
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from curry_train.checkpoint import dcp, files
from curry_train.checkpoint.hf_config import PretrainedError, model_config
from curry_train.checkpoint.hf_export import export
from curry_train.checkpoint.hf_load import check_weights, load_pretrained, rope_rows, rope_rows_back
from curry_train.cli import tokenize_data as tokenize_cli
from curry_train.config import compose
from curry_train.config.checks import apply_init_from
from curry_train.data.sources import HFTokenizer, make_tokenizer, tokenize_documents
from curry_train.model.config import ModelConfig, RopeScalingConfig
from curry_train.model.llama import Llama, rope_frequencies

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 320
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # head_dim 16: k_proj has 32 rows, so 4 FSDP shards cut its heads in half
    max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
KINDS = {  # name: (config class, model class, its own keys)
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama3.2-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    ),
}
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def write_tokenizer(directory: Path) -> None:
    """A byte-level BPE of the test's words with Llama 3's special tokens: BOS added by its post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))


def write_model(directory: Path, kind: str, seed: int = 0) -> Path:
    """A tiny random ``kind`` saved by transformers, every weight (norms too) drawn N(0, 0.1)."""
    config_class, model_class, extra = KINDS[kind]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**SHAPE, **extra))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    model.save_pretrained(str(directory))
    write_tokenizer(directory)
    return directory


def our_model(directory: Path) -> Llama:
    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with(model_config(directory))
    with torch.device("meta"):
        model = Llama(cfg)
    load_pretrained(model, torch.device("cpu"), directory)
    return model.eval()


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: write_model(root / kind, kind) for kind in KINDS}


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_equal_transformers(models, kind):
    """fp32, the same weights and tokens: max |difference| 1e-5 on logits of size ~0.5 (float32 rounding of
    sums taken in another order; a wrong RoPE order, scaling or routing is off by ~1e-1)."""
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = our_model(models[kind])(tokens)
    theirs = hf_logits(models[kind], tokens)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_llama3_rope_frequencies_equal_transformers(models):
    """The llama3 scaling slows the low frequencies by 8 and blends the band between, as transformers does."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: PLC0415

    config = transformers.AutoConfig.from_pretrained(str(models["llama3"]))
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    scaling = RopeScalingConfig(original_max_seq_len=32)
    ours = rope_frequencies(16, 500000.0, scaling)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, rope_frequencies(16, 500000.0))  # the scaling changes some


def test_rope_row_order_round_trips():
    rows = torch.arange(2 * 16 * 3.0).reshape(32, 3)
    interleaved = rope_rows(rows, 2)
    assert interleaved[1, 0] == rows[8, 0] and interleaved[2, 0] == rows[1, 0]  # pair (0, 8) of head 0
    assert torch.equal(rope_rows_back(interleaved, 2), rows)


def test_config_json_sets_the_model(models):
    cfg = compose(["model.init_from=" + str(models["qwen3-moe"]), "data=files", "data.paths=[x.jsonl]"])
    apply_init_from(cfg)
    m = cfg.model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.vocab_size) == (64, 2, 4, 2, 32, VOCAB)
    assert m.qk_norm and m.moe.experts == 4 and m.moe.top_k == 2 and m.moe.normalize and m.moe.shared_experts == 0
    assert m.moe.balancing == "aux_loss" and cfg.data.tokenizer == str(models["qwen3-moe"].resolve())
    cfg = compose(["model.init_from=" + str(models["llama3"])])
    apply_init_from(cfg)
    assert cfg.model.rope_scaling.factor == 8.0 and cfg.model.rope_scaling.original_max_seq_len == 32
    assert cfg.model.rope_theta == 500000.0 and cfg.model.moe is None and not cfg.model.tie_embeddings


def test_directory_tokenizer_adds_bos_and_eos(models, tmp_path):
    """data=files with the directory's tokenizer: each document is BOS + its tokens + EOS, and
    tokenize_data.py writes exactly those tokens from the directory."""
    tokenizer = make_tokenizer(str(models["llama3"]))
    assert isinstance(tokenizer, HFTokenizer)
    bos, eos = tokenizer._tokenizer.token_to_id(BOS), tokenizer._tokenizer.token_to_id(EOS)
    stream = tokenize_documents(["alpha beta", "gamma"], tokenizer)
    assert stream[0] == bos and stream[-1] == eos and list(stream).count(bos) == 2 and list(stream).count(eos) == 2
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["alpha beta", "gamma"]))
    out = tmp_path / "tokens.bin"
    assert tokenize_cli.main([str(corpus), "--output", str(out), "--quiet", "--tokenizer", str(models["llama3"])]) == 0
    assert np.fromfile(out, dtype=np.uint16).tolist() == stream.tolist()


def test_export_writes_what_transformers_loads(models, tmp_path):
    """Our weights -> export (sharded, with an index) -> transformers: the same logits; read back with
    ``init_from``: the same tensors. For a MoE (Qwen3-MoE) and a tied dense model."""
    tokens = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(2))
    for kind in ("qwen3-moe", "llama3.2-tied"):
        model = our_model(models[kind])
        with torch.no_grad():  # not the loaded weights any more: what export writes is ours
            for param in model.parameters():
                param.add_(0.01 * torch.randn_like(param))
        out = tmp_path / kind
        files = export(dict(model.state_dict()), model.cfg, out, shard_bytes=40_000)
        assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
        with torch.no_grad():
            expected = model(tokens)
        torch.testing.assert_close(hf_logits(out, tokens), expected, rtol=0, atol=1e-5)
        back = our_model(out)
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(back.state_dict()[name], tensor, rtol=0, atol=0)


def _copy(source: Path, directory: Path, **edit) -> Path:
    """A copy of the model directory ``source`` with ``config.json``'s keys ``edit``ed (None: removed)."""
    directory.mkdir()
    for file in source.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config.update(edit)
    config = {key: value for key, value in config.items() if value is not None}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_transformers_4_config_keys_read_the_same(models, tmp_path):
    """Hub configs carry transformers 4's keys (rope_theta, rope_scaling, Qwen3-MoE's num_experts), the
    tests' models transformers 5's (rope_parameters, num_local_experts): both read the same."""
    llama = _copy(
        models["llama3"], tmp_path / "llama", rope_parameters=None, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE
    )
    expected = model_config(models["llama3"])
    assert {**model_config(llama), "name": "", "init_from": ""} == {**expected, "name": "", "init_from": ""}
    config = json.loads((models["qwen3-moe"] / "config.json").read_text())
    qwen = _copy(
        models["qwen3-moe"], tmp_path / "qwen", num_local_experts=None, num_experts=config["num_local_experts"]
    )
    assert model_config(qwen)["moe"] == model_config(models["qwen3-moe"])["moe"]


def test_old_checkpoints_still_resume(tmp_path):
    """A checkpoint saved before the schema had model.qk_norm (or data.tokenizer=auto) compares equal."""
    from curry_train.config.resume import _check_same_math  # noqa: PLC0415

    cfg = compose(["data=files", f"data.paths=[{tmp_path}/x.txt]"])
    apply_init_from(cfg)  # data.tokenizer=auto, no init_from: byte, as such runs saved it
    saved = OmegaConf.to_container(cfg, resolve=True)
    for key in ("qk_norm", "rope_scaling", "init_from"):
        del saved["model"][key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    _check_same_math(cfg, tmp_path)
    cfg.model.qk_norm = True
    with pytest.raises(Exception, match="model.qk_norm"):
        _check_same_math(cfg, tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"quantization_config": {"quant_method": "fp8"}}, "quantized weights (quantization_config: fp8)"),
        ({"rope_parameters": None, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "no 'low_freq_factor'"),
        ({"num_attention_heads": None}, "no 'num_attention_heads'"),
        ({"num_attention_heads": "four"}, "a value of the wrong type"),
        ({"architectures": "MistralForCausalLM"}, None),  # a string, not a list: still read
    ],
)
def test_malformed_config_is_one_error_naming_the_key(models, tmp_path, edit, message):
    directory = _copy(models["llama3"], tmp_path / "model", **edit)
    if message is None:
        assert model_config(directory)["dim"] == 64
        return
    with pytest.raises(PretrainedError, match=re.escape(message)):
        model_config(directory)


def test_float8_weights_are_refused(models, tmp_path):
    directory = _copy(models["llama3"], tmp_path / "model")
    tensors = load_file(str(directory / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, str(directory / "model.safetensors"))
    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with(model_config(directory))
    with pytest.raises(PretrainedError, match=f"tensor {re.escape(key)} is F8_E4M3"):
        check_weights(directory, cfg)


def test_export_replaces_an_earlier_export_only(models, tmp_path):
    """Exporting again (one file after several) leaves no stale shard or index; a directory holding
    anything else is refused, untouched."""
    model = our_model(models["llama3"])
    out = tmp_path / "out"
    export(dict(model.state_dict()), model.cfg, out, shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()
    export(dict(model.state_dict()), model.cfg, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PretrainedError, match="holds notes.txt"):
        export(dict(model.state_dict()), model.cfg, out)
    assert (out / "notes.txt").read_text() == "mine" and not (tmp_path / "out.partial").exists()


def test_add_bos_token_adds_bos_a_post_processor_does_not(models, tmp_path):
    from tokenizers import Tokenizer  # noqa: PLC0415

    directory = _copy(models["llama3"], tmp_path / "model")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.post_processor = None
    tokenizer.save(str(directory / "tokenizer.json"))
    bos = tokenizer.token_to_id(BOS)
    assert make_tokenizer(str(directory)).encode("alpha")[0] != bos
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "add_bos_token": True})
    )
    assert make_tokenizer(str(directory)).encode("alpha")[0] == bos


def test_missing_tensor_and_wrong_shape_name_the_tensor(models, tmp_path):
    directory = tmp_path / "broken"
    directory.mkdir()
    for file in models["llama3"].iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with(model_config(directory))
    tensors = load_file(str(directory / "model.safetensors"))
    missing = tensors.pop("model.layers.1.mlp.down_proj.weight")
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(PretrainedError, match=r"tensor model\.layers\.1\.mlp\.down_proj\.weight is missing"):
        check_weights(directory, cfg)
    tensors["model.layers.1.mlp.down_proj.weight"] = missing[:, :80].contiguous()
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(
        PretrainedError, match=r"down_proj\.weight has shape \[64, 80\], config.json implies \[64, 96\]"
    ):
        check_weights(directory, cfg)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture GPT2LMHeadModel is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
    ],
)
def test_unsupported_directory_is_one_line_before_any_worker(models, tmp_path, edit, message, curry_train):
    directory = tmp_path / "model"
    directory.mkdir()
    for file in models["llama3"].iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config.pop("rope_parameters", None)
    (directory / "config.json").write_text(json.dumps({**config, **edit}))
    result = curry_train(
        [f"model.init_from={directory}", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path
    )
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "config.json" in lines[0], result.err
    assert not (tmp_path / "run").exists()  # nothing started


def _corpus(path: Path, documents: int = 400) -> Path:
    generator = torch.Generator().manual_seed(3)
    lines = []
    for _ in range(documents):
        picks = torch.randint(
            0, len(WORDS), (int(torch.randint(4, 12, (1,), generator=generator)),), generator=generator
        )
        lines.append(json.dumps({"text": " ".join(WORDS[i] for i in picks)}) + "\n")
    path.write_text("".join(lines))
    return path


LAYOUT_RUN = (
    "trainer.max_steps=1",
    "trainer.limit_val_batches=0",
    "data.global_batch_size=16",
    "checkpoint.save_on_end=false",
    "checkpoint.export_hf_on_end=false",
)


@pytest.mark.slow
def test_every_layout_starts_from_the_pretrained_loss(models, tmp_path, request, pools):
    """A tiny Llama 3 loaded under fsdp on 4 ranks and fsdp+tp (and with --matrix: tp 2, pp 2, cp 2, each
    passed once by hand): the first loss of one process (rel 1e-5: fp32 sums in another order), and each
    rank read about its shards, not the model."""
    corpus = _corpus(tmp_path / "corpus.jsonl")
    common = [
        "recipe=hf-finetune-cpu",
        f"model.init_from={models['llama3']}",
        f"data.paths=[{corpus}]",
        "trainer.enable_progress_bar=false",
        *LAYOUT_RUN,
    ]
    layouts = {
        "one": ["parallel=dp", "trainer.devices=1"],
        "fsdp4": ["parallel=fsdp", "trainer.devices=4"],
        "fsdp+tp": ["parallel=fsdp+tp", "trainer.devices=4", "parallel.tp.size=2"],  # 2-D (strided) shards
    }
    if request.config.getoption("--matrix"):
        layouts.update(
            tp2=["parallel=tp", "trainer.devices=2", "parallel.tp.size=2"],
            pp2=["parallel=pp", "trainer.devices=2", "parallel.pp.size=2"],
            cp2=["parallel=cp", "trainer.devices=2", "parallel.cp.size=2"],
        )
    first = {}
    for name, layout in layouts.items():
        run_dir = tmp_path / name
        train(pools, [*common, *layout], run_dir)
        first[name] = read_metric(run_dir)[0]
        if name == "fsdp4":
            line = next(line for line in (run_dir / "train.log").read_text().splitlines() if "loaded" in line)
            found = re.search(r"read [\d.]+ MiB \(([\d,]+) B\) for this rank's [\d.]+ MiB \(([\d,]+) B\)", line)
            read, shards = (int(x.replace(",", "")) for x in found.groups())
    # Rank 0's quarter of the model; k_proj's rows are read by whole heads (16 rows for its 8): +2 KiB a layer.
    total = sum(p.numel() * 4 for p in our_model(models["llama3"]).parameters())
    assert shards == pytest.approx(total / 4, rel=0.05) and read <= shards * 1.05, (read, shards, total)
    for name, loss in first.items():
        assert loss == pytest.approx(first["one"], rel=1e-5), (name, loss, first["one"])


MEMORY_EXAMPLE = """
import torch, torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.fsdp import fully_shard
from curry_train.model.llama import Llama
from curry_train.model.config import ModelConfig
from curry_train.checkpoint.hf_load import load_pretrained
from curry_train.checkpoint.hf_config import model_config

dist.init_process_group("gloo")
cfg = OmegaConf.structured(ModelConfig)
cfg.merge_with(model_config("DIRECTORY"))
with torch.device("meta"):
    model = Llama(cfg)
for block in model.layers.values():
    fully_shard(block)
fully_shard(model)
r = load_pretrained(model, torch.device("cpu"), "DIRECTORY")
print(f"SEED OK {dist.get_rank()} {r.shard_bytes} {r.bytes_read} {r.largest_read} {r.peak_rss - r.rss_before}")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_each_rank_holds_its_shards_plus_one_tensor(tmp_path):
    """A 72 MiB model under FSDP on 4 ranks: each rank reads its quarter, and its resident memory grows by
    its shards plus its largest single read (the embedding's quarter) and allocator slack (16 MiB), far
    below the model (measured: Linux's peak resident memory, reset when the load starts)."""
    cfg = OmegaConf.structured(
        ModelConfig(name="m", dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=768, vocab_size=32000)
    )
    model = Llama(cfg)
    total = sum(p.numel() * 4 for p in model.parameters())
    export(dict(model.state_dict()), cfg, tmp_path / "model", shard_bytes=20 << 20)
    del model
    out = run_seed_example(MEMORY_EXAMPLE.replace("DIRECTORY", str(tmp_path / "model")), tmp_path, nproc=4)
    rows = [[int(x) for x in row[1:]] for row in re.findall(r"SEED OK (\d) (\d+) (\d+) (\d+) (-?\d+)", out)]
    assert len(rows) == 4
    for shards, read, largest, growth in rows:
        assert shards == pytest.approx(total / 4, rel=0.01) and shards <= read <= shards * 1.01  # k heads: whole
        assert growth <= shards + largest + (16 << 20) and growth < total / 2, (shards, largest, growth, total)


def _first_loss(pools, kind_dir: Path, corpus: Path, layout: list[str], run_dir: Path) -> float:
    args = ["recipe=hf-finetune-cpu", f"model.init_from={kind_dir}", f"data.paths=[{corpus}]", *LAYOUT_RUN]
    train(pools, [*args, "trainer.enable_progress_bar=false", *layout], run_dir)
    return read_metric(run_dir)[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, layout",
    [
        ("mixtral", ["parallel=fsdp+ep", "parallel.ep.size=2", "trainer.devices=4"]),
        pytest.param("qwen3-moe", ["parallel=pp", "parallel.pp.size=2", "trainer.devices=2"], marks=MATRIX),
        pytest.param("qwen3-moe", ["parallel=ep", "parallel.ep.size=2", "trainer.devices=2"], marks=MATRIX),
    ],
)
def test_mixture_of_experts_loads_under_expert_parallel(models, tmp_path, kind, layout, pools):
    """Stacked experts read per expert into ep x FSDP shards: the first loss (with the balancing loss) of
    one process, rel 1e-5."""
    corpus = _corpus(tmp_path / "corpus.jsonl")
    one = _first_loss(pools, models[kind], corpus, ["parallel=dp", "trainer.devices=1"], tmp_path / "one")
    assert _first_loss(pools, models[kind], corpus, layout, tmp_path / "layout") == pytest.approx(one, rel=1e-5)


@pytest.mark.slow
def test_finetune_recipe_exports_what_transformers_loads(models, tmp_path, pools):
    """recipes/hf-finetune-cpu.yaml end to end: a tiny Llama 3 fine-tuned a few steps under fsdp on 2 ranks,
    exported at the end; transformers loads the export and gives our logits for the trained weights."""
    corpus = _corpus(tmp_path / "corpus.jsonl")
    run_dir = train(
        pools,
        [
            "recipe=hf-finetune-cpu",
            f"model.init_from={models['llama3']}",
            f"data.paths=[{corpus}]",
            "trainer.max_steps=4",
            "optim.lr=1e-3",
            "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1",
        ],
        tmp_path / "run",
    )
    losses = read_metric(run_dir)
    assert losses[3] < losses[0]
    exported = run_dir / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in exported.iterdir()
    }
    (checkpoint,) = files.checkpoints_in(run_dir / "checkpoints")
    state = dcp.consolidated_model_state(checkpoint)
    model = our_model(models["llama3"])
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.load_state_dict(state)
    assert not torch.equal(model.state_dict()["layers.0.attention.wq.weight"], start["layers.0.attention.wq.weight"])
    tokens = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(tokens)
    torch.testing.assert_close(hf_logits(exported, tokens), expected, rtol=0, atol=1e-5)
    # The CLI writes the same directory from the checkpoint, in bf16 on request (curry-export's one test as a
    # user runs it: the command's own process).
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_checkpoint.py"), str(checkpoint), "--format", "hf"]
        + ["--output", str(out), "--dtype", "bf16", "--max-shard-size", "100KB"],
        check=True,
        env=clean_env(),
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["bos_token_id"] == 1 and config["eos_token_id"] == 2
    torch.testing.assert_close(hf_logits(out, tokens), expected, rtol=0, atol=0.05)
