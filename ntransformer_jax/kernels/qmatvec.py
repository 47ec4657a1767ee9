"""Fused dequantize + matrix-vector product for decode: y[M, N] = x[M, K] @ W[N, K]^T.

W stays quantized. Each Pallas program owns `block_n` output rows and walks K in chunks of
`block_k` columns; per chunk it turns the quantized integers into floats in registers, multiplies
them with x, sums each sub-block (the values that share one scale) and only then applies the
sub-block's scale and offset. The float matrix never exists in memory.

Layout. GGUF blocks are 18, 20, 22, 34, 144, 176 or 210 bytes wide, and the Pallas Triton
lowering only loads power-of-two tiles. So `repack` splits each tensor once, at load time, into
field arrays whose axis 0 is the row (N) and axis 1 the block along K; the remaining axes are
powers of two. Tiles `[block_n, blocks per chunk, ...]` are then plain strided loads. Sizes against
the GGUF bytes:

| type | repacked arrays (axis 1 = blocks of B values)                              | bytes per 256 values |
| ---- | -------------------------------------------------------------------------- | -------------------- |
| Q8_0 | B=32: qs [8] int32 words (the 32 int8 bytes), d f16                        | 272 = GGUF           |
| Q4_0 | B=32: qs [4] int32 words (the 16 bytes), d f16                             | 144 = GGUF           |
| Q4_1 | B=32: qs [4] int32 words, d f16, m f16                                     | 160 = GGUF           |
| Q5_0 | B=32: qs [4] words, d f16, qh int32 (its bits reordered, `_split_q5_0`)     | 176 = GGUF           |
| Q4_K | B=256: qs [4, 8] words; d, dmin f16; scales, mins of even/odd sub-blocks [4] | 148 = GGUF 144 + 2.8% |
| Q5_K | B=256: as Q4_K plus qh [8] words                                           | 180 = GGUF 176 + 2.3% |
| Q6_K | B=128: ql [2, 2, 4] words, qh [2, 4] words, scales of low/high nibbles [2, 2], d f16 | 212 = GGUF 210 + 1.0% |

(K-quants grow because their packed 6-bit scales get a byte each, and Q6_K's d is stored once per
half super-block.) The repack moves bytes only; `dequantize_packed` undoes it bit for bit.

Arithmetic, integer path (every type; the default, `BlockSizes.int_dot`). Each
program quantizes the 32-value blocks of x it reads to 16 bits (two int8 digits; `fuse_x`, the
default: no XLA kernel runs before the launch, which on small matrices costs as much as the
matrix itself; with `fuse_x=False` the wrapper does it once) and multiplies them
with the quant bytes in `dp4a` instructions, 4 products a instruction, exactly in int32; one
float multiply a block applies both scales. Q4_0's K loop issues 1.8 thread instructions a
weight value instead of the float path's 8.1 (Q8_0: 1.7 against 11.9; sm_90 SASS, M = 1,
`benchmarks/qmatmul_sass.py --kernel qmatvec`), so the kernel is no longer bound by issue; per
weight byte, Q5_0 takes 4.4 instead of 10.8 and Q6_K 5.1 instead of 11.8 (16 x 1024 tiles, 4
warps). x's rounding,
|x - x'| <= max|x_block| / 65278, is the one error the float path does not have. See "The
integer path" below.

Arithmetic, float path (`int_dot=False`, and the prefill kernel's unpack). A 4-bit byte holds two values
that are not neighbours in K (Q4_0: element j and j + 16 of its block). The kernel keeps them apart as a "low" and a "high" plane and the wrapper
splits x the same way, which is cheap (x is one row per token). Integers become floats without
conversion instructions (a quarter-rate unit on NVIDIA GPUs): OR-ing a value v < 2^23 into the bit
pattern 0x4B000000 gives the float 2^23 + v, and one subtraction, which also removes the type's
zero point (8 for Q4_0), leaves v - z exactly. The high nibble is masked in place (16 v), and
the high x plane is divided by 16 instead, which is exact. Offsets that are not constants (Q4_1's
m, the K-quants' mins) multiply the sub-block sums of x, which the wrapper computes once.

Triton notes: all tile sizes are powers of two (M is padded to 1, 2, 4 or 8); the K loop is a
`fori_loop` inside the kernel; a K-split (`split_k`) gives each program a slice of K and writes
partial sums that the wrapper adds, which raises the program count for short matrices.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import NamedTuple

import gguf
import jax
import numpy as np
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ntransformer_jax import quants
from ntransformer_jax.errors import InputError, NTransformerError, one_line

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
        block_k: K columns per loop step; a power of two, a multiple of the type's packed block
            (32 values, 128 for Q6_K, 256 for Q4_K/Q5_K), dividing K / split_k.
        split_k: programs sharing one row tile, each over K / split_k columns; their partial
            sums are added by the wrapper. Raises the program count for short matrices.
        num_warps, num_stages: Triton launch options (ignored in interpret mode).
        int_dot: take the integer path where the type has one (all of SUPPORTED_TYPES: x
            quantized to 16 bits a block, dp4a products; see "The integer path"); False:
            float products of the f32 x, exact.
        fuse_x: on the integer path, each program quantizes its own x tiles from the float x
            (no XLA kernels before the launch); False: the wrapper quantizes x first.
        prefetch: load chunk i + 1's weight tiles before computing chunk i (carried through
            the K loop: more registers, loads in flight during the arithmetic); `PREFETCH`
            turns it on in the default tiles.
    """

    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    int_dot: bool = True
    fuse_x: bool = True
    prefetch: bool = False

    @classmethod
    def get_default(cls, qtype: gguf.GGMLQuantizationType, n_rows: int,
                    n_cols: int, m_rows: int = 1, tuned: BlockSizes | None = None) -> BlockSizes:
        """The default tiling for an [n_rows, n_cols] matrix of `qtype` and `m_rows` x rows.

        A one-row launch of a shape in `SHAPE_TUNED` takes that tile (with `SHAPE_TILES`).
        Otherwise it starts from the type's tuned tile (`TUNED`, the fastest of a sweep on the 70B
        matrices; `TUNED_BATCHED` first for several x rows; or `tuned` where given: benchmarks
        try candidates this way), shrinks
        it to the largest powers of two that divide the shape (`qmatvec` rejects shapes where that
        falls below the minimum), then splits K while the launch has at most half of
        `TARGET_PROGRAMS` programs: short matrices need the split to keep enough loads in flight.
        x is quantized inside the kernel (`fuse_x`) as `_fuse_x` says.
        """
        fmt = _format(qtype)
        shaped = None if tuned else _shape_tuned(qtype, n_rows, n_cols, m_rows, glu=False)
        if shaped is not None:
            return shaped
        tuned = (tuned or (TUNED_BATCHED.get(T(qtype)) if m_rows > 1 else None)
                 or TUNED.get(T(qtype), cls()))
        tuned = dataclasses.replace(tuned, int_dot=INT_DOT, split_k=1,
                                    fuse_x=_fuse_x(qtype, m_rows, glu=False),
                                    prefetch=tuned.prefetch or PREFETCH)
        block_n = max(_pow2_divisor(n_rows, tuned.block_n), MIN_BLOCK_N)
        block_k = max(_pow2_divisor(n_cols, max(tuned.block_k, fmt.block)), fmt.block)
        split_k = 1
        target = TARGET_PROGRAMS.get(T(qtype), DEFAULT_TARGET_PROGRAMS)
        while n_rows // block_n * split_k * 2 <= target:
            if n_cols % (2 * split_k * block_k) == 0:
                split_k *= 2
            elif n_rows // block_n * split_k < MIN_PROGRAMS and block_k > fmt.block:
                block_k //= 2   # K has an odd factor (14336 = 7 x 2048): a smaller tile splits
            else:
                break
        return dataclasses.replace(tuned, block_n=block_n, block_k=block_k, split_k=split_k)


INT_DOT = True         # the default tiling takes the integer path; `self_test` turns it off
                       # (process-wide) where that path does not compile or run right
FUSE_X = True          # ... with x quantized inside the kernel; `self_test` likewise
# ... for launches of at most this many x rows. Each program quantizes every row of its x tiles
# again, so the cost grows with M while the weight work does not: at M = 8 the K loop issues
# 59 thread instructions a weight byte for Q4_K (16 x 1024 tile, 8 warps) with x quantized in
# the kernel against 25 with the wrapper's x (Q4_0 45 vs 16, Q8_0 8 x 512: 27 vs 13; offline
# sm_90 SASS, `benchmarks/qmatmul_sass.py --kernel qmatvec --m 8`), where one row costs 4.7.
# On an H100 at M = 8 the wrapper's x made the 70B glu launch 1.1-1.6x faster on every type
# (Q4_K 877 -> 540 us, Q8_0 567 -> 423; benchmarks/RESULTS.md, session 14).
FUSE_X_MAX_ROWS = 1
# ... except for these types' plain (not glu) launches, which were faster with x quantized in
# the kernel at M = 8 in the same measurement (Q4_1 down 253 vs 435 us, gate/up 228 vs 361;
# Q5_K down 434 vs 488, qkv 161 vs 188).
FUSE_X_BATCHED: frozenset = frozenset({T.Q4_1, T.Q5_K})
PREFETCH = False       # True: the default tiles load one chunk ahead (`BlockSizes.prefetch`;
                       # bit-identical; slower on most 70B and 8B launches on an H100, session 15)
MIN_BLOCK_N = 8        # smaller row tiles waste most of each load; such N is rejected instead
MIN_PROGRAMS = 256     # about two programs an SM: below it get_default trades block_k for split_k
DEFAULT_TARGET_PROGRAMS = 2048  # programs per launch that `get_default` aims for with split_k
# Types whose tuned tile is large enough that fewer programs keep the loads in flight (Q4_0's
# 32 x 2048 tile reads 36 KB an iteration: on the 70B gate/up matrix split_k 2 was 6% slower).
TARGET_PROGRAMS: dict[gguf.GGMLQuantizationType, int] = {T.Q4_0: 1024}


