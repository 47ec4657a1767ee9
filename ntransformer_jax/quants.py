"""Dequantization of GGML tensor types in JAX, bit-exact against `gguf.quants.dequantize`.

A GGML tensor row is a run of fixed-size blocks; each block packs `block_size` elements into
`type_size` bytes. `_GEOMETRY` holds those two numbers per type (from `gguf.GGML_QUANT_SIZES`), and
`_DEQUANTIZERS` maps each type to a function `blocks [..., type_size] uint8 -> [..., block_size]
float32`, registered with `@_register`. Field order and sizes in each docstring follow the C
structs in ggml's `ggml-common.h` (all multi-byte fields little-endian; `QK_K` = 256).

Bit-exactness: every float op mirrors gguf-py's numpy order (`d * scale` first, then `* q`, then
`- min` or `+ m`). Beyond that, the order cannot matter: a half `d` has 11 significant bits and
the integer factors add at most 13 more (a 6-bit scale times a 5-bit quant or a 7-bit IQ4 table
value), so every product except Q6_K's last multiply is exact in float32, and the one add or
subtract at the end is the only rounding. So XLA contracting `a * b - c` into a fused multiply-add
(which XLA CPU does) still gives the same bits.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntransformer_jax.errors import ModelFileError

T = gguf.GGMLQuantizationType

# blocks [..., type_size] uint8 -> values [..., block_size] float32
Dequantizer = Callable[[jax.Array], jax.Array]

_DEQUANTIZERS: dict[gguf.GGMLQuantizationType, Dequantizer] = {}

# Floating types whose arrays may arrive already typed instead of as raw bytes.
_FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})

# The non-linear 4-bit codebook of IQ4_NL and IQ4_XS (`kvalues_iq4nl` in ggml-common.h).
_KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _register(qtype: gguf.GGMLQuantizationType) -> Callable[[Dequantizer], Dequantizer]:
    def add(fn: Dequantizer) -> Dequantizer:
        assert qtype not in _DEQUANTIZERS, qtype
        _DEQUANTIZERS[qtype] = fn
        return fn
    return add


# ---------------------------------------------------------------------------------------------
# Bit helpers. All work on the last axis and keep any leading dims.
# ---------------------------------------------------------------------------------------------

def _fields(blocks: jax.Array, *widths: int) -> list[jax.Array]:
    """Split `blocks [..., type_size]` into consecutive byte fields of the given widths."""
    assert sum(widths) == blocks.shape[-1], (widths, blocks.shape)
    offsets = np.cumsum((0,) + widths)
    return [blocks[..., a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _f16(field: jax.Array) -> jax.Array:
    """A 2-byte little-endian IEEE half field `[..., 2]` as float32 `[..., 1]`."""
    return lax.bitcast_convert_type(field, jnp.float16).astype(jnp.float32)[..., None]


def _bits(x: jax.Array, width: int) -> jax.Array:
    """Cut each byte of `x [..., n]` into `8 // width` fields, lowest bits first.

    Returns `[..., 8 // width, n]`; `[..., j, i]` holds bits `[j*width, (j+1)*width)` of
    `x[..., i]`.
    """
    shifts = np.arange(0, 8, width, dtype=np.uint8)[:, None]  # [8 // width, 1]
    return (x[..., None, :] >> shifts) & np.uint8((1 << width) - 1)


def _bf16_to_f32(bits: jax.Array) -> jax.Array:
    """bfloat16 bit patterns (uint16) as float32, widened with integer ops only so no float
    rounding or denormal flushing can touch them."""
    return lax.bitcast_convert_type(bits.astype(jnp.uint32) << 16, jnp.float32)


def _flatten_last(x: jax.Array, n: int) -> jax.Array:
    """Merge the last `n` axes into one."""
    return x.reshape(*x.shape[:-n], -1)


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _lookup(table: tuple[int, ...], idx: jax.Array) -> jax.Array:
    """`table[idx]` as float32, for a 16-entry table (a small constant gather)."""
    return jnp.asarray(np.array(table, dtype=np.float32))[idx.astype(jnp.int32)]


# ---------------------------------------------------------------------------------------------
# Floating types (block_size 1).
# ---------------------------------------------------------------------------------------------

@_register(T.F32)
def _dequantize_f32(blocks: jax.Array) -> jax.Array:
    """F32: one IEEE single, 4 bytes little-endian."""
    return lax.bitcast_convert_type(blocks, jnp.float32)[..., None]


@_register(T.F16)
def _dequantize_f16(blocks: jax.Array) -> jax.Array:
    """F16: one IEEE half, 2 bytes little-endian."""
    return _f16(blocks)


@_register(T.BF16)
def _dequantize_bf16(blocks: jax.Array) -> jax.Array:
    """BF16: the high 16 bits of an IEEE single, 2 bytes little-endian."""
    return _bf16_to_f32(lax.bitcast_convert_type(blocks, jnp.uint16))[..., None]


# ---------------------------------------------------------------------------------------------
# Legacy 32-element quants.
# ---------------------------------------------------------------------------------------------

def _nibbles32(qs: jax.Array) -> jax.Array:
    """`qs [..., 16]` -> `[..., 32]`: the 16 low nibbles, then the 16 high nibbles."""
    return _flatten_last(_bits(qs, 4), 2)


def _high_bits32(qh: jax.Array) -> jax.Array:
    """`qh [..., 4]` (a little-endian uint32) -> `[..., 32]`: bit j of the word, as 0/1."""
    return _flatten_last(jnp.swapaxes(_bits(qh, 1), -1, -2), 2)


@_register(T.Q4_0)
def _dequantize_q4_0(blocks: jax.Array) -> jax.Array:
    """Q4_0, 32 elements in 18 bytes: `half d; uint8 qs[16]`.

    Element j < 16 is the low nibble of qs[j], element j + 16 its high nibble;
    y = d * (q - 8).
    """
    d, qs = _fields(blocks, 2, 16)
    q = _f32(_nibbles32(qs).astype(jnp.int8) - 8)
    return _f16(d) * q


@_register(T.Q4_1)
def _dequantize_q4_1(blocks: jax.Array) -> jax.Array:
    """Q4_1, 32 elements in 20 bytes: `half d; half m; uint8 qs[16]`.

    Nibbles as in Q4_0; y = (d * q) + m.
    """
    d, m, qs = _fields(blocks, 2, 2, 16)
    return _f16(d) * _f32(_nibbles32(qs)) + _f16(m)


@_register(T.Q5_0)
def _dequantize_q5_0(blocks: jax.Array) -> jax.Array:
    """Q5_0, 32 elements in 22 bytes: `half d; uint8 qh[4]; uint8 qs[16]`.

    Low 4 bits as in Q4_0; bit j of the little-endian uint32 `qh` is bit 4 of element j;
    y = d * (q - 16).
    """
    d, qh, qs = _fields(blocks, 2, 4, 16)
    q = _nibbles32(qs) | (_high_bits32(qh) << 4)
    return _f16(d) * _f32(q.astype(jnp.int8) - 16)


@_register(T.Q5_1)
def _dequantize_q5_1(blocks: jax.Array) -> jax.Array:
    """Q5_1, 32 elements in 24 bytes: `half d; half m; uint8 qh[4]; uint8 qs[16]`.

    Bits as in Q5_0; y = (d * q) + m.
    """
    d, m, qh, qs = _fields(blocks, 2, 2, 4, 16)
    q = _nibbles32(qs) | (_high_bits32(qh) << 4)
    return _f16(d) * _f32(q) + _f16(m)


@_register(T.Q8_0)
def _dequantize_q8_0(blocks: jax.Array) -> jax.Array:
    """Q8_0, 32 elements in 34 bytes: `half d; int8 qs[32]`; y = qs * d."""
    d, qs = _fields(blocks, 2, 32)
    return _f32(lax.bitcast_convert_type(qs, jnp.int8)) * _f16(d)


@_register(T.IQ4_NL)
def _dequantize_iq4_nl(blocks: jax.Array) -> jax.Array:
    """IQ4_NL, 32 elements in 18 bytes: `half d; uint8 qs[16]`.

    Nibbles as in Q4_0 index the non-linear table `kvalues_iq4nl`; y = d * kvalues[q].
    """
    d, qs = _fields(blocks, 2, 16)
    return _f16(d) * _lookup(_KVALUES_IQ4NL, _nibbles32(qs))


# ---------------------------------------------------------------------------------------------
# K-quants: 256-element super-blocks of 16 or 8 sub-blocks, each with its own scale.
# ---------------------------------------------------------------------------------------------

def _k_scale_min(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unpack Q4_K/Q5_K `scales [..., 12]` into eight 6-bit scales and eight 6-bit mins.

    Bytes 0-3 hold the low 6 bits of scales 0-3 (top 2 bits: high bits of scales 4-7), bytes 4-7
    the same for mins 0-3 / 4-7, bytes 8-11 the low nibbles of scales 4-7 (low) and mins 4-7 (high).
    Returns `(sc, mn)`, each `[..., 8]` uint8.
    """
    d, m, md = _fields(scales, 4, 4, 4)
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_nibbles(qs: jax.Array) -> jax.Array:
    """Q4_K/Q5_K `qs [..., 128]` -> `[..., 8, 32]`: chunk c of 32 bytes gives sub-blocks 2c (low
    nibbles) and 2c + 1 (high nibbles)."""
    lead = qs.shape[:-1]
    return _bits(qs.reshape(*lead, 4, 32), 4).reshape(*lead, 8, 32)


