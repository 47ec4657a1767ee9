"""`inspect`: the plan it reports is the engine's, without loading weights; and the CLI's progress
bar and closing summary."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

import ntransformer_jax as nt
from ntransformer_jax import inspect_model, synth
from ntransformer_jax.engine import MAX_PREFILL_CHUNK
from ntransformer_jax.model_file import ModelFile
from ntransformer_jax.tiers import TierOptions

SHAPE = synth.SynthShape(n_layers=6, n_embd=256, n_ff=512, n_head=4, n_kv_head=2, n_vocab=512, ctx_len=256)
TIERED = ["--max_vram_layers", "2", "--max_ram_layers", "2"]


@pytest.fixture(scope="module")
def six_layer_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("inspect") / "six-q4_k_m.gguf")
    synth.write_synthetic(path, SHAPE, "Q4_K_M", seed=3)   # mixed types per layer
    return path


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ntransformer_jax", *args], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def inspect_json(*args: str) -> dict:
    r = run_cli("inspect", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_plan_matches(plan: dict, engine) -> None:
    """The reported plan is the engine's (budgets aside: free RAM moves between measurements)."""
    assert plan["placement"] == engine.placement
    for tier in ("vram", "ram", "disk"):
        assert plan["tiers"][tier] == {"layers": engine.plan.count(tier), "bytes": engine.plan.bytes_in(tier)}
    assert plan["device_working_set"] == engine.plan.device_working_set
    assert plan["host_working_set"] == engine.plan.host_working_set
    assert plan["device_bytes"] == engine.plan.device_bytes
    assert plan["host_bytes"] == engine.plan.host_bytes
    assert plan["path"] == ("layered" if engine.layered else "resident")


# -- the plan is the engine's ---------------------------------------------------------------------

def test_inspect_json_equals_the_engine_plan(six_layer_path):
    r = inspect_json("--model", six_layer_path, "--ctx_size", "128", *TIERED)
    with nt.load(six_layer_path, ctx_size=128, max_vram_layers=2, max_ram_layers=2) as engine:
        assert_plan_matches(r["plan"], engine)
        assert r["ctx_size"] == engine.ctx_size
        assert r["config"]["n_layers"] == engine.config.n_layers == 6
    assert sorted(r["plan"]["placement"]) == ["disk"] * 2 + ["ram"] * 2 + ["vram"] * 2
    assert r["file_bytes"] == os.path.getsize(six_layer_path)
    types = r["tensor_types"]
    assert sum(t["count"] for t in types.values()) == r["n_tensors"]
    assert sum(t["bytes"] for t in types.values()) == r["weight_bytes"]
    assert {"Q4_K", "Q6_K", "F32"} <= set(types)


def _budget_for_layers(path: str, ctx_size: int, n: int) -> float:
    """A vram_budget_gb that holds the working set, the prefetch slots and n of the layers."""
    f = ModelFile(path)
    try:
        free = inspect_model.plan_for(f, ctx_size, TierOptions(max_vram_layers=0), None, None,
                                      prefill_chunk=MAX_PREFILL_CHUNK)
        return (free.device_bytes + n * max(free.layer_bytes) + 1000) / 1e9
    finally:
        f.close()


@pytest.mark.parametrize("options", [
    dict(),                                                   # resident path
    dict(max_vram_layers=6),
    dict(max_vram_layers=2, max_ram_layers=2),
    dict(max_vram_layers=0, max_ram_layers=0, prefetch_depth=1),
    dict(max_vram_layers=3, streaming="mmap"),
    "budget",                                                 # a VRAM budget for 1 layer
])
def test_plan_for_equals_the_engine_plan(six_layer_path, options):
    if options == "budget":
        options = dict(vram_budget_gb=_budget_for_layers(six_layer_path, 96, 1), ram_budget_gb=1.0)
    report = inspect_model.inspect(six_layer_path, ctx_size=96, **options)
    with nt.load(six_layer_path, ctx_size=96, **options) as engine:
        assert_plan_matches(report["plan"], engine)
        if "vram_budget_gb" in options:
            assert engine.placement.count("vram") == 1
            assert report["plan"]["vram_budget"] == engine.plan.vram_budget
            assert report["plan"]["ram_budget"] == engine.plan.ram_budget


def test_inspect_loads_nothing_onto_the_device(six_layer_path):
    import jax
    before = len(jax.live_arrays())
    inspect_model.inspect(six_layer_path, max_vram_layers=2, max_ram_layers=2)
    assert len(jax.live_arrays()) == before


# -- the numbers scale -------------------------------------------------------------------------

