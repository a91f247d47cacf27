"""Dataset loader for the tiny local lm-eval tasks in this directory (used through ``custom_dataset: !function``).

``datasets.load_dataset("json", data_files=...)`` resolves a relative ``data_files`` path against the current working
directory, not the task YAML, so the YAMLs here name their JSONL files relative to this directory and this loader
resolves them. lm-eval 0.4.13 calls it as ``custom_dataset(**metadata, **dataset_kwargs)`` (lm_eval/api/task.py,
``ConfigurableTask.download``); ``metadata`` carries ``version``, ``config_source`` (the YAML's path) and whatever the
TaskManager was given, so extra keyword arguments are accepted and ignored. Nothing is downloaded or cached.
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_local_jsonl(data_files, **_metadata):
    """``data_files``: ``{split: path}``, a path relative to this directory or absolute. Returns a DatasetDict."""
    splits = {}
    for split, name in data_files.items():
        path = Path(name).expanduser()
        if not path.is_absolute():
            path = HERE / path
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
