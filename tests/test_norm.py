"""`kernels.norm.add_rms_norm` against a float64 numpy residual add + RMSNorm (interpret mode on
CPU; `KERNELS_INTERPRET=0` compiles it for the GPU)."""

from __future__ import annotations

import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntransformer_jax.errors import InputError
from ntransformer_jax.kernels import norm

INTERPRET = os.environ.get("KERNELS_INTERPRET", "1") != "0"


def reference64(x, parts, w, eps):
    x1 = x.astype(np.float64) + parts.astype(np.float64).sum(0)
    return x1, x1 / np.sqrt(np.mean(x1 * x1, axis=-1, keepdims=True) + eps) * w.astype(np.float64)


@pytest.mark.parametrize("m,d,p,stacked", [(1, 4096, 4, False), (3, 256, 1, True), (8, 1024, 2, True),
                                           (2, 8192, 8, False)])
def test_matches_float64(m, d, p, stacked):
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, d)).astype(np.float32) * 3
    parts = rng.standard_normal((p, m, d)).astype(np.float32)
    ws = rng.uniform(0.5, 1.5, (5, d)).astype(np.float32)
    layer = 3 if stacked else None
    w = ws if stacked else ws[3]
    x1, h = norm.add_rms_norm(jnp.asarray(x), jnp.asarray(parts), jnp.asarray(w), 1e-5,
                              layer=None if layer is None else jnp.int32(layer), interpret=INTERPRET)
    rx, rh = reference64(x, parts, ws[3], 1e-5)
    assert np.max(np.abs(np.asarray(x1) - rx)) <= 1e-5 * np.max(np.abs(rx)), seed
    assert np.max(np.abs(np.asarray(h) - rh)) <= 2e-6 * np.max(np.abs(rh)), seed
    jx, jh = norm.add_rms_norm_reference(jnp.asarray(x), jnp.asarray(parts), jnp.asarray(w), 1e-5,
                                         layer=layer)
    assert np.allclose(np.asarray(h), np.asarray(jh), rtol=1e-5, atol=1e-6), seed
    h_only = norm.add_rms_norm(jnp.asarray(x), None, jnp.asarray(w), 1e-5,
                               layer=None if layer is None else jnp.int32(layer), interpret=INTERPRET)
    _, rh0 = reference64(x, np.zeros((1, m, d), np.float32), ws[3], 1e-5)
    assert np.max(np.abs(np.asarray(h_only) - rh0)) <= 2e-6 * np.max(np.abs(rh0)), seed


@pytest.mark.parametrize("x,parts,w,match", [
    (np.zeros((9, 256)), np.zeros((1, 9, 256)), np.ones(256), "rows"),
    (np.zeros((1, 576)), np.zeros((1, 1, 576)), np.ones(576), "power-of-two"),
    (np.zeros((1, 256)), np.zeros((3, 1, 256)), np.ones(256), "power of two"),
    (np.zeros((1, 256)), np.zeros((1, 2, 256)), np.ones(256), "parts must be"),
    (np.zeros((1, 256)), np.zeros((1, 1, 256)), np.ones(128), "weight must be"),
])
def test_bad_inputs_are_named(x, parts, w, match):
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    with pytest.raises(InputError, match=match):
        norm.add_rms_norm(f32(x), f32(parts), f32(w), 1e-5, interpret=True)


def test_supports():
    assert norm.supports(1, 4096) and norm.supports(8, 256)
    assert not norm.supports(9, 4096) and not norm.supports(1, 576) and not norm.supports(0, 256)


@pytest.mark.parametrize("m,d,p", [(1, 4096, 4), (3, 256, 1), (8, 1024, 2)])
def test_add_parts_matches_float64_and_fixed_order(m, d, p):
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, d)).astype(np.float32) * 3
    parts = rng.standard_normal((p, m, d)).astype(np.float32)
    got = np.asarray(norm.add_parts(jnp.asarray(x), jnp.asarray(parts), interpret=INTERPRET))
    rx, _ = reference64(x, parts, np.ones(d, np.float32), 1e-5)
    assert np.max(np.abs(got - rx)) <= 1e-6 * np.max(np.abs(rx)), seed
    # the same call twice, and the same rows inside a larger jit: the same bits
    again = jax.jit(lambda a, b: norm.add_parts(a, b, interpret=INTERPRET) * 1.0)(x, parts)
    assert np.array_equal(np.asarray(again), got), seed


def test_add_parts_bad_inputs_are_named():
    with pytest.raises(InputError, match="rows"):
        norm.add_parts(jnp.zeros((9, 256)), jnp.zeros((1, 9, 256)), interpret=True)
    with pytest.raises(InputError, match="parts must be"):
        norm.add_parts(jnp.zeros((1, 256)), jnp.zeros((1, 2, 256)), interpret=True)
