"""``python scripts/bench.py``: the same command as curry_train/cli/bench.py (installed as a console script)."""

import sys

from curry_train.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
