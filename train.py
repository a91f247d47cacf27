"""``python train.py [overrides]``: the same command as ``curry-train`` (curry_train/cli/train.py)."""

from curry_train.cli.train import main

if __name__ == "__main__":
    main()
