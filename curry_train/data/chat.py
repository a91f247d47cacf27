"""Chat templates: a conversation rendered to text as the tokenizer directory's own Jinja template says,
the way transformers' ``apply_chat_template`` renders it (a sandboxed environment, ``trim_blocks`` and
``lstrip_blocks``, loop controls, its ``raise_exception``, ``strftime_now`` and ``tojson``, the special
tokens by name). No torch."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

from curry_train.data.sources import DataError
from curry_train.options import CHAT_ROLES

TEMPLATE_FILE = "chat_template.jinja"


def chat_template(directory: str | Path) -> Optional[str]:
    """The chat template of a Hugging Face tokenizer directory: ``chat_template.jinja``, else
    ``tokenizer_config.json``'s ``chat_template`` (its ``default`` where it lists several); None without one."""
    directory = Path(directory)
    if (directory / TEMPLATE_FILE).is_file():
        return (directory / TEMPLATE_FILE).read_text()
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def special_tokens(directory: str | Path) -> dict[str, str]:
    """The special tokens a template may name (``bos_token``, ``eos_token``, ...), from ``tokenizer_config.json``."""
    config = Path(directory) / "tokenizer_config.json"
    settings = json.loads(config.read_text()) if config.is_file() else {}
    found = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = settings.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            found[key] = value
    return found


def _raise(message: str) -> None:
    raise DataError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(template: str):
    import jinja2  # noqa: PLC0415  (jinja2 renders chat templates; imported where one is used)
    import jinja2.ext  # noqa: PLC0415
    import jinja2.nodes  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' marks of the assistant's text): rendered
        as its body; the turns to train on are found by rendering prefixes (``ChatEncoder``)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, Generation]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise DataError(f"chat template: line {error.lineno}: {error.message}") from None


def render(
    template: str, messages: Sequence[dict[str, Any]], add_generation_prompt: bool, special: dict[str, str]
) -> str:
    """``messages`` ({"role", "content"} each) as ``template`` writes them; with ``add_generation_prompt``
    the assistant's turn is opened for a model to write."""
    return compile_template(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **special
    )


# ----------------------------------------------------------------------------------------------
# Chat records as training rows

TARGET, DOCUMENT_START = 1, 2  # a token's flags: a label to train on; the first token of a document


def conversation(record: Any, where: str) -> list[dict[str, str]]:
    """A chat record's messages: its ``messages`` (OpenAI style: role and content each), or its ``prompt``
    and ``completion`` as a user's and the assistant's turn. ``DataError`` naming ``where`` otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a chat record is an object with messages, or prompt and completion")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: messages must be a non-empty list of {{role, content}}")
        found = []
        for number, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise DataError(f"{where}: message {number} has no text content")
            if message.get("role") not in CHAT_ROLES:
                raise DataError(
                    f"{where}: message {number}: unknown role {message.get('role')!r} (expected one of"
                    f" {', '.join(CHAT_ROLES)})"
                )
            found.append({"role": message["role"], "content": message["content"]})
        return found
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise DataError(f"{where}: a chat record holds messages, or prompt and completion; this one has {sorted(record)}")


class ChatEncoder:
    """A conversation -> token ids and their flags: ``TARGET`` on the tokens of the trained roles' turns
    (from the turn's text through its end-of-turn token: what the model must write), ``DOCUMENT_START``
    on the first token; the tokenizer's separator (not a target) ends it.

    A turn is found by rendering the conversation up to it: the text of ``messages[:i]`` (with the
    generation prompt, for an assistant's turn) and of ``messages[: i + 1]`` are prefixes of the whole,
    and the tokens that start between them are the turn's."""

    def __init__(self, template: str, special: dict[str, str], tokenizer, train_roles: Sequence[str]) -> None:
        self.template, self.special = compile_template(template), special
        self.tokenizer, self.train_roles = tokenizer, set(train_roles)
        self.bytes = not hasattr(tokenizer, "_tokenizer")  # the byte tokenizer: offsets in UTF-8 bytes

    def _render(self, messages: Sequence[dict[str, str]], prompt: bool) -> str:
        return self.template.render(messages=list(messages), add_generation_prompt=prompt, **self.special)

    def _size(self, text: str) -> int:
        return len(text.encode("utf-8")) if self.bytes else len(text)

    def encode(self, messages: Sequence[dict[str, str]], where: str):
        import numpy as np  # noqa: PLC0415

        text = self._render(messages, False)
        spans = []
        for number, message in enumerate(messages):
            if message["role"] not in self.train_roles:
                continue
            before = self._render(messages[:number], message["role"] == "assistant")
            after = self._render(messages[: number + 1], False)
            if not (text.startswith(after) and after.startswith(before)):
                raise DataError(
                    f"{where}: the chat template does not render the conversation's turns as prefixes of it, so"
                    " the trained turns cannot be found"
                )
            spans.append((self._size(before), self._size(after)))
        if self.bytes:
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
            starts = np.arange(len(ids))
        else:
            encoding = self.tokenizer._tokenizer.encode(text, add_special_tokens=False)
            ids = np.asarray(encoding.ids, dtype=np.int64)
            starts = np.asarray([start for start, _ in encoding.offsets], dtype=np.int64)
        flags = np.zeros(len(ids), dtype=np.int64)
        for start, end in spans:
            flags[(starts >= start) & (starts < end)] = TARGET
        separator = self.tokenizer.separator
        if separator is not None and (not len(ids) or ids[-1] != separator):
            ids, flags = np.append(ids, separator), np.append(flags, 0)
        if len(flags):
            flags[0] |= DOCUMENT_START
        return ids, flags


def template_of(spec: Optional[str], tokenizer_spec: str) -> Optional[str]:
    """The chat template a source renders with: ``data.chat_template`` (the text, or a file holding it),
    else the tokenizer directory's own; None where neither has one."""
    if spec:
        return Path(spec).read_text() if len(spec) < 4096 and Path(spec).is_file() else spec
    return chat_template(tokenizer_spec) if Path(tokenizer_spec).is_dir() else None
