"""Tests of `ntransformer_jax.kernels.qmatvec` in Pallas interpret mode (CPU).

Every kernel result is compared with gguf-py's numpy dequantization followed by a float64 matmul,
on fresh random weights. The seed is in each failure message; rerun one with
`KERNELS_TEST_SEED=<seed> python -m pytest tests/test_kernels.py`. On a GPU, run the same tests
compiled with `KERNELS_INTERPRET=0`.
"""

from __future__ import annotations

import dataclasses
import os
import secrets

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntransformer_jax import quants
from ntransformer_jax.errors import InputError, NTransformerError
from ntransformer_jax.kernels import qmatvec as qm

T = gguf.GGMLQuantizationType
INTERPRET = os.environ.get("KERNELS_INTERPRET", "1") != "0"

LEGACY = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0)  # gguf-py can quantize these
K_QUANTS = (T.Q4_K, T.Q5_K, T.Q6_K)  # random bytes with finite half fields
# Byte offsets of the half fields (d, dmin) in one K-quant super-block (ggml-common.h).
K_HALF_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
TYPES = LEGACY + K_QUANTS
INT_TYPES = [t for t in TYPES if qm._format(t).fused_x is not None]

# (N, K, M, x dtype, block sizes or None for the default)
CASES = (
    (64, 256, 1, jnp.float32, None),
    (256, 512, 3, jnp.float32, None),
    (64, 512, 8, jnp.float32, None),
    (64, 256, 3, jnp.bfloat16, None),
    (96, 512, 2, jnp.float32, qm.BlockSizes(block_n=32, block_k=256, split_k=2)),
    (64, 512, 3, jnp.float32, qm.BlockSizes(block_n=16, block_k=256, int_dot=False)),
)
RTOL = 1e-5


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("KERNELS_TEST_SEED", secrets.randbits(63)))


