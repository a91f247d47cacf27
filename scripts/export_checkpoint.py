"""``python scripts/export_checkpoint.py``: the same command as curry_train/cli/export.py
(installed as a console script)."""

import sys

from curry_train.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
