"""Where a resident prefill's time goes: layer by layer (the engine's default, bit-identical to
the layered path) against one dispatch over the stacked layers.

    python benchmarks/prefill_probe.py --shape 8b --quant Q4_0 --matmul bf16 --out $OUT

Loads the model once (a synthetic file from --shape/--quant unless --model), then for each mode
(`engine.LAYERWISE_PREFILL` True and False): a warm-up, the median time of `--repeats` prefills of
`--pp` random ids, and one profiled prefill summed per kernel (`profile_decode.summarize`).
Also times the per-layer copies alone (weights and cache out of their stacks). Prints the top
kernels of each mode and a short table last; writes prefill_probe.json.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import ntransformer_jax as nt
from ntransformer_jax import engine as engine_mod
from profile_decode import summarize
from synthetic import synthetic_file

# --model, --shape, --quant, --workdir, --top and --out are profile_decode's flags (imported).
flags.DEFINE_enum("matmul", "bf16", ["f32", "bf16"], "Engine matmul option.")
flags.DEFINE_integer("pp", 512, "Prompt length.")
flags.DEFINE_integer("repeats", 3, "Timed prefills per mode.")
FLAGS = flags.FLAGS


def _prefill(eng, ids) -> float:
    t = time.perf_counter()
    jax.block_until_ready(eng._forward(ids, 0, all_logits=False))
    return time.perf_counter() - t


def main(argv):
    del argv
    path = FLAGS.model or synthetic_file(FLAGS.workdir, FLAGS.shape, FLAGS.quant)[0]
    eng = nt.load(path, ctx_size=FLAGS.pp + 16, matmul=FLAGS.matmul)
    ids = np.random.default_rng(0).integers(10, 30000, FLAGS.pp).astype(np.int32)
    res = dict(card=jax.devices()[0].device_kind, jax=jax.__version__, model=os.path.basename(path),
               matmul=FLAGS.matmul, pp=FLAGS.pp, modes={})
    for layerwise in (True, False):
        engine_mod.LAYERWISE_PREFILL = layerwise
        _prefill(eng, ids)
        times = [_prefill(eng, ids) for _ in range(FLAGS.repeats)]
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                _prefill(eng, ids)
            trace = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)[0]
            prof = summarize(trace, 1, FLAGS.top)
        name = "layerwise" if layerwise else "stacked"
        res["modes"][name] = dict(median_s=statistics.median(times), tok_per_s=FLAGS.pp / statistics.median(times),
                                  profile=prof)
        print(f"\n{name}: {FLAGS.pp / statistics.median(times):.0f} tok/s, device busy "
              f"{prof['device_busy_us_per_token']:.0f} us, {prof['kernels_per_token']:.0f} kernels", flush=True)
        for k in prof["top"]:
            print(f"  {k['us_per_token']:9.0f} us {k['launches_per_token']:5.0f}x {k['group']:8s} {k['name'][:90]}")
    # The copies alone: every layer's weights and cache out of the stacks, one dispatch a layer.
    def copies():
        out = []
        for seg, cache, n in zip(eng.segments, eng._caches, eng.segment_sizes):
            for j in range(n):
                out.append(engine_mod._stack_entry((seg, cache), eng._layer_ids[j]))
        return out
    jax.block_until_ready(copies())
    t = time.perf_counter()
    jax.block_until_ready(copies())
    res["copies_s"] = time.perf_counter() - t
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "prefill_probe.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(f"\n{res['card']} jax {res['jax']} {res['model']} matmul={FLAGS.matmul} pp{FLAGS.pp}: " + ", ".join(
        f"{k} {v['tok_per_s']:.0f} tok/s" for k, v in res["modes"].items())
        + f"; per-layer copies alone {res['copies_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    app.run(main)