def random_weight(rng: np.random.Generator, qtype: T, n_rows: int, n_cols: int) -> np.ndarray:
    """uint8 [n_rows, row_bytes] of valid GGUF blocks with finite scales."""
    if qtype in LEGACY:
        w = rng.standard_normal((n_rows, n_cols)).astype(np.float32) * rng.uniform(0.01, 2.0)
        return gguf.quants.quantize(w, qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_rows, n_cols // block_size, type_size), dtype=np.uint8)
    for offset in K_HALF_FIELDS[qtype]:
        half = (rng.standard_normal(blocks.shape[:2]) * 0.01).astype(np.float16)
        blocks[..., offset:offset + 2] = half[..., None].view(np.uint8)
    return blocks.reshape(n_rows, -1)


def random_x(rng: np.random.Generator, m_rows: int, n_cols: int, dtype) -> jax.Array:
    return jnp.asarray(rng.standard_normal((m_rows, n_cols)).astype(np.float32), dtype=dtype)


def x_quant_bound(x64: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What the integer path may add to |y - x @ W^T|: x is rounded to s q per 32-value block,
    s = max|x| / X_QMAX, so |x - s q| <= s / 2 per element (0.51: the rounding of x / s itself),
    times |W|: [M, N]."""
    m, k = x64.shape
    s = np.abs(x64).reshape(m, k // 32, 32).max(axis=-1) / qm.X_QMAX
    return np.repeat(0.51 * s, 32, axis=1) @ np.abs(w).T


def check_close(y: jax.Array, x: jax.Array, w_data: np.ndarray, qtype: T, msg: str,
                int_dot: bool = False) -> None:
    """|y - x @ W^T| <= RTOL * (|x| @ |W|^T) elementwise, in float64 on gguf-py's dequantization;
    with `int_dot` (the kernel quantized x to 16 bits) plus `x_quant_bound`."""
    w = gguf.quants.dequantize(w_data, qtype).astype(np.float64)  # [N, K]
    x64 = np.asarray(x.astype(jnp.float32), dtype=np.float64)
    want, scale = x64 @ w.T, np.abs(x64) @ np.abs(w).T
    y = np.asarray(y, dtype=np.float64)
    assert y.shape == want.shape, msg
    if int_dot:
        excess = np.abs(y - want) - x_quant_bound(x64, w)
        err = np.max(excess / np.maximum(scale, np.finfo(np.float64).tiny))
    else:
        err = np.max(np.abs(y - want) / np.maximum(scale, np.finfo(np.float64).tiny))
    assert err <= RTOL, f"{msg}: relative error {err:.3g} > {RTOL}"


def takes_int(qtype: T, block_sizes: qm.BlockSizes | None = None) -> bool:
    """Whether a launch of `qtype` with `block_sizes` (None: the default) takes the integer path."""
    bs = block_sizes or qm.BlockSizes(int_dot=qm.INT_DOT)
    return qm._takes_int(qm._format(qtype), bs)


def _case_params():
    for qtype in TYPES:
        for n, k, m, dtype, bs in CASES:
            name = f"{qtype.name}-{n}x{k}-m{m}-{jnp.dtype(dtype).name}" + ("-split" if bs else "")
            yield pytest.param(qtype, n, k, m, dtype, bs, id=name)


@pytest.mark.parametrize("qtype,n_rows,n_cols,m_rows,dtype,block_sizes", _case_params())
def test_qmatvec_matches_float64(seed, qtype, n_rows, n_cols, m_rows, dtype, block_sizes):
    rng = np.random.default_rng(seed)
    w_data = random_weight(rng, qtype, n_rows, n_cols)
    x = random_x(rng, m_rows, n_cols, dtype)
    y = qm.qmatvec(x, w_data, qtype, n_cols, block_sizes=block_sizes, interpret=INTERPRET)
    assert y.dtype == jnp.float32
    check_close(y, x, w_data, qtype, f"kernel, seed={seed}", takes_int(qtype, block_sizes))
    ref = qm.qmatvec_reference(x, w_data, qtype, n_cols)
    check_close(ref, x, w_data, qtype, f"reference, seed={seed}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_every_output_element_is_written(seed, qtype):
    """The raw kernel output (all K-splits, padded x rows included) starts as NaN; none may stay."""
    rng = np.random.default_rng(seed)
    n_rows, n_cols, m_rows = 64, 512, 3
    w_data = random_weight(rng, qtype, n_rows, n_cols)
    x = random_x(rng, m_rows, n_cols, jnp.float32)
    fmt = qm._format(qtype)
    p = qm.plan(qtype, m_rows, n_rows, n_cols, qm.BlockSizes(block_n=16, block_k=256, split_k=2))
    poison = jnp.full((2, p.m_padded, n_rows), jnp.nan, jnp.float32)
    out = qm._launch(qm._x_arrays(x, fmt, p.m_padded, qm._takes_int(fmt, p.block_sizes),
                                  qm._takes_fused(fmt, p.block_sizes)),
                     qm.repack(w_data, qtype), fmt, p,
                     interpret=INTERPRET, out_init=poison)
    assert out.shape == (2, 4, n_rows)
    assert not np.isnan(np.asarray(out)).any(), f"unwritten output elements, seed={seed}"
    assert not np.asarray(out[:, m_rows:]).any(), "padded x rows must give zeros"
    check_close(out.sum(0)[:m_rows], x, w_data, qtype, f"seed={seed}",
                takes_int(qtype, p.block_sizes))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_repack_size(qtype):
    """Repacking moves bytes; K-quants grow a little (the module docstring's table)."""
    rng = np.random.default_rng(0)
    w_data = random_weight(rng, qtype, 16, 512)
    packed = qm.repack(w_data, qtype)
    size = sum(a.size * a.dtype.itemsize for a in packed)
    grow = {T.Q4_K: (148, 144), T.Q5_K: (180, 176), T.Q6_K: (212, 210)}.get(qtype, (1, 1))
    assert size == w_data.nbytes * grow[0] // grow[1]
    assert all(a.shape[0] == 16 for a in packed)
    assert [(a.shape, a.dtype) for a in packed] == [
        (s.shape, s.dtype) for s in qm.packed_shapes(qtype, 16, 512)]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_packed_is_bit_exact(seed, qtype):
    """Repack then dequantize_packed gives gguf-py's floats bit for bit (random bytes: every
    bit pattern of the scale fields, not only what a quantizer writes)."""
    rng = np.random.default_rng(seed)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    w_data = random_weight(rng, qtype, 8, 1024)
    w_data[:4] = rng.integers(0, 256, w_data[:4].shape, dtype=np.uint8)  # NaN/inf halves too
    got = np.asarray(qm.dequantize_packed(qm.repack(w_data, qtype), qtype, 1024))
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(w_data, qtype).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32),
                                  err_msg=f"seed={seed}")  # NaN payloads are the device's


def test_jit_and_bf16_match_reference(seed):
    """qmatvec_packed under an outer jit, with x in bfloat16."""
    rng = np.random.default_rng(seed)
    w_data = random_weight(rng, T.Q4_0, 64, 256)
    x = random_x(rng, 2, 256, jnp.bfloat16)
    packed = qm.repack(w_data, T.Q4_0)

    @jax.jit
    def f(x, packed):
        return qm.qmatvec_packed(x, packed, T.Q4_0, 256, interpret=INTERPRET)

    check_close(f(x, packed), x, w_data, T.Q4_0, f"seed={seed}", takes_int(T.Q4_0))


# ---------------------------------------------------------------------------------------------
# Validation: clear errors before launch.
# ---------------------------------------------------------------------------------------------

def _q4_0(n_rows=64, n_cols=256):
    return random_weight(np.random.default_rng(1), T.Q4_0, n_rows, n_cols)


def test_ragged_rows_are_rejected_and_multiples_of_eight_accepted():
    x = jnp.ones((1, 256), jnp.float32)
    with pytest.raises(InputError, match=r"n_rows=100 must be a multiple of block_n=8"):
        qm.qmatvec(x, _q4_0(100), T.Q4_0, 256, interpret=INTERPRET)
    with pytest.raises(InputError, match=r"n_rows=96 must be a multiple of block_n=64"):
        qm.qmatvec(x, _q4_0(96), T.Q4_0, 256, block_sizes=qm.BlockSizes(block_n=64),
                   interpret=INTERPRET)
    w_data = _q4_0(40)  # default block_n = 8
    check_close(qm.qmatvec(x, w_data, T.Q4_0, 256, interpret=INTERPRET), x, w_data, T.Q4_0,
                "N=40", takes_int(T.Q4_0))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(x=jnp.ones((0, 256))), r"m_rows=0 rows; qmatvec serves 1 to 8"),
    (dict(x=jnp.ones((9, 256))), r"m_rows=9 rows; qmatvec serves 1 to 8"),
    (dict(x=jnp.ones((256,))), r"x must be \[M, K\]"),
    (dict(x=jnp.ones((1, 256), jnp.int32)), r"x must be float32, bfloat16 or float16"),
    (dict(x=jnp.ones((1, 288))), r"x has 288 columns but n_cols=256"),
    (dict(qtype=T.Q2_K), r"no kernel for type Q2_K"),
    (dict(qtype=T.F32), r"no kernel for type F32"),
    (dict(qtype=12345), r"no kernel for type #12345"),
    (dict(n_cols=240, x=jnp.ones((1, 240))), r"n_cols=240 must be a positive multiple of 32"),
    (dict(n_cols=288, x=jnp.ones((1, 288))), r"n_cols=288 needs 162 bytes per Q4_0 row"),
    (dict(w_data=_q4_0().view(np.int8)), r"w_data must be uint8"),
    (dict(block_sizes=qm.BlockSizes(block_k=96)), r"block_k=96 must be a power of two"),
    (dict(block_sizes=qm.BlockSizes(block_k=16)), r"block_k=16 must be a multiple of 32"),
    (dict(block_sizes=qm.BlockSizes(block_n=4)), r"block_n=4 must be at least 8"),
    (dict(block_sizes=qm.BlockSizes(split_k=3)), r"split_k=3 must be a power of two"),
    (dict(block_sizes=qm.BlockSizes(split_k=2)),
     r"n_cols=256 must be a multiple of split_k \* block_k = 2 \* 256"),
])
def test_invalid_inputs_raise(kwargs, pattern):
    args = dict(x=jnp.ones((1, 256), jnp.float32), w_data=_q4_0(), qtype=T.Q4_0, n_cols=256)
    args.update(kwargs)
    with pytest.raises(InputError, match=pattern):
        qm.qmatvec(args.pop("x"), args.pop("w_data"), args.pop("qtype"), args.pop("n_cols"),
                   interpret=INTERPRET, **args)


