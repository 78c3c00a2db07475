"""Command-line options the experiment verbs share, turned into checked specs.

* ``--device``, ``--seed``, ``--batch-size``, ``--output`` (the verbs that train or evaluate);
* ``--model``, ``--depth``, ``--num-classes``, ``--checkpoint`` → a :class:`ModelSpec`, and
  :func:`model_argument`, the one way every verb turns a model argument into a model;
* ``--dataset``, ``--data``, ``--normalize`` → a :class:`DataSpec`.

The library does the work (datasets by name and the transform recipes in :mod:`minibasis.data`,
test metrics in :mod:`minibasis.training`, model files in :mod:`minibasis.model_files`); every
problem a user can fix becomes a one-line :class:`minibasis.experiments.errors.UserError`.
"""
from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

from minibasis import backend
from minibasis.checks import energy_threshold, non_negative_int, positive_int
from minibasis import data
from minibasis.experiments.errors import UserError, first_line

__all__ = ["add_common_arguments", "select_device", "check_positive", "check_threshold", "add_model_arguments",
           "ModelSpec", "model_spec", "model_operand", "model_argument", "LoadedModel", "load_verb_model", "describe",
           "normalization_for", "classes_for", "save_model_file", "add_data_arguments", "DataSpec", "data_spec",
           "parse_thresholds", "DEFAULT_THRESHOLDS", "default_data_dir", "pretrained_checkpoint"]

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


def parse_thresholds(text: str, option: str = "--thresholds") -> list[float]:
    """``"1.0,0.95,0.9"`` → ``[1.0, 0.95, 0.9]``, each in (0, 1]; a bad item is named."""
    values = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            values.append(energy_threshold(float(part)))
        except ValueError:
            raise UserError(f"{option}: {part!r} is not a number in (0, 1] (in {text!r})") from None
    if not values:
        raise UserError(f"{option} must be comma-separated numbers in (0, 1], got {text!r}")
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
    return _model_file("--checkpoint", value)


def _model_file(option: str, value) -> Path:
    path = Path(value)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give the model file in it (e.g. {path / 'model.npz'})")
    if not path.is_file():
        raise UserError(f"{option} {path} does not exist")
    return path


def model_operand(text: str, option: str = "MODEL", **kwargs) -> ModelSpec:
    """A positional model argument (``count``, ``verify``): a zoo name built with ``kwargs``, or a
    model file (anything with a file suffix or an existing path) read as it describes itself."""
    from minibasis.models import MODELS

    if text in MODELS and not Path(text).exists():
        return ModelSpec(model=text, kwargs=kwargs, defaults={"model": text, "num_classes": 10}, checkpoint=None)
    if Path(text).suffix or Path(text).exists():
        return ModelSpec(model=None, kwargs={}, defaults={}, checkpoint=_model_file(option, text))
    raise UserError(f"{option} {text!r} is neither a model file nor a zoo model; known models: {', '.join(MODELS)}")


def _option(argument: str) -> str:
    return "--model" if argument == "architecture" else f"--{argument.replace('_', '-')}"


def model_argument(spec: ModelSpec):
    """``(model, metadata)``: the model file through :func:`minibasis.load_model` (its architecture,
    class count and normalization unless the user said otherwise, contradictions refused), or the
    zoo model with its random initialization (``metadata`` None). The one path from a model
    argument to a model for every verb."""
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
            if spec.model is None and spec.defaults and exc.argument == "architecture" and exc.recorded is None:
                return load_model(spec.checkpoint, architecture=spec.zoo_name, **spec.build_kwargs())
            raise
    except ModelFileError as exc:
        if exc.argument is None or exc.recorded is None:
            raise UserError(first_line(exc)) from None
        option, recorded = _option(exc.argument), exc.recorded
        raise UserError(f"{option} {exc.given} was given, but {exc.source} records {exc.argument} {recorded}; "
                        f"pass {option} {recorded} or leave {option} out") from None
    except (OSError, ValueError) as exc:
        reason = first_line(exc).removeprefix(f"{spec.checkpoint}: ")  # the library's message names the file
        raise UserError(f"cannot read the model file {spec.checkpoint}: {reason}") from None


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
    model, metadata = model_argument(spec)
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
def add_data_arguments(parser, *, dataset: str = "cifar10", normalize: str = "imagenet") -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=sorted(data.DATASETS), default=dataset, help=f"(default: {dataset})")
    group.add_argument("--data", type=Path, default=None,
                       help="folder holding the dataset files (default: <shared>/data, where <shared> is "
                            "$MINIBASIS_SHARED or ../shared beside the repository)")
    group.add_argument("--normalize", choices=("imagenet", "cifar10", "none"), default=None,
                       help="per-channel input normalization (default: what the model file records; else "
                            f"{normalize}); the shared akamaster ResNets were trained with ImageNet statistics")
    parser.set_defaults(_normalize_default=normalize)


def load_dataset(name: str, root, *, num_train: int | None = None, num_test: int | None = None, seed: int = 0):
    """:func:`minibasis.data.load_dataset` from ``root`` (default: the shared data folder), its
    errors as one-line user errors."""
    root = Path(root) if root is not None else default_data_dir()
    try:
        return data.load_dataset(name, root, num_train=num_train, num_test=num_test, seed=seed)
    except FileNotFoundError as exc:
        raise UserError(f"{name} files not found under {root}: {first_line(exc)}") from None
    except data.DatasetError as exc:
        raise UserError(first_line(exc)) from None
    except ValueError as exc:
        raise UserError(f"{name} files under {root} are not usable: {first_line(exc)}") from None


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
    ``--train-subset`` of the training images and the first ``--limit`` test images."""
    # A synthetic training set is generated at the subset's size rather than cut from a larger one.
    synthetic_train = args.train_subset if args.dataset == "synthetic" else None
    (x_train, y_train), test = load_dataset(args.dataset, args.data, num_train=synthetic_train,
                                            num_test=args.limit, seed=args.seed)
    return data.take_subset(x_train, y_train, args.train_subset, args.seed), test


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
    needed = data.DATASET_CLASSES[dataset]
    if classes is not None and classes < needed:
        raise UserError(f"--dataset {dataset} has {needed} classes, but the model outputs {classes}")
    return classes


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
