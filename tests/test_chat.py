"""Chat records as training data: the trained roles' turns are the only targets (the mask transformers
computes for templates that mark them), prompt tokens are inputs, and bad records are one line. The
layouts are held to one process on chat data by test_parity.py's ``chat-*`` rows."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CHAT_TEMPLATE
from test_hf import write_tokenizer

from curry_train.data.chat import DOCUMENT_START, TARGET, ChatEncoder, conversation, special_tokens
from curry_train.data.config import DataConfig
from curry_train.data.mixture import DataError, Mixture, survey
from curry_train.data.sources import ByteTokenizer, make_tokenizer
from curry_train.train_step import IGNORE_INDEX, StepSettings, TrainStep

transformers = pytest.importorskip("transformers")

# Qwen3-style, the assistant's text and end of turn marked for transformers' assistant mask
MARKED_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message.content + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Answer in Greek letters."},
    {"role": "user", "content": "alpha beta"},
    {"role": "assistant", "content": "gamma delta"},
    {"role": "user", "content": "epsilon"},
    {"role": "assistant", "content": "zeta eta theta"},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("chat-tokenizer")
    write_tokenizer(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": MARKED_TEMPLATE}))
    return directory


def test_the_targets_are_the_assistant_mask_transformers_computes(tokenizer_dir):
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    theirs = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    encoder = ChatEncoder(
        MARKED_TEMPLATE, special_tokens(tokenizer_dir), make_tokenizer(str(tokenizer_dir)), ["assistant"]
    )
    ids, flags = encoder.encode(CONVERSATION, "test")
    eos = hf.convert_tokens_to_ids("<|end_of_text|>")
    assert ids[-1] == eos and flags[-1] == 0  # the separator ends the document, not a target
    assert ids[:-1].tolist() == list(theirs["input_ids"])
    assert ((flags[:-1] & TARGET) != 0).astype(int).tolist() == list(theirs["assistant_masks"])
    assert flags[0] & DOCUMENT_START and not (flags[1:] & DOCUMENT_START).any()
    targets = hf.decode([i for i, f in zip(ids, flags, strict=True) if f & TARGET])
    assert targets == "gamma delta<|im_end|>\nzeta eta theta<|im_end|>\n"


def test_train_roles_choose_the_targets():
    encoder = ChatEncoder(CHAT_TEMPLATE, {}, ByteTokenizer(), ["user", "assistant"])
    ids, flags = encoder.encode(CONVERSATION, "test")
    text = bytes(int(i) for i, f in zip(ids, flags, strict=True) if f & TARGET).decode()
    # no system turn; the assistant's headers are the generation prompt (inputs), a user turn is trained whole
    assert text == "<user>alpha beta</>gamma delta</><user>epsilon</>zeta eta theta</>"


def test_prompt_completion_records_and_bad_records():
    assert conversation({"prompt": "p", "completion": "c"}, "x") == [
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "c"},
    ]
    for record, message in [
        ({"text": "hi"}, r"x: a chat record holds messages, or prompt and completion; this one has \['text'\]"),
        ({"messages": []}, r"x: messages must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, r"x: message 0: unknown role 'robot'"),
        ({"messages": [{"role": "user"}]}, r"x: message 0 has no text content"),
        ("hi", r"x: a chat record is an object"),
    ]:
        with pytest.raises(DataError, match=message):
            conversation(record, "x")


def chat_cfg(tmp_path: Path, records: list, **settings) -> DataConfig:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = {"chat_template": CHAT_TEMPLATE, "tokenizer": "byte", "seq_len": 16, "val_fraction": 0.0, **settings}
    return DataConfig(source="files", paths=[str(path)], format="chat", global_batch_size=2, **settings)


def test_rows_carry_their_flags_and_the_step_trains_only_the_targets(tmp_path):
    """Packed chat rows (2, seq + 1): ids and flags. The step's labels are the targets' tokens, the
    rest ignored; under the document mask the next conversation's first token is not asked for."""
    records = [{"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]}] * 6
    mixture = Mixture(chat_cfg(tmp_path, records, shuffle_window=1), seed=0)  # rows in corpus order
    rows, _ = next(mixture.batches(mixture.start_state(), 0, 1))
    assert rows.shape == (2, 2, 17)
    batch = torch.from_numpy(rows)
    for separator in (None, 0):
        step = SimpleNamespace(
            settings=StepSettings(tokens_per_step=32, micro_batch_size=2, document_separator=separator)
        )
        inputs, labels, documents = TrainStep.packed(step, batch)
        assert torch.equal(inputs, batch[:, 0, :-1])
        kept = bytes(int(t) for t in labels.flatten() if t != IGNORE_INDEX)
        assert kept and set(kept) <= set(b"cd</>")  # only the assistant's text and its end of turn
        assert (documents is None) == (separator is None)
    # one conversation is "<user>ab</><assistant>cd</>" + NUL: 28 tokens, so row 1 holds a document start
    assert documents[0].max() == 0 and documents[1].max() == 1


@pytest.mark.parametrize(
    "records, settings, message",
    [
        ([{"text": "hi"}], {}, r"chat\.jsonl \(byte 0\): a chat record holds messages"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], {}, r"unknown role 'robot'"),
        (
            [{"prompt": "a", "completion": "b"}],
            {"chat_template": None},
            r"has no chat template; set data\.chat_template",
        ),
        (
            [{"prompt": "a", "completion": "b"}],
            {"train_roles": ["critic"]},
            r"data\.train_roles: unknown role 'critic'",
        ),
        ([{"prompt": "a", "completion": "b"}], {"chat_template": "{% for %}"}, r"chat template: line 1"),
    ],
)
def test_bad_chat_data_is_one_line_at_the_check(tmp_path, records, settings, message):
    with pytest.raises(DataError, match=message):
        survey(chat_cfg(tmp_path, records, **settings))


def test_a_chat_source_reads_records_not_text(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    cfg = DataConfig(source="files", paths=[str(tmp_path / "notes.txt")], format="chat", chat_template=CHAT_TEMPLATE)
    with pytest.raises(DataError, match=r"notes\.txt: a chat source reads \.jsonl records"):
        survey(cfg)
    with pytest.raises(DataError, match=r"a chat source reads records .* not tokens"):
        survey(DataConfig(source="tokens", paths=["x.bin"], format="chat"))


def test_a_mixture_of_chat_and_text_flags_every_row(tmp_path):
    records = [{"prompt": "question", "completion": "answer"}] * 20
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": "plain words here"}) + "\n" for _ in range(20)))
    sources = {
        "chat": {"kind": "files", "paths": [str(path)], "format": "chat"},
        "text": {"kind": "files", "paths": [str(text)]},
    }
    cfg = DataConfig(sources=sources, tokenizer="byte", chat_template=CHAT_TEMPLATE, seq_len=16, global_batch_size=4)
    mixture = Mixture(cfg, seed=0)
    rows, _ = next(mixture.batches(mixture.start_state(), 0, 1))
    assert rows.shape == (4, 2, 17)
    text_rows = [
        r for r in rows if b"plain" in bytes(r[0].astype(np.uint8)) or b"words" in bytes(r[0].astype(np.uint8))
    ]
    assert text_rows and all((r[1] & TARGET).all() for r in text_rows)  # every text token is a target


@pytest.mark.slow
def test_the_cpu_sft_recipe_learns_to_answer(pools, tmp_path):
    """recipes/sft-cpu.yaml for 60 steps: the loss on the assistant's answers falls to under a third, and the
    model, asked through the chat template, now answers with a number where the untrained one did not."""
    from conftest import REPO, read_metric, train  # noqa: PLC0415

    from curry_train.checkpoint import files  # noqa: PLC0415
    from curry_train.generate import Sampling, decode, encode, generate, load  # noqa: PLC0415

    recipe = [
        "recipe=sft-cpu",
        f"data.paths=[{REPO}/recipes/data/arithmetic-chat.jsonl]",
        f"data.chat_template={REPO}/recipes/data/chat.jinja",
        "trainer.max_steps=60",
        "trainer.val_check_interval=60",
        "checkpoint.every_n_steps=60",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
    ]
    run = train(pools, recipe, tmp_path / "run")
    losses = read_metric(run)
    assert losses[59] < losses[0] / 3, (losses[0], losses[59])
    loaded = load(files.last_checkpoint(run))
    with torch.device("meta"):
        fresh = type(loaded.model)(loaded.model.cfg)
    from curry_train.primitives.materialize import materialize_and_init  # noqa: PLC0415

    materialize_and_init(fresh, torch.device("cpu"), seed=1234)
    for prompt in ("What is 7 plus 5?", "What is 3 times 4?", "What is 15 minus 9?"):
        ids = encode(loaded, prompt)
        answer = decode(loaded, generate(loaded.model, ids, Sampling(max_new_tokens=3), loaded.stop).tokens)
        before = decode(loaded, generate(fresh.eval(), ids, Sampling(max_new_tokens=3), loaded.stop).tokens)
        assert answer[0].isdigit() and answer != before, (prompt, answer, before)


def test_curry_data_shows_chat_records(capsys, monkeypatch, tmp_path):
    """The bundled chat sample through curry-data: conversations' token lengths, and a sample row cut into
    rendered conversations (the separator not shown)."""
    from conftest import REPO  # noqa: PLC0415

    from curry_train.cli import data as data_cli  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    args = [
        "recipe=sft-cpu",
        f"data.paths=[{REPO}/recipes/data/arithmetic-chat.jsonl]",
        f"data.chat_template={REPO}/recipes/data/chat.jinja",
        "format=json",
        "seconds=1",
        "batches=5",
    ]
    assert data_cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    (source,) = report["sources"]
    assert source["documents"] == 2000 and source["document_lengths"]["p50"] > 30
    pieces = report["sample"]["documents"]
    assert any("<assistant>" in piece for piece in pieces) and not any("\x00" in piece for piece in pieces)