@_register(T.Q2_K)
def _dequantize_q2_k(blocks: jax.Array) -> jax.Array:
    """Q2_K, 256 elements in 84 bytes: `uint8 scales[16]; uint8 qs[64]; half d; half dmin`.

    scales[s]: low nibble scales, high nibble mins of sub-block s (16 elements). qs is two halves of
    32 bytes; half h, bit pair p, byte i is element 128h + 32p + i.
    y = (d * sc) * q - (dmin * mn).
    """
    scales, qs, d, dmin = _fields(blocks, 16, 64, 2, 2)
    dl = (_f16(d) * _f32(scales & 0x0F))[..., None]  # [..., 16, 1]
    ml = (_f16(dmin) * _f32(scales >> 4))[..., None]  # [..., 16, 1]
    lead = blocks.shape[:-1]
    q = _bits(qs.reshape(*lead, 2, 32), 2)  # [..., 2, 4, 32]
    q = _f32(q.reshape(*lead, 16, 16))
    return _flatten_last(dl * q - ml, 2)


@_register(T.Q3_K)
def _dequantize_q3_k(blocks: jax.Array) -> jax.Array:
    """Q3_K, 256 elements in 110 bytes: `uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; half d`.

    Low 2 bits of each element as in Q2_K qs; bit b of hmask[i] belongs to element 32b + i, and a
    clear bit subtracts 4. The 16 6-bit scales: low nibbles from scales[0:8] (low nibbles first,
    then high), high 2 bits from scales[8:12] (scale 4p + i uses bits 2p of byte 8 + i); each
    biased by 32. y = (d * (sc - 32)) * (q - 4 * !hbit).
    """
    hmask, qs, scales, d = _fields(blocks, 32, 64, 12, 2)
    lead = blocks.shape[:-1]
    low, high = _fields(scales, 8, 4)
    sc = _flatten_last(_bits(low, 4), 2) | (_flatten_last(_bits(high, 2), 2) << 4)  # [..., 16]
    dl = (_f16(d) * _f32(sc.astype(jnp.int8) - 32))[..., None]  # [..., 16, 1]
    ql = _bits(qs.reshape(*lead, 2, 32), 2).reshape(*lead, 16, 16)
    qh = _bits(hmask, 1).reshape(*lead, 16, 16) ^ 1
    q = _f32(ql.astype(jnp.int8) - (qh << 2).astype(jnp.int8))
    return _flatten_last(dl * q, 2)


