"""`kernels.rope_cache.rope_cache_write` against a float64 numpy rotation and cache update
(interpret mode on CPU; `KERNELS_INTERPRET=0` compiles it for the GPU)."""

from __future__ import annotations

import os
import secrets

import jax.numpy as jnp
import numpy as np
import pytest

from ntransformer_jax.errors import InputError
from ntransformer_jax.kernels import rope_cache as rc

INTERPRET = os.environ.get("KERNELS_INTERPRET", "1") != "0"


def reference64(parts, positions, inv_freq, cache_k, cache_v, n_head, n_kv, layer):
    """q rotated, and the caches with the new rows written (numpy float64 on the same inputs)."""
    b, t = positions.shape
    h = cache_k.shape[-1]
    qkv = parts.astype(np.float64).sum(0).reshape(b, t, n_head + 2 * n_kv, h)
    freq = np.zeros(h // 2)
    freq[:len(inv_freq)] = inv_freq
    ang = positions[..., None].astype(np.float64) * freq            # [B, T, H/2]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]

    def rot(x):
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        return out

    q, k, v = rot(qkv[:, :, :n_head]), rot(qkv[:, :, n_head:n_head + n_kv]), qkv[:, :, n_head + n_kv:]
    ks, vs = cache_k.astype(np.float64).copy(), cache_v.astype(np.float64).copy()
    seq = cache_k.shape[-3]
    for bi in range(b):
        start = min(max(int(positions[bi, 0]), 0), seq - t)
        at = (bi, slice(start, start + t)) if layer is None else (layer, bi, slice(start, start + t))
        ks[at], vs[at] = k[bi], v[bi]
    return q, ks, vs


@pytest.mark.parametrize("b,t,n_head,n_kv,h,p,rot,stacked,dtype", [
    (1, 1, 32, 8, 128, 4, 64, True, jnp.float32),     # Llama-3-8B decode
    (2, 3, 8, 2, 64, 1, 32, False, jnp.float32),
    (1, 8, 4, 4, 32, 2, 12, True, jnp.bfloat16),      # partial rotary, bf16 cache
    (3, 2, 16, 1, 16, 8, 8, False, jnp.float16),
])
def test_matches_float64(b, t, n_head, n_kv, h, p, rot, stacked, dtype):
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    seq = 12
    parts = rng.standard_normal((p, b * t, (n_head + 2 * n_kv) * h)).astype(np.float32)
    # row 0 runs into the cache's end (the write is clamped like dynamic_update_slice)
    starts = rng.integers(0, seq - t + 1, b)
    starts[0] = seq - t + 1 if t > 1 else seq - 1
    positions = (starts[:, None] + np.arange(t)[None]).astype(np.int32)
    inv_freq = (10000.0 ** (-np.arange(rot // 2) * 2.0 / rot)).astype(np.float32)
    shape = ((3,) if stacked else ()) + (b, seq, n_kv, h)
    ck = rng.standard_normal(shape).astype(np.float32)
    cv = rng.standard_normal(shape).astype(np.float32)
    ck_in, cv_in = (np.asarray(jnp.asarray(c, dtype).astype(jnp.float32)) for c in (ck, cv))
    layer = 2 if stacked else None
    q, k_new, v_new = rc.rope_cache_write(
        jnp.asarray(parts), jnp.asarray(positions), jnp.asarray(inv_freq), jnp.asarray(ck, dtype),
        jnp.asarray(cv, dtype), n_head=n_head, n_kv_head=n_kv,
        layer=None if layer is None else jnp.int32(layer), interpret=INTERPRET)
    rq, rk, rv = reference64(parts, positions, inv_freq, ck_in, cv_in, n_head, n_kv, layer)
    assert q.shape == (b, t, n_head, h) and k_new.dtype == dtype and v_new.shape == shape
    scale = np.abs(parts).sum(0).max()
    assert np.max(np.abs(np.asarray(q) - rq)) <= 2e-5 * scale, seed
    tol = 2e-5 * scale if dtype == jnp.float32 else 1e-2 * scale
    for got, want in ((k_new, rk), (v_new, rv)):
        got = np.asarray(got.astype(jnp.float32), np.float64)
        assert np.max(np.abs(got - want)) <= tol, seed
        written = np.abs(want - np.asarray(jnp.asarray(ck_in if got is k_new else cv_in))) > 0
        assert np.array_equal(got[~written], want[~written]), f"rows not written changed, {seed}"
    jq, jk, jv = rc.rope_cache_write_reference(
        jnp.asarray(parts), jnp.asarray(positions), jnp.asarray(inv_freq), jnp.asarray(ck, dtype),
        jnp.asarray(cv, dtype), n_head=n_head, n_kv_head=n_kv, layer=layer)
    assert np.max(np.abs(np.asarray(jq) - rq)) <= 2e-5 * scale, seed


def test_other_rows_untouched_exactly():
    """Every cache entry but the new rows keeps its bits (NaN included): the write is in place."""
    ck = np.full((2, 1, 8, 2, 16), np.nan, np.float32)
    ck[1, 0, 3] = 7.0
    parts = np.ones((1, 1, (4 + 4) * 16), np.float32)
    _, k_new, v_new = rc.rope_cache_write(
        jnp.asarray(parts), jnp.asarray([[5]], jnp.int32), jnp.zeros((8,), jnp.float32),
        jnp.asarray(ck), jnp.asarray(ck), n_head=4, n_kv_head=2, layer=jnp.int32(1),
        interpret=INTERPRET)
    for got in (np.asarray(k_new), np.asarray(v_new)):
        assert np.all(got[1, 0, 5] == 1.0)
        assert got[1, 0, 3, 0, 0] == 7.0
        mask = np.ones(got.shape, bool)
        mask[1, 0, 5] = False
        mask[1, 0, 3] = False
        assert np.all(np.isnan(got[mask]))


@pytest.mark.parametrize("kw,match", [
    (dict(n_head=6), "power-of-two"),
    (dict(n_kv_head=4), "KV heads"),
    (dict(parts_shape=(3, 1, 256)), "power of"),
    (dict(parts_shape=(1, 2, 256)), "parts must be"),
    (dict(positions=np.zeros((2, 1), np.int32)), "positions must be"),
    (dict(positions=np.zeros((1, 9), np.int32)), "tokens"),
    (dict(inv_freq=np.zeros(17, np.float32)), "inv_freq"),
])
def test_bad_inputs_are_named(kw, match):
    args = dict(n_head=4, n_kv_head=2, parts_shape=(1, 1, 8 * 32),
                positions=np.zeros((1, 1), np.int32), inv_freq=np.zeros(8, np.float32))
    args.update(kw)
    cache = lambda: jnp.zeros((1, 16, 2, 32), jnp.float32)
    with pytest.raises(InputError, match=match):
        rc.rope_cache_write(jnp.zeros(args["parts_shape"], jnp.float32), jnp.asarray(args["positions"]),
                            jnp.asarray(args["inv_freq"]), cache(), cache(), n_head=args["n_head"],
                            n_kv_head=args["n_kv_head"], interpret=True)


def test_one_buffer_for_both_caches_is_refused():
    cache = jnp.zeros((1, 16, 2, 32), jnp.float32)
    with pytest.raises(InputError, match="same array"):
        rc.rope_cache_write(jnp.zeros((1, 1, 8 * 32), jnp.float32), jnp.zeros((1, 1), jnp.int32),
                            jnp.zeros((8,), jnp.float32), cache, cache, n_head=4, n_kv_head=2,
                            interpret=True)


def test_self_test_passes():
    rc.self_test.__wrapped__(8, 2, 64, interpret=INTERPRET)
