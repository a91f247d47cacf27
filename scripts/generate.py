"""``python scripts/generate.py``: the same command as curry_train/cli/generate.py (installed as ``curry-generate``)."""

import sys

from curry_train.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
