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
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
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
