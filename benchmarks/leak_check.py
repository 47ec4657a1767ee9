"""Device memory and host RSS over 2,000 generated tokens in tiered mode (GPU figure for the leak test).

    python benchmarks/leak_check.py --shape 1b --max_vram_layers 4 --max_ram_layers 8 --out $OUT
"""

from __future__ import annotations

import json
import os
import time

import tracemalloc

import jax
from absl import app, flags

import ntransformer_jax as nt
from synthetic import synthetic_file

flags.DEFINE_string("shape", "1b", "Synthetic shape.")
flags.DEFINE_string("workdir", "/root/models", "Where the synthetic file goes.")
flags.DEFINE_integer("max_vram_layers", 4, "Layers in VRAM.")
flags.DEFINE_integer("max_ram_layers", 8, "Layers in RAM (the rest from disk).")
flags.DEFINE_integer("tokens", 2000, "Tokens to generate.")
flags.DEFINE_boolean("tracemalloc", True, "Track Python allocations (tells Python-heap growth from native).")
flags.DEFINE_string("out", None, "Folder for JSON.")
FLAGS = flags.FLAGS


def rss_mb() -> float:
    return proc_mb()["VmRSS"]


def proc_mb() -> dict:
    """VmRSS and its parts (anonymous, file-backed, shared/pinned) from /proc/self/status, in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmLck"):
                out[key] = int(line.split()[1]) / 1024
    return out


def main(argv):
    del argv
    path, _ = synthetic_file(FLAGS.workdir, FLAGS.shape, "Q4_0")
    eng = nt.load(path, ctx_size=FLAGS.tokens + 64, max_vram_layers=FLAGS.max_vram_layers,
                  max_ram_layers=FLAGS.max_ram_layers)
    params = nt.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    if FLAGS.tracemalloc:
        tracemalloc.start(8)
    samples, done, t0 = [], 0, time.perf_counter()
    snap0 = None
    ids = [1, 100, 200]
    start = 0
    while done < FLAGS.tokens:
        # Continue the cached context in chunks, so an end-of-generation token does not stop the run.
        n = min(200, FLAGS.tokens - done)
        new = list(eng.generate_tokens(ids, max_new_tokens=n, params=params, seed=done, start_pos=start))
        start = len(eng.cached_tokens)
        ids = new[-1:] or [100]
        done += max(len(new), 1)
        stats = eng.device.memory_stats() or {}
        samples.append(dict(tokens=done, s=time.perf_counter() - t0, rss_mb=rss_mb(),
                            device_in_use_mb=stats.get("bytes_in_use", 0) / 2**20,
                            live_arrays=len(jax.live_arrays()), **{k: v for k, v in proc_mb().items() if k != "VmRSS"},
                            python_heap_mb=tracemalloc.get_traced_memory()[0] / 2**20 if FLAGS.tracemalloc else None))
        if FLAGS.tracemalloc and snap0 is None:
            snap0 = tracemalloc.take_snapshot()
        print(json.dumps(samples[-1]), flush=True)
        if FLAGS.out:          # after every sample, so a run cut short still leaves its figures
            os.makedirs(FLAGS.out, exist_ok=True)
            with open(os.path.join(FLAGS.out, "leak_check.json"), "w") as f:
                json.dump(dict(card=eng.device.device_kind, samples=samples), f, indent=1)
    res = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, card=eng.device.device_kind,
               placement="".join(t[0] for t in eng.placement), samples=samples)
    if snap0 is not None:     # where the Python heap grew between the first and the last sample
        stats = tracemalloc.take_snapshot().compare_to(snap0, "traceback")
        res["python_growth_top"] = [dict(kb=st.size_diff / 1024, count=st.count_diff,
                                         where=[str(fr) for fr in st.traceback][-4:]) for st in stats[:8]]
    first, last = samples[0], samples[-1]
    res["growth"] = {k: last[k] - first[k] for k in ("rss_mb", "device_in_use_mb", "live_arrays",
                                                     "RssAnon", "RssFile", "RssShmem", "python_heap_mb")
                     if isinstance(first.get(k), (int, float))}
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "leak_check.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(f"\n{res['card']} {res['placement']} after {first['tokens']} -> {last['tokens']} tokens: "
          f"growth {res['growth']}")


if __name__ == "__main__":
    app.run(main)
