"""One command that checks and benchmarks minibasis on a GPU in a few minutes; report.md + report.json.

    python bench/gpu.py [--quick] [--device cupy|strict] [--output DIR] [--weights DIR] [--no-torch]

Sections (each one runs in its own try/except, so a failure is reported, not a crash):

* environment: Python, NumPy, SciPy, CuPy, the CUDA runtime and driver versions, the device's
  name and memory, PyTorch and its CUDA;
* correctness: conv2d / max and average pooling / batch norm / cross-entropy forward and backward
  on random shapes, on the device in float32 and float64, against float64 host references
  (minibasis on NumPy, and PyTorch CPU when importable); BasisConv at t = 1 equal to its conv;
  measured multiplication counts identical on the device and on NumPy; a short training run on
  ``minibasis.data.synthetic`` reaching the accuracy it reaches on NumPy; then the engine's test
  files run by pytest on the device (``pytest --backend <device> -m "engine or gpu"``, with
  tests/gpu/test_gpu.py, up to 240 s);
* speed, last, in the time left: the bench/conv.py layers (batch 64, and 256) against the same GEMMs through the device's
  ``matmul`` (cuBLAS) and against PyTorch CUDA; ResNet-20 training steps and ResNet-56 evaluation,
  images/s at batch 128 and 256, against PyTorch CUDA; the compressed ResNet-56's time ratio
  next to its measured multiplication ratio (akamaster weights from ``--weights DIR`` when they
  are there, random weights otherwise); device memory held by CuPy's memory pool.

Exit status 1 when any correctness check fails or cannot run, else 0. ``--device strict`` runs
everything on the CPU stand-in backend (a dry run of the script; CI runs ``--quick --device
strict``); its timings are CPU timings of the stand-in and mean nothing for a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

REPO_ROOT = common.REPO_ROOT
TIME_LIMIT_S = 340  # the whole run, under 6 minutes with start-up and report writing
ENGINE_TESTS_FULL_S, ENGINE_TESTS_QUICK_S = 240, 60
SPEED_RESERVE_FULL_S, SPEED_RESERVE_QUICK_S = 60, 5  # kept for the speed sections, which run last
QUICK_ENGINE_TEST_FILES = ["tests/engine/test_conv.py"]  # --quick: the plumbing, on the central op


# ---------------------------------------------------------------------------------------------
# The run: its options, clock, device and report
# ---------------------------------------------------------------------------------------------
@dataclass
class Section:
    name: str
    kind: str  # "environment" | "correctness" | "speed"
    status: str = "skipped"  # "pass" | "fail" | "error" | "skipped" | "info"
    seconds: float = 0.0
    message: str = ""
    details: dict = field(default_factory=dict)
    tables: list = field(default_factory=list)  # [(title, headers, rows)]

    def table(self, title: str, headers: list, rows: list) -> None:
        self.tables.append((title, headers, rows))


@dataclass
class Run:
    args: argparse.Namespace
    started: float
    sync: Callable[[], None] = lambda: None
    torch: Any = None

    @property
    def quick(self) -> bool:
        return self.args.quick

    @property
    def device(self) -> str:
        return self.args.device

    @property
    def torch_cuda(self):
        """PyTorch for the speed comparisons: only on a real GPU, and only a build with CUDA."""
        if self.device != "cupy" or self.torch is None or not self.torch.cuda.is_available():
            return None
        return self.torch

    def remaining(self) -> float:
        return self.args.time_limit - (time.perf_counter() - self.started)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat, a few engine tests (~30 s)")
    parser.add_argument("--device", choices=("cupy", "strict"), default="cupy",
                        help="the device backend to check (strict: the CPU stand-in, a dry run)")
    parser.add_argument("--output", default=str(REPO_ROOT / "bench" / "results" / "gpu"),
                        help="folder for report.md and report.json (default: %(default)s)")
    parser.add_argument("--weights", default=str(REPO_ROOT / "weights"),
                        help="folder that may hold akamaster's resnet56-*.th (default: %(default)s)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch references and comparisons")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S,
                        help="seconds for the whole run; sections that no longer fit are skipped (default: %(default)s)")
    return parser.parse_args(argv)


def relative_error(got, want) -> float:
    """max |got − want| / max(max |want|, 1e-30), in float64 on the host."""
    import numpy
    got, want = numpy.asarray(got, dtype=numpy.float64), numpy.asarray(want, dtype=numpy.float64)
    if got.shape != want.shape:
        return float("inf")
    return float(numpy.abs(got - want).max(initial=0.0) / max(float(numpy.abs(want).max(initial=0.0)), 1e-30))


TOLERANCE = {"float64": 1e-9, "float32": 2e-4}


def memory_pool_bytes(device: str) -> dict | None:
    """CuPy's default memory pool: bytes in use and bytes held (used + cached free blocks)."""
    if device != "cupy":
        return None
    import cupy
    pool = cupy.get_default_memory_pool()
    return {"used_bytes": int(pool.used_bytes()), "total_bytes": int(pool.total_bytes())}


