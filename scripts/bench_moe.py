"""``python scripts/bench_moe.py``: the same command as curry_train/cli/bench_moe.py (installed as a console script)."""

import sys

from curry_train.cli.bench_moe import main

if __name__ == "__main__":
    sys.exit(main())
