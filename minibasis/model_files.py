"""Self-describing model files: :func:`save_model` and :func:`load_model`.

One ``.npz`` (written atomically through :func:`minibasis.serialization.save`, read back without pickle)
holds everything needed to rebuild a model with nothing restated::

    format              "minibasis-model-1"
    architecture        {"name": zoo name, "kwargs": constructor arguments}  (model.architecture)
    basis_layout        module path → {"num_basis", "bn", "basis_bias", "energy"} per BasisConv2d
    num_classes         int or None
    dataset             str or None ("cifar10", ...)
    normalization       {"name": "cifar10" / "imagenet" / "none" / None, "mean": [...], "std": [...]}
    minibasis_version   the version that wrote the file
    extra               further metadata given to save_model (JSON-like values, arrays)
    state_dict          name → array

:func:`model_record` is that header without the weights: training checkpoints
(``checkpoint-*.npz``, :mod:`minibasis.training.checkpoints`) carry it in their ``meta`` under
``"model_file"``, so a checkpoint rebuilds its model exactly as a model file does.

:func:`load_model` also reads what the command-line verbs wrote before this format existed
(``format: "minibasis-model/1"`` files and checkpoints recording ``{"model": name, **kwargs}``),
plain ``.npz`` state dicts (given an architecture) and PyTorch checkpoints (``.th``/``.pth``,
without torch), inferring akamaster's CIFAR ResNets from their keys.

A BasisConv layout is applied to a freshly built zoo model by :func:`apply_basis_layout`, which
replaces each listed convolution with an untrained ``BasisConv2d`` of the recorded shape (via
``Module.set_submodule``), so that the saved weights fit.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from minibasis import backend
from minibasis.nn import BasisConv2d, Conv2d, Linear, Module
from minibasis.serialization import NPZ, CheckpointError, load, load_torch_checkpoint, save, sniff_format
from minibasis.serialization.safetensors_format import (SAFETENSORS_SUFFIX, is_safetensors, load_safetensors,
                                                        save_safetensors)
from minibasis.training.checkpoints import CHECKPOINT_FORMAT

__all__ = ["MODEL_FORMAT", "ModelFileError", "ModelMetadata", "save_model", "load_model", "model_record",
           "checkpoint_meta",
           "basis_layout", "apply_basis_layout"]

#: The format of the record :func:`save_model` writes (and training checkpoints carry).
MODEL_FORMAT = "minibasis-model-1"
#: The key of a training checkpoint's ``meta`` that holds the :func:`model_record`.
CHECKPOINT_RECORD_KEY = "model_file"
#: What the verbs wrote before :data:`MODEL_FORMAT` (read, never written).
_OLD_MODEL_FORMAT = "minibasis-model/1"


class ModelFileError(CheckpointError):
    """A model file cannot be turned into a model: unknown or contradicting architecture,
    weights that do not fit, malformed metadata. A ``ValueError``; names the file.

    When a caller's argument contradicts the file, ``argument`` names it (``"architecture"``,
    ``"depth"``, ``"num_classes"``, ...), ``given`` is the caller's value and ``recorded`` the
    file's, so that a command line can word the message in its own option names. ``source``
    is the file.
    """

    def __init__(self, message: str, *, source: str | None = None, argument: str | None = None,
                 given=None, recorded=None):
        super().__init__(message)
        self.source, self.argument, self.given, self.recorded = source, argument, given, recorded


@dataclass(frozen=True)
class ModelMetadata:
    """What a model file says about its model (:func:`load_model` returns it beside the model).

    ``format`` is :data:`MODEL_FORMAT` (:func:`save_model` files, ``.npz`` or ``.safetensors``, and the
    training checkpoints that carry its record), "legacy" (files of earlier verbs, plain state ``.npz`` /
    ``.safetensors``), "torch" (PyTorch checkpoints) or "onnx" (an ONNX graph, :func:`minibasis.onnx.load_model`).
    ``normalization`` is a key of :data:`minibasis.data.NORMALIZATIONS`, "none" (inputs only
    scaled to [0, 1]) or None (not recorded, or a (mean, std) pair of no known name).
    """

    architecture: dict
    num_classes: int | None = None
    dataset: str | None = None
    normalization: str | None = None
    mean: tuple | None = None
    std: tuple | None = None
    basis_layout: dict = field(default_factory=dict)
    minibasis_version: str | None = None
    format: str = MODEL_FORMAT
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# BasisConv layouts
# ---------------------------------------------------------------------------
def basis_layout(model: Module) -> dict:
    """Module path → how each ``BasisConv2d`` is built (Q, BatchNorm, basis bias, energy)."""
    return {path: {"num_basis": m.num_basis, "bn": m.bn is not None, "basis_bias": m.basis_bias is not None,
                   "energy": m.energy}
            for path, m in model.named_modules() if isinstance(m, BasisConv2d)}


def apply_basis_layout(model: Module, layout: dict, *, source: str = "the BasisConv layout") -> None:
    """Put a ``BasisConv2d`` of the recorded shape at each path of ``layout`` (in place).

    The module found there (a ``Conv2d``, or a ``BasisConv2d`` of a twin built with bases)
    gives the geometry: channels, kernel size, stride, padding, bias, dtype. The new layer's
    values are placeholders for ``load_state_dict``. Raises :class:`ModelFileError` naming
    ``source`` when a path holds no convolution or the recorded shape does not fit.
    """
    if not isinstance(layout, dict):
        raise ModelFileError(f"{source}: BasisConv layout must be a dict of module path → spec, "
                             f"got {type(layout).__name__}")
    for path, spec in layout.items():
        try:
            found = model.get_submodule(path) if isinstance(path, str) and path else None
        except AttributeError:
            found = None
        if not isinstance(found, (Conv2d, BasisConv2d)):
            what = type(found).__name__ if found is not None else "nothing"
            raise ModelFileError(f"{source} has a BasisConv2d at {path!r}, where the model has {what} "
                                 "(another architecture?)")
        if not isinstance(spec, dict):
            raise ModelFileError(f"{source}: BasisConv2d spec at {path!r} is a {type(spec).__name__}, expected a dict")
        weight = found.weight if isinstance(found, Conv2d) else found.coeffs
        # Dilation is passed on only where the conv has one, so the layer is never silently undilated.
        dilation = getattr(found, "dilation", 1)
        extra = {} if dilation in (1, (1, 1)) else {"dilation": dilation}
        try:
            if getattr(found, "groups", 1) != 1:
                raise ValueError(f"a grouped conv (groups={found.groups}) has no BasisConv2d form")
            layer = BasisConv2d(found.in_channels, found.out_channels, found.kernel_size, int(spec["num_basis"]),
                                stride=found.stride, padding=found.padding, bias=found.bias is not None,
                                bn=bool(spec.get("bn", False)), basis_bias=bool(spec.get("basis_bias", False)),
                                dtype=weight.dtype, **extra)
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelFileError(f"{source}: BasisConv2d at {path!r} does not fit the model: {exc}") from None
        energy = spec.get("energy")
        layer.energy = float(energy) if isinstance(energy, (int, float)) and not isinstance(energy, bool) else None
        model.set_submodule(path, layer)


# ---------------------------------------------------------------------------
# Normalization and architecture records
# ---------------------------------------------------------------------------
def _float_triple(values, what: str) -> tuple:
    try:
        result = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a sequence of numbers, got {values!r:.80}") from None
    if not result or not all(math.isfinite(v) for v in result):
        raise ValueError(f"{what} must be a non-empty sequence of finite numbers, got {values!r:.80}")
    return result


def _normalization(value) -> tuple[str | None, tuple | None, tuple | None]:
    """``(name, mean, std)`` from a NORMALIZATIONS key, "none", a (mean, std) pair, or None."""
    from minibasis.data import NORMALIZATIONS

    if value is None:
        return None, None, None
    if isinstance(value, str):
        if value == "none":
            return "none", None, None
        if value not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {value!r}; expected one of "
                             f"{', '.join([*NORMALIZATIONS, 'none'])} or a (mean, std) pair")
        mean, std = NORMALIZATIONS[value]
        return value, tuple(mean), tuple(std)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"normalization must be a name or a (mean, std) pair, got {value!r:.80}")
    mean, std = _float_triple(value[0], "normalization mean"), _float_triple(value[1], "normalization std")
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ValueError(f"normalization needs as many means as stds, every std > 0; got {mean}, {std}")
    name = next((key for key, (m, s) in NORMALIZATIONS.items() if tuple(m) == mean and tuple(s) == std), None)
    return name, mean, std


def _architecture_record(value, what: str) -> dict:
    """``{"name", "kwargs"}`` from a record dict, a zoo name, or a model class or factory of the
    user's (registered under its ``__name__`` with :func:`minibasis.models.register_model`, no
    arguments recorded: a process that loads the file registers the same constructor first)."""
    from minibasis.models import canonical_architecture, register_model
    from minibasis.models.registry import MODELS

    if callable(value) and isinstance(getattr(value, "__name__", None), str):
        if MODELS.get(value.__name__, value) is not value:
            raise ValueError(f"{what}: the name {value.__name__!r} is already registered for another constructor; "
                             f"register yours under another name (minibasis.models.register_model) and pass that")
        register_model(value.__name__, value)
        name, kwargs = value.__name__, {}
    elif isinstance(value, str):
        name, kwargs = canonical_architecture(value)
    elif isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(value.get("kwargs", {}), dict):
        name, kwargs = value["name"], dict(value.get("kwargs", {}))
    else:
        raise ValueError(f"{what} must be a zoo name or {{'name': ..., 'kwargs': {{...}}}}, got {value!r:.120}")
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: constructor arguments must be JSON values: {exc}") from None
    return {"name": name, "kwargs": kwargs}


def _head_classes(model: Module) -> int | None:
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    return int(linears[-1].out_features) if linears and hasattr(linears[-1], "out_features") else None


# ---------------------------------------------------------------------------
# save_model
# ---------------------------------------------------------------------------
def model_record(model: Module, *, normalization=None, dataset: str | None = None, **metadata) -> dict:
    """What :func:`save_model` writes except the weights: format, architecture, BasisConv layout,
    class count, dataset, normalization, version and ``extra`` (see the module doc). Training
    checkpoints store it too, so they rebuild their model as a model file does. The arguments
    are :func:`save_model`'s."""
    from minibasis import __version__

    if not isinstance(model, Module):
        raise TypeError(f"save_model: expected a minibasis Module, got {type(model).__name__}")
    architecture = metadata.pop("architecture", None) or getattr(model, "architecture", None)
    if architecture is None:
        raise ValueError("save_model: the model has no .architecture (it was not built by a zoo constructor); "
                         "pass architecture=YourModelClass (or a factory), '<zoo name>' or {'name': ..., 'kwargs': "
                         "{...}}; a custom name is rebuilt on loading once minibasis.models.register_model(name, "
                         "constructor) has made it known")
    architecture = _architecture_record(architecture, "save_model: architecture")
    num_classes = metadata.pop("num_classes", None)
    if num_classes is None:
        num_classes = architecture["kwargs"].get("num_classes", _head_classes(model))
    if dataset is not None and not isinstance(dataset, str):
        raise TypeError(f"save_model: dataset must be a str or None, got {type(dataset).__name__}")
    name, mean, std = _normalization(normalization)
    graph = getattr(model, "graph_bytes", None)  # an imported ONNX network: its graph rebuilds it
    return {**({} if graph is None else {"onnx_graph": np.frombuffer(graph, dtype=np.uint8)}),
            "format": MODEL_FORMAT, "architecture": architecture, "basis_layout": basis_layout(model),
            "num_classes": None if num_classes is None else int(num_classes), "dataset": dataset,
            "normalization": {"name": name, "mean": None if mean is None else list(mean),
                              "std": None if std is None else list(std)},
            "minibasis_version": __version__, "extra": dict(metadata)}