def test_numbers_scale_with_context_layers_and_ceilings(six_layer_path, tmp_path):
    base = inspect_model.inspect(six_layer_path, ctx_size=100, max_vram_layers=2, max_ram_layers=2)
    # The KV cache is linear in the context.
    longer = inspect_model.inspect(six_layer_path, ctx_size=200, max_vram_layers=2, max_ram_layers=2)
    assert longer["plan"]["device_working_set"]["kv_cache"] == 2 * base["plan"]["device_working_set"]["kv_cache"]
    # Twice the layers of the same shape: twice the layer bytes and KV cache; same caps, same A and B.
    twelve = str(tmp_path / "twelve.gguf")
    synth.write_synthetic(twelve, synth.SynthShape(**{**SHAPE.__dict__, "n_layers": 12}), "Q4_K_M", seed=3)
    big = inspect_model.inspect(twelve, ctx_size=100, max_vram_layers=2, max_ram_layers=2)
    n = lambda r, t: r["plan"]["tiers"][t]["layers"]
    assert (n(big, "vram"), n(big, "ram"), n(big, "disk")) == (2, 2, 8)
    assert big["plan"]["device_working_set"]["kv_cache"] == 2 * base["plan"]["device_working_set"]["kv_cache"]
    layers = lambda r: sum(t["bytes"] for t in r["plan"]["tiers"].values())
    assert layers(big) == pytest.approx(2 * layers(base), rel=0.1)   # Q4_K_M gives some layers Q6_K
    # The bound: bytes over bandwidth per link; the token takes the slowest.
    b = base["token_bound"]
    plan = base["plan"]["tiers"]
    assert b["disk_bytes"] == plan["disk"]["bytes"]
    assert b["pcie_bytes"] == plan["ram"]["bytes"] + plan["disk"]["bytes"]
    assert b["hbm_bytes"] > sum(t["bytes"] for t in plan.values())      # every layer + output head
    assert b["disk_s"] == pytest.approx(b["disk_bytes"] / 1.5e9)
    assert b["pcie_s"] == pytest.approx(b["pcie_bytes"] / 53.8e9)
    assert b["hbm_s"] == pytest.approx(b["hbm_bytes"] / 2.8e12)
    assert b["token_s"] == max(b["hbm_s"], b["pcie_s"], b["disk_s"]) and b["limited_by"] == "disk"
    fast = inspect_model.inspect(six_layer_path, ctx_size=100, max_vram_layers=2, max_ram_layers=2,
                                 ceilings=inspect_model.Ceilings(disk=3e9))
    assert fast["token_bound"]["disk_s"] == pytest.approx(b["disk_s"] / 2)


