"""What every benchmark shares: arguments, timing, the machine's load, tables and JSON.

Benchmarks time the best of several repeats (the least disturbed run) and
measure their baselines (plain GEMMs, PyTorch CPU) in the same process, right
beside the thing measured, so ratios stay meaningful on a shared machine. They
record the load average and the BLAS thread count next to the numbers, warn
loudly when the machine is busy, and refuse to run inside a test session.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python bench/x.py` from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE",
                    "OPENBLAS_L2_SIZE", "MINIBASIS_NUM_THREADS", "MINIBASIS_RETAIN_MEMORY")


def make_parser(name: str, description: str, repeats: int = 5) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"bench/{name}.py", description=description)
    parser.add_argument("--output", default=str(REPO_ROOT / "bench" / "results" / f"{name}.json"),
                        help="where to write the JSON results (default: %(default)s)")
    parser.add_argument("--device", choices=("numpy", "cupy"), default="numpy",
                        help="minibasis backend to measure (cupy needs a GPU)")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="timed repeats per measurement; the best is reported (default: %(default)s)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--max-load", type=float, default=None,
                        help="refuse to run when the 1-minute load average exceeds this (default: only warn)")
    parser.add_argument("--threads", type=int, default=None,
                        help="minibasis engine threads for the conv's chunks (sets $MINIBASIS_NUM_THREADS, "
                             "inherited by worker processes; default: the environment's, else the engine's: 2 on ≥ 2 usable CPUs)")
    parser.add_argument("--retain-memory", choices=("on", "off"), default=None,
                        help="keep freed host memory for reuse (sets $MINIBASIS_RETAIN_MEMORY, inherited by worker "
                             "processes; default: the environment's, else on where the C library is glibc)")
    return parser


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------
def _blas_info() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "prefix", "version", "num_threads", "architecture")
    return [{k: info.get(k) for k in keep} for info in threadpool_info()]


def _pytest_processes() -> list[int]:
    """Process ids of test runs on this machine (Linux /proc), other than this process."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"pytest" in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def environment() -> dict:
    """What the numbers depend on: load, cores, BLAS and its threads, versions."""
    import numpy
    env = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "blas": _blas_info(),
        "thread_variables": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "machine": platform.machine(),
        "processor": _cpu_model(),
    }
    try:  # the count the engine will use (the variable, else its own default), not just the variable
        from minibasis import parallel
        env["engine_threads"] = parallel.get_num_threads()
    except ImportError:
        env["engine_threads"] = None
    try:  # whether freed memory is kept (minibasis.host_memory), as the engine applied it
        import minibasis
        env["memory_retention"] = minibasis.get_memory_retention()
    except (ImportError, AttributeError):
        env["memory_retention"] = None
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def check_machine(args) -> dict:
    """Refuse inside a test run; warn loudly (or refuse, with --max-load) on a busy machine."""
    if "PYTEST_CURRENT_TEST" in os.environ or "pytest" in sys.modules:
        sys.exit("refusing to benchmark inside a test session: timings beside tests mean nothing")
    if getattr(args, "threads", None) is not None:  # before minibasis reads it (this process and the workers it spawns)
        os.environ["MINIBASIS_NUM_THREADS"] = str(args.threads)
    if getattr(args, "retain_memory", None) is not None:  # read when minibasis is imported
        os.environ["MINIBASIS_RETAIN_MEMORY"] = "1" if args.retain_memory == "on" else "0"
    env = environment()
    load = env["load_average"][0]
    busy = load > 0.5 * (env["cpu_count"] or 1)
    testers = _pytest_processes()
    if args.max_load is not None and load > args.max_load:
        sys.exit(f"refusing to benchmark: 1-minute load average {load:.2f} exceeds --max-load {args.max_load}")
    if busy or testers:
        bar = "!" * 78
        print(bar, file=sys.stderr)
        print(f"WARNING: the machine is busy (load average {load:.2f} on {env['cpu_count']} cores"
              f"{'; test processes running: ' + str(testers) if testers else ''}).", file=sys.stderr)
        print("Timings will be slower and noisier than on an idle machine; ratios measured in the same",
              file=sys.stderr)
        print("run are less affected, but compare absolute numbers with care.", file=sys.stderr)
        print(bar, file=sys.stderr)
    env["busy_warning"] = bool(busy or testers)
    env["pytest_processes"] = testers
    return env


def finish_environment(env: dict) -> dict:
    env["load_average_end"] = list(os.getloadavg())
    return env


# ---------------------------------------------------------------------------------------------
# Devices and timing
# ---------------------------------------------------------------------------------------------
def select_device(name: str) -> Callable[[], None]:
    """Switch minibasis to ``name``; return the function that waits for the device to finish."""
    import minibasis
    minibasis.use(name)
    if name == "cupy":
        import cupy
        return lambda: cupy.cuda.Device().synchronize()
    return lambda: None


def best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None,
              warmup: int = 1) -> dict:
    """Seconds of the fastest of ``repeats`` calls (after ``warmup`` untimed ones), and all of them."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"best": min(times), "median": sorted(times)[len(times) // 2], "all": times}


def load_torch(no_torch: bool = False, device: str = "numpy"):
    """PyTorch for the comparison, with as many threads as the BLAS has; None when unavailable."""
    if no_torch:
        return None
    try:
        import torch
    except ImportError:
        print("PyTorch not importable: no comparison (pip install 'minibasis[oracle]')", file=sys.stderr)
        return None
    if device == "cupy" and not torch.cuda.is_available():
        print("PyTorch has no CUDA here: no GPU comparison", file=sys.stderr)
        return None
    threads = next((b["num_threads"] for b in _blas_info() if b.get("user_api") == "blas"), None)
    if threads:
        torch.set_num_threads(int(threads))
    return torch


def torch_sync(torch, device: str) -> Callable[[], None]:
    if device == "cupy":
        return torch.cuda.synchronize
    return lambda: None


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def format_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    """Write atomically: a temporary file in the same folder, flushed and fsynced, then renamed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print(f"results written to {target}")


def describe_environment(env: dict) -> str:
    blas = next((b for b in env.get("blas", []) if b.get("user_api") == "blas"), None)
    blas_text = (f"{blas.get('internal_api')} {blas.get('version')} ({blas.get('architecture')}), "
                 f"{blas.get('num_threads')} threads" if blas else
                 f"threads from environment: {env.get('thread_variables') or 'not set'}")
    end = env.get("load_average_end")
    engine = env.get("engine_threads") or env.get("thread_variables", {}).get("MINIBASIS_NUM_THREADS", "?")
    retention = {True: "on", False: "off"}.get(env.get("memory_retention"), "?")
    return (f"{env.get('processor')}, {env.get('cpu_count')} cores; BLAS: {blas_text}; minibasis threads {engine}, "
            f"memory retention {retention}; "
            f"torch {env.get('torch')} ({env.get('torch_threads')} threads); load average "
            f"{env['load_average'][0]:.2f} at start" + (f", {end[0]:.2f} at end" if end else ""))
