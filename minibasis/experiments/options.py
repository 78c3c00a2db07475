"""Command-line options the experiment verbs share, and what they turn into.

* ``--device``, ``--seed``, ``--batch-size``, ``--output`` (every verb);
* ``--model``, ``--depth``, ``--num-classes``, ``--checkpoint`` → a zoo model with weights;
* ``--dataset``, ``--data``, ``--normalize`` → host arrays and the transforms to feed them.

Every problem a user can fix (unknown model, missing data folder, a checkpoint for another
architecture, CuPy missing) becomes a one-line :class:`minibasis.experiments.errors.UserError`.
"""
from __future__ import annotations

import dataclasses
import glob
import re
from pathlib import Path

import numpy as np

from minibasis import backend
from minibasis.checks import energy_threshold, non_negative_int, positive_int
from minibasis.experiments.errors import UserError, first_line

__all__ = ["add_common_arguments", "select_device", "check_positive", "check_threshold", "add_model_arguments", "ModelSpec",
           "model_spec", "load_model_for", "LoadedModel", "load_verb_model", "describe", "normalization_for", "classes_for", "save_model_file",
           "add_data_arguments", "load_dataset", "load_training_data",
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
    group.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --output (its files are deleted first)")
    group.add_argument("--quiet", action="store_true", help="no progress lines, only results")


def select_device(name: str) -> None:
    """Switch the backend, turning a missing CuPy or GPU into a one-line :class:`UserError`."""
    try:
        backend.use(name)
    except (RuntimeError, ValueError, ImportError) as exc:
        raise UserError(f"--device {name} is not usable here: {first_line(exc)}") from None


def check_positive(option: str, value, allow_zero: bool = False):
    """``value`` unchanged (None too), or a one-line :class:`UserError` when it is not a positive
    (``allow_zero``: non-negative) integer — :mod:`minibasis.checks`' rule and message; a float
    option (``--basis-fraction``) must be > 0 (≥ 0)."""
    if value is None:
        return None
    try:
        if isinstance(value, float):
            if not (value >= 0 if allow_zero else value > 0):   # also refuses NaN
                raise ValueError(f"{option} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
            return value
        return (non_negative_int if allow_zero else positive_int)(option, value)
    except ValueError as exc:
        raise UserError(first_line(exc)) from None


def check_threshold(option: str, value):
    """``value`` (None too) as an energy threshold in (0, 1] (:func:`minibasis.checks.energy_threshold`)."""
    if value is None:
        return None
    try:
        return energy_threshold(value, option)
    except ValueError as exc:
        raise UserError(first_line(exc)) from None


def check_common(args) -> None:
    """Validate the common options and switch the device."""
    check_positive("--batch-size", args.batch_size)
    check_positive("--seed", args.seed, allow_zero=True)
    select_device(args.device)


def parse_thresholds(text: str) -> list[float]:
    """``"1.0,0.95,0.9"`` → ``[1.0, 0.95, 0.9]``, each in (0, 1]."""
    try:
        values = [energy_threshold(float(part)) for part in str(text).split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
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
    """``--model``, ``--depth``, ``--num-classes`` and (unless ``checkpoint`` is False) ``--checkpoint``.

    The options default to None, so that :func:`model_spec` can tell what the user said from
    what the verb assumes: with a model file, the file's architecture and class count win over
    the verb's defaults, and an explicit option that contradicts the file is refused."""
    from minibasis.models import model_names

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help=f"zoo model (default: the model file's, else {model}); one of {', '.join(model_names())}")
    group.add_argument("--depth", type=int, default=None,
                       help="depth of resnet_cifar (20, 32, 44, 56, 110, 1202) or densenet_bc (default: the model "
                            f"file's, else {depth})")
    group.add_argument("--num-classes", type=int, default=None,
                       help=f"classes (default: the model file's, else {num_classes})")
    if checkpoint is not False:
        group.add_argument("--checkpoint", default=checkpoint,
                           help="weights: a model file (minibasis .npz, which records its architecture and input "
                                "normalization) or a PyTorch checkpoint (.th/.pt/.pth, read without torch); 'auto' "
                                "(default) picks the shared pretrained models/akamaster/resnet<depth>-*.th; 'none' "
                                "keeps the random init")
    parser.set_defaults(_model_defaults={"model": model, "depth": depth, "num_classes": num_classes})


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to build or load: ``model`` and ``kwargs`` as the user gave them (None/absent when not),
    the verb's defaults, and the resolved ``checkpoint`` path (None: random initialization)."""

    model: str | None
    kwargs: dict
    defaults: dict
    checkpoint: Path | None

    @property
    def zoo_name(self) -> str:
        return self.model or self.defaults["model"]

    def build_kwargs(self) -> dict:
        """Constructor arguments for a model built without a file: the verb's defaults where
        the constructor takes them, overridden by what the user gave."""
        from minibasis.models import canonical_architecture

        kwargs = {"num_classes": self.defaults["num_classes"]}
        if self.defaults.get("depth") is not None and _takes(self.zoo_name, "depth"):
            _, fixed = canonical_architecture(self.zoo_name)
            if "depth" not in fixed:
                kwargs["depth"] = self.defaults["depth"]
        return {**kwargs, **self.kwargs}


def _takes(name: str, argument: str) -> bool:
    from minibasis.models import canonical_architecture
    try:
        canonical_architecture(name, **{argument: 1})
    except ValueError:
        return False
    return True


def model_spec(args) -> ModelSpec:
    """``--model/--depth/--num-classes/--checkpoint`` checked against each other (no file read yet)."""
    from minibasis.models import MODELS, canonical_architecture

    defaults = getattr(args, "_model_defaults", {"model": "resnet_cifar", "depth": None, "num_classes": 10})
    name = args.model
    if name is not None and name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    kwargs = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = check_positive("--num-classes", args.num_classes)
    zoo = name or defaults["model"]
    if args.depth is not None:
        check_positive("--depth", args.depth)
        _, fixed = canonical_architecture(zoo)
        if "depth" in fixed:
            if fixed["depth"] != args.depth:
                raise UserError(f"--model {zoo} is depth {fixed['depth']}, but --depth {args.depth} was given; "
                                f"give one of them (e.g. --model resnet_cifar --depth {args.depth})")
        elif not _takes(zoo, "depth"):
            raise UserError(f"--depth does not apply to --model {zoo} (it applies to resnet_cifar and densenet_bc)")
        else:
            kwargs["depth"] = args.depth
    spec = ModelSpec(model=name, kwargs=kwargs, defaults=defaults, checkpoint=None)
    return dataclasses.replace(spec, checkpoint=resolve_checkpoint(args, spec))


def resolve_checkpoint(args, spec: ModelSpec) -> Path | None:
    """``--checkpoint`` as a path (``auto`` → the shared pretrained file; ``none`` → None)."""
    value = getattr(args, "checkpoint", None)
    if value is None or str(value).lower() == "none":
        return None
    if str(value) == "auto":
        depth = spec.build_kwargs().get("depth")
        found = pretrained_checkpoint(spec.zoo_name, depth)
        if found is None:
            where = default_shared() / "models" / "akamaster"
            label = f"resnet{depth}" if spec.zoo_name == "resnet_cifar" else spec.zoo_name
            raise UserError(f"no --checkpoint given and no pretrained {label} in {where} "
                            "(set MINIBASIS_SHARED or pass --checkpoint PATH)")
        return found
    path = Path(value)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return path


def _cli_wording(message: str) -> str:
    """load_model speaks of keyword arguments (``depth=20``); the command line of options (``--depth 20``)."""
    message = re.sub(r"\bpass (\w+)=(\S+?) or leave \1 out",
                     lambda m: f"pass --{m.group(1).replace('_', '-')} {m.group(2)} or leave --"
                               f"{m.group(1).replace('_', '-')} out", message)
    message = re.sub(r"\barchitecture='(\w+)' was given", r"--model \1 was given", message)
    return re.sub(r"\b(depth|num_classes)=(\S+?) was given",
                  lambda m: f"--{m.group(1).replace('_', '-')} {m.group(2)} was given", message)


def load_model_for(spec: ModelSpec):
    """``(model, metadata)``: the model file through :func:`minibasis.load_model` (its architecture,
    class count and normalization unless the user said otherwise, contradictions refused), or the
    zoo model with its random initialization (``metadata`` None)."""
    from minibasis import ModelFileError, load_model
    from minibasis.models import get_model

    if spec.checkpoint is None:
        try:
            return get_model(spec.zoo_name, **spec.build_kwargs()), None
        except (ValueError, TypeError) as exc:
            raise UserError(f"cannot build model {spec.zoo_name!r}: {first_line(exc)}") from None
    try:
        try:
            return load_model(spec.checkpoint, architecture=spec.model, **spec.kwargs)
        except ModelFileError as exc:
            if spec.model is None and "does not record its architecture" in str(exc):
                return load_model(spec.checkpoint, architecture=spec.zoo_name, **spec.build_kwargs())
            raise
    except FileNotFoundError:
        raise UserError(f"checkpoint {spec.checkpoint} does not exist") from None
    except ModelFileError as exc:
        raise UserError(_cli_wording(first_line(exc))) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {spec.checkpoint} is not readable: {first_line(exc)}") from None


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A verb's model and what the options and the model file say about it."""

    spec: ModelSpec
    model: object
    metadata: object          # minibasis.ModelMetadata, or None for a randomly initialized model
    normalize: str            # the input normalization to use ("imagenet", "cifar10", "none")
    name: str                 # "resnet20", "table3_cnn", ...

    @property
    def dataset(self) -> str | None:
        """The dataset the model file says the model was trained on, if it says."""
        return getattr(self.metadata, "dataset", None)


def load_verb_model(args, verb: str, *, check_classes: bool = True) -> LoadedModel:
    """Everything a verb checks about its model before it reads data: the model options
    (:func:`model_spec`), the run folder (:func:`runs.check_run_folder`), the model file
    (:func:`load_model_for`), the normalization (:func:`normalization_for`) and, with
    ``check_classes``, that the model has an output for every class of ``--dataset``."""
    from minibasis.experiments import runs

    spec = model_spec(args)
    runs.check_run_folder(args, verb)
    model, metadata = load_model_for(spec)
    if check_classes:
        classes_for(args, model, metadata, args.dataset)
    return LoadedModel(spec=spec, model=model, metadata=metadata, normalize=normalization_for(args, metadata),
                       name=describe(model))


def describe(model) -> str:
    """``resnet20`` for resnet_cifar(depth=20), else the zoo name (from ``model.architecture``)."""
    record = getattr(model, "architecture", None) or {"name": type(model).__name__, "kwargs": {}}
    depth = record["kwargs"].get("depth")
    if record["name"] == "resnet_cifar" and depth is not None:
        return f"resnet{depth}"
    return record["name"]


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
    group.add_argument("--normalize", choices=("imagenet", "cifar10", "none"), default=None,
                       help="per-channel input normalization (default: what the model file records; else "
                            f"{normalize}); the shared akamaster ResNets were trained with ImageNet statistics")
    parser.set_defaults(_normalize_default=normalize)


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


#: Said once whenever a verb evaluates on the shared CIFAR-10 (docs/models.md has the details).
SHARED_CIFAR10_NOTE = ("note: the shared CIFAR-10 images are JPEG re-encodings of the originals; PyTorch gets "
                       "81.03 % with the shared ResNet-20 weights on them, 91.73 % on the original pixels")


def data_note(dataset: str, root) -> str | None:
    """:data:`SHARED_CIFAR10_NOTE` when ``dataset`` is read from the shared data folder, else None."""
    if dataset != "cifar10":
        return None
    root = Path(root) if root is not None else default_data_dir()
    try:
        shared = root.resolve() == default_data_dir().resolve()
    except OSError:
        return None
    return SHARED_CIFAR10_NOTE if shared else None


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
    from minibasis.data import NORMALIZATIONS
    if normalize == "none":
        return None
    if normalize not in NORMALIZATIONS:
        raise UserError(f"unknown normalization {normalize!r}; expected one of {', '.join(NORMALIZATIONS)}, none")
    return NORMALIZATIONS[normalize]


def normalization_for(args, metadata) -> str:
    """``--normalize``, else what the model file records, else the verb's default; an explicit
    option that contradicts the file is refused, naming both."""
    recorded = getattr(metadata, "normalization", None)
    given = getattr(args, "normalize", None)
    if given is not None and recorded is not None and given != recorded:
        raise UserError(f"--normalize {given} was given, but the model file records normalization {recorded!r}; "
                        f"leave --normalize out to use it")
    chosen = given or recorded or getattr(args, "_normalize_default", "imagenet")
    if metadata is not None and given is None and recorded is None:
        import sys
        print(f"note: the model file does not record its input normalization; using --normalize {chosen} "
              "(pass --normalize to choose)", file=sys.stderr)
    return chosen


def classes_for(args, model, metadata, dataset: str) -> int:
    """The model's class count, refused when the dataset has more classes than it outputs."""
    classes = getattr(metadata, "num_classes", None) or model.architecture["kwargs"].get("num_classes")
    needed = DATASETS[dataset][1]
    if classes is not None and classes < needed:
        raise UserError(f"--dataset {dataset} has {needed} classes, but the model outputs {classes}")
    return classes


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
    from minibasis.training import evaluate
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
# Model files
# ---------------------------------------------------------------------------
def save_model_file(path: Path, model, normalize: str, dataset: str | None) -> None:
    """:func:`minibasis.save_model` with the normalization and dataset the model was used with."""
    from minibasis import save_model
    try:
        save_model(model, path, normalization=normalize, dataset=dataset)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def require_convs(model, description: str) -> None:
    """A :class:`UserError` when ``model`` has no ordinary ``Conv2d`` left to compress."""
    from minibasis.nn import Conv2d
    if not any(isinstance(m, Conv2d) for m in model.modules()):
        raise UserError(f"{description} has no ordinary Conv2d layer to compress "
                        "(are its convolutions BasisConv2d already?)")


def user_error_for_non_finite(exc) -> UserError:
    """A training that went NaN/inf, as the one-line message the command line prints."""
    return UserError(f"{exc} (lower the learning rate; --detect-anomaly names the first module where it happens)")
