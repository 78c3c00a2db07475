"""``minibasis eval``: top-1 accuracy of a model file on a test set, with throughput.

Defaults evaluate the shared pretrained akamaster ResNet-20 (``--depth 56`` for
ResNet-56) on the shared CIFAR-10 test batch; a model file written by the other verbs
brings its own architecture, class count and input normalization::

    minibasis eval [--checkpoint PATH|auto] [--data DIR] [--batch-size 256] [--limit N] [--output DIR]

``--checkpoint`` reads minibasis model files and PyTorch files (``.th``/``.pt``/``.pth``,
without torch), with strict key matching. Progress (images/s, ETA) goes to stderr; the
result line to stdout. Like every verb, it writes a run folder (``--output DIR``, default
``runs/eval-<timestamp>``): ``config.json``, ``log.txt`` and ``eval.json``; an ``--output``
ending in ``.json`` writes only that file.

The shared CIFAR-10 images are JPEG re-encodings of the originals: PyTorch
itself gets 81.03 % (ResNet-20) and 83.20 % (ResNet-56) with these weights on
them, not the published 91.73 % / 93.39 %; see docs/models.md.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

from minibasis import backend, data
from minibasis.experiments import argtypes, common, options, runs
from minibasis.experiments.common import peak_memory_mib
from minibasis.experiments.loading import inference_form, load_data, load_verb_model
from minibasis.measure import input_channels
from minibasis.experiments.errors import UserError

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    options.add_model_arguments(parser, model="resnet_cifar", depth=20, checkpoint="auto")
    options.add_data_arguments(parser, dataset="cifar10", normalize="imagenet")
    options.add_common_arguments(parser, batch_size=256)
    parser.add_argument("--limit", type=argtypes.positive, default=None, metavar="N",
                        help="evaluate only the first N test images (default: all)")
    options.add_deploy_argument(parser)


def compression_note(model) -> str | None:
    """One line saying that ``model`` is compressed: its BasisConv layers (Q each) among the convs
    and the conv multiplications per 32×32 image, measured; None for a model without BasisConv."""
    from minibasis.measure import profile

    prof = profile(model, (1, input_channels(model), 32, 32))
    basis = [r for r in prof.rows if r.Q is not None]
    if not basis:
        return None
    return (f"the model is compressed: {len(basis)} of {len(prof.rows)} convs are BasisConv2d (Q per layer "
            f"{[r.Q for r in basis]}); conv multiplications per 32x32 image: "
            f"{prof.totals['model_conv_mults']:,} (measured)")


def run(args) -> int:
    from minibasis.training import evaluate, write_json

    spec = options.verb_spec(args, "eval")
    o, run_spec, data_spec = spec.options, spec.run, spec.data
    json_only = run_spec.output is not None and Path(run_spec.output).suffix.lower() == ".json"
    loaded = load_verb_model(spec)  # an --output ending in .json is a file: no run there
    model, description, normalize, num_classes = loaded.model, loaded.name, loaded.normalize, loaded.classes
    load_start = time.perf_counter()
    _, (images, labels) = load_data(data_spec, num_test=o.limit, seed=run_spec.seed)
    load_seconds = time.perf_counter() - load_start
    if len(labels) == 0:
        raise UserError(f"the {data_spec.name} test set under {data_spec.root} is empty")

    folder = None if json_only else runs.prepare_run_folder(run_spec)
    log = folder.log if folder is not None else print
    if note := common.data_note(data_spec.name, data_spec.root):
        log(note)
    if compressed := compression_note(model):
        log(compressed)
    model.to(run_spec.device)
    result = evaluate(inference_form(model, o.deploy), images, labels, batch_size=run_spec.batch_size,
                      transform=data.eval_transform(normalize), progress=not run_spec.quiet,
                      desc=f"eval {description}")
    summary = {
        "model": description, "num_classes": num_classes,
        "checkpoint": None if spec.model.checkpoint is None else str(spec.model.checkpoint),
        "dataset": data_spec.name, "data": str(data_spec.root),
        "normalize": normalize, "batch_size": run_spec.batch_size, "device": run_spec.device, "deployed": o.deploy,
        **result.as_dict(),
        "data_load_seconds": round(load_seconds, 3),
        "peak_rss_mib": None if (peak := peak_memory_mib()) is None else round(peak, 1),
        "host": platform.node(), "backend": backend.current(),
    }
    log(f"{description} on {data_spec.name} ({result.total} test images): top-1 {100 * result.accuracy:.2f}% "
        f"({result.correct}/{result.total}), loss {result.loss:.4f}, {result.seconds:.1f} s, "
        f"{result.images_per_s:.0f} images/s, peak memory {summary['peak_rss_mib']} MiB")
    path = Path(run_spec.output) if json_only else folder.file("eval.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, summary)
    except OSError as exc:
        if exc.errno in runs.WRITE_ERRNOS:
            raise  # no room: the command line says so in one line, in the log too
        raise UserError(f"cannot write {path}: {exc}") from None
    log(f"wrote {path}")
    return 0
