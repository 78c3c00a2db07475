"""Command-line options the experiment verbs share, and what they turn into.

* ``--device``, ``--seed``, ``--batch-size``, ``--output`` (every verb);
* ``--model``, ``--depth``, ``--num-classes``, ``--checkpoint`` → a zoo model with weights;
* ``--dataset``, ``--data``, ``--normalize`` → host arrays and the transforms to feed them.

Every problem a user can fix (unknown model, missing data folder, a checkpoint for another
architecture, CuPy missing) becomes a one-line :class:`minibasis.experiments.errors.UserError`.
"""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from minibasis import backend
from minibasis.experiments.errors import UserError, first_line

__all__ = ["add_common_arguments", "select_device", "check_positive", "add_model_arguments", "build_model",
           "build_model_with_weights", "load_weights", "add_data_arguments", "load_dataset", "load_training_data",
           "eval_transform", "train_transform", "test_metrics_for",
           "parse_thresholds", "DEFAULT_THRESHOLDS", "DATASETS", "default_data_dir", "pretrained_checkpoint"]

#: The paper's Figure 2 thresholds.
DEFAULT_THRESHOLDS = (1.0, 0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


# ---------------------------------------------------------------------------
# Common options
# ---------------------------------------------------------------------------
def add_common_arguments(parser, *, batch_size: int = 128, seed: int = 0) -> None:
    """``--device``, ``--seed``, ``--batch-size`` and ``--output`` (every verb takes them)."""
    group = parser.add_argument_group("common options")
    # "strict" (a CPU stand-in that refuses host/device mix-ups as CuPy does) is accepted too,
    # so the whole command path can be checked for device bugs on a machine without a GPU.
    group.add_argument("--device", choices=backend.available_backends(), default="numpy", metavar="{numpy,cupy}",
                       help="array backend: numpy (CPU) or cupy (NVIDIA GPU) (default: numpy)")
    group.add_argument("--seed", type=int, default=seed, help=f"random seed (default: {seed})")
    group.add_argument("--batch-size", type=int, default=batch_size, help=f"mini-batch size (default: {batch_size})")
    group.add_argument("--output", type=Path, default=None,
                       help="folder for results, logs, checkpoints and plots (default: runs/<verb>-<timestamp>)")
    group.add_argument("--quiet", action="store_true", help="no progress lines, only results")


def select_device(name: str) -> None:
    """Switch the backend, turning a missing CuPy or GPU into a one-line :class:`UserError`."""
    try:
        backend.use(name)
    except (RuntimeError, ValueError, ImportError) as exc:
        raise UserError(f"--device {name} is not usable here: {first_line(exc)}") from None


def check_positive(option: str, value, allow_zero: bool = False):
    """``value`` unchanged, or a one-line :class:`UserError` when it is not positive."""
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UserError(f"{option} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def check_common(args) -> None:
    """Validate the common options and switch the device."""
    check_positive("--batch-size", args.batch_size)
    check_positive("--seed", args.seed, allow_zero=True)
    select_device(args.device)


def parse_thresholds(text: str) -> list[float]:
    """``"1.0,0.95,0.9"`` → ``[1.0, 0.95, 0.9]``, each in (0, 1]."""
    try:
        values = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--thresholds must be comma-separated numbers in (0, 1], got {text!r}") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise UserError(f"--thresholds must be comma-separated numbers in (0, 1], got {text!r}")
    return values


# ---------------------------------------------------------------------------
# Models and checkpoints
# ---------------------------------------------------------------------------
def default_shared() -> Path:
    from minibasis.experiments.common import shared_dir
    return shared_dir()


def default_data_dir() -> Path:
    """``<shared>/data`` ($MINIBASIS_SHARED, else ../shared beside the repository)."""
    return default_shared() / "data"


def pretrained_checkpoint(model: str, depth: int | None) -> Path | None:
    """The shared akamaster checkpoint for ``resnet_cifar`` of ``depth`` (``resnet<depth>-*.th``), if present."""
    name = model if depth is None or model != "resnet_cifar" else f"resnet{depth}"
    matches = sorted(glob.glob(str(default_shared() / "models" / "akamaster" / f"{name}-*.th")))
    return Path(matches[0]) if matches else None


def add_model_arguments(parser, *, model: str = "resnet_cifar", depth: int | None = 56,
                        checkpoint: str | None = "auto", num_classes: int = 10) -> None:
    """``--model``, ``--depth``, ``--num-classes`` and (unless ``checkpoint`` is False) ``--checkpoint``."""
    from minibasis.models import model_names

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=model,
                       help=f"zoo model (default: {model}); one of {', '.join(model_names())}")
    group.add_argument("--depth", type=int, default=depth,
                       help=f"depth of resnet_cifar (20, 32, 44, 56, 110, 1202) (default: {depth})")
    group.add_argument("--num-classes", type=int, default=num_classes, help=f"classes (default: {num_classes})")
    if checkpoint is not False:
        group.add_argument("--checkpoint", default=checkpoint,
                           help="weights: a PyTorch checkpoint (.th/.pt/.pth, read without torch) or a minibasis "
                                ".npz; 'auto' (default) picks the shared pretrained "
                                "models/akamaster/resnet<depth>-*.th; 'none' keeps the random init")


def build_model(args):
    """The zoo model named by ``--model`` (``--depth`` for resnet_cifar, ``--num-classes``)."""
    from minibasis.models import MODELS, get_model

    if args.model not in MODELS:
        raise UserError(f"unknown model {args.model!r}; known models: {', '.join(MODELS)}")
    kwargs = {"num_classes": check_positive("--num-classes", args.num_classes)}
    if args.model == "resnet_cifar":
        kwargs["depth"] = args.depth
    try:
        return get_model(args.model, **kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(f"cannot build model {args.model!r}: {first_line(exc)}") from None


def describe_model(args) -> str:
    return f"resnet{args.depth}" if args.model == "resnet_cifar" else args.model


def resolve_checkpoint(args) -> Path | None:
    """``--checkpoint`` as a path (``auto`` → the shared pretrained file; ``none`` → None)."""
    value = getattr(args, "checkpoint", None)
    if value is None or str(value).lower() == "none":
        return None
    if str(value) == "auto":
        found = pretrained_checkpoint(args.model, getattr(args, "depth", None))
        if found is None:
            where = default_shared() / "models" / "akamaster"
            raise UserError(f"no --checkpoint given and no pretrained {describe_model(args)} in {where} "
                            "(set MINIBASIS_SHARED or pass --checkpoint PATH)")
        return found
    path = Path(value)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return path


def build_model_with_weights(args) -> tuple:
    """``(model, checkpoint)``: :func:`build_model` with ``--checkpoint`` loaded into it
    (:func:`resolve_checkpoint`; ``checkpoint`` is None when the model keeps its random init)."""
    model = build_model(args)
    checkpoint = resolve_checkpoint(args)
    if checkpoint is not None:
        load_weights(model, checkpoint, describe_model(args))
    return model, checkpoint


def read_state(path: Path) -> tuple[dict, dict]:
    """(name → array, BasisConv layout) from a PyTorch checkpoint, a minibasis ``.npz`` state,
    model file (:func:`save_model_file`) or training checkpoint."""
    from minibasis import io
    from minibasis.experiments.trainer import checkpoint_read_errors

    path = Path(path)
    layout: dict = {}
    with checkpoint_read_errors(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"PK\x03\x04" and path.suffix == ".npz":
            state = io.load(path)
            if isinstance(state, dict) and state.get("format") == MODEL_FILE_FORMAT:
                layout = state.get("basisconv") or {}
                state = state["state_dict"]
            elif isinstance(state, dict) and isinstance(state.get("model"), dict):
                layout = (state.get("meta") or {}).get("basisconv") or {}
                state = state["model"]  # a training checkpoint: the model part
        else:
            state = io.load_torch_checkpoint(path)
    if not isinstance(state, dict) or not state:
        raise UserError(f"checkpoint {path} holds no model weights")
    if not isinstance(layout, dict):
        raise UserError(f"checkpoint {path} has a malformed BasisConv layout")
    return state, layout


def load_weights(model, path: Path, description: str = "") -> None:
    """Load ``path`` into ``model``; a checkpoint for another architecture is a one-line UserError.

    A file saved from a compressed or random-basis model carries its BasisConv layout: the
    matching ``Conv2d`` layers of ``model`` are replaced first, so the weights fit.
    """
    from minibasis.experiments.trainer import load_model_state

    state, layout = read_state(path)
    if layout:
        apply_basis_layout(model, layout, source=f"checkpoint {path}")
    label = description or type(model).__name__
    load_model_state(model, state, source=f"checkpoint {path}", model_name=label)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
#: ``--dataset`` name → (loader in minibasis.data, number of classes)
DATASETS = {"cifar10": ("load_cifar10", 10), "cifar100": ("load_cifar100", 100), "svhn": ("load_svhn", 10),
            "synthetic": ("synthetic", 10)}


def add_data_arguments(parser, *, dataset: str = "cifar10", normalize: str = "imagenet") -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=sorted(DATASETS), default=dataset, help=f"(default: {dataset})")
    group.add_argument("--data", type=Path, default=None,
                       help="folder holding the dataset files (default: <shared>/data, where <shared> is "
                            "$MINIBASIS_SHARED or ../shared beside the repository)")
    group.add_argument("--normalize", choices=("imagenet", "cifar10", "none"), default=normalize,
                       help="per-channel input normalization; the shared akamaster ResNets were trained with "
                            f"ImageNet statistics (default: {normalize})")


def load_dataset(name: str, root, *, num_train: int | None = None, num_test: int | None = None, seed: int = 0):
    """``((x_train, y_train), (x_test, y_test))``: uint8 (N, C, H, W) images and int64 labels.

    ``synthetic`` is generated (``num_train``/``num_test`` images); the others are read from
    ``root`` (default: the shared data folder) and cut to the first ``num_train``/``num_test``.
    """
    from minibasis import data

    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name == "synthetic":
        kwargs = {"seed": seed}
        kwargs.update({k: v for k, v in (("num_train", num_train), ("num_test", num_test)) if v is not None})
        return data.synthetic(**kwargs)
    root = Path(root) if root is not None else default_data_dir()
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist (it should hold the {name} files, "
                        f"e.g. {root / 'cifar-10-batches-py'} for cifar10)")
    try:
        (x_train, y_train), (x_test, y_test) = getattr(data, DATASETS[name][0])(root)
    except FileNotFoundError as exc:
        raise UserError(f"{name} files not found under {root}: {first_line(exc)}") from None
    except ValueError as exc:
        raise UserError(f"{name} files under {root} are not usable: {first_line(exc)}") from None
    if num_train is not None:
        x_train, y_train = x_train[:num_train], y_train[:num_train]
    if num_test is not None:
        x_test, y_test = x_test[:num_test], y_test[:num_test]
    return (x_train, y_train), (x_test, y_test)


def load_training_data(args):
    """:func:`load_dataset` for a training verb: ``--dataset`` from ``--data``, a random
    ``--train-subset`` of the training images (:func:`take_subset`) and the first ``--limit``
    test images. Returns ``((x_train, y_train), (x_test, y_test))``."""
    # A synthetic training set is generated at the subset's size rather than cut from a larger one.
    synthetic_train = args.train_subset if args.dataset == "synthetic" else None
    (x_train, y_train), test = load_dataset(args.dataset, args.data, num_train=synthetic_train,
                                            num_test=args.limit, seed=args.seed)
    return take_subset(x_train, y_train, args.train_subset, args.seed), test


def _statistics(normalize: str):
    from minibasis import data
    table = {"imagenet": (data.IMAGENET_MEAN, data.IMAGENET_STD), "cifar10": (data.CIFAR10_MEAN, data.CIFAR10_STD),
             "none": None}
    if normalize not in table:
        raise UserError(f"unknown normalization {normalize!r}; expected one of {', '.join(table)}")
    return table[normalize]


def eval_transform(normalize: str = "cifar10"):
    """uint8 → float32 in [0, 1] → per-channel normalization (no augmentation)."""
    from minibasis import data
    stats = _statistics(normalize)
    return data.Compose([data.ToFloat()] + ([data.Normalize(*stats)] if stats else []))


def train_transform(normalize: str = "cifar10", augment: bool = True, image_size: int = 32):
    """Random crop (padding 4) and horizontal flip, then :func:`eval_transform`'s steps."""
    from minibasis import data
    steps = [data.RandomCrop(image_size, padding=4), data.RandomHorizontalFlip()] if augment else []
    stats = _statistics(normalize)
    steps += [data.ToFloat()] + ([data.Normalize(*stats)] if stats else [])
    return data.Compose(steps)


def test_metrics_for(x_test: np.ndarray, y_test: np.ndarray, normalize: str):
    """``metrics(model) -> {"test_acc": float, "test_loss": float}`` on the uint8 images
    ``x_test`` (N, C, H, W) with labels ``y_test`` (N,), through :func:`eval_transform`, in
    batches of 256 without a progress line: the ``eval_fn`` the training verbs give the Trainer."""
    from minibasis.experiments.common import evaluate
    transform = eval_transform(normalize)

    def metrics(model) -> dict:
        result = evaluate(model, x_test, y_test, batch_size=256, transform=transform, progress=False)
        return {"test_acc": result.accuracy, "test_loss": result.loss}

    return metrics


def take_subset(images: np.ndarray, labels: np.ndarray, count: int | None, seed: int):
    """A class-mixed random subset of ``count`` samples (all when None or ≥ N), fixed by ``seed``."""
    if count is None or count >= len(labels):
        return images, labels
    index = np.sort(np.random.default_rng(seed).permutation(len(labels))[:count])
    return images[index], labels[index]


# ---------------------------------------------------------------------------
# Model files that remember their BasisConv layers
# ---------------------------------------------------------------------------
MODEL_FILE_FORMAT = "minibasis-model/1"


def basis_layout(model) -> dict:
    """Module path → how each ``BasisConv2d`` is built (Q, BN, basis bias), to rebuild the model."""
    from minibasis.nn import BasisConv2d
    return {path: {"num_basis": m.num_basis, "bn": m.bn is not None, "basis_bias": m.basis_bias is not None,
                   "energy": m.energy}
            for path, m in model.named_modules() if isinstance(m, BasisConv2d)}


def replace_module(model, path: str, new) -> None:
    """Put ``new`` at ``path`` (keeping its place among its siblings)."""
    parent_path, _, name = path.rpartition(".")
    parent = dict(model.named_modules())[parent_path]
    if name not in parent._modules:
        raise KeyError(path)
    parent._modules[name] = new


def apply_basis_layout(model, layout: dict, source: str) -> None:
    """Replace the ``Conv2d`` at each path of ``layout`` by a ``BasisConv2d`` of that shape."""
    from minibasis.nn import BasisConv2d, Conv2d

    modules = dict(model.named_modules())
    for path, spec in layout.items():
        conv = modules.get(path)
        if not isinstance(conv, Conv2d):
            found = type(conv).__name__ if conv is not None else "nothing"
            raise UserError(f"{source} has a BasisConv2d at {path!r}, where the model has {found} "
                            "(another architecture?)")
        try:
            layer = BasisConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, int(spec["num_basis"]),
                                stride=conv.stride, padding=conv.padding, bias=conv.bias is not None,
                                bn=bool(spec.get("bn", False)), basis_bias=bool(spec.get("basis_bias", False)))
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(f"{source}: BasisConv2d at {path!r} does not fit the model: {exc}") from None
        replace_module(model, path, layer)


def save_model_file(path: Path, model, architecture: dict) -> None:
    """The model's weights plus what rebuilds it (zoo name, depth, BasisConv layout), via ``io.save``.
    Under mpirun only rank 0 writes (every rank holds the same weights)."""
    from minibasis import distributed, io

    if not distributed.is_main_process():
        return
    io.save({"format": MODEL_FILE_FORMAT, "architecture": dict(architecture), "basisconv": basis_layout(model),
             "state_dict": {k: backend.to_numpy(v) for k, v in model.state_dict().items()}}, path)


def architecture_of(args) -> dict:
    return {"model": args.model, "depth": args.depth if args.model == "resnet_cifar" else None,
            "num_classes": args.num_classes}


def require_convs(model, description: str) -> None:
    """A :class:`UserError` when ``model`` has no ordinary ``Conv2d`` left to compress."""
    from minibasis.nn import Conv2d
    if not any(isinstance(m, Conv2d) for m in model.modules()):
        raise UserError(f"{description} has no ordinary Conv2d layer to compress "
                        "(are its convolutions BasisConv2d already?)")


def user_error_for_non_finite(exc) -> UserError:
    """A training that went NaN/inf, as the one-line message the command line prints."""
    return UserError(f"{exc} (lower the learning rate; --detect-anomaly names the first module where it happens)")
