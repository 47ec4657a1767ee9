"""CPU smoke runs of the GPU benchmark scripts (kernels_bench.py, qmatmul_bench.py, layer_jit.py...).

`--smoke` runs each script's whole path on tiny shapes (the kernels in Pallas interpret mode), so
a script handed to the GPU machine does not die on its first line there.
"""

from __future__ import annotations

import json
import os
import sys

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import kernels_bench  # noqa: E402
import layer_jit  # noqa: E402
import qmatmul_bench  # noqa: E402
from ntransformer_jax.kernels import qmatmul as qmm  # noqa: E402
from ntransformer_jax.kernels import qmatvec as qm  # noqa: E402


def test_kernels_bench_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    assert kernels_bench.main(["--smoke", "--types", "Q4_0,Q6_K", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["failures"] == [] and res["hbm_read_gbps"] > 0
    got = {(r["type"], r["shape"], r["m"]) for r in res["results"]}
    assert got == {(t, s, m) for t in ("Q4_0", "Q6_K") for s in kernels_bench.SMOKE_SHAPES
                   for m in kernels_bench.M_ROWS}
    for r in res["results"]:
        best = r["best"]
        assert best["ok"] and best["max_rel_err"] <= kernels_bench.RTOL and best["time_s"] > 0
        assert r["default"]["ok"] and r["xla"]["time_s"] > 0
        assert best["time_s"] == min(c["time_s"] for c in r["configs"] if c.get("ok"))
        assert r["weight_bytes"] >= r["gguf_bytes"] > 0
        assert r["copies"] == res["unroll"] and r["same_size_read_gbps"] > 0   # tiny: a copy a call
    swept = [r for r in res["results"] if r["shape"] == "big" and r["m"] == 1]
    assert all(len(r["configs"]) > 1 for r in swept), "the sweep tried no other config"


@pytest.mark.parametrize("bench, module, names", [
    (kernels_bench, qm, ("qmatvec_packed", "qmatvec_glu_packed")),
    (qmatmul_bench, qmm, ("qmatmul_packed",))])
def test_bench_flags_wrong_results(bench, module, names, tmp_path, monkeypatch, capsys):
    """A kernel whose output is off makes the bench fail loudly, and is never anyone's best."""
    def off_by_one(real):
        return lambda x, packed, qtype, n_cols, **kwargs: real(x, packed, qtype, n_cols,
                                                              **kwargs) + 1.0

    for name in names:
        monkeypatch.setattr(module, name, off_by_one(getattr(module, name)))
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--quick", "--types", "Q8_0", "--out", str(out)]) == 1
    res = json.loads(out.read_text())
    for r in res["results"]:
        assert r["best"] is None and r["default"]["ok"] is False
        if r.get("f32"):
            assert r["f32"]["default"]["ok"] is False and "best" not in r["f32"]
    assert "WRONG RESULT" in capsys.readouterr().out


def test_qmatmul_bench_smoke(tmp_path):
    out = tmp_path / "qmatmul.json"
    assert qmatmul_bench.main(["--smoke", "--types", "Q4_0,Q4_K", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["failures"] == [] and res["bf16_tflops"] > 0
    [(model, matrices)] = qmatmul_bench.SMOKE_MODELS.items()
    [m] = res["m"]
    got = {(r["type"], r["model"], r["matrix"], r["m"]) for r in res["results"]}
    assert got == {(t, model, name, m) for t in ("Q4_0", "Q4_K") for name in matrices}
    for r in res["results"]:
        best = r["best"]
        assert best["ok"] and best["max_rel_err"] <= qmatmul_bench.RTOL and best["time_s"] > 0
        assert best["time_s"] == min(c["time_s"] for c in r["configs"] if c.get("ok"))
        assert r["default"]["ok"] and best["x_xla_bf16"] > 0 and best["tflops"] > 0
        assert r["xla"]["bf16"]["time_s"] > 0 and r["xla"]["f32"]["time_s"] > 0
        for which in ("default", "best"):
            f32 = r["f32"][which]
            assert f32["ok"] and f32["dtype"] == "float32" and f32["time_s"] > 0
        assert r["f32"]["best"]["block_sizes"] == best["block_sizes"]
    swept = [r for r in res["results"] if r["matrix"] == qmatmul_bench.SMOKE_SWEEP_MATRIX]
    assert all(len(r["configs"]) > 1 for r in swept), "the sweep tried no other config"
    assert [(r["type"], r["m"]) for r in res["layers"]] == [("Q4_0", m), ("Q4_K", m)]
    for layer in res["layers"]:
        mine = [r for r in res["results"] if r["type"] == layer["type"]]
        assert layer["kernel_s"] == pytest.approx(sum(r["best"]["time_s"] for r in mine))
        assert layer["x_xla_bf16"] > 0
    # The suggestion is a Python literal of the best tilings.
    scope = {"T": gguf.GGMLQuantizationType, "BlockSizes": qmm.BlockSizes}
    exec(res["suggestion"], scope)
    tuned = scope[f"QMATMUL_TUNED_M{m}"]
    assert len(tuned) == len(res["results"])
    for r in res["results"]:
        key = (gguf.GGMLQuantizationType[r["type"]], r["model"], r["matrix"])
        assert tuned[key] == qmm.BlockSizes(**r["best"]["block_sizes"])


def test_qmatmul_bench_xla_baseline_is_the_engines():
    """The XLA baseline multiplies the parts of fused matrices on their own, in the row chunks
    `model.linear` uses, and computes qmatmul_reference's product (up to summation order)."""
    from ntransformer_jax import model
    assert qmatmul_bench.ENGINE_CHUNK_ELEMS == model.LINEAR_CHUNK_ELEMS
    for name, matrices in qmatmul_bench.MODELS.items():
        for matrix, (n, k) in matrices.items():
            parts = qmatmul_bench.PARTS[name].get(matrix, (n,))
            got = qmatmul_bench.xla_parts(n, k, qmatmul_bench.PARTS[name].get(matrix), "engine")
            assert got == tuple((rows, model._n_chunks(rows, k)) for rows in parts)
            assert qmatmul_bench.xla_parts(n, k, parts, "plain") == ((n, 1),)
    assert qmatmul_bench.xla_parts(57344, 8192, (28672, 28672), "engine") == ((28672, 4),) * 2
    # Parts and chunks (the smoke shapes are one chunk each, so the smoke run has no chunks).
    qtype = gguf.GGMLQuantizationType.Q4_K
    rng = np.random.default_rng(0)
    packed = qm.repack(kernels_bench.random_weight(rng, qtype, 64, 512), qtype)
    x = jnp.asarray(rng.standard_normal((8, 512), np.float32))
    refs, scale = qmatmul_bench._check_arrays(x, packed, qtype, 512)
    for matmul, dtype in qmatmul_bench.MATMUL_DTYPES.items():
        for parts in (((64, 1),), ((64, 4),), ((32, 1), (16, 2), (16, 4))):
            y = qmatmul_bench.xla_linear(x, packed, qtype, 512, matmul, parts)
            assert [a.shape for a in y] == [(8, rows) for rows, _ in parts]
            assert qmatmul_bench._max_rel_err(y, refs[dtype.name], scale) <= qmatmul_bench.RTOL


@pytest.mark.parametrize("qtype", sorted(kernels_bench.HALF_FIELDS, key=lambda t: t.name),
                         ids=lambda t: t.name)


def test_random_weight_is_finite(qtype):
    """Random bytes with the half fields set: a wrong offset would leave NaN/inf scales."""
    w = kernels_bench.random_weight(np.random.default_rng(0), qtype, 64, 512)
    assert w.dtype == np.uint8 and w.shape == (64, 512 // gguf.GGML_QUANT_SIZES[qtype][0]
                                               * gguf.GGML_QUANT_SIZES[qtype][1])
    try:
        values = gguf.quants.dequantize(w, qtype)
    except NotImplementedError:
        pytest.skip(f"gguf-py cannot dequantize {qtype.name}")
    assert np.isfinite(values).all()


def test_every_kernel_type_has_a_recipe():
    assert set(qm.SUPPORTED_TYPES) <= set(kernels_bench.HALF_FIELDS)


def test_layer_jit_smoke(tmp_path):
    out = tmp_path / "layer.json"
    assert layer_jit.main(["--smoke", "--quant", "Q4_0,Q4_K_M,F16", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["quant"] for r in res["results"]] == ["Q4_0", "Q4_K_M", "F16"]
    for r in res["results"]:
        for phase in ("decode", "prefill"):
            assert r[phase]["time_s"] > 0 and r[phase]["gbps"] > 0
        assert r["weight_bytes"] > 0
    # tiny has 2 layers; llama.cpp's Q4_K_M gives layer 1's attn_v and ffn_down more bits.
    assert res["results"][1]["types"]["attn_v"] == "Q6_K"
    assert res["results"][1]["types"]["attn_q"] == "Q4_K"
    assert set(res["results"][2]["types"].values()) == {"F16"}


def test_layer_jit_smoke_with_kernels(tmp_path):
    """--kernels on in smoke mode runs the decode kernels in the Pallas interpreter."""
    out = tmp_path / "layer.json"
    assert layer_jit.main(["--smoke", "--quant", "Q4_0", "--kernels", "on", "--out", str(out)]) == 0
    [r] = json.loads(out.read_text())["results"]
    assert r["kernels"] == "interpret" and r["decode"]["time_s"] > 0 and r["prefill"]["time_s"] > 0


def test_layer_jit_builds_what_block_expects():
    shape = layer_jit.synth.SHAPES["tiny"]
    w, types = layer_jit.layer_weights(shape, "Q8_0", 0, False, np.random.default_rng(0))
    assert w.attn_k.shape == (shape.n_embd_kv, shape.n_embd)
    assert w.ffn_down.shape == (shape.n_embd, shape.n_ff)
    assert w.attn_norm.shape == (shape.n_embd,) and w.attn_norm.dtype == jnp.float32
    assert np.isfinite(np.asarray(w.ffn_up.dequantize())).all()


def test_profile_decode_summarizes_a_trace(tmp_path):
    """The trace reader on a real (CPU) profile: XLA ops of the host process are found, summed
    per token, and grouped; GPU runs read the device processes instead."""
    import jax
    import profile_decode
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((128, 128))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(4):
            f(x).block_until_ready()
    [trace] = list(tmp_path.rglob("perfetto_trace.json.gz"))
    res = profile_decode.summarize(str(trace), tokens=4, top=5, procs="host")
    assert res["kernels_per_token"] > 0 and res["device_busy_us_per_token"] > 0
    assert res["top"] and sum(res["groups_us_per_token"].values()) == pytest.approx(
        res["kernel_us_per_token"])
    assert profile_decode.summarize(str(trace), 4, 5)["kernels_per_token"] == 0  # no GPU here
    assert profile_decode.kernel_group("qmatvec") == "decode kernel (qmatvec)"


def test_tiers_bench_smoke_reports_its_own_peak_rss(tmp_path):
    """tiers_bench end to end on the tiny shape (pipeline with RAM and disk tiers, the mmap
    baseline), each run in its own process. Its peak RSS is that process's own (VmHWM), not the
    parent's high-water mark inherited through fork (`ru_maxrss` of the child reported 8.8 GB
    here against 0.3 GB of its own)."""
    import subprocess
    bench = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "tiers_bench.py")
    r = subprocess.run([sys.executable, bench, "--shape", "tiny", "--quant", "Q8_0", "--vram_budget_gb", "0.05",
                        "--ram_budget_gb", "1", "--n_decode", "3", "--n_mmap", "2", "--disk_ram_budget_gb", "0.001",
                        "--n_disk", "2", "--workdir", str(tmp_path), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                           os.path.join(os.path.dirname(__file__), ".."), os.environ.get("PYTHONPATH")]))})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads((tmp_path / "tiers_bench.json").read_text())["runs"]
    assert len(runs) == 3, [x["opts"] for x in runs]
    for run in runs:
        own = max(run["proc"]["VmRSS"], run["proc_loaded"]["VmRSS"])
        assert 0 < run["load_peak_rss_gb"] and 0 < run["generate_peak_rss_gb"]
        assert run["host_maxrss_gb"] == max(run["load_peak_rss_gb"], run["generate_peak_rss_gb"])
        assert run["host_maxrss_gb"] < own + 1.0, (run["opts"], run["host_maxrss_gb"], own)


def test_ncu_probe_runs_its_cases_and_reads_ncu_csv(tmp_path, capsys):
    """The rope cases run in interpret mode; --summarize keeps one record a launch (ncu's own
    lines and the program's prints dropped) with the kept metrics and every stall metric."""
    import ncu_probe
    assert ncu_probe.main(["--interpret", "--ctx", "32", "--cases", "rope:fused,rope:two"]) == 0
    assert capsys.readouterr().out.count("case rope:") == 2
    with pytest.raises(SystemExit, match="rope:fused or rope:two"):
        ncu_probe.main(["--interpret", "--cases", "rope:three"])
    header = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
              '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
              '"Metric Value"')
    stall = "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio"
    rows = [("0", "qmatvec_glu", "Duration", "us", "107.58"), ("0", "qmatvec_glu", stall, "", "2.84"),
            ("1", "qmatvec", "DRAM Throughput", "%", "62.83")]
    lines = ["==PROF== Connected to process 1", "case Q4_K glu", header] + [
        f'"{i}","1","python3","h","{k}","1","7","(256, 1, 1)","(1792, 1, 1)","0","9.0","S",'
        f'"{name}","{unit}","{value}"' for i, k, name, unit, value in rows]
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ncu.json"
    assert ncu_probe.main(["--summarize", str(path), "--out", str(out)]) == 0
    recs = json.loads(out.read_text())
    assert [r["kernel"] for r in recs] == ["qmatvec_glu", "qmatvec"]
    assert recs[0]["duration"] == "107.58 us" and recs[0]["stalls"] == {stall: "2.84"}
    assert recs[0]["grid"] == "(1792, 1, 1)" and recs[1]["dram_pct"] == "62.83 %"
