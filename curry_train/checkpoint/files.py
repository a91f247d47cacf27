"""Finding and verifying checkpoints on disk or in object storage (no torch: a run's ``ckpt_path`` is
resolved before torch is imported). What a checkpoint holds and how it is written: ``dcp.py``.

A location is a local path or an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file://...``):
``place`` makes either a path object with the same methods (``universal_pathlib``'s ``UPath`` over fsspec
for a URL), so every function here takes both. Credentials come from the environment, as the storage
library reads them (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

META_FILE = "meta.pt"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
LINEAGE_FILE = "lineage.json"  # the checkpoint the saving run resumed from (``ckpt_path=last`` follows it)
MANIFEST_FORMAT = 1
DCP_METADATA = ".metadata"
TMP_SUFFIX = ".tmp"
DIGEST_CHUNK = 8 << 20
NAME_PATTERN = re.compile(r"^step-(\d+)$")


def is_url(location: Any) -> bool:
    """An fsspec URL (``s3://...``), not a local path."""
    return "://" in str(location)


def place(location: Any) -> Any:
    """The path object of a local path (``Path``) or of a URL (``UPath``: the same methods, over fsspec)."""
    if isinstance(location, Path) or not is_url(location):
        return Path(location)
    from upath import UPath  # noqa: PLC0415  (fsspec loads only for a URL)

    if isinstance(location, UPath):  # derived from one made here: its listings are this call's own
        return location
    path = UPath(str(location))
    path.fs.invalidate_cache()  # another process (a rank, a run) may have written since this one listed
    return path


def on_disk(path: Any) -> bool:
    """A local path, or a ``file://`` URL: a file system with directories."""
    return not is_url(path) or getattr(path, "protocol", "") in ("file", "local")


def remove_tree(path: Any) -> None:
    """Delete a directory and everything in it, local or remote; nothing if it is not there."""
    if isinstance(path, Path) and not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.fs.rm(path.path, recursive=True)


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing ancestor: the file system a write into ``path`` goes to."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def absolute(location: Any) -> Any:
    """A local path resolved, a URL as it is."""
    path = place(location)
    return path if is_url(path) else path.expanduser().resolve()


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: str | Path) -> int:
    """The step in a checkpoint directory's name, ``step-NNNNNNNN``."""
    return int(NAME_PATTERN.match(place(path).name).group(1))


def resumed_from(checkpoint: Path) -> Optional[str]:
    """The checkpoint the run of ``checkpoint`` resumed from, as it recorded (``LINEAGE_FILE``)."""
    try:
        source = json.loads((place(checkpoint) / LINEAGE_FILE).read_text()).get("resumed_from")
    except (OSError, ValueError, AttributeError):
        return None
    return str(source) if source else None


def lineage(resumed: Optional[tuple[Path, Optional[str]]], saving: Path) -> Optional[str]:
    """What a checkpoint saved at ``saving`` records its run continues: the checkpoint it resumed from
    (``resumed``: its path and what that one continued) when another run saved it; when its own run did
    (a rerun in place), what that one continued."""
    if resumed is None:
        return None
    path, before = resumed
    return before if str(path.parent) == str(absolute(saving).parent) else str(path)


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: incomplete, altered, or not of this format; names the file."""


def is_checkpoint(path: str | Path) -> bool:
    """Complete: its manifest, written last, is there (``verify`` checks the files against it)."""
    path = place(path)
    return (path / MANIFEST_FILE).is_file() and (path / DCP_METADATA).is_file()


def digest(path: Path) -> str:
    """BLAKE2b of a file's bytes (hashlib releases the GIL: files hash in parallel threads)."""
    blake = hashlib.blake2b()
    with path.open("rb") as handle:
        while chunk := handle.read(DIGEST_CHUNK):
            blake.update(chunk)
    return blake.hexdigest()


def describe_files(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Each file's size and digest, by name (what a manifest lists)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(digest, paths))
    return {p.name: {"size": p.stat().st_size, "blake2b": d} for p, d in zip(paths, digests, strict=True)}


def verify(path: str | Path, digests: bool = True) -> Optional[str]:
    """What is wrong with the checkpoint at ``path`` (None: nothing): no manifest (an interrupted
    save), a listed file missing or of another size, or (``digests``) another digest."""
    path = place(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return f"{path}: incomplete (no {MANIFEST_FILE}: its save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest_path}: not a readable manifest"
    listed = [path / name for name in sorted(files)]
    for file in listed:
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size != files[file.name]["size"]:
            return f"{file}: {file.stat().st_size} bytes, the manifest says {files[file.name]['size']}"
    if digests:
        for name, described in describe_files(listed).items():
            if described["blake2b"] != files[name]["blake2b"]:
                return f"{path / name}: its contents differ from when it was saved (digest mismatch)"
    return None


def saved_config(path: str | Path) -> Optional[dict[str, Any]]:
    """The config a checkpoint's run was saved with (None: saved without one)."""
    file = place(path) / CONFIG_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def remove_interrupted(directory: str | Path) -> list[Path]:
    """Delete what saves that never finished left; return it: the temporary directories on a local disk,
    the checkpoint directories without a manifest in object storage (written in place there)."""
    directory = place(directory)
    if not directory.is_dir():
        return []
    if is_url(directory):
        debris = [p for p in directory.iterdir() if NAME_PATTERN.match(p.name) and not (p / MANIFEST_FILE).is_file()]
    else:
        debris = [p for p in directory.glob("*" + TMP_SUFFIX) if p.is_dir()]
    for path in debris:
        remove_tree(path)
    return debris


def checkpoints_in(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest step first."""
    directory = place(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if NAME_PATTERN.match(p.name) and is_checkpoint(p)]
    return sorted(found, key=lambda p: int(NAME_PATTERN.match(p.name).group(1)))


def checkpoint_dir(run_dir: str | Path, configured: Optional[str] = None) -> Any:
    """Where a run saves its checkpoints: ``checkpoint.dir`` (a path or a URL), else ``<run_dir>/checkpoints``."""
    return absolute(configured) if configured else Path(run_dir) / "checkpoints"


def last_checkpoint(run_dir: str | Path, configured: Optional[str] = None) -> Optional[Path]:
    """The newest complete checkpoint of the run directory ``run_dir`` (None: it has none)."""
    kept = checkpoints_in(checkpoint_dir(run_dir, configured))
    return kept[-1] if kept else None


def prune(directory: str | Path, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints and those whose step is a multiple of
    ``keep_every`` (0: none kept for that); return what was deleted. Incomplete ones are not touched."""
    doomed = [p for p in checkpoints_in(directory)[:-keep_last] if not (keep_every and step_of(p) % keep_every == 0)]
    for path in doomed:
        remove_tree(path)
    return doomed


def latest_checkpoint(search_dir: str | Path) -> Optional[Path]:
    """The most recently written complete checkpoint anywhere below ``search_dir``."""
    search_dir = Path(search_dir)
    if not search_dir.is_dir():
        return None
    candidates = [
        p.parent
        for p in search_dir.rglob(MANIFEST_FILE)
        if NAME_PATTERN.match(p.parent.name) and is_checkpoint(p.parent)
    ]
    return max(candidates, key=lambda p: (p / MANIFEST_FILE).stat().st_mtime, default=None)
