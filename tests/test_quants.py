"""Bit-exact tests of `ntransformer_jax.quants` against gguf-py's numpy dequantizers.

Every test draws fresh random data. The seed is in each failure message; rerun one with
`QUANTS_TEST_SEED=<seed> python -m pytest tests/test_quants.py`.
"""

from __future__ import annotations

import os
import secrets

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntransformer_jax import quants
from ntransformer_jax.errors import ModelFileError

T = gguf.GGMLQuantizationType

FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# Byte offsets of the half-precision fields (d, dmin, m) inside one block, from the block structs
# in ggml-common.h. Random bytes there could encode inf/NaN, so tests overwrite them.
HALF_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.IQ4_NL: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_XS: (0,),
}
ROWS = (1, 3, 17)
COLS_K = (256, 512, 4096)  # types with 256-element blocks
COLS_32 = (32, 96, 256, 4096)  # types with 32-element (or 1-element) blocks

_jit_dequantize = jax.jit(quants.dequantize, static_argnums=(1, 2))


def _cases():
    for qtype in sorted(quants.SUPPORTED_TYPES):
        cols = COLS_K if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else COLS_32
        for n_rows in ROWS:
            for n_cols in cols:
                yield pytest.param(qtype, n_rows, n_cols, id=f"{qtype.name}-{n_rows}x{n_cols}")


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("QUANTS_TEST_SEED", secrets.randbits(63)))


# format: (bits dtype, exponent mask, top exponent bit)
_FLOAT_BITS = {
    "f16": (np.uint16, 0x7C00, 0x4000),
    "bf16": (np.uint16, 0x7F80, 0x4000),
    "f32": (np.uint32, 0x7F800000, 0x40000000),
}


def _finite_bits(rng: np.random.Generator, shape, fmt: str) -> np.ndarray:
    """Random bit patterns of float format `fmt` ("f16", "bf16", "f32"), all finite.

    Covers zeros, subnormals and huge values; a pattern with an all-ones exponent (inf/NaN) has its
    top exponent bit cleared, which makes it finite.
    """
    dtype, exponent, top = _FLOAT_BITS[fmt]
    bits = rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)
    return np.where(bits & exponent == exponent, bits ^ top, bits).astype(dtype)


