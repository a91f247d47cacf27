"""Whitebox check of a layout against the single-process fp32 reference.

    python scripts/validate.py parallel=dp trainer.devices=2 [--steps K] [--rtol R] [--grad-rtol G]

Arguments without a leading ``--`` are Hydra overrides, exactly as for ``train.py``. Prints one row
per compared quantity (loss, gradient norm, every parameter's gradient, at every step) and exits
with 1 on a mismatch, 2 on a configuration error.
"""

import argparse
import sys
from typing import Optional, Sequence

from curry_train.cli.common import error_line, fail, is_config_error
from curry_train.config import compose
from curry_train.config.checks import check


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps to compare (default 1)")
    parser.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance of loss and grad norm")
    parser.add_argument("--grad-rtol", type=float, default=1e-5, help="relative tolerance of each gradient")
    parser.add_argument("--failures-only", action="store_true", help="print only the rows out of tolerance")
    args = parser.parse_args(argv)
    try:
        check(compose(args.overrides))  # a config that cannot run is one line before torch loads
        # torch and Lightning load here, for a config that passed its check
        from curry_train.validation.whitebox import validate  # noqa: PLC0415

        report = validate(args.overrides, steps=args.steps, rtol=args.rtol, grad_rtol=args.grad_rtol)
    except Exception as error:
        if not is_config_error(error):
            raise
        return fail("curry-validate", error_line(error))
    print(report.table(only_failures=args.failures_only))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
