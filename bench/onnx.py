"""Deployment speed in onnxruntime: pretrained ResNet-20/56, original vs compressed, as minibasis exports them.

For each depth and energy threshold t, ``minibasis.compress`` replaces the ResNet's convolutions
by BasisConv2d layers (skipping unprofitable ones) and ``minibasis.onnx.save_model`` writes the
original and the compressed network as standard ONNX graphs (a BasisConv layer is two plain
``Conv`` nodes), unfused and with every BatchNorm folded into its conv. onnxruntime (CPU
execution provider, ``--ort-threads`` intra-op threads, all graph optimizations on) then runs
each graph on the same batch; original and compressed runs are interleaved, ``--repeats`` times
each, and the best of each is kept. The table puts the compressed/original wall-clock ratio
beside the measured conv multiplication ratio (``count_mults().conv`` of minibasis running the
same networks) and their quotient (time per multiplication, relative to the original's).

Issue target: time ratio ≤ 1.3 × the multiplication ratio at t ≤ 0.8, batch 256.

    python bench/onnx.py [--depths 20 56] [--batches 1 256] [--thresholds 1 .95 .9 .8 .7] [--repeats 5]
                         [--ort-threads 2]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

# This file is named like the onnx package: take its own folder off the path (Python puts it first)
# so that `import onnx` finds the package, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench import common  # noqa: E402
from bench.basisconv import CHECKPOINTS, default_checkpoint, interleaved_best  # noqa: E402

THRESHOLDS = (1.0, 0.95, 0.9, 0.8, 0.7)
TARGET_SLACK, TARGET_MAX_THRESHOLD, TARGET_BATCH = 1.3, 0.8, 256


def session(path: Path, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    parser = common.make_parser("onnx", __doc__.splitlines()[0], repeats=5)
    parser.add_argument("--depths", type=int, nargs="+", choices=sorted(CHECKPOINTS), default=[20, 56])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--ort-threads", type=int, default=2, help="onnxruntime intra-op threads (default: 2)")
    args = parser.parse_args(argv)
    env = common.check_machine(args)

    import numpy
    import onnxruntime

    import minibasis as mb
    from minibasis import io as mbio
    from minibasis.models import resnet_cifar
    from minibasis.onnx import save_model

    env["onnxruntime"] = onnxruntime.__version__
    env["ort_threads"] = args.ort_threads
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="minibasis-bench-onnx-"))
    rng = numpy.random.default_rng(0)
    for depth in args.depths:
        checkpoint = default_checkpoint(depth)
        if not checkpoint.is_file():
            sys.exit(f"checkpoint not found: {checkpoint} (set MINIBASIS_SHARED)")
        model = resnet_cifar(depth)
        model.load_state_dict(mbio.load_torch_checkpoint(checkpoint))
        model.eval()
        one = mb.tensor(rng.standard_normal((1, 3, 32, 32)).astype(numpy.float32))

        def conv_mults(net):
            with mb.count_mults() as counter, mb.no_grad():
                net(one)
            return counter.conv

        base_mults = conv_mults(model)
        variants = {}
        for t in args.thresholds:
            compressed, report = mb.compress(model, energy_threshold=t, input_shape=(1, 3, 32, 32))
            variants[t] = (compressed.eval(), sum(row.replaced for row in report.layers), conv_mults(compressed))
        for fold in (False, True):
            original_path = folder / f"r{depth}-original-{fold}.onnx"
            save_model(model, original_path, (1, 3, 32, 32), fold_batch_norm=fold)
            original = session(original_path, args.ort_threads)
            for t, (compressed, replaced, mults) in variants.items():
                path = folder / f"r{depth}-{t}-{fold}.onnx"
                save_model(compressed, path, (1, 3, 32, 32), fold_batch_norm=fold)
                candidate = session(path, args.ort_threads)
                for batch in args.batches:
                    x = rng.standard_normal((batch, 3, 32, 32)).astype(numpy.float32)
                    best = interleaved_best({"original": lambda: original.run(None, {"input": x}),
                                             "compressed": lambda: candidate.run(None, {"input": x})},
                                            args.repeats, sync=lambda: None)
                    time_ratio = best["compressed"] / best["original"]
                    mult_ratio = mults / base_mults
                    rows.append({"depth": depth, "threshold": t, "bn_folded": fold, "batch": batch,
                                 "layers_replaced": replaced, "original_ms": 1e3 * best["original"],
                                 "compressed_ms": 1e3 * best["compressed"], "time_ratio": time_ratio,
                                 "conv_mult_ratio": mult_ratio, "time_per_mult": time_ratio / mult_ratio})
                    print(f"ResNet-{depth} t={t:<5} {'folded' if fold else 'unfused'} batch {batch:>4}: "
                          f"time {time_ratio:.3f} × original, conv mults {mult_ratio:.3f} ×", flush=True)
    common.finish_environment(env)
    headers = ["net", "t", "BN", "batch", "replaced", "original ms", "compressed ms", "time ratio", "mult ratio",
               "time/mult"]
    table = [[f"ResNet-{r['depth']}", r["threshold"], "folded" if r["bn_folded"] else "unfused", r["batch"],
              r["layers_replaced"], f"{r['original_ms']:.2f}", f"{r['compressed_ms']:.2f}", f"{r['time_ratio']:.3f}",
              f"{r['conv_mult_ratio']:.3f}", f"{r['time_per_mult']:.2f}"] for r in rows]
    print(common.format_table(headers, table))
    judged = [r for r in rows if r["threshold"] <= TARGET_MAX_THRESHOLD and r["batch"] == TARGET_BATCH]
    if judged:
        met = all(r["time_per_mult"] <= TARGET_SLACK for r in judged)
        print(f"target (time ratio ≤ {TARGET_SLACK} × mult ratio at t ≤ {TARGET_MAX_THRESHOLD}, batch {TARGET_BATCH}): "
              f"{'met' if met else 'missed'} (worst {max(r['time_per_mult'] for r in judged):.2f})")
    print(common.describe_environment(env))
    common.write_json(args.output, {"environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