def checkpoint_meta(model: Module, *, normalization=None, dataset: str | None = None) -> dict:
    """The ``extra_meta`` a :class:`~minibasis.training.Trainer` stores in every checkpoint so that
    :func:`load_model` rebuilds the model from it: ``{"model_file": model_record(model, ...)}``."""
    return {CHECKPOINT_RECORD_KEY: model_record(model, normalization=normalization, dataset=dataset)}


def save_model(model: Module, path, *, normalization=None, dataset: str | None = None, **metadata) -> None:
    """Write ``model`` and what rebuilds it to ``path`` (one ``.npz``, atomically; see the module doc).

    Args:
        model: a zoo model (it carries ``model.architecture``), possibly compressed (its
            BasisConv layout is recorded) or fine-tuned.
        path: the file, used as given (no suffix added).
        normalization: the input normalization the model expects: a key of
            :data:`minibasis.data.NORMALIZATIONS` ("cifar10", "imagenet"), "none", a
            ``(mean, std)`` pair, or None (not recorded).
        dataset: the dataset it was trained on ("cifar10", ...), or None.
        **metadata: ``architecture=`` (a zoo name or ``{"name", "kwargs"}``) for a model without
            ``.architecture``, ``num_classes=`` to override the inferred count, anything else
            (numbers, strings, lists, dicts, arrays) is stored under ``extra``.

    Under mpirun only rank 0 writes (every rank holds the same weights).
    """
    from minibasis import distributed

    record = model_record(model, normalization=normalization, dataset=dataset, **metadata)
    if not distributed.is_main_process():
        return
    write = save_safetensors if os.fspath(path).endswith(SAFETENSORS_SUFFIX) else save
    write({**record, "state_dict": {k: backend.to_numpy(v) for k, v in model.state_dict().items()}}, path)


