"""For scale: wall time of one epoch over 50,000 CIFAR-10 images, extrapolated from consecutive timed steps.

Training steps at batch 128 (random inputs: speed does not depend on the data; data
loading and augmentation are not included), ``--steps`` consecutive steps after two
untimed ones; the epoch is 50,000 / 128 steps at the mean step time. Networks:

* the paper's Table 3 CNN and its random-basis twin, trained from scratch (every parameter);
* the pretrained ResNet-20 compressed at t = 0.8, coefficients-only fine-tuning (the paper's
  step 1: only the BasisConv coefficients learn; BatchNorm in training mode);
* the same-budget original: the pretrained ResNet-20 with only its conv weights learning.

    python bench/epochs.py [--steps 20] [--threshold 0.8]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

EPOCH_IMAGES, BATCH = 50_000, 128
CHECKPOINT = Path("models") / "akamaster" / "resnet20-12fca82f.th"


def networks(threshold: float):
    """(name, model, trainable parameters) for each measured network."""
    import minibasis as mb
    from minibasis import io as mbio
    from minibasis.models import resnet_cifar, table3_cnn
    from minibasis.nn import BasisConv2d, Conv2d

    mb.manual_seed(0)
    yield "table3_cnn", table3_cnn(), None
    yield "table3_cnn_basis", table3_cnn(basis=True), None
    shared = Path(os.environ.get("MINIBASIS_SHARED", common.REPO_ROOT.parent / "shared"))
    original = resnet_cifar(20)
    original.load_state_dict(mbio.load_torch_checkpoint(shared / CHECKPOINT))
    compressed, _ = mb.compress(original, energy_threshold=threshold, input_shape=(1, 3, 32, 32))
    yield (f"resnet20_t{threshold:g}_coefficients", compressed,
           [m.coeffs for m in compressed.modules() if isinstance(m, BasisConv2d)])
    yield "resnet20_original_conv_weights", original, [m.weight for m in original.modules() if isinstance(m, Conv2d)]


def time_steps(model, trainable, steps: int, sync) -> list[float]:
    import numpy

    import minibasis as mb
    from minibasis import functions as F, optim

    if trainable is not None:
        model.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    opt = optim.SGD(params, lr=0.01, momentum=0.9)
    rng = numpy.random.default_rng(0)
    x = mb.tensor(rng.standard_normal((BATCH, 3, 32, 32), dtype=numpy.float32))
    labels = mb.tensor(rng.integers(0, 10, size=BATCH))
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        opt.step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = common.make_parser("epochs", __doc__.splitlines()[0], repeats=1)
    parser.add_argument("--steps", type=int, default=20, help="timed consecutive steps (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=0.8)
    args = parser.parse_args(argv)
    env = common.check_machine(args)
    sync = common.select_device(args.device)
    rows, results = [], []
    for name, model, trainable in networks(args.threshold):
        times = time_steps(model, trainable, args.steps, sync)
        mean = sum(times) / len(times)
        epoch = mean * EPOCH_IMAGES / BATCH
        results.append({"network": name, "step_seconds": times, "mean_step_s": mean,
                        "images_per_s": BATCH / mean, "epoch_s_extrapolated": epoch,
                        "load_average": list(os.getloadavg())})
        rows.append([name, mean * 1e3, min(times) * 1e3, BATCH / mean, epoch / 60, os.getloadavg()[0]])
        print(f"  {name}: {mean * 1e3:.0f} ms/step", file=sys.stderr, flush=True)
    common.finish_environment(env)
    print(f"\nOne epoch of {EPOCH_IMAGES} images at batch {BATCH}, extrapolated from {args.steps} consecutive steps "
          "(mean), random inputs, no data loading")
    print(common.format_table(["network", "mean step ms", "best step ms", "images/s", "epoch min", "load"], rows))
    print(common.describe_environment(env))
    common.write_json(args.output, {"benchmark": "epochs", "device": args.device, "steps": args.steps,
                                    "threshold": args.threshold, "environment": env, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
