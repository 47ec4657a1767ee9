"""The engine's logits against an independent float64 forward on the same dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import ntransformer_jax as nt
from conftest import LLAMA_CPP_QUANTS
from ntransformer_jax import model as M
from ntransformer_jax.model import QTensor
from ntransformer_jax.sampling import SamplingParams
from reference import Float64Llama, compare_logits

PROSE = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He carried a small "
    "brass lantern, a notebook, and a thermos of strong black tea. From the top he could see the "
    "fishing boats returning to the harbour, their nets heavy with mackerel and cod. In 1923 a storm "
    "destroyed half of the village, but the lighthouse stood firm. def add(a, b):\n    return a + b\n"
    "Numbers like 3.14159 and 2,718 appear in the margins of his notebook, next to sketches of gulls."
)


def _check(ours, ref, max_rel=1e-2, min_top1=0.97):
    rel, top1 = compare_logits(ours, ref)
    assert np.isfinite(ours).all()
    assert rel <= max_rel and top1 >= min_top1, f"median rel err {rel:.2e}, top-1 {top1:.3f}"
    return rel, top1


def test_smollm_logits_match_float64_reference(smollm_engine, smollm_path):
    ids = smollm_engine.tokenize(PROSE)[:96]
    ours = smollm_engine.logits(ids)
    assert ours.shape == (len(ids), smollm_engine.config.n_vocab) and ours.dtype == np.float32
    _check(ours, Float64Llama(smollm_path).logits(ids))


@pytest.mark.parametrize("ftype", ("F32",) + LLAMA_CPP_QUANTS)
def test_synthetic_logits_match_float64_reference(ftype, tiny_f32_path, tiny_quantized):
    path = tiny_f32_path if ftype == "F32" else tiny_quantized(ftype)
    engine = nt.load(path, ctx_size=128)
    cfg = engine.config
    assert cfg.has_rope_freqs and not cfg.tied_output and cfg.n_kv_head < cfg.n_head
    ids = np.random.default_rng().integers(0, cfg.n_vocab, 64)
    _check(engine.logits(ids), Float64Llama(path).logits(ids))


def test_incremental_decode_equals_prefill(tiny_f32_path):
    """Token-by-token decoding through the KV cache gives the prefill's logits."""
    engine = nt.load(tiny_f32_path, ctx_size=64)
    ids = np.random.default_rng().integers(0, engine.config.n_vocab, 20).astype(np.int32)
    full = engine.logits(ids)
    steps = [np.asarray(engine._forward(ids[:5], 0, all_logits=True))]
    for p in range(5, len(ids)):
        steps.append(np.asarray(engine._forward(ids[p:p + 1], p, all_logits=True)))
    inc = np.concatenate(steps)
    np.testing.assert_allclose(inc, full, rtol=2e-4, atol=2e-4 * np.abs(full).max())


def test_chunked_prefill_equals_single_chunk(tiny_f32_path, monkeypatch):
    from ntransformer_jax import engine as engine_mod
    engine = nt.load(tiny_f32_path, ctx_size=100)
    ids = np.random.default_rng().integers(0, engine.config.n_vocab, 77)
    whole = engine.logits(ids)
    monkeypatch.setattr(engine_mod, "MAX_PREFILL_CHUNK", 16)
    chunked = engine.logits(ids)
    np.testing.assert_allclose(chunked, whole, rtol=2e-4, atol=2e-4 * np.abs(whole).max())


def test_logits_rejects_bad_ids(tiny_f32_path):
    engine = nt.load(tiny_f32_path, ctx_size=16)
    with pytest.raises(nt.NTransformerError, match="outside the vocabulary"):
        engine.logits([1, engine.config.n_vocab])
    with pytest.raises(nt.NTransformerError, match="ctx_size"):
        engine.logits([1] * 17)


