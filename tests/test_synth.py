"""Tests for the synthetic GGUF writer: block layouts, tensor types vs llama.cpp, loadability."""

import dataclasses
import math
import os
import subprocess
import sys
import tracemalloc

import gguf
import numpy as np
import pytest

from conftest import open_llama_cpp
from ntransformer_jax import synth
from ntransformer_jax.errors import InputError
from ntransformer_jax.metadata import read_metadata

QT = gguf.GGMLQuantizationType
TINY = synth.SHAPES["tiny"]
llama_cpp = pytest.importorskip("llama_cpp")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _weights(path) -> tuple[dict[str, np.ndarray], dict[str, QT], gguf.GGUFReader]:
    """Every tensor dequantized to float64 in numpy order, and its type."""
    reader = gguf.GGUFReader(path)
    weights, types = {}, {}
    for t in reader.tensors:
        weights[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        types[t.name] = t.tensor_type
    return weights, types, reader


def _rms_norm(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def _reference_forward(w: dict[str, np.ndarray], shape: synth.SynthShape, tokens):
    """Float64 Llama forward (llama.cpp semantics): logits [T, V] and residual RMS per layer."""
    n_t, hd = len(tokens), shape.head_dim
    group = shape.n_head // shape.n_kv_head
    pos = np.arange(n_t, dtype=np.float64)
    inv_freq = shape.rope_base ** (-np.arange(0, hd, 2) / hd)
    if "rope_freqs.weight" in w:
        inv_freq = inv_freq / w["rope_freqs.weight"]
    ang = pos[:, None] * inv_freq[None, :]                      # [T, H/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(x):                                                # [T, N, H], adjacent pairs
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    mask = np.triu(np.full((n_t, n_t), -np.inf), 1)
    x = w["token_embd.weight"][tokens]                          # [T, D]
    rms = []
    for i in range(shape.n_layers):
        p = f"blk.{i}."
        h = _rms_norm(x, w[p + "attn_norm.weight"], shape.rms_eps)
        q = rope((h @ w[p + "attn_q.weight"].T).reshape(n_t, shape.n_head, hd))
        k = rope((h @ w[p + "attn_k.weight"].T).reshape(n_t, shape.n_kv_head, hd))
        v = (h @ w[p + "attn_v.weight"].T).reshape(n_t, shape.n_kv_head, hd)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        s = np.einsum("tnh,snh->nts", q, k) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("nts,snh->tnh", s, v).reshape(n_t, -1)
        x = x + o @ w[p + "attn_output.weight"].T
        h = _rms_norm(x, w[p + "ffn_norm.weight"], shape.rms_eps)
        g = h @ w[p + "ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        rms.append(float(np.sqrt(np.mean(x * x))))
    h = _rms_norm(x, w["output_norm.weight"], shape.rms_eps)
    out = w.get("output.weight", w["token_embd.weight"])
    return h @ out.T, np.array(rms)


def _llama_cpp_logits(path, tokens) -> np.ndarray:
    llm = open_llama_cpp(os.fspath(path), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(list(tokens))
    logits = np.array(llm.scores[:len(tokens)], dtype=np.float64)
    llm.close()
    return logits


TOKENS = [1, 300, 17, 42, 400, 259, 5, 511]


# --------------------------------------------------------------------------------------
# block layouts and random blocks
# --------------------------------------------------------------------------------------


def test_pack_layouts_match_gguf_dequantize():
    rng = np.random.default_rng(0)
    n = 50
    d = rng.uniform(-1, 1, n).astype(np.float16).astype(np.float32)
    m = rng.uniform(-1, 1, n).astype(np.float16).astype(np.float32)
    col = (slice(None), None)

    def check(blocks, qtype, expected):
        np.testing.assert_allclose(gguf.quants.dequantize(blocks, qtype), expected, rtol=1e-6, atol=1e-6)

    q = rng.integers(-127, 128, (n, 32))
    check(synth.pack_q8_0(d, q), QT.Q8_0, d[col] * q)
    q = rng.integers(0, 16, (n, 32))
    check(synth.pack_q4_0(d, q), QT.Q4_0, d[col] * (q - 8))
    check(synth.pack_q4_1(d, m, q), QT.Q4_1, d[col] * q + m[col])
    q = rng.integers(0, 32, (n, 32))
    check(synth.pack_q5_0(d, q), QT.Q5_0, d[col] * (q - 16))
    check(synth.pack_q5_1(d, m, q), QT.Q5_1, d[col] * q + m[col])
    sc, mn = rng.integers(0, 64, (n, 8)), rng.integers(0, 64, (n, 8))
    for qtype, levels, pack in [(QT.Q4_K, 16, synth.pack_q4_k), (QT.Q5_K, 32, synth.pack_q5_k)]:
        q = rng.integers(0, levels, (n, 256))
        expected = (d[:, None, None] * sc[:, :, None] * q.reshape(n, 8, 32)
                    - m[:, None, None] * mn[:, :, None]).reshape(n, 256)
        check(pack(d, m, sc, mn, q), qtype, expected)
    sc6, q = rng.integers(-128, 128, (n, 16)), rng.integers(0, 64, (n, 256))
    expected = (d[:, None, None] * sc6[:, :, None] * (q.reshape(n, 16, 16) - 32)).reshape(n, 256)
    check(synth.pack_q6_k(d, sc6, q), QT.Q6_K, expected)


@pytest.mark.parametrize("qtype", list(synth._SCALE_FIELDS), ids=lambda t: t.name)
def test_random_blocks_have_intended_std(qtype):
    rng = np.random.default_rng(1)
    std = 3e-3
    fresh = gguf.quants.dequantize(synth._sample_blocks(qtype, rng, 8192, std), qtype)
    pooled = gguf.quants.dequantize(synth._BlockPool(qtype, rng).take(rng, 8192, std), qtype)
    for x in (fresh, pooled):
        assert abs(x.std() / std - 1) < 0.03
        assert abs(x.mean()) < 0.02 * std


def test_rope_factors_llama31():
    f = synth.llama3_rope_factors(128, 500000.0)
    assert f.shape == (64,) and f.dtype == np.float32
    assert f[0] == 1.0 and f[-1] == 8.0            # short wavelengths kept, long ones slowed 8x
    assert np.all(np.diff(f) >= 0) and np.all((f >= 1) & (f <= 8))
    assert 0 < np.sum((f > 1) & (f < 8)) < 64       # a smooth band in between


def test_vocab_is_unique_and_typed():
    tokens, scores, types = synth.make_vocab(128256)
    assert len(tokens) == len(scores) == len(types) == 128256
    assert len(set(tokens)) == 128256
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 0x41] == "<0x41>"
    assert types[3:259] == [int(gguf.TokenType.BYTE)] * 256
    assert all(a > b for a, b in zip(scores[259:], scores[260:]))


def test_shape_validation():
    with pytest.raises(InputError, match="n_head"):
        dataclasses.replace(TINY, n_head=3)
    with pytest.raises(InputError, match="n_kv_head"):
        dataclasses.replace(TINY, n_kv_head=3)
    with pytest.raises(InputError, match="n_vocab"):
        dataclasses.replace(TINY, n_vocab=100)
    with pytest.raises(InputError, match="quant"):
        synth.tensor_plan(TINY, "Q3_K_XL")


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", synth.QUANTS)
def test_tiny_file_contents(tmp_path, quant):
    path = tmp_path / f"tiny-{quant}.gguf"
    synth.write_synthetic(path, TINY, quant)
    weights, types, reader = _weights(path)
    meta = read_metadata(reader)
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == synth._MIXES[quant].ftype
    expected_meta = {"block_count": 2, "context_length": 512, "embedding_length": 256,
                     "feed_forward_length": 512, "attention.head_count": 4,
                     "attention.head_count_kv": 2, "rope.dimension_count": 64, "vocab_size": 512}
    for key, value in expected_meta.items():
        assert meta[f"llama.{key}"] == value, key
    assert meta["llama.rope.freq_base"] == 500000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert len(meta["tokenizer.ggml.tokens"]) == 512

    plan = synth.tensor_plan(TINY, quant)
    assert [t.name for t in reader.tensors] == [s.name for s in plan]
    for spec in plan:
        w = weights[spec.name]
        assert types[spec.name] == spec.qtype, spec.name
        assert w.shape == spec.shape, spec.name
        assert np.all(np.isfinite(w)), spec.name
        if spec.name == "rope_freqs.weight":
            np.testing.assert_array_equal(w, synth.llama3_rope_factors(64, 500000.0))
        elif len(spec.shape) == 1:
            assert abs(w.mean() - 1) < 0.01 and 0.01 < w.std() < 0.03, spec.name
        else:
            assert abs(w.std() / spec.std - 1) < 0.1, (spec.name, w.std(), spec.std)
            assert len(np.unique(w, axis=0)) == w.shape[0], f"{spec.name} has repeated rows"
    # quantized mixes really are mixes where llama.cpp makes them so
    if quant == "Q4_K_M":
        assert types["blk.0.attn_v.weight"] == QT.Q4_K and types["blk.1.attn_v.weight"] == QT.Q6_K
        assert types["output.weight"] == QT.Q6_K and types["token_embd.weight"] == QT.Q4_K


@pytest.mark.parametrize("quant", synth.QUANTS)
def test_llama_cpp_loads_tiny(tmp_path, quant):
    path = tmp_path / f"tiny-{quant}.gguf"
    synth.write_synthetic(path, TINY, quant, seed=3)
    logits = _llama_cpp_logits(path, TOKENS)
    assert logits.shape == (len(TOKENS), TINY.n_vocab)
    assert np.all(np.isfinite(logits))
    assert 0.5 < logits.std() < 2.0


def test_reference_forward_matches_llama_cpp_f32(tmp_path):
    """The file means what we think it means: a float64 Llama forward agrees with llama.cpp."""
    path = tmp_path / "tiny-f32.gguf"
    synth.write_synthetic(path, TINY, "F32")
    weights, _, _ = _weights(path)
    ours, _ = _reference_forward(weights, TINY, TOKENS)
    theirs = _llama_cpp_logits(path, TOKENS)
    rel = np.abs(ours - theirs).max() / theirs.std()
    assert rel < 1e-2, rel
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_deep_stack_stays_finite(tmp_path):
    """80 layers (the 70B depth, with its attn_v rule): activations stay O(1) to the end."""
    shape = dataclasses.replace(TINY, n_layers=80, n_ff=256)
    path = tmp_path / "deep-q4km.gguf"
    synth.write_synthetic(path, shape, "Q4_K_M")
    weights, types, _ = _weights(path)
    assert types["blk.10.attn_v.weight"] == QT.Q5_K          # llama.cpp's 70B rule
    logits, rms = _reference_forward(weights, shape, TOKENS)
    assert np.all(np.isfinite(logits)) and np.all(np.isfinite(rms))
    assert rms.max() < 2 * synth.RESIDUAL_GAIN and rms[-1] > rms[0]   # grows, stays bounded
    assert 0.5 < logits.std() < 2.0
    theirs = _llama_cpp_logits(path, TOKENS)
    assert np.all(np.isfinite(theirs))
    assert np.corrcoef(logits.ravel(), theirs.ravel())[0, 1] > 0.95


_VARIANTS = {
    "deep80": dataclasses.replace(TINY, n_layers=80, n_ff=256),     # use_more_bits + 70B rule
    "ff352": dataclasses.replace(TINY, n_layers=9, n_ff=352),       # K-quant row fallbacks
    "tied": dataclasses.replace(TINY, n_layers=4, tied_output=True, rope_freqs=False),
}


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_tensor_types_match_llama_cpp_quantizer(tmp_path, variant):
    shape = _VARIANTS[variant]
    src = tmp_path / "src-f16.gguf"
    synth.write_synthetic(src, shape, "F16")
    for quant in ("Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K"):
        dst = tmp_path / f"{quant}.gguf"
        synth.quantize_with_llama_cpp(src, dst, quant)
        theirs = {t.name: t.tensor_type for t in gguf.GGUFReader(dst).tensors}
        ours = {s.name: s.qtype for s in synth.tensor_plan(shape, quant)}
        assert theirs == ours, quant
        os.remove(dst)


def test_quantize_with_llama_cpp_all_types(tmp_path):
    src = tmp_path / "tiny-f32.gguf"
    synth.write_synthetic(src, TINY, "F32")
    for ftype in synth.LLAMA_CPP_FTYPES:
        dst = tmp_path / f"tiny-{ftype}.gguf"
        synth.quantize_with_llama_cpp(src, dst, ftype)
        assert read_metadata(gguf.GGUFReader(dst))["general.file_type"] == synth.LLAMA_CPP_FTYPES[ftype]
        assert np.all(np.isfinite(_llama_cpp_logits(dst, TOKENS[:4])))
    with pytest.raises(InputError):
        synth.quantize_with_llama_cpp(src, tmp_path / "x.gguf", "Q9_9")


def test_same_seed_same_bytes(tmp_path):
    a, b, c = (tmp_path / f"{n}.gguf" for n in "abc")
    synth.write_synthetic(a, TINY, "Q4_K_M", seed=7)
    synth.write_synthetic(b, TINY, "Q4_K_M", seed=7)
    synth.write_synthetic(c, TINY, "Q4_K_M", seed=8)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_streaming_keeps_memory_flat(tmp_path, monkeypatch):
    """Peak allocation does not grow with the file: 2 vs 10 layers, small chunks and pool.

    These shapes also take the block-pool path (rows of 4 K-quant blocks); pooled tensors must
    still have the intended std and no repeated rows.
    """
    monkeypatch.setattr(synth, "_CHUNK_BYTES", 2 << 20)
    monkeypatch.setattr(synth, "_POOL_BLOCKS", 4096)
    monkeypatch.setattr(synth, "_FRESH_MAX_VALUES", 1 << 16)
    peaks, sizes = [], []
    for n_layers in (2, 10):
        shape = synth.SynthShape(n_layers=n_layers, n_embd=1024, n_ff=4096, n_head=8,
                                 n_kv_head=2, n_vocab=8192, ctx_len=4096)
        path = tmp_path / f"mid-{n_layers}.gguf"
        calls = []
        tracemalloc.start()
        synth.write_synthetic(path, shape, "Q4_K_M", progress=lambda d, t, n: calls.append((d, t)))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        sizes.append(path.stat().st_size)
        assert calls[-1][0] == calls[-1][1] > 0.99 * sizes[-1]
        assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    assert sizes[1] > 2 * sizes[0]
    # flat: 5x the bytes written, the same bounded peak (the writer queue depth varies with timing)
    assert peaks[1] < 1.5 * peaks[0] and peaks[1] < 40e6, (peaks, sizes)

    reader = gguf.GGUFReader(path)
    specs = {s.name: s for s in synth.tensor_plan(shape, "Q4_K_M")}
    for t in reader.tensors:
        if t.name in ("token_embd.weight", "blk.9.ffn_up.weight", "blk.9.ffn_down.weight",
                      "output.weight"):
            w = gguf.quants.dequantize(np.asarray(t.data[:4096]), t.tensor_type)
            assert abs(w.std() / specs[t.name].std - 1) < 0.05, t.name
            assert len(np.unique(w, axis=0)) == w.shape[0], t.name


@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q4_K_M", "Q6_K"])
def test_pooled_tensors_are_valid(tmp_path, monkeypatch, quant):
    """Every matrix from the pool path: intended std, distinct rows, loads in llama.cpp."""
    monkeypatch.setattr(synth, "_POOL_BLOCKS", 2048)
    monkeypatch.setattr(synth, "_FRESH_MAX_VALUES", 0)
    shape = synth.SynthShape(n_layers=2, n_embd=1024, n_ff=1024, n_head=8, n_kv_head=4,
                             n_vocab=1024, ctx_len=256)
    path = tmp_path / f"pooled-{quant}.gguf"
    synth.write_synthetic(path, shape, quant)
    weights, _, _ = _weights(path)
    for spec in synth.tensor_plan(shape, quant):
        if len(spec.shape) == 2:
            w = weights[spec.name]
            assert abs(w.std() / spec.std - 1) < 0.05, spec.name
            assert len(np.unique(w, axis=0)) == w.shape[0], spec.name
    logits = _llama_cpp_logits(path, TOKENS)
    assert np.all(np.isfinite(logits)) and 0.5 < logits.std() < 2.0


def test_cli(tmp_path):
    out = tmp_path / "cli.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "ntransformer_jax.synth", "--shape", "tiny", "--quant", "Q6_K",
         "--n_layers", "3", "--vocab", "600", "--tied_output", f"--out={out}"],
        capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert "100.0%" in proc.stderr
    meta = read_metadata(gguf.GGUFReader(out))
    assert meta["llama.block_count"] == 3 and meta["llama.vocab_size"] == 600
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in names and "blk.2.ffn_down.weight" in names
