"""The training step's non-conv passes: how much of a ResNet-20 step they take, and what each lever to cut them saves.

Two parts, both single-threaded by default (run with ``MINIBASIS_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1``):

1. ``--share``: a few ResNet-20 training steps (batch 128) under ``counting.time_ops``: the wall
   time of batch norm, ReLU and the residual adds (forward and backward) as a share of the step,
   the most any lever on them can save.
2. The levers, on ResNet-20's three activation shapes (batch 128), as NumPy passes that make
   the same ufunc calls as the engine, interleaved in one process (variant after variant,
   round after round, each round starting with another variant, so load drifts and cache
   states hit every variant alike), median wall and CPU
   (``time.process_time``) milliseconds with the spread:

   * ``bn chunked``: batch norm's training forward and backward with every step of a pass done
     on one chunk of the batch while it is in cache (forward: Σx; x − μ and Σ(x − μ)²; x̂, γx̂ + β;
     backward: Σgy and Σgy·x̂; the input gradient), against the same calls on the whole array
     one after another (the engine's passes), for each chunk size in ``--chunk-bytes``;
   * ``relu in place``: ReLU written over its input (what a batch-norm + ReLU or add + ReLU
     fused op could do) against a new output buffer (the engine's);
   * ``grad acc in place``: a tensor used twice (a residual block's input) gets its two
     gradients summed in place against into a new array (the engine's autograd).

    MINIBASIS_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/norm_passes.py --rounds 30 --share
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = ((16, 32), (32, 16), (64, 8))  # (channels, height = width) of ResNet-20's three stages
EPS = 1e-5


def _sum_in_order(partials):
    total = None
    for partial in partials:
        total = partial if total is None else total + partial
    return total


def bn_train_passes(x, gamma, beta, gy, step: int):
    """Batch norm's training forward and backward (the engine's ufunc calls), ``step`` images at a time
    per pass (``step`` = N: each step over the whole array before the next). Returns (y, dx)."""
    n = x.shape[0]
    chunks = [(a, min(n, a + step)) for a in range(0, n, step)]
    axes, shape = (0, 2, 3), (1, -1, 1, 1)
    count = x.size // x.shape[1]
    g, b = gamma.reshape(shape), beta.reshape(shape)
    mean = (_sum_in_order(x[a:z].sum(axis=axes) for a, z in chunks) / count).reshape(shape)
    x_hat, y = numpy.empty_like(x), numpy.empty_like(x)

    def center(a, z):
        c = numpy.subtract(x[a:z], mean, out=x_hat[a:z])
        return numpy.einsum("nchw,nchw->c", c, c)

    var = _sum_in_order(center(a, z) for a, z in chunks) / count
    inv_std = (1.0 / numpy.sqrt(var + EPS)).astype(x.dtype).reshape(shape)
    for a, z in chunks:
        part = numpy.multiply(x_hat[a:z], inv_std, out=x_hat[a:z])
        numpy.multiply(part, g, out=y[a:z])
        y[a:z] += b
    partials = [(gy[a:z].sum(axis=axes), numpy.einsum("nchw,nchw->c", gy[a:z], x_hat[a:z])) for a, z in chunks]
    mean_gy = (_sum_in_order(p[0] for p in partials) / count).reshape(shape)
    mean_gy_xhat = (_sum_in_order(p[1] for p in partials) / count).reshape(shape)
    scale = (gamma.reshape(shape) * inv_std)
    dx = numpy.empty_like(gy)
    for a, z in chunks:
        part = numpy.multiply(x_hat[a:z], mean_gy_xhat, out=dx[a:z])
        numpy.subtract(gy[a:z], part, out=part)
        part -= mean_gy
        numpy.multiply(part, scale, out=part)
    return y, dx


def _levers(batch: int, channels: int, size: int, chunk_bytes: list[int]):
    """(lever name, {variant: call}) for one activation shape; the first variant is the engine's."""
    rng = numpy.random.default_rng(0)
    shape = (batch, channels, size, size)
    x, other, gy = (rng.standard_normal(shape, dtype=numpy.float32) for _ in range(3))
    gamma, beta = rng.uniform(0.5, 2, channels).astype(numpy.float32), rng.standard_normal(channels).astype(numpy.float32)
    per_image = x[0].nbytes
    bn = {"whole": lambda: bn_train_passes(x, gamma, beta, gy, batch)}
    for size_bytes in chunk_bytes:
        step = max(1, min(batch, size_bytes // per_image))
        bn[f"{size_bytes >> 10} KiB"] = lambda step=step: bn_train_passes(x, gamma, beta, gy, step)
    scratch = numpy.empty_like(x)

    def relu_in_place():
        numpy.copyto(scratch, x)  # the fused op's own output buffer, written by the step before
        numpy.maximum(scratch, 0, out=scratch)

    def relu_new():
        numpy.copyto(scratch, x)
        return numpy.maximum(scratch, 0)

    def acc_in_place():
        numpy.copyto(scratch, gy)
        numpy.add(scratch, other, out=scratch)

    def acc_new():
        numpy.copyto(scratch, gy)
        return scratch + other

    return [("bn chunked", bn), ("relu in place", {"new": relu_new, "in place": relu_in_place}),
            ("grad acc in place", {"new": acc_new, "in place": acc_in_place})]


def _timed(run) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def _spread(values) -> str:
    return f"{statistics.median(values):8.3f} ({min(values):7.3f}..{max(values):7.3f})"


def levers(rounds: int, batch: int, chunk_bytes: list[int]) -> None:
    cases = {(f"{c}x{s}x{s}", name): variants for c, s in SHAPES for name, variants in _levers(batch, c, s, chunk_bytes)}
    times = defaultdict(list)
    load = os.getloadavg()[0]
    for round_ in range(rounds + 1):  # the first round warms up and is dropped
        for key, variants in cases.items():
            names = list(variants)
            # each round starts with a different variant: none always runs first (after another case)
            for variant in names[round_ % len(names):] + names[:round_ % len(names)]:
                times[key + (variant,)].append(_timed(variants[variant]))
    print(f"levers: batch {batch}, {rounds} rounds interleaved; load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'shape':10} {'lever':18} {'variant':9} {'wall ms median (min..max)':>28} {'cpu ms median (min..max)':>28}")
    for (shape, lever), variants in cases.items():
        for variant in variants:
            wall, cpu = zip(*times[(shape, lever, variant)][1:])
            print(f"{shape:10} {lever:18} {variant:9} {_spread(wall):>28} {_spread(cpu):>28}")


def share(steps: int, batch: int) -> None:
    """Median share of a ResNet-20 training step's wall time spent in batch norm, ReLU and the adds."""
    from bench.resnet import minibasis_step
    from minibasis import counting
    run = minibasis_step(20, batch, True)
    run()  # warm-up
    load = os.getloadavg()[0]
    totals, shares = [], defaultdict(list)
    for _ in range(steps):
        with counting.time_ops() as timer:
            start = time.perf_counter()
            run()
            total = time.perf_counter() - start
        totals.append(total * 1e3)
        by_op = defaultdict(float)
        for (phase, op, _, _), seconds in timer.seconds.items():
            by_op[op] += seconds
        for op in ("batch_norm", "relu", "add"):
            shares[op].append(by_op[op] / total)
    print(f"ResNet-20 training step, batch {batch}: {statistics.median(totals):.0f} ms median of {steps}; "
          f"load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    for op, values in shares.items():
        print(f"  {op:11} forward + backward: {100 * statistics.median(values):5.1f} % of the step "
              f"({100 * min(values):.1f}..{100 * max(values):.1f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/norm_passes.py", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds of the levers (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunk-bytes", default="2097152,1048576,262144",
                        help="comma-separated chunk sizes in bytes for the chunked batch norm")
    parser.add_argument("--share", action="store_true", help="also time ResNet-20 steps by op (5 steps)")
    args = parser.parse_args(argv)
    import minibasis as mb
    print(f"engine threads {mb.get_num_threads()}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
    if args.share:
        share(5, args.batch)
    levers(args.rounds, args.batch, [int(v) for v in args.chunk_bytes.split(",")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
