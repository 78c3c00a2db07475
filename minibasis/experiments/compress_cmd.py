"""``minibasis compress``: compress a trained model's convolutions at one energy threshold, or
under a measured multiplication budget (``--target-mult-ratio R --allocation uniform|greedy|sensitivity``:
uniform takes the largest t whose measured ratio fits, greedy chooses Q per layer by energy,
sensitivity by the loss it measures on ``--calibration-images`` training images; see
:func:`minibasis.compress`).

Prints the per-layer report of :func:`minibasis.compress` (M, C, k, D, Q, retained energy,
conv multiplications per image measured before and after, the formula ratio Q/M + Q/D,
learnable parameters and stored values, and why each kept conv was kept) and writes
``report.json`` and ``model.npz`` — the compressed model (:func:`minibasis.save_model`:
architecture, BasisConv layout, normalization), which ``--checkpoint`` of ``eval``, ``sweep``
and ``finetune`` accepts. ``--evaluate`` adds the test accuracy before and after.
"""
from __future__ import annotations

from minibasis import data
from minibasis.experiments import argtypes, common, options, runs
from minibasis.experiments.loading import calibration_data, inference_form, load_data, load_verb_model
from minibasis.experiments.errors import UserError, first_line

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    options.add_model_arguments(parser, model="resnet_cifar", depth=20, checkpoint="auto")
    group = parser.add_argument_group("compression")
    group.add_argument("--threshold", type=argtypes.fraction, default=None, help="energy threshold t in (0, 1] (default: 0.9)")
    group.add_argument("--num-basis", type=argtypes.positive, default=None, help="instead of --threshold: Q for every layer")
    options.add_budget_arguments(group)
    group.add_argument("--layers", default=None, help="comma-separated module paths of the convs to compress (default: all)")
    group.add_argument("--basis-multiple", type=argtypes.positive, default=None, metavar="K",
                       help="round each layer's Q up to a multiple of K (a runtime's channel block: onnxruntime on "
                            "AVX-512 runs channels in 16s); with --threshold")
    group.add_argument("--replace-all", action="store_true",
                       help="replace every selected conv, even where BasisConv needs as many multiplications or more")
    group.add_argument("--evaluate", action="store_true", help="also measure test accuracy before and after")
    group.add_argument("--limit", type=argtypes.positive, default=None, help="with --evaluate: the first N test images only")
    options.add_deploy_argument(group)
    options.add_data_arguments(parser, dataset="cifar10", normalize="imagenet")
    options.add_common_arguments(parser, batch_size=256)


def _settings(o) -> dict:
    """The keyword arguments of :func:`minibasis.compress` from the options, every contradiction refused."""
    if o.limit is not None and not o.evaluate:
        raise UserError("--limit applies only with --evaluate (without it no test image is used)")
    if o.deploy and not o.evaluate:
        raise UserError("--deploy applies only with --evaluate (the model file written is the trainable form)")
    given = [name for name, value in (("--threshold", o.threshold), ("--num-basis", o.num_basis),
                                      ("--target-mult-ratio", o.target_mult_ratio)) if value is not None]
    if len(given) > 1:
        raise UserError(f"give one of {', '.join(given)}, not both")
    if o.allocation != "uniform" and o.target_mult_ratio is None:
        raise UserError("--allocation chooses Q under a budget: give --target-mult-ratio")
    if o.calibration_images is not None and o.allocation != "sensitivity":
        raise UserError("--calibration-images applies only with --allocation sensitivity")
    if o.basis_multiple is not None and (o.num_basis is not None or o.target_mult_ratio is not None):
        raise UserError("--basis-multiple rounds the Q a --threshold chooses: not with --num-basis or --target-mult-ratio")
    layers = [s.strip() for s in o.layers.split(",") if s.strip()] if o.layers else None
    settings = {"skip_unprofitable": not o.replace_all, "layers": layers}
    if o.target_mult_ratio is not None:
        return {**settings, "target_mult_ratio": o.target_mult_ratio, "allocation": o.allocation}
    if o.num_basis is not None:
        return {**settings, "num_basis": o.num_basis}
    return {**settings, "energy_threshold": 0.9 if o.threshold is None else o.threshold,
            "basis_multiple": o.basis_multiple}


def run(args) -> int:
    from minibasis import backend, compress
    from minibasis.training import evaluate

    spec = options.verb_spec(args, "compress")
    o, run_spec, data_spec = spec.options, spec.run, spec.data
    settings = _settings(o)
    loaded = load_verb_model(spec, check_classes=o.evaluate, compressing=True)
    model, name, normalize, checkpoint = loaded.model, loaded.name, loaded.normalize, spec.model.checkpoint
    if settings.get("allocation") == "sensitivity":
        settings["calibration"] = calibration_data(data_spec, normalize, o.calibration_images, run_spec.seed)
    try:
        compressed, report = compress(model, **settings)
    except ValueError as exc:
        raise UserError(first_line(exc)) from None
    test = load_data(data_spec, num_test=o.limit, seed=run_spec.seed)[1] if o.evaluate else None

    folder = runs.prepare_run_folder(run_spec)
    log = folder.log
    log(f"minibasis compress: {name} from {checkpoint or 'random initialization'} on {backend.current()}")
    for line in report.table().splitlines():
        log(line)
    results = {"model": name, "checkpoint": str(checkpoint) if checkpoint else None,
               "normalize": normalize, **report.to_dict()}
    if test is not None:
        x_test, y_test = test
        if note := common.data_note(data_spec.name, data_spec.root):
            log(note)
        transform = data.eval_transform(normalize)
        accuracies = {label: evaluate(inference_form(m, o.deploy), x_test, y_test, batch_size=run_spec.batch_size,
                                      transform=transform, progress=not run_spec.quiet, desc=f"eval {label}").accuracy
                      for label, m in (("original", model), ("compressed", compressed))}
        log(f"test accuracy ({len(y_test)} {data_spec.name} images): original {100 * accuracies['original']:.2f}%, "
            f"compressed {100 * accuracies['compressed']:.2f}% (before fine-tuning)")
        results.update({"test_images": int(len(y_test)), "deployed": o.deploy, "test_acc_original": accuracies["original"],
                        "test_acc_compressed": accuracies["compressed"]})
    folder.write_json("report.json", results)
    common.save_model_file(folder.file("model.npz"), compressed, normalize, loaded.dataset or data_spec.name)
    log(f"wrote {folder.file('report.json')}, {folder.file('model.npz')}")
    return 0
