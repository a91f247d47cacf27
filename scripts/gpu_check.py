"""``python scripts/gpu_check.py``: the same command as curry_train/cli/gpu_check.py (installed as a console script)."""

import sys

from curry_train.cli.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
