"""Tests of `ntransformer_jax.kernels.attention` in Pallas interpret mode (CPU).

Every kernel result is compared with `model.attention` and with a float64 numpy attention on
fresh random inputs; cache rows past the last visible key are poisoned with NaN/inf first. The
seed is in each failure message; rerun one with `KERNELS_TEST_SEED=<seed> python -m pytest
tests/test_attention.py`. On a GPU, run the same tests compiled with `KERNELS_INTERPRET=0`.
"""

from __future__ import annotations

import os
import re
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntransformer_jax import model
from ntransformer_jax.errors import InputError
from ntransformer_jax.kernels import attention as at

INTERPRET = os.environ.get("KERNELS_INTERPRET", "1") != "0"
RTOL = 1e-5   # of sum_j p_j |v_j|, the size of the terms each output element adds up
N_LAYERS = 3
POISON = np.array([np.nan, np.inf, -np.inf, 3e38], np.float32)

HEADS = {"llama8b": (32, 8, 128), "smollm": (9, 3, 64), "llama70b": (64, 8, 128),
         "mha": (8, 8, 64)}

# (B, T, heads, S, stacked, block sizes or None for the default). Small shapes sweep more;
# the big head counts get a subset (interpret mode is slow).
CASES = (
    (1, 1, "mha", 1, False, None),
    (2, 8, "mha", 1, True, at.BlockSizes(block_s=16, split_s=2)),   # an empty split
    (2, 2, "smollm", 17, False, None),
    (1, 8, "mha", 17, False, at.BlockSizes(block_s=16, split_s=2)),
    (3, 8, "smollm", 96, True, None),
    (3, 1, "mha", 96, False, at.BlockSizes(block_s=32, split_s=3)),
    (1, 2, "smollm", 656, False, at.BlockSizes(block_s=64, split_s=5)),
    (3, 2, "mha", 1030, True, at.BlockSizes(block_s=128, split_s=8)),
    (2, 1, "llama8b", 656, False, None),                             # default: split 2
    (3, 2, "llama8b", 96, True, at.BlockSizes(block_s=32, split_s=3)),
    (3, 8, "llama8b", 17, False, None),
    (1, 8, "llama8b", 1030, True, None),
    (2, 8, "llama70b", 656, False, at.BlockSizes(block_s=64, split_s=4)),
    (1, 1, "llama70b", 1030, True, at.BlockSizes(block_s=64, split_s=1)),
    (3, 1, "llama70b", 17, True, None),
    # T * G <= 4 rows take the row loop by default; force the padded dots on some, and the
    # row loop on more rows.
    (2, 3, "smollm", 96, False, None),                               # 9 rows: dots, Tp = 4
    (2, 2, "llama8b", 96, True, at.BlockSizes(block_s=16, split_s=2, max_row_loop=8)),
    (3, 1, "smollm", 1030, True, None),                              # 3 rows: row loop
    (2, 2, "smollm", 17, True, at.BlockSizes(block_s=16, max_row_loop=0)),
    (1, 1, "llama8b", 656, False, at.BlockSizes(block_s=32, split_s=2, max_row_loop=0)),
    (3, 1, "mha", 1030, False, at.BlockSizes(block_s=64, split_s=3, max_row_loop=0)),
)


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("KERNELS_TEST_SEED", secrets.randbits(63)))


def random_positions(rng: np.random.Generator, batch: int, t: int, s: int) -> np.ndarray:
    """[B, T] int32 < S, increasing along T (non-decreasing when S < T), different per row;
    row 0 ends at S - 1 (the ragged last key block)."""
    rows = []
    for b in range(batch):
        if s >= t:
            row = np.sort(rng.choice(s, t, replace=False))
        else:
            row = np.sort(rng.integers(0, s, t))
        if b == 0:
            row = row + (s - 1 - row[-1])
        rows.append(row)
    return np.asarray(rows, np.int32)


def nan_outputs(part: tuple[int, ...], h: int, split_s: int) -> tuple[jax.Array, ...]:
    """NaN buffers shaped like a launch's raw outputs: o [B, T, K, G, H], or with split_s > 1
    the partials acc [split, B, T, K, G, H], m and l [split, B, T, K, G]."""
    if split_s == 1:
        return (jnp.full((*part, h), jnp.nan, jnp.float32),)
    return (jnp.full((split_s, *part, h), jnp.nan, jnp.float32),
            jnp.full((split_s, *part), jnp.nan, jnp.float32),
            jnp.full((split_s, *part), jnp.nan, jnp.float32))


def random_inputs(rng, batch, t, heads, s, stacked):
    """q, clean k, v caches ([L, B, S, K, H] if stacked, else [B, S, K, H]) and positions."""
    n, k, h = HEADS[heads]
    lead = (N_LAYERS,) if stacked else ()
    q = rng.standard_normal((batch, t, n, h)).astype(np.float32)
    kc = rng.standard_normal((*lead, batch, s, k, h)).astype(np.float32)
    vc = rng.standard_normal((*lead, batch, s, k, h)).astype(np.float32)
    return q, kc, vc, random_positions(rng, batch, t, s)


