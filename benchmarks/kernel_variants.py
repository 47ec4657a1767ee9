"""Experiment: other Pallas-Triton formulations of the fused dequantize + matvec (M = 1).

    python benchmarks/kernel_variants.py [--budget_s 290] [--calls 8] [--out DIR]   # GPU
    python benchmarks/kernel_variants.py --smoke                        # CPU, interpret mode

A self-contained experiment, not library code: Q8_0 and Q4_0 only, one shape (28672 x 8192,
Llama-3-70B gate/up), x one row. Each variant repacks the same random weights into its own
layout (numpy, once) and is timed over a small coordinate-descent sweep of its tiling.

Variants (N rows of W, K columns, B = K / 32 blocks of 32 values, one f16 scale d per block):

- lib: `ntransformer_jax.kernels.qmatvec` as it stands (the baseline).
- rm2d: q [N, K] int8 (Q4_0: [N, K/2] uint8 in GGUF nibble order), d [N, B]. A program owns
  block_n rows; a loop step loads a [block_n, block_k] byte tile and adds into a 2-D f32
  accumulator of that shape (one reduction, after the loop). d becomes [block_n, block_k] by a
  reshape of [bn, bk/32, 1] broadcast (dmode=reshape) or by a gather-indexed load (dmode=gather).
- rm3d: q [N, B, 32] (Q4_0: [N, B, 16]), d [N, B]; step = tile [block_n, nb, 32], summed over
  the last axis, times d, into a [block_n, nb] accumulator (the library kernel's structure).
- kmajor: K-major words qw [K/4, N] int32 (Q4_0: [K/8, N]); word (r, n) holds 4 consecutive GGUF
  quant bytes of row n; d transposed to [B, N] f16. A program owns block_n = 128 * num_warps
  columns (4 a thread, so every tile shares one layout) and a K slice (split_k programs a column
  tile; XLA adds the partials). Each word row is a 1-D [block_n] load; `unroll` blocks a loop
  step; x enters as scalar loads (in word-plane order); per block, a sum over its values, times
  d, into a [block_n] accumulator. `prefetch` loads step i+1 while computing step i.
- kmajor_prmt: kmajor with bytes -> floats by inline-PTX `prmt` (one instruction a value).
- kmajor_fold: kmajor_prmt with the value in the top mantissa bits (Q4_0: 1 + v/128 by prmt;
  Q8_0: 1 + b/256 by shift and mask): no per-value subtraction, the zero point becomes a
  per-block term with the block sum of x. Not bit-exact; within the 1e-5 check.
- xla_*: XLA on q [N, B, 32]: dequantize + einsum (deq_einsum), one fused multiply-sum
  (fused_sum), an einsum per block then the scale (blocksum).
- probe_loads: kmajor's loads alone (words and d XOR-ed into an int accumulator), the load
  ceiling of that layout in Pallas; its output is not checked.

Integer -> float, exact (all but `_fold`): OR-ing v < 2^23 into the bits of 2^23 gives 2^23 + v;
one subtraction removes 2^23 and the zero point (128 for Q8_0's sign-flipped byte, 8 for Q4_0).

Timing, three figures a config. `blocked`: warm-up, then the median of 20 calls each blocked until
ready; it carries the host round trip (on the H200 of 2026-11-27 blocked exceeded pipelined by
80-240 us, noisily). `pipe`: `ceilings.pipelined_time` of single calls, host dispatch overlapped
but bounded below by the dispatch rate. `dev`: `pipelined_time` of one jitted program making
--calls calls on different x (XLA variants get different scale buffers too, so nothing is
shared), divided by --calls; the closest to device time, and what picks the best config. GB/s
and % of the HBM read ceiling (measured in the same run) count the GGUF bytes of W. Every config
is checked against a float64 numpy reference: max_n |y - ref| / (|x| @ |W|^T)_n <= 1e-5; a failing
config is never best. Compile errors print their first 300 characters and the sweep goes on.
Output: a line per config, one per (variant, best), and JSON in DIR/variants.json (DIR = --out,
else $OUT, else nothing written).

First run (H200, JAX 0.11.2, 2026-11-27, HBM read 3557 GB/s; before `dev` existed), best
`pipe` % of HBM, Q8_0 / Q4_0: lib 79.0 / 43.9, rm2d 62.8 / 41.8, rm3d 80.4 / 45.1, kmajor
75.5 / 43.6, kmajor_prmt 80.2 / 47.0, kmajor_fold 76.4 / 48.9, xla deq_einsum 72.1 / 19.7,
fused_sum 71.7 / 36.2, blocksum 79.6 / 25.2. Blocked figures were 20-41% (Q8_0) and 10-22% (Q4_0).
All Pallas variants landed within ~87-93 us (Q8_0) and ~76-89 us (Q4_0): whether that is the
single-call dispatch rate or the kernels is what `dev` and probe_loads are there to tell.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ceilings import hbm_read_gbps, pipelined_time  # noqa: E402

HIGHEST = lax.Precision.HIGHEST
RTOL = 1e-5
SHAPE = (28672, 8192)          # N x K
SMOKE_SHAPE = (256, 512)
TYPES = ("Q8_0", "Q4_0")
BYTES_PER_BLOCK = {"Q8_0": 34, "Q4_0": 18}
MAGIC = 0x4B000000             # float32 bits of 2^23
TWO_23 = float(1 << 23)
ONE_BITS = 0x3F800000          # float32 bits of 1.0


def _i32(v: int) -> int:
    """A 32-bit pattern as a signed int32 constant."""
    return v - (1 << 32) if v >= 1 << 31 else v


def _f32(bits: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(bits, jnp.float32)


def _srl(v: jax.Array, n: int) -> jax.Array:
    return lax.shift_right_logical(v, jnp.int32(n)) if n else v


def _shift(v: jax.Array, n: int) -> jax.Array:
    """v << n for n >= 0, logical v >> -n otherwise."""
    return lax.shift_left(v, jnp.int32(n)) if n > 0 else _srl(v, -n)


# ---------------------------------------------------------------------------------------------
# Weights, reference, layouts (numpy, host).
# ---------------------------------------------------------------------------------------------

def make_weight(rng: np.random.Generator, qtype: str, n: int, k: int) -> dict:
    """Random GGUF blocks: Q8_0 q int8 [N, B, 32]; Q4_0 bytes uint8 [N, B, 16]; d f16 [N, B]."""
    nb = k // 32
    d = (rng.standard_normal((n, nb)) * 0.01).astype(np.float16)
    if qtype == "Q8_0":
        q = rng.integers(-128, 128, (n, nb, 32), dtype=np.int8)
    else:
        q = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    return dict(q=q, d=d)


def values(w: dict, qtype: str) -> np.ndarray:
    """The integer values [N, B, 32] float64 (Q4_0: element j low nibble of byte j, j+16 high)."""
    if qtype == "Q8_0":
        return w["q"].astype(np.float64)
    q = w["q"]
    return np.concatenate([q & 15, q >> 4], axis=-1).astype(np.float64) - 8.0


def reference(w: dict, qtype: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 y = W @ x and |W| @ |x|."""
    n = w["q"].shape[0]
    wf = (values(w, qtype) * w["d"].astype(np.float64)[..., None]).reshape(n, -1)
    x64 = x.astype(np.float64)
    return wf @ x64, np.abs(wf) @ np.abs(x64)


