"""Text from a checkpoint or a Hugging Face model directory.

Usage::

    curry-generate SOURCE [PROMPT ...] [--file PATH | -] [--max-new-tokens N] [--temperature T]
                   [--top-k K] [--top-p P] [--seed S] [--no-chat] [--device cpu|cuda]
    python scripts/generate.py outputs/2026-12-06/10-00-00/checkpoints/step-00000120 "def main("
    echo "What is a mixture of experts?" | curry-generate /models/qwen3-0.6b -

SOURCE: a curry-train checkpoint directory (its run's tokenizer) or a Hugging Face model directory (its
tokenizer and chat template). Prompts: the arguments, the lines of ``--file``, or standard input (``-``).
A chat model's prompt is the user's turn through its chat template (``--no-chat``: the text as it is).
Greedy by default (``--temperature 0``); each completion is printed, and its tokens/s on stderr.
One process; ``--tp N`` splits the model over N local processes (tensor parallel: heads, MLP and
vocabulary; one GPU each where there are GPUs) for a model that does not fit one device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from curry_train.cli.common import fail

PROG = "curry-generate"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a curry-train checkpoint directory or a Hugging Face model directory")
    p.add_argument("prompts", nargs="*", help="prompts; '-' reads them from standard input, one a line")
    p.add_argument("--file", type=Path, help="a file of prompts, one a line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tp", type=int, default=1, help="split the model over this many local processes (tensor parallel)")
    return p


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as every command
        raise SystemExit(fail(PROG, message))


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = [p for p in args.prompts if p != "-"]
    if "-" in args.prompts:
        prompts += [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.file is not None:
        prompts += [line.rstrip("\n") for line in args.file.read_text().splitlines() if line.strip()]
    return prompts


def main(argv: Optional[Sequence[str]] = None) -> int:
    base = parser()
    p = _Parser(prog=PROG, description=base.description, formatter_class=base.formatter_class)
    for action in base._actions[1:]:  # the same arguments, with the one-line error
        p._add_action(action)
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as stopped:  # --help (0), or a usage error already printed in one line (2)
        return int(stopped.code or 0)
    source = Path(args.source)
    if not source.is_dir():
        return fail(PROG, f"{source}: no such directory (a checkpoint or a Hugging Face model directory)")
    if args.file is not None and not args.file.is_file():
        return fail(PROG, f"--file {args.file}: no such file")
    # torch loads here, after the arguments are known to be good
    from curry_train.generate import Sampling, decode, encode, generate, generate_tensor_parallel, load  # noqa: PLC0415

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    problem = sampling.check()
    if problem is not None:
        return fail(PROG, problem)
    if args.tp < 1:
        return fail(PROG, f"--tp {args.tp}: at least 1")
    prompts = _prompts(args)
    if not prompts:
        return fail(PROG, "no prompt: give prompts as arguments, --file PATH, or '-' for standard input")
    try:
        import torch  # noqa: PLC0415

        loaded = load(source, torch.device(args.device), weights=args.tp == 1)
    except (ValueError, OSError) as error:  # not a model, or a damaged one: one line
        return fail(PROG, str(error).splitlines()[0])
    encoded = [encode(loaded, prompt, chat=not args.no_chat) for prompt in prompts]
    try:
        if args.tp > 1:  # the tokenizer and template from the one-process load; the weights split over tp
            results = generate_tensor_parallel(source, encoded, sampling, args.tp, loaded.stop)
        else:
            results = [generate(loaded.model, ids, sampling, loaded.stop) for ids in encoded]
    except ValueError as error:
        return fail(PROG, str(error).splitlines()[0])
    for result in results:
        print(decode(loaded, result.tokens), flush=True)
        print(
            f"{PROG}: {len(result.prompt)} prompt + {len(result.tokens)} new tokens,"
            f" {result.tokens_per_s:,.1f} tokens/s",
            file=sys.stderr,
        )
    return 0