def poisoned(rng, cache: np.ndarray, positions: np.ndarray, layer: int | None) -> np.ndarray:
    """A copy with NaN, +-inf and huge values in every row past max(positions[b]), and in
    every other layer of a stack."""
    out = cache.copy()
    one = out if layer is None else out[layer]
    for b, last in enumerate(positions.max(axis=1)):
        tail = one[b, last + 1:]
        tail[...] = rng.choice(POISON, tail.shape)
    if layer is not None:
        for i in range(out.shape[0]):
            if i != layer:
                out[i] = rng.choice(POISON, out[i].shape)
    return out


def attention64(q, kc, vc, positions):
    """float64 numpy attention on one layer's cache; returns (out, scale = sum_j p_j |v_j|)."""
    b, t, n, h = q.shape
    s, k = kc.shape[1], kc.shape[2]
    qg = q.astype(np.float64).reshape(b, t, k, n // k, h)
    scores = np.einsum("btkgh,bskh->btkgs", qg, kc.astype(np.float64)) / np.sqrt(h)
    visible = np.arange(s)[None, None, :] <= positions[:, :, None]          # [B, T, S]
    scores = np.where(visible[:, :, None, None], scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    v = vc.astype(np.float64)
    out = np.einsum("btkgs,bskh->btkgh", p, v).reshape(b, t, n, h)
    scale = np.einsum("btkgs,bskh->btkgh", p, np.abs(v)).reshape(b, t, n, h)
    return out, scale


def check_close(got, want64, scale, msg, rtol=RTOL):
    got = np.asarray(got, np.float64)
    assert got.shape == want64.shape, msg
    assert np.isfinite(got).all(), f"{msg}: non-finite output"
    err = np.max(np.abs(got - want64) / np.maximum(scale, np.finfo(np.float64).tiny))
    assert err <= rtol, f"{msg}: relative error {err:.3g} > {rtol}"


def _case_id(case):
    b, t, heads, s, stacked, bs = case
    split = f"-split{bs.split_s}-bs{bs.block_s}" if bs else ""
    split += f"-rowloop{bs.max_row_loop}" if bs and bs.max_row_loop != 4 else ""
    return f"B{b}-T{t}-{heads}-S{s}" + ("-stacked" if stacked else "") + split


@pytest.mark.parametrize("batch,t,heads,s,stacked,block_sizes", CASES,
                         ids=[_case_id(c) for c in CASES])
def test_matches_model_and_float64(seed, batch, t, heads, s, stacked, block_sizes):
    rng = np.random.default_rng(seed)
    q, kc, vc, pos = random_inputs(rng, batch, t, heads, s, stacked)
    layer = int(rng.integers(N_LAYERS)) if stacked else None
    k1, v1 = (kc, vc) if layer is None else (kc[layer], vc[layer])
    want64, scale = attention64(q, k1, v1, pos)
    msg = f"seed={seed}, layer={layer}"

    xla = model.attention(jnp.asarray(q), model.KVCache(jnp.asarray(k1), jnp.asarray(v1)),
                          jnp.asarray(pos))
    check_close(xla, want64, scale, f"model.attention, {msg}")

    kp, vp = poisoned(rng, kc, pos, layer), poisoned(rng, vc, pos, layer)
    kw = {} if layer is None else {"layer": jnp.int32(layer)}
    got = at.decode_attention(jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(pos),
                              block_sizes=block_sizes, interpret=INTERPRET, **kw)
    assert got.dtype == jnp.float32 and got.shape == q.shape
    check_close(got, want64, scale, f"kernel, {msg}")
    check_close(got, np.asarray(xla, np.float64), scale, f"kernel vs model.attention, {msg}",
                rtol=2 * RTOL)

    ref = at.decode_attention_reference(q, kp, vp, pos, block_sizes=block_sizes, **kw)
    check_close(ref, want64, scale, f"reference, {msg}")


def test_bfloat16_cache_and_layer_traced_in_fori_loop(seed):
    """A bf16 stacked cache read by a jitted fori_loop over layers (the resident scan's
    pattern): each layer's output matches float64 on that layer's (bf16-rounded) cache."""
    rng = np.random.default_rng(seed)
    q, kc, vc, pos = random_inputs(rng, 2, 2, "smollm", 96, stacked=True)
    kc, vc = (jnp.asarray(c, jnp.bfloat16) for c in (kc, vc))
    bs = at.BlockSizes(block_s=32, split_s=2)

    @jax.jit
    def run_all(q, kc, vc, pos):
        def body(i, outs):
            o = at.decode_attention(q, kc, vc, pos, layer=i, block_sizes=bs, interpret=INTERPRET)
            return outs.at[i].set(o)
        return jax.lax.fori_loop(0, N_LAYERS, body, jnp.zeros((N_LAYERS, *q.shape)))

    outs = run_all(jnp.asarray(q), kc, vc, jnp.asarray(pos))
    for i in range(N_LAYERS):
        k1, v1 = (np.asarray(c[i], np.float32) for c in (kc, vc))
        want64, scale = attention64(q, k1, v1, pos)
        check_close(outs[i], want64, scale, f"layer {i}, seed={seed}")


def jitted_pallas_calls(jaxpr):
    """The one jit inside `jaxpr` (a wrapper's) and the pallas_call equations in its body."""
    (jit_eqn,) = [e for e in jaxpr.eqns if "jaxpr" in e.params]
    inner = jit_eqn.params["jaxpr"].jaxpr
    return inner, [e for e in inner.eqns if e.primitive.name == "pallas_call"]


def test_stacked_cache_goes_to_the_kernel_unsliced():
    """With layer=, the stacked caches are operands of the pallas_call itself: no XLA slice
    (a copy of the layer) in between."""
    q = jax.ShapeDtypeStruct((1, 1, 32, 128), jnp.float32)
    cache = jax.ShapeDtypeStruct((4, 1, 4096, 8, 128), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda q, k, v, p, i: at.decode_attention(q, k, v, p, layer=i))(
        q, cache, cache, pos, jax.ShapeDtypeStruct((), jnp.int32))
    inner, calls = jitted_pallas_calls(jaxpr)
    assert len(calls) == 1
    k_var, v_var = inner.invars[1], inner.invars[2]
    assert k_var in calls[0].invars and v_var in calls[0].invars
    prims = {e.primitive.name for e in inner.eqns}
    assert not prims & {"dynamic_slice", "slice", "gather"}, prims


@pytest.mark.parametrize("heads,t,block_sizes", [
    ("smollm", 3, at.BlockSizes(block_s=16, split_s=1)),
    ("smollm", 3, at.BlockSizes(block_s=16, split_s=3)),
    ("llama8b", 3, at.BlockSizes(block_s=32, split_s=1)),
    ("llama8b", 3, at.BlockSizes(block_s=32, split_s=3)),
    ("smollm", 1, at.BlockSizes(block_s=16, split_s=1)),
    ("smollm", 1, at.BlockSizes(block_s=16, split_s=3)),
], ids=["smollm-dots-split1", "smollm-dots-split3", "llama8b-dots-split1",
        "llama8b-dots-split3", "smollm-rows-split1", "smollm-rows-split3"])
def test_every_output_element_is_written(seed, heads, t, block_sizes):
    """The raw kernel outputs (the result, or every split's partials, empty splits included)
    start as NaN; none may stay."""
    rng = np.random.default_rng(seed)
    q, kc, vc, pos = random_inputs(rng, 2, t, heads, 40, stacked=False)
    pos[1] = np.arange(t)   # batch row 1 has one key block: two of its three splits are empty
    p = at.plan(q.shape, kc.shape, block_sizes)
    assert p.row_loop == (t == 1)
    n, k, h = HEADS[heads]
    poison = nan_outputs((2, t, k, n // k), h, block_sizes.split_s)
    out = at._launch(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), jnp.asarray(pos), p,
                     interpret=INTERPRET, out_init=poison)
    assert [o.shape for o in out] == [o.shape for o in poison]
    for o in out:
        assert not np.isnan(np.asarray(o)).any(), f"unwritten output elements, seed={seed}"
    got = out[0] if len(out) == 1 else at.combine(*out)
    want64, scale = attention64(q, kc, vc, pos)
    check_close(got.reshape(q.shape), want64, scale, f"seed={seed}")


# ---------------------------------------------------------------------------------------------
# Tiling defaults.
# ---------------------------------------------------------------------------------------------

def test_default_tiling():
    """Long caches get 64 to 128 programs, short ones a single split."""
    for batch, k in ((1, 8), (2, 8), (1, 3), (4, 8), (16, 8)):
        for s in (4096, 8192, 131072):
            bs = at.BlockSizes.get_default(batch, k, s)
            programs = batch * k * bs.split_s
            assert programs <= 256 or bs.split_s == 1
            share = s // bs.split_s // bs.block_s   # key blocks per split of a full cache
            assert programs >= 128 or share < 2 * at.MIN_BLOCKS_PER_SPLIT, (batch, k, s, bs)
    assert at.BlockSizes.get_default(1, 8, 4096) == at.BlockSizes(block_s=32, split_s=32)
    for s in (1, 17, 96, 128):
        assert at.BlockSizes.get_default(1, 8, s).split_s == 1
    assert at.BlockSizes.get_default(1, 8, 17).block_s == 32
    assert at.BlockSizes.get_default(1, 8, 1).block_s == 16
    assert at.BlockSizes.get_default(1, 8, 4111).block_s == at.DEFAULT_BLOCK_S
    # Query rows padded to a power of two >= 16: T = 1 with G = 3 -> 4 x 4 rows.
    p = at.plan((1, 3, 9, 64), (1, 96, 3, 64))
    assert (p.t_pad, p.g_pad, p.grid, p.row_loop) == (4, 4, (1, 3, 1), False)
    p = at.plan((2, 8, 64, 128), (2, 4096, 8, 128))
    assert (p.t_pad, p.g_pad, p.row_loop) == (8, 8, False)
    assert p.grid == (2, 8, p.block_sizes.split_s)
    # Up to 4 rows (one-token decode of Llama-3-8B, SmolLM2) go one row at a time.
    for (n, k, h), t in ((HEADS["llama8b"], 1), (HEADS["smollm"], 1), (HEADS["mha"], 4)):
        assert at.plan((1, t, n, h), (1, 4096, k, h)).row_loop
    for (n, k, h), t in ((HEADS["llama8b"], 2), (HEADS["llama70b"], 1), (HEADS["smollm"], 2)):
        assert not at.plan((1, t, n, h), (1, 4096, k, h)).row_loop


# ---------------------------------------------------------------------------------------------
# Validation: clear errors before launch.
# ---------------------------------------------------------------------------------------------

def _args(**kw):
    args = dict(q=jnp.ones((2, 1, 32, 128), jnp.float32),
                k=jnp.ones((2, 64, 8, 128), jnp.float32),
                v=jnp.ones((2, 64, 8, 128), jnp.float32),
                positions=jnp.zeros((2, 1), jnp.int32))
    args.update(kw)
    return args


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(q=jnp.ones((2, 9, 32, 128))), r"T=9 new tokens; decode_attention serves 1 to 8"),
    (dict(q=jnp.ones((2, 0, 32, 128))), r"T=0 new tokens"),
    (dict(q=jnp.ones((2, 32, 128))), r"q must be \[B, T, N, H\], got shape \[2, 32, 128\]"),
    (dict(q=jnp.ones((2, 1, 32, 128), jnp.bfloat16)), r"q must be float32, got bfloat16"),
    (dict(q=jnp.ones((2, 1, 30, 128))), r"N=30 heads, not a positive multiple of the cache's K=8"),
    (dict(q=jnp.ones((2, 1, 32, 96)), k=jnp.ones((2, 64, 8, 96)), v=jnp.ones((2, 64, 8, 96))),
     r"head_dim H=96 must be a power of two >= 16"),
    (dict(q=jnp.ones((2, 1, 8, 8)), k=jnp.ones((2, 64, 8, 8)), v=jnp.ones((2, 64, 8, 8))),
     r"head_dim H=8 must be a power of two >= 16"),
    (dict(k=jnp.ones((2, 0, 8, 128)), v=jnp.ones((2, 0, 8, 128))), r"cache length S=0"),
    (dict(k=jnp.ones((3, 64, 8, 128)), v=jnp.ones((3, 64, 8, 128))),
     r"disagree on the batch B or head_dim H"),
    (dict(k=jnp.ones((2, 64, 8, 128), jnp.int32), v=jnp.ones((2, 64, 8, 128), jnp.int32)),
     r"k_cache must be float32, bfloat16 or float16, got int32"),
    (dict(v=jnp.ones((2, 65, 8, 128))), r"k_cache float32 \[2, 64, 8, 128\] and v_cache float32"
     r" \[2, 65, 8, 128\] differ"),
    (dict(k=jnp.ones((64, 8, 128))), r"k_cache must be \[B, S, K, H\], got shape \[64, 8, 128\]"),
    (dict(layer=jnp.int32(0)), r"k_cache must be \[L, B, S, K, H\] \(stacked, with layer=\)"),
    (dict(k=jnp.ones((3, 2, 64, 8, 128)), v=jnp.ones((3, 2, 64, 8, 128)), layer=jnp.float32(1)),
     r"layer must be an integer scalar, got float32"),
    (dict(k=jnp.ones((3, 2, 64, 8, 128)), v=jnp.ones((3, 2, 64, 8, 128)),
          layer=jnp.zeros((1,), jnp.int32)), r"layer must be an integer scalar, got int32 \[1\]"),
    (dict(positions=jnp.zeros((2, 2), jnp.int32)),
     r"positions must be \[B, T\] = \[2, 1\], got shape \[2, 2\]"),
    (dict(positions=jnp.zeros((2, 1), jnp.float32)), r"positions must be integers, got float32"),
    (dict(block_sizes=at.BlockSizes(block_s=48)), r"block_s=48 must be a power of two >= 16"),
    (dict(block_sizes=at.BlockSizes(block_s=8)), r"block_s=8 must be a power of two >= 16"),
    (dict(block_sizes=at.BlockSizes(split_s=0)), r"split_s=0 must be a positive integer"),
    (dict(block_sizes=at.BlockSizes(num_warps=3)), r"num_warps=3 must be a power of two"),
    (dict(block_sizes=at.BlockSizes(num_stages=0)), r"num_stages=0 must be a positive integer"),
    (dict(block_sizes=at.BlockSizes(max_row_loop=-1)),
     r"max_row_loop=-1 must be a non-negative integer"),
])
def test_invalid_inputs_raise(kwargs, pattern):
    """Both the kernel and the reference reject bad shapes and dtypes; what only the kernel
    cannot take (H not a power of two, S = 0, bad tiling) only the kernel rejects."""
    args = _args(**kwargs)
    kernel_only = "block_sizes" in kwargs or re.match(r"head_dim|cache length", pattern)
    fns = (at.decode_attention,) if kernel_only else (at.decode_attention,
                                                      at.decode_attention_reference)
    for fn in fns:
        a = dict(args)
        with pytest.raises(InputError, match=pattern):
            fn(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("positions"), interpret=INTERPRET, **a)


