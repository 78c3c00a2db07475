"""``minibasis compare``: several runs' test accuracy per epoch, side by side, with reference lines.

Reads the run folders of ``minibasis train`` / ``minibasis finetune`` (finished or still running:
the per-epoch ``metrics-*.json`` are enough), prints one row per run and draws every run's test
accuracy per epoch on one figure, with horizontal reference lines (e.g. the paper's figures)::

    minibasis compare runs/table3-conv runs/table3-basis --label ConvNet --label BasisNet \\
        --reference "paper ConvNet=74" --reference "paper BasisNet=71" --output runs/compare-table3

The run folder gets ``config.json``, ``log.txt``, ``compare.json`` (the table) and
``compare.png``. Library: :func:`minibasis.training.load_run`.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from minibasis.experiments import options, plots, runs
from minibasis.experiments.errors import UserError, first_line

__all__ = ["add_arguments", "run", "parse_reference", "summary_row"]


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run folders of minibasis train / finetune (finished or not)")
    parser.add_argument("--label", action="append", default=None, metavar="NAME",
                        help="a name per run, in order (default: the folder names)")
    parser.add_argument("--reference", action="append", default=[], metavar="LABEL=PERCENT",
                        help="a horizontal reference line, e.g. 'paper ConvNet=74' (test accuracy in %%)")
    parser.add_argument("--title", default="test accuracy per epoch", help="figure title")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for compare.json, compare.png and the log (default: runs/compare-<timestamp>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the comparison already in --output")
    parser.add_argument("--quiet", action="store_true", help="only the table")


def parse_reference(text: str) -> tuple[str, float]:
    """'LABEL=PERCENT' → (label, accuracy as a fraction); UserError naming what is wrong."""
    label, sep, value = text.rpartition("=")
    if not sep or not label.strip():
        raise UserError(f"--reference {text!r}: expected LABEL=PERCENT, e.g. 'paper ConvNet=74'")
    try:
        percent = float(value.rstrip("% "))
    except ValueError:
        raise UserError(f"--reference {text!r}: {value!r} is not a number (test accuracy in %)") from None
    if not 0 <= percent <= 100:
        raise UserError(f"--reference {text!r}: accuracy must be a percentage in [0, 100], got {percent:g}")
    return label.strip(), percent / 100


def summary_row(label: str, history) -> dict:
    """One table row of a :class:`minibasis.training.RunHistory`."""
    results = history.results or {}
    best = history.best_test_acc
    speeds = [row["images_per_s"] for row in history.rows if isinstance(row.get("images_per_s"), (int, float))]
    compression = results.get("compression") or {}
    compression = compression.get("totals", compression)   # finetune's results hold the report's totals
    return {"run": label, "folder": str(history.path), "finished": history.finished,
            "stages": " + ".join(f"{stage} {count}" for stage, count in history.stages),
            "epochs": history.epochs, "final_test_acc": history.final_test_acc,
            "best_test_acc": None if best is None else best[1], "best_epoch": None if best is None else best[0],
            "learnable_params": results.get("learnable_params"),
            "conv_learnable_params": results.get("conv_learnable_params"), "stored_values": results.get("stored_values"),
            "conv_mults": compression.get("conv_mults_after"),
            "hours": round(history.seconds / 3600, 3),
            "median_images_per_s": statistics.median(speeds) if speeds else None}


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def _table(rows: list[dict]) -> list[str]:
    header = ["run", "epochs", "stages", "final test", "best test (epoch)", "learnable", "conv learnable", "stored", "conv mults",
              "hours", "images/s", "finished"]
    body = [[r["run"], str(r["epochs"]), r["stages"], _percent(r["final_test_acc"]),
             "-" if r["best_test_acc"] is None else f"{_percent(r['best_test_acc'])} ({r['best_epoch']})",
             _count(r["learnable_params"]), _count(r["conv_learnable_params"]), _count(r["stored_values"]), _count(r["conv_mults"]),
             f"{r['hours']:.2f}", "-" if r["median_images_per_s"] is None else f"{r['median_images_per_s']:.0f}",
             "yes" if r["finished"] else "no"] for r in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header] + body]


def run(args) -> int:
    from minibasis.training import load_run

    spec = options.verb_spec(args, "compare")
    o = spec.options
    # Every option and every folder is checked before anything is written.
    labels = o.label or [path.name or str(path) for path in o.runs]
    if len(labels) != len(o.runs):
        raise UserError(f"{len(o.label)} --label given for {len(o.runs)} run folders; give one per run or none")
    references = dict(parse_reference(text) for text in o.reference)
    histories = []
    for path in o.runs:
        try:
            histories.append(load_run(path))
        except ValueError as exc:
            raise UserError(first_line(exc)) from None
    folder = runs.prepare_run_folder(spec.run)
    folder.quiet = spec.run.quiet  # --quiet: the table on stdout, the rest only in log.txt
    rows = [summary_row(label, history) for label, history in zip(labels, histories)]
    for line in _table(rows):
        folder.log(line)
        if spec.run.quiet:
            print(line)
    folder.write_json("compare.json", {"runs": rows, "references": references})
    curves = {label: history.test_curve() for label, history in zip(labels, histories)}
    boundaries = sorted({x for history in histories for x in history.stage_boundaries()})
    plot = plots.plot_accuracy_curves(folder.file("compare.png"), curves, references, title=o.title,
                                      boundaries=boundaries)
    folder.log(f"wrote {folder.file('compare.json')}" + (f", {plot}" if plot else f" ({plots.MISSING_MESSAGE})"))
    return 0
