"""``python scripts/eval.py``: the same command as curry_train/cli/eval.py (installed as ``curry-eval``)."""

import sys

from curry_train.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