def fresh_memory_pool(device: str) -> None:
    """Return cached blocks to the driver, so that what the pool holds after a workload is its peak."""
    if device == "cupy":
        import cupy
        cupy.get_default_memory_pool().free_all_blocks()


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def _cuda_version(number: int) -> str:
    return f"{number // 1000}.{(number % 1000) // 10}"


def section_environment(run: Run, out: Section) -> None:
    import numpy
    import scipy

    import minibasis
    info = {"python": platform.python_version(), "platform": platform.platform(), "numpy": numpy.__version__,
            "scipy": scipy.__version__, "minibasis": minibasis.__version__, "device_backend": run.device,
            "load_average": list(os.getloadavg()), "cpu_count": os.cpu_count()}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    if run.device == "cupy":
        import cupy
        runtime = cupy.cuda.runtime
        device_id = cupy.cuda.Device().id
        props = runtime.getDeviceProperties(device_id)
        name = props["name"]
        free, total = runtime.memGetInfo()
        info.update(cupy=cupy.__version__, cuda_runtime=_cuda_version(runtime.runtimeGetVersion()),
                    cuda_driver=_cuda_version(runtime.driverGetVersion()),
                    device_name=name.decode() if isinstance(name, bytes) else str(name),
                    device_memory_bytes=int(props["totalGlobalMem"]), device_free_bytes=int(free),
                    compute_capability=f"{props['major']}.{props['minor']}",
                    multiprocessors=int(props["multiProcessorCount"]), device_count=runtime.getDeviceCount())
    else:
        info.update(device_name="strict stand-in (NumPy on the CPU; no GPU)")
    torch = run.torch
    info["torch"] = getattr(torch, "__version__", None)
    info["torch_cuda"] = getattr(getattr(torch, "version", None), "cuda", None) if torch is not None else None
    info["torch_sees_the_gpu"] = bool(torch is not None and torch.cuda.is_available())
    out.details = info
    out.status = "info"
    out.message = info["device_name"]
    rows = [[key, value] for key, value in info.items()]
    out.table("environment", ["what", "value"], rows)


