"""``minibasis verify formulas | exactness | counts``: check the paper against what executes.

Each sub-command prints a table (``--json PATH`` also writes the result as JSON) and exits
with 0 when every check passes, 1 when one fails, 2 on a usage error. The checks themselves
are :mod:`minibasis.verify`'s; this verb only parses, loads and reports.
"""
from __future__ import annotations

import sys
from pathlib import Path

from minibasis.experiments.errors import UserError, first_line

__all__ = ["add_arguments", "run", "load_model_argument"]


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="check", metavar="CHECK")
    sub.required = True

    formulas = sub.add_parser("formulas", help="random layer geometries: measured mults and parameters vs the "
                                               "closed forms (hypothesis shrinks a failure)",
                              description="Draw random Conv2d/BasisConv2d geometries, stratified by the conv path "
                                          "the engine takes, run them forward and backward, and compare measured "
                                          "multiplications and parameter counts with the paper's closed forms; "
                                          "at batch N, in one piece and in N chunks, the counts must be N times "
                                          "batch 1's.")
    formulas.add_argument("--cases", type=int, default=200,
                          help="geometries to try, shared out over the conv paths (default: 200; at least 7 to "
                               "reach every path)")
    formulas.add_argument("--seed", type=int, default=0, help="seed of the search (default: 0)")
    formulas.add_argument("--no-hypothesis", action="store_true",
                          help="draw with NumPy even when hypothesis is installed (no shrinking)")

    exactness = sub.add_parser("exactness", help="every conv replaced at t = 1: weight, layer-output and logit "
                                                 "errors against bounds per dtype",
                               description="Replace every conv at energy threshold 1 and report the relative error "
                                           "of the reconstructed weights, of each layer's output and of the logits.")
    _add_model_argument(exactness)
    exactness.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                           help="precision of the comparison (default: float64)")
    exactness.add_argument("--data", default=None,
                           help="folder holding cifar-10-batches-py: the first --images test images; 'none': "
                                "Gaussian inputs (default: the shared data folder where it holds CIFAR-10, "
                                "else Gaussian inputs)")
    exactness.add_argument("--images", type=int, default=64, help="inputs to compare on (default: 64)")
    exactness.add_argument("--normalize", choices=("imagenet", "cifar10", "none"), default=None,
                           help="normalization of the --data images (default: the model file's, else imagenet, as "
                                "the shared akamaster ResNets were trained)")

    counts = sub.add_parser("counts", help="per conv layer, original and compressed: measured forward and backward "
                                           "mults vs the closed forms",
                            description="Profile the model as it is and compressed at each threshold (one forward "
                                        "and one backward pass) and compare every conv layer's measured "
                                        "multiplications with the closed forms, at batch 1 and per image at "
                                        "--batch.")
    _add_model_argument(counts)
    counts.add_argument("--thresholds", default="1,0.9",
                        help="comma-separated energy thresholds to compress at (default: 1,0.9)")
    counts.add_argument("--input-size", type=int, default=32, help="input height and width (default: 32)")
    counts.add_argument("--batch", type=int, default=128,
                        help="also measure at this batch size, where the engine runs its multi-chunk, threaded "
                             "loops: the per-image counts must equal batch 1's (default: 128)")
    counts.add_argument("--in-channels", type=int, default=None,
                        help="input channels (default: the first conv layer's in_channels, else 3)")

    for parser_ in (formulas, exactness, counts):
        parser_.add_argument("--json", metavar="PATH", default=None,
                             help="also write the result as JSON to PATH ('-': the JSON on standard output, "
                                  "the table on standard error)")


def _add_model_argument(parser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_FILE",
                        help="a zoo model name (random init, seeded by --seed) or a model file: a minibasis .npz or "
                             "a PyTorch .th/.pth checkpoint such as akamaster's resnet20-12fca82f.th")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init and inputs (default: 0)")


def load_model_argument(spec: str, seed: int = 0):
    """``(model, metadata or None)``: the model a file holds (:func:`minibasis.load_model`; a bare
    file name may name a shared model, :func:`common.find_model_file`), or a zoo model with its
    random init seeded by ``seed``."""
    import minibasis
    from minibasis.experiments.common import find_model_file
    from minibasis.models import MODELS, get_model

    path = find_model_file(spec)
    if path.is_file():
        try:
            return minibasis.load_model(path)
        except (ValueError, TypeError, OSError) as exc:
            raise UserError(f"cannot load {path}: {first_line(exc)}") from None
    if spec not in MODELS:
        raise UserError(f"{spec!r} is neither a file nor a zoo model; known models: {', '.join(MODELS)}")
    minibasis.manual_seed(seed)
    return get_model(spec), None


def _input_images(args, metadata):
    """The first ``--images`` CIFAR-10 test images of ``--data``, normalized as ``--normalize`` or the
    model file says (:func:`options.normalization_for`); None without ``--data``."""
    from minibasis.experiments import options

    if args.data is None:
        shared = options.default_data_dir()
        data = shared if (shared / "cifar-10-batches-py").is_dir() else None
    else:
        data = None if args.data.lower() == "none" else Path(args.data)
    if data is None:
        return None
    _, (x_test, _) = options.load_dataset("cifar10", data, num_test=args.images)
    return options.eval_transform(options.normalization_for(args, metadata))(x_test)


def run(args) -> int:
    from minibasis import verify
    from minibasis.experiments.options import check_positive, parse_thresholds

    check_positive("--seed", args.seed, allow_zero=True)
    if args.check == "formulas":
        check_positive("--cases", args.cases)
        result = verify.check_formulas(args.cases, args.seed, use_hypothesis=False if args.no_hypothesis else None)
    elif args.check == "exactness":
        check_positive("--images", args.images)
        model, metadata = load_model_argument(args.model, args.seed)
        result = verify.check_exactness(model, _input_images(args, metadata), dtype=args.dtype,
                                        num_inputs=args.images, seed=args.seed)
    else:
        from minibasis.measure import input_channels

        check_positive("--input-size", args.input_size)
        check_positive("--batch", args.batch)
        if args.in_channels is not None:
            check_positive("--in-channels", args.in_channels)
        thresholds = parse_thresholds(args.thresholds)
        model, _ = load_model_argument(args.model, args.seed)
        channels = input_channels(model) if args.in_channels is None else args.in_channels
        shape = (1, channels, args.input_size, args.input_size)
        try:
            result = verify.check_counts(model, thresholds, input_shape=shape, batch=args.batch)
        except ValueError as exc:  # the model refuses this input (channels, size)
            raise UserError(f"{args.model} cannot run on an input of shape {shape}: {first_line(exc)}") from None
    print(result.table(), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(result.to_json())
    elif args.json:
        from minibasis.io import atomic_write
        try:
            with atomic_write(args.json, "w") as f:
                f.write(result.to_json() + "\n")
        except OSError as exc:
            raise UserError(f"cannot write {args.json}: {exc}") from None
    if not result.passed:
        print(f"minibasis verify {args.check}: FAILED", file=sys.stderr)
    return 0 if result.passed else 1
