"""conv2d speed against its own GEMMs and against PyTorch CPU, float32, batch 64, 32×32 inputs.

For each layer (3→32 5×5 pad 2, 16→16 3×3, 64→64 3×3, 64→64 1×1; stride 1, no
bias) it times:

* forward (inference, under ``no_grad``) and forward + backward (input and weight
  gradients, as inside a network);
* the same GEMMs with plain ``xp.matmul`` on contiguous arrays: forward
  (M×D)·(D×N·P), and backward (M×N·P)·(N·P×D) for the weight gradient and
  (D×M)·(M×N·P) for the input gradient (D = C·k², P = Ho·Wo); a convolution by
  im2col cannot beat these, so the ratio says how much the rest costs;
* PyTorch's conv2d forward and forward + backward on the same data.

Best of ``--repeats``. Targets (issue 6): 64→64 3×3 forward + backward ≤ 1.5× its
GEMMs and ≤ 2× PyTorch CPU.

    python bench/conv.py [--repeats 7] [--device numpy|cupy] [--output path.json]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

LAYERS = [  # name, in_channels, out_channels, kernel, padding
    ("3->32 5x5", 3, 32, 5, 2),
    ("16->16 3x3", 16, 16, 3, 1),
    ("64->64 3x3", 64, 64, 3, 1),
    ("64->64 1x1", 64, 64, 1, 0),
]
BATCH, SIZE = 64, 32
TARGET_LAYER, TARGET_GEMM, TARGET_TORCH = "64->64 3x3", 1.5, 2.0


def bench_layer(args, spec, sync, torch, batch=BATCH):
    import numpy

    import minibasis as mb
    from minibasis import backend
    from minibasis import functions as F

    name, c, m, k, pad = spec
    xp = backend.xp
    rng = numpy.random.default_rng(0)
    host_x = rng.standard_normal((batch, c, SIZE, SIZE), dtype=numpy.float32)
    host_w = (rng.standard_normal((m, c, k, k), dtype=numpy.float32) / numpy.sqrt(c * k * k)).astype(numpy.float32)
    host_gy = rng.standard_normal((batch, m, SIZE, SIZE), dtype=numpy.float32)
    x = mb.tensor(host_x, requires_grad=True)
    w = mb.tensor(host_w, requires_grad=True)
    gy = backend.asarray(host_gy)

    def forward():
        with mb.no_grad():
            F.conv2d(x, w, None, 1, pad)

    def forward_backward():
        x.grad = w.grad = None
        F.conv2d(x, w, None, 1, pad).backward(gy)

    r = args.repeats
    row = {"layer": name, "in_channels": c, "out_channels": m, "kernel": k, "padding": pad, "batch": batch,
           "forward_s": common.best_time(forward, r, sync), "forward_backward_s": common.best_time(forward_backward, r, sync)}

    d, npos = c * k * k, batch * SIZE * SIZE  # padding keeps Ho = H
    a = xp.asarray(rng.standard_normal((m, d), dtype=numpy.float32))
    cols = xp.asarray(rng.standard_normal((d, npos), dtype=numpy.float32))
    cols_t = xp.asarray(rng.standard_normal((npos, d), dtype=numpy.float32))
    a_t = xp.asarray(rng.standard_normal((d, m), dtype=numpy.float32))
    g = xp.asarray(rng.standard_normal((m, npos), dtype=numpy.float32))
    row["gemm_forward_s"] = common.best_time(lambda: xp.matmul(a, cols), r, sync)
    row["gemm_weight_grad_s"] = common.best_time(lambda: xp.matmul(g, cols_t), r, sync)
    row["gemm_input_grad_s"] = common.best_time(lambda: xp.matmul(a_t, g), r, sync)
    del a, cols, cols_t, a_t, g

    if torch is not None:
        dev = "cuda" if args.device == "cupy" else "cpu"
        tx = torch.from_numpy(host_x).to(dev).requires_grad_()
        tw = torch.from_numpy(host_w).to(dev).requires_grad_()
        tgy = torch.from_numpy(host_gy).to(dev)
        tsync = common.torch_sync(torch, args.device)

        def torch_forward():
            with torch.no_grad():
                torch.nn.functional.conv2d(tx, tw, None, 1, pad)

        def torch_forward_backward():
            tx.grad = tw.grad = None
            torch.nn.functional.conv2d(tx, tw, None, 1, pad).backward(tgy)

        row["torch_forward_s"] = common.best_time(torch_forward, r, tsync)
        row["torch_forward_backward_s"] = common.best_time(torch_forward_backward, r, tsync)
    return row


def summarize(row: dict) -> dict:
    best = {k: v["best"] for k, v in row.items() if isinstance(v, dict) and "best" in v}
    gemms = best["gemm_forward_s"] + best["gemm_weight_grad_s"] + best["gemm_input_grad_s"]
    out = {
        "forward_over_gemm": best["forward_s"] / best["gemm_forward_s"],
        "forward_backward_over_gemms": best["forward_backward_s"] / gemms,
        "gemms_forward_backward_s": gemms,
    }
    if "torch_forward_s" in best:
        out["forward_over_torch"] = best["forward_s"] / best["torch_forward_s"]
        out["forward_backward_over_torch"] = best["forward_backward_s"] / best["torch_forward_backward_s"]
    return out


def main(argv=None) -> int:
    args = common.make_parser("conv", __doc__.splitlines()[0], repeats=7).parse_args(argv)
    env = common.check_machine(args)
    sync = common.select_device(args.device)
    torch = common.load_torch(args.no_torch, args.device)
    rows = []
    for spec in LAYERS:
        row = bench_layer(args, spec, sync, torch)
        row["ratios"] = summarize(row)
        rows.append(row)
        print(f"  measured {spec[0]}", file=sys.stderr)
    common.finish_environment(env)

    ms = lambda row, key: row[key]["best"] * 1e3 if key in row else None  # noqa: E731
    table = [[r["layer"], ms(r, "forward_s"), ms(r, "gemm_forward_s"), ms(r, "torch_forward_s"),
              r["ratios"]["forward_over_gemm"], r["ratios"].get("forward_over_torch"),
              ms(r, "forward_backward_s"), r["ratios"]["gemms_forward_backward_s"] * 1e3,
              ms(r, "torch_forward_backward_s"), r["ratios"]["forward_backward_over_gemms"],
              r["ratios"].get("forward_backward_over_torch")] for r in rows]
    headers = ["layer", "fwd ms", "GEMM ms", "torch ms", "fwd/GEMM", "fwd/torch",
               "f+b ms", "GEMMs ms", "torch ms", "f+b/GEMMs", "f+b/torch"]
    print(f"\nconv2d, float32, batch {BATCH}, {SIZE}x{SIZE}, device {args.device}, best of {args.repeats}")
    print(common.format_table(headers, table))
    print(common.describe_environment(env))
    target = next(r for r in rows if r["layer"] == TARGET_LAYER)["ratios"]
    verdicts = {"forward_backward_over_gemms": (target["forward_backward_over_gemms"], TARGET_GEMM)}
    if "forward_backward_over_torch" in target:
        verdicts["forward_backward_over_torch"] = (target["forward_backward_over_torch"], TARGET_TORCH)
    for key, (value, limit) in verdicts.items():
        print(f"target {TARGET_LAYER} {key} <= {limit}: {value:.2f} -> {'met' if value <= limit else 'MISSED'}")
    common.write_json(args.output, {
        "benchmark": "conv", "device": args.device, "repeats": args.repeats, "environment": env,
        "rows": rows, "targets": {k: {"value": v, "limit": lim, "met": v <= lim} for k, (v, lim) in verdicts.items()},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
