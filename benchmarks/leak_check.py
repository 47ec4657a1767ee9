"""Device memory and host RSS over 2,000 generated tokens in tiered mode (GPU figure for the leak test).

    python benchmarks/leak_check.py --shape 1b --max_vram_layers 4 --max_ram_layers 8 --out $OUT
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import app, flags

import ntransformer_jax as nt
from synthetic import synthetic_file

flags.DEFINE_string("shape", "1b", "Synthetic shape.")
flags.DEFINE_string("workdir", "/root/models", "Where the synthetic file goes.")
flags.DEFINE_integer("max_vram_layers", 4, "Layers in VRAM.")
flags.DEFINE_integer("max_ram_layers", 8, "Layers in RAM (the rest from disk).")
flags.DEFINE_integer("tokens", 2000, "Tokens to generate.")
flags.DEFINE_string("out", None, "Folder for JSON.")
FLAGS = flags.FLAGS


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(argv):
    del argv
    path, _ = synthetic_file(FLAGS.workdir, FLAGS.shape, "Q4_0")
    eng = nt.load(path, ctx_size=FLAGS.tokens + 64, max_vram_layers=FLAGS.max_vram_layers,
                  max_ram_layers=FLAGS.max_ram_layers)
    params = nt.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    samples, done, t0 = [], 0, time.perf_counter()
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
                            live_arrays=len(jax.live_arrays())))
        print(json.dumps(samples[-1]), flush=True)
    res = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, card=eng.device.device_kind,
               placement="".join(t[0] for t in eng.placement), samples=samples)
    first, last = samples[0], samples[-1]
    res["growth"] = {k: last[k] - first[k] for k in ("rss_mb", "device_in_use_mb", "live_arrays")}
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "leak_check.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(f"\n{res['card']} {res['placement']} after {first['tokens']} -> {last['tokens']} tokens: "
          f"growth {res['growth']}")


if __name__ == "__main__":
    app.run(main)
