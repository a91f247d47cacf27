"""Evaluate a checkpoint or a Hugging Face model: named held-out sets and lm-evaluation-harness tasks.

usage::

    curry-eval SOURCE [tasks=T1,T2] [include_path=DIR] [limit=N] [num_fewshot=K] [--output FILE] [OVERRIDE ...]
    curry-eval outputs/2026-12-06/10-00-00/checkpoints/step-00000120
    curry-eval /models/llama3-8b tasks=hellaswag,arc_easy parallel=fsdp trainer.devices=8
    curry-eval CKPT tasks=my_task include_path=eval_tasks/ 'eval.sets={wiki: {kind: files, paths: [wiki.txt]}}'

SOURCE: a curry-train checkpoint (its run's model, tokenizer, batch and eval settings: a bare
``curry-eval CKPT`` evaluates what its run evaluated) or a Hugging Face model directory. ``tasks=``,
``include_path=``, ``limit=`` and ``num_fewshot=`` set ``eval.harness.*``; any other ``key=value`` is a
training override (``parallel=tp trainer.devices=2``: the model split as in training, over local
processes). Prints one line per metric (``eval/<set>/loss``, ``eval/<task>/<metric>``), and writes them as
JSON to ``--output``. Tasks need ``pip install 'curry-train[eval]'``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from curry_train.cli.common import error_line, fail, is_config_error

PROG = "curry-eval"
SHORTHANDS = {"tasks": "eval.harness.tasks", "include_path": "eval.harness.include_path"}
SHORTHANDS.update({key: f"eval.harness.{key}" for key in ("limit", "num_fewshot")})


def _overrides(arguments: Sequence[str]) -> list[str]:
    out = []
    for argument in arguments:
        key, sep, value = argument.partition("=")
        if sep and key in SHORTHANDS:
            if key == "tasks":
                value = "[" + ",".join(task.strip() for task in value.strip("[]").split(",") if task.strip()) + "]"
            out.append(f"{SHORTHANDS[key]}={value}")
        else:
            out.append(argument)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    output: Optional[Path] = None
    if "--output" in args:
        at = args.index("--output")
        if at + 1 >= len(args):
            return fail(PROG, "--output needs a file")
        output = Path(args[at + 1])
        del args[at : at + 2]
    source, rest = Path(args[0]), args[1:]
    if not source.is_dir():
        return fail(PROG, f"{source}: no such directory (a checkpoint or a Hugging Face model directory)")
    unknown = [a for a in rest if "=" not in a]
    if unknown:
        return fail(PROG, f"{unknown[0]!r}: expected key=value (tasks=..., parallel=..., trainer.devices=N)")
    from curry_train.checkpoint.files import verify  # noqa: PLC0415
    from curry_train.config.checks import check_evaluation  # noqa: PLC0415
    from curry_train.evaluate import eval_config, is_checkpoint  # noqa: PLC0415

    if is_checkpoint(source):
        problem = verify(source)
        if problem is not None:
            return fail(PROG, f"{source} is not a complete curry-train checkpoint: {problem}")
    elif not (source / "config.json").is_file():
        return fail(PROG, f"{source}: neither a curry-train checkpoint nor a Hugging Face model directory")
    try:
        cfg = eval_config(source, _overrides(rest))
        plan = check_evaluation(cfg)
    except Exception as error:  # noqa: BLE001
        if is_config_error(error):
            return fail(PROG, error_line(error))
        raise
    if not (cfg.eval.sets or cfg.eval.harness.tasks):
        return fail(PROG, "nothing to evaluate: name tasks=... or eval.sets (the checkpoint's run named none)")
    # torch loads here, for a source and settings that passed their checks
    from curry_train.evaluate import evaluate  # noqa: PLC0415

    metrics = evaluate(cfg, plan.dims, plan.accelerator, source if is_checkpoint(source) else None)
    for key, value in metrics.items():
        print(f"{key}\t{value:.6g}")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"source": str(source), "metrics": metrics}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
