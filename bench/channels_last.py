"""Does channels-last (NHWC) memory pay for a 3×3 "same" conv + BatchNorm + ReLU block? A prototype measured.

Issue 13's first lever. Before building a second memory layout into the engine, this
measures what the layout itself buys, with everything else equal: one conv (3×3,
stride 1, padding 1, no bias) + training BatchNorm + ReLU, forward and backward (input,
weight, γ, β gradients), at ResNet-20's three stage shapes with batch 128, written
twice in the same raw-NumPy style (Chainer-style im2col: a strided view copied once,
one GEMM per chunk of images, col2im as kh·kw strided adds; columns rebuilt in
backward as the engine does; chunks of ``conv.CHUNK_TARGET_BYTES`` of columns):

* **NCHW**: columns (D, n·P) from the padded (C, n, H, W) view, ``W (M, D) @ col`` →
  (M, n·P), then the transposing copy to (n, M, H, W) that every NCHW im2col conv pays
  (and its inverse on gy in backward); BatchNorm reduces over axes (0, 2, 3).
* **NHWC**: columns (n·P, D) from the padded (n, H, W, C) array, ``col @ W'`` with
  W' (D, M) → (n·P, M), which *is* the next layer's NHWC memory (no transpose either
  way); BatchNorm reduces over the rows of an (n·P, C) matrix.

Both are checked equal (to float32 rounding) before timing, and beside them the
engine's own block (``minibasis`` conv2d → batch_norm → relu through autograd, counted
products included) and PyTorch's, contiguous and ``torch.channels_last``. One BLAS
thread and one engine thread (the layout question is about memory traffic, not
threads). What the result decided is in bench/README.md.

    python bench/channels_last.py [--repeats 7] [--no-torch] [--output path.json]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import as_strided

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

SHAPES = [  # channels (in = out), map size: ResNet-20's three stages
    (16, 32),
    (32, 16),
    (64, 8),
]
BATCH, EPS = 128, 1e-5


def _chunks(n: int, per_image_bytes: int):
    from minibasis import parallel
    from minibasis.functions.conv import CHUNK_TARGET_BYTES
    return parallel.chunk_ranges(n, parallel.chunk_step(n, per_image_bytes, CHUNK_TARGET_BYTES))


def _bn_relu_forward(y, axes, shape, gamma, beta):
    """Training BatchNorm + ReLU in the engine's passes: mean, centre, Σ(x−μ)², scale, affine, ReLU."""
    count = y.size // gamma.size
    mean = y.mean(axis=axes)
    xhat = y - mean.reshape(shape)
    subscripts = "nchw,nchw->c" if axes == (0, 2, 3) else "nhwc,nhwc->c"
    var = np.einsum(subscripts, xhat, xhat) / count
    inv_std = (1.0 / np.sqrt(var + EPS)).astype(y.dtype)
    np.multiply(xhat, inv_std.reshape(shape), out=xhat)
    out = xhat * gamma.reshape(shape)
    out += beta.reshape(shape)
    np.maximum(out, 0, out=out)
    return out, xhat, inv_std, subscripts


def _bn_relu_backward(g, out, xhat, inv_std, axes, shape, gamma, subscripts):
    g = np.where(out > 0, g, 0).astype(g.dtype, copy=False)
    count = g.size // gamma.size
    g_beta = g.sum(axis=axes)
    g_gamma = np.einsum(subscripts, g, xhat)
    gx = xhat * (g_gamma / count).reshape(shape)
    np.subtract(g, gx, out=gx)
    gx -= (g_beta / count).reshape(shape)
    gx *= (gamma * inv_std).reshape(shape)
    return gx, g_gamma, g_beta


