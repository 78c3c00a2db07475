"""``minibasis finetune``: the paper's two-step fine-tuning of a compressed network (section 4.3).

1. Compress the trained network at threshold t, or under a measured budget
   ``--target-mult-ratio R``: ``--allocation uniform`` (default, the paper's) takes the largest t
   of ``--thresholds`` whose measured conv multiplications are at most R of the original's;
   ``--allocation greedy`` chooses Q per layer by energy, ``--allocation sensitivity`` by the loss
   it measures on ``--calibration-images`` training images (:func:`minibasis.compress`).
2. Step 1: train only the BasisConv coefficients (default 15 epochs, SGD, lr 0.1 divided by
   10 every 5 epochs).
3. Step 2: train every non-convolutional parameter — coefficients, BatchNorm, fully connected
   layers, biases — (default 10 epochs, lr 5e-4). The basis filters (buffers) and the weights
   of convolutions kept as they are stay frozen throughout. ``--learn-basis`` (beyond the paper)
   trains the bases in step 1 beside the coefficients: the same multiplications, Q·D more
   learnable values per layer.

Augmentation (random crop with padding 4, horizontal flip) is on; the test accuracy is
measured after every epoch. ``--baseline`` fine-tunes the *uncompressed* original under the
same budget instead (step 1 then trains its convolution weights, the counterpart of the
coefficients; step 2 its non-convolutional parameters), which is the fair reference when
the data differ from the original training data (the shared CIFAR-10 is JPEG-re-encoded).
``--recalibrate-bn N`` re-estimates every BatchNorm's running statistics from N training images
right after compression, before step 1 (see :func:`recalibrate_batch_norm`). ``--distill`` adds
distillation from the uncompressed original as loaded (the teacher; ``--teacher MODEL_FILE`` names
another, e.g. the original fine-tuned by ``--baseline``) to both steps:
loss = (1 − w)·CE + w·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) with w = ``--distill-weight``
and T = ``--temperature`` (:class:`minibasis.training.Distillation`).

The run folder gets ``config.json``, ``log.txt``, ``metrics-step1/2.{json,csv}``,
``checkpoint-step1/2.npz`` (every epoch; ``--resume`` continues), ``results.json``,
``finetune.png`` and ``model.npz`` (the fine-tuned model, loadable with ``--checkpoint``).
"""
from __future__ import annotations

import time

from minibasis.experiments.errors import UserError, first_line, user_error_for_non_finite
from minibasis.allocation import BudgetError
from minibasis.compress import compress, copy_module
from minibasis import data
from minibasis.experiments import argtypes, common, options, runs
from minibasis.experiments.loading import calibration_data, load_data, load_verb_model, model_argument, model_file
from minibasis.measure import stored_values
from minibasis.model_files import checkpoint_meta
from minibasis.training import (DEFAULT_BASIS_LR_SCALE, CheckpointError, NonFiniteError, coefficient_parameters,
                                conv_weight_parameters, eval_metrics, fine_tune, learnable_bases, non_conv_parameters,
                                recalibrate_batch_norm)

__all__ = ["add_arguments", "run", "compress_as_asked", "load_teacher"]