def _random_rows(rng: np.random.Generator, qtype, n_rows: int, n_cols: int) -> np.ndarray:
    """Random raw bytes `[n_rows, row_bytes]` of `qtype` whose floats are all finite."""
    if qtype in FLOAT_TYPES:
        fmt = {T.F32: "f32", T.F16: "f16", T.BF16: "bf16"}[qtype]
        return _finite_bits(rng, (n_rows, n_cols), fmt).view(np.uint8)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = n_cols // block_size
    blocks = rng.integers(0, 256, size=(n_rows, n_blocks, type_size), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        halves = _finite_bits(rng, (n_rows, n_blocks), "f16")
        blocks[..., offset:offset + 2] = halves.view(np.uint8).reshape(n_rows, n_blocks, 2)
    return blocks.reshape(n_rows, n_blocks * type_size)


def _assert_bits_equal(got, want: np.ndarray, context: str) -> None:
    """Float32 arrays identical bit for bit (so -0.0 vs 0.0 counts as a difference)."""
    got = np.asarray(got)
    assert got.dtype == np.float32, f"{context}: dtype {got.dtype}"
    assert got.shape == want.shape, f"{context}: shape {got.shape} != {want.shape}"
    assert np.isfinite(want).all(), f"{context}: reference has non-finite values (bad test data)"
    diff = got.view(np.uint32) != want.astype(np.float32).view(np.uint32)
    if diff.any():
        idx = tuple(int(i[0]) for i in np.nonzero(diff))
        pytest.fail(f"{context}: {int(diff.sum())} of {diff.size} values differ, "
                    f"first at {idx}: got {got[idx]!r}, gguf {want[idx]!r}")


def test_every_supported_type_has_test_data():
    assert quants.SUPPORTED_TYPES == frozenset(HALF_FIELDS) | frozenset(FLOAT_TYPES)
    required = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
    assert required <= quants.SUPPORTED_TYPES


@pytest.mark.parametrize("qtype, n_rows, n_cols", list(_cases()))
def test_random_bytes_match_gguf(qtype, n_rows, n_cols, seed):
    rng = np.random.default_rng(seed)
    raw = _random_rows(rng, qtype, n_rows, n_cols)
    want = gguf.quants.dequantize(raw, qtype)
    assert np.count_nonzero(want), f"{seed=}: all-zero reference is too weak a test"
    got = _jit_dequantize(jnp.asarray(raw), qtype, n_cols)
    _assert_bits_equal(got, want, f"{qtype.name} {n_rows}x{n_cols} {seed=}")


@pytest.mark.parametrize("qtype", sorted(quants.SUPPORTED_TYPES), ids=lambda t: t.name)
def test_eager_matches_gguf(qtype, seed):
    rng = np.random.default_rng(seed)
    n_cols = gguf.GGML_QUANT_SIZES[qtype][0] * 2 if qtype not in FLOAT_TYPES else 64
    raw = _random_rows(rng, qtype, 2, n_cols)
    got = quants.dequantize(jnp.asarray(raw), qtype)
    _assert_bits_equal(got, gguf.quants.dequantize(raw, qtype), f"{qtype.name} eager {seed=}")


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows, n_cols", [(1, 32), (3, 96), (17, 4096)])
def test_quantized_weights_match_gguf(qtype, n_rows, n_cols, seed):
    rng = np.random.default_rng(seed)
    # Weights with outliers and a per-row offset, as real tensors have.
    x = (rng.standard_normal((n_rows, n_cols)) * 0.02 + rng.standard_normal((n_rows, 1)) * 0.01)
    x = x.astype(np.float32)
    packed = gguf.quants.quantize(x, qtype)
    raw = np.ascontiguousarray(packed).view(np.uint8)
    want = gguf.quants.dequantize(packed, qtype)
    context = f"{qtype.name} {n_rows}x{n_cols} {seed=}"
    got = _jit_dequantize(jnp.asarray(raw), qtype, n_cols)
    _assert_bits_equal(got, want, context)
    # The round trip must land near the input, so `quantize` really produced this format. The
    # worst legitimate case is Q4_0: the largest magnitude maps to -8 d, so a value of the other
    # sign as large clamps at +7 d, off by d = max / 8 (rounding elsewhere is at most d / 2).
    err = np.abs(np.asarray(got) - x).max()
    assert err <= 0.13 * np.abs(x).max(), f"{context}: round-trip error {err}"


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_typed_float_arrays(qtype, seed):
    rng = np.random.default_rng(seed)
    raw = _random_rows(rng, qtype, 5, 96)
    dtype = {T.F32: np.float32, T.F16: np.float16, T.BF16: jnp.bfloat16}[qtype]
    # The smallest subnormal first: widening must keep it, not flush it to zero.
    raw[0, :np.dtype(dtype).itemsize] = 0
    raw[0, 0] = 1
    typed = jnp.asarray(raw.view(dtype))
    assert typed.shape == (5, 96)
    want = gguf.quants.dequantize(raw, qtype)
    context = f"{qtype.name} typed {seed=}"
    _assert_bits_equal(quants.dequantize(typed, qtype), want, context)
    _assert_bits_equal(_jit_dequantize(typed, qtype, 96), want, context + " jit")


@pytest.mark.parametrize("qtype", [T.BF16, T.Q5_1, T.Q4_K, T.Q6_K, T.IQ4_XS], ids=lambda t: t.name)
def test_leading_dims_under_jit(qtype, seed):
    rng = np.random.default_rng(seed)
    n_cols = 512
    raw = _random_rows(rng, qtype, 6, n_cols)
    want = gguf.quants.dequantize(raw, qtype)
    context = f"{qtype.name} {seed=}"

    batched = jnp.asarray(raw.reshape(2, 3, -1))
    got = jax.jit(lambda d: quants.dequantize(d, qtype))(batched)
    _assert_bits_equal(got, want.reshape(2, 3, n_cols), context + " [2, 3, bytes]")

    got = jax.jit(lambda d: quants.dequantize(d, qtype, n_cols))(jnp.asarray(raw[4]))
    _assert_bits_equal(got, want[4], context + " one row")

    # vmap over a stack of matrices, as a layer-stacked weight would be.
    got = jax.vmap(lambda d: quants.dequantize(d, qtype))(batched)
    _assert_bits_equal(got, want.reshape(2, 3, n_cols), context + " vmap")


def test_geometry_and_row_bytes():
    assert quants.block_geometry(T.Q4_0) == (32, 18)
    assert quants.block_geometry(T.Q8_0) == (32, 34)
    assert quants.block_geometry(T.Q4_K) == (256, 144)
    assert quants.block_geometry(T.Q6_K) == (256, 210)
    assert quants.block_geometry(T.BF16) == (1, 2)
    assert quants.row_bytes(T.Q4_K, 4096) == 16 * 144
    assert quants.row_bytes(T.Q5_0, 96) == 3 * 22
    assert quants.row_bytes(T.F32, 7) == 28
    assert quants.row_bytes(T.F16, 7) == 14


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.IQ2_XXS, T.Q8_K, T.Q4_1 + 1000], ids=str)
def test_unsupported_types_raise(qtype):
    with pytest.raises(ModelFileError, match="unsupported quantization type"):
        quants.block_geometry(qtype)
    with pytest.raises(ModelFileError, match="unsupported quantization type"):
        quants.dequantize(jnp.zeros((1, 256), jnp.uint8), qtype)
    with pytest.raises(ModelFileError, match=r"blk\.0\.attn_q\.weight"):
        quants.check_supported(qtype, "blk.0.attn_q.weight")


def test_check_supported_message():
    with pytest.raises(ModelFileError) as info:
        quants.check_supported(T.IQ2_XXS, "blk.3.ffn_down.weight")
    want = "unsupported quantization type IQ2_XXS for tensor blk.3.ffn_down.weight"
    assert str(info.value) == want
    for qtype in quants.SUPPORTED_TYPES:
        quants.check_supported(qtype, "token_embd.weight")


def test_ragged_columns_raise():
    with pytest.raises(ModelFileError, match="n_cols=300"):
        quants.row_bytes(T.Q4_K, 300)
    with pytest.raises(ModelFileError, match="n_cols=33"):
        quants.row_bytes(T.Q4_0, 33)
    with pytest.raises(ModelFileError, match="145 bytes"):
        quants.dequantize(jnp.zeros((2, 145), jnp.uint8), T.Q4_K)
    with pytest.raises(ModelFileError, match="n_cols=512"):
        quants.dequantize(jnp.zeros((2, 144), jnp.uint8), T.Q4_K, 512)
    with pytest.raises(ModelFileError, match="n_cols=96"):
        quants.dequantize(jnp.zeros((2, 32), jnp.float16), T.F16, 96)
    with pytest.raises(ModelFileError, match="dtype int32"):
        quants.dequantize(jnp.zeros((2, 144), jnp.int32), T.Q4_K)