def test_layerwise_block_equals_resident_scan(tiny_quantized):
    """The per-layer jitted block (the streaming path) computes what the stacked scan computes,
    and one compilation serves every layer of a signature."""
    from ntransformer_jax import model as M
    engine = nt.load(tiny_quantized("Q8_0"), ctx_size=64)
    ids = np.random.default_rng().integers(0, engine.config.n_vocab, 24)
    before = M.block._cache_size()
    layerwise = engine.logits_layerwise(ids)
    assert M.block._cache_size() - before <= len(engine.segment_sizes)
    np.testing.assert_allclose(layerwise, engine.logits(ids), rtol=1e-4,
                               atol=1e-4 * np.abs(layerwise).max())


def test_continuing_from_cache_equals_fresh_run(tiny_f32_path):
    """Appending a turn at start_pos (what chat does) gives what a fresh run of the whole text gives."""
    engine = nt.load(tiny_f32_path, ctx_size=96)
    rng = np.random.default_rng()
    first = rng.integers(3, engine.config.n_vocab, 12).tolist()
    second = rng.integers(3, engine.config.n_vocab, 7).tolist()
    greedy = nt.SamplingParams(temperature=0)
    reply = list(engine.generate_tokens(first, max_new_tokens=5, params=greedy))
    kept = engine.cached_tokens
    assert kept == (first + reply)[:len(kept)] and len(kept) >= len(first) + len(reply) - 1
    cont = list(engine.generate_tokens(second, max_new_tokens=6, params=greedy, start_pos=len(kept)))
    fresh = list(engine.generate_tokens(kept + second, max_new_tokens=6, params=greedy))
    assert cont == fresh


@pytest.mark.parametrize("ftype", LLAMA_CPP_QUANTS)
def test_kernel_path_matches_float64_reference(ftype, tiny_f32_path, tiny_quantized):
    """With the fused decode kernels (Pallas interpreter on CPU), logits of 20 positions (the
    XLA prefill path: `model.PREFILL_KERNEL` is off), of up to 8 (the kernel's rows) and greedy
    decoding agree with the float64 forward and the XLA path."""
    path = tiny_quantized(ftype)
    engine = nt.load(path, ctx_size=64, kernels="interpret")
    packed = [w for w in engine.segments[0] if isinstance(w, QTensor) and w.kernel]
    assert packed or ftype in ("F16", "Q5_1"), "no matrix took the kernel path"  # no kernels
    ids = np.random.default_rng().integers(0, engine.config.n_vocab, 20)
    ref = Float64Llama(path).logits(ids)
    _check(engine.logits(ids), ref, max_rel=1e-4, min_top1=1.0)   # prefill: packed -> XLA
    ids = ids[:8]
    ours = engine.logits(ids)                                     # 8 rows: the kernels
    _check(ours, ref[:8], max_rel=1e-4, min_top1=1.0)
    plain = nt.load(path, ctx_size=64, kernels="off")
    theirs = plain.logits(ids)
    _check(theirs, ref[:8], max_rel=1e-4, min_top1=1.0)
    # Pointwise, the XLA path sits ~1e-6 of max|logit| from float64. The kernels' integer path
    # rounds x to 16 bits a block before every product: on this model that moves a logit by
    # 6e-5 to 1.2e-4 of max|logit| (Q6_K, 48 draws of ids; Q4_0 and Q8_0 alike), so the bound
    # is twice the worst seen.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2.5e-4 * np.abs(ref[:8]).max())
    prompt = [int(i) for i in ids[:4]]
    greedy = SamplingParams(temperature=0.0)
    assert (list(engine.generate_tokens(prompt, max_new_tokens=4, params=greedy))
            == list(plain.generate_tokens(prompt, max_new_tokens=4, params=greedy)))