# ---------------------------------------------------------------------------------------------
# Correctness: ops against float64 host references
# ---------------------------------------------------------------------------------------------
def _op_cases(rng, count: int):
    """(op name, function of Tensors, host inputs, extra) for random shapes of every op."""
    import numpy

    from minibasis import functions as F
    cases = []
    for _ in range(count):
        n, c, m = int(rng.integers(1, 5)), int(rng.integers(1, 9)), int(rng.integers(1, 9))
        k, stride, pad = int(rng.choice([1, 3, 5])), int(rng.integers(1, 3)), int(rng.integers(0, 3))
        h, w = int(rng.integers(max(k - 2 * pad, 1), 13)), int(rng.integers(max(k - 2 * pad, 1), 13))
        x = rng.standard_normal((n, c, h, w))
        cases.append(("conv2d", lambda x, wt, b, s=stride, p=pad: F.conv2d(x, wt, b, stride=s, padding=p),
                      [x, rng.standard_normal((m, c, k, k)) / numpy.sqrt(c * k * k), rng.standard_normal(m)],
                      dict(stride=stride, padding=pad)))
        pk = int(rng.integers(2, 4))
        ps, pp = int(rng.integers(1, 3)), int(rng.integers(0, pk // 2 + 1))
        ph, pw = int(rng.integers(pk, 13)), int(rng.integers(pk, 13))
        size = n * c * ph * pw  # distinct values: no ties, so float32 and float64 pick the same maxima
        distinct = rng.permutation((numpy.arange(size) - size / 2) * 0.01).reshape(n, c, ph, pw)
        cases.append(("max_pool2d", lambda x, k=pk, s=ps, p=pp: F.max_pool2d(x, k, s, p), [distinct],
                      dict(kernel=pk, stride=ps, padding=pp)))
        cases.append(("avg_pool2d", lambda x, k=pk, s=ps, p=pp: F.avg_pool2d(x, k, s, p),
                      [rng.standard_normal((n, c, ph, pw))], dict(kernel=pk, stride=ps, padding=pp)))
        bn_x = rng.standard_normal((n + 1, c, h, w)) * 2 + 1
        cases.append(("batch_norm", lambda x, g, b: F.batch_norm(x, None, None, g, b, training=True),
                      [bn_x, rng.uniform(0.5, 2, c), rng.standard_normal(c)], {}))
        classes = int(rng.integers(2, 11))
        labels = rng.integers(0, classes, size=n + 2)
        cases.append(("cross_entropy", lambda z, y=labels: F.cross_entropy(z, y),
                      [rng.standard_normal((n + 2, classes)) * 3], dict(labels=labels)))
    return cases


def _run_case(fn, inputs, upstream, dtype):
    """Forward and backward of ``fn`` on the active backend: host copies of (output, input grads)."""
    import minibasis as mb
    leaves = [mb.tensor(a.astype(dtype), requires_grad=True) for a in inputs]
    out = fn(*leaves)
    out.backward(mb.tensor(upstream.astype(dtype).reshape(out.shape)))
    return [out.numpy()] + [leaf.grad.numpy() for leaf in leaves]


def _torch_reference(torch, name, inputs, extra, upstream):
    """The same op in PyTorch CPU float64: (output, input grads), or None for an op it lacks."""
    tf = torch.nn.functional
    leaves = [torch.from_numpy(a.astype("float64")).requires_grad_() for a in inputs]
    if name == "conv2d":
        out = tf.conv2d(*leaves, stride=extra["stride"], padding=extra["padding"])
    elif name == "max_pool2d":
        out = tf.max_pool2d(leaves[0], extra["kernel"], extra["stride"], extra["padding"])
    elif name == "avg_pool2d":
        out = tf.avg_pool2d(leaves[0], extra["kernel"], extra["stride"], extra["padding"])
    elif name == "batch_norm":
        out = tf.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True)
    elif name == "cross_entropy":
        out = tf.cross_entropy(leaves[0], torch.from_numpy(extra["labels"]))
    else:
        return None
    out.backward(torch.from_numpy(upstream.reshape(tuple(out.shape))))
    return [out.detach().numpy()] + [leaf.grad.numpy() for leaf in leaves]


def section_ops(run: Run, out: Section) -> None:
    import numpy

    import minibasis as mb
    rng = numpy.random.default_rng(2026)
    cases = _op_cases(rng, 2 if run.quick else 8)
    worst: dict[tuple, list] = {}  # (op, dtype, reference) -> [cases, max relative error]
    failures = []
    for index, (name, fn, inputs, extra) in enumerate(cases):
        mb.use("numpy")
        probe = fn(*[mb.tensor(a) for a in inputs])
        upstream = rng.standard_normal(probe.shape)
        host = _run_case(fn, inputs, upstream, numpy.float64)
        references = {"numpy float64": host}
        if run.torch is not None:
            references["torch cpu float64"] = _torch_reference(run.torch, name, inputs, extra, upstream)
        mb.use(run.device)
        for dtype in ("float64", "float32"):
            got = _run_case(fn, inputs, upstream, numpy.dtype(dtype))
            for ref_name, want in references.items():
                if want is None:
                    continue
                error = max(relative_error(g, w) for g, w in zip(got, want))
                shape = "x".join(map(str, inputs[0].shape))
                entry = worst.setdefault((name, dtype, ref_name), [0, 0.0])
                entry[0], entry[1] = entry[0] + 1, max(entry[1], error)
                if error > TOLERANCE[dtype]:
                    failures.append(f"{name} case {index} ({shape}, {extra if name != 'cross_entropy' else ''}) "
                                    f"{dtype} vs {ref_name}: relative error {error:.3g}")
    mb.use(run.device)
    rows = [[op, dtype, reference, count, error, TOLERANCE[dtype], "ok" if error <= TOLERANCE[dtype] else "FAIL"]
            for (op, dtype, reference), (count, error) in worst.items()]
    out.table("forward + backward on random shapes vs float64 host references (max relative error over "
              "output and input grads)", ["op", "device dtype", "reference", "cases", "max rel. error",
                                           "tolerance", "verdict"], rows)
    comparisons = sum(count for count, _ in worst.values())
    out.details = {"cases": len(cases), "comparisons": comparisons, "failures": failures, "tolerance": TOLERANCE}
    out.status = "fail" if failures else "pass"
    out.message = f"{comparisons} comparisons, {len(failures)} failed"


def section_basisconv_exactness(run: Run, out: Section) -> None:
    import numpy

    import minibasis as mb
    from minibasis import backend, nn
    rng = numpy.random.default_rng(7)
    rows, failures = [], []
    for index in range(2 if run.quick else 6):
        c, m, k = int(rng.integers(1, 9)), int(rng.integers(2, 17)), int(rng.choice([1, 3, 5]))
        stride, pad = int(rng.integers(1, 3)), k // 2
        x = rng.standard_normal((2, c, 9, 9))
        weight, bias = rng.standard_normal((m, c, k, k)), rng.standard_normal(m)
        for dtype in ("float64", "float32"):
            conv = nn.Conv2d(c, m, k, stride=stride, padding=pad)
            conv.weight.data = backend.asarray(weight.astype(dtype))
            conv.bias.data = backend.asarray(bias.astype(dtype))
            exact = nn.BasisConv2d.from_conv(conv, energy_threshold=1.0)
            results = []
            for module in (conv, exact):
                xt = mb.tensor(x.astype(dtype), requires_grad=True)
                y = module(xt)
                y.backward(mb.tensor(numpy.ones(y.shape, dtype=dtype)))
                results.append([y.numpy(), xt.grad.numpy()])
            error = max(relative_error(a, b) for a, b in zip(results[1], results[0]))
            ok = error <= TOLERANCE[dtype] and exact.num_basis == min(m, c * k * k)
            rows.append([f"{c}->{m} {k}x{k} s{stride}", dtype, exact.num_basis, error, "ok" if ok else "FAIL"])
            if not ok:
                failures.append(f"case {index} {dtype}: Q = {exact.num_basis}, relative error {error:.3g}")
    out.table("BasisConv2d.from_conv(t = 1) against its conv on the device (output and input grad)",
              ["conv", "dtype", "Q", "rel. error", "verdict"], rows)
    out.details = {"failures": failures}
    out.status = "fail" if failures else "pass"
    out.message = f"{len(rows)} cases, {len(failures)} failed"


def _counted_workloads(quick: bool):
    """(name, build model, input shape, backward?) for the count comparison."""
    from minibasis import models
    workloads = [("table3_cnn forward+backward", lambda: models.table3_cnn(), (2, 3, 32, 32), True),
                 ("resnet20 forward+backward", lambda: models.resnet_cifar(20), (2, 3, 32, 32), True)]
    if not quick:
        workloads.append(("resnet56 forward", lambda: models.resnet_cifar(56), (2, 3, 32, 32), False))
    return workloads


def _counts_on(device: str, build, shape, backward: bool, threshold: float | None):
    import numpy

    import minibasis as mb
    from minibasis import functions as F
    mb.use(device)
    mb.manual_seed(0)  # host-side initialization: the same weights on every backend
    model = build()
    if threshold is not None:
        model, _ = mb.compress(model, energy_threshold=threshold, input_shape=(1,) + tuple(shape[1:]))
    x = mb.tensor(numpy.random.default_rng(0).standard_normal(shape).astype(numpy.float32))
    labels = mb.tensor(numpy.arange(shape[0]) % 10)
    with mb.count_mults() as counter:
        if backward:
            F.cross_entropy(model(x), labels).backward()
        else:
            with mb.no_grad():
                model(x)
    return counter.as_dict()


def section_counts(run: Run, out: Section) -> None:
    rows, failures = [], []
    for name, build, shape, backward in _counted_workloads(run.quick):
        for threshold in (None, 0.9):
            label = name + (f", compressed t = {threshold}" if threshold else "")
            host = _counts_on("numpy", build, shape, backward, threshold)
            device = _counts_on(run.device, build, shape, backward, threshold)
            same = host == device and host["conv"] > 0
            rows.append([label, host["total"], device["total"], host["conv"], device["conv"], "ok" if same else "FAIL"])
            if not same:
                failures.append(f"{label}: numpy {host} vs {run.device} {device}")
    out.table("measured multiplications, NumPy vs device (whole batch of 2)",
              ["workload", "total numpy", "total device", "conv numpy", "conv device", "verdict"], rows)
    out.details = {"failures": failures}
    out.status = "fail" if failures else "pass"
    out.message = f"{len(rows)} workloads, {len(failures)} differ"


# ---------------------------------------------------------------------------------------------
# Correctness: a short real training run, on NumPy and on the device
# ---------------------------------------------------------------------------------------------
def _train_synthetic(device: str, quick: bool) -> dict:
    """A small CNN on minibasis.data.synthetic; loss and accuracy accumulate on the device and
    are read once per epoch (the only host synchronisations of the loop)."""
    import numpy

    import minibasis as mb
    from minibasis import functions as F, nn, optim
    from minibasis.data import synthetic
    classes, size = 8, 16
    num_train, epochs = (800, 2) if quick else (3000, 4)
    (x_train, y_train), (x_test, y_test) = synthetic(num_train=num_train, num_test=500 if quick else 1000,
                                                     num_classes=classes, image_size=size, seed=0)

    def prepare(images):
        x = images.astype(numpy.float32) / 255.0
        return (x - x.mean(axis=(2, 3), keepdims=True)) / 0.1

    x_train, x_test = prepare(x_train), prepare(x_test)
    mb.use(device)
    mb.manual_seed(0)
    width = 8
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (size // 4) ** 2, classes))
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    order_rng = numpy.random.default_rng(0)
    batch, history = 64, []
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        order = order_rng.permutation(len(x_train))
        for i in range(0, len(order) - batch + 1, batch):
            index = order[i:i + batch]
            x, y = mb.tensor(x_train[index]), mb.tensor(y_train[index])  # one copy each to the device
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum = loss_sum + loss.data * len(index)  # device scalars: no synchronisation here
            correct = correct + (logits.data.argmax(axis=1) == y.data).sum()
            seen += len(index)
        history.append({"epoch": epoch + 1, "train_loss": float(loss_sum) / seen, "train_acc": int(correct) / seen})
    seconds = time.perf_counter() - start
    model.eval()
    with mb.no_grad():
        predictions = numpy.concatenate([model(mb.tensor(x_test[i:i + 250])).numpy().argmax(axis=1)
                                         for i in range(0, len(x_test), 250)])
    return {"test_acc": float((predictions == y_test).mean()), "history": history, "train_seconds": seconds,
            "images_per_s": epochs * (len(x_train) // batch) * batch / seconds}


def section_training(run: Run, out: Section) -> None:
    host = _train_synthetic("numpy", run.quick)
    device = _train_synthetic(run.device, run.quick)
    floor, slack = (0.25, 0.05) if run.quick else (0.9, 0.03)
    gap = abs(device["test_acc"] - host["test_acc"])
    ok = gap <= slack and min(device["test_acc"], host["test_acc"]) >= floor
    out.table("small CNN on minibasis.data.synthetic (8 classes, 16x16), same seeds",
              ["backend", "test accuracy", "final train loss", "train images/s"],
              [[name, r["test_acc"], r["history"][-1]["train_loss"], r["images_per_s"]]
               for name, r in (("numpy", host), (run.device, device))])
    out.details = {"numpy": host, run.device: device, "accuracy_floor": floor, "allowed_gap": slack}
    out.status = "pass" if ok else "fail"
    out.message = (f"test accuracy {device['test_acc']:.3f} on {run.device} vs {host['test_acc']:.3f} on numpy "
                   f"(gap {gap:.3f}, allowed {slack}; floor {floor})")


# ---------------------------------------------------------------------------------------------
# Correctness: the engine's test files on the device
# ---------------------------------------------------------------------------------------------
def engine_test_files() -> list[str]:
    """The test files whose tests are all marked engine (``pytestmark = pytest.mark.engine``)."""
    return [str(path.relative_to(REPO_ROOT)) for path in sorted((REPO_ROOT / "tests").rglob("test_*.py"))
            if "\npytestmark = pytest.mark.engine" in path.read_text(encoding="utf-8")]


def engine_test_command(device: str, targets: list[str]) -> list[str]:
    """pytest on ``targets``: the engine tests on ``device`` (tests/conftest.py's --backend) and the GPU tests."""
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--backend", device,
            "-m", "engine or gpu", *targets]


def child_environment() -> dict:
    """This environment for a child process: the checkout importable, no pytest or backend settings."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("MINIBASIS_TEST_BACKEND", "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS"):
        env.pop(name, None)
    return env


def section_engine_tests(run: Run, out: Section) -> None:
    reserve = SPEED_RESERVE_QUICK_S if run.quick else SPEED_RESERVE_FULL_S
    limit = min(ENGINE_TESTS_QUICK_S if run.quick else ENGINE_TESTS_FULL_S, run.remaining() - reserve)
    if limit < 20:
        raise TimeoutError(f"only {run.remaining():.0f} s left of --time-limit; the engine tests did not run")
    # Full run: also tests/gpu/test_gpu.py, the CuPy-against-NumPy tests that skip on machines without a GPU.
    targets = QUICK_ENGINE_TEST_FILES if run.quick else engine_test_files() + ["tests/gpu/test_gpu.py"]
    command = engine_test_command(run.device, targets)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=child_environment(), capture_output=True, text=True,
                              timeout=limit)
        stdout, returncode = done.stdout, done.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        returncode = None
    lines = stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    out.details = {"command": " ".join(command[2:]), "returncode": returncode, "summary": summary,
                   "failed": failed, "seconds": time.perf_counter() - start, "output_tail": stdout[-4000:]}
    if returncode is None:
        out.status, out.message = "fail", f"timed out after {limit:.0f} s (partial: {summary[-200:]!r})"
    else:
        out.status = "pass" if returncode == 0 else "fail"
        out.message = summary
    out.table("engine tests on the device", ["command", "result"], [[out.details["command"], out.message]] +
              [["", line] for line in failed[:40]])


# ---------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------
def section_conv_speed(run: Run, out: Section) -> None:
    from bench import conv
    layers = conv.LAYERS[:2] if run.quick else conv.LAYERS
    batches = (4,) if run.quick else (conv.BATCH, 256)
    timing_args = argparse.Namespace(repeats=1 if run.quick else 10, device=run.device)
    torch = run.torch_cuda
    rows, results = [], []
    for batch in batches:
        for spec in layers:
            if run.remaining() < 5:
                out.message = f"stopped early by --time-limit after {len(results)} layers"
                break
            row = conv.bench_layer(timing_args, spec, run.sync, torch, batch=batch)
            row["ratios"] = conv.summarize(row)
            results.append(row)
            ms = lambda key: row[key]["best"] * 1e3 if key in row else None  # noqa: E731
            rows.append([row["layer"], batch, ms("forward_s"), ms("gemm_forward_s"), ms("torch_forward_s"),
                         ms("forward_backward_s"), row["ratios"]["gemms_forward_backward_s"] * 1e3,
                         ms("torch_forward_backward_s"), row["ratios"]["forward_backward_over_gemms"],
                         row["ratios"].get("forward_backward_over_torch")])
    out.table("conv2d float32 (32x32 inputs unless named): minibasis vs the same GEMMs (device matmul) vs PyTorch CUDA (ms, best)",
              ["layer", "batch", "fwd", "GEMM fwd", "torch fwd", "f+b", "GEMMs f+b", "torch f+b",
               "f+b / GEMMs", "f+b / torch"], rows)
    out.details = {"rows": results}
    out.status = "info"


def section_network_speed(run: Run, out: Section) -> None:
    from bench import resnet
    tasks = [(20, 4, True), (56, 4, False)] if run.quick else [
        (20, 128, True), (20, 256, True), (56, 128, False), (56, 256, False)]
    repeats = 1 if run.quick else 5
    torch = run.torch_cuda
    rows, results = [], []
    for depth, batch, training in tasks:
        if run.remaining() < 5:
            out.message = f"stopped early by --time-limit after {len(results)} workloads"
            break
        label = f"ResNet-{depth} {'training step' if training else 'evaluation'}"
        fresh_memory_pool(run.device)
        step = resnet.minibasis_step(depth, batch, training)
        timing = common.best_time(step, repeats, run.sync, warmup=1)
        after_first = memory_pool_bytes(run.device)
        timing_again = common.best_time(step, repeats, run.sync, warmup=0)
        after_more = memory_pool_bytes(run.device)
        best = min(timing["best"], timing_again["best"])
        result = {"task": label, "batch": batch, "minibasis_images_per_s": batch / best, "pool": after_more,
                  "pool_after_first_repeats": after_first}
        del step
        if torch is not None:
            torch_run = resnet.torch_step(torch, depth, batch, training, run.device)
            torch_best = common.best_time(torch_run, repeats, common.torch_sync(torch, run.device), warmup=1)["best"]
            result["torch_images_per_s"] = batch / torch_best
            del torch_run
            torch.cuda.empty_cache()
        results.append(result)
        held = after_more["total_bytes"] / 2 ** 20 if after_more else None
        grew = (after_more["total_bytes"] > after_first["total_bytes"]) if after_more else None
        rows.append([label, batch, result["minibasis_images_per_s"], result.get("torch_images_per_s"),
                     (result["minibasis_images_per_s"] / result["torch_images_per_s"]
                      if result.get("torch_images_per_s") else None), held,
                     None if grew is None else ("grew" if grew else "reused")])
    out.table("whole networks, float32, random inputs (images/s, best of the repeats)",
              ["workload", "batch", "minibasis", "torch CUDA", "minibasis / torch", "pool MiB (peak)",
               "pool across repeats"], rows)
    out.details = {"rows": results, "memory_note": "pool MiB: CuPy's default pool total_bytes() after the "
                   "workload, started from an emptied pool (free_all_blocks), i.e. the most it held"}
    out.status = "info"


def _resnet56(weights_dir: Path):
    """ResNet-56 with akamaster's weights when ``weights_dir`` holds them, else random weights."""
    import minibasis as mb
    from minibasis import models
    mb.manual_seed(0)
    model = models.resnet_cifar(56)
    found = sorted(weights_dir.glob("resnet56-*.th")) if weights_dir.is_dir() else []
    if found:
        model.load_state_dict(mb.io.load_torch_checkpoint(found[0]))
        return model, f"akamaster {found[0].name}"
    return model, "random weights (no resnet56-*.th in --weights)"


def section_basisconv_speed(run: Run, out: Section) -> None:
    import numpy

    import minibasis as mb
    from bench.basisconv import interleaved_best
    model, weights = _resnet56(Path(run.args.weights))
    model.eval()
    thresholds = (0.9,) if run.quick else (0.95, 0.9, 0.8, 0.7)
    batch, repeats = (4, 1) if run.quick else (256, 5)
    x = mb.tensor(numpy.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(numpy.float32))

    def evaluate(net):
        def call():
            with mb.no_grad():
                net(x)
        return call

    def conv_mults(net):
        with mb.count_mults() as counter, mb.no_grad():
            net(x)
        return counter.conv

    original = conv_mults(model)
    rows, results = [], []
    for t in thresholds:
        if run.remaining() < 5:
            out.message = f"stopped early by --time-limit after {len(results)} thresholds"
            break
        compressed, report = mb.compress(model, energy_threshold=t)
        compressed.eval()
        mult_ratio = conv_mults(compressed) / original
        best = interleaved_best({"original": evaluate(model), "compressed": evaluate(compressed)}, repeats, run.sync)
        time_ratio = best["compressed"] / best["original"]
        replaced = len(report.replaced)
        results.append({"threshold": t, "mult_ratio": mult_ratio, "time_ratio": time_ratio,
                        "seconds_original": best["original"], "seconds_compressed": best["compressed"],
                        "replaced_layers": replaced})
        rows.append([t, replaced, mult_ratio, time_ratio, time_ratio / mult_ratio, best["original"] * 1e3,
                     best["compressed"] * 1e3])
        del compressed
    out.table(f"compressed ResNet-56 ({weights}), evaluation at batch {batch}: time ratio vs measured conv "
              "multiplication ratio", ["t", "convs replaced", "mult ratio", "time ratio", "time / mult",
                                       "original ms", "compressed ms"], rows)
    out.details = {"weights": weights, "rows": results}
    out.status = "info"


SECTIONS = [  # (name, kind, function, seconds it needs at least to be worth starting)
    ("environment", "environment", section_environment, 0),
    ("ops vs float64 host references", "correctness", section_ops, 5),
    ("BasisConv exactness at t = 1", "correctness", section_basisconv_exactness, 5),
    ("multiplication counts, numpy vs device", "correctness", section_counts, 5),
    ("training on synthetic data", "correctness", section_training, 10),
    ("engine tests on the device", "correctness", section_engine_tests, 20),
    ("conv speed", "speed", section_conv_speed, 5),
    ("network speed and memory", "speed", section_network_speed, 5),
    ("BasisConv speed vs multiplications", "speed", section_basisconv_speed, 5),
]


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(run: Run, sections: list[Section], failed: list[str]) -> str:
    env = next((s.details for s in sections if s.name == "environment"), {})
    lines = [f"# minibasis GPU check: {env.get('device_name', run.device)}", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: "
             f"`python bench/gpu.py {' '.join(sys.argv[1:])}`; {time.perf_counter() - run.started:.0f} s",
             f"- verdict: **{'FAIL: ' + ', '.join(failed) if failed else 'all correctness checks passed'}**", ""]
    if run.device == "strict":
        lines += ["(strict stand-in on the CPU: a dry run of the script; its timings say nothing about a GPU)", ""]
    lines += ["| section | kind | status | seconds | summary |", "|---|---|---|---|---|"]
    lines += [f"| {s.name} | {s.kind} | {s.status} | {s.seconds:.1f} | {_cell(s.message)} |" for s in sections]
    for s in sections:
        lines += ["", f"## {s.name}", ""]
        if s.message:
            lines += [s.message, ""]
        for title, headers, rows in s.tables:
            lines += [f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
            lines.append("")
        if s.status == "error":
            lines += ["```", s.details.get("traceback", "")[-3000:], "```"]
    return "\n".join(lines) + "\n"


def write_report(run: Run, sections: list[Section], failed: list[str]) -> Path:
    from minibasis.io import atomic_write
    folder = Path(run.args.output)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"report": "minibasis-gpu-check-1", "device": run.device, "quick": run.quick,
               "seconds": time.perf_counter() - run.started, "failed": failed,
               "sections": [{"name": s.name, "kind": s.kind, "status": s.status, "seconds": s.seconds,
                             "message": s.message, "details": s.details,
                             "tables": [{"title": t, "headers": h, "rows": r} for t, h, r in s.tables]}
                            for s in sections]}
    with atomic_write(folder / "report.json", "w") as f:
        f.write(json.dumps(payload, indent=2, default=str) + "\n")
    with atomic_write(folder / "report.md", "w") as f:
        f.write(render_markdown(run, sections, failed))
    return folder


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run(args=args, started=time.perf_counter())
    sections: list[Section] = []
    try:
        run.sync = common.select_device(args.device)
        device_error = None
    except Exception as exc:  # no CuPy, no GPU: report it, nothing else can run
        device_error = f"{type(exc).__name__}: {exc}"
    if not args.no_torch:
        try:
            import torch
            # float32 against float32: no TF32 in cuDNN convolutions or cuBLAS (CuPy uses none either)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            run.torch = torch
        except ImportError:
            run.torch = None
    for name, kind, function, needs in SECTIONS:
        section = Section(name, kind)
        sections.append(section)
        if device_error and name != "environment":
            section.status, section.message = "error", f"device {args.device!r} unusable: {device_error}"
            continue
        if run.remaining() < needs:
            section.status, section.message = ("error" if kind == "correctness" else "skipped",
                                               f"not started: {run.remaining():.0f} s left of --time-limit")
            continue
        print(f"[{time.perf_counter() - run.started:6.1f} s] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            import minibasis
            minibasis.use(args.device if not device_error else "numpy")
            function(run, section)
        except Exception as exc:  # one broken section is reported, the others still run
            section.status, section.message = "error", f"{type(exc).__name__}: {exc}"
            section.details["traceback"] = traceback.format_exc()
        section.seconds = time.perf_counter() - start
        print(f"         {section.status}: {section.message[:200]}", file=sys.stderr, flush=True)
    failed = [s.name for s in sections if s.kind in ("correctness", "environment") and s.status in ("fail", "error")]
    folder = write_report(run, sections, failed)
    print(f"report: {folder / 'report.md'} and report.json; "
          f"{'FAILED: ' + ', '.join(failed) if failed else 'all correctness checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