def gguf_bytes(w: dict) -> np.ndarray:
    """uint8 [N, B * type_size]: `half d; qs` per block, as a GGUF tensor stores it."""
    n, nb = w["d"].shape
    q = w["q"].view(np.uint8)
    return np.concatenate([w["d"].view(np.uint8).reshape(n, nb, 2), q], axis=-1).reshape(n, -1)


def kmajor_words(w: dict) -> np.ndarray:
    """int32 [K / (values per word), N]: word (r, n) = bytes 4r..4r+3 of row n's quants."""
    n = w["q"].shape[0]
    q = np.ascontiguousarray(w["q"].view(np.uint8).reshape(n, -1))
    return np.ascontiguousarray(q.view(np.uint32).T).view(np.int32)


# ---------------------------------------------------------------------------------------------
# In-kernel arithmetic.
# ---------------------------------------------------------------------------------------------

def prmt(a: jax.Array, b: int, sel: int, interpret: bool) -> jax.Array:
    """PTX `prmt.b32 d, a, b, sel` (default mode) on int32 `a` and a constant `b`.

    Byte j of d is byte (sel >> 4j) & 7 of the 8-byte value {b, a} (0-3 from a, 4-7 from b).
    Interpret mode evaluates the same selection with shifts and masks.
    """
    if not interpret:
        return plgpu.elementwise_inline_asm(
            f"prmt.b32 $0, $1, {b:#x}, {sel:#x};", args=[a], constraints="=r,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)])[0]
    out, const = None, 0
    for j in range(4):
        src = (sel >> (4 * j)) & 7
        if src >= 4:
            const |= ((b >> (8 * (src - 4))) & 0xFF) << (8 * j)
        else:
            term = lax.shift_left(_srl(a, 8 * src) & 0xFF, jnp.int32(8 * j))
            out = term if out is None else out | term
    return out | jnp.int32(_i32(const)) if out is not None else jnp.full_like(a, _i32(const))


def word_floats(w: jax.Array, qtype: str, conv: str, interpret: bool) -> list[jax.Array]:
    """One int32 word tensor -> its values as float tensors, in x-plane order.

    Q8_0: 4 planes (byte i). Q4_0: 8 planes p = 2 i + h (byte i, low h=0 / high h=1 nibble).
    conv: 'shift' exact by shift/mask/OR + subtract; 'prmt' exact via inline prmt + subtract;
    'fold' inexact-offset form (see the module docstring): Q8_0 1 + b/256, Q4_0 1 + v/128.
    """
    if qtype == "Q8_0":
        t = w ^ jnp.int32(_i32(0x80808080))           # each byte b + 128 (sign flipped)
        out = []
        for i in range(4):
            if conv == "shift":
                bits = (_srl(t, 8 * i) & 0xFF) | MAGIC
                out.append(_f32(bits) - (TWO_23 + 128.0))
            elif conv == "prmt":
                out.append(_f32(prmt(t, MAGIC, 0x7440 | i, interpret)) - (TWO_23 + 128.0))
            else:  # fold: byte at mantissa bits 15..22
                bits = (_shift(t, 15 - 8 * i) & 0x007F8000) | ONE_BITS
                out.append(_f32(bits))
        return out
    out = []
    if conv == "shift":
        for i in range(4):
            for h in range(2):
                bits = (_srl(w, 8 * i + 4 * h) & 0xF) | MAGIC
                out.append(_f32(bits) - (TWO_23 + 8.0))
        return out
    lo = w & 0x0F0F0F0F
    hi = _srl(w, 4) & 0x0F0F0F0F
    if conv == "fold":
        lo, hi = lo | jnp.int32(_i32(0x80808080)), hi | jnp.int32(_i32(0x80808080))
    for i in range(4):
        for plane in (lo, hi):
            if conv == "prmt":
                out.append(_f32(prmt(plane, MAGIC, 0x7440 | i, interpret)) - (TWO_23 + 8.0))
            else:  # fold: 0x3F, 0x80 | v, 0, 0 -> 1 + v/128
                out.append(_f32(prmt(plane, 0x3F000000, 0x7044 | (i << 8), interpret)))
    return out


FOLD = {"Q8_0": (256.0, 384.0), "Q4_0": (128.0, 136.0)}  # block value = a * sum(f x) - c * sum(x)


def _tree_sum(parts: list[jax.Array]) -> jax.Array:
    while len(parts) > 1:
        parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


# ---------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------

def _rm2d_kernel(q_ref, d_ref, x_ref, o_ref, *, qtype, bk, n_steps, dmode):
    """q_ref [bn, Kq] uint8 (Kq bytes a row), d_ref [bn, B] f16, x_ref Q8_0 [K] / Q4_0 [2, K/2]."""
    bn = q_ref.shape[0]
    vpb = 32 if qtype == "Q8_0" else 16            # tile columns per block
    nbk = bk // vpb                                  # blocks per tile

    def scales(i):
        b0 = i * nbk
        if dmode == "gather":
            cols = b0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1) // vpb
            rows = lax.broadcasted_iota(jnp.int32, (bn, 1), 0)
            return d_ref[rows, cols].astype(jnp.float32)
        d = d_ref[:, pl.ds(b0, nbk)].astype(jnp.float32)
        return jnp.broadcast_to(d[:, :, None], (bn, nbk, vpb)).reshape(bn, bk)

    def step(i, acc):
        k0 = pl.multiple_of(i * bk, bk)
        b = q_ref[:, pl.ds(k0, bk)].astype(jnp.int32)
        if qtype == "Q8_0":
            f = _f32((b ^ 0x80) | MAGIC) - (TWO_23 + 128.0)
            t = f * x_ref[pl.ds(k0, bk)][None, :]
        else:
            lo = _f32((b & 15) | MAGIC) - (TWO_23 + 8.0)
            hi = _f32(_srl(b, 4) | MAGIC) - (TWO_23 + 8.0)
            t = lo * x_ref[0, pl.ds(k0, bk)][None, :] + hi * x_ref[1, pl.ds(k0, bk)][None, :]
        return acc + t * scales(i)

    acc = lax.fori_loop(0, n_steps, step, jnp.zeros((bn, bk), jnp.float32))
    o_ref[...] = jnp.sum(acc, axis=1)