# ---------------------------------------------------------------------------------------------
# rope_decode_attention: rotation, cache write and attention in one kernel.
# ---------------------------------------------------------------------------------------------

from ntransformer_jax.kernels import rope_cache as rc   # noqa: E402

ROPE_HEADS = dict(HEADS, gqa4=(8, 2, 64))

# (B, T, heads, S, stacked, cache dtype, n_rot, P, where row 0's tokens go, block sizes or None).
# where: "start" (position 0), "end" (its last token at S - 1), "past" (it runs past the cache's
# end: the write is clamped to the last T rows). Row 1, if any, starts elsewhere at random.
ROPE_CASES = (
    (1, 1, "llama8b", 40, True, jnp.float32, 128, 2, "end", None),           # 8B decode: rows
    (2, 1, "llama8b", 96, False, jnp.bfloat16, 128, 4, "start",
     at.BlockSizes(block_s=16, split_s=3)),
    (2, 1, "mha", 16, True, jnp.float32, 64, 1, "past", None),
    (2, 3, "gqa4", 37, True, jnp.float32, 32, 1, "end", None),               # 12 rows: dots
    (1, 3, "mha", 50, False, jnp.float32, 16, 8, "start",
     at.BlockSizes(block_s=16, split_s=4)),                                  # 3 rows: row loop
    (2, 3, "gqa4", 24, False, jnp.bfloat16, 64, 2, "past", at.BlockSizes(block_s=16, split_s=2)),
    (1, 8, "llama8b", 64, False, jnp.bfloat16, 128, 2, "end",
     at.BlockSizes(block_s=32, split_s=2)),
    (2, 8, "mha", 24, True, jnp.float32, 32, 1, "start", at.BlockSizes(block_s=16, split_s=2)),
    (2, 8, "gqa4", 20, False, jnp.float32, 64, 4, "past", None),
    (2, 1, "mha", 16, True, jnp.bfloat16, 64, 2, "end", at.BlockSizes(block_s=16, max_row_loop=0)),
    (2, 2, "gqa4", 20, True, jnp.float32, 64, 1, "start",
     at.BlockSizes(block_s=16, split_s=2, max_row_loop=8)),                  # 8 rows: row loop
    (2, 3, "smollm", 30, True, jnp.float32, 64, 2, "end", None),             # G = 3 (no rope_cache)
    (1, 1, "smollm", 30, False, jnp.float16, 32, 1, "past", at.BlockSizes(block_s=16, split_s=2)),
)