def nchw_block(x, w, gamma, beta, g_out):
    """x (n, C, H, W), w (M, C, 3, 3), g_out (n, M, H, W) → out, gx, gw, gγ, gβ (all NCHW)."""
    n, c, h, wd = x.shape
    m = w.shape[0]
    w_mat = w.reshape(m, -1)
    xpad = np.zeros((c, n, h + 2, wd + 2), x.dtype)  # channel-major: columns come out as (D, n·P)
    xpad[:, :, 1:-1, 1:-1] = x.transpose(1, 0, 2, 3)
    s = xpad.strides
    spans = _chunks(n, 9 * c * h * wd * x.itemsize)

    def columns(a, b):
        view = as_strided(xpad[:, a:], (c, 3, 3, b - a, h, wd), (s[0], s[2], s[3], s[1], s[2], s[3]))
        return view.reshape(9 * c, (b - a) * h * wd)  # reshape of a non-contiguous view: one copy

    y = np.empty((n, m, h, wd), x.dtype)
    for a, b in spans:
        y[a:b] = (w_mat @ columns(a, b)).reshape(m, b - a, h, wd).transpose(1, 0, 2, 3)
    out, xhat, inv_std, sub = _bn_relu_forward(y, (0, 2, 3), (1, -1, 1, 1), gamma, beta)
    gy, g_gamma, g_beta = _bn_relu_backward(g_out, out, xhat, inv_std, (0, 2, 3), (1, -1, 1, 1), gamma, sub)
    gw = np.zeros_like(w_mat)
    gxpad = np.zeros_like(xpad)
    for a, b in spans:
        gy_m = np.ascontiguousarray(gy[a:b].transpose(1, 0, 2, 3)).reshape(m, -1)
        gw += gy_m @ columns(a, b).T
        gcol = (w_mat.T @ gy_m).reshape(c, 3, 3, b - a, h, wd)
        for i in range(3):
            for j in range(3):
                gxpad[:, a:b, i:i + h, j:j + wd] += gcol[:, i, j]
    gx = np.ascontiguousarray(gxpad[:, :, 1:-1, 1:-1].transpose(1, 0, 2, 3))
    return out, gx, gw.reshape(w.shape), g_gamma, g_beta


def nhwc_block(x, w, gamma, beta, g_out):
    """x (n, H, W, C), w (M, C, 3, 3), g_out (n, H, W, M) → out, gx (NHWC), gw (M, C, 3, 3), gγ, gβ."""
    n, h, wd, c = x.shape
    m = w.shape[0]
    w_cols = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(9 * c, m)  # (kh, kw, C) × M
    xpad = np.zeros((n, h + 2, wd + 2, c), x.dtype)
    xpad[:, 1:-1, 1:-1] = x
    s = xpad.strides
    spans = _chunks(n, 9 * c * h * wd * x.itemsize)

    def columns(a, b):
        view = as_strided(xpad[a:], (b - a, h, wd, 3, 3, c), (s[0], s[1], s[2], s[1], s[2], s[3]))
        return view.reshape((b - a) * h * wd, 9 * c)

    y = np.empty((n, h, wd, m), x.dtype)
    for a, b in spans:
        np.matmul(columns(a, b), w_cols, out=y[a:b].reshape(-1, m))  # the next layer's layout, no transpose
    out, xhat, inv_std, sub = _bn_relu_forward(y, (0, 1, 2), (1, 1, 1, -1), gamma, beta)
    gy, g_gamma, g_beta = _bn_relu_backward(g_out, out, xhat, inv_std, (0, 1, 2), (1, 1, 1, -1), gamma, sub)
    gw = np.zeros_like(w_cols)
    gxpad = np.zeros_like(xpad)
    for a, b in spans:
        gy_rows = gy[a:b].reshape(-1, m)
        gw += columns(a, b).T @ gy_rows
        gcol = (gy_rows @ w_cols.T).reshape(b - a, h, wd, 3, 3, c)
        for i in range(3):
            for j in range(3):
                gxpad[a:b, i:i + h, j:j + wd] += gcol[:, :, :, i, j]
    gx = np.ascontiguousarray(gxpad[:, 1:-1, 1:-1])
    return out, gx, gw.reshape(3, 3, c, m).transpose(3, 2, 0, 1), g_gamma, g_beta


def _check_equal(nchw, nhwc, shape_name):
    """The two layouts compute the same block: outputs and every gradient (NHWC ones transposed back)."""
    out, gx, gw, gg, gb = nchw
    out2, gx2, gw2, gg2, gb2 = nhwc
    pairs = {"out": (out, out2.transpose(0, 3, 1, 2)), "gx": (gx, gx2.transpose(0, 3, 1, 2)),
             "gw": (gw, gw2), "g_gamma": (gg, gg2), "g_beta": (gb, gb2)}
    for name, (a, b) in pairs.items():
        scale = float(np.abs(a).max()) or 1.0
        error = float(np.abs(a - b).max()) / scale
        if error > 1e-4:
            raise SystemExit(f"{shape_name}: NCHW and NHWC prototypes disagree on {name}: relative error {error:.2e}")


