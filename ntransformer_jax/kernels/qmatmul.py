"""Fused dequantize + matrix product for prefill, on tensor cores: y[M, N] = x[M, K] @ W[N, K]^T.

W stays quantized, in `qmatvec`'s repacked layout (`qmatvec.repack`; the module docstring there
has the table). The grid is (M / block_m, N / block_n), M fastest, so the programs running at one
time share a weight tile and fetch it from L2. Each program walks K in chunks of `block_k`
columns; per chunk it loads the packed weight tiles `[block_n, blocks, ...]`, turns them into
floats in registers with `qmatvec`'s unpack step, applies each sub-block's scale and offset
(value = scale * q - offset, the values of `quants.dequantize`), casts to the compute dtype
and adds `plgpu.dot(x_tile, w_tile.T)` to a float32 accumulator. The float matrix never exists
in memory.

Planes. A 4-bit byte holds two values that are not neighbours in K (Q4_0: element j and j + 16
of its block; Q4_K: sub-blocks 2c and 2c + 1; Q6_K: elements i and 64 + i of a half). Each kernel
step therefore dequantizes a "low" and a "high" plane into tiles `[block_n, block_k / 2]` and does
one `plgpu.dot` per plane; the wrapper permutes the columns of x into the same two planes (a copy of
x, which is small next to W). Q8_0 has one plane.

Exactness. `qmatvec`'s high-nibble values come out as 16 q; the 1/16 is folded into the
sub-block scale, which is exact (a power of two). A half `d` times a 6-bit scale times the
quant is exact in float32 except Q6_K's last multiply, which is done in `quants`' order
((d * sc) * q), so each dequantized value has at most one rounding and equals
`quants.dequantize` bit for bit, with or without fused multiply-adds. The only other roundings
are the cast to bfloat16 (when `dtype` is bfloat16) and the float32 accumulation.

Triton notes: every tile dimension is a power of two; the trailing axes of each dequantized
plane are merged by one reshape (`[block_n, blocks, ..., 16|32|64]` -> `[block_n, block_k /
planes]`); `plgpu.dot` (Triton's `tl.dot`) takes bf16 (tensor cores, f32 accumulation) or f32
at HIGHEST precision (IEEE, no TF32). It needs every dimension >= 16, hence block_m, block_n >=
16; the smallest block_k (one packed block) gives planes of 16 or more columns.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import gguf
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ntransformer_jax.errors import InputError
from ntransformer_jax.kernels import qmatvec as qm

T = gguf.GGMLQuantizationType
HIGHEST = lax.Precision.HIGHEST

MIN_BLOCK = 16  # plgpu.dot's smallest M and N tile
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# Tile sizes.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of one `qmatmul_packed` launch (static; part of the jit cache key).

    Attributes:
        block_m: x rows per program; a power of two >= 16 (M is padded to a multiple).
        block_n: output columns (W rows) per program; a power of two >= 16 dividing N.
        block_k: K columns per loop step; a power of two, a multiple of the type's packed block
            (32 values, 128 for Q6_K, 256 for Q4_K/Q5_K), dividing K.
        num_warps, num_stages: Triton launch options (ignored in interpret mode).
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def get_default(cls, qtype: gguf.GGMLQuantizationType, m_rows: int, n_rows: int,
                    n_cols: int) -> BlockSizes:
        """The default tiling for x [m_rows, n_cols] times an [n_rows, n_cols] matrix of `qtype`.

        Untuned (chosen without a GPU): 64 x 64 output tiles, block_m shrunk for short x, and
        K chunks of 128 values or one packed block, whichever is larger, shrunk to powers of two
        dividing the shape (`plan` rejects shapes where that falls below the minimum). Eight
        warps when a chunk of W has 16384 values or more.
        """
        fmt = _format(qtype)
        block_m = min(cls.block_m, max(MIN_BLOCK, 1 << max(m_rows - 1, 0).bit_length()))
        block_n = max(qm._pow2_divisor(n_rows, cls.block_n), MIN_BLOCK)
        block_k = max(qm._pow2_divisor(n_cols, max(cls.block_k, fmt.block)), fmt.block)
        num_warps = 8 if block_n * block_k >= 16384 else cls.num_warps
        return cls(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps)


# ---------------------------------------------------------------------------------------------
# Planes: the column permutation of x and the dequantized weight tiles that match it.
# ---------------------------------------------------------------------------------------------

class _Planes(NamedTuple):
    """How one type's values split into the planes that each get a `plgpu.dot`.

    x: x `[M, nb, block]` -> planes `[M, nb, ...]` (a permutation of each block's columns).
    w: `qmatvec`'s unpacked tiles `[block_n, blocks, ...]` -> dequantized planes
        `[block_n, blocks, ...]` f32 whose flattened columns line up with x's.
    """

    x: Callable[[jax.Array], tuple[jax.Array, ...]]
    w: Callable[..., tuple[jax.Array, ...]]


def _x_halves(inner: int) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    """x planes of a 4-bit type: runs of `inner` columns alternate between low and high."""
    def split(x):
        x = x.reshape(*x.shape[:2], -1, 2, inner)
        return x[..., 0, :], x[..., 1, :]
    return split


def _x_one(x):
    return (x,)


def _bc(s: jax.Array, v: jax.Array) -> jax.Array:
    """Scale `s` [block_n, blocks, ...] with unit axes appended to broadcast against `v`."""
    while s.ndim < v.ndim:
        s = s[..., None]
    return s


def _w_q8_0(q, d):
    return (_bc(d, q) * q,)


def _w_scaled(lo, hi16, d):
    """Q4_0, Q5_0: d * (q - z); qmatvec's high plane is 16 (q - z), so its scale is d / 16."""
    return _bc(d, lo) * lo, _bc(d * (1 / 16), hi16) * hi16


def _w_q4_1(lo, hi16, d, m):
    return _bc(d, lo) * lo + _bc(m, lo), _bc(d * (1 / 16), hi16) * hi16 + _bc(m, hi16)


def _w_k_nibbles(lo, hi16, d, dmin, sc_lo, sc_hi, mn_lo, mn_hi):
    """Q4_K, Q5_K: (d * sc) * q - (dmin * mn); planes [block_n, blocks, 4, 32], scales [.., 4]."""
    d, dmin = d[..., None], dmin[..., None]
    return (_bc(d * sc_lo, lo) * lo - _bc(dmin * mn_lo, lo),
            _bc(d * sc_hi * (1 / 16), hi16) * hi16 - _bc(dmin * mn_hi, hi16))


def _w_q6_k(lo, hi16, sc_lo, sc_hi, d):
    """Q6_K: (d * sc) * (q - 32); planes [block_n, blocks, 2, 2, 16], scales [.., 2, 2]."""
    d = d[..., None, None]
    return _bc(d * sc_lo, lo) * lo, _bc(d * sc_hi * (1 / 16), hi16) * hi16


_PLANES: dict[gguf.GGMLQuantizationType, _Planes] = {
    T.Q8_0: _Planes(_x_one, _w_q8_0),
    T.Q4_0: _Planes(_x_halves(16), _w_scaled),
    T.Q4_1: _Planes(_x_halves(16), _w_q4_1),
    T.Q5_0: _Planes(_x_halves(16), _w_scaled),
    T.Q4_K: _Planes(_x_halves(32), _w_k_nibbles),
    T.Q5_K: _Planes(_x_halves(32), _w_k_nibbles),
    T.Q6_K: _Planes(_x_halves(64), _w_q6_k),
}

SUPPORTED_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(_PLANES)
assert SUPPORTED_TYPES == qm.SUPPORTED_TYPES


def _format(qtype: object) -> qm._Format:
    try:
        return qm._format(qtype)
    except InputError:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise InputError(f"qmatmul has no kernel for type {qm._type_name(qtype)}"
                         f" (supported: {supported})") from None


def dequantize_planes(packed: tuple[jax.Array, ...],
                      qtype: gguf.GGMLQuantizationType) -> tuple[jax.Array, ...]:
    """The kernel's dequantization applied to whole packed arrays (for tests): f32 planes
    [N, K / planes], equal to `x_planes` of `quants.dequantize`'s [N, K] matrix."""
    fmt = _format(qtype)
    planes = _PLANES[T(qtype)].w(*fmt.unpack(*packed))
    return tuple(p.reshape(p.shape[0], -1) for p in planes)


def x_planes(x: jax.Array, qtype: gguf.GGMLQuantizationType) -> tuple[jax.Array, ...]:
    """x [M, K] -> the planes [M, K / planes] the kernel multiplies (columns permuted)."""
    fmt = _format(qtype)
    m, k = x.shape
    planes = _PLANES[T(qtype)].x(x.reshape(m, k // fmt.block, fmt.block))
    return tuple(p.reshape(m, -1) for p in planes)


# ---------------------------------------------------------------------------------------------
# The kernel.
# ---------------------------------------------------------------------------------------------

def _qmatmul_kernel(*refs, fmt: qm._Format, planes: _Planes, n_weights: int, blocks: int,
                    n_chunks: int, dtype: jnp.dtype, stacked: bool):
    """One program: the output tile [block_m, block_n], over all of K.

    refs: with `stacked`, first a [1] int32 layer index; then the packed weight arrays (tiles
    [block_n, K / block, ...], or [L, block_n, K / block, ...] of which the program reads the
    layer's), the x planes ([block_m, K / planes] each, in `dtype`), then o_ref: [block_m,
    block_n] f32.
    """
    lead = (slice(None),)
    if stacked:
        lead = (refs[0][0], slice(None))
        refs = refs[1:]
    w_refs, x_refs, o_ref = refs[:n_weights], refs[n_weights:-1], refs[-1]
    width = blocks * fmt.block // len(x_refs)  # plane columns per chunk
    precision = HIGHEST if dtype == jnp.float32 else None

    def w_tile(ref, start):
        rest = (slice(None),) * (len(ref.shape) - len(lead) - 1)
        return ref[(*lead, pl.ds(start, blocks), *rest)]  # [block_n, blocks, ...]

    def step(i, acc):
        start = pl.multiple_of(i * blocks, blocks)
        col = pl.multiple_of(i * width, width)
        w_planes = planes.w(*fmt.unpack(*(w_tile(r, start) for r in w_refs)))
        for x_ref, w in zip(x_refs, w_planes, strict=True):
            w = w.reshape(w.shape[0], width).astype(dtype)  # [block_n, width]
            x = x_ref[:, pl.ds(col, width)]                  # [block_m, width]
            acc += plgpu.dot(x, w, trans_b=True, precision=precision)
        return acc

    o_ref[...] = lax.fori_loop(0, n_chunks, step, jnp.zeros(o_ref.shape, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Wrappers.
# ---------------------------------------------------------------------------------------------

def supports(qtype: object, m_rows: int, n_rows: int, n_cols: int) -> bool:
    """Whether `qmatmul_packed` takes x [m_rows, n_cols] times an [n_rows, n_cols] matrix of
    `qtype` with the default tiling."""
    try:
        plan(qtype, m_rows, n_rows, n_cols)
    except InputError:
        return False
    return True


class Plan(NamedTuple):
    """The launch geometry `qmatmul_packed` derives from the shapes (all static)."""

    block_sizes: BlockSizes
    grid: tuple[int, int]  # (M_padded / block_m, N / block_n)
    m_padded: int          # M rounded up to a multiple of block_m
    n_chunks: int          # K / block_k


def plan(qtype: gguf.GGMLQuantizationType, m_rows: int, n_rows: int, n_cols: int,
         block_sizes: BlockSizes | None = None) -> Plan:
    """Validate a launch of `m_rows` x rows against an [n_rows, n_cols] weight; no arrays needed.

    Raises:
        InputError: naming the first value that the kernel cannot handle.
    """
    fmt = _format(qtype)
    qtype = T(qtype)
    if m_rows < 1:
        raise InputError(f"x has {m_rows=} rows; qmatmul needs at least 1")
    qm._check_n_cols(qtype, n_cols)
    if n_rows <= 0:
        raise InputError(f"{n_rows=} must be positive")
    bs = block_sizes or BlockSizes.get_default(qtype, m_rows, n_rows, n_cols)
    for name in ("block_m", "block_n", "block_k"):
        value = getattr(bs, name)
        if not qm._is_pow2(value):
            raise InputError(f"{name}={value} must be a power of two")
        if name != "block_k" and value < MIN_BLOCK:
            raise InputError(f"{name}={value} must be at least {MIN_BLOCK}")
    if n_rows % bs.block_n:
        raise InputError(f"{n_rows=} must be a multiple of block_n={bs.block_n}")
    if bs.block_k % fmt.block:
        raise InputError(f"block_k={bs.block_k} must be a multiple of {fmt.block}"
                         f" for {qtype.name}")
    if n_cols % bs.block_k:
        raise InputError(f"{n_cols=} must be a multiple of block_k={bs.block_k}")
    m_padded = -(-m_rows // bs.block_m) * bs.block_m
    return Plan(block_sizes=bs, grid=(m_padded // bs.block_m, n_rows // bs.block_n),
                m_padded=m_padded, n_chunks=n_cols // bs.block_k)


def _launch(xs: tuple[jax.Array, ...], packed: tuple[jax.Array, ...], fmt: qm._Format,
            planes: _Planes, p: Plan, dtype: jnp.dtype, *, interpret: bool,
            layer: jax.Array | None = None) -> jax.Array:
    """Run the kernel on the x planes `xs` [Mp, K / planes]; returns [Mp, N] f32."""
    bs = p.block_sizes
    stacked = layer is not None
    n_rows = packed[0].shape[1 if stacked else 0]
    in_specs = ([qm._row_tile(a, bs.block_n, stacked, grid_axis=1) for a in packed]
                + [pl.BlockSpec((bs.block_m, a.shape[1]), lambda m, n: (m, 0)) for a in xs])
    operands = [*packed, *xs]
    if stacked:
        in_specs.insert(0, qm._whole(layer))
        operands.insert(0, layer)
    kernel = functools.partial(_qmatmul_kernel, fmt=fmt, planes=planes, n_weights=len(packed),
                               blocks=bs.block_k // fmt.block, n_chunks=p.n_chunks,
                               dtype=dtype, stacked=stacked)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((p.m_padded, n_rows), jnp.float32),
        grid=p.grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bs.block_m, bs.block_n), lambda m, n: (m, n)),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="qmatmul",
    )(*operands)


@functools.partial(jax.jit, static_argnames=("qtype", "n_cols", "block_sizes", "dtype",
                                             "interpret"))
def qmatmul_packed(x: jax.Array, packed: tuple[jax.Array, ...],
                   qtype: gguf.GGMLQuantizationType, n_cols: int, *,
                   block_sizes: BlockSizes | None = None, dtype=jnp.bfloat16,
                   interpret: bool = False, layer: jax.Array | None = None) -> jax.Array:
    """y = x @ W^T with W given as `qmatvec.repack(w_data, qtype)`, for many rows of x.

    Args:
        x: [M, K] float32, bfloat16 or float16, any M >= 1 (padded to a multiple of block_m).
        packed: `qmatvec.repack(w_data, qtype)`, arrays with N rows; with `layer`, the same for
            L matrices stacked on a new leading axis.
        qtype: the GGML type (static), one of SUPPORTED_TYPES.
        n_cols: K (static).
        block_sizes: tiling; `BlockSizes.get_default(qtype, M, N, K)` when None.
        dtype: the `plgpu.dot` inputs (static): bfloat16 (tensor cores; x and the dequantized W
            rounded to bfloat16) or float32 (IEEE float32 products).
        interpret: run the Pallas interpreter (CPU) instead of compiling for the GPU.
        layer: int32 scalar, which of the stacked matrices to use (read inside the kernel, so
            no per-layer slice of the weights is copied). Not range-checked: it may be traced.

    Returns:
        [M, N] float32, accumulated in float32.

    Raises:
        InputError: unsupported type or dtype, shapes, or tiling the kernel cannot take
            (raised while tracing, before anything runs).
    """
    fmt = _format(qtype)
    qtype = T(qtype)
    dtype = jnp.dtype(dtype)
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype.name} must be bfloat16 or float32")
    qm._check_x(x, n_cols)
    qm._check_n_cols(qtype, n_cols)
    n_rows = qm._check_packed(packed, qtype, n_cols, stacked=layer is not None)
    p = plan(qtype, x.shape[0], n_rows, n_cols, block_sizes)
    layer = qm._layer_index(layer)
    m_rows = x.shape[0]
    x = jnp.pad(x, ((0, p.m_padded - m_rows), (0, 0)))
    xs = tuple(a.astype(dtype) for a in x_planes(x, qtype))  # [Mp, K / planes] each
    out = _launch(xs, tuple(packed), fmt, _PLANES[qtype], p, dtype, interpret=interpret,
                  layer=layer)
    return out[:m_rows]  # [M, N]


def qmatmul_reference(x: jax.Array, packed: tuple[jax.Array, ...],
                      qtype: gguf.GGMLQuantizationType, n_cols: int, *, dtype=jnp.bfloat16,
                      layer: jax.Array | None = None) -> jax.Array:
    """Plain-jnp `qmatmul_packed`: `qmatvec.dequantize_packed`, both operands rounded to
    `dtype`, then an einsum accumulated in float32 at HIGHEST precision. Materializes W."""
    if layer is not None:
        packed = tuple(a[layer] for a in packed)
    w = qm.dequantize_packed(packed, qtype, n_cols).astype(dtype)  # [N, K]
    x = jnp.asarray(x).astype(dtype)
    return jnp.einsum("mk,nk->mn", x, w, precision=HIGHEST, preferred_element_type=jnp.float32)