def test_k_quant_block_k_must_cover_super_blocks():
    w_data = random_weight(np.random.default_rng(2), T.Q6_K, 32, 512)
    with pytest.raises(InputError, match=r"block_k=64 must be a multiple of 128 for Q6_K"):
        qm.qmatvec(jnp.ones((1, 512)), w_data, T.Q6_K, 512,
                   block_sizes=qm.BlockSizes(block_k=64), interpret=INTERPRET)
    w_data = random_weight(np.random.default_rng(2), T.Q4_K, 32, 512)
    with pytest.raises(InputError, match=r"block_k=128 must be a multiple of 256 for Q4_K"):
        qm.qmatvec(jnp.ones((1, 512)), w_data, T.Q4_K, 512,
                   block_sizes=qm.BlockSizes(block_k=128), interpret=INTERPRET)


def test_packed_shapes_are_checked():
    packed = qm.repack(_q4_0(), T.Q4_0)
    with pytest.raises(InputError, match=r"packed Q4_0 arrays have shapes"):
        qm.qmatvec_packed(jnp.ones((1, 256)), packed[::-1], T.Q4_0, 256, interpret=INTERPRET)
    with pytest.raises(InputError, match=r"packed Q4_1 arrays have shapes"):
        qm.qmatvec_packed(jnp.ones((1, 256)), packed, T.Q4_1, 256, interpret=INTERPRET)