def test_bf16_prefill_stays_close(tiny_quantized):
    """matmul="bf16" rounds prefill matmul inputs to bfloat16 (float32 accumulation): logits
    stay close to the float64 forward, and decode rows keep float32."""
    path = tiny_quantized("Q8_0")
    engine = nt.load(path, ctx_size=64, matmul="bf16")
    ids = np.random.default_rng().integers(0, engine.config.n_vocab, 32)
    ref = Float64Llama(path).logits(ids)
    rel, _ = _check(engine.logits(ids), ref, max_rel=3e-2, min_top1=0.9)
    assert rel > 1e-5, "bf16 prefill looks like float32: was matmul ignored?"
    fresh = nt.load(path, ctx_size=64, matmul="bf16")   # (the first engine's cache holds bf16 KV)
    _check(fresh.logits(ids[:8]), ref[:8], max_rel=1e-4, min_top1=1.0)


@pytest.mark.parametrize("matmul", M.MATMUL_TYPES)
def test_prefill_runs_the_prefill_kernel(matmul, tiny_quantized, monkeypatch):
    """Prefill passes (> 8 rows) of packed matrices go through `qmatmul` with inputs of the
    engine's matmul type, and agree with the XLA path (model.PREFILL_KERNEL off)."""
    from ntransformer_jax.kernels import qmatmul
    path = tiny_quantized("Q4_0")
    ids = np.random.default_rng().integers(0, 500, 24)
    monkeypatch.setattr(M, "PREFILL_KERNEL", False)
    xla = nt.load(path, ctx_size=32, kernels="interpret", matmul=matmul).logits(ids)
    monkeypatch.setattr(M, "PREFILL_KERNEL", True)
    jax.clear_caches()              # read when traced
    seen = []
    real = qmatmul.qmatmul_packed
    monkeypatch.setattr(qmatmul, "qmatmul_packed", lambda *a, **k: seen.append(k["dtype"]) or real(*a, **k))
    try:
        engine = nt.load(path, ctx_size=32, kernels="interpret", matmul=matmul)
        got = engine.logits(ids)
    finally:
        jax.clear_caches()          # later tests must not reuse traces made with the kernel on
    # Traced once per block signature: q/k/v and gate/up fused by rows, o and down; the head.
    assert len(seen) >= 5 and set(seen) == {jnp.bfloat16 if matmul == "bf16" else jnp.float32}
    tol = 2e-2 if matmul == "bf16" else 1e-4
    np.testing.assert_allclose(got, xla, rtol=0, atol=tol * np.abs(xla).max())


def test_segments_split_under_the_stack_limit(tiny_quantized, monkeypatch):
    """Resident layers are stacked in chunks no array of which passes MAX_STACK_BYTES (the
    kernels' 32-bit offsets); the chunked model gives the same logits."""
    from ntransformer_jax import engine as engine_mod
    path = tiny_quantized("Q8_0")
    ids = np.random.default_rng().integers(0, 500, 12)
    whole = nt.load(path, ctx_size=32)
    monkeypatch.setattr(engine_mod, "MAX_STACK_BYTES", 1)
    split = nt.load(path, ctx_size=32)
    assert len(whole.segments) == 1 and split.segment_sizes == (1,) * split.config.n_layers
    np.testing.assert_array_equal(split.logits(ids), whole.logits(ids))


@pytest.mark.parametrize("ftype", ("Q4_K_M", "Q6_K"))
def test_plan_counts_repacked_bytes(ftype, tiny_quantized):
    """With the kernels on, placement plans each layer at its repacked size (K-quants grow),
    and that is what the engine holds."""
    import jax
    path = tiny_quantized(ftype)
    on, off = nt.load(path, ctx_size=32, kernels="interpret"), nt.load(path, ctx_size=32)
    held = sum(a.nbytes for a in jax.tree_util.tree_leaves(on.segments))
    assert sum(on.plan.layer_bytes) == held > sum(off.plan.layer_bytes)


