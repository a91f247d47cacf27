"""A mixture before it trains: what each source holds, what the batches draw, and whether the loader
keeps up with the layout.

Usage::

    curry-data <train.py overrides> [batches=N] [workers=W] [seconds=S] [documents=K] [plot=PATH] [format=text|json]
    python scripts/show_data.py data=files 'data.paths=[a.jsonl]' data.tokenizer=/models/llama3
    python scripts/show_data.py recipe=mixture parallel=fsdp trainer.devices=8 hardware=h100_80gb workers=4

Composes and checks the config as ``train.py`` would, then prints

* each source: kind, weight, documents, tokens (where counting is cheap) and rows an epoch;
* the shares of rows (= tokens) the first ``batches`` global batches draw from each source, against
  the weights;
* the document lengths of each source's first ``documents`` documents (``plot=PATH``: their histogram
  as a PNG);
* a decoded sample row (the first of the first global batch) with its document boundaries;
* the loader's speed: global batches/s and tokens/s of rank 0 with ``workers`` loader workers (default
  ``data.num_workers``), over ``seconds``, against the tokens/s the layout consumes by advise's step
  estimate (``hardware=...``, ``parallel=...``, ``trainer.devices``): a ratio under 1 starves the devices.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from curry_train.cli.common import error_line, fail, is_config_error
from curry_train.config import compose

OPTIONS = {"batches": "200", "workers": None, "seconds": "5", "documents": "2000", "plot": None, "format": "text"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    try:
        return _show(argv)
    except Exception as error:
        if not is_config_error(error):
            raise
        return fail("curry-data", error_line(error))


def _count(options: dict, key: str, minimum: int) -> int:
    value = options[key]
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = minimum - 1
    if number < minimum:
        from curry_train.config import ConfigError  # noqa: PLC0415

        raise ConfigError(f"{key}={value}: expected a whole number, at least {minimum}")
    return number


def _show(argv: list[str]) -> int:
    options, overrides = dict(OPTIONS), []
    for arg in argv:
        key, _, value = arg.partition("=")
        (options.__setitem__(key, value) if key in options else overrides.append(arg))
    if options["format"] not in ("text", "json"):
        return fail("curry-data", f"format={options['format']}: expected text or json")
    batches, seconds = _count(options, "batches", 1), _count(options, "seconds", 1)
    documents = _count(options, "documents", 1)
    cfg = compose(overrides)
    from curry_train.config.checks import check  # noqa: PLC0415

    check(cfg)  # the launch check: a bad source is one line here, as it would be for train.py
    workers = _count(options, "workers", 0) if options["workers"] is not None else int(cfg.data.num_workers)
    # torch loads here: the loader and advise's step estimate need it
    from curry_train.config.schema import Config  # noqa: PLC0415
    from curry_train.data.inspect import inspect_mixture, plot_lengths  # noqa: PLC0415
    from curry_train.planning.advise import estimate  # noqa: PLC0415
    from curry_train.planning.layout import current_layout  # noqa: PLC0415

    layout = current_layout(cfg)
    data = Config.of(cfg).data
    report, lengths = inspect_mixture(data, cfg.seed, batches, documents, workers, seconds, layout.dp)
    step = estimate(cfg, layout).time["total"]
    report["layout"] = {
        "layout": layout.describe(),
        "hardware": cfg.hardware.name,
        "step_time_s": step,
        "tokens_per_s": data.global_batch_size * data.seq_len / step,
    }
    if options["plot"]:
        plot_lengths(lengths, Path(options["plot"]))
        report["plot"] = options["plot"]
    if options["format"] == "json":
        print(json.dumps(report))
    else:
        print(render(report))
    return 0


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:,.3g}"


def render(report: dict[str, Any]) -> str:
    lines = [
        f"curry-data: {len(report['sources'])} source(s); rows of {report['seq_len']} tokens, global batch"
        f" {report['global_batch_size']}, seed {report['seed']}",
        "",
        f"{'source':<12} {'kind':<9} {'weight':>7} {'documents':>11} {'tokens':>14} {'rows/epoch':>11}"
        f" {'drawn':>7} {'doc len p50/p90/max':>22}",
    ]
    for s in report["sources"]:
        lengths = s["document_lengths"]
        spread = "/".join(_number(lengths[k]) for k in ("p50", "p90", "max")) if lengths else "-"
        lines.append(
            f"{s['name']:<12} {s['kind']:<9} {s['share']:>7.3f} {_number(s['documents']):>11}"
            f" {_number(s['tokens']):>14} {_number(s['rows_per_epoch']):>11} {s['drawn']:>7.3f} {spread:>22}"
        )
    lines.append(
        f"(share: the weight's fraction; drawn: the fraction of rows the first {report['batches']} global batches"
        " take from it)"
    )
    sample = report["sample"]
    lines += [
        "",
        f"sample row: global batch 0, row 0, from {sample['source']}, {len(sample['documents'])} document piece(s):",
    ]
    for number, piece in enumerate(sample["documents"]):
        lines.append(f"  [{number}] {piece}")
    loader = report["loader"]
    lines += [
        "",
        f"loader: {loader['workers']} worker(s), rank 0 of {loader['dp']} data-parallel rank(s):"
        f" {loader['batches_per_s']:,.2f} global batches/s = {loader['tokens_per_s']:,.0f} tokens/s"
        f" ({loader['measured_batches']} batches in {loader['seconds']:.1f} s)",
    ]
    need = report["layout"]
    if need is not None:
        verdict = "keeps up" if loader["tokens_per_s"] >= need["tokens_per_s"] else "STARVES the devices"
        lines.append(
            f"layout {need['layout']} on {need['hardware']}: a step of {need['step_time_s']:.3g} s (advise's"
            f" estimate) consumes {need['tokens_per_s']:,.0f} tokens/s; the loader gives"
            f" {loader['tokens_per_s'] / need['tokens_per_s']:.2f}x that: it {verdict}"
        )
    if report.get("plot"):
        lines.append(f"document lengths: {report['plot']}")
    return "\n".join(lines)
