"""``minibasis train``: train a zoo model from scratch, optionally with fixed random bases.

With ``--basis random`` every ``Conv2d`` becomes ``BasisConv2d.random``: Q fixed random
orthonormal basis filters (Eᵀ E = I, frozen), a BatchNorm on the Q-channel intermediate,
and learnable M×Q coefficients — the paper's learning from scratch (sections 2.2 and 4.5).
Q per layer is ``--num-basis`` or ``ceil(--basis-fraction · M)``, at most D = C·k². Where the
conv has a bias, both stages get one (the paper's Table 3 network: 6,400 learnable
parameters in its conv layers with Q = M).

Defaults follow the paper's Table 3 setting (``table3_cnn``, CIFAR-10, 40 epochs) and the
MATLAB example it cites (SGD with momentum 0.9, lr 0.001 divided by 10 every 8 epochs,
weight decay 0.004, batch 128). Augmentation (crop with padding 4, flip) is on unless
``--no-augment``. Checkpoints after every epoch; ``--resume`` continues bit for bit.
"""
from __future__ import annotations

import math
import time

from minibasis.experiments.errors import UserError, first_line, user_error_for_non_finite
from minibasis import data
from minibasis.experiments import argtypes, common, options, runs
from minibasis.experiments.loading import load_data, load_verb_model
from minibasis.measure import stored_values
from minibasis.model_files import checkpoint_meta
from minibasis.training import CheckpointError, NonFiniteError, Trainer, eval_metrics

__all__ = ["add_arguments", "run", "use_random_bases", "conv_learnable_parameters"]


def add_arguments(parser) -> None:
    options.add_model_arguments(parser, model="table3_cnn", depth=20, checkpoint=False)
    options.add_data_arguments(parser, dataset="cifar10", normalize="cifar10")
    group = parser.add_argument_group("bases")
    group.add_argument("--basis", choices=("none", "random"), default="none",
                       help="none: ordinary convolutions; random: fixed random orthonormal bases (default: none)")
    group.add_argument("--num-basis", type=argtypes.positive, default=None, help="Q for every layer (at most D = C·k²)")
    group.add_argument("--basis-fraction", type=argtypes.positive_float, default=1.0,
                       help="Q = ceil(fraction · M) per layer when --num-basis is not given (default: 1.0, Q = M)")
    group.add_argument("--basis-seed", type=int, default=None, help="seed of the random bases (default: --seed)")
    group = parser.add_argument_group("training (defaults: the paper's Table 3 setting)")
    group.add_argument("--epochs", type=argtypes.non_negative, default=40, help="epochs (default: 40)")
    group.add_argument("--lr", type=float, default=0.001, help="SGD learning rate (default: 0.001)")
    group.add_argument("--lr-step", type=argtypes.positive, default=8, help="multiply the rate by --gamma every N epochs (default: 8)")
    group.add_argument("--gamma", type=float, default=0.1, help="learning-rate decay factor (default: 0.1)")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    group.add_argument("--weight-decay", type=float, default=0.004, help="SGD weight decay (default: 0.004)")
    group.add_argument("--train-subset", type=argtypes.positive, default=None,
                       help="train on a random subset of N training images (default: all)")
    group.add_argument("--limit", type=argtypes.positive, default=None, help="evaluate on the first N test images (default: all)")
    group.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    group.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    group.add_argument("--detect-anomaly", action="store_true",
                       help="check every module's output and gradient for NaN/inf (slower); name the first culprit")
    options.add_common_arguments(parser, batch_size=128)