def test_kernels_fall_back_to_xla_when_they_cannot_run(tiny_quantized, monkeypatch, caplog):
    """A kernel that fails its load-time self-test (a GPU or Triton that cannot compile it)
    turns kernels="auto" into XLA with a warning, and makes an explicit request fail clearly."""
    from ntransformer_jax import engine as engine_mod
    from ntransformer_jax.kernels import qmatvec
    path = tiny_quantized("Q4_0")
    qmatvec.self_test(qmatvec.T.Q4_0, interpret=True)      # the real kernel passes
    with pytest.raises(nt.InputError, match="kernels='on' needs a GPU"):
        nt.load(path, ctx_size=32, kernels="on")
    monkeypatch.setattr(engine_mod, "_kernel_mode", lambda kernels, device: (
        "off" if kernels == "off" else "interpret"))
    def broken(qtype, interpret=False):
        raise RuntimeError("triton: unsupported GPU")
    monkeypatch.setattr(qmatvec, "self_test", broken)
    engine = nt.load(path, ctx_size=32, kernels="auto")
    assert engine.kernels == "off" and "unsupported GPU" in caplog.text
    with pytest.raises(nt.NTransformerError, match="decode kernels do not run here.*unsupported GPU"):
        nt.load(path, ctx_size=32, kernels="on")


def test_fused_rope_falls_back_to_two_kernels(tiny_quantized, monkeypatch, caplog):
    """Where the fused rope + attention kernel fails its self-test, only the fusion is turned off:
    the engine keeps its kernels (rope_cache_write then decode_attention)."""
    from ntransformer_jax import engine as engine_mod
    from ntransformer_jax.kernels import attention
    monkeypatch.setattr(engine_mod, "_kernel_mode", lambda kernels, device: (
        "off" if kernels == "off" else "interpret"))
    monkeypatch.setattr(M, "FUSE_ROPE_ATTENTION", True)
    def broken(*args, **kwargs):
        raise RuntimeError("triton: cannot lower the fused kernel")
    monkeypatch.setattr(attention, "rope_self_test", broken)
    path = tiny_quantized("Q4_0")
    engine = nt.load(path, ctx_size=32, kernels="auto")
    if not attention.supports_rope(1, engine.config.n_head, engine.config.n_kv_head,
                                   engine.config.head_dim):
        pytest.skip("the tiny model's heads do not take the fused kernel")
    assert engine.kernels == "interpret" and not M.FUSE_ROPE_ATTENTION
    assert "cannot lower the fused kernel" in caplog.text
    ids = np.random.default_rng().integers(0, engine.config.n_vocab, 6)
    _check(engine.logits(ids), Float64Llama(path).logits(ids), max_rel=1e-4, min_top1=1.0)


def test_kernel_path_on_tiered_placement(tiny_quantized):
    """Tiers A and B hold matrices repacked at load, tier C (disk) the file's layout, repacked on
    the device after each copy: the per-layer block takes the kernels for both, and logits agree
    with the float64 forward."""
    path = tiny_quantized("Q4_K_M")
    engine = nt.load(path, ctx_size=32, kernels="interpret", max_vram_layers=0, max_ram_layers=1)
    assert engine.placement == ["ram", "disk"]
    assert engine.streamer.sources[0].host_tree.attn_q.kernel == "interpret"
    assert engine.layer_weights(1).attn_q.kernel == "interpret"     # as the disk tier delivers it
    ids = np.random.default_rng().integers(0, engine.config.n_vocab, 8)
    ref = Float64Llama(path).logits(ids)
    _check(engine.logits(ids), ref, max_rel=1e-4, min_top1=1.0)
    greedy = SamplingParams(temperature=0.0)
    plain = nt.load(path, ctx_size=32)
    assert (list(engine.generate_tokens([int(i) for i in ids[:3]], max_new_tokens=3, params=greedy))
            == list(plain.generate_tokens([int(i) for i in ids[:3]], max_new_tokens=3, params=greedy)))


