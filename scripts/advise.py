"""``python scripts/advise.py``: the same command as curry_train/cli/advise.py (installed as a console script)."""

import sys

from curry_train.cli.advise import main

if __name__ == "__main__":
    sys.exit(main())
