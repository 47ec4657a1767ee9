"""Speculative decoding: the rejection rule keeps the target distribution; greedy equals plain greedy."""

from __future__ import annotations

import numpy as np
import pytest

import ntransformer_jax as nt
from ntransformer_jax import synth
from ntransformer_jax.speculative import resolve


def _dist(rng, v):
    p = rng.random(v) ** 3
    return p / p.sum()


def test_rejection_rule_preserves_target_distribution():
    """Whatever the draft q, the token that the round emits at the first position is ~ p."""
    rng = np.random.default_rng()
    v, n = 6, 40000
    p0, p1, q0 = _dist(rng, v), _dist(rng, v), _dist(rng, v)
    counts = np.zeros(v)
    for _ in range(n):
        d = rng.choice(v, p=q0)
        good, nxt = resolve(np.stack([p0, p1]), [q0], [int(d)], greedy=False, rng=rng)
        counts[good[0] if good else nxt] += 1
    freq = counts / n
    assert np.abs(freq - p0).max() < 0.015, (freq, p0)


def test_greedy_rule():
    ps = np.eye(5)[[2, 4, 1]]
    assert resolve(ps, [None, None], [2, 4], greedy=True, rng=None) == ([2, 4], 1)
    assert resolve(ps, [None, None], [2, 3], greedy=True, rng=None) == ([2], 4)
    assert resolve(ps, [None, None], [0, 4], greedy=True, rng=None) == ([], 2)


@pytest.fixture(scope="module")
def smollm_draft(smollm_path, tmp_path_factory):
    """A smaller quantization of the same model (llama.cpp requantizes Q4_1 -> Q4_0)."""
    path = str(tmp_path_factory.mktemp("draft") / "smollm-q4_0.gguf")
    synth.quantize_with_llama_cpp(smollm_path, path, "Q4_0")
    return path


def test_speculative_greedy_equals_plain_greedy(smollm_engine, smollm_path, smollm_draft):
    spec = nt.load(smollm_path, ctx_size=256, draft_model=smollm_draft, draft_k=4)
    greedy = nt.SamplingParams(temperature=0)
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        ids = spec.tokenize(prompt)
        plain = list(smollm_engine.generate_tokens(ids, max_new_tokens=24, params=greedy))
        assert list(spec.generate_tokens(ids, max_new_tokens=24, params=greedy)) == plain
        st = spec.spec_stats
        assert st.rounds > 0 and 0 <= st.acceptance_rate <= 1


def test_speculative_sampling_is_seeded_and_stops(tiny_f32_path, tmp_path):
    draft = str(tmp_path / "draft.gguf")
    synth.write_synthetic(draft, synth.SHAPES["tiny"], "Q8_0", seed=99)   # same vocabulary
    spec = nt.load(tiny_f32_path, ctx_size=40, draft_model=draft, draft_k=3)
    params = nt.SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    a = list(spec.generate_tokens([1, 5, 9], max_new_tokens=50, params=params, seed=11))
    b = list(spec.generate_tokens([1, 5, 9], max_new_tokens=50, params=params, seed=11))
    assert a == b and len(a) <= 40 - 3 + 1


def test_draft_with_other_vocabulary_is_refused(tiny_f32_path, smollm_path):
    with pytest.raises(nt.InputError, match="vocabulary"):
        nt.load(tiny_f32_path, ctx_size=32, draft_model=smollm_path)


def test_resident_layers_self_draft(smollm_engine, smollm_path):
    """--draft_model self: the VRAM-resident layers draft; greedy output stays plain greedy."""
    greedy = nt.SamplingParams(temperature=0)
    ids = smollm_engine.tokenize("The capital of France is")
    plain = list(smollm_engine.generate_tokens(ids, max_new_tokens=20, params=greedy))
    spec = nt.load(smollm_path, ctx_size=128, max_vram_layers=28, max_ram_layers=30, draft_model="self")
    assert list(spec.generate_tokens(ids, max_new_tokens=20, params=greedy)) == plain
    assert spec.spec_stats.drafted > 0 and spec.spec_stats.accepted > 0
    with pytest.raises(nt.InputError, match="tiered"):
        nt.load(smollm_path, ctx_size=64, draft_model="self")