def _rm3d_kernel(q_ref, d_ref, x_ref, o_ref, *, qtype, nb, n_steps):
    """q_ref [bn, B, V] uint8 (V = 32 or 16), d_ref [bn, B] f16, x_ref [P, B, V] f32."""
    bn = q_ref.shape[0]

    def step(i, acc):
        b0 = pl.multiple_of(i * nb, nb)
        b = q_ref[:, pl.ds(b0, nb), :].astype(jnp.int32)
        if qtype == "Q8_0":
            f = _f32((b ^ 0x80) | MAGIC) - (TWO_23 + 128.0)
            t = f * x_ref[0, pl.ds(b0, nb), :][None]
        else:
            lo = _f32((b & 15) | MAGIC) - (TWO_23 + 8.0)
            hi = _f32(_srl(b, 4) | MAGIC) - (TWO_23 + 8.0)
            t = lo * x_ref[0, pl.ds(b0, nb), :][None] + hi * x_ref[1, pl.ds(b0, nb), :][None]
        return acc + d_ref[:, pl.ds(b0, nb)].astype(jnp.float32) * jnp.sum(t, axis=2)

    acc = lax.fori_loop(0, n_steps, step, jnp.zeros((bn, nb), jnp.float32))
    o_ref[...] = jnp.sum(acc, axis=1)


