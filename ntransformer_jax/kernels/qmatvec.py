"""Fused dequantize + matrix-vector product for decode: y[M, N] = x[M, K] @ W[N, K]^T.

W stays quantized. Each Pallas program owns `block_n` output rows, walks K in chunks of `block_k`
columns, dequantizes the chunk's blocks in registers and multiplies them into f32 accumulators;
the float matrix never exists in memory.

Layout. GGUF blocks are 18, 20, 22, 34, 144 or 210 bytes wide, and the Pallas Triton lowering
only loads arrays whose sizes are powers of two. So `repack` splits each tensor once, at load
time, into separate field arrays ("planes") with rows of N: quants, scales, high bits. Every
tile loaded from them is [block_n, power of two]. The repack moves bytes only (half fields stay
float16 bit patterns; Q4_K's packed 6-bit scales are unpacked to one byte each), so the kernel
dequantizes exactly what `quants.dequantize` does. Sizes against the GGUF bytes:

| type | repacked arrays (each [N, ...])                                      | bytes per 256 values |
| ---- | -------------------------------------------------------------------- | -------------------- |
| Q8_0 | qs int8 K; d f16 K/32                                                 | 272 = GGUF           |
| Q4_0 | qs uint8 K/2; d f16 K/32                                              | 144 = GGUF           |
| Q4_1 | qs uint8 K/2; d, m f16 K/32                                           | 160 = GGUF           |
| Q5_0 | qs uint8 K/2; d f16 K/32; qh int32 K/32                               | 176 = GGUF           |
| Q4_K | qs uint8 K/2; d, dmin f16 K/256; sc/mn of even and odd sub-blocks K/64 | 148 = GGUF 144 + 2.8% |
| Q6_K | ql uint8 K/2; qh uint8 K/4; sc of low and high plane int8 K/32; d K/256 | 210 = GGUF           |

Nibble order. A 4-bit byte holds two values that are not neighbours in K (Q4_0: element j and
j + 16 of its block). Instead of interleaving them in registers (no gathers in Triton), the
wrapper permutes x, which is tiny: it splits x into two "planes", x_lo[p] and x_hi[p] = the x
values that the low and high nibble of quant byte p multiply, and the kernel computes
sum_p w_lo[p] * x_lo[p] + w_hi[p] * x_hi[p]. Q8_0 has one plane, x itself.

Triton notes: every tensor in the kernel has power-of-two sizes (M is padded to 1, 2, 4 or 8);
bits are unpacked with shifts and masks on int32; scales are broadcast over their block with
broadcast + reshape (no gathers, no slicing of register values); the K loop is a `fori_loop`
inside the kernel because Triton grid programs cannot accumulate into a shared output, and a
K-split (`split_k`) gives each program a slice of K and writes partial sums that the wrapper adds.
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

from ntransformer_jax import quants
from ntransformer_jax.errors import InputError

T = gguf.GGMLQuantizationType
HIGHEST = lax.Precision.HIGHEST

MAX_ROWS = 8  # M, the number of x rows (tokens) one call serves


# ---------------------------------------------------------------------------------------------
# Tile sizes.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of one `qmatvec` launch (static; part of the jit cache key).

    Attributes:
        block_n: output rows per program; a power of two dividing N.
        block_k: K columns per loop step; a power of two, a multiple of the type's block size
            (32, or 256 for K-quants), dividing K / split_k.
        split_k: programs sharing one row tile, each over K / split_k columns; their partial
            sums are added by the wrapper. Raises the program count for short matrices.
        num_warps, num_stages: Triton launch options (ignored in interpret mode).
    """

    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def get_default(cls, qtype: gguf.GGMLQuantizationType, n_rows: int,
                    n_cols: int) -> BlockSizes:
        """The default tiling for an [n_rows, n_cols] matrix of `qtype` (untuned so far).

        Takes the largest power of two up to 32 rows and 256 columns that divides the shape
        (`qmatvec` rejects shapes where that falls below the minimum), then splits K until there
        are about 256 programs, enough to fill an H100's 132 SMs twice.
        """
        fmt = _format(qtype)
        block_n = max(_pow2_divisor(n_rows, cls.block_n), MIN_BLOCK_N)
        block_k = max(_pow2_divisor(n_cols, cls.block_k), fmt.k_align)
        split_k = 1
        while (n_rows // block_n * split_k < TARGET_PROGRAMS
               and n_cols % (2 * split_k * block_k) == 0):
            split_k *= 2
        return cls(block_n=block_n, block_k=block_k, split_k=split_k)