@_register(T.Q4_K)
def _dequantize_q4_k(blocks: jax.Array) -> jax.Array:
    """Q4_K, 256 elements in 144 bytes: `half d; half dmin; uint8 scales[12]; uint8 qs[128]`.

    Eight sub-blocks of 32 with 6-bit scale and min (see `_k_scale_min`), nibbles per
    `_k_nibbles`. y = (d * sc) * q - (dmin * mn).
    """
    d, dmin, scales, qs = _fields(blocks, 2, 2, 12, 128)
    sc, mn = _k_scale_min(scales)
    dl = (_f16(d) * _f32(sc))[..., None]  # [..., 8, 1]
    ml = (_f16(dmin) * _f32(mn))[..., None]  # [..., 8, 1]
    return _flatten_last(dl * _f32(_k_nibbles(qs)) - ml, 2)


@_register(T.Q5_K)
def _dequantize_q5_k(blocks: jax.Array) -> jax.Array:
    """Q5_K, 256 elements in 176 bytes:
    `half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]`.

    As Q4_K, plus bit s of qh[i] is bit 4 of element i of sub-block s.
    y = (d * sc) * q - (dmin * mn).
    """
    d, dmin, scales, qh, qs = _fields(blocks, 2, 2, 12, 32, 128)
    sc, mn = _k_scale_min(scales)
    dl = (_f16(d) * _f32(sc))[..., None]  # [..., 8, 1]
    ml = (_f16(dmin) * _f32(mn))[..., None]  # [..., 8, 1]
    q = _k_nibbles(qs) | (_bits(qh, 1) << 4)  # [..., 8, 32]
    return _flatten_last(dl * _f32(q) - ml, 2)


