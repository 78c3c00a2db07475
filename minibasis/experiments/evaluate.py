"""``minibasis eval``: top-1 accuracy of a zoo model with a checkpoint on a test set, with throughput.

Defaults evaluate the shared pretrained akamaster ResNet-20 (``--depth 56`` for
ResNet-56) on the shared CIFAR-10 test batch with the ImageNet normalization
those nets were trained with::

    minibasis eval --model resnet_cifar --depth 20 \\
        [--checkpoint PATH|auto] [--data DIR] [--batch-size 256] [--limit N] [--output result.json]

``--checkpoint`` reads PyTorch files (``.th``/``.pt``/``.pth``, without torch) and
minibasis ``.npz`` files, with strict key matching. Progress (images/s, ETA)
goes to stderr; the result line to stdout; ``--output`` writes it as JSON (a
path ending in ``.json``, or a folder that gets ``eval.json``).

The shared CIFAR-10 images are JPEG re-encodings of the originals: PyTorch
itself gets 81.03 % (ResNet-20) and 83.20 % (ResNet-56) with these weights on
them, not the published 91.73 % / 93.39 %; see docs/models.md.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

from minibasis import backend
from minibasis.experiments.errors import UserError
from minibasis.experiments import options
from minibasis.experiments.common import evaluate, peak_memory_mib

__all__ = ["add_arguments", "run", "output_path"]


def add_arguments(parser) -> None:
    options.add_model_arguments(parser, model="resnet_cifar", depth=20, checkpoint="auto")
    options.add_data_arguments(parser, dataset="cifar10", normalize="imagenet")
    options.add_common_arguments(parser, batch_size=256)
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="evaluate only the first N test images (default: all)")


def output_path(value) -> Path | None:
    """``--output`` as the JSON file to write: itself when it ends in .json, else ``<folder>/eval.json``."""
    if value is None:
        return None
    path = Path(value)
    return path if path.suffix.lower() == ".json" else path / "eval.json"


def run(args) -> int:
    options.check_common(args)
    options.check_positive("--limit", args.limit)
    description = options.describe_model(args)
    model, checkpoint = options.build_model_with_weights(args)
    load_start = time.perf_counter()
    _, (images, labels) = options.load_dataset(args.dataset, args.data, num_test=args.limit, seed=args.seed)
    load_seconds = time.perf_counter() - load_start
    if len(labels) == 0:
        raise UserError(f"the {args.dataset} test set under {args.data or options.default_data_dir()} is empty")
    if int(labels.max()) >= args.num_classes:
        raise UserError(f"labels go up to {int(labels.max())} but the model has --num-classes {args.num_classes}")
    backend.use(args.device)  # the global switch: batches are created on it
    model.to(args.device)
    result = evaluate(model, images, labels, batch_size=args.batch_size,
                      transform=options.eval_transform(args.normalize), progress=not args.quiet,
                      desc=f"eval {description}")
    summary = {
        "model": description, "num_classes": args.num_classes,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "dataset": args.dataset, "data": str(args.data or options.default_data_dir()),
        "normalize": args.normalize, "batch_size": args.batch_size, "device": args.device,
        **result.as_dict(),
        "data_load_seconds": round(load_seconds, 3),
        "peak_rss_mib": None if (peak := peak_memory_mib()) is None else round(peak, 1),
        "host": platform.node(), "backend": backend.current(),
    }
    print(f"{description} on {args.dataset} ({result.total} test images): top-1 {100 * result.accuracy:.2f}% "
          f"({result.correct}/{result.total}), loss {result.loss:.4f}, {result.seconds:.1f} s, "
          f"{result.images_per_s:.0f} images/s, peak memory {summary['peak_rss_mib']} MiB")
    path = output_path(args.output)
    if path is not None:
        from minibasis.experiments.trainer import write_json
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, summary)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc}") from None
        print(f"wrote {path}")
    return 0
