"""``minibasis sweep``: the paper's Figure 2 for one trained network.

For each energy threshold t the network is compressed (:func:`minibasis.compress`) and
measured, before any fine-tuning:

* retained filters: Σ Q over the replaced layers plus Σ M over the convs kept as they are
  (count and % of the original Σ M);
* conv multiplications per image measured while the compressed model runs, their ratio to
  the original, and the formula ratio (Σ (Q·D + M·Q)·Ho·Wo over replaced layers plus
  Σ M·D·Ho·Wo over kept ones, divided by the original Σ M·D·Ho·Wo);
* learnable parameters and test accuracy.

Writes ``sweep.csv``, ``sweep.json``, ``retained_filters.png`` and
``accuracy_vs_retained.png``. Layers where BasisConv would not save multiplications
(Q/M + Q/D ≥ 1) stay ordinary convolutions unless ``--replace-all``.
"""
from __future__ import annotations

import time

from minibasis.experiments import options, trainer
from minibasis.experiments.common import evaluate

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    options.add_model_arguments(parser, model="resnet_cifar", depth=56, checkpoint="auto")
    options.add_data_arguments(parser, dataset="cifar10", normalize="imagenet")
    parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in options.DEFAULT_THRESHOLDS),
                        help="energy thresholds t, comma-separated (default: the paper's 1.0 ... 0.7)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate on the first N test images only (default: all)")
    parser.add_argument("--replace-all", action="store_true",
                        help="replace every conv, even where BasisConv needs as many multiplications or more")
    options.add_common_arguments(parser, batch_size=256)


def run(args) -> int:
    from minibasis import backend, compress, manual_seed

    options.check_common(args)
    options.check_positive("--limit", args.limit)
    thresholds = options.parse_thresholds(args.thresholds)
    model, checkpoint = options.build_model_with_weights(args)
    options.require_convs(model, f"the model {options.describe_model(args)}")
    (_, _), (x_test, y_test) = options.load_dataset(args.dataset, args.data, num_train=0 if args.dataset == "synthetic" else None,
                                                    num_test=args.limit, seed=args.seed)
    folder = trainer.prepare_run_folder(args, "sweep")
    log = folder.log
    manual_seed(args.seed)
    started = time.perf_counter()
    name = options.describe_model(args)
    log(f"minibasis sweep: {name} from {checkpoint or 'random initialization'}, {len(y_test)} {args.dataset} "
        f"test images, on {backend.current()}; output folder {folder.path}")
    transform = options.eval_transform(args.normalize)

    def accuracy(m) -> float:
        return evaluate(m, x_test, y_test, batch_size=args.batch_size, transform=transform,
                        progress=not args.quiet, desc="  eval").accuracy

    original_acc = accuracy(model)
    log(f"original: test accuracy {100 * original_acc:.2f}%")
    rows = []
    header = (f"{'t':>5} {'replaced':>8} {'filters':>13} {'conv mults':>14} {'measured':>8} {'formula':>8} "
              f"{'learnable':>10} {'stored':>10} {'test acc':>8}")
    log(header)
    for t in thresholds:
        compressed, report = compress(model, energy_threshold=t, skip_unprofitable=not args.replace_all)
        row = {"model": name, **report.summary(), "test_acc": accuracy(compressed), "test_acc_original": original_acc}
        rows.append(row)
        log(f"{t:5.2f} {row['layers_replaced']:>4}/{row['layers']:<3} "
            f"{row['retained_filters']:>6} {row['retained_filters_pct']:5.1f}% {row['conv_mults_measured']:>14,} "
            f"{row['mult_ratio_measured']:8.4f} {row['mult_ratio_formula']:8.4f} {row['params']:>10,} {row['stored']:>10,} "
            f"{100 * row['test_acc']:7.2f}%")

    results = {"model": name, "checkpoint": str(checkpoint) if checkpoint else None, "dataset": args.dataset,
               "test_images": int(len(y_test)), "normalize": args.normalize, "replace_all": args.replace_all,
               "device": backend.current(), "test_acc_original": original_acc,
               "mults_unit": "multiplications per image, conv layers only (the paper's convention)",
               "thresholds": rows, "seconds": round(time.perf_counter() - started, 1)}
    folder.write_json("sweep.json", results)
    folder.write_csv("sweep.csv", [{k: v for k, v in r.items() if k != "per_layer"} for r in rows])
    from minibasis.experiments import plots
    written = [plots.plot_retained_filters(folder.file("retained_filters.png"), rows),
               plots.plot_accuracy_vs_retained(folder.file("accuracy_vs_retained.png"), rows)]
    log(f"wrote {folder.file('sweep.json')}, {folder.file('sweep.csv')}"
        + (", " + ", ".join(str(p) for p in written) if all(written) else f" ({plots.MISSING_MESSAGE})"))
    log(f"done in {results['seconds']} s")
    return 0
