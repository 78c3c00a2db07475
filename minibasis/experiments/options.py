"""Command-line options → checked specs.

A verb declares its options with ``argparse`` (range checks as ``type=``, from
:mod:`~minibasis.experiments.argtypes`, so a bad value is refused while parsing), calls
:func:`verb_spec` once, and afterwards reads only the spec:

* ``spec.run`` (:class:`RunSpec`): ``--device``, ``--seed``, ``--batch-size``, ``--output``,
  ``--overwrite``, ``--quiet``, ``--resume`` and the record ``config.json`` keeps;
* ``spec.model`` (:class:`ModelSpec`): ``--model``, ``--depth``, ``--num-classes``, ``--checkpoint``;
* ``spec.data`` (:class:`DataSpec`): ``--dataset``, ``--data``, ``--normalize``;
* ``spec.options``: the verb's own options, read-only.

Adding an option to a verb is its ``add_argument`` and the line that uses it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from minibasis import backend, data
from minibasis.experiments import common
from minibasis.experiments import argtypes
from minibasis.experiments.argtypes import Thresholds, non_negative, positive
from minibasis.experiments.errors import UserError, first_line

__all__ = ["DEFAULT_THRESHOLDS", "add_common_arguments", "add_model_arguments", "add_data_arguments",
           "add_budget_arguments", "add_deploy_argument", "RunSpec", "ModelSpec", "DataSpec", "VerbSpec", "verb_spec"]

#: The paper's Figure 2 thresholds.
DEFAULT_THRESHOLDS = (1.0, 0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


# ---------------------------------------------------------------------------
# Option groups
# ---------------------------------------------------------------------------
def add_common_arguments(parser, *, batch_size: int = 128, seed: int = 0) -> None:
    """``--device``, ``--seed``, ``--batch-size``, ``--output``, ``--overwrite`` and ``--quiet``."""
    group = parser.add_argument_group("common options")
    group.add_argument("--device", type=argtypes.device, default="numpy", metavar="{numpy,cupy}",
                       help="array backend: numpy (CPU) or cupy (NVIDIA GPU) (default: numpy)")
    group.add_argument("--seed", type=non_negative, default=seed, help=f"random seed (default: {seed})")
    group.add_argument("--batch-size", type=positive, default=batch_size, help=f"mini-batch size (default: {batch_size})")
    group.add_argument("--output", type=Path, default=None,
                       help="folder for results, logs, checkpoints and plots (default: runs/<verb>-<timestamp>)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --output (its files are deleted first)")
    group.add_argument("--quiet", action="store_true", help="no progress lines, only results")


def add_model_arguments(parser, *, model: str = "resnet_cifar", depth: int | None = 56,
                        checkpoint: str | None = "auto", num_classes: int = 10) -> None:
    """``--model``, ``--depth``, ``--num-classes`` and (unless ``checkpoint`` is False) ``--checkpoint``.

    The options default to None, so that the spec can tell what the user said from what the
    verb assumes: with a model file, the file's architecture and class count win over the
    verb's defaults, and an explicit option that contradicts the file is refused."""
    from minibasis.models import model_names

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help=f"zoo model (default: the model file's, else {model}); one of {', '.join(model_names())}")
    group.add_argument("--depth", type=positive, default=None,
                       help=f"depth of resnet_cifar (20, 32, 44, 56, 110, 1202) or densenet_bc (default: the model "
                            f"file's, else {depth})")
    group.add_argument("--num-classes", type=positive, default=None,
                       help=f"classes (default: the model file's, else {num_classes})")
    if checkpoint is not False:
        group.add_argument("--checkpoint", default=checkpoint,
                           help="weights: a model file (minibasis .npz: a model.npz or a checkpoint-*.npz, which "
                                "record their architecture and input normalization) or a PyTorch checkpoint "
                                "(.th/.pt/.pth, read without torch); 'auto' (default) picks the shared pretrained "
                                "models/akamaster/resnet<depth>-*.th; 'none' keeps the random init")
    parser.set_defaults(_model_defaults={"model": model, "depth": depth, "num_classes": num_classes})


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


def add_budget_arguments(group) -> None:
    """``--target-mult-ratio`` and ``--allocation`` (:func:`minibasis.compress` under a measured budget)."""
    from minibasis.allocation import ALLOCATIONS
    group.add_argument("--target-mult-ratio", type=argtypes.fraction, default=None,
                       help="instead of --threshold: a budget; the measured conv multiplications of the "
                            "compressed network are at most this fraction of the original's (e.g. 0.45)")
    group.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                       help="with --target-mult-ratio: uniform, one threshold t for every layer, the largest that "
                            "fits (the paper's); greedy, Q per layer by energy kept per multiplication; or "
                            "sensitivity, Q per layer by measured loss per multiplication on training images "
                            "(default: uniform)")
    group.add_argument("--calibration-images", type=argtypes.positive, default=None, metavar="N",
                       help="with --allocation sensitivity: how many training images (the first N) measure each "
                            "layer's loss (default: 256)")