@_register(T.Q6_K)
def _dequantize_q6_k(blocks: jax.Array) -> jax.Array:
    """Q6_K, 256 elements in 210 bytes: `uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d`.

    Two halves of 128 elements. Low 4 bits: half h, nibble n, byte i of ql[64h:64h+64] is element
    128h + 64n + i. High 2 bits: half h, bit pair p, byte i of qh[32h:32h+32] is element
    128h + 32p + i. Sub-blocks of 16 with signed 8-bit scales. y = (d * sc) * (q - 32).
    """
    ql, qh, scales, d = _fields(blocks, 128, 64, 16, 2)
    lead = blocks.shape[:-1]
    dl = (_f16(d) * _f32(lax.bitcast_convert_type(scales, jnp.int8)))[..., None]  # [..., 16, 1]
    lo = _bits(ql.reshape(*lead, 2, 64), 4).reshape(*lead, 256)
    hi = _bits(qh.reshape(*lead, 2, 32), 2).reshape(*lead, 256)
    q = ((lo | (hi << 4)).astype(jnp.int8) - 32).reshape(*lead, 16, 16)
    return _flatten_last(dl * _f32(q), 2)


@_register(T.IQ4_XS)
def _dequantize_iq4_xs(blocks: jax.Array) -> jax.Array:
    """IQ4_XS, 256 elements in 136 bytes:
    `half d; uint16 scales_h; uint8 scales_l[4]; uint8 qs[128]`.

    Eight sub-blocks of 32 with 6-bit scales biased by 32: low nibbles from scales_l (byte k // 2,
    low nibble first), high 2 bits from bits 2k of scales_h. Each sub-block's 16 bytes hold its
    32 nibbles as in Q4_0, indexing `kvalues_iq4nl`. y = (d * (sc - 32)) * kvalues[q].
    """
    d, scales_h, scales_l, qs = _fields(blocks, 2, 2, 4, 128)
    lead = blocks.shape[:-1]
    sc_lo = _flatten_last(jnp.swapaxes(_bits(scales_l, 4), -1, -2), 2)  # [..., 8]
    sc_hi = _flatten_last(jnp.swapaxes(_bits(scales_h, 2), -1, -2), 2)  # [..., 8]
    sc = sc_lo | (sc_hi << 4)
    dl = (_f16(d) * _f32(sc.astype(jnp.int8) - 32))[..., None]  # [..., 8, 1]
    q = _bits(qs.reshape(*lead, 8, 16), 4).reshape(*lead, 8, 32)
    return _flatten_last(dl * _lookup(_KVALUES_IQ4NL, q), 2)


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------

SUPPORTED_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(_DEQUANTIZERS)

