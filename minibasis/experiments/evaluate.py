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

from minibasis import backend
from minibasis import data
from minibasis.experiments import options, runs
from minibasis.experiments.common import peak_memory_mib
from minibasis.experiments.errors import UserError

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    options.add_model_arguments(parser, model="resnet_cifar", depth=20, checkpoint="auto")
    options.add_data_arguments(parser, dataset="cifar10", normalize="imagenet")
    options.add_common_arguments(parser, batch_size=256)
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="evaluate only the first N test images (default: all)")


def run(args) -> int:
    from minibasis.training import evaluate, write_json

    options.check_common(args)
    options.check_positive("--limit", args.limit)
    json_only = args.output is not None and Path(args.output).suffix.lower() == ".json"
    loaded = options.load_verb_model(args, "eval")  # an --output ending in .json is a file: no run there
    model, description, normalize, spec = loaded.model, loaded.name, loaded.normalize, loaded.spec
    num_classes = options.classes_for(args, model, loaded.metadata, args.dataset)
    load_start = time.perf_counter()
    _, (images, labels) = options.load_dataset(args.dataset, args.data, num_test=args.limit, seed=args.seed)
    load_seconds = time.perf_counter() - load_start
    if len(labels) == 0:
        raise UserError(f"the {args.dataset} test set under {args.data or options.default_data_dir()} is empty")

    folder = None if json_only else runs.prepare_run_folder(args, "eval")
    log = folder.log if folder is not None else print
    if note := options.data_note(args.dataset, args.data):
        log(note)
    model.to(args.device)
    result = evaluate(model, images, labels, batch_size=args.batch_size,
                      transform=data.eval_transform(normalize), progress=not args.quiet,
                      desc=f"eval {description}")
    summary = {
        "model": description, "num_classes": num_classes,
        "checkpoint": None if spec.checkpoint is None else str(spec.checkpoint),
        "dataset": args.dataset, "data": str(args.data or options.default_data_dir()),
        "normalize": normalize, "batch_size": args.batch_size, "device": args.device,
        **result.as_dict(),
        "data_load_seconds": round(load_seconds, 3),
        "peak_rss_mib": None if (peak := peak_memory_mib()) is None else round(peak, 1),
        "host": platform.node(), "backend": backend.current(),
    }
    log(f"{description} on {args.dataset} ({result.total} test images): top-1 {100 * result.accuracy:.2f}% "
        f"({result.correct}/{result.total}), loss {result.loss:.4f}, {result.seconds:.1f} s, "
        f"{result.images_per_s:.0f} images/s, peak memory {summary['peak_rss_mib']} MiB")
    path = Path(args.output) if json_only else folder.file("eval.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, summary)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc}") from None
    log(f"wrote {path}")
    return 0
