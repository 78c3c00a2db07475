"""``minibasis compress``: compress a trained model's convolutions at one energy threshold.

Prints the per-layer report of :func:`minibasis.compress` (M, C, k, D, Q, retained energy,
conv multiplications per image measured before and after, the formula ratio Q/M + Q/D,
learnable parameters and stored values, and why each kept conv was kept) and writes
``report.json`` and ``model.npz`` — the compressed model (:func:`minibasis.save_model`:
architecture, BasisConv layout, normalization), which ``--checkpoint`` of ``eval``, ``sweep``
and ``finetune`` accepts. ``--evaluate`` adds the test accuracy before and after.
"""
from __future__ import annotations

from minibasis import data
from minibasis.experiments import options, runs
from minibasis.experiments.errors import UserError, first_line

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    options.add_model_arguments(parser, model="resnet_cifar", depth=20, checkpoint="auto")
    group = parser.add_argument_group("compression")
    group.add_argument("--threshold", type=float, default=None, help="energy threshold t in (0, 1] (default: 0.9)")
    group.add_argument("--num-basis", type=int, default=None, help="instead of --threshold: Q for every layer")
    group.add_argument("--layers", default=None, help="comma-separated module paths of the convs to compress (default: all)")
    group.add_argument("--replace-all", action="store_true",
                       help="replace every selected conv, even where BasisConv needs as many multiplications or more")
    group.add_argument("--evaluate", action="store_true", help="also measure test accuracy before and after")
    group.add_argument("--limit", type=int, default=None, help="with --evaluate: the first N test images only")
    options.add_data_arguments(parser, dataset="cifar10", normalize="imagenet")
    options.add_common_arguments(parser, batch_size=256)


def _settings(args) -> tuple[float | None, int | None, list[str] | None]:
    """(threshold, num_basis, layers) from the options, every contradiction refused."""
    options.check_positive("--limit", args.limit)
    if args.limit is not None and not args.evaluate:
        raise UserError("--limit applies only with --evaluate (without it no test image is used)")
    if args.threshold is not None and args.num_basis is not None:
        raise UserError("give --threshold or --num-basis, not both")
    threshold = options.check_threshold("--threshold", 0.9 if args.threshold is None and args.num_basis is None
                                        else args.threshold)
    options.check_positive("--num-basis", args.num_basis)
    layers = [s.strip() for s in args.layers.split(",") if s.strip()] if args.layers else None
    return threshold, args.num_basis, layers


def run(args) -> int:
    from minibasis import backend, compress
    from minibasis.training import evaluate

    options.check_common(args)
    threshold, num_basis, layers = _settings(args)
    loaded = options.load_verb_model(args, "compress", check_classes=args.evaluate)
    model, name, normalize, spec = loaded.model, loaded.name, loaded.normalize, loaded.spec
    options.require_convs(model, f"the model {name}")
    try:
        compressed, report = compress(model, energy_threshold=threshold, num_basis=num_basis,
                                      skip_unprofitable=not args.replace_all, layers=layers)
    except ValueError as exc:
        raise UserError(first_line(exc)) from None
    test = options.load_dataset(args.dataset, args.data, num_test=args.limit, seed=args.seed)[1] if args.evaluate else None

    folder = runs.prepare_run_folder(args, "compress")
    log = folder.log
    log(f"minibasis compress: {name} from {spec.checkpoint or 'random initialization'} on {backend.current()}")
    for line in report.table().splitlines():
        log(line)
    results = {"model": name, "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
               "normalize": normalize, **report.to_dict()}
    if test is not None:
        x_test, y_test = test
        if note := options.data_note(args.dataset, args.data):
            log(note)
        transform = data.eval_transform(normalize)
        accuracies = {label: evaluate(m, x_test, y_test, batch_size=args.batch_size, transform=transform,
                                      progress=not args.quiet, desc=f"eval {label}").accuracy
                      for label, m in (("original", model), ("compressed", compressed))}
        log(f"test accuracy ({len(y_test)} {args.dataset} images): original {100 * accuracies['original']:.2f}%, "
            f"compressed {100 * accuracies['compressed']:.2f}% (before fine-tuning)")
        results.update({"test_images": int(len(y_test)), "test_acc_original": accuracies["original"],
                        "test_acc_compressed": accuracies["compressed"]})
    folder.write_json("report.json", results)
    options.save_model_file(folder.file("model.npz"), compressed, normalize,
                            loaded.dataset or args.dataset)
    log(f"wrote {folder.file('report.json')}, {folder.file('model.npz')}")
    return 0