# (block_size elements, type_size bytes) per supported type.
_GEOMETRY: dict[gguf.GGMLQuantizationType, tuple[int, int]] = {
    qtype: tuple(gguf.GGML_QUANT_SIZES[qtype]) for qtype in _DEQUANTIZERS}


def _type_name(qtype: object) -> str:
    try:
        return gguf.GGMLQuantizationType(qtype).name
    except ValueError:
        return f"#{qtype}"


def _as_type(qtype: object) -> gguf.GGMLQuantizationType:
    """`qtype` as a supported enum member, or ModelFileError naming it."""
    try:
        member = gguf.GGMLQuantizationType(qtype)
    except ValueError:
        member = None
    if member not in _GEOMETRY:
        raise ModelFileError(f"unsupported quantization type {_type_name(qtype)}")
    return member


def check_supported(qtype: gguf.GGMLQuantizationType, tensor_name: str) -> None:
    """Raise ModelFileError unless tensors of `qtype` can be dequantized."""
    try:
        _as_type(qtype)
    except ModelFileError:
        raise ModelFileError(
            f"unsupported quantization type {_type_name(qtype)} for tensor {tensor_name}") from None


def block_geometry(qtype: gguf.GGMLQuantizationType) -> tuple[int, int]:
    """Block geometry of a supported GGML type.

    Returns:
        `(block_size, type_size)`: elements per block and bytes per block.

    Raises:
        ModelFileError: `qtype` is not in SUPPORTED_TYPES.
    """
    return _GEOMETRY[_as_type(qtype)]


def row_bytes(qtype: gguf.GGMLQuantizationType, n_cols: int) -> int:
    """Bytes in one row of `n_cols` elements of type `qtype`.

    Raises:
        ModelFileError: unsupported type, or `n_cols` not a multiple of the block size.
    """
    block_size, type_size = block_geometry(qtype)
    if n_cols % block_size:
        raise ModelFileError(
            f"{n_cols=} is not a multiple of the {_type_name(qtype)} block size {block_size}")
    return n_cols // block_size * type_size


def dequantize(data: jax.Array, qtype: gguf.GGMLQuantizationType,
               n_cols: int | None = None) -> jax.Array:
    """Dequantize rows of a GGML tensor to float32; pure jnp, jit-friendly with `qtype` static.

    Args:
        data: raw uint8 bytes `[..., row_bytes]`. For F32/F16/BF16 also accepted: an array of any
            floating dtype `[..., n_cols]` (the values are widened to float32).
        qtype: the GGML type of `data`.
        n_cols: elements per row; if given, must agree with the last axis of `data`.

    Returns:
        float32 `[..., n_cols]`, bit-identical to `gguf.quants.dequantize` on the same bytes.

    Raises:
        ModelFileError: unsupported type, ragged row, or `n_cols` that disagrees with `data`.
    """
    qtype = _as_type(qtype)
    data = jnp.asarray(data)
    block_size, type_size = _GEOMETRY[qtype]
    lead, width = data.shape[:-1], data.shape[-1]
    if qtype in _FLOAT_TYPES and jnp.issubdtype(data.dtype, jnp.floating):
        if n_cols is not None and n_cols != width:
            raise ModelFileError(f"{n_cols=} but the {qtype.name} array has {width} columns")
        if data.dtype == jnp.bfloat16:
            return _bf16_to_f32(lax.bitcast_convert_type(data, jnp.uint16))
        return data.astype(jnp.float32)
    if data.dtype != jnp.uint8:
        raise ModelFileError(f"{qtype.name} data must be uint8 bytes, got dtype {data.dtype}")
    if width % type_size:
        raise ModelFileError(
            f"row of {width} bytes is not a whole number of {qtype.name} blocks"
            f" of {type_size} bytes")
    if n_cols is not None and row_bytes(qtype, n_cols) != width:
        raise ModelFileError(
            f"{n_cols=} needs {row_bytes(qtype, n_cols)} bytes per {qtype.name} row, got {width}")
    blocks = data.reshape(*lead, width // type_size, type_size)
    values = _DEQUANTIZERS[qtype](blocks)  # [..., n_blocks, block_size]
    return values.reshape(*lead, width // type_size * block_size)
