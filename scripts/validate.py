"""``python scripts/validate.py``: the same command as curry_train/cli/validate.py (installed as a console script)."""

import sys

from curry_train.cli.validate import main

if __name__ == "__main__":
    sys.exit(main())