# ---------------------------------------------------------------------------
# Reading the formats
# ---------------------------------------------------------------------------
@dataclass
class _Contents:
    """One file's weights and what it says about its model (before the model is built)."""

    state: dict
    format: str
    architecture: dict | None = None       # {"name", "kwargs"} when the file records or implies one
    inferred_from: str | None = None       # how a torch file's architecture was inferred
    layout: dict = field(default_factory=dict)
    num_classes: int | None = None
    dataset: str | None = None
    normalization: tuple = (None, None, None)
    version: str | None = None
    extra: dict = field(default_factory=dict)
    graph: bytes | None = None             # an imported ONNX network's graph (minibasis.onnx)


def _read(source: str) -> _Contents:
    if is_safetensors(source):  # the same record as an .npz, or a plain state dict
        return _from_npz(load_safetensors(source), source)
    if sniff_format(source) == NPZ:
        return _from_npz(load(source), source)
    return _from_torch(load_torch_checkpoint(source), source)


def _old_architecture(record, source: str) -> dict | None:
    """``{"model": name, **constructor arguments}`` (the verbs' record before :data:`MODEL_FORMAT`)
    → ``{"name", "kwargs"}``; the oldest files wrote ``depth: None`` for models without one."""
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("model"), str):
        raise ModelFileError(f"{source}: malformed architecture record {record!r:.120}", source=source)
    kwargs = {key: value for key, value in record.items()
              if key != "model" and not (key in ("depth", "num_classes") and value is None)}
    return {"name": record["model"], "kwargs": kwargs}


