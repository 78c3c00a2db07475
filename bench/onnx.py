"""Deployment speed in onnxruntime: pretrained ResNet-20/56, original vs compressed, as minibasis exports them.

For each depth and energy threshold t, ``minibasis.compress`` replaces the ResNet's convolutions
by BasisConv2d layers (skipping unprofitable ones) and ``minibasis.onnx.save_model`` writes the
original and the compressed network as standard ONNX graphs, unfused and with every BatchNorm
folded into its conv, in two forms:

* ``paper``: every BasisConv layer as two plain ``Conv`` nodes, Q basis filters then the 1×1
  coefficients, exactly as minibasis runs it;
* ``runtime``: :func:`minibasis.onnx.runtime_form` with ``--pad-basis-to`` (Q rounded up to the
  runtime's channel block, zero filters) and ``--merge-above`` (a layer whose own ratio
  Q/M + Q/D exceeds it written as the one conv it equals);
* ``blocked``: another compressed model, ``compress(..., basis_multiple=--pad-basis-to)``: each
  layer's Q rounded up to the block with real eigenvectors (more energy kept, the same cost as
  the padding), written as two convs; its multiplication ratio is its own.

onnxruntime (CPU execution provider, ``--ort-threads`` intra-op threads, all graph
optimizations on, worker threads not spinning between runs, so that the interleaved sessions
do not steal each other's cores) runs each graph on the same batch; original and compressed
runs are interleaved, ``--repeats`` times each, and the best of each is kept. The table puts the
compressed/original wall-clock ratio beside the measured conv multiplication ratio of the
compressed model (``count_mults().conv`` of minibasis running it) and of the graph as written
(the runtime form executes more: its padding and merged layers), and time per model
multiplication relative to the original's. ``--profile`` adds, for the smallest t at the
largest batch, onnxruntime's own per-node timings summed by operator (after its graph
rewrites: ``Conv`` nodes become NCHWc ``Conv`` with ``ReorderInput``/``ReorderOutput``
around them where the channel counts allow).

Issue target: time ratio ≤ 1.3 × the multiplication ratio at t ≤ 0.8, batch 256.

    python bench/onnx.py [--depths 20 56] [--batches 1 256] [--thresholds 1 .95 .9 .8 .7] [--repeats 5]
                         [--forms paper runtime] [--pad-basis-to 16] [--merge-above 0.7] [--ort-threads 2]
                         [--profile]
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
FORMS = ("paper", "runtime", "blocked")
TARGET_SLACK, TARGET_MAX_THRESHOLD, TARGET_BATCH = 1.3, 0.8, 256


def session(path: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _kind(event: dict) -> tuple[str, int]:
    """(operator kind, multiplications) of one onnxruntime node event; convs by kernel and layout."""
    args = event.get("args", {})
    op = args.get("op_name", "?")
    if op not in ("Conv", "FusedConv"):  # FusedConv: a conv with its activation, left in NCHW
        return op, 0
    shapes = [next(iter(shape.values())) for shape in args.get("input_type_shape", [])]
    out = next(iter(args.get("output_type_shape", [{}])[0].values()), None)
    if len(shapes) < 2 or out is None or len(shapes[1]) != 4:
        return op, 0
    m, c_per_group, kh, kw = shapes[1]
    layout = "NCHWc" if "nchwc" in event.get("name", "") else "NCHW"
    # NCHWc outputs are (N, M/b, H, W, b): the product of the dims over M is N·Ho·Wo either way
    positions = 1
    for n in out:
        positions *= n
    positions //= m
    return f"Conv {kh}x{kw} {layout}", positions * m * c_per_group * kh * kw


def op_profile(path: Path, threads: int, x, runs: int, prefix: str) -> dict[str, dict]:
    """Per operator kind: milliseconds per run and multiplications (onnxruntime's node events, best run)."""
    import json
    probe = session(path, threads, prefix)
    for _ in range(runs + 1):  # the first is a warm-up, dropped below
        probe.run(None, {"input": x})
    events = json.loads(Path(probe.end_profiling()).read_text())
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[1:]
    per_run = [dict() for _ in windows]
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        for ops, (begin, finish) in zip(per_run, windows):
            if begin <= event["ts"] <= finish:
                kind, mults = _kind(event)
                entry = ops.setdefault(kind, {"ms": 0.0, "mults": 0})
                entry["ms"] += event["dur"] / 1e3
                entry["mults"] += mults
    best = min(per_run, key=lambda ops: sum(v["ms"] for v in ops.values()))
    return dict(sorted(best.items(), key=lambda item: -item[1]["ms"]))


def main(argv=None) -> int:
    parser = common.make_parser("onnx", __doc__.splitlines()[0], repeats=5)
    parser.add_argument("--depths", type=int, nargs="+", choices=sorted(CHECKPOINTS), default=[20, 56])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    parser.add_argument("--pad-basis-to", type=int, default=16, help="the runtime form's channel block (default: 16)")
    parser.add_argument("--merge-above", type=float, default=0.7,
                        help="the runtime form writes a layer whose own ratio exceeds this as one conv (default: 0.7)")
    parser.add_argument("--ort-threads", type=int, default=2, help="onnxruntime intra-op threads (default: 2)")
    parser.add_argument("--profile", action="store_true",
                        help="onnxruntime's per-operator times for the smallest t at the largest batch")
    args = parser.parse_args(argv)
    env = common.check_machine(args)

    import numpy
    import onnxruntime

    import minibasis as mb
    from minibasis import io as mbio
    from minibasis.models import resnet_cifar
    from minibasis.onnx import runtime_form, save_model

    env["onnxruntime"] = onnxruntime.__version__
    env["ort_threads"] = args.ort_threads
    env["runtime_form"] = {"pad_basis_to": args.pad_basis_to, "merge_above": args.merge_above}
    rows, profiles = [], []
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
            blocked, blocked_report = mb.compress(model, energy_threshold=t, basis_multiple=args.pad_basis_to,
                                                  input_shape=(1, 3, 32, 32))
            written = runtime_form(compressed.eval(), args.pad_basis_to, args.merge_above)[0]
            paper = (compressed, {}, len(report.replaced), conv_mults(compressed), conv_mults(compressed))
            variants[t] = {
                "paper": paper,
                "runtime": (compressed, {"pad_basis_to": args.pad_basis_to, "merge_above": args.merge_above},
                            paper[2], paper[3], conv_mults(written)),
                "blocked": (blocked.eval(), {}, len(blocked_report.replaced), conv_mults(blocked), conv_mults(blocked)),
            }
        for fold in (False, True):
            original_path = folder / f"r{depth}-original-{fold}.onnx"
            save_model(model, original_path, (1, 3, 32, 32), fold_batch_norm=fold)
            original = session(original_path, args.ort_threads)
            for t, forms in variants.items():
                for form in args.forms:
                    compressed, extra, replaced, mults, graph_mults = forms[form]
                    path = folder / f"r{depth}-{t}-{fold}-{form}.onnx"
                    save_model(compressed, path, (1, 3, 32, 32), fold_batch_norm=fold, **extra)
                    candidate = session(path, args.ort_threads)
                    for batch in args.batches:
                        x = rng.standard_normal((batch, 3, 32, 32)).astype(numpy.float32)
                        best = interleaved_best({"original": lambda: original.run(None, {"input": x}),
                                                 "compressed": lambda: candidate.run(None, {"input": x})},
                                                args.repeats, sync=lambda: None)
                        time_ratio = best["compressed"] / best["original"]
                        mult_ratio = mults / base_mults
                        rows.append({"depth": depth, "threshold": t, "bn_folded": fold, "form": form, "batch": batch,
                                     "layers_replaced": replaced, "original_ms": 1e3 * best["original"],
                                     "compressed_ms": 1e3 * best["compressed"], "time_ratio": time_ratio,
                                     "conv_mult_ratio": mult_ratio, "graph_mult_ratio": graph_mults / base_mults,
                                     "time_per_mult": time_ratio / mult_ratio})
                        print(f"ResNet-{depth} t={t:<5} {'folded' if fold else 'unfused'} {form:<7} batch {batch:>4}: "
                              f"time {time_ratio:.3f} × original, conv mults {mult_ratio:.3f} × "
                              f"({graph_mults / base_mults:.3f} × as written)", flush=True)
                    if args.profile and fold and t == min(args.thresholds):
                        x = rng.standard_normal((max(args.batches), 3, 32, 32)).astype(numpy.float32)
                        prefix = str(folder / f"profile-{depth}-{form}")
                        profiles.append({"depth": depth, "threshold": t, "batch": x.shape[0], "form": form,
                                         "original_ms": op_profile(original_path, args.ort_threads, x, args.repeats,
                                                                   prefix + "-original"),
                                         "compressed_ms": op_profile(path, args.ort_threads, x, args.repeats, prefix)})
    common.finish_environment(env)
    headers = ["net", "t", "BN", "form", "batch", "replaced", "original ms", "compressed ms", "time ratio",
               "mult ratio", "as written", "time/mult"]
    table = [[f"ResNet-{r['depth']}", r["threshold"], "folded" if r["bn_folded"] else "unfused", r["form"], r["batch"],
              r["layers_replaced"], f"{r['original_ms']:.2f}", f"{r['compressed_ms']:.2f}", f"{r['time_ratio']:.3f}",
              f"{r['conv_mult_ratio']:.3f}", f"{r['graph_mult_ratio']:.3f}", f"{r['time_per_mult']:.2f}"] for r in rows]
    print(common.format_table(headers, table))
    for p in profiles:
        kinds = sorted(set(p["original_ms"]) | set(p["compressed_ms"]),
                       key=lambda op: -p["compressed_ms"].get(op, {"ms": 0.0})["ms"])

        def cells(entry):
            if entry is None:
                return ["", ""]
            rate = f"{entry['mults'] / entry['ms'] / 1e6:.1f}" if entry["mults"] and entry["ms"] else ""
            return [f"{entry['ms']:.2f}", rate]
        print(f"\nonnxruntime per operator, ResNet-{p['depth']} t={p['threshold']} BN folded, {p['form']} form, "
              f"batch {p['batch']} (ms per run in the best run; G mults/s):")
        print(common.format_table(["operator", "original ms", "G mults/s", "compressed ms", "G mults/s"],
                                  [[op, *cells(p["original_ms"].get(op)), *cells(p["compressed_ms"].get(op))]
                                   for op in kinds]))
    for form in args.forms:
        judged = [r for r in rows if r["threshold"] <= TARGET_MAX_THRESHOLD and r["batch"] == TARGET_BATCH
                  and r["form"] == form]
        if judged:
            met = all(r["time_per_mult"] <= TARGET_SLACK for r in judged)
            print(f"{form} form, target (time ratio ≤ {TARGET_SLACK} × mult ratio at t ≤ {TARGET_MAX_THRESHOLD}, "
                  f"batch {TARGET_BATCH}): {'met' if met else 'missed'} "
                  f"(best {min(r['time_per_mult'] for r in judged):.2f}, worst {max(r['time_per_mult'] for r in judged):.2f})")
    print(common.describe_environment(env))
    common.write_json(args.output, {"environment": env, "rows": rows, "profiles": profiles})
    return 0


if __name__ == "__main__":
    sys.exit(main())
