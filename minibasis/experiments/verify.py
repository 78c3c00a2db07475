"""``minibasis verify formulas | exactness | counts``: check the paper against what executes.

Each sub-command prints a table (``--json PATH`` also writes the result as JSON) and exits
with 0 when every check passes, 1 when one fails, 2 on a usage error. The checks themselves
are :mod:`minibasis.verify`'s; this verb only parses, loads and reports.
"""
from __future__ import annotations

import sys
from pathlib import Path

import minibasis
from minibasis import data
from minibasis.experiments import argtypes, common, options
from minibasis.experiments.errors import UserError, first_line
from minibasis.experiments.loading import load_data, model_argument, model_operand, normalization
from minibasis.experiments.options import DataSpec

__all__ = ["add_arguments", "run"]


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
    formulas.add_argument("--cases", type=argtypes.positive, default=200,
                          help="geometries to try, shared out over the conv paths (default: 200; at least 7 to "
                               "reach every path)")
    formulas.add_argument("--seed", type=argtypes.non_negative, default=0, help="seed of the search (default: 0)")
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
    exactness.add_argument("--images", type=argtypes.positive, default=64, help="inputs to compare on (default: 64)")
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
    counts.add_argument("--thresholds", type=argtypes.thresholds, default="1,0.9",
                        help="comma-separated energy thresholds to compress at (default: 1,0.9)")
    counts.add_argument("--input-size", type=argtypes.positive, default=32, help="input height and width (default: 32)")
    counts.add_argument("--batch", type=argtypes.positive, default=128,
                        help="also measure at this batch size, where the engine runs its multi-chunk, threaded "
                             "loops: the per-image counts must equal batch 1's (default: 128)")
    counts.add_argument("--in-channels", type=argtypes.positive, default=None,
                        help="input channels (default: the first conv layer's in_channels, else 3)")

    for parser_ in (formulas, exactness, counts):
        parser_.add_argument("--json", metavar="PATH", type=argtypes.output_file, default=None,
                             help="also write the result as JSON to PATH ('-': the JSON on standard output, "
                                  "the table on standard error)")


def _add_model_argument(parser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_FILE",
                        help="a zoo model name (random init, seeded by --seed) or a model file: a minibasis .npz or "
                             "a PyTorch .th/.pth checkpoint such as akamaster's resnet20-12fca82f.th")
    parser.add_argument("--seed", type=argtypes.non_negative, default=0, help="seed of the random init and inputs (default: 0)")


def _input_images(o, metadata):
    """The first ``--images`` CIFAR-10 test images of ``--data`` (default: the shared data folder where
    it holds CIFAR-10), normalized as ``--normalize`` or the model file says
    (:func:`loading.normalization`); None (Gaussian inputs) with ``--data none`` or no CIFAR-10."""
    if o.data is None:
        shared = common.default_data_dir()
        root = shared if (shared / "cifar-10-batches-py").is_dir() else None
    else:
        root = None if o.data.lower() == "none" else Path(o.data)
    if root is None:
        return None
    spec = DataSpec("cifar10", root, o.normalize, "imagenet")
    _, (x_test, _) = load_data(spec, num_test=o.images)
    return data.eval_transform(normalization(spec, metadata))(x_test)


def _model(o, seed: int):
    """``(model, metadata or None)`` of MODEL_OR_FILE (:func:`loading.model_argument`; a bare file
    name may name a shared model); a zoo model's random initialization is seeded by ``--seed``."""
    minibasis.manual_seed(seed)
    return model_argument(model_operand(o.model, "MODEL_OR_FILE"))


def run(args) -> int:
    from minibasis import verify

    spec = options.verb_spec(args, "verify")
    o, seed = spec.options, spec.run.seed
    if o.check == "formulas":
        result = verify.check_formulas(o.cases, seed, use_hypothesis=False if o.no_hypothesis else None)
    elif o.check == "exactness":
        model, metadata = _model(o, seed)
        result = verify.check_exactness(model, _input_images(o, metadata), dtype=o.dtype,
                                        num_inputs=o.images, seed=seed)
    else:
        from minibasis.measure import input_channels

        thresholds = list(o.thresholds)
        model, _ = _model(o, seed)
        channels = input_channels(model) if o.in_channels is None else o.in_channels
        shape = (1, channels, o.input_size, o.input_size)
        try:
            result = verify.check_counts(model, thresholds, input_shape=shape, batch=o.batch)
        except ValueError as exc:  # the model refuses this input (channels, size)
            raise UserError(f"{o.model} cannot run on an input of shape {shape}: {first_line(exc)}") from None
    print(result.table(), file=sys.stderr if o.json == "-" else sys.stdout)
    if o.json == "-":
        print(result.to_json())
    elif o.json:
        from minibasis.serialization import atomic_write
        try:
            with atomic_write(o.json, "w") as f:
                f.write(result.to_json() + "\n")
        except OSError as exc:
            raise UserError(f"cannot write {o.json}: {exc}") from None
    if not result.passed:
        print(f"minibasis verify {o.check}: FAILED", file=sys.stderr)
    return 0 if result.passed else 1