def test_smollm_kernel_path_matches_float64_reference(smollm_path):
    """The real model (Q4_1 layers, Q8_0 tied head, 576 wide) through the decode kernels
    (Pallas interpreter): 8 positions against the float64 forward."""
    engine = nt.load(smollm_path, ctx_size=64, kernels="interpret")
    assert engine.segments[0].attn_q.kernel == "interpret" and engine.globals.output.kernel
    ids = engine.tokenize(PROSE)[:8]
    # The integer path rounds each kernel's x to 16 bits a block (qmatvec "The integer path");
    # over 30 layers that comes to ~2e-4 median (the float path: < 1e-4).
    from ntransformer_jax.kernels import qmatvec
    max_rel = 1e-3 if qmatvec.INT_DOT else 1e-4
    _check(engine.logits(ids), Float64Llama(smollm_path).logits(ids), max_rel=max_rel, min_top1=1.0)


@pytest.mark.parametrize("tiers", [{}, dict(max_vram_layers=1, max_ram_layers=0)],
                         ids=["resident", "layered"])
def test_decode_step_compiles_once(tiers, tiny_quantized):
    """The first decode step and the later ones share one compiled step (the sampling key and
    the repetition window start on the device like the step outputs that replace them), and a
    second generation compiles nothing."""
    from ntransformer_jax import model as M
    engine = nt.load(tiny_quantized("Q8_0"), ctx_size=57, **tiers)   # a cache shape of its own
    step = M.head_sample if engine.layered else M.decode_step
    before = step._cache_size()
    greedy = SamplingParams(temperature=0.0, repeat_last_n=37)   # and a window of its own
    first = list(engine.generate_tokens([5, 6, 7], max_new_tokens=4, params=greedy))
    assert step._cache_size() == before + 1
    assert list(engine.generate_tokens([5, 6, 7], max_new_tokens=4, params=greedy)) == first
    assert step._cache_size() == before + 1


def test_fused_next_norm_equals_separate_norm(tiny_quantized, monkeypatch):
    """The resident loop's fused residual add + next norm (`model.FUSE_NORM`, one launch)
    gives the logits of the add and the norm launched apart, decode kernels on."""
    import jax
    from ntransformer_jax import model as M
    engine = nt.load(tiny_quantized("Q8_0"), ctx_size=32, kernels="interpret")
    ids = np.random.default_rng().integers(0, engine.config.n_vocab, 5)   # one dispatch
    fused = engine.logits(ids)
    monkeypatch.setattr(M, "FUSE_NORM", False)
    jax.clear_caches()              # read when traced
    try:
        apart = engine.logits(ids)
    finally:
        jax.clear_caches()
    np.testing.assert_allclose(apart, fused, rtol=0, atol=1e-6 * np.abs(fused).max())


