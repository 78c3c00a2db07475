"""Evaluate the shared pretrained CIFAR-10 ResNets (akamaster) with minibasis, without PyTorch.

    python examples/eval_pretrained.py [--depths 20 56] [--batch-size 256] [--limit N] [--device numpy|cupy]

Reads ``<shared>/models/akamaster/resnet{20,56}-*.th`` with minibasis's restricted
unpickler, loads them with strict key matching into ``resnet_cifar(depth,
shortcut="A")``, and evaluates ``<shared>/data/cifar-10-batches-py/test_batch``
with the ImageNet normalisation the nets were trained with, showing progress and
images/s. ``<shared>`` is ``$MINIBASIS_SHARED`` or ``../shared`` beside the repository.

The shared test images are JPEG re-encodings of CIFAR-10: PyTorch itself gets
81.03 % (ResNet-20) and 83.20 % (ResNet-56) with these weights on them, against
the published 91.73 % / 93.39 % on the original pixels. minibasis should print
the same numbers as PyTorch, not the published ones.
"""
from __future__ import annotations

import argparse
import sys

import minibasis
from minibasis.data import IMAGENET_MEAN, IMAGENET_STD, Normalize, load_cifar10
from minibasis.experiments.common import peak_memory_mib, shared_dir
from minibasis.training import evaluate
from minibasis.io import load_torch_checkpoint
from minibasis.models import resnet_cifar

# PyTorch 2.13 with the same weights on the same images (shared/models/akamaster/README.md).
PYTORCH_REFERENCE = {20: 81.03, 56: 83.20}
PUBLISHED = {20: 91.73, 56: 93.39}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56], choices=[20, 56])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="only the first N test images")
    parser.add_argument("--device", choices=("numpy", "cupy"), default="numpy")
    args = parser.parse_args(argv)

    shared = shared_dir()
    _, (images, labels) = load_cifar10(shared / "data")
    images, labels = images[:args.limit], labels[:args.limit]
    transform = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    for depth in args.depths:
        checkpoints = sorted((shared / "models" / "akamaster").glob(f"resnet{depth}-*.th"))
        if not checkpoints:
            print(f"no resnet{depth}-*.th under {shared / 'models' / 'akamaster'}", file=sys.stderr)
            return 1
        model = resnet_cifar(depth, num_classes=10, shortcut="A")
        model.load_state_dict(load_torch_checkpoint(checkpoints[0]), strict=True)
        minibasis.use(args.device)  # the global switch: batches are created on it
        model.to(args.device)
        result = evaluate(model, images, labels, batch_size=args.batch_size, transform=transform,
                          desc=f"ResNet-{depth}")
        print(f"ResNet-{depth}: top-1 {100 * result.accuracy:.2f}% on {result.total} images "
              f"(PyTorch on the full shared test set: {PYTORCH_REFERENCE[depth]:.2f}%; published on the original "
              f"pixels: {PUBLISHED[depth]:.2f}%), {result.seconds:.1f} s, {result.images_per_s:.0f} images/s")
    peak = peak_memory_mib()
    if peak is not None:
        print(f"peak resident memory: {peak:.0f} MiB ({minibasis.backend.current()} backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
