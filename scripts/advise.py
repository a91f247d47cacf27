"""Which layout to run: ``python scripts/advise.py <train.py overrides> [symptom=oom|slow] [format=json]``.

Composes the config as ``train.py`` would (``hardware=...`` picks the machines, ``hardware.nodes``,
``hardware.gpus_per_node`` their count), walks the decision guide (curry_train/advise.py) and prints
the lightest layout that fits with headroom, why each heavier primitive is or is not needed, and the
``python train.py ...`` command. ``symptom=oom|slow``: the primitive to add next to the current config.
``plot=PATH``: a PNG of the per-rank memory of each candidate tried (or of the current and next
layout, with a symptom), by part, against the device's capacity.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curry_train.advise import Estimate, advise, diagnose, estimate, gib_text, plot_memory  # noqa: E402
from curry_train.config import compose  # noqa: E402


def main(argv: list[str]) -> int:
    options = {"symptom": None, "format": "text", "plot": None}
    overrides = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in options:
            options[key] = value
        else:
            overrides.append(arg)
    cfg = compose(overrides)
    if options["format"] not in ("text", "json"):
        print(f"format={options['format']}: expected text or json", file=sys.stderr)
        return 2
    if options["symptom"]:
        result = diagnose(cfg, options["symptom"], overrides)
        if options["plot"]:
            plotted = [("current", _estimate_of(cfg, result["current"]))]
            if result["next"]:
                plotted.append(("next", _estimate_of(cfg, result["next"])))
            plot_memory(cfg, plotted, Path(options["plot"]))
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
    if options["format"] == "json":
        print(json.dumps(advice.to_dict()))
        return 0 if advice.recommended else 1
    hw = cfg.hardware
    print(f"{cfg.model.name} on {hw.nodes} x {hw.gpus_per_node} {hw.name}, seq {cfg.data.seq_len}")
    for step, est in advice.tried:
        print(f"  {step:<40} {gib_text(est.memory['total']):>12}  {'fits' if est.fits else 'too big'}")
    for reason in advice.reasons:
        print(f"- {reason}")
    if advice.recommended:
        print(f"recommended: {advice.recommended.layout.describe()}")
        print(advice.command)
        return 0
    return 1


def _estimate_of(cfg, record: dict) -> Estimate:
    from curry_train.advise import Layout

    return estimate(cfg, Layout(**record["layout"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
