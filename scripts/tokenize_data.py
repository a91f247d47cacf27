"""``python scripts/tokenize_data.py``: the same command as curry_train/cli/tokenize_data.py
(installed as a console script)."""

import sys

from curry_train.cli.tokenize_data import main

if __name__ == "__main__":
    sys.exit(main())
