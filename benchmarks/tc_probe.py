"""Experiment: a Q4_0 decode matvec on tensor cores, against the library kernel (GPU, one call).

    python benchmarks/tc_probe.py [--calls 8] [--out DIR]      # GPU
    python benchmarks/tc_probe.py --smoke                      # CPU, interpret mode, tiny shape

Why. The library's Q4_0 matvec issues ~5.4 SASS instructions per weight value (counted offline
from Triton 3.9's sm_90 output for the 70B gate/up tile), so it is issue-bound at ~48% of HBM.
Here the nibbles become exact float16 in pairs (inline PTX: prmt, lop3 with the 1024 magic,
sub.f16x2) and the products and block sums run on tensor cores (mma.sync):

    D[(m, p, c), n] = sum_j X[g][(m, p, c), (c', j)] * W[n, (c', j)]     (one plgpu.dot per plane)

where X[g] is block-diagonal: row (x row m, part p, block c) holds part p of x's block c of chunk
g in its own 16 columns and zeros elsewhere, so one dot gives each block's sum separately and the
block scales apply afterwards (acc += D * d). x is split exactly enough: x = 2^e (hi + lo), hi
and lo float16, e a per-row power of two that keeps hi in range (22 significant bits). Products of
4-bit integers and float16 are exact in the float32 accumulator. Offline count: ~2.4 instructions
per value (bn 256, 4 warps).

Variants: `tc` (exact nibbles, sub.f16x2), `tc_fold` (no subtraction: the zero point 1032/1152
is taken off per block with x's block sums; cheaper, less exact), `lib` (qmatvec as it stands).
Shapes: the 70B and 8B decode matrices. Timing: one jitted program of --calls calls on different
x, `ceilings.pipelined_time`, divided by --calls (the `dev` figure of kernel_variants.py). GB/s
counts the GGUF bytes. Every config is checked against float64 numpy:
max_n |y - ref| / (|x| @ |W|^T)_n.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ceilings import hbm_read_gbps, pipelined_time  # noqa: E402

import gguf  # noqa: E402
from ntransformer_jax.kernels import qmatvec as qm  # noqa: E402

T = gguf.GGMLQuantizationType
SHAPES = {"70b_gate_up": (28672, 8192), "70b_qkv": (10240, 8192), "70b_o": (8192, 8192),
          "70b_down": (8192, 28672), "8b_gate_up": (28672, 4096), "8b_qkv": (6144, 4096),
          "8b_o": (4096, 4096), "8b_down": (4096, 14336)}
SMOKE_SHAPES = {"tiny": (256, 1024)}


def _asm(mask: str, bias: str | None) -> str:
    """4 bytes -> 4 float16: (b & mask) | 0x6400 is 1024 + v; minus bias unless folded."""
    sub = ("" if bias is None else
           f"mov.b32 t2, {bias};\nsub.f16x2 $0, $0, t2;\nsub.f16x2 $1, $1, t2;\n")
    return ("{\n.reg .b32 t0, t1, t2;\n"
            "prmt.b32 t0, $2, 0, 0x4140;\nprmt.b32 t1, $2, 0, 0x4342;\n"
            f"lop3.b32 $0, t0, {mask}, 0x64006400, 0xea;\n"
            f"lop3.b32 $1, t1, {mask}, 0x64006400, 0xea;\n{sub}}}")


def nibbles(b, interpret: bool, fold: bool):
    """uint8 tile -> (low nibble - 8, 16 * (high nibble - 8)) float16, or + 1032 / + 1152."""
    if interpret:
        b = b.astype(jnp.int32)
        lo, hi = (b & 15) - 8, (b & 0xF0) - 128
        if fold:
            lo, hi = lo + 1032, hi + 1152
        return lo.astype(jnp.float16), hi.astype(jnp.float16)
    out = [jax.ShapeDtypeStruct(b.shape, jnp.float16)]
    lo, = plgpu.elementwise_inline_asm(_asm("0x000F000F", None if fold else "0x64086408"),
                                       args=[b], constraints="=r,=r,r", pack=4,
                                       result_shape_dtypes=out)
    hi, = plgpu.elementwise_inline_asm(_asm("0x00F000F0", None if fold else "0x64806480"),
                                       args=[b], constraints="=r,=r,r", pack=4,
                                       result_shape_dtypes=out)
    return lo, hi


def kernel(qs_ref, d_ref, xlo_ref, xhi_ref, corr_ref, o_ref, *, nbd, n_sub, n_chunks, m_rows,
           interpret, fold):
    bn = qs_ref.shape[0]

    def step(i, acc):
        for s in range(n_sub):
            g = i * n_sub + s
            start = pl.multiple_of(g * nbd, nbd)
            t = qs_ref[:, pl.ds(start, nbd), :].reshape(bn, nbd * 16)
            lo, hi = nibbles(t, interpret, fold)
            dd = d_ref[:, pl.ds(start, nbd)].astype(jnp.float32).T      # [nbd, bn]
            dd = jnp.broadcast_to(dd[None], (16 // nbd, nbd, bn)).reshape(16, bn)
            dot = (plgpu.dot(xlo_ref[g], lo, trans_b=True)
                   + plgpu.dot(xhi_ref[g], hi, trans_b=True))            # [16, bn]
            if fold:
                dot = dot - corr_ref[g][:, None]
            acc = acc + dot * dd
        return acc

    acc = lax.fori_loop(0, n_chunks, step, jnp.zeros((16, bn), jnp.float32))
    o_ref[...] = jnp.sum(acc.reshape(m_rows, 16 // m_rows, bn), axis=1)


def split_x(x: jax.Array, nbd: int):
    """x [M, K] f32 -> block-diagonal float16 parts of both planes [G, 16, nbd * 16], the folded
    zero points' correction [G, 16] and the per-row scales [M]."""
    m_rows, k = x.shape
    g = k // 32 // nbd
    mx = jnp.max(jnp.abs(x), axis=1, keepdims=True)
    s = jnp.exp2(jnp.floor(jnp.log2(jnp.maximum(mx, 1e-30))) - 10.0)
    xb = (x / s).reshape(m_rows, g, nbd, 2, 16)
    eye = jnp.eye(nbd, dtype=jnp.float32)

    def bd(v):   # [M, G, nbd, 16] f32 -> [G, 16, nbd * 16] f16, rows (m, p, c)
        hi = v.astype(jnp.float16)
        lo = (v - hi.astype(jnp.float32)).astype(jnp.float16)
        p = jnp.stack([hi, lo], axis=1).astype(jnp.float32)       # [M, 2, G, nbd, 16]
        z = p[:, :, :, :, None, :] * eye[:, :, None]               # [M, 2, G, c, c', 16]
        return z.transpose(2, 0, 1, 3, 4, 5).reshape(g, 16, nbd * 16).astype(jnp.float16)

    xlo, xhi = bd(xb[..., 0, :]), bd(xb[..., 1, :] / 16)
    corr = (1032.0 * xlo.astype(jnp.float32).sum(-1) + 1152.0 * xhi.astype(jnp.float32).sum(-1))
    return xlo, xhi, corr, s[:, 0]


