"""Batched generation: every row equals its solo run (greedy), prompts of different lengths."""

from __future__ import annotations

import numpy as np
import pytest

import ntransformer_jax as nt

GREEDY = nt.SamplingParams(temperature=0)


@pytest.mark.parametrize("opts", [dict(), dict(max_vram_layers=1, max_ram_layers=0)])
def test_batch_rows_equal_solo_runs(opts, tiny_f32_path):
    engine = nt.load(tiny_f32_path, ctx_size=96, **opts)
    rng = np.random.default_rng()
    prompts = [rng.integers(3, engine.config.n_vocab, n).tolist() for n in (5, 17, 1, 30)]
    solo = [list(engine.generate_tokens(p, max_new_tokens=10, params=GREEDY)) for p in prompts]
    batch = engine.generate_batch_tokens(prompts, max_new_tokens=10, params=GREEDY)
    assert batch == solo
    # the engine is usable for single generation afterwards
    assert list(engine.generate_tokens(prompts[1], max_new_tokens=10, params=GREEDY)) == solo[1]


def test_generate_batch_text_smollm(smollm_engine):
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Water boils at a temperature of"]
    solo = ["".join(smollm_engine.generate(p, max_new_tokens=8, temperature=0)) for p in prompts]
    assert smollm_engine.generate_batch(prompts, max_new_tokens=8, temperature=0) == solo
    assert "Paris" in solo[0]


def test_batch_rows_stop_independently_at_ctx(tiny_f32_path):
    engine = nt.load(tiny_f32_path, ctx_size=24)
    prompts = [[5] * 20, [6] * 3]
    out = engine.generate_batch_tokens(prompts, max_new_tokens=30, params=GREEDY)
    # a row fills the cache to ctx_size, plus the token sampled from its last position
    assert len(out[0]) <= 24 - 20 + 1 and len(out[1]) <= 24 - 3 + 1
    assert out == [list(engine.generate_tokens(p, max_new_tokens=30, params=GREEDY)) for p in prompts]
    with pytest.raises(nt.InputError, match="prompt 1"):
        engine.generate_batch_tokens([[1], []], max_new_tokens=2)


def test_cli_batch_file(tmp_path, smollm_path):
    import subprocess
    import sys
    f = tmp_path / "prompts.txt"
    f.write_text("The capital of France is\n\n1, 2, 3, 4,\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "ntransformer_jax", "--batch_file", str(f), "--n_predict", "8",
                        "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    answers = r.stdout.rstrip("\n").split("\n---\n")
    assert len(answers) == 2 and "Paris" in answers[0] and "5" in answers[1]
