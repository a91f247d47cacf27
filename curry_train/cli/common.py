"""What every command shares: a bad argument is one line on stderr and exit status 2."""

from __future__ import annotations

import re
import sys

from curry_train.config import ConfigError
from curry_train.exits import EXIT_BAD_INPUT


def is_config_error(error: BaseException) -> bool:
    """A configuration the user can fix: ours, or Hydra's and OmegaConf's composition errors."""
    return isinstance(error, ConfigError) or type(error).__module__.split(".")[0] in ("hydra", "omegaconf")


def error_line(error: BaseException) -> str:
    """One line for a configuration error: Hydra's first line, what caused it, the options it lists."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        text += f": {str(cause).strip().splitlines()[0]}"
    options = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)+)", str(error))
    if options:
        text += f" (available: {', '.join(option.strip() for option in options.group(1).split())})"
    return text


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