def _from_record(record, state, source: str, **extra) -> _Contents:
    """A :func:`model_record` (of a model file or a checkpoint's meta) with its weights."""
    try:
        architecture = _architecture_record(record["architecture"], f"{source}: architecture")
        norm = record.get("normalization") or {}
        mean = tuple(norm["mean"]) if norm.get("mean") is not None else None
        std = tuple(norm["std"]) if norm.get("std") is not None else None
        return _Contents(state=state, format=MODEL_FORMAT, architecture=architecture,
                         layout=record.get("basis_layout") or {}, num_classes=record.get("num_classes"),
                         dataset=record.get("dataset"), normalization=(norm.get("name"), mean, std),
                         version=record.get("minibasis_version"), extra={**(record.get("extra") or {}), **extra},
                         graph=None if record.get("onnx_graph") is None else bytes(np.asarray(record["onnx_graph"])))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{source}: malformed {MODEL_FORMAT} record: {exc}", source=source) from None


def _from_npz(content, source: str) -> _Contents:
    if not isinstance(content, dict):
        raise ModelFileError(f"{source} holds a {type(content).__name__}, not a model", source=source)
    kind = content.get("format")
    if kind == MODEL_FORMAT:
        return _from_record(content, content.get("state_dict"), source)
    if kind == _OLD_MODEL_FORMAT:
        return _Contents(state=content.get("state_dict"), format="legacy",
                         architecture=_old_architecture(content.get("architecture"), source),
                         layout=content.get("basisconv") or {})
    if kind == CHECKPOINT_FORMAT or isinstance(content.get("model"), dict):
        meta = content.get("meta") if isinstance(content.get("meta"), dict) else {}
        progress = {"epoch": meta.get("epoch"), "stage": meta.get("stage")}
        if isinstance(meta.get(CHECKPOINT_RECORD_KEY), dict):
            return _from_record(meta[CHECKPOINT_RECORD_KEY], content.get("model"), source, **progress)
        return _Contents(state=content.get("model"), format="legacy",
                         architecture=_old_architecture(meta.get("architecture"), source),
                         layout=meta.get("basisconv") or {}, extra=progress)
    if isinstance(kind, str):
        raise ModelFileError(f"{source}: unknown file format {kind!r:.60}", source=source)
    return _Contents(state=content, format="legacy")  # a plain state dict (minibasis.serialization.save(model))


