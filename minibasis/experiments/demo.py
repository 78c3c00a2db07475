"""``minibasis demo``: train a small CNN on built-in synthetic images, compress it, measure.

No files and no downloads: the images come from :func:`minibasis.data.synthetic`. The
demo trains :class:`DemoCNN` for a few epochs, then for each energy threshold t replaces
its convolutions by eigen-basis ``BasisConv2d`` layers (:func:`minibasis.compress`,
skipping layers that would not save multiplications) and reports, per t:

* the conv multiplications per image **measured** by the counter while the compressed
  model runs, and the **formula** count Σ (Q·D + M·Q)·Ho·Wo over replaced layers plus
  M·D·Ho·Wo over kept ones (output sizes read from the model's forward pass);
* their ratio to the original, the paper's per-layer ratio Q/M + Q/D, learnable
  parameters, and test accuracy (before any fine-tuning).

It writes ``results.json``, ``results.csv``, ``demo.png`` (with matplotlib),
``config.json`` and ``log.txt`` to the output folder it names.
"""
from __future__ import annotations

import time

from minibasis import data, optim
from minibasis.experiments import argtypes, options, runs
from minibasis.model_files import checkpoint_meta
from minibasis.models import demo_cnn
from minibasis.training import Trainer, eval_metrics

__all__ = ["add_arguments", "run"]

DEFAULT_DEMO_THRESHOLDS = "1.0,0.99,0.95,0.9,0.85,0.8,0.75,0.7,0.6,0.5"


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=argtypes.positive, default=3, help="training epochs (default: 3)")
    parser.add_argument("--num-train", type=argtypes.positive, default=3000, help="synthetic training images (default: 3000)")
    parser.add_argument("--num-test", type=argtypes.positive, default=1000, help="synthetic test images (default: 1000)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    parser.add_argument("--thresholds", type=argtypes.thresholds, default=DEFAULT_DEMO_THRESHOLDS,
                        help=f"energy thresholds t, comma-separated (default: {DEFAULT_DEMO_THRESHOLDS})")
    options.add_common_arguments(parser, batch_size=64)


def run(args) -> int:
    from minibasis import backend, compress, manual_seed
    from minibasis.measure import REPORT_BATCH, batches_note

    spec = options.verb_spec(args, "demo")
    o, run_spec = spec.options, spec.run
    thresholds = list(o.thresholds)
    folder = runs.prepare_run_folder(run_spec)
    log = folder.log
    started = time.perf_counter()
    log(f"minibasis demo: output folder {folder.path}")

    manual_seed(run_spec.seed)
    (x_train, y_train), (x_test, y_test) = data.synthetic(num_train=o.num_train, num_test=o.num_test,
                                                          seed=run_spec.seed)
    log(f"synthetic data: {len(y_train)} training and {len(y_test)} test images, 10 classes of oriented patterns")
    transform = data.eval_transform("none")  # the patterns are centred on their own; [0, 1] is enough
    loader = data.DataLoader((x_train, y_train), batch_size=run_spec.batch_size, shuffle=True, seed=run_spec.seed,
                             transform=transform)
    model = demo_cnn()
    optimizer = optim.SGD(model.parameters(), lr=o.lr, momentum=0.9, weight_decay=5e-4)
    scheduler = optim.StepLR(optimizer, step_size=max(o.epochs - 1, 1), gamma=0.1)
    test_accuracy = eval_metrics(x_test, y_test, data.eval_transform("none"))

    log(f"training DemoCNN ({model.num_parameters():,} parameters) for {o.epochs} epochs "
        f"on {backend.current()}")
    history = Trainer(model, optimizer, loader, epochs=o.epochs, scheduler=scheduler,
                              eval_fn=test_accuracy, folder=folder, seed=run_spec.seed,
                              progress=not run_spec.quiet,
                              extra_meta=checkpoint_meta(model, normalization="none", dataset="synthetic")).fit()
    baseline = test_accuracy(model)["test_acc"]

    input_shape = (REPORT_BATCH, 3, 32, 32)  # a real batch: counts per image, checked against batch 1
    rows = []
    log("")
    log(f"{'t':>5} {'replaced':>8}  {'Q per conv':<14} {'conv mults measured':>20} {'formula':>12} "
        f"{'ratio':>7} {'learnable':>9} {'stored':>8} {'test acc':>8}")
    for t in thresholds:
        compressed, report = compress(model, energy_threshold=t, input_shape=input_shape)
        row = {**report.summary(), "test_acc": test_accuracy(compressed)["test_acc"], "test_acc_original": baseline}
        rows.append(row)
        match = "=" if row["conv_mults_measured"] == row["conv_mults_formula"] else "≠"
        log(f"{t:5.2f} {row['layers_replaced']:>4}/{row['layers']:<3}  {str(row['num_basis']):<14} "
            f"{row['conv_mults_measured']:>20,} {match} {row['conv_mults_formula']:<12,} "
            f"{row['mult_ratio_measured']:7.3f} {row['params']:>9,} {row['stored']:>8,} {100 * row['test_acc']:7.2f}%")
    log(f"conv multiplications per image {batches_note(report.batches)}")
    log(f"original: {rows[0]['conv_mults_original']:,} conv multiplications per image, "
        f"{rows[0]['params_original']:,} learnable parameters ({rows[0]['stored_original']:,} stored values), test accuracy {100 * baseline:.2f}%")

    results = {"model": "DemoCNN", "dataset": "synthetic", "epochs": o.epochs, "num_train": o.num_train,
               "num_test": o.num_test, "seed": run_spec.seed, "device": backend.current(),
               "mults_unit": "multiplications per image, conv layers only (the paper's convention)",
               "test_acc_original": baseline, "training": history, "thresholds": rows,
               "seconds": round(time.perf_counter() - started, 1)}
    folder.write_json("results.json", results)
    folder.write_csv("results.csv", [{k: v for k, v in r.items() if k != "per_layer"} for r in rows])
    from minibasis.experiments import plots
    plot = plots.plot_demo(folder.file("demo.png"), rows, baseline_acc=baseline, test_images=len(y_test))
    mismatches = [r["threshold"] for r in rows if r["conv_mults_measured"] != r["conv_mults_formula"]]
    log("measured conv multiplications equal the formula at every threshold" if not mismatches
        else f"WARNING: measured and formula counts differ at t = {mismatches}")
    log(f"wrote {folder.file('results.json')}, {folder.file('results.csv')}"
        + (f", {plot}" if plot else f" ({plots.MISSING_MESSAGE})"))
    log(f"done in {results['seconds']} s")
    return 0 if not mismatches else 1