def add_arguments(parser) -> None:
    options.add_model_arguments(parser, model="resnet_cifar", depth=20, checkpoint="auto")
    options.add_data_arguments(parser, dataset="cifar10", normalize="imagenet")
    group = parser.add_argument_group("compression")
    group.add_argument("--threshold", type=argtypes.fraction, default=None, help="energy threshold t (default: 0.9)")
    options.add_budget_arguments(group)
    group.add_argument("--thresholds", type=argtypes.thresholds, default=",".join(f"{t:g}" for t in options.DEFAULT_THRESHOLDS),
                       help="grid searched by --allocation uniform (default: the paper's 1.0 ... 0.7)")
    group.add_argument("--replace-all", action="store_true",
                       help="replace every conv, even where BasisConv needs as many multiplications or more")
    group.add_argument("--baseline", action="store_true",
                       help="fine-tune the uncompressed original under the same budget (a fair reference)")
    group = parser.add_argument_group("distillation from the uncompressed original")
    group.add_argument("--distill", action="store_true",
                       help="add the KL divergence to the original's softened outputs to the loss of both steps")
    group.add_argument("--distill-weight", type=argtypes.fraction, default=None,
                       help="w in (1 - w)·CE + w·T²·KL (default with --distill: 0.5)")
    group.add_argument("--temperature", type=argtypes.positive_float, default=None,
                       help="T (default with --distill: 4)")
    group.add_argument("--teacher", default=None, metavar="MODEL_FILE",
                       help="with --distill: distill from this model file instead of the original as loaded "
                            "(e.g. the original fine-tuned by --baseline); same classes and input normalization")
    group = parser.add_argument_group("fine-tuning (defaults: the paper's section 4.3)")
    group.add_argument("--epochs1", type=argtypes.non_negative, default=15, help="step 1 epochs, coefficients only (default: 15)")
    group.add_argument("--learn-basis", action="store_true",
                       help="beyond the paper: train the basis filters in step 1 beside the coefficients "
                            "(same multiplications; Q·D more learnable values per layer)")
    group.add_argument("--basis-lr-scale", type=argtypes.positive_float, default=None,
                       help="with --learn-basis: the bases' step 1 rate as a multiple of --lr1 "
                            f"(default: {DEFAULT_BASIS_LR_SCALE:g})")
    group.add_argument("--lr1", type=float, default=0.1, help="step 1 learning rate (default: 0.1)")
    group.add_argument("--lr1-step", type=argtypes.positive, default=5, help="divide the step 1 rate by 10 every N epochs (default: 5)")
    group.add_argument("--epochs2", type=argtypes.non_negative, default=10, help="step 2 epochs, all non-conv parameters (default: 10)")
    group.add_argument("--lr2", type=float, default=5e-4, help="step 2 learning rate (default: 5e-4)")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    group.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (default: 1e-4)")
    group.add_argument("--train-subset", type=argtypes.positive, default=None,
                       help="train on a random subset of N training images (default: all)")
    group.add_argument("--limit", type=argtypes.positive, default=None, help="evaluate on the first N test images (default: all)")
    group.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    group.add_argument("--recalibrate-bn", type=argtypes.non_negative, default=0, metavar="N",
                       help="before fine-tuning, re-estimate every BatchNorm's running mean and variance "
                            "from the first N training images (forward passes only, no gradient step; "
                            "default: 0, off)")
    group.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    group.add_argument("--detect-anomaly", action="store_true",
                       help="check every module's output and gradient for NaN/inf (slower); name the first culprit")
    options.add_common_arguments(parser, batch_size=128)


def _check_settings(o) -> None:
    """The options against each other, before anything is loaded (each was checked on its own)."""
    default_grid = list(o.thresholds) == list(options.DEFAULT_THRESHOLDS)
    if o.baseline:
        given = [opt for opt, v in (("--threshold", o.threshold), ("--target-mult-ratio", o.target_mult_ratio))
                 if v is not None] + (["--replace-all"] if o.replace_all else []) \
            + ([f"--allocation {o.allocation}"] if o.allocation != "uniform" else []) \
            + (["--learn-basis"] if o.learn_basis else [])
        if given:
            raise UserError(f"--baseline fine-tunes the uncompressed original; {', '.join(given)} would be ignored")
    if o.target_mult_ratio is not None:
        if o.threshold is not None:
            raise UserError("give --threshold or --target-mult-ratio, not both")
        if o.allocation != "uniform" and not default_grid:
            raise UserError(f"--thresholds is the grid of --allocation uniform; {o.allocation} chooses Q per layer")
    else:
        if not default_grid:
            raise UserError("--thresholds is the grid of --target-mult-ratio; without it, give one --threshold")
        if o.allocation != "uniform":
            raise UserError("--allocation chooses Q under a budget: give --target-mult-ratio")
    if o.calibration_images is not None and (o.allocation != "sensitivity" or o.baseline):
        raise UserError("--calibration-images applies only with --allocation sensitivity")
    if o.basis_lr_scale is not None and not o.learn_basis:
        raise UserError("--basis-lr-scale applies only with --learn-basis")
    if not o.distill:
        given = [opt for opt, v in (("--distill-weight", o.distill_weight), ("--temperature", o.temperature),
                                    ("--teacher", o.teacher)) if v is not None]
        if given:
            raise UserError(f"{', '.join(given)} applies only with --distill")


def load_teacher(o, loaded):
    """The model to distill from: a copy of the original as loaded, or the ``--teacher`` file,
    refused when its class count or input normalization differs from the student's."""
    if o.teacher is None:
        return copy_module(loaded.model)
    teacher, metadata = model_argument(model_file(o.teacher, "--teacher"))
    if metadata.normalization not in (None, loaded.normalize):
        raise UserError(f"--teacher {o.teacher} expects {metadata.normalization} input normalization, "
                        f"the student {loaded.normalize}")
    classes = getattr(loaded.metadata, "num_classes", None)
    if None not in (metadata.num_classes, classes) and metadata.num_classes != classes:
        raise UserError(f"--teacher {o.teacher} has {metadata.num_classes} classes, the student {classes}")
    return teacher


