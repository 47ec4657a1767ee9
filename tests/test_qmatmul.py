"""Tests of `ntransformer_jax.kernels.qmatmul` in Pallas interpret mode (CPU).

Kernel results are compared with gguf-py's numpy dequantization followed by a float64 matmul,
on fresh random weights (helpers shared with test_kernels.py). The seed is in each failure
message; rerun one with `KERNELS_TEST_SEED=<seed> python -m pytest tests/test_qmatmul.py`. On a
GPU, run the same tests compiled with `KERNELS_INTERPRET=0`.
"""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import INTERPRET, TYPES, random_weight, random_x, seed  # noqa: F401

from ntransformer_jax import quants
from ntransformer_jax.errors import InputError
from ntransformer_jax.kernels import qmatmul as qmm
from ntransformer_jax.kernels import qmatvec as qm

T = gguf.GGMLQuantizationType
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # of |x| @ |W|^T, per compute dtype


def check_close(y, x, w_data: np.ndarray, qtype: T, rtol: float, msg: str) -> None:
    """|y - x @ W^T| <= rtol * (|x| @ |W|^T) elementwise, in float64 on gguf-py's dequantization."""
    w = gguf.quants.dequantize(w_data, qtype).astype(np.float64)  # [N, K]
    x64 = np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)
    want, scale = x64 @ w.T, np.abs(x64) @ np.abs(w).T
    y = np.asarray(y, dtype=np.float64)
    assert y.shape == want.shape, msg
    err = np.max(np.abs(y - want) / np.maximum(scale, np.finfo(np.float64).tiny))
    assert err <= rtol, f"{msg}: relative error {err:.3g} > {rtol}"


def _unit(qtype: T) -> int:
    """K per case unit: 64 values for the 32-value types, one super-block for the K-quants."""
    return max(gguf.GGML_QUANT_SIZES[qtype][0], 64)


def _smallest_tiles(qtype: T) -> qmm.BlockSizes:
    return qmm.BlockSizes(block_m=16, block_n=16, block_k=qm._FORMATS[qtype].block)


# (M, N, K in units of `_unit`, block sizes: None for the default, or "small" tiles).
# K = 3 units is a ragged number of chunks; M = 40 is padded (to 48).
CASES = (
    (16, 32, 4, None),
    (40, 32, 3, "small"),
    (128, 64, 3, None),
)


def _case_params():
    for qtype in TYPES:
        for m, n, k, bs in CASES:
            for dtype in (jnp.float32, jnp.bfloat16):
                name = f"{qtype.name}-m{m}-{n}x{k}u-{jnp.dtype(dtype).name}"
                name += f"-{bs}" if bs else ""
                yield pytest.param(qtype, m, n, k, bs, dtype, id=name)


@pytest.mark.parametrize("qtype,m_rows,n_rows,units,tiles,dtype", _case_params())
def test_qmatmul_matches_float64(seed, qtype, m_rows, n_rows, units, tiles, dtype):
    rng = np.random.default_rng(seed)
    n_cols = units * _unit(qtype)
    w_data = random_weight(rng, qtype, n_rows, n_cols)
    x = random_x(rng, m_rows, n_cols, jnp.float32)
    bs = _smallest_tiles(qtype) if tiles == "small" else None
    packed = qm.repack(w_data, qtype)
    y = qmm.qmatmul_packed(x, packed, qtype, n_cols, block_sizes=bs, dtype=dtype,
                           interpret=INTERPRET)
    assert y.dtype == jnp.float32
    check_close(y, x, w_data, qtype, RTOL[dtype], f"kernel, seed={seed}")
    ref = qmm.qmatmul_reference(x, packed, qtype, n_cols, dtype=dtype)
    check_close(ref, x, w_data, qtype, RTOL[dtype], f"reference, seed={seed}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantized_planes_are_bit_exact(seed, qtype):
    """The kernel's in-register dequantization (run on whole arrays) gives `quants.dequantize`'s
    floats bit for bit, in the column order of the x planes."""
    rng = np.random.default_rng(seed)
    n_cols = 2 * _unit(qtype)
    w_data = random_weight(rng, qtype, 16, n_cols)
    got = qmm.dequantize_planes(qm.repack(w_data, qtype), qtype)
    want = qmm.x_planes(quants.dequantize(jnp.asarray(w_data), qtype, n_cols), qtype)
    assert len(got) == len(want) == (1 if qtype == T.Q8_0 else 2)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g).view(np.uint32), np.asarray(w).view(np.uint32),
                                      err_msg=f"seed={seed}")


@pytest.mark.parametrize("qtype,dtype", [(T.Q8_0, jnp.float32), (T.Q4_K, jnp.bfloat16),
                                         (T.Q6_K, jnp.float32)],
                         ids=["Q8_0-float32", "Q4_K-bfloat16", "Q6_K-float32"])
