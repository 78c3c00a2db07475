"""conv2d speed against its own GEMMs and against PyTorch CPU, float32, batch 64, 32×32 inputs.

For each layer (3→32 5×5 pad 2, 16→16 3×3, 64→64 3×3, 64→64 1×1, a grouped 64→64
3×3 with g = 4, and a depthwise 3×3 with C = M = g = 96 on 16×16 maps; stride 1,
no bias) it times:

* forward (inference, under ``no_grad``) and forward + backward (input and weight
  gradients, as inside a network);
* the same GEMMs with plain ``xp.matmul`` on contiguous arrays, stacked over the
  g groups: forward (g, M/g, D)·(g, D, N·P), and backward (g, M/g, N·P)·(g, N·P, D)
  for the weight gradient and (g, D, M/g)·(g, M/g, N·P) for the input gradient
  (D = (C/g)·k², P = Ho·Wo; an inner dimension of 1, the depthwise M/g, as the
  broadcast product conv2d uses); a convolution by im2col cannot beat these, so
  the ratio says how much the rest costs;
* PyTorch's conv2d forward and forward + backward on the same data.

Best of ``--repeats``. Targets: 64→64 3×3 forward + backward ≤ 1.5× its GEMMs and
≤ 2× PyTorch CPU (issue 6); depthwise 3×3 forward + backward ≤ 3× PyTorch CPU (issue 12).

    python bench/conv.py [--repeats 7] [--device numpy|cupy] [--output path.json]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

LAYERS = [  # name, in_channels, out_channels, kernel, padding, groups, map size
    ("3->32 5x5", 3, 32, 5, 2, 1, 32),
    ("16->16 3x3", 16, 16, 3, 1, 1, 32),
    ("64->64 3x3", 64, 64, 3, 1, 1, 32),
    ("64->64 1x1", 64, 64, 1, 0, 1, 32),
    ("64->64 3x3 g=4", 64, 64, 3, 1, 4, 32),
    ("dw 96 3x3 16x16", 96, 96, 3, 1, 96, 16),
]
BATCH = 64
TARGET_LAYER, TARGET_GEMM, TARGET_TORCH = "64->64 3x3", 1.5, 2.0
DEPTHWISE_LAYER, DEPTHWISE_TORCH = "dw 96 3x3 16x16", 3.0


def bench_layer(args, spec, sync, torch):
    import numpy

    import minibasis as mb
    from minibasis import backend
    from minibasis import functions as F

    name, c, m, k, pad, groups, size = spec
    xp = backend.xp
    rng = numpy.random.default_rng(0)
    cg = c // groups
    host_x = rng.standard_normal((BATCH, c, size, size), dtype=numpy.float32)
    host_w = (rng.standard_normal((m, cg, k, k), dtype=numpy.float32) / numpy.sqrt(cg * k * k)).astype(numpy.float32)
    host_gy = rng.standard_normal((BATCH, m, size, size), dtype=numpy.float32)
    x = mb.tensor(host_x, requires_grad=True)
    w = mb.tensor(host_w, requires_grad=True)
    gy = backend.asarray(host_gy)

    def forward():
        with mb.no_grad():
            F.conv2d(x, w, None, 1, pad, groups=groups)

    def forward_backward():
        x.grad = w.grad = None
        F.conv2d(x, w, None, 1, pad, groups=groups).backward(gy)

    r = args.repeats
    row = {"layer": name, "in_channels": c, "out_channels": m, "kernel": k, "padding": pad, "groups": groups,
           "size": size, "batch": BATCH,
           "forward_s": common.best_time(forward, r, sync), "forward_backward_s": common.best_time(forward_backward, r, sync)}

    d, npos, mg = cg * k * k, BATCH * size * size, m // groups  # padding keeps Ho = H

    def gemm(p, q):  # conv2d's choice: a broadcast product where the inner dimension is 1
        return xp.multiply(p, q) if p.shape[-1] == 1 else xp.matmul(p, q)

    def draw(*shape):
        return xp.asarray(rng.standard_normal((groups,) + shape, dtype=numpy.float32))
    a, cols, cols_t, a_t, g = draw(mg, d), draw(d, npos), draw(npos, d), draw(d, mg), draw(mg, npos)
    row["gemm_forward_s"] = common.best_time(lambda: gemm(a, cols), r, sync)
    row["gemm_weight_grad_s"] = common.best_time(lambda: gemm(g, cols_t), r, sync)
    row["gemm_input_grad_s"] = common.best_time(lambda: gemm(a_t, g), r, sync)
    del a, cols, cols_t, a_t, g

    if torch is not None:
        dev = "cuda" if args.device == "cupy" else "cpu"
        tx = torch.from_numpy(host_x).to(dev).requires_grad_()
        tw = torch.from_numpy(host_w).to(dev).requires_grad_()
        tgy = torch.from_numpy(host_gy).to(dev)
        tsync = common.torch_sync(torch, args.device)

        def torch_forward():
            with torch.no_grad():
                torch.nn.functional.conv2d(tx, tw, None, 1, pad, groups=groups)

        def torch_forward_backward():
            tx.grad = tw.grad = None
            torch.nn.functional.conv2d(tx, tw, None, 1, pad, groups=groups).backward(tgy)

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
    print(f"\nconv2d, float32, batch {BATCH}, 32x32 unless named, device {args.device}, best of {args.repeats}")
    print(common.format_table(headers, table))
    print(common.describe_environment(env))
    target = next(r for r in rows if r["layer"] == TARGET_LAYER)["ratios"]
    verdicts = {"forward_backward_over_gemms": (target["forward_backward_over_gemms"], TARGET_GEMM)}
    if "forward_backward_over_torch" in target:
        verdicts["forward_backward_over_torch"] = (target["forward_backward_over_torch"], TARGET_TORCH)
        depthwise = next(r for r in rows if r["layer"] == DEPTHWISE_LAYER)["ratios"]
        verdicts["depthwise_forward_backward_over_torch"] = (depthwise["forward_backward_over_torch"], DEPTHWISE_TORCH)
    for key, (value, limit) in verdicts.items():
        layer = DEPTHWISE_LAYER if key.startswith("depthwise") else TARGET_LAYER
        print(f"target {layer} {key} <= {limit}: {value:.2f} -> {'met' if value <= limit else 'MISSED'}")
    common.write_json(args.output, {
        "benchmark": "conv", "device": args.device, "repeats": args.repeats, "environment": env,
        "rows": rows, "targets": {k: {"value": v, "limit": lim, "met": v <= lim} for k, (v, lim) in verdicts.items()},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
