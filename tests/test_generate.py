"""Generation: the KV cache computes what the whole sequence computes, greedy output equals transformers'
``generate`` token for token, sampling settings do what they say, chat templates render as transformers
renders them, and ``curry-generate`` reads a checkpoint or a Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_hf import VOCAB, our_model, write_model

from curry_train.cli import generate as generate_cli
from curry_train.data.chat import chat_template, render, special_tokens
from curry_train.data.sources import DataError
from curry_train.generate import Sampling, _pick, decode, encode, generate, load
from curry_train.model.llama import KVCache

transformers = pytest.importorskip("transformers")

# A Llama-3-style template (header ids, eot) and a Qwen3-style one (im_start / im_end), as the families
# ship them, trimmed to what a conversation of text turns uses.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN3_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown role ' + message.role) }}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You answer in Greek letters."},
    {"role": "user", "content": "alpha beta"},
    {"role": "assistant", "content": " gamma delta "},
    {"role": "user", "content": "epsilon"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generate")
    return {kind: write_model(root / kind, kind) for kind in ("llama3", "qwen3", "mixtral")}


@pytest.mark.parametrize("kind", ["llama3", "qwen3", "mixtral"])
def test_greedy_generation_equals_transformers(models, kind):
    """32 new tokens, greedy, no end token: token for token what transformers' generate (with its cache) writes."""
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(models[kind]), dtype=torch.float32).eval()
    mask = torch.ones_like(prompt)  # none of the prompt is padding, whatever its ids
    theirs = hf.generate(
        prompt, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    ours = generate(our_model(models[kind]), prompt[0].tolist(), Sampling(max_new_tokens=32))
    assert ours.tokens == theirs[0, 7:].tolist()
    assert len(set(ours.tokens)) > 3  # not one token repeated: the check can fail


def test_the_cache_computes_what_the_whole_sequence_computes(models):
    model = our_model(models["qwen3"])
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = model(tokens)
        cache = KVCache(32)
        parts = [
            model(tokens[:, :9], cache=cache),
            model(tokens[:, 9:10], cache=cache),
            model(tokens[:, 10:], cache=cache),
        ]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-5)
    assert cache.length == 20
    with pytest.raises(ValueError, match="exceed the cache's 32"):
        model(tokens[:, :13], cache=cache)


def test_sampling_settings():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    draws = lambda sampling: [_pick(logits, sampling, torch.Generator().manual_seed(s)) for s in range(1000)]  # noqa: E731
    assert set(draws(Sampling(temperature=1.0, top_k=1))) == {1}  # top-1 is greedy
    assert set(draws(Sampling(temperature=1.0, top_k=2))) == {1, 2}
    assert set(draws(Sampling(temperature=1.0, top_p=0.5))) == {1}  # token 1 alone holds half the mass
    assert set(draws(Sampling(temperature=1.0))) == {0, 1, 2, 3}
    assert _pick(logits, Sampling(), torch.Generator()) == 1
    assert Sampling(top_p=0).check() == "top_p=0: in (0, 1]" and Sampling().check() is None


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, QWEN3_TEMPLATE], ids=["llama3", "qwen3"])
def test_chat_templates_render_as_transformers(models, tmp_path, template):
    """The same template in a tokenizer directory: our rendering's token ids are apply_chat_template's."""
    directory = tmp_path / "chat"
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_text((models["llama3"] / name).read_text())
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert chat_template(directory) == template
    for prompt in (True, False):
        theirs = hf.apply_chat_template(CONVERSATION, add_generation_prompt=prompt, tokenize=True)
        theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
        text = render(template, CONVERSATION, prompt, special_tokens(directory))
        assert hf(text, add_special_tokens=False)["input_ids"] == list(theirs)
        assert text == hf.apply_chat_template(CONVERSATION, add_generation_prompt=prompt, tokenize=False)


def test_a_template_can_refuse_a_conversation():
    with pytest.raises(DataError, match="chat template: unknown role tool"):
        render(QWEN3_TEMPLATE, [{"role": "tool", "content": "x"}], False, {})
    with pytest.raises(DataError, match="chat template: line 1: "):
        render("{% for %}", [], False, {})


