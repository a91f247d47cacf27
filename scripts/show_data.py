"""``python scripts/show_data.py``: the same command as curry_train/cli/data.py (installed as ``curry-data``)."""

import sys

from curry_train.cli.data import main

if __name__ == "__main__":
    sys.exit(main())
