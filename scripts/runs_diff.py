"""``python scripts/runs_diff.py``: the same command as curry_train/cli/runs_diff.py (installed as a console script)."""

import sys

from curry_train.cli.runs_diff import main

if __name__ == "__main__":
    sys.exit(main())
