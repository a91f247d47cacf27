#!/usr/bin/env python
"""Whitebox check of a layout against the single-process fp32 reference.

    python scripts/validate.py parallel=dp trainer.devices=2 [--steps K] [--rtol R] [--grad-rtol G]

Arguments without a leading ``--`` are Hydra overrides, exactly as for ``train.py``. Prints one row
per compared quantity (loss, gradient norm, every parameter's gradient, at every step) and exits
with 1 on a mismatch, 2 on a configuration error.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curry_train.config import ConfigError  # noqa: E402
from curry_train.validation.whitebox import validate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps to compare (default 1)")
    parser.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance of loss and grad norm")
    parser.add_argument("--grad-rtol", type=float, default=1e-5, help="relative tolerance of each gradient")
    parser.add_argument("--failures-only", action="store_true", help="print only the rows out of tolerance")
    args = parser.parse_args()
    try:
        report = validate(args.overrides, steps=args.steps, rtol=args.rtol, grad_rtol=args.grad_rtol)
    except ConfigError as error:
        print(f"curry-train: error: {error}", file=sys.stderr)
        return 2
    print(report.table(only_failures=args.failures_only))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