_BLOCK_KEY = re.compile(r"layer([123])\.(\d+)\.")


def _infer_resnet(state: dict) -> tuple[dict, str] | None:
    """akamaster's (shortcut A, head "linear") or bearpaw's (B, "fc") CIFAR ResNet from its keys."""
    head = "linear" if "linear.weight" in state else "fc" if "fc.weight" in state else None
    if head is None or "conv1.weight" not in state:
        return None
    blocks = {1: set(), 2: set(), 3: set()}
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks[int(match.group(1))].add(int(match.group(2)))
    counts = {stage: len(found) for stage, found in blocks.items()}
    n = counts[1]
    if n == 0 or any(counts[s] != n or blocks[s] != set(range(n)) for s in counts):
        return None
    shortcut = "B" if any(".downsample." in key for key in state) else "A"
    if (shortcut == "A") != (head == "linear"):
        return None
    num_classes = int(state[f"{head}.weight"].shape[0])
    origin = "akamaster" if shortcut == "A" else "bearpaw"
    return ({"name": "resnet_cifar", "kwargs": {"depth": 6 * n + 2, "num_classes": num_classes, "shortcut": shortcut}},
            f"{'an' if origin[0] in 'aeiou' else 'a'} {origin} CIFAR ResNet with {n} blocks per stage")


def _from_torch(state: dict, source: str) -> _Contents:
    inferred = _infer_resnet(state)
    if inferred is None:
        return _Contents(state=state, format="torch")
    architecture, how = inferred
    contents = _Contents(state=state, format="torch", architecture=architecture, inferred_from=how,
                         num_classes=architecture["kwargs"]["num_classes"])
    if architecture["kwargs"]["shortcut"] == "A":
        # akamaster's ResNets were trained on CIFAR-10 with the ImageNet statistics; the file does not say so.
        from minibasis.data import NORMALIZATIONS
        mean, std = NORMALIZATIONS["imagenet"]
        contents.normalization = ("imagenet", tuple(mean), tuple(std))
        contents.dataset = "cifar10" if contents.num_classes == 10 else None
        contents.extra = {"inferred": "architecture from the keys; normalization and dataset are akamaster's"}
    return contents


