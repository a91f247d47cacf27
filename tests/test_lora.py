"""LoRA: a frozen base that training leaves bit for bit, optimizer state for the adapters only, pretrained
bases untouched at the start, and one-line refusals. The layouts are held to one process with adapters
by test_parity.py's ``lora-*`` rows."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, assert_same_curve, read_metric, train
from test_hf import our_model, write_model
from torch.distributed.checkpoint import FileSystemReader

from curry_train.checkpoint import files
from curry_train.checkpoint.dcp import consolidated_model_state
from curry_train.checkpoint.model import checkpoint_model
from curry_train.config import ConfigError, compose
from curry_train.config.checks import check
from curry_train.config.schema import Config
from curry_train.model.llama import Llama
from curry_train.parallelize import materialize
from curry_train.primitives.lora import apply_lora, is_adapter
from curry_train.primitives.materialize import materialize_and_init

LORA = ("+model/lora=attention", "model.lora.rank=4")


def test_training_moves_only_the_adapters_and_keeps_no_state_for_the_base(pools, tmp_path):
    """Three steps under fsdp on 2 ranks, the base saved too (checkpoint.save_base): every base weight is its
    seeded initial value bit for bit, every adapter B has moved from zero, and the optimizer state saved
    holds the adapters' moments alone."""
    overrides = [*FAST, *LORA, "trainer.max_steps=3", "parallel=fsdp", "trainer.devices=2"]
    run = train(pools, [*overrides, "checkpoint.save_base=true"], tmp_path / "run")
    checkpoint = files.last_checkpoint(run)
    saved = consolidated_model_state(checkpoint)
    initial = _initial(compose([*FAST, *LORA]))
    adapters = [name for name, _ in initial.named_parameters() if is_adapter(name)]
    assert len(adapters) == 32
    for name, value in initial.named_parameters():
        if is_adapter(name):
            if name.endswith("lora_b"):
                assert value.abs().max() == 0 and saved[name].abs().max() > 0, name
        else:
            assert torch.equal(saved[name], value), name
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    moments = {key: item for key, item in metadata.items() if "exp_avg" in key}
    assert moments and all(any(a in key for a in adapters) for key in moments)
    adapter_bytes = sum(p.numel() * 4 for n, p in initial.named_parameters() if is_adapter(n))
    assert sum(item.size.numel() * 4 for item in moments.values()) == 2 * adapter_bytes  # exp_avg, exp_avg_sq


def _initial(cfg) -> Llama:
    cfg = Config.of(cfg)
    with torch.device("meta"):
        model = Llama(cfg.model)
    apply_lora(model, cfg.model.lora.targets, cfg.model.lora.rank, cfg.model.lora.alpha)
    materialize_and_init(model, torch.device("cpu"), cfg.seed)
    return model


EXPERTS = (
    "model=moe_debug",
    "model.lora.targets=[attention.wq,feed_forward.experts.w1,feed_forward.experts.w2,feed_forward.experts.w3]",
)


@pytest.mark.parametrize(
    "model, layout",
    [((), ("parallel=fsdp",)), (EXPERTS, ("parallel=ep",))],
    ids=["fsdp", "expert-adapters-ep"],
)
def test_a_checkpoint_of_the_adapters_alone_resumes_anywhere_on_the_same_curve(pools, tmp_path, model, layout):
    """By default a LoRA checkpoint holds the adapters (and their optimizer state) alone: fsdp (or ep, the
    experts' adapters split with them) on 2 ranks saves step 3, one process resumes it (the base rebuilt
    from the seed) on the uninterrupted curve; the checkpoint's model, rebuilt in one process, has the
    adapters trained and the base as drawn."""
    common = [*FAST, *LORA, *model]
    reference = read_metric(train(pools, [*common, "trainer.max_steps=6"], tmp_path / "one"))
    saved = train(pools, [*common, "trainer.max_steps=3", *layout, "trainer.devices=2"], tmp_path / "sharded")
    checkpoint = files.last_checkpoint(saved)
    names = consolidated_model_state(checkpoint)
    # no base weight written (the experts' balancing bias, state that trains, is)
    assert names and all(is_adapter(name) or name.endswith("router.expert_bias") for name in names)
    resumed = read_metric(train(pools, [*common, "trainer.max_steps=6", f"ckpt_path={checkpoint}"], tmp_path / "re"))
    assert sorted(resumed) == [3, 4, 5]
    assert_same_curve(resumed, {step: reference[step] for step in (3, 4, 5)})
    rebuilt = checkpoint_model(checkpoint, torch.device("cpu"))
    initial = dict(_initial(compose(common)).named_parameters())
    for name, value in rebuilt.named_parameters():
        assert torch.equal(value, names[name] if is_adapter(name) else initial[name]), name