def test_stacked_layer_index(seed, qtype, dtype):
    """Packed arrays stacked over layers plus a traced layer index give that layer's product,
    under an outer jit."""
    rng = np.random.default_rng(seed)
    n_cols = 2 * _unit(qtype)
    ws = [random_weight(rng, qtype, 32, n_cols) for _ in range(3)]
    stack = tuple(jnp.stack(a) for a in zip(*(qm.repack(w, qtype) for w in ws)))
    x = random_x(rng, 20, n_cols, jnp.float32)
    f = jax.jit(lambda x, s, i: qmm.qmatmul_packed(
        x, s, qtype, n_cols, layer=i, dtype=dtype, interpret=INTERPRET,
        block_sizes=_smallest_tiles(qtype)))
    for i in (2, 0):
        check_close(f(x, stack, jnp.int32(i)), x, ws[i], qtype, RTOL[dtype],
                    f"layer {i}, seed={seed}")
    ref = qmm.qmatmul_reference(x, stack, qtype, n_cols, dtype=dtype, layer=1)
    check_close(ref, x, ws[1], qtype, RTOL[dtype], f"reference, seed={seed}")


def test_default_tiling():
    bs = qmm.BlockSizes.get_default
    assert bs(T.Q4_0, 300, 4096, 4096) == qmm.BlockSizes(64, 64, 128, num_warps=4)
    assert bs(T.Q4_K, 40, 1024, 4096) == qmm.BlockSizes(64, 64, 256, num_warps=8)
    assert bs(T.Q8_0, 3, 48, 96) == qmm.BlockSizes(16, 16, 32, num_warps=4)
    p = qmm.plan(T.Q6_K, 300, 28672, 8192)
    assert p.grid == (5, 448) and p.m_padded == 320 and p.n_chunks == 64


# ---------------------------------------------------------------------------------------------
# Validation: clear errors before launch.
# ---------------------------------------------------------------------------------------------

def _q4_0(n_rows=64, n_cols=256):
    return qm.repack(random_weight(np.random.default_rng(1), T.Q4_0, n_rows, n_cols), T.Q4_0)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(qtype=T.Q2_K), r"qmatmul has no kernel for type Q2_K \(supported: Q4_0, "),
    (dict(qtype=12345), r"qmatmul has no kernel for type #12345"),
    (dict(dtype=jnp.float16), r"dtype=float16 must be bfloat16 or float32"),
    (dict(x=jnp.ones((256,))), r"x must be \[M, K\]"),
    (dict(x=jnp.ones((4, 256), jnp.int32)), r"x must be float32, bfloat16 or float16"),
    (dict(x=jnp.ones((4, 288))), r"x has 288 columns but n_cols=256"),
    (dict(x=jnp.ones((0, 256))), r"x has m_rows=0 rows"),
    (dict(n_cols=240, x=jnp.ones((4, 240))), r"n_cols=240 must be a positive multiple of 32"),
    (dict(packed=_q4_0()[::-1]), r"packed Q4_0 arrays have shapes"),
    (dict(qtype=T.Q8_0), r"packed Q8_0 arrays have shapes"),
    (dict(packed=_q4_0(40)), r"n_rows=40 must be a multiple of block_n=16"),
    (dict(layer=jnp.int32(0)), r"packed Q4_0 arrays have shapes"),
    (dict(block_sizes=qmm.BlockSizes(block_m=24)), r"block_m=24 must be a power of two"),
    (dict(block_sizes=qmm.BlockSizes(block_m=8)), r"block_m=8 must be at least 16"),
    (dict(block_sizes=qmm.BlockSizes(block_n=8)), r"block_n=8 must be at least 16"),
    (dict(block_sizes=qmm.BlockSizes(block_k=96)), r"block_k=96 must be a power of two"),
    (dict(block_sizes=qmm.BlockSizes(block_k=16)), r"block_k=16 must be a multiple of 32"),
    (dict(block_sizes=qmm.BlockSizes(block_n=128)),
     r"n_rows=64 must be a multiple of block_n=128"),
    (dict(block_sizes=qmm.BlockSizes(block_k=512)),
     r"n_cols=256 must be a multiple of block_k=512"),
])
def test_invalid_inputs_raise(kwargs, pattern):
    args = dict(x=jnp.ones((4, 256), jnp.float32), packed=_q4_0(), qtype=T.Q4_0, n_cols=256)
    args.update(kwargs)
    with pytest.raises(InputError, match=pattern):
        qmm.qmatmul_packed(args.pop("x"), args.pop("packed"), args.pop("qtype"),
                           args.pop("n_cols"), interpret=INTERPRET, **args)


def test_bad_layer_and_k_quant_block_k():
    stack = tuple(a[None] for a in _q4_0())
    x = jnp.ones((4, 256), jnp.float32)
    for layer in (jnp.zeros(2, jnp.int32), jnp.float32(0)):
        with pytest.raises(InputError, match=r"layer must be an integer scalar"):
            qmm.qmatmul_packed(x, stack, T.Q4_0, 256, layer=layer, interpret=INTERPRET)
    packed = qm.repack(random_weight(np.random.default_rng(2), T.Q6_K, 32, 512), T.Q6_K)
    with pytest.raises(InputError, match=r"block_k=64 must be a multiple of 128 for Q6_K"):
        qmm.qmatmul_packed(jnp.ones((4, 512)), packed, T.Q6_K, 512,
                           block_sizes=qmm.BlockSizes(block_n=16, block_k=64),
                           interpret=INTERPRET)