def compress_as_asked(model, o, calibration=None):
    """``(compressed model, report)`` at ``--threshold`` (default 0.9) or under ``--target-mult-ratio``;
    a :class:`UserError` when the budget cannot be met. Runs before any data is read (``calibration``,
    for ``--allocation sensitivity``, is read only once the budget is known to be reachable)."""
    try:
        if o.target_mult_ratio is None:
            return compress(model, energy_threshold=0.9 if o.threshold is None else o.threshold,
                            skip_unprofitable=not o.replace_all)
        grid = list(o.thresholds) if o.allocation == "uniform" else None
        return compress(model, target_mult_ratio=o.target_mult_ratio, allocation=o.allocation,
                        thresholds=grid, skip_unprofitable=not o.replace_all,
                        calibration=calibration if o.allocation == "sensitivity" else None)
    except BudgetError as exc:
        raise UserError(first_line(exc)) from None


def describe_compression(report) -> str:
    """``t = 0.7``, or ``greedy allocation, budget 0.4523`` (with uniform's t)."""
    if report.allocation is None:
        return f"t = {report.energy_threshold:g}"
    t = "" if report.energy_threshold is None else f", t = {report.energy_threshold:.4g}"
    return f"{report.allocation} allocation, budget {report.target_mult_ratio:g}{t}"