def use_random_bases(model, num_basis: int | None = None, fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """Replace every ``Conv2d`` of ``model`` by ``BasisConv2d.random`` (BN on the intermediate).

    Layer i (in ``named_modules`` order) gets the basis seed ``seed + i``. Q is ``num_basis``
    or ``ceil(fraction · M)``, capped at D. Returns one dict per replaced layer.
    """
    from minibasis.nn import BasisConv2d, Conv2d

    convs = [(path, m) for path, m in model.named_modules() if isinstance(m, Conv2d)]
    if not convs:
        raise UserError(f"{type(model).__name__} has no Conv2d layer to give a random basis")
    layers = []
    for i, (path, conv) in enumerate(convs):
        kh, kw = conv.kernel_size
        dim = conv.in_channels * kh * kw
        q = num_basis if num_basis is not None else math.ceil(fraction * conv.out_channels)
        q = max(1, min(q, dim))
        has_bias = conv.bias is not None
        layer = BasisConv2d.random(conv.in_channels, conv.out_channels, conv.kernel_size, q, stride=conv.stride,
                                   padding=conv.padding, bias=has_bias, bn=True, basis_bias=has_bias, seed=seed + i)
        model.set_submodule(path, layer)
        layers.append({"name": path, "M": conv.out_channels, "C": conv.in_channels, "k": [kh, kw], "D": dim, "Q": q})
    return layers


def conv_learnable_parameters(model) -> int:
    """Learnable parameters of the convolution layers as the paper counts them.

    ``Conv2d``: weight and bias. ``BasisConv2d``: coefficients and biases (the basis is fixed;
    the BatchNorm on its intermediate is a BatchNorm, not a conv parameter).
    """
    from minibasis.nn import BasisConv2d, Conv2d

    total = 0
    for m in model.modules():
        if isinstance(m, (Conv2d, BasisConv2d)):
            total += sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
    return total


def run(args) -> int:
    from minibasis import backend, manual_seed, optim
    from minibasis.experiments import plots

    spec = options.verb_spec(args, "train")
    o, run_spec, data_spec = spec.options, spec.run, spec.data
    if o.basis != "random":
        ignored = [opt for opt, v in (("--num-basis", o.num_basis), ("--basis-seed", o.basis_seed))
                   if v is not None] + (["--basis-fraction"] if o.basis_fraction != 1.0 else [])
        if ignored:
            raise UserError(f"{', '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} only with "
                            "--basis random")
    elif o.num_basis is not None and o.basis_fraction != 1.0:
        raise UserError("give --num-basis or --basis-fraction, not both")
    manual_seed(run_spec.seed)
    loaded = load_verb_model(spec)
    model, name, normalize = loaded.model, loaded.name, loaded.normalize
    layers = None
    if o.basis == "random":
        seed = run_spec.seed if o.basis_seed is None else o.basis_seed
        layers = use_random_bases(model, o.num_basis, o.basis_fraction, seed)
        name += " (random bases)"
    (x_train, y_train), (x_test, y_test) = load_data(data_spec, num_test=o.limit, seed=run_spec.seed,
                                                     train_subset=o.train_subset)
    folder = runs.prepare_run_folder(run_spec)
    log = folder.log
    started = time.perf_counter()
    conv_params = conv_learnable_parameters(model)
    total_params = model.num_parameters(learnable_only=True)
    log(f"minibasis train: {name}, {len(y_train)} training and {len(y_test)} test images ({data_spec.name}), "
        f"on {backend.current()}; output folder {folder.path}")
    log(f"learnable parameters: {total_params:,} in all, {conv_params:,} in the convolution layers; "
        f"stored values (parameters + buffers, fixed bases included): {stored_values(model):,}"
        + ("" if layers is None else f"; Q per layer {[layer['Q'] for layer in layers]}"))

    test_metrics = eval_metrics(x_test, y_test, data.eval_transform(normalize))
    loader = data.DataLoader((x_train, y_train), batch_size=run_spec.batch_size, shuffle=True, seed=run_spec.seed,
                             transform=data.train_transform(normalize, augment=not o.no_augment))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    scheduler = optim.StepLR(optimizer, step_size=o.lr_step, gamma=o.gamma)
    if run_spec.resume and not folder.file("checkpoint-train.npz").exists():
        log(f"--resume: {folder.path} holds no checkpoint yet; starting from the first epoch")
    try:
        history = Trainer(model, optimizer, loader, epochs=o.epochs, scheduler=scheduler,
                          eval_fn=test_metrics, folder=folder, seed=run_spec.seed,
                          detect_anomaly=o.detect_anomaly, progress=not run_spec.quiet,
                          extra_meta=checkpoint_meta(model, normalization=normalize,
                                                       dataset=data_spec.name)).fit(resume=run_spec.resume)
    except NonFiniteError as exc:
        raise user_error_for_non_finite(exc) from None
    except CheckpointError as exc:
        raise UserError(first_line(exc)) from None
    final = test_metrics(model)
    common.save_model_file(folder.file("model.npz"), model, normalize, data_spec.name)
    results = {"model": name, "basis": o.basis, "random_basis_layers": layers, "dataset": data_spec.name,
               "train_images": int(len(y_train)), "test_images": int(len(y_test)), "augment": not o.no_augment,
               "epochs": o.epochs, "lr": o.lr, "lr_step": o.lr_step, "gamma": o.gamma,
               "momentum": o.momentum, "weight_decay": o.weight_decay, "batch_size": run_spec.batch_size,
               "seed": run_spec.seed, "device": backend.current(),
               "normalize": normalize, "learnable_params": total_params, "conv_learnable_params": conv_params,
               "stored_values": stored_values(model),
               "test_acc": final["test_acc"], "test_loss": final["test_loss"], "history": history,
               "seconds": round(time.perf_counter() - started, 1)}
    folder.write_json("results.json", results)
    plot = plots.plot_training_curves(folder.file("training.png"), history,
                                      title=f"training {name}; test accuracy on {len(y_test):,} "
                                            f"{data_spec.name} test images")
    log(f"final test accuracy {100 * final['test_acc']:.2f}% ({conv_params:,} learnable conv parameters)")
    log(f"wrote {folder.file('results.json')}, {folder.file('model.npz')}"
        + (f", {plot}" if plot else f" ({plots.skip_reason(history)})"))
    return 0
