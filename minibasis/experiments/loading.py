"""From a checked spec to a verb's model: the one path every verb takes.

:func:`model_argument` turns a :class:`~minibasis.experiments.options.ModelSpec` (``--model``/
``--checkpoint`` options, or a positional MODEL of ``count``/``verify`` through
:func:`model_operand`) into a model: a model file of any kind through :func:`minibasis.load_model`,
or a zoo model with its random initialization. :func:`load_verb_model` adds what a training or
evaluating verb checks before it reads data (run folder, class count, normalization).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from minibasis import data
from minibasis.experiments import common
from minibasis.experiments.errors import UserError, first_line
from minibasis.experiments.options import DataSpec, ModelSpec, VerbSpec, _model_file

__all__ = ["model_operand", "model_file", "model_argument", "describe", "LoadedModel", "load_verb_model", "normalization",
           "load_data", "inference_form"]


def model_operand(text: str, option: str = "MODEL", **kwargs) -> ModelSpec:
    """A positional model argument (``count``, ``verify``): a zoo name built with ``kwargs``, or a
    model file (anything with a file suffix or an existing path; a bare file name may name a shared
    model, :func:`common.find_model_file`) read as it describes itself."""
    from minibasis.models import MODELS

    if text in MODELS and not Path(text).exists():
        return ModelSpec(model=text, kwargs=kwargs, defaults={"model": text}, checkpoint=None)
    if Path(text).suffix or Path(text).exists():
        return model_file(text, option)
    raise UserError(f"{option} {text!r} is neither a model file nor a zoo model; known models: {', '.join(MODELS)}")


def model_file(text: str, option: str) -> ModelSpec:
    """A model file named by ``option`` (``MODEL``, ``--teacher``), read as it describes itself; a bare
    file name may name a shared model (:func:`common.find_model_file`)."""
    return ModelSpec(model=None, kwargs={}, defaults={}, checkpoint=_model_file(option, common.find_model_file(text)))


def model_argument(spec: ModelSpec):
    """``(model, metadata)``: the model file through :func:`minibasis.load_model` (its architecture,
    class count and normalization unless the user said otherwise, contradictions refused), or the
    zoo model with its random initialization (``metadata`` None). Every verb's one path."""
    from minibasis.model_files import ModelFileError, load_model
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
        option = "--model" if exc.argument == "architecture" else f"--{exc.argument.replace('_', '-')}"
        raise UserError(f"{option} {exc.given} was given, but {exc.source} records {exc.argument} {exc.recorded}; "
                        f"pass {option} {exc.recorded} or leave {option} out") from None
    except (OSError, ValueError) as exc:
        reason = first_line(exc).removeprefix(f"{spec.checkpoint}: ")  # the library's message names the file
        raise UserError(f"cannot read the model file {spec.checkpoint}: {reason}") from None


def describe(model) -> str:
    """``resnet20`` for resnet_cifar(depth=20), else the zoo name (from ``model.architecture``)."""
    record = getattr(model, "architecture", None) or {"name": type(model).__name__, "kwargs": {}}
    depth = record["kwargs"].get("depth")
    if record["name"] == "resnet_cifar" and depth is not None:
        return f"resnet{depth}"
    return record["name"]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A verb's model and what the options and the model file say about it."""

    model: object
    metadata: object          # minibasis.ModelMetadata, or None for a randomly initialized model
    normalize: str            # the input normalization to use ("imagenet", "cifar10", "none")
    name: str                 # "resnet20", "table3_cnn", ...
    classes: int | None

    @property
    def dataset(self) -> str | None:
        """The dataset the model file says the model was trained on, if it says."""
        return getattr(self.metadata, "dataset", None)


def load_verb_model(spec: VerbSpec, *, check_classes: bool = True, compressing: bool = False) -> LoadedModel:
    """Everything a verb checks about its model before it reads data: the run folder, the model
    (:func:`model_argument`), the normalization, with ``check_classes`` that the model has an
    output for every class of ``--dataset``, and with ``compressing`` that it has a conv to compress."""
    from minibasis.compress import compressible
    from minibasis.experiments import runs

    runs.check_run_folder(spec.run)
    model, metadata = model_argument(spec.model)
    if compressing and not compressible(model):
        raise UserError(f"the model {describe(model)} has no ordinary Conv2d layer to compress "
                        "(are its convolutions BasisConv2d already?)")
    classes = getattr(metadata, "num_classes", None) or model.architecture["kwargs"].get("num_classes")
    needed = data.DATASET_CLASSES[spec.data.name]
    if check_classes and classes is not None and classes < needed:
        raise UserError(f"--dataset {spec.data.name} has {needed} classes, but the model outputs {classes}")
    return LoadedModel(model, metadata, normalization(spec.data, metadata), describe(model), classes)


def normalization(spec: DataSpec, metadata) -> str:
    """``--normalize``, else what the model file records, else the verb's default; an explicit
    option that contradicts the file is refused, naming both."""
    recorded, given = getattr(metadata, "normalization", None), spec.normalize
    if given is not None and recorded is not None and given != recorded:
        raise UserError(f"--normalize {given} was given, but the model file records normalization {recorded!r}; "
                        "leave --normalize out to use it")
    chosen = given or recorded or spec.default_normalize
    if metadata is not None and recorded is None and given is None:
        common.note(f"the model file does not record its input normalization; using --normalize {chosen} "
                    "(pass --normalize to choose)")
    return chosen


def load_data(spec: DataSpec, *, num_train=None, num_test=None, seed=0, train_subset=None):
    """``((x_train, y_train), (x_test, y_test))`` of :func:`minibasis.data.load_dataset`, with a random
    ``train_subset`` of the training images; errors as one line."""
    if spec.name == "synthetic":  # generated at the subset's size rather than cut from a larger set
        num_train = train_subset if train_subset is not None else num_train
    try:
        return data.load_dataset(spec.name, spec.root, num_train=num_train, num_test=num_test, seed=seed,
                                 train_subset=train_subset)
    except FileNotFoundError as exc:
        raise UserError(f"{spec.name} files not found under {spec.root}: {first_line(exc)}") from None
    except ValueError as exc:  # DatasetError, malformed files
        raise UserError(first_line(exc)) from None


#: Training images that measure each layer's loss for ``--allocation sensitivity`` by default.
CALIBRATION_IMAGES = 256


def calibration_data(spec: DataSpec, normalize: str, count: int | None, seed: int = 0):
    """A function returning ``(images, labels)``: the first ``count`` training images (default
    :data:`CALIBRATION_IMAGES`) as the model takes them, for ``compress(calibration=...)``, which
    calls it only once the budget is known to be reachable."""
    def load():
        (images, labels), _ = load_data(spec, num_train=count or CALIBRATION_IMAGES, num_test=1, seed=seed)
        images, labels = images[:count or CALIBRATION_IMAGES], labels[:count or CALIBRATION_IMAGES]
        return data.eval_transform(normalize)(images), labels
    return load


def inference_form(model, deploy: bool, image_shape=(3, 32, 32)):
    """``model`` as the verb evaluates it: :func:`minibasis.deploy` of it with ``--deploy``, else itself."""
    if not deploy:
        return model
    from minibasis import deploy as deployed

    try:
        return deployed(model, (1,) + tuple(image_shape))
    except ValueError as exc:
        raise UserError(f"--deploy: {first_line(exc)}") from None
