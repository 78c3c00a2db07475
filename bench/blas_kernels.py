"""Which OpenBLAS kernel runs minibasis's own GEMMs fastest on this machine?

OpenBLAS picks its compute kernels from the CPU it detects at load time, and
``OPENBLAS_CORETYPE`` overrides the choice (it is read once, when NumPy loads
OpenBLAS, so it must be set before Python starts). The kernel for the newest
instruction set is not always the fastest for the GEMMs a convolution engine
makes, whose matrices are skinny (16–64 filters against tens of thousands of
columns). This bench measures it on minibasis's real workload:

1. it records every GEMM (``backend.matmul``) that one step of a network makes,
   with its operands' shapes and memory layouts (row-major, or a transposed view):
   by default one ResNet-20 training step at batch 128 and one ResNet-56
   evaluation at batch 256, the tasks of bench/resnet.py;
2. for each kernel it starts a fresh process with ``OPENBLAS_CORETYPE`` set and
   one BLAS thread (the engine holds OpenBLAS at one thread inside its chunk
   loops), replays every recorded GEMM on random operands of the same shapes and
   layouts (best of ``--repeats``), and sums the times weighted by how often
   each shape occurred: the GEMM time of one step under that kernel.

The recorded multiplications are checked against the engine's own count of the
same step. Pick the fastest kernel by exporting ``OPENBLAS_CORETYPE`` before
starting Python; results change by float rounding only (another kernel sums in
another order), and runs are bit-identical across engine thread counts either way.

    python bench/blas_kernels.py [--kernels "" Haswell Zen SkylakeX] [--repeats 3]
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

#: Kernels tried by default ("" is OpenBLAS's own choice). Names OpenBLAS does not know, or that
#: this CPU cannot run, fall back to its own choice (the table shows the kernel each process got).
KERNELS = ("", "Haswell", "Zen", "SkylakeX")
TASKS = {"resnet20_train": (20, 128, True), "resnet56_eval": (56, 256, False)}


def layout(a) -> str:
    """"C" for a row-major operand, "T" for one whose last two axes are a transposed view of a row-major
    array, "other" for anything else (replayed row-major)."""
    if a.flags.c_contiguous:
        return "C"
    if a.ndim >= 2 and a.swapaxes(-1, -2).flags.c_contiguous:
        return "T"
    return "other"


def record_gemms(run) -> tuple[Counter, int]:
    """Call ``run()`` once and return (Counter of (a shape, a layout, b shape, b layout, dtype) → calls,
    the multiplications the engine's own recorder received from its GEMM primitive meanwhile)."""
    from minibasis import backend
    seen: Counter = Counter()
    counted = [0]
    original = backend.matmul

    def recording(a, b, out=None):
        seen[(tuple(a.shape), layout(a), tuple(b.shape), layout(b), str(a.dtype))] += 1
        return original(a, b, out=out)

    def tally(primitive: str, mults: int) -> None:
        if primitive == "matmul":
            counted[0] += mults
    backend.matmul = recording
    backend.set_mult_recorder(tally)
    try:
        run()
    finally:
        backend.matmul = original
        backend.set_mult_recorder(None)
    return seen, counted[0]


def gemm_mults(key) -> int:
    """Multiplications of one recorded GEMM (NumPy's matmul semantics, batch dimensions broadcast)."""
    a_shape, _, b_shape, _, _ = key
    batch = math.prod(max(x, y) for x, y in zip((1,) * 8 + a_shape[:-2], (1,) * 8 + b_shape[:-2]))
    return batch * a_shape[-2] * a_shape[-1] * b_shape[-1]


def operand(rng, shape: tuple, kind: str, dtype: str):
    """A random array of ``shape`` laid out as recorded: row-major, or a transposed view of one."""
    if kind == "T":
        return rng.standard_normal(shape[:-2] + shape[:-3:-1]).astype(dtype).swapaxes(-1, -2)
    return rng.standard_normal(shape).astype(dtype)


def replay(gemms: list, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of each recorded GEMM (the worker's job, under one kernel)."""
    import time

    import numpy
    from threadpoolctl import threadpool_info
    rng = numpy.random.default_rng(0)
    seconds = []
    for a_shape, a_kind, b_shape, b_kind, dtype in gemms:
        a, b = operand(rng, tuple(a_shape), a_kind, dtype), operand(rng, tuple(b_shape), b_kind, dtype)
        best = math.inf
        for _ in range(repeats + 1):  # the first call warms up
            start = time.perf_counter()
            numpy.matmul(a, b)
            best = min(best, time.perf_counter() - start)
        seconds.append(best)
    blas = next((i for i in threadpool_info() if i.get("user_api") == "blas"), {})
    return {"seconds": seconds, "architecture": blas.get("architecture"), "threads": blas.get("num_threads")}


def _spawn(kernel: str, path: str, repeats: int) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    if kernel:
        env["OPENBLAS_CORETYPE"] = kernel
    else:
        env.pop("OPENBLAS_CORETYPE", None)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", path, "--repeats", str(repeats)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": f"worker failed ({done.returncode}): {done.stderr.strip()[-500:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = common.make_parser("blas_kernels", __doc__.splitlines()[0], repeats=3)
    parser.add_argument("--worker", help=argparse_hidden())
    parser.add_argument("--kernels", nargs="*", default=list(KERNELS),
                        help='OPENBLAS_CORETYPE values to try ("" = OpenBLAS\'s own choice; default: %(default)s)')
    parser.add_argument("--tasks", nargs="*", choices=sorted(TASKS), default=sorted(TASKS))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(replay(json.loads(Path(args.worker).read_text()), args.repeats)))
        return 0

    env = common.check_machine(args)
    from bench.resnet import minibasis_step
    recorded: Counter = Counter()
    for task in args.tasks:
        depth, batch, training = TASKS[task]
        run = minibasis_step(depth, batch, training)
        run()  # warm-up: the GEMMs of a steady step are recorded
        seen, counted = record_gemms(run)
        mults = sum(gemm_mults(key) * calls for key, calls in seen.items())
        if mults != counted:
            sys.exit(f"{task}: the recorded GEMMs make {mults} multiplications, the engine counted {counted}")
        print(f"  {task}: {sum(seen.values())} GEMM calls of {len(seen)} shapes, {mults / 1e9:.2f} G mults "
              f"(= the engine's count)", file=sys.stderr, flush=True)
        recorded.update(seen)
    gemms = sorted(recorded)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([list(key) for key in gemms], f)
    try:
        results = {}
        for kernel in args.kernels:
            print(f"  replaying under OPENBLAS_CORETYPE={kernel or '(unset)'} ...", file=sys.stderr, flush=True)
            results[kernel] = _spawn(kernel, f.name, args.repeats)
    finally:
        os.unlink(f.name)
    common.finish_environment(env)

    calls = [recorded[key] for key in gemms]
    totals = {k: sum(s * c for s, c in zip(r["seconds"], calls)) for k, r in results.items() if "seconds" in r}
    baseline = totals.get(args.kernels[0])
    rows = []
    for kernel, r in results.items():
        if "error" in r:
            rows.append([kernel or "(unset)", None, None, None, r["error"][:60]])
            continue
        rows.append([kernel or "(unset)", r["architecture"], totals[kernel] * 1e3,
                     baseline / totals[kernel] if baseline else None, ""])
    print(f"\nThe GEMMs of one step of {', '.join(args.tasks)} ({sum(calls)} calls, {len(gemms)} shapes), "
          f"replayed on one BLAS thread, best of {args.repeats}, summed over the calls")
    print(common.format_table(["OPENBLAS_CORETYPE", "kernel loaded", "GEMM ms", "speed vs first", "note"], rows))
    heavy = sorted(range(len(gemms)), key=lambda i: -calls[i] * gemm_mults(gemms[i]))[:8]
    detail = [[f"{gemms[i][0]}{'ᵀ' if gemms[i][1] == 'T' else ''} @ {gemms[i][2]}{'ᵀ' if gemms[i][3] == 'T' else ''}",
               calls[i]] + [gemm_mults(gemms[i]) / results[k]["seconds"][i] / 1e9 if "seconds" in results[k] else None
                            for k in results] for i in heavy]
    print("\nThe heaviest shapes (G mults/s under each kernel):")
    print(common.format_table(["a @ b (ᵀ: a transposed view)", "calls"] + [k or "(unset)" for k in results], detail))
    print(common.describe_environment(env))
    common.write_json(args.output, {"benchmark": "blas_kernels", "tasks": args.tasks, "repeats": args.repeats,
                                    "environment": env, "gemms": [list(k) for k in gemms], "calls": calls,
                                    "results": results, "total_seconds": totals})
    return 0


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
