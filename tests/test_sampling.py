"""Sampling filters and determinism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntransformer_jax.errors import InputError
from ntransformer_jax.sampling import SamplingParams, apply_repeat_penalty, filter_logits, sample

V = 50


def _logits(rng, b=3):
    return jnp.asarray(rng.normal(size=(b, V)) * 3, jnp.float32)


def _no_recent(b=3):
    return jnp.full((b, 4), -1, jnp.int32)


def test_greedy_is_argmax():
    rng = np.random.default_rng()
    logits = _logits(rng)
    out = sample(logits, _no_recent(), jax.random.key(0), SamplingParams(temperature=0))
    np.testing.assert_array_equal(np.asarray(out), np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=1.0, top_k=0, top_p=1e-6, min_p=0.0),
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=1.0),
])
def test_degenerate_filters_reduce_to_greedy(params):
    rng = np.random.default_rng()
    logits = _logits(rng)
    for seed in range(5):
        out = sample(logits, _no_recent(), jax.random.key(seed), params)
        np.testing.assert_array_equal(np.asarray(out), np.argmax(np.asarray(logits), -1))


def test_top_k_keeps_exactly_k_best():
    rng = np.random.default_rng()
    logits = _logits(rng)
    kept = np.isfinite(np.asarray(filter_logits(logits, SamplingParams(top_k=7, top_p=1.0, min_p=0.0))))
    best = np.argsort(-np.asarray(logits), -1)[:, :7]
    assert kept.sum(-1).tolist() == [7, 7, 7]
    assert all(kept[i, best[i]].all() for i in range(3))


def test_top_p_keeps_smallest_set_reaching_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    kept = np.isfinite(np.asarray(filter_logits(logits, SamplingParams(top_k=0, top_p=0.7, min_p=0.0))))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(np.asarray(filter_logits(logits, SamplingParams(top_k=0, top_p=0.81, min_p=0.0))))
    assert kept.tolist() == [[True, True, True, False]]


def test_min_p_threshold():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    kept = np.isfinite(np.asarray(filter_logits(logits, SamplingParams(top_k=0, top_p=1.0, min_p=0.25))))
    assert kept.tolist() == [[True, True, True, False]]


def test_repeat_penalty_direction():
    logits = jnp.asarray([[2.0, -2.0, 1.0, 0.5]], jnp.float32)
    out = np.asarray(apply_repeat_penalty(logits, jnp.asarray([[0, 1, -1]]), 2.0))
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, 0.5]])


def test_same_seed_same_tokens_and_distribution():
    rng = np.random.default_rng()
    logits = _logits(rng, b=1)
    params = SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0)
    draw = lambda seed: int(sample(logits, _no_recent(1), jax.random.key(seed), params)[0])
    assert [draw(s) for s in range(20)] == [draw(s) for s in range(20)]
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 4000)
    many = np.asarray(jax.vmap(lambda k: sample(logits, _no_recent(1), k, params)[0])(keys))
    expect = np.asarray(jax.nn.softmax(logits[0] / 0.7))
    freq = np.bincount(many, minlength=V) / len(many)
    assert np.abs(freq - expect).max() < 0.04


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(min_p=-0.1), dict(top_k=-1), dict(repeat_penalty=0.0),
                                    dict(temperature=float("inf")), dict(temperature=float("nan")),
                                    dict(repeat_penalty=float("inf")), dict(top_p=float("nan"))])
def test_invalid_params_raise(kwargs):
    with pytest.raises(InputError):
        SamplingParams(**kwargs)


def test_banned_tokens_are_never_sampled():
    rng = np.random.default_rng()
    logits = _logits(rng)
    best = np.argmax(np.asarray(logits), -1)
    banned = tuple(sorted({int(t) for t in best} | {0, V - 1}))
    greedy = np.asarray(sample(logits, _no_recent(), jax.random.key(0), SamplingParams(temperature=0, banned=banned)))
    masked = np.asarray(logits).copy()
    masked[:, list(banned)] = -np.inf
    np.testing.assert_array_equal(greedy, np.argmax(masked, -1))
    params = SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, banned=banned)
    draws = np.concatenate([np.asarray(sample(logits, _no_recent(), jax.random.key(s), params)) for s in range(200)])
    assert not set(draws.tolist()) & set(banned)
    assert len(set(draws.tolist())) > 10           # still a spread over the rest


@pytest.mark.parametrize("banned", [[1, 2], (1, -1), (1.5,), (True,)])
def test_bad_banned_tokens(banned):
    with pytest.raises(InputError, match="banned"):
        SamplingParams(banned=banned)