def run(args) -> int:
    from minibasis import backend, manual_seed
    from minibasis.experiments import plots

    spec = options.verb_spec(args, "finetune")
    o, run_spec, data_spec = spec.options, spec.run, spec.data
    _check_settings(o)
    loaded = load_verb_model(spec, compressing=not o.baseline)
    model, name, normalize, checkpoint = loaded.model, loaded.name, loaded.normalize, spec.model.checkpoint
    # Compressed before any data is read: an unreachable --target-mult-ratio costs no data loading.
    calibration = calibration_data(data_spec, normalize, o.calibration_images, run_spec.seed)
    compressed = None if o.baseline else compress_as_asked(model, o, calibration)
    # The teacher: separate from the student (under --baseline the original itself is trained).
    teacher = load_teacher(o, loaded) if o.distill else None
    distill_weight = (0.5 if o.distill_weight is None else o.distill_weight) if o.distill else 0.0
    temperature = 4.0 if o.temperature is None else o.temperature
    basis_lr_scale = DEFAULT_BASIS_LR_SCALE if o.basis_lr_scale is None else o.basis_lr_scale
    (x_train, y_train), (x_test, y_test) = load_data(data_spec, num_test=o.limit, seed=run_spec.seed,
                                                     train_subset=o.train_subset)
    folder = runs.prepare_run_folder(run_spec)
    log = folder.log
    started = time.perf_counter()
    log(f"minibasis finetune: {name} from {checkpoint or 'random initialization'}; {len(y_train)} training and "
        f"{len(y_test)} test images ({data_spec.name}); on {run_spec.device}; output folder {folder.path}")
    if note := common.data_note(data_spec.name, data_spec.root):
        log(note)
    if run_spec.resume and not any(folder.path.glob("checkpoint-*.npz")):
        log(f"--resume: {folder.path} holds no checkpoint yet; starting from the first epoch")
    manual_seed(run_spec.seed)
    test_transform = data.eval_transform(normalize)
    test_metrics = eval_metrics(x_test, y_test, test_transform)

    original_acc = test_metrics(model)["test_acc"]
    log(f"original {name}: test accuracy {100 * original_acc:.2f}%")
    compression = threshold = None
    if o.baseline:
        tuned = model
        step1_params = conv_weight_parameters(tuned)
        log("baseline: fine-tuning the uncompressed original (step 1: conv weights; step 2: non-conv parameters)")
    else:
        tuned, report = compressed
        compression, threshold = report.to_dict(), report.energy_threshold
        for line in report.table().splitlines():
            log(line)
        log(f"compressed, {describe_compression(report)}: {len(report.replaced)}/{len(report.layers)} convs replaced, "
            f"conv multiplications {report.conv_mults_before:,} -> {report.conv_mults_after:,} "
            f"({100 * report.mult_ratio:.1f}%), learnable parameters {report.params_before:,} -> "
            f"{report.params_after:,}, stored values {report.stored_before:,} -> {report.stored_after:,}")
        step1_params = coefficient_parameters(tuned) + (learnable_bases(tuned) if o.learn_basis else [])
    before_acc = test_metrics(tuned)["test_acc"]
    log(f"before fine-tuning: test accuracy {100 * before_acc:.2f}%")
    recalibrated_acc = None
    if o.recalibrate_bn:
        count = recalibrate_batch_norm(tuned, x_train[:o.recalibrate_bn], batch_size=256,
                                       transform=test_transform)
        recalibrated_acc = test_metrics(tuned)["test_acc"]
        log(f"BatchNorm statistics re-estimated from {count} training images (no augmentation, no gradient "
            f"step): test accuracy {100 * recalibrated_acc:.2f}%")

    loader = data.DataLoader((x_train, y_train), batch_size=run_spec.batch_size, shuffle=True, seed=run_spec.seed,
                             transform=data.train_transform(normalize, augment=not o.no_augment))
    log(f"step 1: {sum(p.numel() for p in step1_params):,} parameters"
        + (f" (bases included, at {basis_lr_scale:g} x the rate)" if o.learn_basis else "")
        + f", {o.epochs1} epochs, lr {o.lr1:g} /10 every {o.lr1_step}; "
        f"step 2: {sum(p.numel() for p in non_conv_parameters(tuned)):,} parameters, {o.epochs2} epochs, lr {o.lr2:g}")
    if teacher is not None:
        log(f"distillation from {o.teacher or 'the original'}: loss = (1 - {distill_weight:g})·CE + {distill_weight:g}·"
            f"{temperature:g}²·KL(softmax(teacher/{temperature:g}) ‖ softmax(student/{temperature:g}))")
    try:
        history = fine_tune(tuned, loader, step1_params=step1_params, epochs1=o.epochs1, lr1=o.lr1,
                            lr1_step=o.lr1_step, epochs2=o.epochs2, lr2=o.lr2, momentum=o.momentum,
                            weight_decay=o.weight_decay, eval_fn=test_metrics, folder=folder, seed=run_spec.seed,
                            detect_anomaly=o.detect_anomaly, progress=not run_spec.quiet, resume=run_spec.resume,
                            extra_meta=checkpoint_meta(tuned, normalization=normalize,
                                                       dataset=loaded.dataset or data_spec.name),
                            teacher=teacher, distill_weight=distill_weight, temperature=temperature,
                            basis_lr_scale=basis_lr_scale)
    except NonFiniteError as exc:
        raise user_error_for_non_finite(exc) from None
    except CheckpointError as exc:
        raise UserError(first_line(exc)) from None
    after_acc = test_metrics(tuned)["test_acc"]
    common.save_model_file(folder.file("model.npz"), tuned, normalize, loaded.dataset or data_spec.name)
    results = {"model": name, "checkpoint": str(checkpoint) if checkpoint else None,
               "baseline": o.baseline, "threshold": threshold, "target_mult_ratio": o.target_mult_ratio,
               "allocation": None if o.baseline or o.target_mult_ratio is None else o.allocation,
               "learn_basis": o.learn_basis, "basis_lr_scale": basis_lr_scale if o.learn_basis else None,
               "distill": o.distill, "distill_weight": distill_weight if o.distill else None,
               "temperature": temperature if o.distill else None,
               "teacher": None if not o.distill else o.teacher or "the original",
               "teacher_mults": sum(row.get("teacher_mults", 0) for row in history) if o.distill else None,
               "dataset": data_spec.name, "normalize": normalize,
               "train_images": int(len(y_train)), "test_images": int(len(y_test)), "augment": not o.no_augment,
               "epochs1": o.epochs1, "lr1": o.lr1, "lr1_step": o.lr1_step, "epochs2": o.epochs2,
               "lr2": o.lr2, "momentum": o.momentum, "weight_decay": o.weight_decay,
               "batch_size": run_spec.batch_size, "seed": run_spec.seed, "device": backend.current(),
               "test_acc_original": original_acc, "test_acc_before": before_acc,
               "recalibrate_bn": o.recalibrate_bn, "test_acc_recalibrated": recalibrated_acc,
               "test_acc_after": after_acc,
               "learnable_params": tuned.num_parameters(),  # every Parameter (bases too with --learn-basis)
               "stored_values": stored_values(tuned),      # parameters + persistent buffers (bases included)
               "compression": compression, "history": history,
               "seconds": round(time.perf_counter() - started, 1)}
    folder.write_json("results.json", results)
    plot = plots.plot_training_curves(folder.file("finetune.png"), history,
                                      title=f"fine-tuning {name}" + ("" if o.baseline else f", {describe_compression(report)}")
                                      + (", bases learned" if o.learn_basis else "")
                                      + f"; test accuracy on {len(y_test):,} {data_spec.name} test images",
                                      references={"original": original_acc,
                                                  "baseline start" if o.baseline else "compressed, before fine-tuning":
                                                      before_acc})
    log(f"test accuracy: original {100 * original_acc:.2f}%, "
        f"{'baseline start' if o.baseline else 'compressed'} {100 * before_acc:.2f}%, "
        f"after fine-tuning {100 * after_acc:.2f}%")
    log(f"learnable parameters {results['learnable_params']:,}, stored values {results['stored_values']:,}")
    log(f"wrote {folder.file('results.json')}, {folder.file('model.npz')}"
        + (f", {plot}" if plot else f" ({plots.skip_reason(history)})"))
    return 0
