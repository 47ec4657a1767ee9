"""Tiered streaming on the GPU machine: a synthetic 70B file, tok/s against the PCIe roofline.

    python benchmarks/tiers_bench.py --shape 70b --quant Q4_0 --vram_budget_gb 24 --out $OUT

Writes the synthetic model (unless --model is given), measures the ceilings in the same run
(pinned host -> device copy, HBM read), then decodes with the prefetching pipeline and with the
`--streaming=mmap` baseline at the same budgets. Prints a short table last and writes JSON.
Disk figures here are warm (the file was just written and sits in the page cache) unless
--drop_caches is set.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import SingleDeviceSharding

import ntransformer_jax as nt
from ceilings import disk_read_gbps, drop_caches, h2d_gbps, hbm_read_gbps
from synthetic import synthetic_file

flags.DEFINE_string("model", None, "Existing GGUF file (else a synthetic one is written).")
flags.DEFINE_string("shape", "70b", "Synthetic shape.")
flags.DEFINE_string("quant", "Q4_0", "Synthetic quantization.")
flags.DEFINE_string("workdir", "/root/models", "Where the synthetic file goes.")
flags.DEFINE_list("vram_budget_gb", ["24"], "VRAM budgets to run.")
flags.DEFINE_float("ram_budget_gb", None, "RAM budget (default: available).")
flags.DEFINE_integer("n_decode", 8, "Tokens to decode per run.")
flags.DEFINE_integer("n_mmap", 3, "Tokens to decode in the mmap baseline (0 = skip).")
flags.DEFINE_integer("ctx_size", 512, "Context size.")
flags.DEFINE_boolean("drop_caches", False, "Drop the page cache before each run (cold disk).")
flags.DEFINE_float("disk_ram_budget_gb", 4.0, "RAM budget of the disk-tier run (0 = skip it).")
flags.DEFINE_integer("n_disk", 3, "Tokens to decode in the disk-tier run.")
flags.DEFINE_list("disk_readers", ["posix"], "Tier-C readers of the disk-tier runs (posix with O_DIRECT, kvikio).")
flags.DEFINE_boolean("index_layout", False, "Also run each budget with layout='index' (streamed layers last).")
flags.DEFINE_list("then_quants", [], "After the first model, delete it and run these quants too (same shape).")
flags.DEFINE_string("single", None, "Internal: run one configuration (JSON) in this process and print JSON.")
flags.DEFINE_string("out", None, "Folder for JSON.")
FLAGS = flags.FLAGS
# The first timed token of a run holds two passes over the streamed layers (the prompt, then the
# first decode step, dispatched before the first token is read), and the second pass finds the
# pages the first one read: a cold per-token figure needs a third token.
flags.register_validator("n_mmap", lambda n: n == 0 or n >= 2,
                         "--n_mmap must be 0 (skip) or at least 2: the first token is not a cold pass")


def reset_peak_rss() -> None:
    """Reset this process's VmHWM (peak RSS) to its current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def hwm_gb() -> float:
    """VmHWM: the peak RSS since the start or the last `reset_peak_rss`, in GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def proc_status() -> dict:
    """Current VmRSS / RssAnon / RssFile of this process and MemAvailable, in GB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmLck"):
                out[key] = int(line.split()[1]) * 1024 / 1e9
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                out["MemAvailable"] = int(line.split()[1]) * 1024 / 1e9
    from ntransformer_jax.tiers import pinned_bytes
    out["pinned_live"] = pinned_bytes() / 1e9   # ours, to tell apart from what JAX/CUDA pin
    return out


