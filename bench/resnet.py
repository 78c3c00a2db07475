"""Whole-network speed and memory: ResNet-20 training step (batch 128), ResNet-56 evaluation (batch 256), Table 3 CNN training steps.

Images per second (best of ``--repeats``) and peak memory, for minibasis and for
the same networks in PyTorch CPU (option-A shortcuts, as akamaster's; the
paper's Table 3 CNN and its random-basis twin, whose basis stage is a conv with
a frozen weight, a learnable bias, BatchNorm, then a 1×1 conv). Each
measurement runs in its own fresh process so that its peak resident memory
(``ru_maxrss``) is its own; the table shows the peak and the growth over the
process's resident size right before the measured work (model, data and
imports already loaded). Inputs are random: speed does not depend on the data.

Targets: ResNet-20 training ≥ 0.75× PyTorch CPU throughput; Table 3 CNN training ≥ 0.8×,
its random-basis twin within 1.15× of the CNN's step time; ResNet-56 evaluation at batch 256
≥ 0.9× PyTorch eager and under 2 GiB peak resident memory, ``minibasis.deploy`` of it ≥ 1.0×
PyTorch eager (``resnet56_deployed_eval``: the torch side is the same eager evaluation).

    python bench/resnet.py [--repeats 5] [--device numpy|cupy] [--output path.json]

``--gemm-time`` also times the engine's GEMM calls in the best step: with ``--threads 1`` and
``OPENBLAS_NUM_THREADS=1`` (one core for both frameworks) it says how close to PyTorch the
engine could come if everything but its GEMMs took no time at all.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

TASKS = {  # name: (network: a ResNet depth, "table3" or "table3_basis"; batch, training)
    "resnet20_train": (20, 128, True),
    "resnet56_eval": (56, 256, False),
    "table3_train": ("table3", 128, True),
    "table3_basis_train": ("table3_basis", 128, True),
    "resnet56_deployed_eval": (56, 256, False),  # minibasis.deploy(model) against PyTorch eager
}
DEPLOYED = {"resnet56_deployed_eval"}
TARGET_TRAIN_RATIO, TARGET_EVAL_PEAK_BYTES = 0.75, 2 * 2 ** 30
TARGET_TABLE3_RATIO, TARGET_TWIN_SLOWDOWN = 0.8, 1.15
TARGET_EVAL_RATIO, TARGET_DEPLOYED_RATIO = 0.9, 1.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# Workers (one per process)
# ---------------------------------------------------------------------------------------------
def minibasis_step(depth, batch: int, training: bool, deployed: bool = False):
    """The measured call: one SGD step of ResNet-``depth`` (or of the Table 3 CNN for ``depth``
    "table3", its twin for "table3_basis") on a random batch, or one evaluation under
    ``no_grad`` (of ``minibasis.deploy(model)`` when ``deployed``), on the active backend.
    ``None`` when the zoo model is missing."""
    import numpy

    import minibasis as mb
    from minibasis import functions as F, optim
    try:
        from minibasis.models import resnet_cifar, table3_cnn
    except ImportError:
        return None
    mb.manual_seed(0)
    model = resnet_cifar(depth) if isinstance(depth, int) else table3_cnn(basis=depth == "table3_basis")
    rng = numpy.random.default_rng(0)
    x = mb.tensor(rng.standard_normal((batch, 3, 32, 32), dtype=numpy.float32))
    labels = mb.tensor(rng.integers(0, 10, size=batch))
    if training:
        model.train()
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

        def run():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
    else:
        model.eval()
        if deployed:
            model = mb.deploy(model, (1, 3, 32, 32))

        def run():
            with mb.no_grad():
                model(x)
    return run


@contextlib.contextmanager
def timed_gemms():
    """Inside the block the engine's GEMM entry points (``backend.matmul``, ``backend.tensordot``)
    are timed: the yielded one-element list accumulates the seconds spent inside them (summed over
    threads, so a wall time only with one engine thread). The originals are back after the block."""
    from minibasis import backend
    spent = [0.0]
    originals = {name: getattr(backend, name) for name in ("matmul", "tensordot")}

    def timer(gemm):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return gemm(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return timed
    try:
        for name, gemm in originals.items():
            setattr(backend, name, timer(gemm))
        yield spent
    finally:
        for name, gemm in originals.items():
            setattr(backend, name, gemm)


def _minibasis_worker(task: str, device: str, repeats: int, gemm_time: bool = False) -> dict:
    depth, batch, training = TASKS[task]
    sync = common.select_device(device)
    run = minibasis_step(depth, batch, training, deployed=task in DEPLOYED)
    if run is None:
        return {"error": "minibasis.models.resnet_cifar is not available"}
    if not gemm_time:
        return _measure(run, repeats, sync, batch)
    gemm_seconds = []
    with timed_gemms() as spent:
        def run_and_record():
            before = spent[0]
            run()
            gemm_seconds.append(spent[0] - before)
        result = _measure(run_and_record, repeats, sync, batch)
    timed = gemm_seconds[-len(result["seconds"]["all"]):]  # the warm-up call's is dropped
    result["gemm_seconds"] = timed[result["seconds"]["all"].index(result["seconds"]["best"])]
    from minibasis import parallel
    result["engine_threads"] = parallel.get_num_threads()
    return result


def _torch_resnet(torch, depth: int):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.pad = stride, (cout - cin) // 2

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            short = x
            if self.stride != 1 or self.pad:  # option A: subsample, zero-pad channels
                short = nn.functional.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))
            return torch.relu(out + short)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            n = (depth - 2) // 6
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            layers, cin = [], 16
            for cout, stride in ((16, 1), (32, 2), (64, 2)):
                for i in range(n):
                    layers.append(Block(cin, cout, stride if i == 0 else 1))
                    cin = cout
            self.layers = nn.Sequential(*layers)
            self.linear = nn.Linear(64, 10)

        def forward(self, x):
            out = self.layers(torch.relu(self.bn1(self.conv1(x))))
            return self.linear(out.mean(dim=(2, 3)))

    return ResNet()


def _torch_table3(torch, basis: bool):
    """The Table 3 CNN (or its twin: frozen 5×5 basis conv with bias, BatchNorm(Q), 1×1 conv with bias, Q = M)."""
    nn = torch.nn
    layers = []
    for c_in, c_out in ((3, 32), (32, 32), (32, 64)):
        if basis:
            stage = nn.Conv2d(c_in, c_out, 5, padding=2, bias=True)
            stage.weight.requires_grad_(False)
            layers += [stage, nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 1, bias=True)]
        else:
            layers.append(nn.Conv2d(c_in, c_out, 5, padding=2))
        layers += [nn.ReLU(), nn.MaxPool2d(3, 2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(576, 64), nn.ReLU(), nn.Linear(64, 10))


def torch_step(torch, depth, batch: int, training: bool, device: str):
    """The same call as :func:`minibasis_step` in PyTorch (CUDA when ``device`` is "cupy")."""
    import numpy
    dev = "cuda" if device == "cupy" else "cpu"
    torch.manual_seed(0)
    model = (_torch_resnet(torch, depth) if isinstance(depth, int)
             else _torch_table3(torch, depth == "table3_basis")).to(dev)
    rng = numpy.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, 3, 32, 32), dtype=numpy.float32)).to(dev)
    labels = torch.from_numpy(rng.integers(0, 10, size=batch)).to(dev)
    if training:
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                              weight_decay=1e-4)

        def run():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def run():
            with torch.no_grad():
                model(x)
    return run


def _torch_worker(task: str, device: str, repeats: int) -> dict:
    torch = common.load_torch(False, device)
    if torch is None:
        return {"error": "PyTorch not available"}
    depth, batch, training = TASKS[task]
    run = torch_step(torch, depth, batch, training, device)
    return _measure(run, repeats, common.torch_sync(torch, device), batch)


def _measure(run, repeats: int, sync, batch: int) -> dict:
    before = _rss_bytes()
    timing = common.best_time(run, repeats, sync, warmup=1)
    return {"seconds": timing, "images_per_s": batch / timing["best"], "batch": batch,
            "rss_before_bytes": before, "peak_rss_bytes": _peak_rss_bytes(),
            "peak_growth_bytes": _peak_rss_bytes() - before}


def _spawn(framework: str, task: str, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{framework}:{task}",
               "--device", args.device, "--repeats", str(args.repeats)] + (["--gemm-time"] if args.gemm_time else [])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": f"worker failed ({done.returncode}): {done.stderr.strip()[-2000:]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - start
    return result


def main(argv=None) -> int:
    parser = common.make_parser("resnet", __doc__.splitlines()[0], repeats=5)
    parser.add_argument("--worker", help=argparse_hidden())
    parser.add_argument("--tasks", nargs="*", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--gemm-time", action="store_true",
                        help="also time minibasis's GEMM calls (the best step's seconds inside them; summed "
                             "over threads, so a wall time with --threads 1) against PyTorch's whole step")
    args = parser.parse_args(argv)
    if args.worker:
        framework, task = args.worker.split(":")
        if framework == "minibasis":
            result = _minibasis_worker(task, args.device, args.repeats, args.gemm_time)
        else:
            result = _torch_worker(task, args.device, args.repeats)
        print(json.dumps(result))
        return 0

    env = common.check_machine(args)
    frameworks = ["minibasis"] + ([] if args.no_torch else ["torch"])
    results = {}
    for task in args.tasks:
        for framework in frameworks:
            print(f"  measuring {framework} {task} ...", file=sys.stderr, flush=True)
            results[f"{framework}:{task}"] = _spawn(framework, task, args)
    common.finish_environment(env)

    mib = lambda v: v / 2 ** 20 if v is not None else None  # noqa: E731
    rows, verdicts, gemm_lines = [], {}, []
    for task in args.tasks:
        mine, theirs = results[f"minibasis:{task}"], results.get(f"torch:{task}", {})
        for framework, r in (("minibasis", mine), ("torch", theirs)):
            if framework == "torch" and args.no_torch:
                continue
            if "error" in r:
                rows.append([task, framework, None, None, None, None, None, r["error"][:60]])
                continue
            ratio = (r["images_per_s"] / theirs["images_per_s"]
                     if framework == "minibasis" and "images_per_s" in theirs else None)
            rows.append([task, framework, r["seconds"]["best"] * 1e3, r["images_per_s"], ratio,
                         mib(r["peak_rss_bytes"]), mib(r["peak_growth_bytes"]), ""])
        if "gemm_seconds" in mine and "seconds" in theirs:
            gemm, step, threads = mine["gemm_seconds"], theirs["seconds"]["best"], mine["engine_threads"]
            if threads == 1:
                gemm_lines.append(
                    f"{task}: minibasis's GEMM calls alone take {gemm * 1e3:.1f} ms of its {mine['seconds']['best'] * 1e3:.1f} ms "
                    f"step = {gemm / step:.2f}x PyTorch's whole step ({step * 1e3:.1f} ms): with nothing but these "
                    f"GEMMs, at most {step / gemm:.2f}x PyTorch's throughput")
            else:  # summed over the engine threads: a lower bound on their wall time is the sum / threads
                gemm_lines.append(
                    f"{task}: minibasis's GEMM calls take {gemm * 1e3:.1f} thread-ms over {threads} engine threads "
                    f"(wall {mine['seconds']['best'] * 1e3:.1f} ms); even perfectly shared, {gemm / threads * 1e3:.1f} ms "
                    f"= {gemm / threads / step:.2f}x PyTorch's whole step ({step * 1e3:.1f} ms)")
        if "error" not in mine:
            if task == "resnet20_train" and "images_per_s" in theirs:
                value = mine["images_per_s"] / theirs["images_per_s"]
                verdicts["resnet20_train_throughput_over_torch"] = {
                    "value": value, "limit": TARGET_TRAIN_RATIO, "met": value >= TARGET_TRAIN_RATIO}
            if task == "table3_train" and "images_per_s" in theirs:
                value = mine["images_per_s"] / theirs["images_per_s"]
                verdicts["table3_train_throughput_over_torch"] = {
                    "value": value, "limit": TARGET_TABLE3_RATIO, "met": value >= TARGET_TABLE3_RATIO}
            if task == "table3_basis_train" and "error" not in results.get("minibasis:table3_train", {"error": 1}):
                value = mine["seconds"]["best"] / results["minibasis:table3_train"]["seconds"]["best"]
                verdicts["table3_basis_step_over_table3_step"] = {
                    "value": value, "limit": TARGET_TWIN_SLOWDOWN, "met": value <= TARGET_TWIN_SLOWDOWN}
            for name, limit in (("resnet56_eval", TARGET_EVAL_RATIO), ("resnet56_deployed_eval", TARGET_DEPLOYED_RATIO)):
                if task == name and "images_per_s" in theirs:
                    value = mine["images_per_s"] / theirs["images_per_s"]
                    verdicts[f"{name}_throughput_over_torch"] = {"value": value, "limit": limit, "met": value >= limit}
            if task == "resnet56_eval":
                peak = mine["peak_rss_bytes"]
                verdicts["resnet56_eval_peak_rss_bytes"] = {
                    "value": peak, "limit": TARGET_EVAL_PEAK_BYTES, "met": peak <= TARGET_EVAL_PEAK_BYTES}
    print(f"\nResNets on CIFAR-sized input, float32, device {args.device}, best of {args.repeats} "
          "(each in its own process)")
    print(common.format_table(["task", "framework", "step ms", "images/s", "vs torch", "peak RSS MiB",
                               "growth MiB", "note"], rows))
    print(common.describe_environment(env))
    for line in gemm_lines:
        print(line)
    for key, v in verdicts.items():
        memory = key.endswith("bytes")
        comparison = ">=" if key.endswith("over_torch") else "<="
        shown = f"{mib(v['value']):.0f} MiB" if memory else f"{v['value']:.2f}"
        limit = f"{mib(v['limit']):.0f} MiB" if memory else v["limit"]
        print(f"target {key} {comparison} {limit}: {shown} -> {'met' if v['met'] else 'MISSED'}")
    common.write_json(args.output, {"benchmark": "resnet", "device": args.device, "repeats": args.repeats,
                                    "environment": env, "results": results, "targets": verdicts})
    return 0


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
