"""The three-tier store on CPU (JAX's CPU backend has the same memory kinds as the GPU)."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

import ntransformer_jax as nt
from ntransformer_jax import synth
from ntransformer_jax.tiers import StreamingError, TierOptions, plan_placement, spread

SHAPE = synth.SynthShape(n_layers=6, n_embd=256, n_ff=512, n_head=4, n_kv_head=2, n_vocab=512, ctx_len=256)


@pytest.fixture(scope="module")
def six_layer_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiers") / "six-q8_0.gguf")
    synth.write_synthetic(path, SHAPE, "Q4_K_M", seed=3)   # mixed types per layer
    return path


PLACEMENTS = [
    dict(max_vram_layers=6),                                  # all A, layered path
    dict(max_vram_layers=2, max_ram_layers=2),                # A, B and C mixed
    dict(max_vram_layers=0, max_ram_layers=6),                # all B
    dict(max_vram_layers=0, max_ram_layers=0),                # all C
    dict(max_vram_layers=0, max_ram_layers=0, prefetch_depth=1, read_threads=1),
    dict(max_vram_layers=3, streaming="mmap"),                # the naive baseline
]


def _check_resident(resident: np.ndarray, layered: np.ndarray) -> None:
    """The resident path against the layered path: bit-identical on any backend. Decode-sized
    passes run the stacked loop in one dispatch, where every float operation of a block is a
    Pallas kernel on a GPU (H200, JAX 0.11.2, 2026-12-02: 16 of 16 inputs equal); longer passes
    run the layered path's own `block` executable layer by layer (XLA compiles the matmuls of
    the stacked loop differently from a layer alone: 9.5e-7 apart on the H200 before)."""
    assert np.array_equal(resident, layered), np.abs(resident - layered).max()


def test_logits_bit_identical_across_placements(six_layer_path):
    ids = np.random.default_rng().integers(0, SHAPE.n_vocab, 40)
    resident = nt.load(six_layer_path, ctx_size=64)
    assert not resident.layered and resident.placement == ["vram"] * 6
    want = None
    for opts in PLACEMENTS:
        with nt.load(six_layer_path, ctx_size=64, **opts) as engine:
            assert engine.layered
            got = engine.logits(ids)
            if want is None:           # the first placement: all in VRAM, layer by layer
                want = got
                _check_resident(resident.logits(ids), want)
            assert np.array_equal(got, want), (opts, engine.placement, np.abs(got - want).max())


def test_resident_prefill_runs_the_layered_block(six_layer_path, monkeypatch):
    """A resident prefill chunk longer than the decode kernels' rows goes through `model.block`
    once per layer (the layered path's executable), a decode-sized one through the single
    stacked dispatch; both keep the cache the next pass reads."""
    from ntransformer_jax import model as M
    engine = nt.load(six_layer_path, ctx_size=64)
    calls = []
    real = M.block
    monkeypatch.setattr(M, "block", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = np.random.default_rng().integers(0, SHAPE.n_vocab, 40)
    full = engine.logits(ids)
    assert len(calls) == SHAPE.n_layers
    calls.clear()
    short = engine.logits(ids[:5])        # other matmul shapes: close, not equal
    assert not calls
    np.testing.assert_allclose(short, full[:5], rtol=0, atol=1e-5 * np.abs(full).max())
    greedy = nt.SamplingParams(temperature=0)
    with nt.load(six_layer_path, ctx_size=64, max_vram_layers=6) as layered:
        want = list(layered.generate_tokens(ids[:20], max_new_tokens=6, params=greedy))
    assert list(engine.generate_tokens(ids[:20], max_new_tokens=6, params=greedy)) == want


def test_kernel_logits_bit_identical_across_placements(six_layer_path):
    """With the decode kernels (interpreted on the CPU, compiled on a GPU) disk-tier layers are
    repacked on the device after their copy, RAM and VRAM layers on the host at load: the
    logits must not tell them apart. Decode-sized passes (<= 8 rows) run the decode kernels."""
    import jax
    kernels = "pallas" if jax.default_backend() == "gpu" else "interpret"
    rng = np.random.default_rng()
    batches = [rng.integers(0, SHAPE.n_vocab, n) for n in (5, 40)]   # decode-sized, prefill
    resident = nt.load(six_layer_path, ctx_size=64, kernels=kernels)
    assert resident.kernels == kernels
    with nt.load(six_layer_path, ctx_size=64, kernels=kernels, max_vram_layers=6) as engine:
        want = [engine.logits(ids) for ids in batches]
    for ids, w in zip(batches, want):
        _check_resident(resident.logits(ids), w)
    for opts in (dict(max_vram_layers=2, max_ram_layers=2), dict(max_vram_layers=0, max_ram_layers=0),
                 dict(max_vram_layers=3, streaming="mmap")):
        with nt.load(six_layer_path, ctx_size=64, kernels=kernels, **opts) as engine:
            assert "disk" in engine.placement and engine.plan.device_working_set["disk_repack"] > 0
            for ids, w in zip(batches, want):
                got = engine.logits(ids)
                assert np.array_equal(got, w), (opts, engine.placement, np.abs(got - w).max())


def test_mixed_placement_uses_every_tier_and_generates_the_same(six_layer_path):
    greedy = nt.SamplingParams(temperature=0)
    prompt = [1, 17, 42, 99, 7]
    want = list(nt.load(six_layer_path, ctx_size=64).generate_tokens(prompt, max_new_tokens=12, params=greedy))
    with nt.load(six_layer_path, ctx_size=64, max_vram_layers=2, max_ram_layers=2) as engine:
        assert sorted(engine.placement) == ["disk"] * 2 + ["ram"] * 2 + ["vram"] * 2
        got = list(engine.generate_tokens(prompt, max_new_tokens=12, params=greedy))
        st = engine.last_stats
    assert got == want
    per = st.per_token()
    if st.generated_tokens > 1:
        layer = engine.plan.layer_bytes[0]
        # Every decode step streams each non-resident layer once (bytes within one layer of that).
        assert abs(per["bytes_ram"] + per["bytes_disk"] - engine.plan.bytes_in("ram") - engine.plan.bytes_in("disk")) <= layer


def test_spread_places_streamed_layers_evenly():
    assert spread(8, 4) == [1, 3, 5, 7]
    assert spread(80, 40) == list(range(1, 80, 2))
    assert spread(5, 0) == [] and spread(3, 3) == [0, 1, 2]


def test_plan_respects_budgets_and_caps():
    layers = [100] * 10
    ws = {"kv_cache": 50, "globals": 30, "workspace": 20}
    opts = TierOptions(vram_budget_gb=600e-9, ram_budget_gb=450e-9, prefetch_depth=2)
    plan = plan_placement(layers, ws, staging_bytes=110, options=opts, free_vram=None, avail_ram=None,
                          slot_bytes=100)
    # device: 100 working set + 3 slots (300) leaves 200: two layers
    assert plan.count("vram") == 2 and plan.device_bytes <= 600
    # host: staging 3 x 110 = 330 leaves 120: one layer in RAM, the rest on disk
    assert plan.count("ram") == 1 and plan.count("disk") == 7 and plan.host_bytes <= 450
    capped = plan_placement(layers, ws, 110, TierOptions(max_vram_layers=1, max_ram_layers=3),
                            None, None, 100)
    assert (capped.count("vram"), capped.count("ram"), capped.count("disk")) == (1, 3, 6)


def test_index_layout_streams_the_last_layers():
    opts = TierOptions(max_vram_layers=4, max_ram_layers=3, layout="index")
    plan = plan_placement([100] * 10, {}, 110, opts, None, None, 100)
    assert plan.tiers == ("vram",) * 4 + ("ram",) * 3 + ("disk",) * 3
    spread_plan = plan_placement([100] * 10, {}, 110, TierOptions(max_vram_layers=4, max_ram_layers=3),
                                 None, None, 100)
    assert spread_plan.tiers != plan.tiers and spread_plan.count("vram") == 4
    assert [i for i, t in enumerate(spread_plan.tiers) if t != "vram"] == spread(10, 6)


@pytest.mark.parametrize("layout", ["spread", "index"])
def test_vram_budget_counts_the_layers_actually_placed(layout):
    # Layers of different sizes (a _M file's mixed types): the VRAM sum is of the placed layers.
    layers = [100, 300, 100, 300, 100, 300, 100, 300]
    budget = 1000                       # 3 slots of 300 = 900 leave 100: one small layer at most
    plan = plan_placement(layers, {}, 310, TierOptions(vram_budget_gb=budget * 1e-9, layout=layout),
                          None, None, 300)
    assert plan.device_bytes <= budget and plan.count("vram") <= 1


def test_budget_too_small_names_the_minimum():
    with pytest.raises(nt.InputError, match=r"vram_budget_gb=.*minimum is"):
        plan_placement([100] * 4, {"kv_cache": 500}, 100, TierOptions(vram_budget_gb=1e-7), None, None, 100)
    with pytest.raises(nt.InputError, match=r"ram_budget_gb=.*minimum is"):
        plan_placement([100] * 4, {}, 1000, TierOptions(vram_budget_gb=1e-6, ram_budget_gb=1e-7, max_vram_layers=0),
                       None, None, 100)


@pytest.mark.parametrize("kwargs", [dict(vram_budget_gb=-1), dict(ram_budget_gb=float("nan")),
                                    dict(max_ram_layers=-2), dict(streaming="fast"), dict(prefetch_depth=0),
                                    dict(layout="random")])
def test_bad_tier_options(kwargs, six_layer_path):
    with pytest.raises(nt.InputError):
        nt.load(six_layer_path, ctx_size=16, **kwargs)


def test_unknown_load_option(six_layer_path):
    with pytest.raises(nt.InputError, match="unknown load option"):
        nt.load(six_layer_path, vram_budget=3)


def test_file_truncated_while_streaming_names_layer_and_file(six_layer_path, tmp_path):
    path = str(tmp_path / "victim.gguf")
    shutil.copy(six_layer_path, path)
    engine = nt.load(path, ctx_size=32, max_vram_layers=0, max_ram_layers=0)
    engine.logits([1, 2, 3])
    first = engine.model_file.layer_tensor(0, "attn_q")
    os.truncate(path, first.offset + 10)
    with pytest.raises(nt.NTransformerError, match=r"(layer \d+|ended at byte).*victim.gguf|victim.gguf.*(layer|ended)"):
        engine.logits([1, 2, 3, 4])
    engine.close()


def test_file_truncated_under_mmap_names_layer_and_file(six_layer_path, tmp_path):
    """The mmap baseline checks the file size before touching a layer's pages (a page past the
    end of a truncated file is SIGBUS, which no exception handler catches)."""
    path = str(tmp_path / "mapped.gguf")
    shutil.copy(six_layer_path, path)
    engine = nt.load(path, ctx_size=32, max_vram_layers=0, streaming="mmap")
    assert engine.placement == ["disk"] * 6
    engine.logits([1, 2, 3])
    last = engine.model_file.layer_tensor(5, "attn_q")
    os.truncate(path, last.offset + 10)     # layers before 5 still whole: the error names 5
    with pytest.raises(StreamingError, match=r"layer 5\b.*mapped\.gguf.*truncated"):
        engine.logits([1, 2, 3])
    with pytest.raises(StreamingError, match=r"layer 5\b.*mapped\.gguf.*truncated"):
        engine.logits_layerwise([1, 2, 3])
    engine.close()


def test_file_removed_under_mmap_reads_on(six_layer_path, tmp_path):
    """A removed file's inode lives while mapped: mmap mode keeps reading it."""
    path = str(tmp_path / "removed.gguf")
    shutil.copy(six_layer_path, path)
    with nt.load(path, ctx_size=32, max_vram_layers=0, streaming="mmap") as engine:
        want = engine.logits([1, 2, 3])
        os.remove(path)
        np.testing.assert_array_equal(engine.logits([1, 2, 3]), want)


