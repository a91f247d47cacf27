"""``python scripts/capacity_sweep.py``: the same command as curry_train/cli/capacity.py
(installed as a console script)."""

import sys

from curry_train.cli.capacity import main

if __name__ == "__main__":
    sys.exit(main())