def test_a_pretrained_base_starts_where_it_was(tmp_path):
    """init_from with adapters: the base read from the directory, the adapters drawn (B = 0): the same
    logits as the pretrained model."""
    directory = write_model(tmp_path / "llama3", "llama3")
    base = our_model(directory)
    with torch.device("meta"):
        model = Llama(base.cfg)
    apply_lora(model, ["attention.wq", "attention.wv", "output"], 4, 8.0)
    materialize(model, torch.device("cpu"), seed=3, init_from=str(directory), adapters=True)
    tokens = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), base(tokens), rtol=0, atol=0)
    assert model.output.lora_a.abs().max() > 0 and model.output.lora_b.abs().max() == 0
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter(name) for name in trainable)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.lora.rank=0"], "model.lora.rank=0 must be at least 1"),
        (["model.lora.targets=[attention.wz]"], "'attention.wz' matches no linear layer"),
        (["model=moe_debug", "model.lora.targets=[feed_forward.w1]"], "every block's MLP is a mixture of experts"),
        (["model.lora.targets=[feed_forward.experts.w2]"], "the model has no experts"),
    ],
)
def test_bad_lora_settings_are_one_line(overrides, message, tmp_path):
    cfg = compose([*FAST, *LORA, *overrides])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        check(cfg, env={}, run_dir=tmp_path)


def test_lora_without_a_pretrained_base_is_warned(tmp_path, caplog):
    check(compose([*FAST, *LORA]), env={}, run_dir=tmp_path)
    assert "model.lora without model.init_from" in caplog.text


def _adapted(directory, targets):
    """The pretrained model in ``directory`` with adapters on ``targets``, each B drawn away from zero (as if
    trained); its config, state and logits on a fixed batch."""
    from omegaconf import OmegaConf  # noqa: PLC0415

    from curry_train.checkpoint.hf_config import model_config  # noqa: PLC0415
    from curry_train.model.config import LoRAConfig, ModelConfig  # noqa: PLC0415

    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with(model_config(directory))
    cfg.init_from = str(directory)
    cfg.lora = LoRAConfig(rank=4, alpha=8.0, targets=list(targets))
    with torch.device("meta"):
        model = Llama(cfg)
    apply_lora(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha)
    materialize(model, torch.device("cpu"), seed=3, init_from=str(directory), adapters=True)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_b"):  # as if trained: B away from zero
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.eval()(tokens)
        assert not torch.allclose(ours, our_model(directory)(tokens), atol=1e-3)  # the adapters change the logits
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    return cfg, state, tokens, ours


