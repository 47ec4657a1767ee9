"""Where a decoded token's time goes: a profiler trace of resident decode, summed per kernel.

    python benchmarks/profile_decode.py --shape 8b --quant Q8_0 --tokens 32 --out $OUT

Loads the model (a synthetic file from --shape/--quant unless --model), compiles with a warm-up,
then records `--tokens` greedy decode steps with `jax.profiler.trace` and reads the trace's
Chrome-format JSON. Prints, per token: wall time, device busy time (union of kernel intervals),
kernel count, and the kernels that take the most device time (name, launches and microseconds per
token), grouped into decode kernels (qmatvec), other fusions, library calls and copies. Writes
profile_decode.json (and keeps the raw trace in --out when --keep_trace).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

import jax
from absl import app, flags

import ntransformer_jax as nt
from synthetic import synthetic_file

flags.DEFINE_string("model", None, "GGUF file (else a synthetic one from --shape/--quant).")
flags.DEFINE_string("shape", "8b", "Synthetic shape when no --model.")
flags.DEFINE_string("quant", "Q8_0", "Synthetic quantization when no --model.")
flags.DEFINE_string("workdir", "/root/models", "Where the synthetic file goes.")
flags.DEFINE_integer("tokens", 32, "Decode steps recorded.")
flags.DEFINE_string("kernels", "auto", "Engine kernel mode (auto, on, off).")
flags.DEFINE_integer("top", 25, "Kernels listed.")
flags.DEFINE_string("procs", r"GPU|/device:", "Regex of the trace's process names that are devices.")
flags.DEFINE_boolean("keep_trace", False, "Copy the raw trace (perfetto_trace.json.gz) to --out.")
flags.DEFINE_integer("scan_unroll", 0, "Set model.SCAN_UNROLL (0: keep the default; -1: full unroll).")
flags.DEFINE_string("out", None, "Folder for profile_decode.json.")
FLAGS = flags.FLAGS


def kernel_group(name: str) -> str:
    """A coarse class of a device event's name."""
    low = name.lower()
    if "qmatvec" in low:
        return "decode kernel (qmatvec)"
    if any(k in low for k in ("gemm", "cublas", "cutlass", "sm90_xmma", "gemv")):
        return "library matmul"
    if "memcpy" in low or "memset" in low or low.startswith("copy"):
        return "copy / memset"
    if "fusion" in low or "loop_" in low or "input_" in low or "reduce" in low:
        return "XLA fusion"
    return "other"


def summarize(trace_path: str, tokens: int, top: int, procs: str = r"GPU|/device:") -> dict:
    """Per-token kernel statistics from a Chrome-format trace (processes matching `procs`)."""
    with gzip.open(trace_path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in names.items() if re.search(procs, name)}
    spans = [(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
             if e.get("ph") == "X" and e.get("pid") in device]
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for start, end, name in spans:
        by_name[name][0] += 1
        by_name[name][1] += end - start
    busy, last = 0.0, float("-inf")      # union of the intervals
    for start, end, _ in sorted(spans):
        if end > last:
            busy += end - max(start, last)
            last = end
    groups: dict[str, float] = collections.Counter()
    for name, (_, us) in by_name.items():
        groups[kernel_group(name)] += us / tokens
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return dict(
        device_processes=sorted(names[p] for p in device),
        kernels_per_token=len(spans) / tokens,
        device_busy_us_per_token=busy / tokens,
        kernel_us_per_token=sum(us for _, us in by_name.values()) / tokens,
        groups_us_per_token=dict(groups),
        top=[dict(name=name[:120], launches_per_token=n / tokens, us_per_token=us / tokens,
                  group=kernel_group(name)) for name, (n, us) in rows])


def main(argv):
    del argv
    path = FLAGS.model or synthetic_file(FLAGS.workdir, FLAGS.shape, FLAGS.quant)[0]
    if FLAGS.scan_unroll:
        from ntransformer_jax import model
        model.SCAN_UNROLL = True if FLAGS.scan_unroll < 0 else FLAGS.scan_unroll
    engine = nt.load(path, ctx_size=FLAGS.tokens + 64, kernels=FLAGS.kernels)
    greedy = nt.SamplingParams(temperature=0)
    prompt = [11, 22, 33, 44]
    list(engine.generate_tokens(prompt, max_new_tokens=FLAGS.tokens, params=greedy))  # compile
    # Untraced timing too: XLA runs command buffers (CUDA graphs) op by op under a profiler.
    t = time.perf_counter()
    untraced = list(engine.generate_tokens(prompt, max_new_tokens=FLAGS.tokens, params=greedy))
    untraced_us = (time.perf_counter() - t) / len(untraced) * 1e6
    untraced_tps = engine.last_stats.generate_tok_per_s
    logdir = tempfile.mkdtemp()
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        t = time.perf_counter()
        got = list(engine.generate_tokens(prompt, max_new_tokens=FLAGS.tokens, params=greedy))
        wall = time.perf_counter() - t
    traces = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not traces:
        sys.exit(f"error: no trace written under {logdir}")
    n = len(got)
    res = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__,
               card=jax.devices()[0].device_kind, model=os.path.basename(path),
               kernels=engine.kernels, tokens=n, untraced_wall_us_per_token=untraced_us,
               untraced_tok_per_s=untraced_tps, scan_unroll=FLAGS.scan_unroll,
               xla_flags=os.environ.get("XLA_FLAGS", ""), wall_us_per_token=wall / n * 1e6,
               weight_bytes=engine.weight_bytes, **summarize(traces[0], n, FLAGS.top, FLAGS.procs))
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "profile_decode.json"), "w") as f:
            json.dump(res, f, indent=1)
        if FLAGS.keep_trace:
            shutil.copy(traces[0], os.path.join(FLAGS.out, "perfetto_trace.json.gz"))
    print(f"{res['card']} jax {res['jax']} {res['model']} kernels={res['kernels']} "
          f"unroll={res['scan_unroll']} XLA_FLAGS={res['xla_flags']!r}: "
          f"{res['wall_us_per_token']:.0f} us/token wall (untraced {untraced_us:.0f}), device busy "
          f"{res['device_busy_us_per_token']:.0f} us, {res['kernels_per_token']:.0f} kernels/token")
    for group, us in sorted(res["groups_us_per_token"].items(), key=lambda kv: -kv[1]):
        print(f"  {group:28s} {us:9.1f} us/token")
    for r in res["top"]:
        print(f"  {r['us_per_token']:8.1f} us  x{r['launches_per_token']:6.1f}  {r['group'][:14]:14s} "
              f"{r['name'][:90]}")


if __name__ == "__main__":
    app.run(main)