# Tiles for one x row on particular [N, K] shapes, where the type's tile (tuned on the 70B
# gate/up matrix) leaves time on the table: key (type, N, K, glu), glu meaning the gate/up
# kernel with N = 2 F. From `kernels_bench.py --descend` sweeps on an H100 (8B shapes: see
# benchmarks/RESULTS.md, session 11; 70B: session 15); e2e.py --shape_tiles off measures
# without them.
SHAPE_TUNED: dict[tuple[gguf.GGMLQuantizationType, int, int, bool], BlockSizes] = {
    (T.Q8_0, 4096, 4096, False): BlockSizes(block_n=8, block_k=2048, split_k=2, num_warps=8),
    (T.Q8_0, 6144, 4096, False): BlockSizes(block_n=16, block_k=512, split_k=2, num_stages=5),
    (T.Q8_0, 4096, 14336, False): BlockSizes(block_n=64, block_k=512, split_k=4, num_warps=16,
                                             num_stages=4),
    # 70B shapes, from a `kernels_bench.py --m 1 --descend q/o,down,qkv` sweep on an H100
    # (session 15; best against the type default: qkv 21.7 vs 23.6 us, q/o 15.8 vs 17.4, down
    # 64.2 vs 66.3). Gains under 3% (Q4_0 q/o and down) are left to the type default.
    (T.Q4_0, 10240, 8192, False): BlockSizes(block_n=16, block_k=2048, split_k=2, num_warps=8,
                                             num_stages=2),
    (T.Q4_K, 8192, 8192, False): BlockSizes(block_n=16, block_k=2048, split_k=1, num_warps=4,
                                            num_stages=2),
    (T.Q4_K, 8192, 28672, False): BlockSizes(block_n=16, block_k=2048, split_k=1, num_warps=4,
                                             num_stages=4),
    # The same sweep for Q8_0, Q5_K and Q6_K (session 16): kept where the tile beat the type
    # default both in the sweep and in a later on/off comparison with the clock warm (qkv 38.5
    # vs 41.0 us, 34.9 vs 36.8; q/o 29.0 vs 32.4). An unchanged launch moved by up to 9% between
    # those two runs: each gain is within one run's noise, but it was seen twice (RESULTS.md).
    (T.Q8_0, 10240, 8192, False): BlockSizes(block_n=8, block_k=512, split_k=4),
    (T.Q5_K, 10240, 8192, False): BlockSizes(block_n=16, block_k=2048, split_k=2, num_warps=4,
                                             num_stages=4),
    (T.Q6_K, 8192, 8192, False): BlockSizes(block_n=32, block_k=1024, split_k=2),
}
# Ranked ahead of the Q4_0 defaults by the session-11 8B sweep but not yet timed in e2e (8B Q4_0
# meets its target without them): qkv 6144 x 4096 BlockSizes(32, 1024, 1, 8 warps, 4 stages) and
# glu 28672 x 4096 BlockSizes(8, 2048, 1, 8 warps, 4 stages).
SHAPE_TILES = True     # False: `SHAPE_TUNED` is not consulted (read when a launch is traced)


def _fuse_x(qtype, m_rows: int, glu: bool) -> bool:
    """Whether a launch of `m_rows` x rows quantizes x inside the kernel (`BlockSizes.fuse_x`):
    `FUSE_X`, for at most `FUSE_X_MAX_ROWS` rows or a plain launch of a `FUSE_X_BATCHED` type."""
    return FUSE_X and (m_rows <= FUSE_X_MAX_ROWS or (not glu and T(qtype) in FUSE_X_BATCHED))


