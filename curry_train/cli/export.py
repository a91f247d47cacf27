"""Export the model weights of a distributed checkpoint: one safetensors file, or a Hugging Face directory.

    python scripts/export_checkpoint.py outputs/<run>/checkpoints/step-00000120 --output model.safetensors \\
        [--dtype bf16]
    python scripts/export_checkpoint.py outputs/<run>/checkpoints/step-00000120 --format hf --output DIR \\
        [--dtype bf16] [--max-shard-size 5GB]   (default dtype: model.init_from's, else fp32)

Runs in one process, whatever layout and world size wrote the checkpoint: torch.distributed.checkpoint
reassembles each parameter from its shards. Optimizer state is left out.

* ``--format safetensors`` (default): one file, names of the bare model (``layers.0.attention.wq.weight``),
  loadable into ``curry_train.model.Llama`` with ``load_state_dict``.
* ``--format hf``: ``config.json``, safetensors shards of at most ``--max-shard-size`` with
  ``model.safetensors.index.json``, and the tokenizer files the run trained with, a directory that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads (Llama, Qwen3, Mixtral or Qwen3-MoE, by the
  model's shape) and ``model.init_from`` reads back. A LoRA run's adapters are merged into their weights.
* ``--format peft``: a LoRA run's adapters alone, as a PEFT adapter directory (``adapter_config.json``,
  ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads onto the base model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from curry_train.checkpoint.files import CheckpointError, existing_ancestor, verify
from curry_train.checkpoint.hf_config import PretrainedError
from curry_train.exits import EXIT_BAD_INPUT
from curry_train.options import EXPORT_DTYPES

FORMATS = ("safetensors", "hf", "peft")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def byte_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB``, ``1000000``: a positive number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text, re.IGNORECASE)
    size = int(float(match.group(1)) * UNITS[(match.group(2) or "").upper()]) if match else 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return size


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (…/checkpoints/step-NNNNNNNN)")
    parser.add_argument("--output", type=Path, required=True, help="the .safetensors file (hf: directory) to write")
    parser.add_argument(
        "--format", choices=FORMATS, default="safetensors", help="one file, a HF directory, or LoRA adapters for PEFT"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(EXPORT_DTYPES),
        help="dtype of the exported weights (default fp32; hf: model.init_from's dtype, else fp32)",
    )
    parser.add_argument("--max-shard-size", type=byte_size, default="5GB", help="hf: the largest safetensors file")
    args = parser.parse_args(argv)
    problem = verify(args.checkpoint)
    if problem is not None:
        print(
            f"export_checkpoint: error: {args.checkpoint} is not a complete curry-train checkpoint: {problem}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    unwritable = output_problem(args.output, directory=args.format != "safetensors")
    if unwritable is not None:
        print(f"export_checkpoint: error: --output {args.output}: {unwritable}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return _export(args)
    except CheckpointError as error:  # e.g. a .metadata that would run code
        print(f"export_checkpoint: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # the disk filled, or the output vanished, while writing
        print(f"export_checkpoint: error: writing {args.output}: {error.strerror or error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def output_problem(output: Path, directory: bool) -> Optional[str]:
    """Why ``output`` cannot be written (None: it can): its nearest existing folder is not one, or not
    writable; a file where a directory is wanted or the other way round."""
    if output.exists() and output.is_dir() != directory:
        wanted, found = ("directory", "a file") if directory else ("file", "a directory")
        return f"exists and is {found}; this format writes a {wanted}"
    parent = existing_ancestor(output if directory and output.exists() else output.parent)
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable by this user"
    return None


def _export(args: argparse.Namespace) -> int:
    # torch loads here, for a checkpoint that passed its check
    from safetensors.torch import save_file  # noqa: PLC0415

    from curry_train.checkpoint.dcp import consolidated_model_state  # noqa: PLC0415
    from curry_train.checkpoint.hf_export import DTYPES, export_checkpoint, export_peft  # noqa: PLC0415
    from curry_train.checkpoint.model import checkpoint_model_config, checkpoint_state  # noqa: PLC0415

    if args.format == "peft":
        cfg = checkpoint_model_config(args.checkpoint)
        if cfg.lora is None:
            print(
                f"export_checkpoint: error: --format peft: {args.checkpoint}'s run trained no LoRA adapters"
                " (model.lora is null); export the whole model with --format hf",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        out = export_peft(checkpoint_state(args.checkpoint), cfg, args.output, DTYPES[args.dtype or "fp32"])
        print(f"wrote {out}: adapter_config.json, adapter_model.safetensors (LoRA rank {cfg.lora.rank})")
        return 0

    if args.format == "hf":
        try:
            written = export_checkpoint(args.checkpoint, args.output, args.dtype, args.max_shard_size)
        except PretrainedError as error:
            print(f"export_checkpoint: error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        dtype = json.loads((args.output / "config.json").read_text())["torch_dtype"]
        print(f"wrote {args.output}: config.json, {len(written)} safetensors file(s), {dtype}")
        return 0

    args.dtype = args.dtype or "fp32"
    state = {
        name: tensor.to(DTYPES[args.dtype]).contiguous()
        for name, tensor in consolidated_model_state(args.checkpoint).items()
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.output), metadata={"source": str(args.checkpoint.resolve()), "format": "pt"})
    total = sum(t.numel() for t in state.values())
    print(f"wrote {args.output}: {len(state)} tensors, {total:,} parameters, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