def bench_shape(args, c, size, torch):
    import minibasis as mb
    from minibasis import functions as F

    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, c, size, size), dtype=np.float32)
    w = (rng.standard_normal((c, c, 3, 3), dtype=np.float32) / np.sqrt(9 * c)).astype(np.float32)
    gamma = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(c)).astype(np.float32)
    g_out = rng.standard_normal((BATCH, c, size, size), dtype=np.float32)
    x_nhwc, g_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), np.ascontiguousarray(g_out.transpose(0, 2, 3, 1))
    name = f"{c}->{c} 3x3 {size}x{size}"
    _check_equal(nchw_block(x, w, gamma, beta, g_out), nhwc_block(x_nhwc, w, gamma, beta, g_nhwc), name)

    r = args.repeats
    row = {"block": name, "channels": c, "size": size, "batch": BATCH}
    row["nchw_prototype_s"] = common.best_time(lambda: nchw_block(x, w, gamma, beta, g_out), r)
    row["nhwc_prototype_s"] = common.best_time(lambda: nhwc_block(x_nhwc, w, gamma, beta, g_nhwc), r)

    tx, tw = mb.tensor(x, requires_grad=True), mb.tensor(w, requires_grad=True)
    tg, tb = mb.tensor(gamma, requires_grad=True), mb.tensor(beta, requires_grad=True)
    mean, var = np.zeros(c, np.float32), np.ones(c, np.float32)

    def engine():
        tx.grad = tw.grad = tg.grad = tb.grad = None
        y = F.conv2d(tx, tw, None, 1, 1)
        F.relu(F.batch_norm(y, mean, var, tg, tb, training=True)).backward(g_out)
    row["engine_s"] = common.best_time(engine, r)

    if torch is not None:
        for label, fmt in (("torch_nchw_s", torch.contiguous_format), ("torch_nhwc_s", torch.channels_last)):
            px = torch.from_numpy(x).contiguous(memory_format=fmt).requires_grad_()
            pw = torch.from_numpy(w).contiguous(memory_format=fmt).requires_grad_()
            pg, pb = torch.from_numpy(gamma).requires_grad_(), torch.from_numpy(beta).requires_grad_()
            pgo = torch.from_numpy(g_out).contiguous(memory_format=fmt)

            def torch_block(px=px, pw=pw, pg=pg, pb=pb, pgo=pgo):
                px.grad = pw.grad = pg.grad = pb.grad = None
                y = torch.nn.functional.conv2d(px, pw, None, 1, 1)
                torch.relu(torch.nn.functional.batch_norm(y, None, None, pg, pb, training=True)).backward(pgo)
            row[label] = common.best_time(torch_block, r)
    return row


def main(argv=None) -> int:
    args = common.make_parser("channels_last", __doc__.splitlines()[0], repeats=7).parse_args(argv)
    args.threads = 1 if args.threads is None else args.threads
    env = common.check_machine(args)
    from threadpoolctl import threadpool_limits
    torch = common.load_torch(args.no_torch)
    if torch is not None:
        torch.set_num_threads(1)
    rows = []
    with threadpool_limits(1):
        for c, size in SHAPES:
            rows.append(bench_shape(args, c, size, torch))
            print(f"  measured {rows[-1]['block']}", file=sys.stderr)
    common.finish_environment(env)
    env["timed_threads"] = {"blas": 1, "engine": 1, "torch": 1 if torch is not None else None}  # inside the limits

    ms = lambda row, key: row[key]["best"] * 1e3 if key in row else None  # noqa: E731
    table = []
    for row in rows:
        ratio = row["nhwc_prototype_s"]["best"] / row["nchw_prototype_s"]["best"]
        torch_ratio = (row["torch_nhwc_s"]["best"] / row["torch_nchw_s"]["best"]) if "torch_nhwc_s" in row else None
        row["nhwc_over_nchw"], row["torch_nhwc_over_nchw"] = ratio, torch_ratio
        table.append([row["block"], ms(row, "nchw_prototype_s"), ms(row, "nhwc_prototype_s"), ratio,
                      ms(row, "engine_s"), ms(row, "torch_nchw_s"), ms(row, "torch_nhwc_s"), torch_ratio])
    print(f"\nconv 3x3 + batch norm (training) + ReLU, forward + backward, float32, batch {BATCH}, "
          f"1 BLAS thread, best of {args.repeats}")
    print(common.format_table(["block", "NCHW proto ms", "NHWC proto ms", "NHWC/NCHW", "engine ms",
                               "torch ms", "torch CL ms", "torch CL/NCHW"], table))
    print(common.describe_environment(env))
    print("(timed inside threadpool_limits(1) and torch.set_num_threads(1): 1 BLAS, 1 engine, 1 torch thread)")
    common.write_json(args.output, {"benchmark": "channels_last", "repeats": args.repeats, "environment": env,
                                    "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
