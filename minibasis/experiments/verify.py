"""``minibasis verify formulas | exactness | counts``: check the paper against what executes.

Each sub-command prints a table (``--json PATH`` also writes the result as JSON) and exits
with 0 when every check passes, 1 when one fails, 2 on a usage error. The checks themselves
are :mod:`minibasis.verify`'s; this verb only parses, loads and reports.
"""
from __future__ import annotations

import sys
from pathlib import Path

from minibasis.cli import UserError

__all__ = ["add_arguments", "run", "load_model_argument"]


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="check", metavar="CHECK")
    sub.required = True

    formulas = sub.add_parser("formulas", help="random layer geometries: measured mults and parameters vs the "
                                               "closed forms (hypothesis shrinks a failure)",
                              description="Draw random Conv2d/BasisConv2d geometries, run them forward and backward, "
                                          "and compare measured multiplications and parameter counts with the "
                                          "paper's closed forms.")
    formulas.add_argument("--cases", type=int, default=200, help="geometries to try (default: 200)")
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
    exactness.add_argument("--data", type=Path, default=None,
                           help="folder holding cifar-10-batches-py: the first --images test images (default: "
                                "Gaussian inputs)")
    exactness.add_argument("--images", type=int, default=64, help="inputs to compare on (default: 64)")
    exactness.add_argument("--normalize", choices=("imagenet", "cifar10", "none"), default="imagenet",
                           help="normalization of the --data images (default: imagenet, as the shared akamaster "
                                "ResNets were trained)")

    for name, parser_ in (("formulas", formulas), ("exactness", exactness)):
        parser_.add_argument("--json", metavar="PATH", default=None, help="also write the result as JSON to PATH")


def _add_model_argument(parser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_FILE",
                        help="a zoo model name (random init, seeded by --seed) or a model file: a minibasis .npz or "
                             "a PyTorch .th/.pth checkpoint such as akamaster's resnet20-12fca82f.th")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init and inputs (default: 0)")


def load_model_argument(spec: str, seed: int = 0):
    """A zoo model (random init seeded by ``seed``) or the model a file holds."""
    import minibasis
    from minibasis.models import MODELS, get_model

    path = Path(spec)
    if path.is_file():
        from minibasis.experiments import options
        state, _ = options.read_state(path)
        blocks = {key.split(".")[1] for key in state if key.startswith("layer1.")}
        if "conv1.weight" not in state or not blocks:
            raise UserError(f"{path}: only CIFAR ResNet files can be read yet")
        model = get_model("resnet_cifar", depth=6 * len(blocks) + 2, num_classes=state["linear.weight"].shape[0])
        options.load_weights(model, path)
        return model
    if spec not in MODELS:
        raise UserError(f"{spec!r} is neither a file nor a zoo model; known models: {', '.join(MODELS)}")
    minibasis.manual_seed(seed)
    return get_model(spec)


def _exactness(args):
    from minibasis import verify
    from minibasis.experiments import options

    model = load_model_argument(args.model, args.seed)
    options.check_positive("--images", args.images)
    images = None
    if args.data is not None:
        _, (x_test, _) = options.load_dataset("cifar10", args.data, num_test=args.images)
        images = options.eval_transform(args.normalize)(x_test)
    return verify.check_exactness(model, images, dtype=args.dtype, num_inputs=args.images, seed=args.seed)


def run(args) -> int:
    from minibasis import verify
    from minibasis.experiments.options import check_positive

    check_positive("--seed", args.seed, allow_zero=True)
    if args.check == "formulas":
        check_positive("--cases", args.cases)
        result = verify.check_formulas(args.cases, args.seed, use_hypothesis=False if args.no_hypothesis else None)
    else:
        result = _exactness(args)
    print(result.table())
    if args.json:
        from minibasis.io import atomic_write
        try:
            with atomic_write(args.json, "w") as f:
                f.write(result.to_json() + "\n")
        except OSError as exc:
            raise UserError(f"cannot write {args.json}: {exc}") from None
    if not result.passed:
        print(f"minibasis verify {args.check}: FAILED", file=sys.stderr)
    return 0 if result.passed else 1