def evict(engine) -> None:
    """Emulate a machine whose RAM cannot cache the model: unmap and drop the file's pages."""
    import mmap
    for obj in list(vars(engine.model_file).values()) + [getattr(engine.model_file, "_reader", None)]:
        obj = getattr(obj, "data", obj)
        mm = obj if isinstance(obj, mmap.mmap) else getattr(obj, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            mm.madvise(mmap.MADV_DONTNEED)
    fd = os.open(engine.model_file.path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    drop_caches()


def run(path: str, n_tokens: int, cold_each_token: bool = False, **opts) -> dict:
    if FLAGS.drop_caches:
        drop_caches()
    opts.setdefault("ram_budget_gb", FLAGS.ram_budget_gb)
    t = time.perf_counter()
    engine = nt.load(path, ctx_size=FLAGS.ctx_size, **opts)
    load_s = time.perf_counter() - t
    proc_loaded = proc_status()
    load_peak = hwm_gb()   # VmHWM: this process alone (ru_maxrss counts the parent at fork)
    reset_peak_rss()       # from here VmHWM is the peak of generation alone
    prompt = list(range(10, 18))
    params = nt.SamplingParams(temperature=0)
    list(engine.generate_tokens(prompt, max_new_tokens=2, params=params))      # compile
    token_times = []
    t = time.perf_counter()
    if cold_each_token:
        evict(engine)
        t = time.perf_counter()
    for _ in engine.generate_tokens(prompt, max_new_tokens=n_tokens + 1, params=params):
        token_times.append(time.perf_counter() - t)
        if cold_each_token:
            evict(engine)          # the mmap baseline from a cold disk: no page cache help
        t = time.perf_counter()
    st = engine.last_stats
    stats = engine.device.memory_stats() or {}
    res = dict(opts=opts, load_s=load_s, reader=getattr(getattr(engine.streamer, "reader", None), "name", None)
               if getattr(engine, "streamer", None) else None, placement="".join(t[0] for t in engine.placement),
               plan=engine.plan.summary(), tok_per_s=st.generate_tok_per_s, per_token=st.per_token(),
               token_times=token_times, proc=proc_status(), proc_loaded=proc_loaded,
               steady_tok_per_s=1 / statistics.median(token_times[2:-1] or token_times[:1]),
               device_peak_gb=stats.get("peak_bytes_in_use", 0) / 1e9, host_maxrss_gb=max(load_peak, hwm_gb()),
               load_peak_rss_gb=load_peak, generate_peak_rss_gb=hwm_gb(),
               bytes_streamed_per_token=engine.plan.bytes_in("ram") + engine.plan.bytes_in("disk"))
    engine.close()
    del engine
    print(json.dumps(res), flush=True)
    return res


def run_isolated(path: str, n_tokens: int, **kw) -> dict:
    """`run` in a fresh process, so no run inherits another's memory."""
    cmd = [sys.executable, __file__, f"--single={json.dumps(dict(path=path, n_tokens=n_tokens, **kw))}",
           f"--ctx_size={FLAGS.ctx_size}"] + (["--drop_caches"] if FLAGS.drop_caches else [])
    if FLAGS.ram_budget_gb is not None:
        cmd.append(f"--ram_budget_gb={FLAGS.ram_budget_gb}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        return dict(error=proc.stderr[-2000:], opts=kw, tok_per_s=0.0, per_token={}, plan="", device_peak_gb=0,
                    host_maxrss_gb=0, bytes_streamed_per_token=1, token_times=[1.0])
    return json.loads(lines[-1])


def main(argv):
    del argv
    if FLAGS.single:
        spec = json.loads(FLAGS.single)
        from ntransformer_jax.tiers import limit_pinned_pool
        limit_pinned_pool(spec.get("ram_budget_gb", FLAGS.ram_budget_gb))  # before the GPU starts
        run(spec.pop("path"), spec.pop("n_tokens"), **spec)
        return
    dev = jax.devices()[0]
    res = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, card=dev.device_kind)
    res["h2d_gbps"] = h2d_gbps()
    res["hbm_gbps"] = hbm_read_gbps()
    print(json.dumps(res), flush=True)
    path = FLAGS.model
    if path is None:
        path, write_s = synthetic_file(FLAGS.workdir, FLAGS.shape, FLAGS.quant)
        if write_s is not None:
            res["write_s"] = write_s
    res["file_gb"] = os.path.getsize(path) / 1e9
    res["cold_read_gbps"] = disk_read_gbps(path, cold=True)
    print(json.dumps(res), flush=True)
    res["runs"] = []

    def save():
        if FLAGS.out:
            os.makedirs(FLAGS.out, exist_ok=True)
            with open(os.path.join(FLAGS.out, "tiers_bench.json"), "w") as f:
                json.dump(res, f, indent=1)

    for quant in [FLAGS.quant] + list(FLAGS.then_quants):
        if quant != FLAGS.quant:
            os.remove(path)
            path, res[f"write_s_{quant}"] = synthetic_file(FLAGS.workdir, FLAGS.shape, quant)
        for budget in FLAGS.vram_budget_gb:
            r = run_isolated(path, FLAGS.n_decode, vram_budget_gb=float(budget))
            r["quant"] = quant
            r["roofline_tok_per_s"] = res["h2d_gbps"] * 1e9 / max(r["bytes_streamed_per_token"], 1)
            r["ratio"] = r["tok_per_s"] / r["roofline_tok_per_s"]
            r["steady_ratio"] = r.get("steady_tok_per_s", 0) / r["roofline_tok_per_s"]
            res["runs"].append(r)
            save()
            if quant != FLAGS.quant:
                continue
            if FLAGS.index_layout:
                x = run_isolated(path, FLAGS.n_decode, vram_budget_gb=float(budget), layout="index")
                x["quant"] = quant
                x["roofline_tok_per_s"] = r["roofline_tok_per_s"]
                x["ratio"] = x["tok_per_s"] / x["roofline_tok_per_s"]
                res["runs"].append(x)
                save()
            for reader in (FLAGS.disk_readers if FLAGS.disk_ram_budget_gb else []):
                # POSIX reads bypass the page cache (O_DIRECT); KvikIO's compat-mode reads do not,
                # so its run evicts the file's pages before every token.
                d = run_isolated(path, FLAGS.n_disk, vram_budget_gb=float(budget),
                        ram_budget_gb=FLAGS.disk_ram_budget_gb, reader=reader, o_direct=reader == "posix",
                        cold_each_token=reader != "posix")
                d["quant"] = quant
                p = d["per_token"]
                d["disk_ratio_to_cold_read"] = p.get("disk_gbps", 0) / max(res["cold_read_gbps"], 1e-9)
                res["runs"].append(d)
                save()
            if FLAGS.n_mmap:
                m = run_isolated(path, FLAGS.n_mmap, cold_each_token=True, vram_budget_gb=float(budget),
                        streaming="mmap")
                m["quant"] = quant
                m["tok_per_s_cold"] = 1 / statistics.median(m["token_times"][1:-1] or m["token_times"][:1])
                m["speedup_of_pipeline"] = r["tok_per_s"] / m["tok_per_s_cold"]
                m["speedup_steady"] = r.get("steady_tok_per_s", 0) / m["tok_per_s_cold"]
                res["runs"].append(m)
                save()
    save()
    print(f"\n{res['card']} jax {res['jax']} H2D {res['h2d_gbps']:.1f} GB/s HBM {res['hbm_gbps']:.0f} GB/s "
          f"cold read {res['cold_read_gbps']:.2f} GB/s file {res['file_gb']:.1f} GB")
    for r in res["runs"]:
        p = r["per_token"]
        print(f"{r.get('quant')} {r['opts']} {r['tok_per_s']:.3f} tok/s steady {r.get('steady_tok_per_s', 0):.3f} "
              f"cold {r.get('tok_per_s_cold', 0):.3f} x{r.get('speedup_steady', 0):.1f} rss {r.get('proc')} "
              f"disk/cold {r.get('disk_ratio_to_cold_read', 0):.2f} {r.get('error', '')[-300:]} roofline {r.get('roofline_tok_per_s', 0):.2f} "
              f"wait_copy {p.get('wait_copy_s', 0) * 1e3:.0f} ms wait_disk {p.get('wait_disk_s', 0) * 1e3:.0f} ms "
              f"peak {r['device_peak_gb']:.1f} GB rss {r['host_maxrss_gb']:.1f} GB (load "
              f"{r.get('load_peak_rss_gb', 0):.1f}, generation {r.get('generate_peak_rss_gb', 0):.1f}) {r['plan']}")


if __name__ == "__main__":
    app.run(main)
