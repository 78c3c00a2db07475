"""``minibasis sweep``: the paper's Figure 2 for one trained network.

For each energy threshold t the network is compressed (:func:`minibasis.compress`) and
measured, before any fine-tuning:

* retained filters: Σ Q over the replaced layers plus Σ M over the convs kept as they are
  (count and % of the original Σ M);
* conv multiplications per image measured while the compressed model runs, their ratio to
  the original, and the formula ratio (Σ (Q·D + M·Q)·Ho·Wo over replaced layers plus
  Σ M·D·Ho·Wo over kept ones, divided by the original Σ M·D·Ho·Wo);
* learnable parameters, stored values (parameters + buffers, the bases included) and test
  accuracy (where no conv was replaced the model is the original, and its accuracy is reused).

Progress says which threshold runs (``t=0.95 (3/8)``) and the ETA of the whole sweep. Each
row is written to ``sweep.json`` / ``sweep.csv`` as soon as it is measured, so an interrupted
sweep keeps what it measured and ``--resume`` continues with the thresholds still missing.
At the end: ``retained_filters.png`` and ``accuracy_vs_retained.png``. Layers where BasisConv
would not save multiplications (Q/M + Q/D ≥ 1) stay ordinary convolutions unless ``--replace-all``.
"""
from __future__ import annotations

import time

from minibasis import data
from minibasis.experiments import argtypes, common, options, runs
from minibasis.experiments.loading import inference_form, load_data, load_verb_model
from minibasis.training import evaluate, format_duration, read_json

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    options.add_model_arguments(parser, model="resnet_cifar", depth=56, checkpoint="auto")
    options.add_data_arguments(parser, dataset="cifar10", normalize="imagenet")
    parser.add_argument("--thresholds", type=argtypes.thresholds, default=",".join(f"{t:g}" for t in options.DEFAULT_THRESHOLDS),
                        help="energy thresholds t, comma-separated (default: the paper's 1.0 ... 0.7)")
    parser.add_argument("--limit", type=argtypes.positive, default=None,
                        help="evaluate on the first N test images only (default: all)")
    parser.add_argument("--replace-all", action="store_true",
                        help="replace every conv, even where BasisConv needs as many multiplications or more")
    parser.add_argument("--resume", action="store_true",
                        help="continue the sweep in --output: keep its measured rows, measure the missing thresholds")
    options.add_deploy_argument(parser)
    options.add_common_arguments(parser, batch_size=256)


def _done_rows(folder, thresholds: list[float]) -> tuple[dict, float | None]:
    """Rows already in ``sweep.json`` (threshold → row) and the original's accuracy, for --resume."""
    saved = read_json(folder.file("sweep.json")) or {}
    rows = {row["threshold"]: row for row in saved.get("thresholds", []) if row.get("threshold") in thresholds}
    return rows, saved.get("test_acc_original")


def run(args) -> int:
    from minibasis import backend, compress, manual_seed
    from minibasis.experiments import plots

    spec = options.verb_spec(args, "sweep")
    o, run_spec, data_spec = spec.options, spec.run, spec.data
    thresholds = list(o.thresholds)
    loaded = load_verb_model(spec, compressing=True)
    model, name, normalize, checkpoint = loaded.model, loaded.name, loaded.normalize, spec.model.checkpoint
    (_, _), (x_test, y_test) = load_data(data_spec, num_train=0 if data_spec.name == "synthetic" else None,
                                         num_test=o.limit, seed=run_spec.seed)
    folder = runs.prepare_run_folder(run_spec)
    log = folder.log
    manual_seed(run_spec.seed)
    started = time.perf_counter()
    log(f"minibasis sweep: {name} from {checkpoint or 'random initialization'}, {len(y_test)} {data_spec.name} "
        f"test images, on {backend.current()}; output folder {folder.path}")
    if note := common.data_note(data_spec.name, data_spec.root):
        log(note)
    transform = data.eval_transform(normalize)

    def accuracy(m, label: str) -> float:
        return evaluate(inference_form(m, o.deploy), x_test, y_test, batch_size=run_spec.batch_size,
                        transform=transform, progress=not run_spec.quiet, desc=f"  {label}").accuracy

    done, original_acc = _done_rows(folder, thresholds) if run_spec.resume else ({}, None)
    if run_spec.resume:
        log(f"--resume: {len(done)} of {len(thresholds)} thresholds already measured in {folder.file('sweep.json')}"
            + ("" if done else "; starting from the first"))
    if original_acc is None:
        original_acc = accuracy(model, "original")
    log(f"original: test accuracy {100 * original_acc:.2f}%")
    results = {"model": name, "checkpoint": str(checkpoint) if checkpoint else None,
               "dataset": data_spec.name, "test_images": int(len(y_test)), "normalize": normalize,
               "replace_all": o.replace_all, "deployed": o.deploy, "device": backend.current(),
               "test_acc_original": original_acc,
               "mults_unit": "multiplications per image, conv layers only (the paper's convention)",
               "params_unit": "params: learnable parameters; stored: parameters + persistent buffers (bases included)",
               "complete": False, "thresholds": []}

    def write(rows) -> None:
        results.update(thresholds=rows, seconds=round(time.perf_counter() - started, 1))
        folder.write_json("sweep.json", results)
        folder.write_csv("sweep.csv", [{k: v for k, v in r.items() if k != "per_layer"} for r in rows])

    log(f"{'t':>5} {'replaced':>8} {'filters':>13} {'conv mults':>14} {'measured':>8} {'formula':>8} "
        f"{'learnable':>10} {'stored':>10} {'test acc':>8}")
    rows, measured_seconds, to_measure = [], [], [t for t in thresholds if t not in done]
    for position, t in enumerate(thresholds, 1):
        if t in done:
            row = done[t]
        else:
            t_start = time.perf_counter()
            label = f"t={t:g} ({position}/{len(thresholds)})"
            compressed, report = compress(model, energy_threshold=t, skip_unprofitable=not o.replace_all)
            reused = not report.replaced   # nothing replaced: the copy computes what the original does
            row = {"model": name, **report.summary(),
                   "test_acc": original_acc if reused else accuracy(compressed, label),
                   "test_acc_reused_from_original": reused, "test_acc_original": original_acc}
            measured_seconds.append(time.perf_counter() - t_start)
        rows.append(row)
        write(rows)
        left = len(to_measure) - len(measured_seconds)
        eta = (f"; sweep ETA {format_duration(left * sum(measured_seconds) / len(measured_seconds))}"
               if measured_seconds and left else "")
        log(f"{t:5.2f} {row['layers_replaced']:>4}/{row['layers']:<3} "
            f"{row['retained_filters']:>6} {row['retained_filters_pct']:5.1f}% {row['conv_mults_measured']:>14,} "
            f"{row['mult_ratio_measured']:8.4f} {row['mult_ratio_formula']:8.4f} {row['params']:>10,} "
            f"{row['stored']:>10,} {100 * row['test_acc']:7.2f}%  [{position}/{len(thresholds)}"
            f"{', from the earlier run' if t in done else ''}{eta}]")

    results["complete"] = True
    write(rows)
    written = [plots.plot_retained_filters(folder.file("retained_filters.png"), rows),
               plots.plot_accuracy_vs_retained(folder.file("accuracy_vs_retained.png"), rows, len(y_test))]
    log(f"wrote {folder.file('sweep.json')}, {folder.file('sweep.csv')}"
        + (", " + ", ".join(str(p) for p in written) if all(written) else f" ({plots.MISSING_MESSAGE})"))
    log(f"done in {results['seconds']} s")
    return 0