MIN_BLOCK_N = 8        # smaller row tiles waste most of each load; such N is rejected instead
TARGET_PROGRAMS = 256  # programs per launch that `get_default` aims for with split_k


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap dividing n (1 if n is odd)."""
    d = 1
    while d < cap and n % (2 * d) == 0:
        d *= 2
    return d


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ---------------------------------------------------------------------------------------------
# Formats: repack (load time, XLA) and in-register dequantization (inside the kernel).
# ---------------------------------------------------------------------------------------------

def _expand(v: jax.Array, g: int) -> jax.Array:
    """Repeat each column of `v [R, G]` g times: `[R, G * g]` (a per-block scale over its block)."""
    r, n = v.shape
    return jnp.broadcast_to(v[:, :, None], (r, n, g)).reshape(r, n * g)


def _f32(v: jax.Array) -> jax.Array:
    return v.astype(jnp.float32)


def _i32(v: jax.Array) -> jax.Array:
    return v.astype(jnp.int32)


class _Format(NamedTuple):
    """How one GGML type is repacked and dequantized.

    `per_col[i]` is how many K values share one column of packed array i, so a K-chunk of
    `block_k` values is `block_k // per_col[i]` columns of it. `plane_width` w: x is split into
    planes by `x.reshape(M, K // (2w), 2, w)` (low nibbles take index 0, high nibbles index 1);
    None for a single plane. `split` maps blocks `[N, n_blocks, type_size]` uint8 to the packed
    arrays; `dequant` maps their tiles to one f32 weight tile `[block_n, block_k / planes]` per
    plane, in plane order.
    """

    k_align: int
    per_col: tuple[int, ...]
    plane_width: int | None
    split: Callable[[jax.Array], tuple[jax.Array, ...]]
    dequant: Callable[..., tuple[jax.Array, ...]]

    @property
    def planes(self) -> int:
        return 1 if self.plane_width is None else 2


def _half(field: jax.Array) -> jax.Array:
    """Little-endian 2-byte fields `[N, nb, 2]` as float16 `[N, nb]` (bit pattern kept)."""
    return lax.bitcast_convert_type(field, jnp.float16)


def _rows(v: jax.Array) -> jax.Array:
    """`[N, nb, w]` -> `[N, nb * w]`."""
    return v.reshape(v.shape[0], -1)


def _nibbles(q: jax.Array) -> tuple[jax.Array, jax.Array]:
    q = _i32(q)
    return q & 0xF, q >> 4


# Q8_0, 34-byte blocks `half d; int8 qs[32]`; y = qs * d.
def _split_q8_0(b):
    return _rows(lax.bitcast_convert_type(b[..., 2:], jnp.int8)), _half(b[..., 0:2])


def _dequant_q8_0(qs, d):
    return (_f32(qs) * _expand(_f32(d), 32),)


# Q4_0, 18-byte blocks `half d; uint8 qs[16]`: low nibble of qs[j] is element j, high nibble
# element j + 16; y = d * (q - 8).
def _split_q4_0(b):
    return _rows(b[..., 2:]), _half(b[..., 0:2])


def _dequant_q4_0(qs, d):
    d = _expand(_f32(d), 16)
    lo, hi = _nibbles(qs)
    return d * _f32(lo - 8), d * _f32(hi - 8)


# Q4_1, 20-byte blocks `half d; half m; uint8 qs[16]`; nibbles as Q4_0; y = d * q + m.
def _split_q4_1(b):
    return _rows(b[..., 4:]), _half(b[..., 0:2]), _half(b[..., 2:4])


def _dequant_q4_1(qs, d, m):
    d, m = _expand(_f32(d), 16), _expand(_f32(m), 16)
    lo, hi = _nibbles(qs)
    return d * _f32(lo) + m, d * _f32(hi) + m


# Q5_0, 22-byte blocks `half d; uint8 qh[4]; uint8 qs[16]`: nibbles as Q4_0, bit j of the
# little-endian word qh is bit 4 of element j; y = d * (q - 16).
def _split_q5_0(b):
    return _rows(b[..., 6:]), _half(b[..., 0:2]), lax.bitcast_convert_type(b[..., 2:6], jnp.int32)


def _dequant_q5_0(qs, d, qh):
    rows, nb = qh.shape
    j = lax.broadcasted_iota(jnp.int32, (rows, nb, 16), 2)
    qh = jnp.broadcast_to(qh[:, :, None], (rows, nb, 16))
    h_lo = ((qh >> j) & 1).reshape(rows, nb * 16)
    h_hi = ((qh >> (j + 16)) & 1).reshape(rows, nb * 16)
    d = _expand(_f32(d), 16)
    lo, hi = _nibbles(qs)
    return d * _f32((lo | (h_lo << 4)) - 16), d * _f32((hi | (h_hi << 4)) - 16)


# Q4_K, 144-byte super-blocks `half d; half dmin; uint8 scales[12]; uint8 qs[128]`. Byte chunk c
# (32 bytes) holds sub-block 2c in its low nibbles and 2c + 1 in its high nibbles; so the low
# plane sees the even sub-blocks, the high plane the odd ones. y = (d * sc) * q - (dmin * mn).
def _split_q4_k(b):
    sc, mn = quants._k_scale_min(b[..., 4:16])  # [N, nb, 8] uint8 each
    return (_rows(b[..., 16:]), _half(b[..., 0:2]), _half(b[..., 2:4]),
            _rows(sc[..., 0::2]), _rows(sc[..., 1::2]), _rows(mn[..., 0::2]), _rows(mn[..., 1::2]))


def _dequant_q4_k(qs, d, dmin, sc_lo, sc_hi, mn_lo, mn_hi):
    d, dmin = _expand(_f32(d), 4), _expand(_f32(dmin), 4)  # [R, sub-blocks per plane]
    planes = []
    for q, sc, mn in zip(_nibbles(qs), (sc_lo, sc_hi), (mn_lo, mn_hi)):
        dl, ml = _expand(d * _f32(sc), 32), _expand(dmin * _f32(mn), 32)
        planes.append(dl * _f32(q) - ml)
    return tuple(planes)


# Q6_K, 210-byte super-blocks `uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d`. Half h,
# nibble n, byte i of ql[64h:64h+64] is element 128h + 64n + i; its high 2 bits are bit pair
# 2n + i // 32 of qh[32h + i % 32]. Sub-blocks of 16 with int8 scales; y = (d * sc) * (q - 32).
# Low plane p = 64h + 32a + i' (a = i // 32) holds element 128h + 32a + i', sub-block
# 8h + 2a + i' // 16; the high plane adds 64 to the element and 4 to the sub-block.
def _split_q6_k(b):
    n, nb = b.shape[:2]
    sc = lax.bitcast_convert_type(b[..., 192:208], jnp.int8).reshape(n, nb, 2, 2, 4)  # [.., h, n, 4]
    return (_rows(b[..., 0:128]), _rows(b[..., 128:192]), _rows(sc[:, :, :, 0]),
            _rows(sc[:, :, :, 1]), _half(b[..., 208:210]))


def _dequant_q6_k(ql, qh, sc_lo, sc_hi, d):
    rows, w = qh.shape  # w = 64 per super-block
    qh = jnp.broadcast_to(_i32(qh).reshape(rows, w // 32, 1, 32), (rows, w // 32, 2, 32))
    shift = 2 * lax.broadcasted_iota(jnp.int32, qh.shape, 2)  # bit pair a of a low-plane byte
    h_lo = ((qh >> shift) & 3).reshape(rows, 2 * w)
    h_hi = ((qh >> (shift + 4)) & 3).reshape(rows, 2 * w)
    d = _expand(_f32(d), 8)
    planes = []
    for q, h, sc in zip(_nibbles(ql), (h_lo, h_hi), (sc_lo, sc_hi)):
        planes.append(_expand(d * _f32(sc), 16) * _f32((q | (h << 4)) - 32))
    return tuple(planes)


_FORMATS: dict[gguf.GGMLQuantizationType, _Format] = {
    T.Q8_0: _Format(32, (1, 32), None, _split_q8_0, _dequant_q8_0),
    T.Q4_0: _Format(32, (2, 32), 16, _split_q4_0, _dequant_q4_0),
    T.Q4_1: _Format(32, (2, 32, 32), 16, _split_q4_1, _dequant_q4_1),
    T.Q5_0: _Format(32, (2, 32, 32), 16, _split_q5_0, _dequant_q5_0),
    T.Q4_K: _Format(256, (2, 256, 256, 64, 64, 64, 64), 32, _split_q4_k, _dequant_q4_k),
    T.Q6_K: _Format(256, (2, 4, 32, 32, 256), 64, _split_q6_k, _dequant_q6_k),
}

SUPPORTED_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(_FORMATS)


def _type_name(qtype: object) -> str:
    try:
        return T(qtype).name
    except ValueError:
        return f"#{qtype}"


def _format(qtype: object) -> _Format:
    try:
        return _FORMATS[T(qtype)]
    except (ValueError, KeyError):
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise InputError(
            f"qmatvec has no kernel for type {_type_name(qtype)} (supported: {supported})"
        ) from None


# ---------------------------------------------------------------------------------------------
# Repack.
# ---------------------------------------------------------------------------------------------

def _check_weight(w_data: jax.Array, qtype: gguf.GGMLQuantizationType, n_cols: int) -> None:
    block_size, _ = quants.block_geometry(qtype)
    if n_cols <= 0 or n_cols % block_size:
        raise InputError(f"{n_cols=} must be a positive multiple of {block_size}"
                         f" (the {qtype.name} block size)")
    if w_data.ndim != 2 or w_data.dtype != jnp.uint8:
        raise InputError(f"w_data must be uint8 [N, row_bytes], got {w_data.dtype}"
                         f" {list(w_data.shape)}")
    need = quants.row_bytes(qtype, n_cols)
    if w_data.shape[1] != need:
        raise InputError(f"{n_cols=} needs {need} bytes per {qtype.name} row,"
                         f" but w_data rows have {w_data.shape[1]}")


def repack(w_data: jax.Array, qtype: gguf.GGMLQuantizationType,
           n_cols: int | None = None) -> tuple[jax.Array, ...]:
    """Split GGUF rows into the kernel's planar layout (see the module docstring's table).

    Run it once when a weight is loaded, not per call: it reads and writes the whole matrix.

    Args:
        w_data: uint8 [N, row_bytes], rows of GGUF blocks as `quants.dequantize` takes them.
        qtype: the GGML type; one of SUPPORTED_TYPES.
        n_cols: K, values per row; derived from the row width when None.

    Returns:
        The packed arrays, each [N, K / per-column values], in the order `qmatvec_packed` takes.
        Same total bytes as `w_data` except Q4_K (+2.8%: 6-bit scales and mins get a byte each).

    Raises:
        InputError: unsupported type or a row width that is not whole blocks of `n_cols` values.
    """
    fmt = _format(qtype)
    qtype = T(qtype)
    block_size, type_size = quants.block_geometry(qtype)
    w_data = jnp.asarray(w_data)
    if n_cols is None:
        n_cols = w_data.shape[-1] // type_size * block_size
    _check_weight(w_data, qtype, n_cols)
    blocks = w_data.reshape(w_data.shape[0], n_cols // block_size, type_size)
    return fmt.split(blocks)


# ---------------------------------------------------------------------------------------------
# The kernel.
# ---------------------------------------------------------------------------------------------

def _qmatvec_kernel(x_ref, *refs, fmt: _Format, block_k: int, n_chunks: int, m_rows: int):
    """One program: rows [block_n] of the output, over chunks [k0, k0 + n_chunks) of K.

    x_ref: [P, Mp, K / P] f32, x split into planes. refs: the packed weight arrays, each
    [block_n, K / per_col], then o_ref: [Mp, block_n] f32 partial sums of this K-split.
    """
    *w_refs, o_ref = refs
    block_n = o_ref.shape[-1]
    k_plane = block_k // fmt.planes
    chunk0 = pl.program_id(1) * n_chunks

    def step(i, acc):
        c = chunk0 + i
        tiles = []
        for ref, per_col in zip(w_refs, fmt.per_col):
            width = block_k // per_col
            tiles.append(ref[:, pl.ds(pl.multiple_of(c * width, width), width)])
        weights = fmt.dequant(*tiles)  # planes of [block_n, k_plane] f32
        acc = list(acc)
        for p, w in enumerate(weights):
            start = pl.multiple_of(c * k_plane, k_plane)
            for m in range(m_rows):
                xm = x_ref[p, m, pl.ds(start, k_plane)]  # [k_plane]
                acc[m] = acc[m] + jnp.sum(w * xm[None, :], axis=1)
        return tuple(acc)

    zeros = tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(m_rows))
    acc = lax.fori_loop(0, n_chunks, step, zeros)
    for m in range(m_rows):
        o_ref[m, :] = acc[m]


# ---------------------------------------------------------------------------------------------
# Wrappers.
# ---------------------------------------------------------------------------------------------

class Plan(NamedTuple):
    """The launch geometry `qmatvec` derives from the shapes (all static)."""

    block_sizes: BlockSizes
    grid: tuple[int, int]  # (N / block_n row tiles, split_k)
    m_padded: int          # M rounded up to a power of two
    n_chunks: int          # K chunks per program


def plan(qtype: gguf.GGMLQuantizationType, m_rows: int, n_rows: int, n_cols: int,
         block_sizes: BlockSizes | None = None) -> Plan:
    """Validate a launch of `m_rows` x rows against an [n_rows, n_cols] weight; no arrays needed.

    Raises:
        InputError: naming the first value that the kernel cannot handle.
    """
    fmt = _format(qtype)
    qtype = T(qtype)
    block_size, _ = quants.block_geometry(qtype)
    if not 1 <= m_rows <= MAX_ROWS:
        raise InputError(f"x has {m_rows=} rows; qmatvec serves 1 to {MAX_ROWS} (use a matmul)")
    if n_cols <= 0 or n_cols % block_size:
        raise InputError(f"{n_cols=} must be a positive multiple of {block_size}"
                         f" (the {qtype.name} block size)")
    if n_rows <= 0:
        raise InputError(f"{n_rows=} must be positive")
    bs = block_sizes or BlockSizes.get_default(qtype, n_rows, n_cols)
    for name in ("block_n", "block_k", "split_k"):
        value = getattr(bs, name)
        if not _is_pow2(value):
            raise InputError(f"{name}={value} must be a power of two")
    if bs.block_n < MIN_BLOCK_N:
        raise InputError(f"block_n={bs.block_n} must be at least {MIN_BLOCK_N}")
    if n_rows % bs.block_n:
        raise InputError(f"{n_rows=} must be a multiple of block_n={bs.block_n}")
    if bs.block_k % fmt.k_align:
        raise InputError(f"block_k={bs.block_k} must be a multiple of {fmt.k_align}"
                         f" for {qtype.name}")
    if n_cols % (bs.split_k * bs.block_k):
        raise InputError(f"{n_cols=} must be a multiple of split_k * block_k"
                         f" = {bs.split_k} * {bs.block_k}")
    return Plan(block_sizes=bs, grid=(n_rows // bs.block_n, bs.split_k),
                m_padded=1 << (m_rows - 1).bit_length(),
                n_chunks=n_cols // (bs.split_k * bs.block_k))


def _x_planes(x: jax.Array, fmt: _Format, m_padded: int) -> jax.Array:
    """x [M, K] -> [P, Mp, K / P] f32: zero rows up to Mp, nibble planes split off."""
    m, k = x.shape
    x = jnp.pad(x.astype(jnp.float32), ((0, m_padded - m), (0, 0)))
    if fmt.plane_width is None:
        return x[None]
    w = fmt.plane_width
    return jnp.moveaxis(x.reshape(m_padded, k // (2 * w), 2, w), 2, 0).reshape(2, m_padded, k // 2)


def _launch(xs: jax.Array, packed: tuple[jax.Array, ...], fmt: _Format, p: Plan, *,
            interpret: bool, out_init: jax.Array | None = None) -> jax.Array:
    """Run the kernel on x planes `xs`; returns the partial sums [split_k, Mp, N] f32.

    `out_init`, if given, is the output buffer's starting content (tests poison it with NaN).
    """
    bs = p.block_sizes
    n_rows = packed[0].shape[0]
    in_specs = [pl.BlockSpec(xs.shape, lambda n, s: (0, 0, 0))]
    in_specs += [pl.BlockSpec((bs.block_n, a.shape[1]), lambda n, s: (n, 0)) for a in packed]
    operands = [xs, *packed]
    aliases = {}
    if out_init is not None:
        in_specs.append(pl.BlockSpec((None, p.m_padded, bs.block_n), lambda n, s: (s, 0, n)))
        operands.append(out_init)
        aliases = {len(operands) - 1: 0}
    kernel = functools.partial(_qmatvec_kernel, fmt=fmt, block_k=bs.block_k,
                               n_chunks=p.n_chunks, m_rows=p.m_padded)
    if out_init is not None:
        kernel = _drop_arg(kernel, -2)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((bs.split_k, p.m_padded, n_rows), jnp.float32),
        grid=p.grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, p.m_padded, bs.block_n), lambda n, s: (s, 0, n)),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="qmatvec",
    )(*operands)


def _drop_arg(fn: Callable[..., None], index: int) -> Callable[..., None]:
    """`fn` with the positional argument at `index` removed (the aliased input buffer)."""
    def wrapped(*args):
        args = list(args)
        del args[index]
        return fn(*args)
    return wrapped


def _check_x(x: jax.Array, n_cols: int) -> None:
    if x.ndim != 2:
        raise InputError(f"x must be [M, K], got shape {list(x.shape)}")
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise InputError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[1] != n_cols:
        raise InputError(f"x has {x.shape[1]} columns but {n_cols=}")


@functools.partial(jax.jit, static_argnames=("qtype", "n_cols", "block_sizes", "interpret"))
def qmatvec_packed(x: jax.Array, packed: tuple[jax.Array, ...],
                   qtype: gguf.GGMLQuantizationType, n_cols: int, *,
                   block_sizes: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
    """y = x @ W^T with W given as `repack(w_data, qtype)`; the form to use in the engine.

    Args:
        x: [M, K] float32 or bfloat16, 1 <= M <= 8.
        packed: `repack(w_data, qtype)`, arrays with N rows.
        qtype: the GGML type (static).
        n_cols: K (static).
        block_sizes: tiling; `BlockSizes.get_default(qtype, N, K)` when None.
        interpret: run the Pallas interpreter (CPU) instead of compiling for the GPU.

    Returns:
        [M, N] float32.

    Raises:
        InputError: shapes, dtypes or tiling the kernel cannot take (before anything runs).
    """
    fmt = _format(qtype)
    qtype = T(qtype)
    _check_x(x, n_cols)
    n_rows = packed[0].shape[0]
    expect = [(n_rows, n_cols // c) for c in fmt.per_col]
    got = [tuple(a.shape) for a in packed]
    if got != expect:
        raise InputError(f"packed {qtype.name} arrays have shapes {got}, expected {expect}"
                         f" for {n_cols=} (pass the output of repack)")
    p = plan(qtype, x.shape[0], n_rows, n_cols, block_sizes)
    out = _launch(_x_planes(x, fmt, p.m_padded), packed, fmt, p, interpret=interpret)
    return out.sum(axis=0)[: x.shape[0]]  # [M, N]


def qmatvec(x: jax.Array, w_data: jax.Array, qtype: gguf.GGMLQuantizationType, n_cols: int, *,
            block_sizes: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
    """y[M, N] = x[M, K] @ W[N, K]^T, W dequantized block by block inside the kernel.

    Convenience form that repacks `w_data` on every call (an extra pass over the weight);
    the engine should `repack` once at load time and call `qmatvec_packed`.

    Args:
        x: [M, K] float32 or bfloat16, 1 <= M <= 8 (decode tokens).
        w_data: uint8 [N, row_bytes], GGUF blocks as `quants.dequantize` takes them.
        qtype: the GGML type, one of SUPPORTED_TYPES.
        n_cols: K.
        block_sizes: tiling; `BlockSizes.get_default(qtype, N, K)` when None.
        interpret: run the Pallas interpreter (CPU) instead of compiling for the GPU.

    Returns:
        [M, N] float32, accumulated in float32.

    Raises:
        InputError: unsupported type, mismatched shapes, M out of range, N not a multiple of
            block_n, K not a multiple of split_k * block_k, and so on; raised before launch.
    """
    _format(qtype)
    qtype = T(qtype)
    x, w_data = jnp.asarray(x), jnp.asarray(w_data)
    _check_x(x, n_cols)
    _check_weight(w_data, qtype, n_cols)
    plan(qtype, x.shape[0], w_data.shape[0], n_cols, block_sizes)  # fail before repacking
    return qmatvec_packed(x, repack(w_data, qtype, n_cols), qtype, n_cols,
                          block_sizes=block_sizes, interpret=interpret)


def qmatvec_reference(x: jax.Array, w_data: jax.Array, qtype: gguf.GGMLQuantizationType,
                      n_cols: int) -> jax.Array:
    """Plain-jnp `qmatvec`: `quants.dequantize` then an f32 einsum at HIGHEST precision.

    Materializes W in float32; for tests and as the fallback for types without a kernel.
    """
    w = quants.dequantize(jnp.asarray(w_data), qtype, n_cols)  # [N, K]
    return jnp.einsum("mk,nk->mn", jnp.asarray(x).astype(jnp.float32), w, precision=HIGHEST)