def _rope_case_id(case):
    b, t, heads, s, stacked, dtype, rot, p, where, bs = case
    name = f"B{b}-T{t}-{heads}-S{s}-{jnp.dtype(dtype).name}-rot{rot}-P{p}-{where}"
    name += "-stacked" if stacked else ""
    name += f"-split{bs.split_s}-bs{bs.block_s}" if bs else ""
    return name + (f"-rowloop{bs.max_row_loop}" if bs and bs.max_row_loop != 4 else "")


def rope_positions(rng, batch: int, t: int, s: int, where: str) -> np.ndarray:
    """[B, T] int32 consecutive positions: row 0 as `where` says, the others at random."""
    starts = rng.integers(0, s - t + 1, batch)
    starts[0] = {"start": 0, "end": s - t, "past": s - t + 1 + int(rng.integers(0, 3))}[where]
    return (starts[:, None] + np.arange(t)[None]).astype(np.int32)


def first_rows(positions: np.ndarray, s: int) -> np.ndarray:
    """The cache row of each batch row's first new token: clamp(positions[b, 0], 0, S - T)."""
    return np.clip(positions[:, 0], 0, s - positions.shape[1])


def rope_inputs(rng, batch, t, heads, s, stacked, rot, n_parts, where):
    """parts, positions, inv_freq, and k, v caches (float32 numpy) whose rows from each batch
    row's first new one on, and other layers of a stack, hold NaN, +-inf and huge values."""
    n, k, h = ROPE_HEADS[heads]
    parts = rng.standard_normal((n_parts, batch * t, (n + 2 * k) * h)).astype(np.float32)
    pos = rope_positions(rng, batch, t, s, where)
    inv_freq = (10000.0 ** (-np.arange(rot // 2) * 2.0 / rot)).astype(np.float32)
    layer = int(rng.integers(N_LAYERS)) if stacked else None
    lead = (N_LAYERS,) if stacked else ()
    caches = []
    for _ in range(2):
        c = rng.standard_normal((*lead, batch, s, k, h)).astype(np.float32)
        one = c if layer is None else c[layer]
        for b, first in enumerate(first_rows(pos, s)):
            one[b, first:] = rng.choice(POISON, one[b, first:].shape)
        if layer is not None:
            for i in range(N_LAYERS):
                if i != layer:
                    c[i] = rng.choice(POISON, c[i].shape)
        caches.append(c)
    return parts, pos, inv_freq, caches[0], caches[1], layer


def as_f32(a) -> np.ndarray:
    """A writable float32 numpy copy."""
    return np.array(jnp.asarray(a).astype(jnp.float32))


def written_attention64(q, k_cache, v_cache, positions, layer):
    """float64 attention (out, scale) of q over a layer of a written cache, rows past each
    batch row's last position zeroed (as decode_attention_reference does; none are visible)."""
    k1, v1 = (as_f32(c) if layer is None else as_f32(c)[layer] for c in (k_cache, v_cache))
    for b, last in enumerate(positions.max(axis=1)):
        k1[b, last + 1:] = v1[b, last + 1:] = 0.0
    return attention64(np.asarray(q), k1, v1, positions)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")   # 3e38 as float16: inf
@pytest.mark.parametrize("batch,t,heads,s,stacked,dtype,rot,n_parts,where,block_sizes", ROPE_CASES,
                         ids=[_rope_case_id(c) for c in ROPE_CASES])
def test_rope_attention_matches_rope_cache_then_attention(seed, batch, t, heads, s, stacked,
                                                          dtype, rot, n_parts, where, block_sizes):
    """The fused kernel against rope_cache_write (the kernel; its jnp reference for heads the
    kernel does not take) followed by decode_attention_reference: its whole returned caches
    against rope_cache's (the new rows within rounding, every other entry bit for bit), its
    attention against decode_attention_reference and float64 attention of rope_cache's q over
    the cache it wrote (a new row summed in another order would be a few ulp of the partials
    away: relative to a tiny value, more than the attention tolerance)."""
    rng = np.random.default_rng(seed)
    n, k, h = ROPE_HEADS[heads]
    parts, pos, inv_freq, kc, vc, layer = rope_inputs(rng, batch, t, heads, s, stacked, rot,
                                                      n_parts, where)
    msg = f"seed={seed}, layer={layer}, positions={pos[:, 0].tolist()}"
    kw = {} if layer is None else {"layer": jnp.int32(layer)}
    args = lambda: (jnp.asarray(parts), jnp.asarray(pos), jnp.asarray(inv_freq),
                    jnp.asarray(kc, dtype), jnp.asarray(vc, dtype))   # fresh: caches are donated

    if rc.supports(t, n, k, h):
        q, k_want, v_want = rc.rope_cache_write(*args(), n_head=n, n_kv_head=k,
                                                interpret=INTERPRET, **kw)
    else:
        q, k_want, v_want = rc._write_reference(*args(), n_head=n, n_kv_head=k, layer=layer)
    ref = at.rope_decode_attention_reference(*args(), n_head=n, n_kv_head=k, **kw)

    attn, k_got, v_got = at.rope_decode_attention(*args(), n_head=n, n_kv_head=k,
                                                  block_sizes=block_sizes, interpret=INTERPRET,
                                                  **kw)
    assert attn.dtype == jnp.float32 and attn.shape == (batch, t, n, h), msg
    assert (k_got.dtype, k_got.shape, v_got.dtype, v_got.shape) == (jnp.dtype(dtype), kc.shape,
                                                                    jnp.dtype(dtype), vc.shape)

    # The attention: over the cache each wrote (the same, up to the rounding of the new rows,
    # which the cache checks below bound), against float64 and decode_attention_reference.
    got64, scale = written_attention64(q, k_got, v_got, pos, layer)
    check_close(attn, got64, scale, f"kernel, {msg}")
    attn_want = at.decode_attention_reference(q, k_got, v_got, jnp.asarray(pos), **kw)
    check_close(attn, np.asarray(attn_want, np.float64), scale,
                f"kernel vs decode_attention_reference, {msg}", rtol=2 * RTOL)
    ref64, ref_scale = written_attention64(q, ref[1], ref[2], pos, layer)
    check_close(ref[0], ref64, ref_scale, f"reference, {msg}", rtol=2 * RTOL)

    # The caches: the new rows as rope_cache writes them, every other entry (poison included)
    # exactly as it was.
    written = np.zeros(kc.shape, bool)
    for b, first in enumerate(first_rows(pos, s)):
        written[(b, slice(first, first + t)) if layer is None
                else (layer, b, slice(first, first + t))] = True
    parts_scale = np.abs(parts).sum(0).max()
    tol = (2e-6 if dtype == jnp.float32 else 1e-2) * parts_scale
    for name, got, want, before, jnp_ref in (("k", k_got, k_want, kc, ref[1]),
                                             ("v", v_got, v_want, vc, ref[2])):
        got, want = as_f32(got), as_f32(want)
        before = as_f32(jnp.asarray(before, dtype))
        assert np.array_equal(got[~written], before[~written], equal_nan=True), (
            f"{name} cache: rows that are not the new ones changed, {msg}")
        assert np.isfinite(got[written]).all(), f"{name} cache: new rows not written, {msg}"
        err = float(np.max(np.abs(got[written] - want[written])))
        assert err <= tol, f"{name} cache: new rows off by {err:.3g} > {tol:.3g}, {msg}"
        np.testing.assert_allclose(as_f32(jnp_ref), want, rtol=0, atol=tol,
                                   err_msg=f"{name} cache of the reference, {msg}")


@pytest.mark.parametrize("heads,t,block_sizes", [
    ("gqa4", 3, at.BlockSizes(block_s=16, split_s=3)),
    ("gqa4", 1, at.BlockSizes(block_s=16, split_s=3)),
    ("mha", 2, at.BlockSizes(block_s=16, split_s=1, max_row_loop=0)),
], ids=["dots-split3", "rows-split3", "dots-split1"])
def test_rope_attention_writes_every_output_element(seed, heads, t, block_sizes):
    """The raw outputs (every split's partials, empty splits included; the attention of a row
    whose only keys are the new ones) start as NaN; none may stay."""
    rng = np.random.default_rng(seed)
    n, k, h = ROPE_HEADS[heads]
    s = 40
    parts, pos, inv_freq, kc, vc, _ = rope_inputs(rng, 2, t, heads, s, False, h, 2, "start")
    p = at.plan((2, t, n, h), (2, s, k, h), block_sizes)
    poison = nan_outputs((2, t, k, n // k), h, block_sizes.split_s)
    *out, k_new, v_new = at._rope_launch(
        jnp.asarray(parts), jnp.asarray(pos), rc.pair_freq(jnp.asarray(inv_freq), h),
        jnp.asarray(kc), jnp.asarray(vc), p, n_head=n, interpret=INTERPRET, out_init=poison)
    assert [o.shape for o in out] == [o.shape for o in poison]
    for o in out:
        assert not np.isnan(np.asarray(o)).any(), f"unwritten output elements, seed={seed}"
    got = out[0] if len(out) == 1 else at.combine(*out)
    want, _, _ = at.rope_decode_attention_reference(parts, pos, inv_freq, kc, vc, n_head=n,
                                                    n_kv_head=k)
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-4, atol=1e-5,
                               err_msg=f"seed={seed}")


def test_rope_attention_is_one_launch_on_the_stacked_caches():
    """With layer=, the stacked caches are operands of the one pallas_call, aliased to its
    outputs: no slice, copy or update of a layer in XLA around it."""
    n, k, h = ROPE_HEADS["llama8b"]
    parts = jax.ShapeDtypeStruct((4, 1, (n + 2 * k) * h), jnp.float32)
    cache = jax.ShapeDtypeStruct((4, 1, 4096, k, h), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda p, pos, f, kc, vc, i: at.rope_decode_attention(
        p, pos, f, kc, vc, n_head=n, n_kv_head=k, layer=i))(
        parts, jax.ShapeDtypeStruct((1, 1), jnp.int32), jax.ShapeDtypeStruct((64,), jnp.float32),
        cache, cache, jax.ShapeDtypeStruct((), jnp.int32))
    inner, calls = jitted_pallas_calls(jaxpr)
    assert len(calls) == 1
    k_var, v_var = inner.invars[3], inner.invars[4]
    assert k_var in calls[0].invars and v_var in calls[0].invars
    aliased = {calls[0].invars[i] for i, _ in calls[0].params["input_output_aliases"]}
    assert {k_var, v_var} <= aliased
    prims = {e.primitive.name for e in inner.eqns}
    copies = {"dynamic_slice", "dynamic_update_slice", "slice", "gather", "scatter"}
    assert not prims & copies, prims


def test_rope_self_test_passes():
    at.rope_self_test.__wrapped__(8, 2, 64, interpret=INTERPRET)


def _rope_args(n: int = 8, k: int = 2, h: int = 64, s: int = 16):
    """Valid arguments of N = n heads over K = k KV heads of size h, a cache of s positions."""
    args = dict(parts=jnp.zeros((2, 2, (n + 2 * k) * h), jnp.float32),
                positions=jnp.zeros((2, 1), jnp.int32), inv_freq=jnp.zeros((h // 2,), jnp.float32),
                k=jnp.zeros((2, s, k, h), jnp.float32), v=jnp.zeros((2, s, k, h), jnp.float32),
                n_head=n, n_kv_head=k)
    return args


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(positions=jnp.zeros((2, 9), jnp.int32), parts=jnp.zeros((2, 18, 768))),
     r"T=9 new tokens; rope_decode_attention serves 1 to 8"),
    (dict(positions=jnp.zeros((2, 0), jnp.int32)), r"T=0 new tokens"),
    (dict(positions=jnp.zeros((2, 4), jnp.int32), parts=jnp.zeros((2, 8, 768)), seq=3),
     r"4 new tokens do not fit a cache of 3 positions"),
    (dict(positions=jnp.zeros((3, 1), jnp.int32)),
     r"positions must be \[B=2, T\], got shape \[3, 1\]"),
    (dict(positions=jnp.zeros((2,), jnp.int32)), r"positions must be \[B=2, T\], got shape \[2\]"),
    (dict(positions=jnp.zeros((2, 1), jnp.float32)), r"positions must be integers, got float32"),
    (dict(n_kv_head=4), r"caches have 2 KV heads, expected n_kv_head=4"),
    (dict(n_head=7, parts=jnp.zeros((2, 2, 11 * 64))), r"n_head=7 is not a positive multiple of"
     r" n_kv_head=2"),
    (dict(parts=jnp.zeros((3, 2, 768))), r"parts must be float32 \[P, 2, 768\] with P a power of"
     r" two, got float32 \[3, 2, 768\]"),
    (dict(parts=jnp.zeros((2, 2, 640))), r"parts must be float32 \[P, 2, 768\]"),
    (dict(parts=jnp.zeros((2, 2, 768), jnp.bfloat16)), r"parts must be float32 .* got bfloat16"),
    (dict(inv_freq=jnp.zeros((33,), jnp.float32)),
     r"inv_freq must be \[R\] with 2 R <= head_dim=64"),
    (dict(k=jnp.zeros((2, 16, 2, 64), jnp.int32), v=jnp.zeros((2, 16, 2, 64), jnp.int32)),
     r"k_cache must be float32, bfloat16 or float16, got int32"),
    (dict(v=jnp.zeros((2, 17, 2, 64))), r"k_cache float32 \[2, 16, 2, 64\] and v_cache float32"
     r" \[2, 17, 2, 64\] differ"),
    (dict(layer=jnp.int32(0)), r"k_cache must be \[L, B, S, K, H\] \(stacked, with layer=\)"),
    (dict(k=jnp.zeros((3, 2, 16, 2, 64)), v=jnp.zeros((3, 2, 16, 2, 64)), layer=jnp.float32(1)),
     r"layer must be an integer scalar, got float32"),
    (dict(head=96, parts=jnp.zeros((2, 2, 12 * 96))),
     r"head_dim H=96 must be a power of two >= 16"),
    (dict(block_sizes=at.BlockSizes(block_s=8)), r"block_s=8 must be a power of two >= 16"),
    (dict(block_sizes=at.BlockSizes(split_s=0)), r"split_s=0 must be a positive integer"),
])
def test_rope_attention_invalid_inputs_raise(kwargs, pattern):
    """The kernel and (but for what only the kernel cannot take: H, tiling) the reference reject
    bad shapes and dtypes with a message naming the value, before anything runs."""
    kwargs = dict(kwargs)
    a = _rope_args(h=kwargs.pop("head", 64), s=kwargs.pop("seq", 16))
    a.update(kwargs)
    kernel_only = "block_sizes" in kwargs or pattern.startswith("head_dim")
    fns = [at.rope_decode_attention] + ([] if kernel_only else [at.rope_decode_attention_reference])
    for fn in fns:
        b = dict(a)
        args = [b.pop(x) for x in ("parts", "positions", "inv_freq", "k", "v")]
        with pytest.raises(InputError, match=pattern) as info:
            fn(*args, interpret=INTERPRET, **b)
        assert "\n" not in str(info.value)


def test_rope_attention_refuses_one_buffer_for_both_caches():
    a = _rope_args()
    with pytest.raises(InputError, match="same array"):
        at.rope_decode_attention(a["parts"], a["positions"], a["inv_freq"], a["k"], a["k"],
                                 n_head=8, n_kv_head=2, interpret=INTERPRET)


def test_rope_supports():
    assert at.supports_rope(1, 32, 8, 128, 4) and at.supports_rope(8, 9, 3, 64)
    assert not at.supports_rope(9, 32, 8, 128) and not at.supports_rope(1, 32, 8, 128, 3)
    assert not at.supports_rope(1, 32, 8, 96) and not at.supports_rope(1, 30, 8, 128)