def write_header_only(path: str, shape: synth.SynthShape, quant: str) -> None:
    """A GGUF whose header is the synthetic model's and whose data is a hole (a sparse file): a
    70B model's plan in CI, at the cost of a few kB of disk. The data reads as zeros."""
    import gguf
    import numpy as np
    specs = synth.tensor_plan(shape, quant)
    w = gguf.GGUFWriter(path, "llama")
    synth._add_metadata(w, shape, quant)     # the synthetic writer's own header, vocabulary included
    for spec in specs:
        w.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), synth.tensor_nbytes(spec),
                          raw_dtype=spec.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    align = w.data_alignment
    start = -(-w.fout[0].tell() // align) * align
    w.close()
    os.truncate(path, start + sum(-(-synth.tensor_nbytes(s) // align) * align for s in specs))


def test_70b_plan_from_its_header(tmp_path):
    """Llama-70B shape, Q4_0: the plan within a 24 GB device and the bound it implies."""
    path = str(tmp_path / "70b-header.gguf")
    shape = synth.SynthShape(**{**synth.SHAPES["70b"].__dict__, "rope_freqs": False})  # zeros are bad factors
    write_header_only(path, shape, "Q4_0")
    r = inspect_json("--model", path, "--vram_budget_gb", "24", "--ram_budget_gb", "100", "--ctx_size", "4096")
    assert r["config"]["n_layers"] == 80 and r["config"]["n_kv_head"] == 8
    assert r["weight_bytes"] == sum(synth.tensor_nbytes(s) for s in synth.tensor_plan(shape, "Q4_0"))
    assert 39e9 < r["weight_bytes"] < 41e9
    p = r["plan"]
    layer = p["tiers"]["vram"]["bytes"] // p["tiers"]["vram"]["layers"]   # Q4_0 layers are all alike
    k = p["tiers"]["vram"]["layers"]
    fixed = sum(p["device_working_set"].values())                        # with the prefetch slots
    assert fixed + k * layer <= 24e9 < fixed + (k + 1) * layer
    assert p["tiers"]["ram"]["layers"] == 80 - k and p["tiers"]["disk"]["layers"] == 0
    assert p["device_working_set"]["kv_cache"] == 2 * 80 * 4096 * 8 * 128 * 4
    b = r["token_bound"]
    assert b["limited_by"] == "pcie" and b["token_s"] == pytest.approx(p["tiers"]["ram"]["bytes"] / 53.8e9)
    assert 2 < b["tok_per_s"] < 4       # DESIGN.md: ~2.8 tok/s streaming ~19 GB over PCIe
    # Less RAM: the rest goes to disk and the disk sets the pace.
    small = inspect_json("--model", path, "--vram_budget_gb", "24", "--ram_budget_gb", "10", "--ctx_size", "4096")
    sp = small["plan"]
    assert sp["tiers"]["vram"] == p["tiers"]["vram"] and sp["tiers"]["disk"]["layers"] > 0
    assert sp["host_bytes"] <= 10e9 and "staging" in sp["host_working_set"]
    assert small["token_bound"]["limited_by"] == "disk"


def test_ceiling_flags_reach_the_bound(six_layer_path):
    r = inspect_json("--model", six_layer_path, *TIERED, "--hbm_gbps", "1000", "--pcie_gbps", "10",
                     "--disk_gbps", "100")
    b = r["token_bound"]
    assert b["ceilings_bps"] == {"hbm": 1e12, "pcie": 10e9, "disk": 100e9}
    assert b["limited_by"] == "pcie" and b["token_s"] == pytest.approx(b["pcie_bytes"] / 10e9)


# -- the text ---------------------------------------------------------------------------------

def test_text_names_tokenizer_and_chat_template(six_layer_path, smollm_path):
    synth_text = run_cli("inspect", "--model", six_layer_path, *TIERED)
    assert synth_text.returncode == 0, synth_text.stderr
    out = synth_text.stdout
    assert "chat template: absent" in out
    assert "llama (SentencePiece)" in out
    assert "placement: " in out and "C disk    2 layers" in out
    assert "limited by disk" in out and "freq factors present" in out
    smol = run_cli("--inspect", "--model", smollm_path)
    assert smol.returncode == 0, smol.stderr
    assert "chat template: present" in smol.stdout
    assert "gpt2 (byte-level BPE), pre-tokenizer smollm" in smol.stdout
    assert "tied to the embedding" in smol.stdout and "resident path" in smol.stdout


@pytest.mark.parametrize("args,needle", [
    (["inspect", "--model", "/nonexistent/model.gguf"], "not found"),
    (["inspect", "extra", "--model", "x.gguf"], "'extra'"),
    (["inspect", "--hbm_gbps", "0"], "--hbm_gbps"),
    (["inspect", "--vram_budget_gb", "0.000001"], "vram_budget_gb"),
    (["--json", "--prompt", "hi"], "--json"),
])
def test_inspect_bad_input_is_one_error_line(args, needle, six_layer_path):
    if "--model" not in args:
        args = [*args, "--model", six_layer_path]
    r = run_cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not r.stdout


# -- the CLI while generating: progress bar and summary ------------------------------------------

GENERATE = ["--prompt", "hello", "--n_predict", "6", "--temperature", "0", "--ctx_size", "64"]


def run_with_tty_stderr(*args: str) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; (exit code, everything written to stderr)."""
    master, slave = pty.openpty()
    # A fresh pty is 0x0, and tqdm draws nothing in zero columns: give it a terminal's size.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "ntransformer_jax", *args], stdout=subprocess.DEVNULL,
                         stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:     # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return p.wait(timeout=300), b"".join(chunks).decode("utf-8", errors="replace")


def test_progress_bar_only_on_a_terminal(six_layer_path):
    args = ["--model", six_layer_path, *GENERATE, *TIERED]
    code, tty_err = run_with_tty_stderr(*args)
    assert code == 0, tty_err
    assert "placing layers:" in tty_err and "%|" in tty_err
    code, quiet = run_with_tty_stderr(*args, "--noprogress")
    assert code == 0, quiet
    assert "placing layers" not in quiet and "tok/s" in quiet
    piped = run_cli(*args)
    assert piped.returncode == 0, piped.stderr
    assert "placing layers" not in piped.stderr and "\r" not in piped.stderr


def test_summary_tells_bytes_streamed_per_token(six_layer_path):
    r = run_cli("--model", six_layer_path, *GENERATE, "--seed", "1", "--temperature", "1",
                "--top_k", "0", "--top_p", "1", "--min_p", "0", *TIERED)
    assert r.returncode == 0, r.stderr
    summary = [l for l in r.stderr.splitlines() if l.startswith("prompt:")]
    assert len(summary) == 1, r.stderr
    line = summary[0]
    assert "generated:" in line and "tok/s" in line and "stop:" in line
    if "generated: 1 tokens" not in line:   # one token decodes nothing, so nothing streams
        with nt.load(six_layer_path, ctx_size=64, max_vram_layers=2, max_ram_layers=2) as engine:
            ram, disk = engine.plan.bytes_in("ram"), engine.plan.bytes_in("disk")
        assert f"streamed: {(ram + disk) / 1e6:.1f} MB/token" in line, (line, ram, disk)
        assert f"RAM {ram / 1e6:.1f} MB, disk {disk / 1e6:.1f} MB" in line, line
    resident = run_cli("--model", six_layer_path, *GENERATE)
    assert resident.returncode == 0 and "streamed:" not in resident.stderr, resident.stderr
