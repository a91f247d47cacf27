"""Export the model weights of a distributed checkpoint to one consolidated safetensors file.

    python scripts/export_checkpoint.py outputs/<run>/checkpoints/step-00000120 --output model.safetensors \
        [--dtype bf16]

Runs in one process, whatever layout and world size wrote the checkpoint: torch.distributed.checkpoint
reassembles each parameter from its shards. Names are the bare model's (``layers.0.attention.wq.weight``),
so the file loads into ``curry_train.model.Llama`` with ``load_state_dict``. Optimizer state is left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from curry_train.primitives.dcp import verify

MODEL_PREFIX = "model.model."  # the LightningModule's `model` attribute, then the state dict's "model" entry
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def consolidated_model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of ``checkpoint``, by their names in the bare model."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    state = {
        key: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(item, TensorStorageMetadata)
    }
    if not state:
        raise ValueError(f"{checkpoint}: no model tensors under {MODEL_PREFIX!r}")
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return {key[len(MODEL_PREFIX) :]: tensor for key, tensor in state.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (…/checkpoints/step-NNNNNNNN)")
    parser.add_argument("--output", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the exported weights")
    args = parser.parse_args(argv)
    problem = verify(args.checkpoint)
    if problem is not None:
        print(
            f"export_checkpoint: error: {args.checkpoint} is not a complete curry-train checkpoint: {problem}",
            file=sys.stderr,
        )
        return 2

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