def test_merged_and_peft_exports_give_the_adapted_logits(tmp_path):
    """A tiny Llama 3 with adapters on q (RoPE-ordered rows), v, o and the head: merged into a Hugging Face
    directory, or written as a PEFT adapter directory loaded onto the base, transformers computes our logits."""
    peft = pytest.importorskip("peft")
    from test_hf import hf_logits, transformers  # noqa: PLC0415

    from curry_train.checkpoint.hf_export import export, export_peft, merge_adapters  # noqa: PLC0415

    directory = write_model(tmp_path / "llama3", "llama3")
    cfg, state, tokens, ours = _adapted(directory, ["attention.wq", "attention.wv", "attention.wo", "output"])
    export(merge_adapters(state, cfg), cfg, tmp_path / "merged")
    torch.testing.assert_close(hf_logits(tmp_path / "merged", tokens), ours, rtol=0, atol=1e-5)
    export_peft(state, cfg, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(tokens).logits, ours, rtol=0, atol=1e-5)


def test_adapters_on_routed_experts_merge_into_the_experts(tmp_path):
    """A tiny Mixtral with adapters on every routed expert's three weights (one pair per expert) and on q:
    the merged Hugging Face model gives our logits; a PEFT directory of them is refused in one line."""
    from test_hf import hf_logits  # noqa: PLC0415

    from curry_train.checkpoint.hf_export import export, export_peft, merge_adapters  # noqa: PLC0415
    from curry_train.checkpoint.hf_load import PretrainedError  # noqa: PLC0415

    directory = write_model(tmp_path / "mixtral", "mixtral")
    experts = [f"feed_forward.experts.{w}" for w in ("w1", "w2", "w3")]
    cfg, state, tokens, ours = _adapted(directory, ["attention.wq", *experts])
    assert state["layers.0.feed_forward.experts.w1_lora_a"].shape == (4, 4, cfg.dim)  # (experts, rank, in)
    export(merge_adapters(state, cfg), cfg, tmp_path / "merged")
    torch.testing.assert_close(hf_logits(tmp_path / "merged", tokens), ours, rtol=0, atol=1e-5)
    with pytest.raises(PretrainedError, match="adapters on routed experts.*--format hf"):
        export_peft(state, cfg, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_peft_export_of_a_run_without_lora_is_one_line(single_process_run, tmp_path, capsys):
    from curry_train.cli import export as export_cli  # noqa: PLC0415

    checkpoint = single_process_run / "checkpoints" / "step-00000010"
    assert export_cli.main([str(checkpoint), "--format", "peft", "--output", str(tmp_path / "adapter")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--format peft:" in line and "trained no LoRA adapters" in line
    assert not (tmp_path / "adapter").exists()


def test_a_bf16_base_is_held_and_saved_in_bf16(pools, tmp_path):
    """model.lora.base_dtype=bf16 under fsdp with bf16 compute: the base's weights are bf16 (half the bytes),
    the adapters and their state fp32; advise counts the base at 2 bytes a parameter; without bf16
    compute the run is refused in one line."""
    from curry_train.planning.advise import estimate  # noqa: PLC0415
    from curry_train.planning.layout import current_layout  # noqa: PLC0415

    bf16 = [*FAST, *LORA, "model.lora.base_dtype=bf16", "parallel=fsdp", "parallel.fsdp.mixed_precision=bf16"]
    run = train(pools, [*bf16, "trainer.devices=2", "trainer.max_steps=2", "checkpoint.save_base=true"], tmp_path / "r")
    saved = consolidated_model_state(files.last_checkpoint(run))
    assert {t.dtype for n, t in saved.items() if not is_adapter(n)} == {torch.bfloat16}
    assert {t.dtype for n, t in saved.items() if is_adapter(n)} == {torch.float32}
    fp32 = estimate(compose([*bf16[:-3], "parallel=fsdp"]), current_layout(compose([*bf16[:-3], "parallel=fsdp"])))
    half = estimate(compose(bf16), current_layout(compose(bf16)))
    assert half.memory["params"] < 0.6 * fp32.memory["params"]
    with pytest.raises(ConfigError, match="model.lora.base_dtype=bf16 computes in bf16"):
        check(compose([*FAST, *LORA, "model.lora.base_dtype=bf16"]), env={}, run_dir=tmp_path / "x")