def test_curry_generate_from_a_hugging_face_directory(models, capsys, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alpha beta\n\ngamma\n")
    assert generate_cli.main([str(models["llama3"]), "--file", str(prompts), "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    loaded = load(models["llama3"])
    want = [
        decode(loaded, generate(loaded.model, encode(loaded, p), Sampling(max_new_tokens=5), loaded.stop).tokens)
        for p in ("alpha beta", "gamma")
    ]
    assert out == "".join(text + "\n" for text in want)
    assert err.count("tokens/s") == 2 and "prompt +" in err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("delta\n"))
    assert generate_cli.main([str(models["llama3"]), "-", "--max-new-tokens", "2", "--temperature", "0.7"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent", "hi"], "/nonexistent: no such directory"),
        (["{model}", "hi", "--temperature", "-1"], "temperature=-1.0: 0 (greedy) or more"),
        (["{model}", "hi", "--top-p", "1.5"], "top_p=1.5: in (0, 1]"),
        (["{model}"], "no prompt: give prompts"),
        (["{model}", "hi", "--max-new-tokens", "500"], "exceed the model's 256 positions"),
        (["{model}", "hi", "--bogus"], "unrecognized arguments: --bogus"),
        (["{tmp}", "hi"], "neither a curry-train checkpoint nor a Hugging Face model directory"),
    ],
)
def test_curry_generate_bad_input_is_one_line(models, tmp_path, capsys, args, message):
    args = [a.replace("{model}", str(models["llama3"])).replace("{tmp}", str(tmp_path)) for a in args]
    assert generate_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("curry-generate: error: ") and message in err[0], err


def test_curry_generate_from_a_training_checkpoint(single_process_run, capsys):
    """The session's single-process run (byte-level, the stdlib corpus): its last checkpoint writes text."""
    checkpoint = single_process_run / "checkpoints" / "step-00000010"
    loaded = load(checkpoint)
    assert loaded.template is None and loaded.stop == {0}
    full = loaded.model(torch.tensor([list(b"def ")]))[0, -1]
    result = generate(loaded.model, list(b"def "), Sampling(max_new_tokens=1))
    assert result.tokens == [int(full.argmax())]
    assert generate_cli.main([str(checkpoint), "def main(", "--max-new-tokens", "8"]) == 0
    want = generate(loaded.model, list(b"def main("), Sampling(max_new_tokens=8), loaded.stop)
    assert capsys.readouterr().out == decode(loaded, want.tokens) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama3", "qwen3", "mixtral"])
def test_tensor_parallel_generation_equals_transformers(models, capsys, kind):
    """A tiny model split over 2 processes (heads, MLP and vocabulary; Mixtral's experts whole): greedy,
    token for token what transformers writes; and curry-generate --tp 2 as a user runs it."""
    from curry_train.generate import generate_tensor_parallel  # noqa: PLC0415

    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(models[kind]), dtype=torch.float32).eval()
    mask = torch.ones_like(prompt)
    theirs = hf.generate(
        prompt, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    (ours,) = generate_tensor_parallel(models[kind], [prompt[0].tolist()], Sampling(max_new_tokens=32), tp=2)
    assert ours.tokens == theirs[0, 7:].tolist()
    if kind != "llama3":
        return
    assert generate_cli.main([str(models["llama3"]), "alpha beta", "--tp", "2", "--max-new-tokens", "6"]) == 0
    loaded = load(models["llama3"])
    want = generate(loaded.model, encode(loaded, "alpha beta"), Sampling(max_new_tokens=6), loaded.stop)
    assert capsys.readouterr().out == decode(loaded, want.tokens) + "\n"


@pytest.mark.slow
def test_tensor_parallel_generation_from_a_checkpoint(single_process_run):
    """A training checkpoint read shard by shard (DCP reshards it to tp 2) writes what one process writes."""
    from curry_train.generate import generate_tensor_parallel  # noqa: PLC0415

    checkpoint = single_process_run / "checkpoints" / "step-00000010"
    loaded = load(checkpoint)
    ids = list(b"def main(")
    want = generate(loaded.model, ids, Sampling(max_new_tokens=12), loaded.stop)
    (got,) = generate_tensor_parallel(checkpoint, [ids], Sampling(max_new_tokens=12), tp=2, stop=loaded.stop)
    assert got.tokens == want.tokens


@pytest.mark.slow
def test_tensor_parallel_generation_from_a_lora_checkpoint(pools, tmp_path):
    """A LoRA run's checkpoint (adapters alone, on column and row layers and the head): under tp 2 each rank
    rebuilds its base shards from the seed and reads its adapters' splits, and writes what one process writes."""
    from conftest import FAST, train  # noqa: PLC0415

    from curry_train.checkpoint import files  # noqa: PLC0415
    from curry_train.generate import generate_tensor_parallel  # noqa: PLC0415

    lora = ["+model/lora=attention", "model.lora.targets=[attention.wq,attention.wo,output]", "optim.lr=3e-2"]
    checkpoint = files.last_checkpoint(train(pools, [*FAST, *lora, "trainer.max_steps=4"], tmp_path / "run"))
    loaded = load(checkpoint)
    ids = list(b"def main(")
    want = generate(loaded.model, ids, Sampling(max_new_tokens=12), loaded.stop)
    (got,) = generate_tensor_parallel(checkpoint, [ids], Sampling(max_new_tokens=12), tp=2, stop=loaded.stop)
    assert got.tokens == want.tokens
    with torch.no_grad():  # the adapters matter: without them the base writes something else
        for name, param in loaded.model.named_parameters():
            if name.endswith("lora_b"):
                param.zero_()
    assert generate(loaded.model, ids, Sampling(max_new_tokens=12), loaded.stop).tokens != want.tokens