def _spy(monkeypatch, module, name: str, calls: list) -> None:
    """Record each call of module.name (at trace time, under jit) in `calls`."""
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("stacked", [False, True], ids=["layer-cache", "stacked-cache"])
def test_block_step_fused_rope_attention_equals_two_kernels(stacked, t, tiny_quantized,
                                                            monkeypatch):
    """`block_step` with `model.FUSE_ROPE_ATTENTION` (rotation, cache write and attention in
    one launch) gives the outputs and the cache of rope_cache_write then decode_attention, for
    a layer's own cache and a stacked one, two batch rows (one ending at the cache's end)."""
    from ntransformer_jax.kernels import attention as attention_kernel, rope_cache
    engine = nt.load(tiny_quantized("Q8_0"), ctx_size=24, kernels="interpret")
    cfg, seg = engine.config, engine.segments[0]
    assert seg.attn_k is None and seg.attn_q.kernel == "interpret"   # q/k/v fused and packed
    i, s, b = 1, 24, 2
    layer = jnp.int32(i)
    rng = np.random.default_rng()
    pos = jnp.asarray([5, s - t], jnp.int32)
    x = jnp.asarray(rng.standard_normal((b, t, cfg.n_embd)), jnp.float32)
    h = M.rms_norm(x, seg.attn_norm[i], cfg.rms_eps)
    lead = (engine.segment_sizes[0],) if stacked else ()
    kv = rng.standard_normal((2, *lead, b, s, cfg.n_kv_head, cfg.head_dim)).astype(np.float32)
    if stacked:
        w = M.LayerWeights(*(v.entry(layer) if isinstance(v, QTensor) else v for v in seg))
        kw, next_norm = dict(layer=layer, norms_stacked=True), engine.next_norms[0]
    else:
        w = M.LayerWeights(*(v.entry(layer).unstacked() if isinstance(v, QTensor)
                             else None if v is None else v[i] for v in seg))
        kw, next_norm = {}, engine.next_norms[0][i]

    def run(fuse: bool):
        monkeypatch.setattr(M, "FUSE_ROPE_ATTENTION", fuse)   # read when traced: a new jit
        calls = []
        _spy(monkeypatch, attention_kernel, "rope_decode_attention", calls)
        _spy(monkeypatch, rope_cache, "rope_cache_write", calls)
        step = jax.jit(lambda x, h, k, v: M.block_step(cfg, w, x, h, M.KVCache(k, v), pos,
                                                       engine.globals.rope_inv_freq, next_norm,
                                                       **kw))
        out = step(x, h, jnp.asarray(kv[0]), jnp.asarray(kv[1]))
        monkeypatch.undo()
        return calls, [np.asarray(a) for a in (out[0], out[1], *out[2])]

    fused_calls, fused = run(True)
    apart_calls, apart = run(False)
    assert fused_calls == ["rope_decode_attention"] and apart_calls == ["rope_cache_write"]
    # The attention differs in rounding (the new keys are a softmax block of their own); the
    # o projection rounds its x to 16 bits a block (qmatvec's integer path), which can turn a
    # last-bit difference into a quantization step. The caches' new rows are the same sums.
    for name, got, want, tol in zip(("x", "h", "k cache", "v cache"), fused, apart,
                                    (1e-4, 1e-4, 1e-6, 1e-6)):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max(),
                                   err_msg=name)


@pytest.mark.parametrize("tiers", [{}, dict(max_vram_layers=1, max_ram_layers=0),
                                   dict(max_vram_layers=1, max_ram_layers=1, draft_model="self",
                                        draft_k=3)],
                         ids=["resident", "layered", "self-draft"])
def test_fused_rope_attention_end_to_end(tiers, tiny_quantized, monkeypatch):
    """The resident loop, the layered path and a speculative self-draft (verification passes
    of 4 tokens) take the fused kernel with `model.FUSE_ROPE_ATTENTION`, and give the logits
    and greedy tokens of the two-kernel path."""
    from ntransformer_jax.kernels import attention as attention_kernel
    path = tiny_quantized("Q8_0")
    ids = np.random.default_rng().integers(0, 500, 5)                    # one 5-token pass
    greedy = SamplingParams(temperature=0.0)

    def run(fuse: bool):
        monkeypatch.setattr(M, "FUSE_ROPE_ATTENTION", fuse)
        calls = []
        _spy(monkeypatch, attention_kernel, "rope_decode_attention", calls)
        jax.clear_caches()              # read when traced
        engine = nt.load(path, ctx_size=32, kernels="interpret", **tiers)
        logits = engine.logits(ids)
        tokens = list(engine.generate_tokens([int(i) for i in ids[:3]], max_new_tokens=6,
                                             params=greedy))
        if "draft_model" in tiers:
            assert engine.spec_stats.drafted > 0
        return calls, logits, tokens

    try:
        fused_calls, fused, fused_tokens = run(True)
        apart_calls, apart, apart_tokens = run(False)
    finally:
        jax.clear_caches()
    assert fused_calls and not apart_calls
    np.testing.assert_allclose(fused, apart, rtol=0, atol=1e-4 * np.abs(apart).max())
    assert fused_tokens == apart_tokens