# ---------------------------------------------------------------------------
# load_model
# ---------------------------------------------------------------------------
def _describe_kwargs(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _requested(architecture, kwargs: dict) -> tuple[str | None, dict]:
    """The caller's (canonical zoo name or None, explicit keyword arguments)."""
    from minibasis.models import canonical_architecture

    if architecture is None:
        return None, dict(kwargs)
    if isinstance(architecture, dict):
        record = _architecture_record(architecture, "load_model: architecture")
        return record["name"], {**record["kwargs"], **kwargs}
    if not isinstance(architecture, str):
        raise TypeError(f"load_model: architecture must be a zoo name or a record dict, "
                        f"got {type(architecture).__name__}")
    return canonical_architecture(architecture, **kwargs)


def _reconcile(contents: _Contents, architecture, kwargs: dict, source: str) -> tuple[str, dict]:
    """The zoo name and arguments to build: the file's, checked against (and completed by) the caller's."""
    name, explicit = _requested(architecture, kwargs)
    recorded = contents.architecture
    if recorded is None:
        if name is None:
            what = "a PyTorch checkpoint" if contents.format == "torch" else "the file"
            hint = (" (only akamaster/bearpaw CIFAR ResNets are inferred from their keys)"
                    if contents.format == "torch" else "")
            raise ModelFileError(f"{source}: {what} does not record its architecture{hint}; pass it, "
                                 f"e.g. load_model(path, architecture=\"resnet_cifar\", depth=56)",
                                 source=source, argument="architecture")
        return name, explicit
    from minibasis.models import canonical_architecture
    try:
        file_name, file_kwargs = canonical_architecture(recorded["name"], **recorded["kwargs"])
    except ValueError as exc:
        raise ModelFileError(f"{source}: {exc}", source=source) from None
    said = f"{source} holds {contents.inferred_from}" if contents.inferred_from else f"{source} records"
    if name is not None and name != file_name:
        raise ModelFileError(f"architecture={architecture!r} was given, but {said}{':' if contents.inferred_from else ''} architecture "
                             f"{file_name!r} ({_describe_kwargs(file_kwargs)})",
                             source=source, argument="architecture", given=architecture, recorded=file_name)
    for key, value in explicit.items():
        if key in file_kwargs and file_kwargs[key] != value:
            suggestion = f"; pass {key}={file_kwargs[key]!r} or leave {key} out" if contents.inferred_from else ""
            recorded_value = f"{key}={file_kwargs[key]!r}" if not contents.inferred_from else \
                f"({key} {file_kwargs[key]!r})"
            raise ModelFileError(f"{key}={value!r} was given, but {said} {recorded_value}{suggestion}",
                                 source=source, argument=key, given=value, recorded=file_kwargs[key])
    return file_name, {**file_kwargs, **explicit}


def _load_onnx(source: str, architecture, kwargs: dict) -> tuple[Module, ModelMetadata]:
    """An ONNX graph (:func:`minibasis.onnx.load_model`): the file is its own architecture."""
    if architecture is not None or kwargs:
        raise ModelFileError(f"{source}: an ONNX file describes its own network; got architecture={architecture!r} "
                             f"{_describe_kwargs(kwargs)}", source=source)
    from minibasis.onnx import load_model as load_onnx

    model = load_onnx(source)
    return model, ModelMetadata(architecture={"name": "onnx", "kwargs": {}}, num_classes=_head_classes(model),
                                format="onnx", extra={"input_shape": list(model.input_shape)})


def load_model(path, *, architecture=None, **kwargs) -> tuple[Module, ModelMetadata]:
    """Rebuild the model stored at ``path``; returns ``(model in eval mode, ModelMetadata)``.

    Reads :func:`save_model` files, the files of earlier verbs (``model.npz``, training
    checkpoints ``checkpoint-*.npz``), plain ``.npz`` state dicts and PyTorch checkpoints
    (akamaster's and bearpaw's CIFAR ResNets are recognized from their keys: depth from the
    number of blocks, classes from the head). ``architecture`` (a zoo name such as
    "resnet_cifar" or "resnet56", or ``{"name", "kwargs"}``) and ``kwargs`` (constructor
    arguments such as ``depth=56``) are needed only where the file does not say; where it does,
    they must agree with it. Raises :class:`ModelFileError` for a contradiction (naming both
    values), an architecture that cannot be found, or weights that do not fit; the reader's
    :class:`~minibasis.serialization.CheckpointError` / ``UnsafePickleError`` for a malformed or hostile
    file; ``FileNotFoundError`` for a missing one.
    """
    from minibasis.models import get_model

    source = os.fspath(path)
    if source.endswith(".onnx"):
        return _load_onnx(source, architecture, kwargs)
    contents = _read(source)
    if not isinstance(contents.state, dict) or not contents.state:
        raise ModelFileError(f"{source} holds no model weights", source=source)
    if contents.graph is not None:  # an imported ONNX network, compressed or fine-tuned here
        from minibasis.onnx.importer import model_from_bytes
        name, build_kwargs = "onnx", {}
        model = model_from_bytes(contents.graph, source, contents.architecture["kwargs"].get("input_shape"))
    else:
        name, build_kwargs = _reconcile(contents, architecture, kwargs, source)
        try:
            model = get_model(name, **build_kwargs)
        except (ValueError, TypeError) as exc:
            raise ModelFileError(f"{source}: cannot build {name!r} ({_describe_kwargs(build_kwargs)}): {exc}",
                                 source=source) from None
    apply_basis_layout(model, contents.layout, source=source)
    try:
        model.load_state_dict(contents.state)
    except (KeyError, ValueError, TypeError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise ModelFileError(f"{source} does not fit {name} ({_describe_kwargs(build_kwargs)}): {message}",
                             source=source) from None
    model.eval()
    record = model.architecture
    mean, std = contents.normalization[1:]
    metadata = ModelMetadata(
        architecture=record, num_classes=contents.num_classes or record["kwargs"].get("num_classes"),
        dataset=contents.dataset, normalization=contents.normalization[0],
        mean=mean, std=std, basis_layout=basis_layout(model), minibasis_version=contents.version,
        format=contents.format, extra=contents.extra)
    return model, metadata