def _kmajor_kernel(w_ref, d_ref, x_ref, *rest, qtype, conv, unroll, n_steps, prefetch,
                   interpret):
    """One program: columns [block_n] of y over its K slice.

    w_ref [R, bn] int32 word rows, d_ref [Bs, bn] f16, x_ref [R * P] f32 x in word-plane order,
    (fold: xs_ref [Bs] f32 block sums of x), o_ref [bn] f32 partial sums.
    """
    o_ref = rest[-1]
    xs_ref = rest[0] if conv == "fold" else None
    if conv == "loads":
        return _loads_probe(w_ref, d_ref, o_ref, rpb=8 if qtype == "Q8_0" else 4,
                            unroll=unroll, n_steps=n_steps)
    rpb, planes = (8, 4) if qtype == "Q8_0" else (4, 8)   # word rows a block, x planes a word
    bn = w_ref.shape[1]

    def load(i):
        out = []
        for u in range(unroll):
            b = i * unroll + u
            out.append(([w_ref[b * rpb + r, :] for r in range(rpb)], d_ref[b, :]))
        return out

    def compute(i, loaded, acc):
        for u, (words, d) in enumerate(loaded):
            b = i * unroll + u
            parts = []
            for r, w in enumerate(words):
                base = (b * rpb + r) * planes
                fs = word_floats(w, qtype, conv, interpret)
                parts.append(_tree_sum([f * x_ref[base + p] for p, f in enumerate(fs)]))
            s = _tree_sum(parts)
            if conv == "fold":
                a, c = FOLD[qtype]
                s = a * s - c * xs_ref[b]
            acc = acc + d.astype(jnp.float32) * s
        return acc

    zeros = jnp.zeros((bn,), jnp.float32)
    if prefetch:
        def body(i, carry):
            acc, cur = carry
            nxt = load(jnp.minimum(i + 1, n_steps - 1))
            return compute(i, cur, acc), nxt
        acc, _ = lax.fori_loop(0, n_steps, body, (zeros, load(0)))
    else:
        acc = lax.fori_loop(0, n_steps, lambda i, a: compute(i, load(i), a), zeros)
    o_ref[...] = acc


def _loads_probe(w_ref, d_ref, o_ref, *, rpb, unroll, n_steps):
    """kmajor's loads with one integer op each (XOR), so the loads cannot be dropped."""
    def step(i, acc):
        for u in range(unroll):
            b = i * unroll + u
            for r in range(rpb):
                acc = acc ^ w_ref[b * rpb + r, :]
            acc = acc ^ lax.bitcast_convert_type(d_ref[b, :], jnp.int16).astype(jnp.int32)
        return acc
    acc = lax.fori_loop(0, n_steps, step, jnp.zeros((w_ref.shape[1],), jnp.int32))
    o_ref[...] = lax.bitcast_convert_type(acc, jnp.float32)


# ---------------------------------------------------------------------------------------------
# Wrappers: each builds f(x, *arrays) -> y [N] f32 for one config.
# ---------------------------------------------------------------------------------------------