def add_deploy_argument(parser) -> None:
    parser.add_argument("--deploy", action="store_true",
                        help="evaluate the deployed form (minibasis.deploy: BatchNorm folded, each conv fused with its "
                             "ReLU and residual add, inference only): the same outputs to float rounding, faster")


# ---------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Where and how a verb runs; ``config`` is what ``config.json`` records (every option)."""

    verb: str
    device: str = "numpy"
    seed: int = 0
    batch_size: int = 128
    output: Path | None = None
    overwrite: bool = False
    resume: bool | None = None     # None: the verb has no --resume
    quiet: bool = False
    config: dict = dataclasses.field(default_factory=dict)


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
        """The verb's defaults where the constructor takes them, overridden by what the user gave."""
        from minibasis.models import canonical_architecture

        kwargs = {"num_classes": self.defaults.get("num_classes", 10)}
        if self.defaults.get("depth") is not None:
            try:  # refused where the constructor takes no depth or the name fixes one (resnet56)
                canonical_architecture(self.zoo_name, depth=self.defaults["depth"])
                kwargs["depth"] = self.defaults["depth"]
            except ValueError:
                pass
        return {**kwargs, **self.kwargs}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """``--dataset`` from the folder ``root``; ``normalize`` as given (None: the model file's, else
    ``default_normalize``)."""

    name: str
    root: Path
    normalize: str | None
    default_normalize: str


class Options:
    """The verb's own options by attribute, read-only."""

    def __init__(self, values: dict):
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        raise AttributeError(f"options are read-only (tried to set {name!r})")


@dataclasses.dataclass(frozen=True)
class VerbSpec:
    run: RunSpec
    model: ModelSpec | None
    data: DataSpec | None
    options: Options


def _model_spec(values: dict) -> ModelSpec:
    from minibasis.models import MODELS, canonical_architecture

    defaults, name, depth = values.pop("_model_defaults"), values.pop("model"), values.pop("depth")
    if name is not None and name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    kwargs = {} if values.get("num_classes") is None else {"num_classes": values["num_classes"]}
    values.pop("num_classes")
    zoo = name or defaults["model"]
    if depth is not None:
        fixed = canonical_architecture(zoo)[1].get("depth")
        if fixed is not None and fixed != depth:
            raise UserError(f"--model {zoo} is depth {fixed}, but --depth {depth} was given; "
                            f"give one of them (e.g. --model resnet_cifar --depth {depth})")
        if fixed is None:
            try:
                canonical_architecture(zoo, depth=depth)
            except ValueError:
                raise UserError(f"--depth does not apply to --model {zoo} (it applies to resnet_cifar and "
                                "densenet_bc)") from None
            kwargs["depth"] = depth
    spec = ModelSpec(model=name, kwargs=kwargs, defaults=defaults, checkpoint=None)
    return dataclasses.replace(spec, checkpoint=_checkpoint(values.pop("checkpoint", None), spec))


def _checkpoint(value, spec: ModelSpec) -> Path | None:
    """``--checkpoint`` as a path (``auto`` → the shared pretrained file; ``none`` → None)."""
    if value is None or str(value).lower() == "none":
        return None
    if str(value) != "auto":
        return _model_file("--checkpoint", value)
    depth = spec.build_kwargs().get("depth")
    found = common.pretrained_checkpoint(spec.zoo_name, depth)
    if found is None:
        label = f"resnet{depth}" if spec.zoo_name == "resnet_cifar" else spec.zoo_name
        raise UserError(f"no --checkpoint given and no pretrained {label} in {common.pretrained_dir()} "
                        "(set MINIBASIS_SHARED or pass --checkpoint PATH)")
    return found


def _model_file(option: str, value) -> Path:
    path = Path(value)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give the model file in it (e.g. {path / 'model.npz'})")
    if not path.is_file():
        raise UserError(f"{option} {path} does not exist")
    return path


def verb_spec(args, verb: str) -> VerbSpec:
    """Every option of ``args`` in its spec, checked against the others; switches the device.
    Reads no file (the run folder and the model are checked by
    :func:`minibasis.experiments.loading.load_verb_model`)."""
    values = {k: v for k, v in vars(args).items() if k not in ("_argv", "_module", "verb")}
    config = {"verb": verb, "argv": list(getattr(args, "_argv", [])),
              **{k: str(v) if isinstance(v, (Path, Thresholds)) else v for k, v in sorted(values.items())
                 if not k.startswith("_")}}
    run = RunSpec(verb, **{k: values.pop(k) for k in ("device", "seed", "batch_size", "output", "overwrite", "resume",
                                                      "quiet") if k in values}, config=config)
    try:
        backend.use(run.device)
    except (RuntimeError, ValueError, ImportError) as exc:
        raise UserError(f"--device {run.device} is not usable here: {first_line(exc)}") from None
    model = _model_spec(values) if "_model_defaults" in values else None
    dataset = None
    if "_normalize_default" in values:
        root = values.pop("data")
        dataset = DataSpec(values.pop("dataset"), root if root is not None else common.default_data_dir(),
                           values.pop("normalize"), values.pop("_normalize_default"))
    return VerbSpec(run, model, dataset, Options(values))
