"""Which layout to run, by arithmetic: the lightest that fits the hardware, and why.

Usage::

    curry-advise <train.py overrides> [symptom=oom|slow] [format=text|json] [plot=PATH]
    python scripts/advise.py model=llama3_8b data.seq_len=8192
    python scripts/advise.py model=llama3_70b hardware=h100_80gb hardware.nodes=4 plot=memory.png

Composes the config as ``train.py`` would (``hardware=...`` picks the machines, ``hardware.nodes``,
``hardware.gpus_per_node`` their count; ``trainer.num_nodes`` and ``trainer.devices``, where given, set those
two), walks the decision guide (curry_train/planning/advise.py) and prints
the lightest layout that fits with headroom, why each heavier primitive is or is not needed, and the
``python train.py ...`` command. ``symptom=oom|slow``: the primitive to add next to the current config.
``plot=PATH``: a PNG chart of the per-rank memory of each candidate tried (or of the current and next
layout, with a symptom), by part, against the device's capacity.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from curry_train.cli.common import error_line, fail, is_config_error
from curry_train.config import compose
from curry_train.config.checks import apply_init_from


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    try:
        return _advise(argv)
    except Exception as error:
        if not is_config_error(error):
            raise
        return fail("advise", error_line(error))


def _advise(argv: list[str]) -> int:
    options = {"symptom": None, "format": "text", "plot": None}
    overrides = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in options:
            options[key] = value
        else:
            overrides.append(arg)
    if options["format"] not in ("text", "json"):
        return fail("advise", f"format={options['format']}: expected text or json")
    if options["symptom"] not in (None, "oom", "slow"):
        return fail("advise", f"symptom={options['symptom']}: expected oom or slow")
    cfg = compose(overrides)
    apply_init_from(cfg)  # model.init_from=DIR: plan for the directory's model
    for key, count in (("trainer.devices", cfg.trainer.devices), ("trainer.num_nodes", cfg.trainer.num_nodes)):
        if count < 1:
            return fail("advise", f"{key}={count} must be positive")
    given = {arg.partition("=")[0].lstrip("+") for arg in overrides}
    if not options["symptom"]:  # the plan is for hardware.nodes x gpus_per_node: a run's own count says it too
        if "trainer.devices" in given:
            cfg.hardware.gpus_per_node = cfg.trainer.devices
        if "trainer.num_nodes" in given:
            cfg.hardware.nodes = cfg.trainer.num_nodes
    # torch loads here (the planning arithmetic builds meta-device models), after the arguments composed
    from curry_train.planning.advise import advise, diagnose, gib_text, plot_memory  # noqa: PLC0415

    if options["symptom"]:
        result = diagnose(cfg, options["symptom"], overrides)
        if options["plot"]:
            plotted = [("current", _estimate_of(cfg, result["current"]))]
            if result["next"]:
                plotted.append(("next", _estimate_of(cfg, result["next"])))
            plot_memory(cfg, plotted, Path(options["plot"]))
            _wrote(options["plot"], options["format"])
        if options["format"] == "json":
            print(json.dumps(result))
        else:
            print(f"{options['symptom']}: {result['advice']}")
            if result["command"]:
                print(result["command"])
        return 0
    advice = advise(cfg, overrides)
    if options["plot"]:
        plot_memory(cfg, advice.tried, Path(options["plot"]))
        _wrote(options["plot"], options["format"])
    if options["format"] == "json":
        print(json.dumps(advice.to_dict()))
        return 0 if advice.recommended else 1
    hw = cfg.hardware
    print(f"{cfg.model.name} on {hw.nodes} x {hw.gpus_per_node} {hw.name}, seq {cfg.data.seq_len}")
    print(f"  {'tried':<40} {'per rank':>12}  {'':<7} {'step':>9} {'tokens/s/device':>16} {'MFU':>6}")
    for step, est in advice.tried:
        speed = est.speed
        print(
            f"  {step:<40} {gib_text(est.memory['total']):>12}  {'fits' if est.fits else 'too big':<7}"
            f" {est.time['total']:>8.3g}s {speed['tokens_per_s_per_device']:>16,.0f} {100 * speed['mfu']:>5.1f}%"
        )
    for reason in advice.reasons:
        print(f"- {reason}")
    if advice.recommended:
        rec = advice.recommended
        print(
            f"recommended: {rec.layout.describe()}: ~{rec.speed['tokens_per_s_per_device']:,.0f} tokens/s per device,"
            f" {100 * rec.speed['mfu']:.0f}% MFU ({rec.time['total']:.3g} s a step, estimated)"
        )
        print(advice.command)
        return 0
    return 1


def _wrote(path: str, fmt: str) -> None:
    """Name the file written: on stdout beside the text report, on stderr beside JSON (which stays parseable)."""
    print(f"plot: {Path(path).resolve()}", file=sys.stderr if fmt == "json" else sys.stdout)


def _estimate_of(cfg, record: dict):
    from curry_train.planning.advise import estimate  # noqa: PLC0415  (loaded by _advise already)
    from curry_train.planning.layout import Layout  # noqa: PLC0415

    return estimate(cfg, Layout(**record["layout"]))


if __name__ == "__main__":
    sys.exit(main())