def _params(cfg: dict):
    return plgpu.CompilerParams(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def rm_arrays(w: dict, qtype: str, three_d: bool) -> tuple[np.ndarray, ...]:
    n, nb = w["d"].shape
    q = w["q"].view(np.uint8)
    return (q if three_d else q.reshape(n, -1), w["d"])


def x_planes_rm(x: jax.Array, qtype: str) -> jax.Array:
    """Q8_0: [1, B, 32]; Q4_0: [2, B, 16] (values j and j + 16 of each block)."""
    x3 = x.reshape(-1, 32)
    return x3[None] if qtype == "Q8_0" else jnp.stack([x3[:, :16], x3[:, 16:]])


def build_rm2d(qtype, n, k, cfg, interpret):
    bn, bk, dmode = cfg["block_n"], cfg["block_k"], cfg["dmode"]
    kq = k if qtype == "Q8_0" else k // 2
    if n % bn or kq % bk:
        raise ValueError(f"tiling {cfg} does not divide {n}x{kq}")
    kern = functools.partial(_rm2d_kernel, qtype=qtype, bk=bk, n_steps=kq // bk, dmode=dmode)

    def f(x, q, d):
        xs = x if qtype == "Q8_0" else x_planes_rm(x, qtype).reshape(2, -1)
        return pl.pallas_call(
            kern, out_shape=jax.ShapeDtypeStruct((n,), jnp.float32), grid=(n // bn,),
            in_specs=[pl.BlockSpec((bn, kq), lambda i: (i, 0)),
                      pl.BlockSpec((bn, k // 32), lambda i: (i, 0)),
                      pl.BlockSpec(xs.shape, lambda i: (0,) * xs.ndim)],
            out_specs=pl.BlockSpec((bn,), lambda i: (i,)),
            compiler_params=_params(cfg), interpret=interpret, name="rm2d")(q, d, xs)
    return f


def build_rm3d(qtype, n, k, cfg, interpret):
    bn, nb = cfg["block_n"], cfg["blocks"]
    v = 32 if qtype == "Q8_0" else 16
    if n % bn or (k // 32) % nb:
        raise ValueError(f"tiling {cfg} does not divide {n}x{k // 32} blocks")
    kern = functools.partial(_rm3d_kernel, qtype=qtype, nb=nb, n_steps=k // 32 // nb)

    def f(x, q, d):
        xs = x_planes_rm(x, qtype)
        return pl.pallas_call(
            kern, out_shape=jax.ShapeDtypeStruct((n,), jnp.float32), grid=(n // bn,),
            in_specs=[pl.BlockSpec((bn, k // 32, v), lambda i: (i, 0, 0)),
                      pl.BlockSpec((bn, k // 32), lambda i: (i, 0)),
                      pl.BlockSpec(xs.shape, lambda i: (0, 0, 0))],
            out_specs=pl.BlockSpec((bn,), lambda i: (i,)),
            compiler_params=_params(cfg), interpret=interpret, name="rm3d")(q, d, xs)
    return f


def x_planes_kmajor(x: jax.Array, qtype: str) -> jax.Array:
    """x in word-plane order, flat: Q8_0 x itself; Q4_0 [B, r, i, h] = x[32 b + 4 r + i + 16 h]."""
    if qtype == "Q8_0":
        return x
    return x.reshape(-1, 2, 4, 4).transpose(0, 2, 3, 1).reshape(-1)


def build_kmajor(qtype, n, k, cfg, interpret, conv):
    bn = cfg["cols"] * 32 * cfg["num_warps"]
    sk, unroll = cfg["split_k"], cfg["unroll"]
    nblocks = k // 32
    rows = k // 4 if qtype == "Q8_0" else k // 8
    if n % bn or nblocks % (sk * unroll):
        raise ValueError(f"tiling {cfg} does not divide N={n}, {nblocks} blocks")
    bs = nblocks // sk
    kern = functools.partial(_kmajor_kernel, qtype=qtype, conv=conv, unroll=unroll,
                             n_steps=bs // unroll, prefetch=cfg["prefetch"], interpret=interpret)

    def f(x, qw, dt):
        xw = x_planes_kmajor(x, qtype)
        ops = [qw, dt, xw]
        specs = [pl.BlockSpec((rows // sk, bn), lambda j, s: (s, j)),
                 pl.BlockSpec((bs, bn), lambda j, s: (s, j)),
                 pl.BlockSpec((xw.shape[0] // sk,), lambda j, s: (s,))]
        if conv == "fold":
            ops.append(x.reshape(-1, 32).sum(axis=1))
            specs.append(pl.BlockSpec((bs,), lambda j, s: (s,)))
        part = pl.pallas_call(
            kern, out_shape=jax.ShapeDtypeStruct((sk, n), jnp.float32), grid=(n // bn, sk),
            in_specs=specs, out_specs=pl.BlockSpec((None, bn), lambda j, s: (s, j)),
            compiler_params=_params(cfg), interpret=interpret, name="kmajor")(*ops)
        return part.sum(axis=0) if sk > 1 else part[0]
    return f


def _xla_values(q: jax.Array, qtype: str) -> list[jax.Array]:
    """q [N, B, 32] int8 -> [f32 values]; Q4_0 [N, B, 16] uint8 -> [low plane, high plane]."""
    if qtype == "Q8_0":
        return [q.astype(jnp.float32)]
    return [(q & 15).astype(jnp.float32) - 8.0, (q >> 4).astype(jnp.float32) - 8.0]


def build_xla(qtype, n, k, cfg, interpret):
    form = cfg["form"]

    def f(x, q, d):
        vals = _xla_values(q, qtype)
        xp = x_planes_rm(x, qtype)                   # [P, B, V]
        df = d.astype(jnp.float32)
        if form == "deq_einsum":
            wq = vals[0] if len(vals) == 1 else jnp.concatenate(vals, axis=-1)
            wf = (wq * df[..., None]).reshape(n, k)
            return jnp.einsum("k,nk->n", x, wf, precision=HIGHEST)
        if form == "fused_sum":
            return sum(jnp.sum(v * df[..., None] * xp[p][None], axis=(1, 2))
                       for p, v in enumerate(vals))
        s = sum(jnp.einsum("nbj,bj->nb", v, xp[p], precision=HIGHEST) for p, v in enumerate(vals))
        return jnp.sum(s * df, axis=1)
    return f


def build_lib(qtype, n, k, cfg, interpret):
    import gguf
    from ntransformer_jax.kernels import qmatvec as qm
    qt = gguf.GGMLQuantizationType[qtype]
    bs = qm.BlockSizes(block_n=cfg["block_n"], block_k=cfg["block_k"], split_k=cfg["split_k"],
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    qm.plan(qt, 1, n, k, bs)

    def f(x, *packed):
        return qm.qmatvec_packed(x[None], tuple(packed), qt, k, block_sizes=bs,
                                 interpret=interpret)[0]
    return f


def lib_arrays(w: dict, qtype: str, k: int) -> tuple:
    import gguf
    from ntransformer_jax.kernels import qmatvec as qm
    return tuple(qm.repack(jnp.asarray(gguf_bytes(w)), gguf.GGMLQuantizationType[qtype], k))


# ---------------------------------------------------------------------------------------------
# Variants and their sweeps: start config, then one axis at a time (coordinate descent).
# ---------------------------------------------------------------------------------------------

def _per_thread(cfg: dict, qtype: str, key: str) -> float:
    """Tile elements (bytes) per thread: block_n x block_k bytes, or block_n x blocks x 32."""
    width = cfg[key] * (32 if key == "blocks" else 1)
    return cfg["block_n"] * width / (32 * cfg["num_warps"])


VARIANTS = {
    # name: (builder, arrays(w, qtype, k), start, axes, config filter)
    "lib": (build_lib, lambda w, qt, k: lib_arrays(w, qt, k),
            dict(block_n=32, block_k=256, split_k=1, num_warps=4, num_stages=3),
            dict(block_n=(16, 32, 64), block_k=(256, 512), num_warps=(4, 8)), None),
    "rm2d": (build_rm2d, lambda w, qt, k: rm_arrays(w, qt, False),
             dict(block_n=16, block_k=512, dmode="reshape", num_warps=4, num_stages=2),
             dict(dmode=("reshape", "gather"), block_k=(256, 512, 1024, 2048),
                  block_n=(8, 16, 32), num_warps=(4, 8), num_stages=(2, 3)),
             lambda c, qt: 4 <= _per_thread(c, qt, "block_k") <= 64),
    "rm3d": (build_rm3d, lambda w, qt, k: rm_arrays(w, qt, True),
             dict(block_n=32, blocks=8, num_warps=4, num_stages=2),
             dict(blocks=(8, 16, 32), block_n=(16, 32, 64), num_warps=(4, 8), num_stages=(2, 3)),
             lambda c, qt: _per_thread(c, qt, "blocks") <= 128),
    "kmajor": (functools.partial(build_kmajor, conv="shift"),
               lambda w, qt, k: (kmajor_words(w), np.ascontiguousarray(w["d"].T)),
               dict(num_warps=4, cols=4, split_k=8, unroll=2, prefetch=False, num_stages=2),
               dict(unroll=(1, 2, 4), prefetch=(False, True), num_warps=(2, 4, 8),
                    split_k=(4, 8, 16), cols=(4, 8)), None),
}
VARIANTS["kmajor_prmt"] = (functools.partial(build_kmajor, conv="prmt"), *VARIANTS["kmajor"][1:])
VARIANTS["kmajor_fold"] = (functools.partial(build_kmajor, conv="fold"), *VARIANTS["kmajor"][1:])
VARIANTS["probe_loads"] = (functools.partial(build_kmajor, conv="loads"), VARIANTS["kmajor"][1],
                           dict(VARIANTS["kmajor"][2], unroll=4),
                           dict(unroll=(2, 4, 8), num_warps=(2, 4, 8), split_k=(8, 16)), None)
PROBES = ("probe_loads",)
XLA_FORMS = ("deq_einsum", "fused_sum", "blocksum")

SMOKE_STARTS = {
    "lib": [dict(block_n=16, block_k=256, split_k=1, num_warps=4, num_stages=2)],
    "rm2d": [dict(block_n=8, block_k=128, dmode="reshape", num_warps=4, num_stages=2),
             dict(block_n=8, block_k=128, dmode="gather", num_warps=4, num_stages=2)],
    "rm3d": [dict(block_n=8, blocks=4, num_warps=4, num_stages=2)],
    "kmajor": [dict(num_warps=1, cols=4, split_k=2, unroll=2, prefetch=False, num_stages=2),
               dict(num_warps=1, cols=4, split_k=2, unroll=1, prefetch=True, num_stages=2)],
}
for _v in ("kmajor_prmt", "kmajor_fold", "probe_loads"):
    SMOKE_STARTS[_v] = SMOKE_STARTS["kmajor"]


# ---------------------------------------------------------------------------------------------
# Measurement.
# ---------------------------------------------------------------------------------------------

def median_blocked(fn, repeats: int = 20) -> float:
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _short(cfg: dict) -> str:
    abbrev = dict(block_n="bn", block_k="bk", blocks="nb", split_k="sk", num_warps="w",
                  num_stages="st", unroll="u", prefetch="pf", dmode="d", cols="c", form="")
    return " ".join(f"{abbrev.get(k, k)}{int(v) if isinstance(v, bool) else v}"
                    for k, v in cfg.items())


class Bench:
    def __init__(self, args, hbm: float, meta: dict):
        self.args, self.hbm, self.meta = args, hbm, meta
        self.interpret = args.smoke
        self.results: dict = {}

    def save(self) -> None:
        """Write everything so far (after each variant, so a crash still leaves results)."""
        if self.args.out:
            os.makedirs(self.args.out, exist_ok=True)
            with open(os.path.join(self.args.out, "variants.json"), "w") as f:
                json.dump(dict(self.meta, results=self.results), f, indent=1)

    def run(self, qtype, variant, build, cfg, x, arrays, want, wabs, nbytes) -> dict | None:
        n, k = self.shape
        rec = dict(cfg=cfg)
        calls = self.args.calls
        try:
            f = jax.jit(build(qtype, n, k, cfg, self.interpret))
            y = np.asarray(jax.block_until_ready(f(x, *arrays)), np.float64)
            if not self.interpret:
                xs = jnp.stack([x] + [x * (1 + i / 64) for i in range(1, calls)])
                if variant.startswith("xla_"):    # scales per call, else XLA shares dequantization
                    q, d = arrays
                    extra = (jnp.stack([d * (1 + i / 64) for i in range(calls)]),)
                    many = jax.jit(lambda xs, q, ds: [f(xs[i], q, ds[i]) for i in range(calls)])
                    margs = (xs, q, *extra)
                else:
                    many = jax.jit(lambda xs, *a: [f(xs[i], *a) for i in range(calls)])
                    margs = (xs, *arrays)
                jax.block_until_ready(many(*margs))
        except Exception as e:  # noqa: BLE001 - an experiment: report and go on
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            print(f"  {qtype} {variant:12s} {_short(cfg):40s} ERROR {msg}", flush=True)
            rec["error"] = msg
            return rec
        err = float(np.max(np.abs(y - want) / np.maximum(wabs, 1e-30)))
        rec["rel_err"] = err
        rec["ok"] = bool(err <= RTOL) or variant in PROBES
        if self.interpret:
            print(f"  {qtype} {variant:12s} {_short(cfg):40s} err {err:.1e}"
                  f" {'ok' if rec['ok'] else 'FAILED'}", flush=True)
            return rec
        t = median_blocked(lambda: f(x, *arrays))
        tp = pipelined_time(lambda: f(x, *arrays), 10)
        td = pipelined_time(lambda: many(*margs), 10) / calls
        pct = {key: 100 * nbytes / sec / 1e9 / self.hbm for key, sec in
               (("pct_hbm", t), ("pipe_pct_hbm", tp), ("dev_pct_hbm", td))}
        rec.update(t_us=t * 1e6, pipe_us=tp * 1e6, dev_us=td * 1e6, dev_gbps=nbytes / td / 1e9,
                   **pct)
        print(f"  {qtype} {variant:12s} {_short(cfg):36s} dev {td * 1e6:6.1f} us"
              f" {pct['dev_pct_hbm']:5.1f}% | pipe {tp * 1e6:6.1f} {pct['pipe_pct_hbm']:5.1f}%"
              f" | blocked {t * 1e6:6.1f} {pct['pct_hbm']:5.1f}% | err {err:.1e}"
              f"{'' if rec['ok'] else ' FAILED'}", flush=True)
        return rec

    def sweep(self, qtype, variant, build, arrays, start, axes, keep, x, want, wabs, nbytes,
              deadline):
        recs, seen = [], set()

        def score(r):
            return r["dev_us"] if r.get("ok") and "dev_us" in r else float("inf")

        def attempt(cfg):
            key = json.dumps(cfg, sort_keys=True)
            if key in seen or (keep and not keep(cfg, qtype)):
                return None
            seen.add(key)
            r = self.run(qtype, variant, build, cfg, x, arrays, want, wabs, nbytes)
            recs.append(r)
            return r

        if self.args.smoke:
            for cfg in SMOKE_STARTS[variant]:
                attempt(cfg)
            return recs
        best = start
        best_rec = attempt(start)
        for axis, vals in axes.items():
            for v in vals:
                if time.perf_counter() > deadline:
                    return recs
                cfg = dict(best, **{axis: v})
                r = attempt(cfg)
                if r is not None and score(r) < score(best_rec or {}):
                    best, best_rec = cfg, r
        return recs

    def case(self, qtype: str, rng: np.random.Generator, t_end: float, slots_left: int) -> int:
        n, k = self.shape = (SMOKE_SHAPE if self.args.smoke else SHAPE)
        w = make_weight(rng, qtype, n, k)
        x_np = rng.standard_normal(k).astype(np.float32)
        want, wabs = reference(w, qtype, x_np)
        x = jnp.asarray(x_np)
        nbytes = n * k // 32 * BYTES_PER_BLOCK[qtype]
        out = self.results[qtype] = {}

        def finish(variant, recs):
            good = [r for r in recs if r.get("ok")]
            key = (lambda r: r["dev_us"]) if not self.interpret else (lambda r: r["rel_err"])
            best = min(good, key=key) if good else None
            out[variant] = dict(best=best, configs=recs)
            self.save()

        qd = (jnp.asarray(w["q"]), jnp.asarray(w["d"]))
        recs = [self.run(qtype, f"xla_{form}", build_xla, dict(form=form), x, qd, want, wabs,
                         nbytes) for form in XLA_FORMS]
        for r, form in zip(recs, XLA_FORMS):
            finish(f"xla_{form}", [r])
        for variant, (build, arrays_fn, start, axes, keep) in VARIANTS.items():
            deadline = time.perf_counter() + max(5.0, (t_end - time.perf_counter()) / slots_left)
            slots_left -= 1
            try:
                arrays = tuple(jnp.asarray(a) for a in arrays_fn(w, qtype, k))
            except Exception as e:  # noqa: BLE001 - e.g. the library module mid-edit
                print(f"  {qtype} {variant}: layout failed: {type(e).__name__}: {str(e)[:300]}")
                finish(variant, [])
                continue
            recs = self.sweep(qtype, variant, build, arrays, start, axes, keep, x, want, wabs,
                              nbytes, deadline)
            finish(variant, recs)
            del arrays
        return slots_left


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, Pallas interpret mode, tiny shapes")
    p.add_argument("--budget_s", type=float, default=290.0, help="seconds for all sweeps")
    p.add_argument("--calls", type=int, default=8, help="calls per program for dev_us")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for variants.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    dev = jax.devices()[0]
    hbm = float("nan") if args.smoke else hbm_read_gbps()
    print(f"{dev.device_kind}, jax {jax.__version__}; HBM read ceiling {hbm:.0f} GB/s", flush=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), card=dev.device_kind, jax=jax.__version__,
                shape=list(SMOKE_SHAPE if args.smoke else SHAPE), hbm_read_gbps=hbm,
                smoke=args.smoke)
    bench = Bench(args, hbm, meta)
    rng = np.random.default_rng(0)
    t_end = time.perf_counter() + args.budget_s
    slots = len(TYPES) * len(VARIANTS)
    for qtype in TYPES:
        slots = bench.case(qtype, rng, t_end, slots)

    print(f"\nbest per variant by dev ({'x'.join(map(str, bench.shape))}, M=1; dev = {args.calls}"
          f" calls a program, pipe = single calls pipelined, blocked = median of 20 blocked calls;"
          f" % of {hbm:.0f} GB/s)")
    for qtype, by_var in bench.results.items():
        for variant, res in by_var.items():
            b = res["best"]
            if b is None:
                print(f"{qtype} {variant:16s} no passing config")
                continue
            if args.smoke:
                print(f"{qtype} {variant:16s} {_short(b['cfg']):40s} err {b['rel_err']:.1e}")
                continue
            print(f"{qtype} {variant:16s} dev {b['dev_us']:6.1f} us {b['dev_gbps']:5.0f} GB/s"
                  f" {b['dev_pct_hbm']:5.1f}% | pipe {b['pipe_pct_hbm']:5.1f}%"
                  f" | blocked {b['pct_hbm']:5.1f}% | err {b['rel_err']:.1e} | {_short(b['cfg'])}")
    meta["wall_s"] = time.perf_counter() - t0
    bench.save()
    print(f"wall {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