@functools.partial(jax.jit, static_argnames=("bn", "n_sub", "split_k", "num_warps",
                                             "num_stages", "interpret", "fold"))
def tc_q4_0(x, qs, d, *, bn=256, n_sub=1, split_k=1, num_warps=4, num_stages=3,
            interpret=False, fold=False):
    n, nb, _ = qs.shape
    m_rows = x.shape[0]
    nbd = 8 // m_rows
    xlo, xhi, corr, s = split_x(x, nbd)
    per = nb // split_k
    gs = per // nbd
    kern = functools.partial(kernel, nbd=nbd, n_sub=n_sub, n_chunks=gs // n_sub, m_rows=m_rows,
                             interpret=interpret, fold=fold)
    out = pl.pallas_call(
        kern, out_shape=jax.ShapeDtypeStruct((split_k, m_rows, n), jnp.float32),
        grid=(n // bn, split_k),
        in_specs=[pl.BlockSpec((bn, per, 16), lambda i, k: (i, k, 0)),
                  pl.BlockSpec((bn, per), lambda i, k: (i, k)),
                  pl.BlockSpec((gs, 16, nbd * 16), lambda i, k: (k, 0, 0)),
                  pl.BlockSpec((gs, 16, nbd * 16), lambda i, k: (k, 0, 0)),
                  pl.BlockSpec((gs, 16), lambda i, k: (k, 0))],
        out_specs=pl.BlockSpec((None, m_rows, bn), lambda i, k: (k, 0, i)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="tc_q4_0")(qs, d, xlo, xhi, corr)
    return out.sum(0) * s[:, None]


def make(rng, n, k):
    qs = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    d = rng.uniform(-0.02, 0.02, (n, k // 32)).astype(np.float16)
    return qs, d


def reference(qs, d, x):
    q = np.concatenate([(qs & 15).astype(np.float64) - 8, (qs >> 4).astype(np.float64) - 8], -1)
    w = (q * d.astype(np.float64)[..., None]).reshape(qs.shape[0], -1)
    return x.astype(np.float64) @ w.T, np.abs(x).astype(np.float64) @ np.abs(w).T


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--budget_s", type=float, default=400.0)
    p.add_argument("--rows", default="1,2,4,8", help="x rows M to time")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args(argv)
    interp = args.smoke
    dev = jax.devices()[0]
    hbm = float("nan") if interp else hbm_read_gbps()
    print(f"{dev.device_kind}, jax {jax.__version__}; HBM read {hbm:.0f} GB/s", flush=True)
    res = dict(date=time.strftime("%Y-%m-%d"), card=dev.device_kind, jax=jax.__version__,
               hbm_read_gbps=hbm, results=[])
    rng = np.random.default_rng(0)
    deadline = time.perf_counter() + args.budget_s
    configs = [dict(bn=bn, num_warps=w, num_stages=st, n_sub=ns, split_k=sk)
               for bn, w, st, ns, sk in [(256, 4, 3, 1, 1), (128, 4, 3, 1, 1), (128, 4, 2, 1, 1),
                                         (256, 8, 3, 1, 1), (256, 4, 4, 1, 1), (128, 4, 3, 2, 1),
                                         (64, 4, 3, 1, 1), (128, 4, 3, 1, 2), (256, 4, 3, 1, 2)]]
    if interp:
        configs = [dict(bn=64, num_warps=4, num_stages=3, n_sub=2, split_k=2)]
    for name, (n, k) in (SMOKE_SHAPES if interp else SHAPES).items():
        qs, d = make(rng, n, k)
        nbytes = n * k // 32 * 18
        qs_j, d_j = jnp.asarray(qs), jnp.asarray(d)
        packed = (qs_j, d_j)       # the library's Q4_0 layout is the same two arrays
        for m_rows in [int(r) for r in args.rows.split(",")]:
            if name != "70b_gate_up" and name != "8b_gate_up" and m_rows != 1 and not interp:
                continue
            x = rng.standard_normal((m_rows, k)).astype(np.float32)
            want, wabs = reference(qs, d, x)
            xs = jnp.stack([jnp.asarray(x) * (1 + i / 64) for i in range(args.calls)])
            full = name == "70b_gate_up" and m_rows == 1
            use = configs if full or interp else configs[:1] + configs[-2:]
            variants = [("lib", None)] + [(v, c) for c in use for v in ("tc", "tc_fold")]
            for variant, cfg in variants:
                if variant == "lib":
                    f = functools.partial(qm.qmatvec_packed, qtype=T.Q4_0, n_cols=k,
                                          interpret=interp)
                    call = lambda xx, f=f: f(xx, packed)  # noqa: E731
                else:
                    f = functools.partial(tc_q4_0, interpret=interp, fold=variant == "tc_fold",
                                          **cfg)
                    call = lambda xx, f=f: f(xx, qs_j, d_j)  # noqa: E731
                if time.perf_counter() > deadline:
                    break
                rec = dict(shape=name, n=n, k=k, m=m_rows, variant=variant, cfg=cfg)
                try:
                    y = np.asarray(jax.block_until_ready(call(jnp.asarray(x))), np.float64)
                    rec["rel_err"] = float(np.max(np.abs(y - want) / np.maximum(wabs, 1e-30)))
                    if not interp:
                        many = jax.jit(lambda xs, call=call: [call(xs[i])
                                                             for i in range(args.calls)])
                        jax.block_until_ready(many(xs))
                        t = pipelined_time(lambda: many(xs), 10) / args.calls
                        rec.update(us=t * 1e6, gbps=nbytes / t / 1e9,
                                   pct_hbm=100 * nbytes / t / 1e9 / hbm)
                except Exception as e:  # noqa: BLE001 - an experiment: report and go on
                    rec["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
                res["results"].append(rec)
                print(f"{name:12s} M={m_rows} {variant:8s} {json.dumps(cfg):90s} "
                      + (rec["error"] if "error" in rec else
                         f"err {rec['rel_err']:.1e}" + (f"  {rec['us']:7.1f} us {rec['pct_hbm']:5.1f}%"
                                                        if "us" in rec else "")), flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "tc_probe.json"), "w") as fh:
                json.dump(res, fh, indent=1)
    print("\nbest per shape and M (% of HBM):")
    best = {}
    for r in res["results"]:
        if "pct_hbm" in r and r["rel_err"] < 1e-4:
            key = (r["shape"], r["m"], r["variant"])
            if key not in best or r["pct_hbm"] > best[key]["pct_hbm"]:
                best[key] = r
    for (shape, m, v), r in sorted(best.items()):
        print(f"  {shape:12s} M={m} {v:8s} {r['pct_hbm']:5.1f}%  {r['us']:7.1f} us"
              f"  err {r['rel_err']:.1e}  {json.dumps(r['cfg'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