def _shape_tuned(qtype, n_rows: int, n_cols: int, m_rows: int, glu: bool) -> BlockSizes | None:
    """`SHAPE_TUNED`'s tile for this launch, or None; the process-wide paths (`INT_DOT`,
    `FUSE_X`, `PREFETCH`) as the type defaults take them."""
    bs = SHAPE_TUNED.get((T(qtype), n_rows, n_cols, glu)) if SHAPE_TILES and m_rows == 1 else None
    return None if bs is None else dataclasses.replace(bs, int_dot=bs.int_dot and INT_DOT,
                                                       fuse_x=bs.fuse_x and FUSE_X,
                                                       prefetch=bs.prefetch or PREFETCH)


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap dividing n (1 if n is odd)."""
    d = 1
    while d < cap and n % (2 * d) == 0:
        d *= 2
    return d


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ---------------------------------------------------------------------------------------------
# Formats: repack (load time, XLA) and the in-register arithmetic (inside the kernel).
# ---------------------------------------------------------------------------------------------

MAGIC = 0x4B000000   # bit pattern of the float32 2^23; OR-ing v < 2^23 into it gives 2^23 + v
TWO_23 = float(1 << 23)


def _int_float(bits: jax.Array, zero: float) -> jax.Array:
    """`bits - zero` as float32, for int32 `bits` in [0, 2^23): exact, no conversion unit."""
    return lax.bitcast_convert_type(bits | MAGIC, jnp.float32) - (TWO_23 + zero)


def _f32(v: jax.Array) -> jax.Array:
    return v.astype(jnp.float32)


def _i32(v: jax.Array) -> jax.Array:
    return v.astype(jnp.int32)


def _half(field: jax.Array) -> jax.Array:
    """Little-endian 2-byte fields `[..., 2]` uint8 as float16 `[...]` (bit pattern kept)."""
    return lax.bitcast_convert_type(field, jnp.float16)


def _bytes(v: jax.Array) -> jax.Array:
    """The inverse of `_half` (and of int32/int8 views): `[...]` -> `[..., itemsize]` uint8."""
    if v.dtype.itemsize == 1:
        return lax.bitcast_convert_type(v, jnp.uint8)[..., None]
    return lax.bitcast_convert_type(v, jnp.uint8)


def _cat(*fields: jax.Array) -> jax.Array:
    """Concatenate byte fields `[N, nb, w_i]` into blocks `[N, nb, sum w_i]`."""
    return jnp.concatenate(fields, axis=-1)


def _iota(shape: tuple[int, ...], axis: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _sum(v: jax.Array, axes: int = 1) -> jax.Array:
    """Sum over the last `axes` axes, one at a time (Triton reduces one axis per op)."""
    for _ in range(axes):
        v = jnp.sum(v, axis=-1)
    return v


class _Format(NamedTuple):
    """How one GGML type is repacked and multiplied.

    block: K values per step of axis 1 of every packed array.
    split: GGUF blocks `[N, nb, type_size]` uint8 -> the packed arrays (`repack`).
    join: the packed arrays -> GGUF blocks (`dequantize_packed`); `join(*split(b)) == b`.
    x_split: x `[M, K / block, block]` f32 -> the x arrays the kernel reads, `[M, K / block, ...]`.
    unpack: weight tiles `[block_n, blocks, ...]` -> the floats and scales shared by all x rows.
    dot: (unpacked, x tiles of one row) -> `[block_n, blocks]`: each block's share of y.
    int_x: the integer path's x arrays (`_x_int`), or None where the type has no such path.
    int_dot: (packed weight tiles, the int_x tiles of every row, interpret) -> one
        `[block_n, blocks]` f32 array per row: each block's share of y (integer dot products).
    fused_view: x `[M, K / block, block]` (any float dtype) -> the one array the kernel reads
        when it quantizes x itself (a reshape: no copy), or None where it cannot.
    fused_x: (that array's ref, row m, first block, blocks) -> the row's int_x tiles, computed
        in the kernel exactly as `int_x` computes them.
    """

    block: int
    split: Callable[[jax.Array], tuple[jax.Array, ...]]
    join: Callable[..., jax.Array]
    x_split: Callable[[jax.Array], tuple[jax.Array, ...]]
    unpack: Callable[..., tuple[jax.Array, ...]]
    dot: Callable[[tuple[jax.Array, ...], tuple[jax.Array, ...]], jax.Array]
    int_x: Callable[[jax.Array], tuple[jax.Array, ...]] | None = None
    int_dot: Callable[..., list[jax.Array]] | None = None
    fused_view: Callable[[jax.Array], jax.Array] | None = None
    fused_x: Callable[..., tuple[jax.Array, ...]] | None = None


def _x_nibble_planes(x):
    """Legacy 4/5-bit types: element j of a block pairs with j + 16 in one byte."""
    return x[..., :16], x[..., 16:] * (1 / 16)


# Words. Every type keeps its quant bytes as little-endian int32 words (word w holds
# bytes 4w .. 4w + 3 of the block), the unit the integer path's dp4a reads; the float path takes
# byte k of word w apart by a shift (value index 4w + k, so the trailing [words, 4] axes flatten
# to the block's byte order).
def _words(b):
    """uint8 `[N, nb, 4 n]` -> int32 `[N, nb, n]` (the same bytes)."""
    return lax.bitcast_convert_type(b.reshape(*b.shape[:-1], -1, 4), jnp.int32)


def _word_bytes(w):
    """The inverse of `_words`."""
    return lax.bitcast_convert_type(w, jnp.uint8).reshape(*w.shape[:-1], -1)


def _byte_planes(w):
    """int32 words `[..., n]` -> each word's bytes moved down to bit 0, `[..., n, 4]` (the higher
    bytes still above them: callers mask)."""
    return w[..., None] >> (8 * _iota((*w.shape, 4), w.ndim))


# Q8_0: 34-byte blocks `half d; int8 qs[32]`; y = d * qs. The int8 byte u flipped at bit 7 is
# qs + 128 in [0, 256).
def _split_q8_0(b):
    return _words(b[..., 2:]), _half(b[..., 0:2])


def _join_q8_0(qs, d):
    return _cat(_bytes(d), _word_bytes(qs))


def _x_q8_0(x):
    return (x.reshape(*x.shape[:2], 8, 4),)


def _unpack_q8_0(qs, d):
    return _int_float((_byte_planes(qs) & 0xFF) ^ 0x80, 128.0), _f32(d)


def _dot_q8_0(u, xs):
    q, d = u
    return d * _sum(q * xs[0][None], 2)


# Q4_0: 18-byte blocks `half d; uint8 qs[16]`: the low nibble of qs[j] is element j, the high
# nibble element j + 16; y = d * (q - 8).
def _split_q4_0(b):
    return _words(b[..., 2:]), _half(b[..., 0:2])


def _join_q4_0(qs, d):
    return _cat(_bytes(d), _word_bytes(qs))


def _x_word_planes(x):
    """x planes of the word-packed 4-bit types, `[M, nb, 4 words, 4 bytes]` each."""
    lo, hi = _x_nibble_planes(x)
    return lo.reshape(*lo.shape[:2], 4, 4), hi.reshape(*hi.shape[:2], 4, 4)


def _unpack_q4_0(qs, d):
    b = _byte_planes(qs)
    return _int_float(b & 0xF, 8.0), _int_float(b & 0xF0, 128.0), _f32(d)


def _dot_word_planes(u, xs):
    lo, hi, d = u[:3]
    return d * _sum(lo * xs[0][None] + hi * xs[1][None], 2)


# Q4_1: 20-byte blocks `half d; half m; uint8 qs[16]`; nibbles as Q4_0; y = d * q + m.
def _split_q4_1(b):
    return _words(b[..., 4:]), _half(b[..., 0:2]), _half(b[..., 2:4])


def _join_q4_1(qs, d, m):
    return _cat(_bytes(d), _bytes(m), _word_bytes(qs))


def _x_q4_1(x):
    return (*_x_word_planes(x), _sum(x))


def _unpack_q4_1(qs, d, m):
    b = _byte_planes(qs)
    return _int_float(b & 0xF, 0.0), _int_float(b & 0xF0, 0.0), _f32(d), _f32(m)


def _dot_q4_1(u, xs):
    return _dot_word_planes(u, xs) + u[3] * xs[2]


# Q5_0: 22-byte blocks `half d; uint8 qh[4]; uint8 qs[16]`: nibbles as Q4_0; bit j of the
# little-endian word qh is bit 4 of element j; y = d * (q - 16). The quant bytes are kept as
# words (as Q4_0's) and qh's bits are permuted once at load so that one shift and one mask put a
# word's four fifth bits into place: the bit of low element 4w + k moves to bit 8k + w, the bit
# of high element 16 + 4w + k to bit 8k + 4 + w.
def _q5_0_bit_positions() -> np.ndarray:
    """Where `repack` puts bit e of Q5_0's qh (e = the element index, 0..31)."""
    e = np.arange(32)
    w, k = (e % 16) // 4, e % 4
    return 8 * k + 4 * (e // 16) + w


def _permute_bits(v: jax.Array, to: np.ndarray) -> jax.Array:
    """int32 `v` with bit e moved to bit to[e] (a permutation of 0..31)."""
    bits = (lax.bitcast_convert_type(v, jnp.uint32)[..., None]
            >> jnp.arange(32, dtype=jnp.uint32)) & 1
    out = jnp.sum(bits << jnp.asarray(to, jnp.uint32), axis=-1, dtype=jnp.uint32)
    return lax.bitcast_convert_type(out, jnp.int32)


def _split_q5_0(b):
    qh = lax.bitcast_convert_type(b[..., 2:6], jnp.int32)
    return _words(b[..., 6:]), _half(b[..., 0:2]), _permute_bits(qh, _q5_0_bit_positions())


def _join_q5_0(qs, d, qh):
    qh = _permute_bits(qh, np.argsort(_q5_0_bit_positions()))
    return _cat(_bytes(d), _bytes(qh), _word_bytes(qs))


def _unpack_q5_0(qs, d, qh):
    b = _byte_planes(qs)                             # [block_n, blocks, 4 words, 4 bytes]
    h = qh[:, :, None, None]
    at = 8 * _iota(b.shape, 3) + _iota(b.shape, 2)   # 8k + w
    lo = (b & 0xF) | (((h >> at) & 1) << 4)
    hi = (b & 0xF0) | (((h >> (at + 4)) & 1) << 8)   # 16 x bit 4
    return _int_float(lo, 16.0), _int_float(hi, 256.0), _f32(d)


# K-quants with 4-bit nibbles (Q4_K, Q5_K): 256-value super-blocks of eight sub-blocks of 32
# with 6-bit scales and mins. Byte chunk c (32 bytes) holds sub-block 2c in its low nibbles and
# 2c + 1 in its high nibbles, so the low plane sees the even sub-blocks, the high plane the odd.
# y = (d * sc) * q - (dmin * mn).
def _k_scales(b):
    sc, mn = quants._k_scale_min(b[..., 4:16])  # [N, nb, 8] uint8 each
    return (_half(b[..., 0:2]), _half(b[..., 2:4]),
            sc[..., 0::2], sc[..., 1::2], mn[..., 0::2], mn[..., 1::2])


def _k_scales_bytes(d, dmin, sc_lo, sc_hi, mn_lo, mn_hi):
    """The inverse of `_k_scales`: `half d; half dmin; uint8 scales[12]`."""
    sc = jnp.stack([sc_lo, sc_hi], axis=-1).reshape(*sc_lo.shape[:-1], 8)
    mn = jnp.stack([mn_lo, mn_hi], axis=-1).reshape(*mn_lo.shape[:-1], 8)
    low = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    mid = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    high = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
    return _cat(_bytes(d), _bytes(dmin), low, mid, high)


def _x_k_planes(x):
    """x `[M, nb, 256]` -> low and high planes `[M, nb, 4, 8, 4]` (chunk, word, byte: the
    word-packed quant bytes' order) and their sub-block sums `[M, nb, 4]`."""
    x = x.reshape(*x.shape[:2], 4, 2, 8, 4)
    lo, hi = x[..., 0, :, :], x[..., 1, :, :]
    return lo, hi * (1 / 16), _sum(lo, 2), _sum(hi, 2)


def _dot_k_planes(u, xs):
    lo, hi, d, dmin, sc_lo, sc_hi, mn_lo, mn_hi = u
    x_lo, x_hi, sx_lo, sx_hi = xs
    s_lo, s_hi = _sum(lo * x_lo[None], 2), _sum(hi * x_hi[None], 2)   # [block_n, blocks, 4]
    t = (d[:, :, None] * (sc_lo * s_lo + sc_hi * s_hi)
         - dmin[:, :, None] * (mn_lo * sx_lo[None] + mn_hi * sx_hi[None]))
    return _sum(t)


# Q4_K: 144-byte super-blocks `half d; half dmin; uint8 scales[12]; uint8 qs[128]`.
def _split_q4_k(b):
    return (_words(b[..., 16:]).reshape(*b.shape[:2], 4, 8), *_k_scales(b))


def _join_q4_k(qs, *scales):
    return _cat(_k_scales_bytes(*scales), _word_bytes(qs.reshape(*qs.shape[:2], 32)))


def _unpack_q4_k(qs, *scales):
    b = _byte_planes(qs)                           # [block_n, blocks, 4, 8, 4]
    return (_int_float(b & 0xF, 0.0), _int_float(b & 0xF0, 0.0), *map(_f32, scales))


# Q5_K: 176-byte super-blocks `half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8
# qs[128]`; nibbles as Q4_K; bit 2c of qh[l] is bit 4 of chunk c's low value l, bit 2c + 1 of
# its high value.
def _split_q5_k(b):
    return (_words(b[..., 48:]).reshape(*b.shape[:2], 4, 8), _words(b[..., 16:48]), *_k_scales(b))


def _join_q5_k(qs, qh, *scales):
    return _cat(_k_scales_bytes(*scales), _word_bytes(qh),
                _word_bytes(qs.reshape(*qs.shape[:2], 32)))


def _unpack_q5_k(qs, qh, *scales):
    b = _byte_planes(qs)                           # [block_n, blocks, 4, 8, 4]
    h = _byte_planes(qh)[:, :, None]               # [block_n, blocks, 1, 8, 4]
    c2 = 2 * _iota(b.shape, 2)
    lo = (b & 0xF) | (((h << 4) >> c2) & 0x10)     # bit 2c -> bit 4
    hi = (b & 0xF0) | (((h << 7) >> c2) & 0x100)   # bit 2c + 1 -> bit 8 (16 x bit 4)
    return (_int_float(lo, 0.0), _int_float(hi, 0.0), *map(_f32, scales))


# Q6_K: 210-byte super-blocks `uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d`, packed per
# half h (128 values). Byte i = 32a + 16b + j of the half's ql[64] holds element 32a + 16b + j in
# its low nibble and element 64 + 32a + 16b + j in its high nibble; their top two bits are the
# bit pairs 2a and 2a + 2 of qh[16b + j]; their sub-blocks (16 values) are 8h + 2a + b and
# 8h + 4 + 2a + b. y = (d * sc) * (q - 32). ql and qh are kept as little-endian words (j = 4w + k:
# byte k of word w), the unit of the integer path.
def _split_q6_k(b):
    n, nb = b.shape[:2]
    sc = lax.bitcast_convert_type(b[..., 192:208], jnp.int8).reshape(n, nb, 2, 2, 2, 2)
    return (_words(b[..., :128]).reshape(n, 2 * nb, 2, 2, 4),
            _words(b[..., 128:192]).reshape(n, 2 * nb, 2, 4),
            sc[:, :, :, 0].reshape(n, 2 * nb, 2, 2), sc[:, :, :, 1].reshape(n, 2 * nb, 2, 2),
            jnp.repeat(_half(b[..., 208:210]), 2, axis=1))


def _join_q6_k(ql, qh, sc_lo, sc_hi, d):
    n, nb = ql.shape[0], ql.shape[1] // 2
    sc = jnp.stack([sc_lo.reshape(n, nb, 2, 2, 2), sc_hi.reshape(n, nb, 2, 2, 2)], axis=3)
    return _cat(_word_bytes(ql.reshape(n, nb, 32)), _word_bytes(qh.reshape(n, nb, 16)),
                _bytes(sc.reshape(n, nb, 16)).reshape(n, nb, 16), _bytes(d[:, 0::2]))


def _x_q6_k(x):
    x = x.reshape(*x.shape[:2], 2, 2, 2, 4, 4)
    return x[:, :, 0], x[:, :, 1] * (1 / 16)


def _unpack_q6_k(ql, qh, sc_lo, sc_hi, d):
    b = _byte_planes(ql)                           # [block_n, blocks, 2, 2, 4, 4]
    h = _byte_planes(qh)[:, :, None]               # [block_n, blocks, 1, 2, 4, 4]
    t = (h << 4) >> (2 * _iota(b.shape, 2))        # pair 2a -> bits 4-5, pair 2a + 4 -> bits 8-9
    lo = (b & 0xF) | (t & 0x30)
    hi = (b & 0xF0) | (t & 0x300)
    return _int_float(lo, 32.0), _int_float(hi, 512.0), _f32(sc_lo), _f32(sc_hi), _f32(d)


def _dot_q6_k(u, xs):
    lo, hi, sc_lo, sc_hi, d = u
    t = (sc_lo * _sum(lo * xs[0][None], 2)
         + sc_hi * _sum(hi * xs[1][None], 2))      # [block_n, blocks, 2, 2]
    return d * _sum(t, 2)


# The integer path (every type). Each x block of 32 values is quantized to 16 bits,
# q = round(x / s) with s = max|x| / X_QMAX, and q is split into two int8 digits q = 256 h + l
# (h = (q + 128) >> 8, so l is in [-128, 127]). The weight's quant bytes then meet x's digits in
# `dp4a` instructions (four 8-bit products and their sum in one instruction, PTX
# `dp4a.{u32,s32}.s32`): a block's integer dot product is exact, and one conversion and one
# multiply by d * s give its share of y. Against the float path (about 5 instructions a value)
# this takes under 1: the Q4_0 word w becomes its low and high nibble bytes by a mask and a
# shift, then four dp4a and a shift per x row take both digits of both planes. The one rounding
# that is new is x's: |x - s q| <= s / 2 = max|x| / 65278 per element (the bound the tests
# allow, `x_quant_bound`); the integer sums are exact, and for Q4_0 and Q4_1 even their float
# conversion is (|sum| <= 32 * 15 * X_QMAX < 2^24).
X_QMAX = 32639   # |q| <= X_QMAX keeps h = (q + 128) >> 8 in [-127, 127]
_NIBBLES = 0x0F0F0F0F


def _pack_words(v: jax.Array) -> jax.Array:
    """int8-range int32 `[..., 4 n]` -> int32 words `[..., n]`, value 4w + k in byte k of word w."""
    b = (v & 0xFF).astype(jnp.uint32).reshape(*v.shape[:-1], -1, 4)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return lax.bitcast_convert_type(w, jnp.int32)


def _x_quant(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x `[..., 32]` f32 -> q = round(x / s) `[..., 32]` int32 and s = max|x| / X_QMAX `[...]`."""
    amax = jnp.max(jnp.abs(x), axis=-1)
    inv = jnp.where(amax > 0, X_QMAX / jnp.where(amax > 0, amax, 1.0), 0.0)
    q = jnp.clip(jnp.round(x * inv[..., None]), -X_QMAX, X_QMAX).astype(jnp.int32)
    return q, amax / X_QMAX


def _x_int(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """x `[M, nb, 32]` f32 -> (h words, l words) `[M, nb, 8]` int32, the scale s `[M, nb]` f32 and
    sum(q) `[M, nb]` int32. A block of zeros gets s = 0; NaN or inf in x makes s NaN or inf, so
    they reach y as they do on the float path."""
    q, s = _x_quant(x)
    h = (q + 128) >> 8
    return _pack_words(h), _pack_words(q - (h << 8)), s, jnp.sum(q, axis=-1)


def _x_int_q8_0(x):
    return _x_int(x)


def _x_int_nibbles(x):
    """Q4_0, Q4_1: the digits' words split into the low plane (elements 0..15: words 0..3) and
    the high plane (16..31: words 4..7)."""
    h, l, s, sq = _x_int(x)
    return h[..., :4], h[..., 4:], l[..., :4], l[..., 4:], s, sq


_ROUND_MAGIC = 12582912.0      # 1.5 * 2^23: v + it holds round-half-even(v) in its low bits
_ROUND_BITS = 0x4B400000       # the bit pattern of 1.5 * 2^23


def _quant_tiles(tiles: tuple[jax.Array, ...], axes: int = 2):
    """`_x_int` inside the kernel: float tiles `[..., words, 4]` whose last `axes` axes together
    are one 32-value block (all of it, or Q4_0's low and high halves: they share the scale) ->
    (h words per tile, l words per tile, s, sum(q)): h and l `[..., words]`, s `[...]` over the
    leading axes, sum(q) over the last two axes of each tile, added over the tiles.

    Rounds half to even as jnp.round does, through the float adder (|v| <= X_QMAX < 2^22:
    the bits of v + 1.5 * 2^23 hold the rounded integer), since Triton has no round. A block
    holding NaN or inf gets s = NaN, so y is NaN where the float path's would not be finite."""
    tiles = [t.astype(jnp.float32) for t in tiles]
    amax = nan = None
    for t in tiles:
        a = _max(jnp.abs(t), axes)
        z = _sum(t * 0.0, axes)   # NaN where t holds NaN or inf
        amax = a if amax is None else jnp.maximum(amax, a)
        nan = z if nan is None else nan + z
    inv = jnp.where(amax > 0, X_QMAX / jnp.where(amax > 0, amax, 1.0), 0.0)
    hs, ls, sq = [], [], 0
    for t in tiles:
        v = t * inv[(..., *(None,) * axes)]
        q = lax.bitcast_convert_type(v + _ROUND_MAGIC, jnp.int32) - _ROUND_BITS
        q = jnp.minimum(jnp.maximum(q, -X_QMAX), X_QMAX)
        h = (q + 128) >> 8
        shift = 8 * _iota(q.shape, q.ndim - 1)
        hs.append(jnp.sum((h & 0xFF) << shift, axis=-1))
        ls.append(jnp.sum(((q - (h << 8)) & 0xFF) << shift, axis=-1))
        sq = sq + _sum(q, 2)
    # Triton's max drops NaN; the zero sum brings it back into s, and so into y.
    return hs, ls, amax / X_QMAX + nan, sq


def _max(v: jax.Array, axes: int) -> jax.Array:
    """Max over the last `axes` axes, one at a time."""
    for _ in range(axes):
        v = jnp.max(v, axis=-1)
    return v


def _view_q8_0(x):
    return x.reshape(*x.shape[:2], 8, 4)


def _fused_q8_0(ref, m, start, blocks):
    (h,), (l,), s, sq = _quant_tiles((ref[m, pl.ds(start, blocks)],))
    return h, l, s, sq


def _view_nibbles(x):
    return x.reshape(*x.shape[:2], 2, 4, 4)    # elements 0..15, 16..31: 4 words of 4


def _fused_nibbles(ref, m, start, blocks):
    rows = pl.ds(start, blocks)
    (h_lo, h_hi), (l_lo, l_hi), s, sq = _quant_tiles((ref[m, rows, 0], ref[m, rows, 1]))
    return h_lo, h_hi, l_lo, l_hi, s, sq


def _view_k(x):
    return x.reshape(*x.shape[:2], 4, 2, 8, 4)  # chunk c: sub-blocks 2c, 2c + 1


def _fused_k(ref, m, start, blocks):
    rows = pl.ds(start, blocks)
    (h_lo,), (l_lo,), s_lo, sq_lo = _quant_tiles((ref[m, rows, :, 0],))
    (h_hi,), (l_hi,), s_hi, sq_hi = _quant_tiles((ref[m, rows, :, 1],))
    return h_lo, l_lo, h_hi, l_hi, s_lo, s_hi, sq_lo, sq_hi


def _dp4a(a: jax.Array, b: jax.Array, c: jax.Array, a_signed: bool) -> jax.Array:
    """c + the dot product of the four bytes of a (signed or not) and of b (signed), in jnp:
    the interpreter's stand-in for the instruction."""
    for k in range(4):
        ak = (a >> (8 * k)) & 0xFF
        bk = (((b >> (8 * k)) & 0xFF) ^ 0x80) - 0x80
        c = c + ((ak ^ 0x80) - 0x80 if a_signed else ak) * bk
    return c


def _int_words(planes: tuple[jax.Array, ...], rows: list[tuple[jax.Array, ...]], signed: bool,
               interpret: bool) -> list[jax.Array]:
    """Per weight word, per x row: sum_p 256 * dot(plane p, h_p) + dot(plane p, l_p), int32.

    planes: 1 or 2 int32 arrays `[block_n, blocks, ...]` of 4 quant bytes a word (signed bytes
    for Q8_0, else unsigned). rows: per x row its digit words, broadcastable against a plane with
    a leading unit axis added: (h_0, .., h_{P-1}, l_0, .., l_{P-1}).
    """
    n = len(planes)
    kind = "s32" if signed else "u32"
    out = []
    for row in rows:
        xw = [v[None] for v in row]
        if interpret:
            t = 0
            for p in range(n):
                t = _dp4a(planes[p], xw[p], t, signed)
            t = t << 8
            for p in range(n):
                t = _dp4a(planes[p], xw[n + p], t, signed)
            out.append(t)
            continue
        # PTX, one instance a word: $0 the result, $1 .. $n the planes, then the x words.
        body = [f"dp4a.{kind}.s32 t, ${1 + p}, ${1 + n + p}, {'t' if p else 0};" for p in range(n)]
        body.append("shl.b32 t, t, 8;")
        body += [f"dp4a.{kind}.s32 {'$0' if p == n - 1 else 't'}, ${1 + p}, ${1 + 2 * n + p}, t;"
                 for p in range(n)]
        shape = planes[0].shape
        args = [*planes, *(jnp.broadcast_to(v, shape) for v in xw)]
        out.append(plgpu.elementwise_inline_asm(
            "{\n.reg .b32 t;\n" + "\n".join(body) + "\n}", args=args,
            constraints=",".join(["=r"] + ["r"] * len(args)), pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.int32)])[0])
    return out


def _nibble_planes(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int32 words -> (low nibbles, high nibbles), each a byte of its own."""
    return w & _NIBBLES, (w >> 4) & _NIBBLES


def _int_dot_q8_0(w, xs, interpret):
    qs, d = w
    sums = _int_words((qs,), [x[:2] for x in xs], True, interpret)
    d = _f32(d)
    return [jnp.sum(t, axis=-1).astype(jnp.float32) * (d * x[2][None]) for t, x in zip(sums, xs)]


def _int_dot_q4_0(w, xs, interpret):
    qs, d = w
    sums = _int_words(_nibble_planes(qs), [x[:4] for x in xs], False, interpret)
    d = _f32(d)
    return [(jnp.sum(t, axis=-1) - 8 * x[5][None]).astype(jnp.float32) * (d * x[4][None])
            for t, x in zip(sums, xs)]


def _int_dot_q4_1(w, xs, interpret):
    qs, d, mn = w
    sums = _int_words(_nibble_planes(qs), [x[:4] for x in xs], False, interpret)
    d, mn = _f32(d), _f32(mn)
    return [jnp.sum(t, axis=-1).astype(jnp.float32) * (d * x[4][None])
            + mn * (x[4] * x[5].astype(jnp.float32))[None] for t, x in zip(sums, xs)]


def _x_int_k(x):
    """K-quants: x `[M, nb, 256]` -> per chunk c (sub-blocks 2c, 2c + 1: the low and high
    nibbles of 32 quant bytes) the digit words `[M, nb, 4, 8]` h_lo, l_lo, h_hi, l_hi, then
    the scales and sum(q) `[M, nb, 4]` s_lo, s_hi, sq_lo, sq_hi."""
    m, nb = x.shape[:2]
    h, l, s, sq = _x_int(x.reshape(m, nb * 8, 32))
    h, l = h.reshape(m, nb, 4, 2, 8), l.reshape(m, nb, 4, 2, 8)
    s, sq = s.reshape(m, nb, 4, 2), sq.reshape(m, nb, 4, 2)
    return (h[..., 0, :], l[..., 0, :], h[..., 1, :], l[..., 1, :],
            s[..., 0], s[..., 1], sq[..., 0], sq[..., 1])


def _int_dot_k(lo, hi, scales, xs, interpret):
    """(d sc) q - dmin mn per sub-block: each plane's integer sums scaled by its sub-block's
    scale and x's, the mins times x's block sums."""
    d, dmin, sc_lo, sc_hi, mn_lo, mn_hi = map(_f32, scales)
    a_lo = _int_words((lo,), [x[0:2] for x in xs], False, interpret)
    a_hi = _int_words((hi,), [x[2:4] for x in xs], False, interpret)
    out = []
    for t_lo, t_hi, x in zip(a_lo, a_hi, xs):
        s_lo, s_hi, sq_lo, sq_hi = (v[None] for v in x[4:])
        t = (d[..., None] * (sc_lo * s_lo * jnp.sum(t_lo, axis=-1).astype(jnp.float32)
                             + sc_hi * s_hi * jnp.sum(t_hi, axis=-1).astype(jnp.float32))
             - dmin[..., None] * (mn_lo * (s_lo * sq_lo.astype(jnp.float32))
                                  + mn_hi * (s_hi * sq_hi.astype(jnp.float32))))
        out.append(_sum(t))
    return out


def _int_dot_q4_k(w, xs, interpret):
    qs, *scales = w
    return _int_dot_k(*_nibble_planes(qs), scales, xs, interpret)


_LOW_BITS = 0x01010101


def _int_dot_q5_k(w, xs, interpret):
    qs, qh, *scales = w               # qs [block_n, blocks, 4, 8], qh [block_n, blocks, 8]
    lo, hi = _nibble_planes(qs)
    h = qh[:, :, None, :]
    c2 = 2 * _iota(qs.shape, 2)
    lo = lo | (((h >> c2) & _LOW_BITS) << 4)        # bit 2c of each qh byte -> bit 4
    hi = hi | (((h >> (c2 + 1)) & _LOW_BITS) << 4)  # bit 2c + 1 -> bit 4
    return _int_dot_k(lo, hi, scales, xs, interpret)


def _int_dot_q5_0(w, xs, interpret):
    """Q4_0's dot with the fifth bits ORed in (see `_split_q5_0` for their order) and zero 16."""
    qs, d, qh = w
    lo, hi = _nibble_planes(qs)
    wi = _iota(qs.shape, 2)
    h = qh[:, :, None]
    lo = lo | ((h << (4 - wi)) & 0x10101010)         # bit 8k + w -> bit 8k + 4
    hi = hi | ((h >> wi) & 0x10101010)               # bit 8k + 4 + w -> bit 8k + 4
    sums = _int_words((lo, hi), [x[:4] for x in xs], False, interpret)
    d = _f32(d)
    return [(jnp.sum(t, axis=-1) - 16 * x[5][None]).astype(jnp.float32) * (d * x[4][None])
            for t, x in zip(sums, xs)]


def _x_int_q6_k(x):
    """Q6_K: x `[M, nb, 128]` (element 64 p + 32 a + 16 b + 4 w + k of each half super-block)
    -> per plane p (low, high) the digit words `[M, nb, 2 a, 2 b, 4 w]`, then the scales
    `[M, nb, 2 a]` (one a 32-value block) and sum(q) per 16-value sub-block `[M, nb, 2 a, 2 b]`:
    h_lo, l_lo, h_hi, l_hi, s_lo, s_hi, sq_lo, sq_hi."""
    m, nb = x.shape[:2]
    q, s = _x_quant(x.reshape(m, nb, 2, 2, 32))
    h = (q + 128) >> 8
    hw = _pack_words(h).reshape(m, nb, 2, 2, 2, 4)
    lw = _pack_words(q - (h << 8)).reshape(m, nb, 2, 2, 2, 4)
    sq = jnp.sum(q.reshape(m, nb, 2, 2, 2, 16), axis=-1)
    return (hw[:, :, 0], lw[:, :, 0], hw[:, :, 1], lw[:, :, 1],
            s[:, :, 0], s[:, :, 1], sq[:, :, 0], sq[:, :, 1])


def _view_q6_k(x):
    return x.reshape(*x.shape[:2], 2, 2, 2, 4, 4)   # p, a, b, word, byte


def _fused_q6_k(ref, m, start, blocks):
    rows = pl.ds(start, blocks)
    (h_lo,), (l_lo,), s_lo, sq_lo = _quant_tiles((ref[m, rows, 0],), axes=3)
    (h_hi,), (l_hi,), s_hi, sq_hi = _quant_tiles((ref[m, rows, 1],), axes=3)
    return h_lo, l_lo, h_hi, l_hi, s_lo, s_hi, sq_lo, sq_hi


def _int_dot_q6_k(w, xs, interpret):
    """(d sc) (q - 32) per 16-value sub-block: the plane's integer sums less 32 sum(q) of x,
    times the sub-block's scale and x's."""
    ql, qh, sc_lo, sc_hi, d = w       # ql [block_n, blocks, 2, 2, 4], qh [block_n, blocks, 2, 4]
    h = qh[:, :, None]
    a2 = 2 * _iota(ql.shape, 2)
    lo, hi = _nibble_planes(ql)
    lo = lo | (((h >> a2) & 0x03030303) << 4)        # bit pair 2a of each qh byte -> bits 4-5
    hi = hi | (((h >> (a2 + 4)) & 0x03030303) << 4)  # bit pair 2a + 4
    a_lo = _int_words((lo,), [x[0:2] for x in xs], False, interpret)
    a_hi = _int_words((hi,), [x[2:4] for x in xs], False, interpret)
    sc_lo, sc_hi, d = _f32(sc_lo), _f32(sc_hi), _f32(d)
    out = []
    for t_lo, t_hi, x in zip(a_lo, a_hi, xs):
        s_lo, s_hi = x[4][None, :, :, None], x[5][None, :, :, None]
        i_lo = (jnp.sum(t_lo, axis=-1) - 32 * x[6][None]).astype(jnp.float32)
        i_hi = (jnp.sum(t_hi, axis=-1) - 32 * x[7][None]).astype(jnp.float32)
        out.append(d * _sum(sc_lo * s_lo * i_lo + sc_hi * s_hi * i_hi, 2))
    return out


_FORMATS: dict[gguf.GGMLQuantizationType, _Format] = {
    T.Q8_0: _Format(32, _split_q8_0, _join_q8_0, _x_q8_0, _unpack_q8_0, _dot_q8_0,
                     _x_int_q8_0, _int_dot_q8_0, _view_q8_0, _fused_q8_0),
    T.Q4_0: _Format(32, _split_q4_0, _join_q4_0, _x_word_planes, _unpack_q4_0, _dot_word_planes,
                     _x_int_nibbles, _int_dot_q4_0, _view_nibbles, _fused_nibbles),
    T.Q4_1: _Format(32, _split_q4_1, _join_q4_1, _x_q4_1, _unpack_q4_1, _dot_q4_1,
                     _x_int_nibbles, _int_dot_q4_1, _view_nibbles, _fused_nibbles),
    T.Q5_0: _Format(32, _split_q5_0, _join_q5_0, _x_word_planes, _unpack_q5_0, _dot_word_planes,
                     _x_int_nibbles, _int_dot_q5_0, _view_nibbles, _fused_nibbles),
    T.Q4_K: _Format(256, _split_q4_k, _join_q4_k, _x_k_planes, _unpack_q4_k, _dot_k_planes,
                     _x_int_k, _int_dot_q4_k, _view_k, _fused_k),
    T.Q5_K: _Format(256, _split_q5_k, _join_q5_k, _x_k_planes, _unpack_q5_k, _dot_k_planes,
                     _x_int_k, _int_dot_q5_k, _view_k, _fused_k),
    T.Q6_K: _Format(128, _split_q6_k, _join_q6_k, _x_q6_k, _unpack_q6_k, _dot_q6_k,
                     _x_int_q6_k, _int_dot_q6_k, _view_q6_k, _fused_q6_k),
}

SUPPORTED_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(_FORMATS)

# Per-type tiles, each tried as `get_default` fits it to every 70B matrix (its K-split, the glu
# kernel's halved row tile). Q4_1, Q4_K, Q5_K and Q6_K: the tile with the least time over
# 2 q/o + glu + down of six candidates, M = 1, H100, 2026-12-07
# (`kernels_bench.py --candidates`, benchmarks/RESULTS.md, session 13); Q5_0's old tile ranked
# level with the best. Q4_0 is from that script's coordinate descent on the integer path (H100,
# 2026-12-06): 32 x 2048, 8 warps, 4 stages. Q8_0 from the first sweep (H200, 2026-11-27).
TUNED: dict[gguf.GGMLQuantizationType, BlockSizes] = {
    T.Q8_0: BlockSizes(block_n=16, block_k=512, num_warps=4),
    T.Q4_0: BlockSizes(block_n=32, block_k=2048, num_warps=8, num_stages=4),
    T.Q4_1: BlockSizes(block_n=32, block_k=2048, num_warps=8, num_stages=4),
    T.Q5_0: BlockSizes(block_n=16, block_k=1024, num_warps=4),
    T.Q4_K: BlockSizes(block_n=32, block_k=2048, num_warps=8, num_stages=4),
    T.Q5_K: BlockSizes(block_n=32, block_k=2048, num_warps=8, num_stages=4),
    T.Q6_K: BlockSizes(block_n=16, block_k=1024, num_warps=4),
}


# Tiles for launches of 2 to 8 x rows where they differ from `TUNED` (the per-row integer work
# grows with M, so large tiles spill or stall): Q4_K keeps session 10's 32 x 1024 tile, which
# took 248 us on 70B gate/up at M = 8 where 32 x 2048 took 353 us (H100, benchmarks/RESULTS.md).
TUNED_BATCHED: dict[gguf.GGMLQuantizationType, BlockSizes] = {
    T.Q4_K: BlockSizes(block_n=32, block_k=1024, num_warps=8),
}


def supports(qtype: object, n_rows: int, n_cols: int) -> bool:
    """Whether `qmatvec` can take an [n_rows, n_cols] matrix of `qtype` (with default tiling)."""
    try:
        fmt = _format(qtype)
    except InputError:
        return False
    return n_rows > 0 and n_rows % MIN_BLOCK_N == 0 and n_cols > 0 and n_cols % fmt.block == 0


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
# Repack and its inverse.
# ---------------------------------------------------------------------------------------------

def _check_n_cols(qtype: gguf.GGMLQuantizationType, n_cols: int) -> None:
    block_size, _ = quants.block_geometry(qtype)
    if n_cols <= 0 or n_cols % block_size:
        raise InputError(f"{n_cols=} must be a positive multiple of {block_size}"
                         f" (the {qtype.name} block size)")


def _check_weight(w_data: jax.Array, qtype: gguf.GGMLQuantizationType, n_cols: int) -> None:
    _check_n_cols(qtype, n_cols)
    if w_data.ndim != 2 or w_data.dtype != jnp.uint8:
        raise InputError(f"w_data must be uint8 [N, row_bytes], got {w_data.dtype}"
                         f" {list(w_data.shape)}")
    need = quants.row_bytes(qtype, n_cols)
    if w_data.shape[1] != need:
        raise InputError(f"{n_cols=} needs {need} bytes per {qtype.name} row,"
                         f" but w_data rows have {w_data.shape[1]}")


def repack(w_data: jax.Array, qtype: gguf.GGMLQuantizationType,
           n_cols: int | None = None) -> tuple[jax.Array, ...]:
    """Split GGUF rows into the kernel's layout (see the module docstring's table).

    Run it once when a weight is loaded, not per call: it reads and writes the whole matrix.

    Args:
        w_data: uint8 [N, row_bytes], rows of GGUF blocks as `quants.dequantize` takes them.
        qtype: the GGML type; one of SUPPORTED_TYPES.
        n_cols: K, values per row; derived from the row width when None.

    Returns:
        The packed arrays, each [N, K / block, ...], in the order `qmatvec_packed` takes.

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
    return fmt.split(w_data.reshape(w_data.shape[0], n_cols // block_size, type_size))


def packed_shapes(qtype: gguf.GGMLQuantizationType, n_rows: int,
                  n_cols: int) -> list[jax.ShapeDtypeStruct]:
    """Shapes and dtypes `repack` returns for an [n_rows, n_cols] matrix (nothing is computed)."""
    qtype = T(qtype)
    w = jax.ShapeDtypeStruct((n_rows, quants.row_bytes(qtype, n_cols)), jnp.uint8)
    return list(jax.eval_shape(lambda w: repack(w, qtype, n_cols), w))


@functools.lru_cache(maxsize=None)
def packed_nbytes(qtype: gguf.GGMLQuantizationType, n_rows: int, n_cols: int) -> int:
    """Bytes `repack` makes of an [n_rows, n_cols] matrix (the table in the module docstring)."""
    return sum(int(np.prod(s.shape)) * s.dtype.itemsize
               for s in packed_shapes(qtype, n_rows, n_cols))


def dequantize_packed(packed: tuple[jax.Array, ...], qtype: gguf.GGMLQuantizationType,
                      n_cols: int) -> jax.Array:
    """float32 [N, K] from `repack`'s arrays, bit-identical to `quants.dequantize` of the GGUF
    rows (the prefill path: a matmul needs the float matrix anyway)."""
    fmt = _format(qtype)
    blocks = fmt.join(*packed)
    return quants.dequantize(blocks.reshape(blocks.shape[0], -1), T(qtype), n_cols)


# ---------------------------------------------------------------------------------------------
# The kernel.
# ---------------------------------------------------------------------------------------------

def _qmatvec_kernel(*refs, fmt: _Format, n_weights: int, blocks: int, n_chunks: int,
                    m_rows: int, stacked: bool, glu: bool = False, int_dot: bool = False,
                    fused_x: bool = False, prefetch: bool = False, interpret: bool = False):
    """One program: rows [block_n] of the output, over chunks [c0, c0 + n_chunks) of K.

    refs: with `stacked`, first a [1] int32 layer index; then the packed weight arrays (tiles
    [block_n, K / block, ...], or [L, block_n, K / block, ...] of which the program reads
    the layer's), with `glu` a second set of the same arrays (the up rows matching the gate
    rows of the first), the x arrays ([Mp, K / block, ...]), then o_ref: [Mp, block_n] f32
    partial sums of this K-split, or with `glu` silu(gate) * up.

    With `prefetch`, the weight tiles (and the wrapper's x tiles) of chunk i + 1 are loaded
    before chunk i is computed and carried through the loop, so their loads are in flight
    during the arithmetic and the layout shuffles of chunk i (the last chunk loads itself again).
    """
    lead = (slice(None),)
    if stacked:
        lead = (refs[0][0], slice(None))
        refs = refs[1:]
    n_sets = 2 if glu else 1
    w_refs, x_refs, o_ref = refs[:n_weights * n_sets], refs[n_weights * n_sets:-1], refs[-1]
    sets = [w_refs[i * n_weights:(i + 1) * n_weights] for i in range(n_sets)]
    chunk0 = pl.program_id(1) * n_chunks

    def tile(ref, lead, start):
        rest = (slice(None),) * (len(ref.shape) - len(lead) - 1)
        return ref[(*lead, pl.ds(start, blocks), *rest)]

    def start_of(i):
        return pl.multiple_of((chunk0 + i) * blocks, blocks)

    def loads(i):
        """Chunk i's weight tiles of every set, and the wrapper's x tiles (None with fused_x)."""
        start = start_of(i)
        w = tuple(tuple(tile(r, lead, start) for r in refs_j) for refs_j in sets)
        x = None if fused_x else tuple(tuple(tile(r, (m,), start) for r in x_refs)
                                       for m in range(m_rows))
        return w, x

    def compute(i, acc, w_sets, x_tiles):
        start = start_of(i)
        if fused_x:   # quantize this chunk of every x row here (the integer path's x tiles)
            xs = [fmt.fused_x(x_refs[0], m, start, blocks) for m in range(m_rows)]
        else:
            xs = list(x_tiles)
        new = []
        for j, w in enumerate(w_sets):
            w = list(w)
            if int_dot:
                parts = fmt.int_dot(w, xs, interpret)
            else:
                unpacked = fmt.unpack(*w)
                parts = [fmt.dot(unpacked, xs[m]) for m in range(m_rows)]
            new.extend(acc[j * m_rows + m] + parts[m] for m in range(m_rows))
        return tuple(new)

    block_n = o_ref.shape[-1]
    zeros = tuple(jnp.zeros((block_n, blocks), jnp.float32) for _ in range(m_rows * n_sets))
    if prefetch:
        def step(i, carry):
            acc, w_sets, x_tiles = carry
            ahead = loads(jnp.minimum(i + 1, n_chunks - 1))
            return compute(i, acc, w_sets, x_tiles), *ahead

        acc = lax.fori_loop(0, n_chunks, step, (zeros, *loads(0)))[0]
    else:
        acc = lax.fori_loop(0, n_chunks, lambda i, acc: compute(i, acc, *loads(i)), zeros)
    for m in range(m_rows):
        y = jnp.sum(acc[m], axis=1)
        if glu:   # silu(gate) * up, silu(g) = g * sigmoid(g)
            y = y / (1.0 + jnp.exp(-y)) * jnp.sum(acc[m_rows + m], axis=1)
        o_ref[m, :] = y


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
    if not 1 <= m_rows <= MAX_ROWS:
        raise InputError(f"x has {m_rows=} rows; qmatvec serves 1 to {MAX_ROWS} (use a matmul)")
    _check_n_cols(qtype, n_cols)
    if n_rows <= 0:
        raise InputError(f"{n_rows=} must be positive")
    bs = block_sizes or BlockSizes.get_default(qtype, n_rows, n_cols, m_rows)
    for name in ("block_n", "block_k", "split_k"):
        value = getattr(bs, name)
        if not _is_pow2(value):
            raise InputError(f"{name}={value} must be a power of two")
    if bs.block_n < MIN_BLOCK_N:
        raise InputError(f"block_n={bs.block_n} must be at least {MIN_BLOCK_N}")
    if n_rows % bs.block_n:
        raise InputError(f"{n_rows=} must be a multiple of block_n={bs.block_n}")
    if bs.block_k % fmt.block:
        raise InputError(f"block_k={bs.block_k} must be a multiple of {fmt.block}"
                         f" for {qtype.name}")
    if n_cols % (bs.split_k * bs.block_k):
        raise InputError(f"{n_cols=} must be a multiple of split_k * block_k"
                         f" = {bs.split_k} * {bs.block_k}")
    return Plan(block_sizes=bs, grid=(n_rows // bs.block_n, bs.split_k),
                m_padded=1 << (m_rows - 1).bit_length(),
                n_chunks=n_cols // (bs.split_k * bs.block_k))


def _takes_int(fmt: _Format, bs: BlockSizes) -> bool:
    return bs.int_dot and fmt.int_x is not None


def _takes_fused(fmt: _Format, bs: BlockSizes) -> bool:
    return _takes_int(fmt, bs) and bs.fuse_x and fmt.fused_x is not None


def _x_arrays(x: jax.Array, fmt: _Format, m_padded: int, int_dot: bool = False,
              fused: bool = False) -> tuple[jax.Array, ...]:
    """x [M, K] -> the format's x arrays [Mp, K / block, ...], zero rows up to Mp: f32 planes,
    or with `int_dot` the integer path's digits and scales, or with `fused` x itself in the
    layout the kernel quantizes it from (a reshape, its dtype kept)."""
    m, k = x.shape
    if fused:
        x = jnp.pad(x, ((0, m_padded - m), (0, 0))) if m_padded > m else x
        return (fmt.fused_view(x.reshape(m_padded, k // fmt.block, fmt.block)),)
    x = jnp.pad(x.astype(jnp.float32), ((0, m_padded - m), (0, 0)))
    x = x.reshape(m_padded, k // fmt.block, fmt.block)
    return fmt.int_x(x) if int_dot else fmt.x_split(x)


def _whole(a: jax.Array) -> pl.BlockSpec:
    return pl.BlockSpec(a.shape, lambda n, s: (0,) * a.ndim)


def _row_tile(a: jax.Array, block_n: int, stacked: bool, grid_axis: int = 0,
              offset: int = 0) -> pl.BlockSpec:
    """Row tile `block_n` of packed array `a`, all of K; the tile index is grid axis
    `grid_axis` (qmatmul's grid has its row tiles on axis 1) plus `offset` tiles."""
    if stacked:   # every layer's rows of the tile; the kernel picks the layer
        return pl.BlockSpec((a.shape[0], block_n, *a.shape[2:]),
                            lambda *ids: (0, ids[grid_axis] + offset) + (0,) * (a.ndim - 2))
    return pl.BlockSpec((block_n, *a.shape[1:]),
                        lambda *ids: (ids[grid_axis] + offset,) + (0,) * (a.ndim - 1))


def _launch(xs: tuple[jax.Array, ...], packed: tuple[jax.Array, ...], fmt: _Format, p: Plan, *,
            interpret: bool, out_init: jax.Array | None = None,
            layer: jax.Array | None = None, glu: bool = False) -> jax.Array:
    """Run the kernel on the x arrays `xs`; returns the partial sums [split_k, Mp, N] f32.

    `layer`: with packed arrays stacked on a leading layer axis, the [1] int32 index of the one
    to use (read inside the kernel, so no slice of the stack is ever copied).
    `out_init`, if given, is the output buffer's starting content (tests poison it with NaN).
    `glu`: the packed rows are gate (first half) and up (second half) of a feed-forward; each
    program reads a tile of both and writes silu(gate) * up: [1, Mp, N / 2] (split_k must be 1).
    """
    bs = p.block_sizes
    stacked = layer is not None
    n_rows = packed[0].shape[1 if stacked else 0]
    out_rows = n_rows // 2 if glu else n_rows
    out_spec = pl.BlockSpec((None, p.m_padded, bs.block_n), lambda n, s: (s, 0, n))
    in_specs = [_row_tile(a, bs.block_n, stacked) for a in packed]
    operands = [*packed]
    if glu:   # the same arrays again, tiles offset to the up rows
        in_specs += [_row_tile(a, bs.block_n, stacked, offset=out_rows // bs.block_n)
                     for a in packed]
        operands += packed
    in_specs += [_whole(a) for a in xs]
    operands += xs
    if stacked:
        in_specs.insert(0, _whole(layer))
        operands.insert(0, layer)
    aliases = {}
    if out_init is not None:
        in_specs.append(out_spec)
        operands.append(out_init)
        aliases = {len(operands) - 1: 0}
    kernel = functools.partial(_qmatvec_kernel, fmt=fmt, n_weights=len(packed),
                               blocks=bs.block_k // fmt.block, n_chunks=p.n_chunks,
                               m_rows=p.m_padded, stacked=stacked, glu=glu,
                               int_dot=_takes_int(fmt, bs), fused_x=_takes_fused(fmt, bs),
                               prefetch=bs.prefetch, interpret=interpret)
    if out_init is not None:
        kernel = _drop_args(kernel, len(operands) - 1)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((bs.split_k, p.m_padded, out_rows), jnp.float32),
        grid=p.grid,
        in_specs=in_specs,
        out_specs=out_spec,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="qmatvec_glu" if glu else "qmatvec",
    )(*operands)


def _drop_args(fn: Callable[..., None], start: int, count: int = 1) -> Callable[..., None]:
    """`fn` without the positional arguments [start, start + count), start >= 0 (aliased input
    buffers, which a kernel sees again as its outputs)."""
    def wrapped(*args):
        return fn(*args[:start], *args[start + count:])
    return wrapped


def _check_packed(packed: tuple[jax.Array, ...], qtype: gguf.GGMLQuantizationType, n_cols: int,
                  stacked: bool) -> int:
    """Check `packed` against `repack`'s shapes (with a leading layer axis if `stacked`);
    returns N."""
    if not isinstance(packed, (tuple, list)) or not packed:
        raise InputError("packed must be the tuple of arrays that qmatvec.repack returns")
    lead = tuple(packed[0].shape[:1]) if stacked else ()
    if len(packed[0].shape) <= len(lead):
        raise InputError(f"packed {qtype.name} arrays have shape {list(packed[0].shape)}; with"
                         " layer= they must be stacked on a leading layer axis")
    n_rows = packed[0].shape[len(lead)]
    expect = [(lead + tuple(s.shape), s.dtype) for s in packed_shapes(qtype, n_rows, n_cols)]
    got = [(tuple(a.shape), a.dtype) for a in packed]
    if got != expect:
        raise InputError(f"packed {qtype.name} arrays have shapes {got}, expected {expect}"
                         f" for {n_cols=} (pass the output of qmatvec.repack)")
    return n_rows


def _layer_index(layer) -> jax.Array | None:
    """A stack index as the kernels read it: int32 [1]; None stays None."""
    if layer is None:
        return None
    if jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
        raise InputError(f"layer must be an integer scalar, got {jnp.result_type(layer)}"
                         f" {list(jnp.shape(layer))}")
    return jnp.asarray(layer, jnp.int32).reshape(1)


def _check_x(x: jax.Array, n_cols: int) -> None:
    if x.ndim != 2:
        raise InputError(f"x must be [M, K], got shape {list(x.shape)}")
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise InputError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[1] != n_cols:
        raise InputError(f"x has {x.shape[1]} columns but {n_cols=}")


@functools.partial(jax.jit, static_argnames=("qtype", "n_cols", "block_sizes", "interpret",
                                             "sum_splits"))
def qmatvec_packed(x: jax.Array, packed: tuple[jax.Array, ...],
                   qtype: gguf.GGMLQuantizationType, n_cols: int, *,
                   block_sizes: BlockSizes | None = None, interpret: bool = False,
                   layer: jax.Array | None = None, sum_splits: bool = True) -> jax.Array:
    """y = x @ W^T with W given as `repack(w_data, qtype)`; the form to use in the engine.

    Args:
        x: [M, K] float32 or bfloat16, 1 <= M <= 8.
        packed: `repack(w_data, qtype)`, arrays with N rows; with `layer`, the same for L
            matrices stacked on a new leading axis.
        qtype: the GGML type (static).
        n_cols: K (static).
        layer: int32 scalar, which of the stacked matrices to use (a `lax.scan` over stacked
            layers passes its index, so no per-layer slice of the weights is materialized).
        block_sizes: tiling; `BlockSizes.get_default(qtype, N, K)` when None.
        interpret: run the Pallas interpreter (CPU) instead of compiling for the GPU.
        sum_splits: add the K-split partial sums (else return them, for a consumer kernel that
            adds them itself, such as `norm.add_rms_norm`).

    Returns:
        [M, N] float32; [split_k, M, N] partial sums with `sum_splits=False`.

    Raises:
        InputError: shapes, dtypes or tiling the kernel cannot take (before anything runs).
    """
    qtype, n_rows = _check_inputs(x, packed, qtype, n_cols, layer)
    p = plan(qtype, x.shape[0], n_rows, n_cols, block_sizes)
    out = _run(x, packed, qtype, p, interpret, layer)     # [split_k, M, N]
    return out.sum(axis=0) if sum_splits else out


def _check_inputs(x: jax.Array, packed: tuple[jax.Array, ...], qtype, n_cols: int,
                  layer) -> tuple[gguf.GGMLQuantizationType, int]:
    """The wrappers' shared checks of x and the packed arrays; returns (qtype, N)."""
    _format(qtype)
    qtype = T(qtype)
    _check_x(x, n_cols)
    return qtype, _check_packed(packed, qtype, n_cols, stacked=layer is not None)


def _run(x: jax.Array, packed: tuple[jax.Array, ...], qtype: gguf.GGMLQuantizationType, p: Plan,
         interpret: bool, layer, glu: bool = False) -> jax.Array:
    """`_launch` on x [M, K] for plan `p`: [split_k, M, N] (the padding rows dropped)."""
    fmt = _format(qtype)
    xs = _x_arrays(x, fmt, p.m_padded, _takes_int(fmt, p.block_sizes),
                   _takes_fused(fmt, p.block_sizes))
    out = _launch(xs, tuple(packed), fmt, p, interpret=interpret,
                  layer=_layer_index(layer), glu=glu)
    return out[:, : x.shape[0]]


def glu_block_sizes(qtype: gguf.GGMLQuantizationType, n_rows: int, n_cols: int,
                    m_rows: int = 1, tuned: BlockSizes | None = None) -> BlockSizes:
    """The default tiling of `qmatvec_glu_packed` for a gate/up matrix of `n_rows` = 2 F rows:
    `SHAPE_TUNED`'s for one x row where it has one, else the plain kernel's default for all of
    it (from `tuned` where given, as `BlockSizes.get_default` takes it) with the row tile halved
    (a program reads that many gate rows and as many up rows, so it loads what a plain program
    does) and no K-split (the product needs whole sums)."""
    shaped = None if tuned else _shape_tuned(qtype, n_rows, n_cols, m_rows, glu=True)
    if shaped is not None:
        return shaped
    bs = BlockSizes.get_default(qtype, n_rows, n_cols, m_rows, tuned)
    half = n_rows // 2
    block_n = max(_pow2_divisor(half, max(bs.block_n // 2, MIN_BLOCK_N)), MIN_BLOCK_N)
    return dataclasses.replace(bs, block_n=block_n, split_k=1,
                               fuse_x=_fuse_x(qtype, m_rows, glu=True))


def supports_glu(qtype: object, n_rows: int, n_cols: int) -> bool:
    """Whether `qmatvec_glu_packed` takes a gate/up matrix [n_rows = 2 F, n_cols] of `qtype`."""
    if not supports(qtype, n_rows, n_cols) or n_rows % 2:
        return False
    try:
        plan(qtype, 1, n_rows // 2, n_cols, glu_block_sizes(qtype, n_rows, n_cols))
    except InputError:
        return False
    return True


@functools.partial(jax.jit, static_argnames=("qtype", "n_cols", "block_sizes", "interpret"))
def qmatvec_glu_packed(x: jax.Array, packed: tuple[jax.Array, ...],
                       qtype: gguf.GGMLQuantizationType, n_cols: int, *,
                       block_sizes: BlockSizes | None = None, interpret: bool = False,
                       layer: jax.Array | None = None) -> jax.Array:
    """silu(x @ G^T) * (x @ U^T) for a feed-forward whose gate G and up U matrices are stacked
    by rows in one packed matrix [G; U] (`model.fuse_rows`): SwiGLU's input to the down
    projection, in one launch (the plain kernel would write both products and XLA would take
    another kernel for the product).

    Args:
        x: [M, K] float32 or bfloat16, 1 <= M <= 8.
        packed: `repack` of the [2 F, K] matrix [G; U], or L of them stacked with `layer`.
        qtype, n_cols: the GGML type and K (static).
        block_sizes: tiling, split_k 1; `glu_block_sizes(qtype, 2 F, K)` when None.
        interpret: run the Pallas interpreter (CPU) instead of compiling for the GPU.
        layer: int32 scalar index into stacked matrices, or None.

    Returns:
        [M, F] float32.

    Raises:
        InputError: shapes, dtypes or tiling the kernel cannot take (before anything runs).
    """
    qtype, n_rows = _check_inputs(x, packed, qtype, n_cols, layer)
    if n_rows % 2:
        raise InputError(f"a gate/up matrix has an even number of rows, got {n_rows}")
    bs = block_sizes or glu_block_sizes(qtype, n_rows, n_cols, x.shape[0])
    if bs.split_k != 1:
        raise InputError(f"qmatvec_glu_packed takes split_k=1, got {bs.split_k}")
    p = plan(qtype, x.shape[0], n_rows // 2, n_cols, bs)
    return _run(x, packed, qtype, p, interpret, layer, glu=True)[0]


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


@functools.lru_cache(maxsize=None)
def self_test(qtype: gguf.GGMLQuantizationType, interpret: bool = False) -> None:
    """Compile and run the kernel once for `qtype` on a small random matrix and compare it with
    `dequantize_packed` + a float64 product (once per process and type).

    For a caller that wants to fall back to XLA where the kernel cannot run (a GPU or Triton
    version that fails to compile it). Where the integer path (`INT_DOT`) fails but the float
    path passes, it logs a warning and sets `INT_DOT = False` for the process (and clears JAX's
    caches, so nothing traced with it is reused); likewise `FUSE_X = False` where only the
    in-kernel quantization of x fails. Raises whatever compiling or running raises, or
    NTransformerError when the result is wrong.
    """
    global INT_DOT, FUSE_X
    qtype = T(qtype)
    fmt = _format(qtype)
    if INT_DOT and FUSE_X and fmt.fused_x is not None:
        try:
            _check_kernel(qtype, interpret, int_dot=True, fuse_x=True)
            return
        except Exception as e:   # noqa: BLE001 -- any failure: try x quantized by the wrapper
            reason = one_line(e)
            try:
                _check_kernel(qtype, interpret, int_dot=True, fuse_x=False)
            except Exception:   # noqa: BLE001 -- the integer path fails too: try the float path
                pass
            else:
                logging.warning("qmatvec: quantizing x in the kernel fails for %s (%s); the"
                                " wrapper quantizes it", qtype.name, reason)
                FUSE_X = False
                jax.clear_caches()
                return
    if INT_DOT and fmt.int_x is not None:
        try:
            _check_kernel(qtype, interpret, int_dot=True, fuse_x=False)
            return
        except Exception as e:   # noqa: BLE001 -- any failure: try the float path
            reason = one_line(e)
            _check_kernel(qtype, interpret, int_dot=False)
            logging.warning("qmatvec: the integer path fails for %s (%s); using the float path",
                            qtype.name, reason)
            INT_DOT = False
            jax.clear_caches()
            return
    _check_kernel(qtype, interpret, int_dot=False)


def _check_kernel(qtype: gguf.GGMLQuantizationType, interpret: bool, int_dot: bool,
                  fuse_x: bool = False) -> None:
    """`self_test` of one path: the plain and the gate/up kernel on a 32 x 512 matrix."""
    n_rows, n_cols = 32, 512
    rng = np.random.default_rng(0)
    w = rng.integers(0, 256, (n_rows, quants.row_bytes(qtype, n_cols)), dtype=np.uint8)
    packed = tuple(jnp.asarray(rng.uniform(-0.05, 0.05, a.shape).astype(np.float16))
                   if a.dtype == jnp.float16 else a for a in repack(w, qtype, n_cols))
    packed = _format(qtype).split(_format(qtype).join(*packed))   # finite scales, consistent
    x = rng.standard_normal((1, n_cols)).astype(np.float32)
    bs = dataclasses.replace(BlockSizes.get_default(qtype, n_rows, n_cols), int_dot=int_dot,
                             fuse_x=fuse_x)
    y = np.asarray(qmatvec_packed(jnp.asarray(x), packed, qtype, n_cols, interpret=interpret,
                                  block_sizes=bs))
    w64 = np.asarray(dequantize_packed(packed, qtype, n_cols), np.float64)
    err = np.max(np.abs(y - x @ w64.T) / np.maximum(np.abs(x) @ np.abs(w64).T, 1e-30))
    path = ("integer, x quantized in the kernel" if int_dot and fuse_x
            else "integer" if int_dot else "float")
    if not err <= 1e-4:
        raise NTransformerError(f"qmatvec self-test for {qtype.name} ({path} path): relative"
                                f" error {err:.3g}")
    # The gate/up form on the same matrix (16 gate rows, 16 up rows).
    y = np.asarray(qmatvec_glu_packed(
        jnp.asarray(x), packed, qtype, n_cols, interpret=interpret,
        block_sizes=BlockSizes(block_n=8, block_k=_format(qtype).block, int_dot=int_dot,
                               fuse_x=fuse_x)))
    g, u = np.split(x @ w64.T, 2, axis=1)
    want = g / (1 + np.exp(-np.clip(g, -80, 80))) * u
    err = np.max(np.abs(y - want)) / max(np.max(np.abs(want)), 1e-30)
    if not err <= 1e-4:
        raise NTransformerError(f"qmatvec_glu self-test for {qtype.name} ({path} path): relative"
                                f" error {err:.3g}")


def qmatvec_reference(x: jax.Array, w_data: jax.Array, qtype: gguf.GGMLQuantizationType,
                      n_cols: int) -> jax.Array:
    """Plain-jnp `qmatvec`: `quants.dequantize` then an f32 einsum at HIGHEST precision.

    Materializes W in float32; for tests and as the fallback for types without a kernel.
    """
    w = quants.dequantize(jnp.asarray(w_data), qtype, n_cols)  # [N, K]
    return jnp.einsum("mk,nk->mn", jnp.asarray(x).astype(jnp.float32), w, precision=HIGHEST)
