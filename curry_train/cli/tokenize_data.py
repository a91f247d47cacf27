"""Tokenize text once into a token file for ``data.source=tokens``.

    python scripts/tokenize_data.py INPUT [INPUT ...] --output OUT.bin [--tokenizer byte|PATH/tokenizer.json|HF_DIR]
                                    [--text-key text] [--quiet]

An INPUT is a file (``.jsonl``: one document per record, the ``--text-key`` field; any other file:
one document) or a directory, searched recursively for ``*.txt``, ``*.jsonl``, ``*.md`` and ``*.py``
files in sorted order. Documents are tokenized one at a time and appended to OUT.bin, each followed
by the tokenizer's separator token (a Hugging Face model directory: with its BOS and EOS, as
``data.source=files`` reads it), in the smallest unsigned dtype that holds the vocabulary; the
sidecar OUT.json records dtype, length, vocabulary and tokenizer. The tokens are exactly those that
``data.source=files`` would produce from the same inputs. Train on them with
``data.source=tokens data.paths=[OUT.bin]``. Exits with 2 on a usage error.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from tqdm import tqdm

from curry_train.data.sources import (
    DataError,
    TokenFileMeta,
    is_tokenizer,
    iter_documents,
    make_tokenizer,
    tokenize_documents,
)

DIRECTORY_SUFFIXES = (".txt", ".jsonl", ".md", ".py")


class UsageError(ValueError):
    """An argument or input that cannot be tokenized; the message is printed as one line."""


def collect_inputs(inputs: Sequence[str]) -> List[Path]:
    """The files to tokenize, in order: files as given, each directory's matching files sorted."""
    files: List[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in DIRECTORY_SUFFIXES and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{name}: no such file or directory")
    if not files:
        patterns = ", ".join("*" + suffix for suffix in DIRECTORY_SUFFIXES)
        raise UsageError(f"no input files (directories are searched for {patterns})")
    return files


def check_arguments(args: argparse.Namespace) -> List[Path]:
    """Everything that can be checked without loading a tokenizer, so that a typo fails at once."""
    if Path(args.output).suffix != ".bin":
        raise UsageError(f"--output {args.output}: a token file must end in .bin (its sidecar is the .json beside it)")
    if args.tokenizer == "auto" or not is_tokenizer(args.tokenizer):
        raise UsageError(
            f"--tokenizer {args.tokenizer}: no such file (expected 'byte', a tokenizer.json or a Hugging Face model"
            " directory holding one)"
        )
    return collect_inputs(args.inputs)


def tokenize_to_file(files: Sequence[Path], output: Path, tokenizer_spec: str, text_key: str, quiet: bool) -> int:
    """Stream the documents of ``files`` into ``output`` and its sidecar; returns the token count.

    Tokens go to a ``.partial`` file renamed into place at the end, so an interrupted or failed run
    never leaves a token file that disagrees with its sidecar.
    """
    # Imported here: curry_train.data pulls in Lightning, seconds of start-up a usage error need not wait for.

    try:
        tokenizer = make_tokenizer(tokenizer_spec)
    except ImportError as error:
        raise UsageError(f"--tokenizer {tokenizer_spec}: {error}") from error
    except Exception as error:  # tokenizers reports an unreadable tokenizer.json as a bare Exception
        raise UsageError(f"--tokenizer {tokenizer_spec}: cannot load it: {error}") from error
    # The dtype tokenize_documents gives this vocabulary, so the file reads back as the in-memory stream.
    dtype = tokenize_documents((), tokenizer).dtype

    sizes = [path.stat().st_size for path in files]
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    num_tokens = 0
    try:
        with partial.open("wb") as sink, tqdm(total=sum(sizes), unit="B", unit_scale=True, disable=quiet) as bar:
            for path, size in zip(files, sizes, strict=False):
                counted = 0
                try:
                    for document in iter_documents([path], text_key):
                        tokens = tokenize_documents([document], tokenizer)
                        sink.write(tokens.tobytes())
                        num_tokens += len(tokens)
                        # Characters or bytes of the document: never more than the bytes it takes in the file.
                        bar.update(len(document))
                        counted += len(document)
                except DataError as error:  # not text, malformed JSON: the message names the file and line
                    raise UsageError(str(error)) from error
                bar.update(size - counted)
        if num_tokens == 0:
            raise UsageError("the inputs hold no documents (an empty token file cannot be memory-mapped)")
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    TokenFileMeta(
        dtype=dtype.name,
        num_tokens=num_tokens,
        vocab_size=tokenizer.vocab_size,
        tokenizer=tokenizer.name,
        separator=tokenizer.separator,
    ).write(output)
    return num_tokens


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="text/JSONL files or directories")
    parser.add_argument("--output", required=True, metavar="OUT.bin", help="token file to write (and OUT.json)")
    parser.add_argument(
        "--tokenizer", default="byte", help="'byte' (default), a tokenizer.json, or a Hugging Face model directory"
    )
    parser.add_argument("--text-key", default="text", help="field of JSONL records holding the text (default text)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    args = parser.parse_args(argv)
    try:
        files = check_arguments(args)
        num_tokens = tokenize_to_file(files, Path(args.output), args.tokenizer, args.text_key, args.quiet)
    except UsageError as error:
        print(f"tokenize_data: error: {error}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"{num_tokens} tokens from {len(files)} files -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