# ---------------------------------------------------------------------------------------------
# 70B shapes: validation, grid and tracing only (interpret mode is far too slow to run them).
# ---------------------------------------------------------------------------------------------

# Llama-3-70B: D = 8192, F = 28672, K/V projections 8 heads x 128 = 1024 rows.
SHAPES_70B = ((8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows,n_cols", SHAPES_70B, ids=lambda v: str(v))
def test_70b_shapes_plan_and_trace(qtype, n_rows, n_cols):
    for m_rows in (1, 3, 8):
        bs = qm.BlockSizes.get_default(qtype, n_rows, n_cols, m_rows)
        p = qm.plan(qtype, m_rows, n_rows, n_cols)
        assert p.block_sizes == bs
        assert p.grid == (n_rows // bs.block_n, bs.split_k)
        # enough programs, or K split as far as the tile allows
        assert p.grid[0] * p.grid[1] >= 256 or n_cols % (2 * bs.split_k * bs.block_k)
        assert p.m_padded in (1, 4, 8) and p.n_chunks * bs.block_k * bs.split_k == n_cols
    # Trace repack and the whole wrapper, pallas_call included, on abstract arrays.
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    w = jax.ShapeDtypeStruct((n_rows, n_cols // block_size * type_size), jnp.uint8)
    x = jax.ShapeDtypeStruct((3, n_cols), jnp.bfloat16)
    y = jax.eval_shape(lambda x, w: qm.qmatvec(x, w, qtype, n_cols), x, w)
    assert y.shape == (3, n_rows) and y.dtype == jnp.float32


def test_70b_default_tiling():
    """The default heuristic on the shapes that matter: the tuned tile, K split on short N."""
    got = {(n, k): qm.BlockSizes.get_default(T.Q8_0, n, k) for n, k in SHAPES_70B}
    tile = dict(block_n=16, block_k=512, num_warps=4, num_stages=3)
    assert got[(8192, 8192)] == qm.BlockSizes(**tile, split_k=4)
    assert got[(1024, 8192)] == qm.BlockSizes(**tile, split_k=16)
    assert got[(28672, 8192)] == qm.BlockSizes(**tile, split_k=1)
    assert got[(8192, 28672)] == qm.BlockSizes(**tile, split_k=4)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_batched_launches_start_from_their_own_tile(qtype):
    """One x row starts from TUNED, several from TUNED_BATCHED where the type has an entry."""
    n, k = 28672, 8192
    for m_rows in (1, 2, 8):
        tile = qm.TUNED[qtype] if m_rows == 1 else qm.TUNED_BATCHED.get(qtype, qm.TUNED[qtype])
        got = qm.BlockSizes.get_default(qtype, n, k, m_rows)
        assert (got.block_n, got.block_k, got.num_warps, got.num_stages) == (
            tile.block_n, tile.block_k, tile.num_warps, tile.num_stages), m_rows
    if qtype in qm.TUNED_BATCHED:
        assert qm.TUNED_BATCHED[qtype] != qm.TUNED[qtype]


@pytest.mark.parametrize("qtype", INT_TYPES, ids=lambda t: t.name)
def test_batched_launches_take_the_wrappers_x(qtype, monkeypatch):
    """One x row is quantized inside the kernel; more rows by the wrapper, except the plain
    launches of FUSE_X_BATCHED types; FUSE_X off (the self-test's fallback) wins everywhere."""
    n, k = 28672, 8192
    for m_rows in (1, 2, 8):
        plain = qm.BlockSizes.get_default(qtype, n, k, m_rows).fuse_x
        glu = qm.glu_block_sizes(qtype, 2 * n, k, m_rows).fuse_x
        assert glu is (m_rows == 1), m_rows
        assert plain is (m_rows == 1 or qtype in qm.FUSE_X_BATCHED), m_rows
        cand = qm.BlockSizes.get_default(qtype, n, k, m_rows, tuned=qm.BlockSizes(16, 512))
        assert cand.fuse_x is plain, m_rows
    monkeypatch.setattr(qm, "FUSE_X_MAX_ROWS", 8)
    assert qm.glu_block_sizes(qtype, 2 * n, k, 8).fuse_x
    monkeypatch.setattr(qm, "FUSE_X", False)
    assert not qm.BlockSizes.get_default(qtype, n, k, 1).fuse_x
    assert not qm.glu_block_sizes(qtype, 2 * n, k, 1).fuse_x
    assert not qm.BlockSizes.get_default(qtype, n, k, 8).fuse_x


def test_supports():
    assert qm.supports(T.Q8_0, 576, 576) and qm.supports(T.Q4_K, 8, 256)
    assert not qm.supports(T.Q6_K, 576, 576)      # K not whole 128-value blocks
    assert not qm.supports(T.Q4_0, 36, 64)        # N not a multiple of 8
    assert not qm.supports(T.F16, 64, 64) and not qm.supports(T.Q2_K, 64, 256)


@pytest.mark.parametrize("qtype", (T.Q8_0, T.Q4_K, T.Q6_K), ids=lambda t: t.name)
def test_stacked_layer_index(seed, qtype):
    """Packed arrays stacked over layers plus a traced layer index give that layer's product
    (the engine's scan over resident layers), inside jit and with a split K."""
    rng = np.random.default_rng(seed)
    ws = [random_weight(rng, qtype, 32, 512) for _ in range(3)]
    stack = tuple(jnp.stack(a) for a in zip(*(qm.repack(w, qtype) for w in ws)))
    x = random_x(rng, 2, 512, jnp.float32)
    f = jax.jit(lambda x, s, i: qm.qmatvec_packed(
        x, s, qtype, 512, layer=i, interpret=INTERPRET,
        block_sizes=qm.BlockSizes(block_n=16, block_k=256, split_k=2)))
    for i in (2, 0, 1):
        check_close(f(x, stack, jnp.int32(i)), x, ws[i], qtype, f"layer {i}, seed={seed}",
                    takes_int(qtype))


def test_self_test_passes_and_catches_a_wrong_result(monkeypatch):
    for qtype in TYPES:
        qm.self_test.__wrapped__(qtype, interpret=INTERPRET)
    monkeypatch.setattr(qm, "qmatvec_packed", lambda x, packed, qtype, n_cols, **kw:
                        jnp.zeros((x.shape[0], packed[0].shape[0]), jnp.float32))
    with pytest.raises(NTransformerError, match=r"self-test for Q4_0 \(float path\): relative"):
        qm.self_test.__wrapped__(T.Q4_0, interpret=INTERPRET)


def test_self_test_falls_back_to_the_float_path(monkeypatch):
    """An integer path that fails (here: wrong sums) turns INT_DOT off; the float path serves."""
    monkeypatch.setattr(qm, "INT_DOT", True)
    real = qm._int_words
    monkeypatch.setattr(qm, "_int_words", lambda w, rows, *a: [-t for t in real(w, rows, *a)])
    jax.clear_caches()   # traces of the real path would be reused
    try:
        qm.self_test.__wrapped__(T.Q8_0, interpret=INTERPRET)
        assert qm.INT_DOT is False
        assert not qm.BlockSizes.get_default(T.Q8_0, 64, 256).int_dot
        monkeypatch.setattr(qm, "_int_words", lambda *a: 1 / 0)
        qm.self_test.__wrapped__(T.Q4_0, interpret=INTERPRET)   # the float path only: passes
    finally:
        jax.clear_caches()   # nor must later tests reuse the patched traces


def test_self_test_falls_back_to_the_wrapper_quantized_x(monkeypatch):
    """In-kernel x quantization that fails (here: wrong scales) turns FUSE_X off only."""
    monkeypatch.setattr(qm, "INT_DOT", True)
    monkeypatch.setattr(qm, "FUSE_X", True)
    real = qm._quant_tiles
    monkeypatch.setattr(qm, "_quant_tiles", lambda tiles: (*real(tiles)[:2], *(
        -v for v in real(tiles)[2:3]), real(tiles)[3]))
    jax.clear_caches()
    try:
        qm.self_test.__wrapped__(T.Q4_0, interpret=INTERPRET)
        assert qm.FUSE_X is False and qm.INT_DOT is True
        bs = qm.BlockSizes.get_default(T.Q4_0, 64, 256)
        assert bs.int_dot and not bs.fuse_x
    finally:
        jax.clear_caches()



@pytest.mark.parametrize("qtype", INT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m_rows,dtype", [(1, jnp.float32), (3, jnp.bfloat16), (8, jnp.float32)])
def test_x_quantized_in_the_kernel_or_by_the_wrapper(seed, qtype, m_rows, dtype):
    """Both integer-path forms hold the bound; their x digits agree to one unit of rounding
    (the kernel's x * inv may be fused into the rounding add, a single rounding)."""
    rng = np.random.default_rng(seed)
    n_rows, n_cols = 32, 1024
    w_data = random_weight(rng, qtype, n_rows, n_cols)
    x = random_x(rng, m_rows, n_cols, dtype)
    ys = {}
    for fuse in (True, False):
        bs = dataclasses.replace(qm.BlockSizes.get_default(qtype, n_rows, n_cols),
                                 int_dot=True, fuse_x=fuse)
        assert qm._takes_fused(qm._format(qtype), bs) is fuse
        ys[fuse] = qm.qmatvec(x, w_data, qtype, n_cols, block_sizes=bs, interpret=INTERPRET)
        check_close(ys[fuse], x, w_data, qtype, f"fuse_x={fuse}, seed={seed}", True)
    w = np.asarray(quants.dequantize(w_data, qtype, n_cols), np.float64)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    # one unit of x's digit per element at most: |dy| <= 2 s |W| summed, s = max|x_block| / X_QMAX
    assert np.all(np.abs(np.asarray(ys[True], np.float64) - np.asarray(ys[False], np.float64))
                  <= 2 * x_quant_bound(x64, w) + 1e-5 * (np.abs(x64) @ np.abs(w).T))


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_x_digits(seed, scale):
    """The integer path's x: digits in int8 range that rebuild q, |x - s q| <= s / 2 (+ the
    rounding of x / s), zero blocks exactly zero, sum(q) right."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, 4, 32)) * scale).astype(np.float32)
    x[1, 2] = 0.0
    x[2, 1, 5] = 1e3 * scale   # one large value: the rest of its block gets coarse digits
    h, l, s, sq = (np.asarray(a) for a in qm._x_int(jnp.asarray(x)))
    digits = lambda w: np.stack([(w >> (8 * k)).astype(np.int8) for k in range(4)], -1).reshape(3, 4, 32)
    dh, dl = digits(h).astype(np.int64), digits(l).astype(np.int64)
    q = 256 * dh + dl
    assert np.abs(dh).max() <= 127 and np.abs(q).max() <= qm.X_QMAX
    np.testing.assert_array_equal(q.sum(-1), sq)
    assert s[1, 2] == 0 and not q[1, 2].any()
    err = np.abs(x.astype(np.float64) - s[..., None].astype(np.float64) * q)
    assert np.all(err <= 0.51 * s[..., None]), float((err / np.maximum(s[..., None], 1e-300)).max())


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1], ids=lambda t: t.name)
def test_int_path_keeps_nan_and_inf(qtype):
    rng = np.random.default_rng(0)
    w_data = random_weight(rng, qtype, 16, 64)
    x = np.asarray(random_x(rng, 2, 64, jnp.float32)).copy()
    x[0, 3], x[1, 40] = np.nan, np.inf
    y = np.asarray(qm.qmatvec(jnp.asarray(x), w_data, qtype, 64, interpret=INTERPRET,
                              block_sizes=qm.BlockSizes(block_n=16, block_k=32)))
    assert np.isnan(y[0]).all() and not np.isfinite(y[1]).all()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m_rows,stacked", [(1, True), (3, False), (8, True)])
def test_glu_matches_float64(seed, qtype, m_rows, stacked):
    """`qmatvec_glu_packed` on [gate; up] stacked by rows gives silu(x G^T) * (x U^T), checked
    in float64 on gguf-py's dequantization (layers distinct, the one asked for read)."""
    rng = np.random.default_rng(seed)
    n_ff, n_cols = 64, 512
    ws = [random_weight(rng, qtype, 2 * n_ff, n_cols) for _ in range(3 if stacked else 1)]
    packed = [qm.repack(w, qtype) for w in ws]
    arrays = tuple(jnp.stack(a) for a in zip(*packed)) if stacked else packed[0]
    x = random_x(rng, m_rows, n_cols, jnp.float32)
    layer = 1 if stacked else 0
    y = qm.qmatvec_glu_packed(x, arrays, qtype, n_cols, interpret=INTERPRET,
                              layer=jnp.int32(layer) if stacked else None)
    w = gguf.quants.dequantize(ws[layer], qtype).astype(np.float64)
    x64 = np.asarray(x, np.float64)
    g, u = x64 @ w[:n_ff].T, x64 @ w[n_ff:].T
    with np.errstate(over="ignore"):
        want = g / (1 + np.exp(-g)) * u
    # the error of g and u (RTOL of |x| |W|^T each, plus x's rounding on the integer path)
    # carried through silu(g) * u
    gs, us = np.abs(x64) @ np.abs(w[:n_ff]).T, np.abs(x64) @ np.abs(w[n_ff:]).T
    ge, ue = RTOL * gs, RTOL * us
    if takes_int(qtype):
        xq = x_quant_bound(x64, w)
        ge, ue = ge + xq[:, :n_ff], ue + xq[:, n_ff:]
    bound = ge * 1.1 * (np.abs(u) + ue) + np.abs(g) * ue + 1e-6 * np.abs(want)
    assert y.shape == (m_rows, n_ff) and y.dtype == jnp.float32
    err = np.abs(np.asarray(y, np.float64) - want)
    assert np.all(err <= bound), f"seed={seed}: max error {err.max():.3g}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m_rows,path", [(1, "fused"), (3, "wrapper"), (2, "float")])
def test_prefetch_computes_the_same_sums(seed, qtype, m_rows, path):
    """Loading chunk i + 1 before computing chunk i (`prefetch`) changes when tiles are read,
    not what is added: the same outputs bit for bit, plain with a K-split and several chunks a
    split, glu, stacked layers; and the product still holds the float64 bound."""
    rng = np.random.default_rng(seed)
    block = qm._format(qtype).block
    n_rows, n_cols = 32, 8 * max(block, 128)
    ws = [random_weight(rng, qtype, n_rows, n_cols) for _ in range(2)]
    stack = tuple(jnp.stack(a) for a in zip(*(qm.repack(w, qtype) for w in ws)))
    x = random_x(rng, m_rows, n_cols, jnp.float32)
    base = qm.BlockSizes(block_n=8, block_k=n_cols // 8, split_k=2,   # 4 chunks a split
                         int_dot=path != "float", fuse_x=path == "fused")
    ys = {}
    for prefetch in (False, True):
        bs = dataclasses.replace(base, prefetch=prefetch)
        plain = qm.qmatvec_packed(x, stack, qtype, n_cols, block_sizes=bs, layer=jnp.int32(1),
                                  interpret=INTERPRET)
        glu = qm.qmatvec_glu_packed(x, stack, qtype, n_cols, layer=jnp.int32(0),
                                    block_sizes=dataclasses.replace(bs, split_k=1),
                                    interpret=INTERPRET)
        ys[prefetch] = (np.asarray(plain), np.asarray(glu))
    for a, b in zip(ys[False], ys[True]):
        np.testing.assert_array_equal(a, b)
    check_close(jnp.asarray(ys[True][0]), x, ws[1], qtype, f"prefetch {path}, seed={seed}",
                path != "float")


def test_glu_tiling_and_bad_inputs():
    """The GLU tiling halves the plain row tile and never splits K; odd rows, a K-split and a
    row count no tile divides are refused with a named error."""
    bs = qm.BlockSizes.get_default(T.Q8_0, 28672, 8192)
    glu = qm.glu_block_sizes(T.Q8_0, 28672, 8192)
    assert glu.split_k == 1 and glu.block_n == max(bs.block_n // 2, qm.MIN_BLOCK_N)
    assert qm.supports_glu(T.Q4_0, 2 * 14336, 4096) and not qm.supports_glu(T.Q4_0, 2 * 12, 4096)
    w = random_weight(np.random.default_rng(0), T.Q8_0, 64, 256)
    packed = qm.repack(w, T.Q8_0)
    x = jnp.ones((1, 256), jnp.float32)
    with pytest.raises(InputError, match="split_k=1"):
        qm.qmatvec_glu_packed(x, packed, T.Q8_0, 256, interpret=True,
                              block_sizes=qm.BlockSizes(block_n=8, block_k=128, split_k=2))
    odd = qm.repack(random_weight(np.random.default_rng(0), T.Q8_0, 40, 256), T.Q8_0)
    with pytest.raises(InputError, match="multiple of block_n"):
        qm.qmatvec_glu_packed(x, odd, T.Q8_0, 256, interpret=True,
                              block_sizes=qm.BlockSizes(block_n=16, block_k=256))


def _shape_tuned_params():
    for (qtype, n_rows, n_cols, glu), bs in qm.SHAPE_TUNED.items():
        yield pytest.param(qtype, n_rows, n_cols, glu, bs,
                           id=f"{qtype.name}-{n_rows}x{n_cols}" + ("-glu" if glu else ""))


@pytest.mark.parametrize("qtype,n_rows,n_cols,glu,tile", _shape_tuned_params())
def test_shape_tuned_tiles(seed, qtype, n_rows, n_cols, glu, tile, monkeypatch):
    """A per-shape tile serves one-row launches of its shape only (batched rows and
    SHAPE_TILES off take the type default), takes `PREFETCH` as the defaults do, is a tiling
    `plan` accepts, and computes the product at its shape."""
    pick = qm.glu_block_sizes if glu else qm.BlockSizes.get_default
    got = pick(qtype, n_rows, n_cols, 1)
    assert got == dataclasses.replace(tile, int_dot=qm.INT_DOT, fuse_x=qm.FUSE_X)
    assert pick(qtype, n_rows, n_cols, 8) != got
    monkeypatch.setattr(qm, "SHAPE_TILES", False)
    one, batched = pick(qtype, n_rows, n_cols, 1), pick(qtype, n_rows, n_cols, 8)
    assert one == pick(qtype, n_rows, n_cols, 1, qm.TUNED.get(qtype, qm.BlockSizes()))
    if qtype in qm.TUNED_BATCHED:       # batched rows take the type's own batched tile
        assert batched == pick(qtype, n_rows, n_cols, 8, qm.TUNED_BATCHED[qtype])
    else:                               # the type's one tile at every M: only fuse_x follows M
        assert one == dataclasses.replace(batched, fuse_x=one.fuse_x)
    monkeypatch.setattr(qm, "SHAPE_TILES", True)
    monkeypatch.setattr(qm, "PREFETCH", True)   # reaches the per-shape tile as the type default
    assert pick(qtype, n_rows, n_cols, 1) == dataclasses.replace(got, prefetch=True)
    assert pick(qtype, n_rows, n_cols, 8).prefetch
    monkeypatch.setattr(qm, "PREFETCH", False)
    qm.plan(qtype, 1, n_rows // 2 if glu else n_rows, n_cols, got)
    rng = np.random.default_rng(seed)
    w_data = random_weight(rng, qtype, n_rows, n_cols)
    x = random_x(rng, 1, n_cols, jnp.float32)
    if glu:
        n_ff = n_rows // 2
        y = qm.qmatvec_glu_packed(x, qm.repack(w_data, qtype), qtype, n_cols, interpret=INTERPRET)
        w = gguf.quants.dequantize(w_data, qtype).astype(np.float64)
        x64 = np.asarray(x, np.float64)
        g, u = x64 @ w[:n_ff].T, x64 @ w[n_ff:].T
        want = g / (1 + np.exp(-g)) * u
        scale = (np.abs(x64) @ np.abs(w[:n_ff]).T) * (np.abs(x64) @ np.abs(w[n_ff:]).T)
        err = np.abs(np.asarray(y, np.float64) - want) / np.maximum(scale, 1e-30)
        assert err.max() <= 1e-3, f"seed={seed}: relative error {err.max():.3g}"
    else:
        y = qm.qmatvec(x, w_data, qtype, n_cols, interpret=INTERPRET)
        check_close(y, x, w_data, qtype, f"seed={seed}", takes_int(qtype, got))
