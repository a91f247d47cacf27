"""The largest model (or micro-batch) that fits each layout, and the target size to plan for.

Usage::

    python scripts/capacity_sweep.py <train.py overrides> [sweep=model|micro_batch] [layouts='dp;fsdp;...']
        [mode=auto|estimate|measure] [family=llama3|debug|moe] [start=estimate|top|bottom] [max=70B]
        [trial_timeout=1800] [format=text|json]

    python scripts/capacity_sweep.py model=llama3_8b data.seq_len=8192          # llama3 family, 8 x H100 80GB
    python scripts/capacity_sweep.py sweep=micro_batch model=llama3_8b data.seq_len=8192 data.global_batch_size=256
    python scripts/capacity_sweep.py hardware=a100_40gb hardware.nodes=2 layouts='fsdp;fsdp recompute=full'
    python scripts/capacity_sweep.py hardware=cpu hardware.gpus_per_node=1 hardware.memory_bytes=1000000000 \
        family=debug mode=measure layouts=dp                                      # real trials (minutes on 2 cores)

Overrides compose the run as for ``train.py`` (``curry_train.config.compose``); ``hardware=...`` picks
the device (conf/hardware), ``hardware.nodes`` and ``hardware.gpus_per_node`` their count. Options:

* ``sweep=model`` (default): the largest member of ``family`` (default ``llama3``, ``moe`` for a
  mixture-of-experts run: the llama3 ladder with the run's experts, each as wide relative to ``dim``
  as the run's; ``debug``: tiny, for CPUs) that fits, at the run's micro-batch; ``sweep=micro_batch``:
  the largest power-of-two micro-batch (up to ``data.global_batch_size / dp``) that fits the run's model.
* ``layouts``: ``;``-separated items, each ``parallel`` options joined by ``+`` then overrides, where
  ``tp.size=4`` stands for ``parallel.tp.size=4`` (so do ``fsdp.*``, ``pp.*``, ``cp.*``, ``recompute``).
  Default: DDP; ZeRO-1; ZeRO-2; ZeRO-3; ZeRO-3 with selective, then full recompute; ZeRO-3 with tensor
  parallelism over a node (and a pipeline over the nodes when there are several). The compute dtype is
  ``hardware.mixed_precision`` unless the run or the item names one.
* ``mode=estimate``: by ``curry_train.planning.advise.estimate``; ``mode=measure``: one training process per
  trial on this machine, out-of-memory failures recorded and the search continued below them (GPU,
  or ``hardware=cpu`` for CPU processes); ``mode=auto`` (default): measure on a GPU machine when
  ``hardware`` is a GPU, estimate elsewhere. A progress line per trial goes to stderr.
* ``start``: measure mode's first trial: the estimate's answer (default), the ``top`` or the ``bottom``.
* ``max``: leave out candidates larger than this (parameters, e.g. ``70B``, or a micro-batch).
* ``format=json``: one JSON object (rows, recommendation, command) instead of the table.

Prints one row per layout (the largest size that fits, its per-rank memory against the capacity,
the next size up and why it does not fit), then the recommended target size -- the largest any
layout fits, under the lightest layout that fits it (dp -> ZeRO-1/2/3 -> recompute -> tp -> pp ->
cp) -- and its ``python train.py ...`` command. Exits 0 with a recommendation, 1 when nothing fits,
2 on a bad option. See docs/planning.md for the families and how trials are measured.
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from curry_train.cli.common import error_line, fail, is_config_error
from curry_train.planning.layout import PlanningError

FORMATS = ("text", "json")

OPTIONS = ("sweep", "layouts", "mode", "family", "start", "max", "trial_timeout", "format")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    options: dict[str, str] = {}
    overrides = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key in OPTIONS:
            options[key] = value
        else:
            overrides.append(arg)
    try:
        fmt = options.get("format", "text")
        if fmt not in FORMATS:
            raise PlanningError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")
        try:
            timeout = float(options.get("trial_timeout", "1800"))
        except ValueError:
            raise PlanningError(f"trial_timeout={options['trial_timeout']!r}: expected seconds") from None
        # torch loads here (the planning arithmetic builds meta-device models), after the options parsed
        from curry_train.planning.capacity import parse_count, run_sweep  # noqa: PLC0415

        result = run_sweep(
            overrides,
            sweep=options.get("sweep", "model"),
            layouts=options.get("layouts"),
            mode=options.get("mode", "auto"),
            family_name=options.get("family"),
            start=options.get("start", "estimate"),
            largest=parse_count(options["max"]) if "max" in options else None,
            trial_timeout=timeout,
        )
    except Exception as error:  # ours (PlanningError), or Hydra's: a misspelt key, a missing option
        if not is_config_error(error):
            raise
        return fail("capacity_sweep", error_line(error))
    print(json.dumps(result.to_dict()) if fmt == "json" else result.table())
    return 0 if result.recommended is not None else 1


if __name__ == "__main__":
    sys.exit(main())