def test_cli_tier_flags_and_benchmark(six_layer_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "ntransformer_jax", "--model", six_layer_path, "--prompt", "hello",
                        "--n_predict", "6", "--temperature", "0", "--max_vram_layers", "2",
                        "--max_ram_layers", "2", "--benchmark"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 vram / 2 ram / 2 disk layers" in r.stderr and "per token:" in r.stderr


def test_pinned_pool_is_capped_at_the_ram_budget(monkeypatch):
    """The CLI caps XLA's pinned-host pool at the RAM budget + slack (whole GB), unless the
    user set the variable; no budget leaves it alone."""
    from ntransformer_jax import tiers
    monkeypatch.delenv(tiers.PINNED_POOL_ENV, raising=False)
    assert tiers.limit_pinned_pool(None) is None and tiers.PINNED_POOL_ENV not in os.environ
    assert tiers.limit_pinned_pool(4.5) == str(7)          # ceil(4.5 + 2)
    assert tiers.limit_pinned_pool(100) == "7"            # an existing setting wins
    monkeypatch.setenv(tiers.PINNED_POOL_ENV, "300")
    assert tiers.limit_pinned_pool(4) == "300"


# ---------------------------------------------------------------------------------------------
# The mmap baseline copies out of the map with process_vm_readv: no SIGBUS on a truncated file
# ---------------------------------------------------------------------------------------------

def run_python(code: str, *args: str):
    """Run `code` in a fresh interpreter (a SIGBUS there shows as returncode -SIGBUS, not a dead
    pytest)."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def needs_vm_readv():
    from ntransformer_jax import tiers
    if tiers._process_vm_readv() is None:
        pytest.skip("process_vm_readv does not work here (the reader falls back to fstat + copy)")


def test_copy_from_map_exact_bytes_in_chunks(tmp_path, monkeypatch):
    import mmap
    from ntransformer_jax import tiers
    needs_vm_readv()
    path = tmp_path / "bytes.bin"
    data = np.random.default_rng(0).integers(0, 256, 200_003, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(m, np.uint8)
    monkeypatch.setattr(tiers, "COPY_CHUNK", 4096 + 7)          # many partial iovecs
    dst = np.zeros(150_000, np.uint8)
    assert tiers.copy_from_map(dst, view.ctypes.data + 1234, len(dst)) == len(dst)
    np.testing.assert_array_equal(dst, data[1234:1234 + len(dst)])
    with pytest.raises(ValueError):
        tiers.copy_from_map(dst[::2], view.ctypes.data, 10)


COPY_PAST_EOF = """
import mmap, os, sys
import numpy as np
from ntransformer_jax import tiers
path, how = sys.argv[1], sys.argv[2]
with open(path, "wb") as f:
    f.write(bytes(range(256)) * 4096)                      # 1 MiB
with open(path, "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
view = np.frombuffer(m, np.uint8)
os.truncate(path, 100_000)                                 # after mapping: pages past it are gone
dst = np.zeros(1 << 19, np.uint8)
if how == "plain":
    dst[:] = view[:len(dst)]                               # the old copy: SIGBUS
n = tiers.copy_from_map(dst, view.ctypes.data, len(dst))
whole = -(-100_000 // mmap.PAGESIZE) * mmap.PAGESIZE       # the last page reads whole (zero tail)
assert n == whole, n
assert dst[:100_000].tobytes() == (bytes(range(256)) * 4096)[:100_000]
assert tiers.copy_from_map(dst, view.ctypes.data + 600_000, 1000) == 0
print("short", n)
"""


def test_copy_from_map_stops_short_past_the_end_of_a_truncated_file(tmp_path):
    import signal
    needs_vm_readv()
    r = run_python(COPY_PAST_EOF, str(tmp_path / "cut.bin"), "vm_readv")
    assert r.returncode == 0 and "short" in r.stdout, (r.returncode, r.stderr)
    # The control: a plain copy of the same range is SIGBUS (so the case above is the real one).
    r = run_python(COPY_PAST_EOF, str(tmp_path / "cut2.bin"), "plain")
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr)


TRUNCATE_BEFORE_COPY = """
import os, shutil, sys
import numpy as np
import ntransformer_jax as nt
from ntransformer_jax import tiers
src, path = sys.argv[1], sys.argv[2]
shutil.copy(src, path)
engine = nt.load(path, ctx_size=32, max_vram_layers=0, streaming="mmap")
engine.logits([1, 2, 3])
first = engine.model_file.layer_tensor(0, "attn_q")
cut = first.offset + 10
copy = tiers.copy_from_map
def truncate_then_copy(dst, address, n):
    if os.path.getsize(path) > cut:
        os.truncate(path, cut)                             # after any check, right before the copy
    return copy(dst, address, n)
tiers.copy_from_map = truncate_then_copy
for run in (engine.logits, engine.logits_layerwise):
    try:
        run([1, 2, 3])
    except tiers.StreamingError as e:
        print("error:", e)
    else:
        print("no error")
engine.close()
"""


def test_file_truncated_right_before_the_mmap_copy_is_an_error_not_sigbus(six_layer_path, tmp_path):
    needs_vm_readv()
    r = run_python(TRUNCATE_BEFORE_COPY, six_layer_path, str(tmp_path / "cut.gguf"))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    errors = [l for l in r.stdout.splitlines() if l.startswith(("error:", "no error"))]
    assert len(errors) == 2, r.stdout
    for line in errors:
        assert re.match(r"error: layer 0\b.*cut\.gguf.*truncated", line), line


def test_mmap_fallback_without_process_vm_readv(six_layer_path, tmp_path, monkeypatch):
    """Where process_vm_readv does not work, the reader checks the size, then copies: same logits,
    and a file already truncated is still a StreamingError."""
    from ntransformer_jax import tiers
    monkeypatch.setattr(tiers, "_process_vm_readv", lambda: None)
    ids = [1, 17, 42, 99, 7]
    resident = nt.load(six_layer_path, ctx_size=32)
    want, want_layerwise = resident.logits(ids), resident.logits_layerwise(ids)
    path = str(tmp_path / "fallback.gguf")
    shutil.copy(six_layer_path, path)
    with nt.load(path, ctx_size=32, max_vram_layers=0, streaming="mmap") as engine:
        np.testing.assert_array_equal(engine.logits(ids), want)
        np.testing.assert_array_equal(engine.logits_layerwise(ids), want_layerwise)
        os.truncate(path, engine.model_file.layer_tensor(5, "attn_q").offset + 10)
        with pytest.raises(StreamingError, match=r"layer 5\b.*fallback\.gguf.*truncated"):
            engine.logits(ids)


def test_mmap_staging_is_one_buffer_reused(six_layer_path):
    """The baseline uses one host buffer (the load's staging, large enough for every mapped span)
    for every layer."""
    with nt.load(six_layer_path, ctx_size=32, max_vram_layers=2, streaming="mmap") as engine:
        st = engine.streamer
        spans = [s.span[1] for s in st.sources.values()]
        assert len(st._staging) == 1 and len(st._staging[0]) >= max(spans)
        before = st._staging[0].ctypes.data
        engine.logits([1, 2, 3])
        engine.logits([4, 5, 6])
        assert len(st._staging) == 1 and st._staging[0].ctypes.data == before and st._free_staging == [0]


def test_map_reader_releases_the_pages_it_copied(six_layer_path):
    """With `release` (the engine passes the model file's `release_range` on a GPU) each copy
    out of the map hands the range just read back; the bytes copied are the file's."""
    from ntransformer_jax.model_file import ModelFile
    from ntransformer_jax.tiers import MapReader
    f = ModelFile(six_layer_path)
    calls = []
    reader = MapReader(six_layer_path, f.tensor("token_embd.weight"), release=lambda o, n: calls.append((o, n)))
    info = f.layer_tensor(2, "ffn_down")
    dst = np.zeros(info.n_bytes, np.uint8)
    reader.read_into(dst, info.offset)
    reader.close()
    with open(six_layer_path, "rb") as fh:
        fh.seek(info.offset)
        assert dst.tobytes() == fh.read(info.n_bytes)
    assert calls == [(info.offset, info.n_bytes)]


TRUNCATE_DISK_LAYERWISE = """
import os, shutil, sys
import numpy as np
import ntransformer_jax as nt
from ntransformer_jax import tiers
src, path = sys.argv[1], sys.argv[2]
shutil.copy(src, path)
ids = [1, 17, 42]
want = nt.load(src, ctx_size=32).logits_layerwise(ids)
engine = nt.load(path, ctx_size=32, max_vram_layers=0, max_ram_layers=0)
assert engine.placement == ["disk"] * engine.config.n_layers, engine.placement
np.testing.assert_array_equal(engine.logits_layerwise(ids), want)
os.truncate(path, engine.model_file.layer_tensor(2, "attn_q").offset + 10)
try:
    engine.logits_layerwise(ids)
except tiers.StreamingError as e:
    print("error:", e)
else:
    print("no error")
engine.close()
"""


def test_layerwise_pass_over_a_truncated_disk_tier_is_an_error_not_sigbus(six_layer_path, tmp_path):
    """`logits_layerwise` reads disk-tier layers through the tier's reader (not from views of the
    memory map): the same logits as resident, and a file truncated under the engine is a
    StreamingError naming the layer and the file (layer 1 or 2: reads are aligned to pages)."""
    r = run_python(TRUNCATE_DISK_LAYERWISE, six_layer_path, str(tmp_path / "cut.gguf"))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stdout.splitlines() if l.startswith(("error:", "no error"))]
    assert len(lines) == 1 and re.match(r"error: layer [12]: .*cut\.gguf.*truncated", lines[0]), r.stdout


def test_streamed_loads_repack_on_the_device_not_the_host(six_layer_path, monkeypatch):
    """Where layers stream, VRAM and RAM layers are read into the staging buffer and repacked on
    the device (no host copy of a layer in transit besides staging); logits are unchanged."""
    from ntransformer_jax import engine as engine_mod
    kernels = "interpret"
    ids = [3, 1, 4, 1, 5]
    with nt.load(six_layer_path, ctx_size=32, kernels=kernels, max_vram_layers=6) as ref:
        want = ref.logits(ids)
    real = engine_mod.Engine._host_layer

    def no_host_repack(self, i, pack=False):
        assert not pack, f"layer {i} repacked on the host"
        return real(self, i, pack)

    monkeypatch.setattr(engine_mod.Engine, "_host_layer", no_host_repack)
    with nt.load(six_layer_path, ctx_size=32, kernels=kernels, max_vram_layers=2,
                 max_ram_layers=2) as engine:
        assert engine.placement.count("vram") == 2 and engine.placement.count("ram") == 2
        st = engine.streamer
        assert all(s.tier != "ram" or s.host_tree is not None for s in st.sources.values())
        np.testing.assert_array_equal(engine.logits(ids), want)
