"""Data-parallel throughput: ResNet-20 training with 1 and 2 processes, and what it implies for GPUs.

Usage::

    python bench/distributed.py [--batch 64] [--steps 4] [--bus-gbs 400] [--json out.json]

Three configurations run ResNet-20 (CIFAR shapes, float32, SGD with momentum) on random data,
each in its own subprocess so that its BLAS thread count takes effect before NumPy loads:

1. one process, 2 BLAS threads, batch B;
2. one process, 1 BLAS thread, batch B (what one rank's core can do alone);
3. ``mpirun -n 2``, 1 BLAS thread per rank, global batch B (B/2 per rank), gradients averaged
   by ``minibasis.distributed.allreduce_gradients``.

For each: global images/s (B over the slowest rank's median step time, first step excluded;
with ``--repeats`` the configurations alternate and the best run of each is kept), and
for the MPI run the all-reduce time per step (packing, reducing, unpacking, and waiting for the
slower rank) as a share of the step, next to a bare all-reduce of the same payload after a
barrier (transfer alone, without load imbalance).

Last, the expected multi-GPU scaling: the payload is (parameters × 4 bytes) per step; a ring
all-reduce over W GPUs moves 2(W−1)/W of it through each GPU's links, so at NCCL bus bandwidth
``--bus-gbs`` (GB/s; nccl-tests "busbw") plus ``--latency-us`` per call, the communication time
per step is known; the scaling efficiency is t_compute / (t_compute + t_comm) without overlap.
GPU compute time per step is not measured here (no GPU on this machine), so it is printed as
a threshold: the per-GPU step time above which efficiency stays at or above 90 %.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _model():
    """ResNet-20 when the model zoo has it; otherwise a small CNN (and the report says so)."""
    try:
        from minibasis.models import resnet_cifar
        return resnet_cifar(20), "ResNet-20"
    except ImportError:  # pragma: no cover - only before the zoo existed
        from minibasis import nn
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)), "small CNN"


def worker(batch: int, steps: int) -> None:
    """One training run (one rank of it under mpirun); rank 0 prints one JSON line."""
    import numpy as np

    import minibasis
    from minibasis import distributed as dist
    from minibasis import optim
    from minibasis.functions import cross_entropy

    world = dist.init()
    minibasis.manual_seed(0)
    model, name = _model()
    dist.broadcast_parameters(model)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    num = batch * (steps + 1)
    data = (rng.normal(size=(num, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, size=num))
    loader = dist.ShardedDataLoader(data, batch, shuffle=True, seed=0)
    step_times, reduce_times = [], []
    reducer = None
    for x, y in loader:
        world.barrier()  # every step starts together, so a step's time is the same on all ranks
        start = time.perf_counter()
        opt.zero_grad()
        loss = cross_entropy(model(minibasis.tensor(x)), y)
        loss.backward()
        reducer = dist.allreduce_gradients(model)
        opt.step()
        step_times.append(time.perf_counter() - start)
        reduce_times.append(reducer.last_seconds)
    # Medians, first step excluded (it pays for allocations): robust to other work on the machine.
    step = float(np.median(step_times[1:]))
    reduce = float(np.median(reduce_times[1:]))
    # The slowest rank sets the pace.
    timing = dist.allreduce_metrics({"step": step, "reduce": reduce}, op="max")
    # Transfer alone: the same payload, every rank arriving together.
    payload = np.ones(reducer.bytes_per_step // 4, dtype=np.float32)
    bare = []
    for _ in range(10):
        world.barrier()
        start = time.perf_counter()
        world.allreduce_(payload, "sum")
        bare.append(time.perf_counter() - start)
    if dist.is_main_process():
        print(json.dumps({
            "model": name, "world_size": world.size, "batch": batch, "steps_timed": len(step_times) - 1,
            "threads": os.environ.get("OPENBLAS_NUM_THREADS", "?"), "parameters": model.num_parameters(),
            "payload_bytes": reducer.bytes_per_step, "step_s": timing["step"], "allreduce_s": timing["reduce"],
            "bare_allreduce_s": float(np.median(bare)), "images_per_s": batch / timing["step"],
        }), flush=True)


def _run(command: list[str], threads: int, timeout: float) -> dict:
    from minibasis.distributed.launcher import launcher_env

    env = launcher_env(threads=threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise SystemExit(f"benchmark run failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def expected_gpu_scaling(payload_bytes: int, bus_gbs: float, latency_us: float, calls: int, worlds=(2, 4, 8)) -> list[dict]:
    """Ring all-reduce time per step on W GPUs, and the per-GPU compute time for 90 % efficiency."""
    rows = []
    for w in worlds:
        seconds = 2 * (w - 1) / w * payload_bytes / (bus_gbs * 1e9) + calls * latency_us * 1e-6
        rows.append({"gpus": w, "allreduce_ms": seconds * 1e3, "compute_ms_for_90pct": 9 * seconds * 1e3})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="global batch size (even)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (+1 warm-up)")
    parser.add_argument("--bus-gbs", type=float, default=400.0,
                        help="stated NCCL all-reduce bus bandwidth in GB/s (default 400: NVLink H100 node)")
    parser.add_argument("--latency-us", type=float, default=30.0, help="stated latency of one NCCL call in µs")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the configurations this many times, alternating, and keep each one's best")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        parser.error(f"--batch must be an even number >= 2, got {args.batch}")
    if args.worker:
        worker(args.batch, args.steps)
        return 0

    from minibasis.distributed.launcher import find_launcher, mpirun_command

    me = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batch", str(args.batch),
          "--steps", str(args.steps)]
    configurations = {"1 process, 2 threads": (me, 2), "1 process, 1 thread": (me, 1)}
    launcher = find_launcher()
    if launcher is None:
        print("no MPI launcher found (pip install '.[mpi]'): the 2-process run is skipped")
    else:
        configurations["2 processes, 1 thread each"] = (mpirun_command(2, me, launcher), 1)
    runs: dict[str, dict] = {}
    for _ in range(max(1, args.repeats)):
        for label, (command, threads) in configurations.items():
            result = _run(command, threads=threads, timeout=1800)
            if label not in runs or result["step_s"] < runs[label]["step_s"]:
                runs[label] = result

    first = next(iter(runs.values()))
    print(f"{first['model']} ({first['parameters']:,} parameters), global batch {args.batch}, "
          f"{first['steps_timed']} timed steps, {os.cpu_count()} cores")
    print(f"{'configuration':<28} {'images/s':>9} {'step ms':>9} {'all-reduce ms':>14} {'share':>6} {'bare ms':>8}")
    for label, r in runs.items():
        share = r["allreduce_s"] / r["step_s"] if r["world_size"] > 1 else 0.0
        reduce = f"{r['allreduce_s'] * 1e3:14.2f}" if r["world_size"] > 1 else f"{'-':>14}"
        bare = f"{r['bare_allreduce_s'] * 1e3:8.2f}" if r["world_size"] > 1 else f"{'-':>8}"
        print(f"{label:<28} {r['images_per_s']:9.1f} {r['step_s'] * 1e3:9.1f} {reduce} {share:6.1%} {bare}")
    base = runs["1 process, 2 threads"]["images_per_s"]
    if "2 processes, 1 thread each" in runs:
        mpi = runs["2 processes, 1 thread each"]
        single = runs["1 process, 1 thread"]["images_per_s"]
        print(f"2 processes vs 1 process with 2 threads: {mpi['images_per_s'] / base:.2f}x; "
              f"vs 1 process with 1 thread: {mpi['images_per_s'] / single:.2f}x")
        w = mpi["world_size"]
        busbw = 2 * (w - 1) / w * mpi["payload_bytes"] / mpi["bare_allreduce_s"] / 1e9
        print(f"bare all-reduce of {mpi['payload_bytes'] / 1e6:.2f} MB between {w} ranks here: "
              f"{mpi['bare_allreduce_s'] * 1e3:.2f} ms, a bus bandwidth of {busbw:.1f} GB/s (shared memory)")

    payload = first["payload_bytes"]
    calls = 1  # ResNet-20's 1.1 MB fits one 25 MiB bucket
    print(f"\nexpected multi-GPU scaling: {payload / 1e6:.2f} MB all-reduced per step (parameters x 4 bytes), "
          f"ring all-reduce at a stated NCCL bus bandwidth of {args.bus_gbs:g} GB/s + {args.latency_us:g} µs per call")
    scaling = expected_gpu_scaling(payload, args.bus_gbs, args.latency_us, calls)
    for row in scaling:
        print(f"  {row['gpus']} GPUs: all-reduce {row['allreduce_ms']:.3f} ms per step; >= 90 % efficiency while "
              f"one GPU's forward+backward step takes >= {row['compute_ms_for_90pct']:.2f} ms")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "gpu_scaling": scaling, "bus_gbs": args.bus_gbs,
                                         "latency_us": args.latency_us}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
