"""Long generation in tiered mode keeps host and device memory flat (CPU backend)."""

from __future__ import annotations

import gc

import jax
import pytest

import ntransformer_jax as nt
from ntransformer_jax import synth

SHAPE = synth.SynthShape(n_layers=6, n_embd=256, n_ff=512, n_head=4, n_kv_head=2, n_vocab=512, ctx_len=256)
N_TOKENS = 2000
WARMUP_TOKENS = 200
CHUNK = 200                 # tokens per generate call; each call continues the cached context
RSS_GROWTH_LIMIT = 50 << 20
LIVE_ARRAYS_SLACK = 4       # e.g. a pending step dispatched past the end, the PRNG key


@pytest.fixture(scope="module")
def six_layer_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("leaks") / "six-q4_k_m.gguf")
    synth.write_synthetic(path, SHAPE, "Q4_K_M", seed=3)
    return path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _device_bytes(device: jax.Device) -> int | None:
    stats = device.memory_stats()
    return None if not stats else int(stats.get("bytes_in_use", 0))


def _snapshot(engine) -> dict:
    gc.collect()
    return {"rss": _rss_bytes(), "live_arrays": len(jax.live_arrays()),
            "device_bytes": _device_bytes(engine.device)}


PIPELINE = dict(max_vram_layers=2, max_ram_layers=2)
MMAP = dict(max_vram_layers=2, streaming="mmap")


@pytest.mark.parametrize("options", [
    PIPELINE,
    MMAP,
], ids=["pipeline", "mmap"])
def test_tiered_generation_keeps_memory_flat(six_layer_path, options):
    """2,000 decoded tokens through the streamed tiers: RSS, live arrays and device bytes stay put."""
    params = nt.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    with nt.load(six_layer_path, ctx_size=2304, **options) as engine:
        assert engine.placement.count("vram") == 2 and engine.layered
        prompt, start, generated, calls = [1, 17, 42, 99, 7], 0, 0, 0
        before = None
        while generated < N_TOKENS:
            # End-of-generation or the chunk limit ends a call; the next continues the context.
            last = prompt[-1]
            for last in engine.generate_tokens(prompt, max_new_tokens=CHUNK, params=params,
                                               seed=calls, start_pos=start):
                generated += 1
            calls += 1
            start = len(engine.cached_tokens)
            prompt = [last]
            if before is None and generated >= WARMUP_TOKENS:
                before = _snapshot(engine)
        after = _snapshot(engine)
        streamed = engine.streamer.stats
    assert start < engine.ctx_size and calls < 50, (start, calls)
    assert streamed.bytes_disk > 0 and (streamed.bytes_ram > 0) == (options is PIPELINE)
    growth = after["rss"] - before["rss"]
    assert growth < RSS_GROWTH_LIMIT, f"host RSS grew {growth / 1e6:.1f} MB over {generated} tokens"
    assert after["live_arrays"] <= before["live_arrays"] + LIVE_ARRAYS_SLACK, (before, after)
    if before["device_bytes"] is not None:
        assert after["device_bytes"] <= before["device_bytes"] + (1 << 20), (before, after)
