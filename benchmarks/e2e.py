"""llama-bench-like end-to-end figures for one GGUF file: pp (prompt tokens/s) and tg (decode tokens/s).

    python benchmarks/e2e.py --model 8b-q8_0.gguf --pp 512 --tg 128 --repeats 5 --out $OUT [tier flags]

Warm-up run first (compiles), then `--repeats` timed runs; reports the median and the spread
(min, max) of each, beside the HBM ceiling measured in the same run and the weight-bytes roofline
(one full read of the weights per decoded token). A synthetic model can be written first with
`--shape 8b --quant Q8_0` (no --model).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags

import ntransformer_jax as nt
from ceilings import hbm_read_gbps
from synthetic import synthetic_file

flags.DEFINE_string("model", None, "GGUF file (else a synthetic one from --shape/--quant).")
flags.DEFINE_string("shape", "8b", "Synthetic shape when no --model.")
flags.DEFINE_string("quant", "Q8_0", "Synthetic quantization when no --model.")
flags.DEFINE_string("workdir", "/root/models", "Where the synthetic file goes.")
flags.DEFINE_integer("pp", 512, "Prompt length for the prompt-processing figure.")
flags.DEFINE_integer("tg", 128, "Tokens to generate for the decode figure.")
flags.DEFINE_integer("repeats", 5, "Timed repeats.")
flags.DEFINE_float("vram_budget_gb", None, "Tier option, as in the CLI.")
flags.DEFINE_float("ram_budget_gb", None, "Tier option, as in the CLI.")
flags.DEFINE_list("kernels", ["auto"], "Kernel modes to run one after the other (auto, off, on).")
flags.DEFINE_enum("matmul", "f32", ["f32", "bf16"], "Prefill matmul input type (engine option).")
flags.DEFINE_list("prefill_kernel", ["off"], "model.PREFILL_KERNEL for each run (on: prefill "
                  "matmuls by the qmatmul kernel; off: XLA); several values run one after the other.")
flags.DEFINE_list("fuse_x", ["on"], "qmatvec.FUSE_X for each run (on: the decode kernels quantize x "
                  "themselves; off: XLA quantizes it before each launch).")
flags.DEFINE_list("norm_warps", ["0"], "norm.NUM_WARPS for each run (0: the kernel's default).")
flags.DEFINE_list("fuse_norm", ["on"], "model.FUSE_NORM for each run (on: a block's last residual "
                  "add and the next norm in one launch; off: two).")
flags.DEFINE_list("fuse_rope", ["off"], "model.FUSE_ROPE_ATTENTION for each run (on: a layer's q/k "
                  "rotation, cache write and attention in one launch; off: two).")
flags.DEFINE_list("shape_tiles", ["on"], "qmatvec.SHAPE_TILES for each run (on: the per-shape "
                  "decode tiles of qmatvec.SHAPE_TUNED; off: the per-type defaults alone).")
flags.DEFINE_list("prefetch", ["off"], "qmatvec.PREFETCH for each run (on: the decode kernels' "
                  "default tiles load one K chunk ahead).")
flags.DEFINE_integer("scan_unroll", 0, "Set model.SCAN_UNROLL (0: keep the default; -1: full unroll).")
flags.DEFINE_string("out", None, "Folder for e2e.json.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    path = FLAGS.model or synthetic_file(FLAGS.workdir, FLAGS.shape, FLAGS.quant)[0]
    if FLAGS.scan_unroll:
        from ntransformer_jax import model
        model.SCAN_UNROLL = True if FLAGS.scan_unroll < 0 else FLAGS.scan_unroll
    hbm = hbm_read_gbps() if jax.default_backend() == "gpu" else None
    runs = [run(path, mode, hbm, pk == "on", fx == "on", int(nw), fn == "on", st == "on",
                fr == "on", pf == "on")
            for mode in FLAGS.kernels for pk in FLAGS.prefill_kernel for fx in FLAGS.fuse_x
            for nw in FLAGS.norm_warps for fn in FLAGS.fuse_norm for st in FLAGS.shape_tiles
            for fr in FLAGS.fuse_rope for pf in FLAGS.prefetch]
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        name = os.path.splitext(os.path.basename(path))[0]
        with open(os.path.join(FLAGS.out, f"e2e-{name}.json"), "w") as f:
            json.dump(runs, f, indent=1)
    print(json.dumps(runs, indent=1))
    for res in runs:
        print(f"\n{res['card']} jax {res['jax']} {res['model']} kernels={res['kernels']} "
              f"matmul={res['matmul']} prefill_kernel={res['prefill_kernel']} "
              f"fuse_x={res['fuse_x']} norm_warps={res['norm_warps']} fuse_norm={res['fuse_norm']} "
              f"fuse_rope={res['fuse_rope']} prefetch={res['prefetch']} "
              f"shape_tiles={res['shape_tiles']} unroll={res['scan_unroll']} load {res['load_s']:.0f}s: "
              f"pp{FLAGS.pp} {res['pp_tok_per_s']['median']:.1f} tok/s, tg{FLAGS.tg} "
              f"{res['tg_tok_per_s']['median']:.1f} tok/s (roofline {res.get('tg_roofline')}, "
              f"HBM {hbm} GB/s)")


def run(path: str, kernels: str, hbm: float | None, prefill_kernel: bool,
        fuse_x: bool = True, norm_warps: int = 0, fuse_norm: bool = True,
        shape_tiles: bool = True, fuse_rope: bool = False, prefetch: bool = False) -> dict:
    from ntransformer_jax import model
    from ntransformer_jax.kernels import norm, qmatvec
    norm.NUM_WARPS = norm_warps or None
    model.FUSE_NORM = fuse_norm
    model.FUSE_ROPE_ATTENTION = fuse_rope
    qmatvec.SHAPE_TILES = shape_tiles
    model.PREFILL_KERNEL = prefill_kernel
    qmatvec.FUSE_X = fuse_x
    qmatvec.PREFETCH = prefetch
    jax.clear_caches()          # traced steps read it: retrace
    dev = jax.devices()[0]
    res = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, card=dev.device_kind,
               model=os.path.basename(path), hbm_read_gbps=hbm)
    t = time.perf_counter()
    eng = nt.load(path, ctx_size=FLAGS.pp + FLAGS.tg + 16, vram_budget_gb=FLAGS.vram_budget_gb,
                  ram_budget_gb=FLAGS.ram_budget_gb, kernels=kernels, matmul=FLAGS.matmul)
    res["load_s"] = time.perf_counter() - t
    res["kernels"], res["matmul"] = eng.kernels, eng.matmul
    res["scan_unroll"] = FLAGS.scan_unroll
    res["prefill_kernel"] = prefill_kernel
    res["fuse_x"] = qmatvec.FUSE_X   # as the load's self-test left it
    res["norm_warps"] = norm_warps or "default"
    res["fuse_norm"], res["shape_tiles"] = fuse_norm, shape_tiles
    res["fuse_rope"] = model.FUSE_ROPE_ATTENTION   # as the load's self-test left it
    res["prefetch"] = qmatvec.PREFETCH
    res["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, min(eng.config.n_vocab, 30000), FLAGS.pp).tolist()
    greedy = nt.SamplingParams(temperature=0)
    pp, tg = [], []
    for r in range(FLAGS.repeats + 1):
        t = time.perf_counter()
        jax.block_until_ready(eng._forward(np.asarray(prompt, np.int32), 0, all_logits=False))
        pp_s = time.perf_counter() - t
        # tg: decode after a 1-token prompt (an end-of-generation token ends it early: "tokens" says how many)
        list(eng.generate_tokens(prompt[:1], max_new_tokens=FLAGS.tg, params=greedy))
        st = eng.last_stats
        if r:                                   # the first round compiles
            pp.append(FLAGS.pp / pp_s)
            tg.append(st.generate_tok_per_s)
    res["pp_tok_per_s"] = dict(median=statistics.median(pp), min=min(pp), max=max(pp))
    res["tg_tok_per_s"] = dict(median=statistics.median(tg), min=min(tg), max=max(tg),
                               tokens=eng.last_stats.generated_tokens)
    res["weight_bytes"] = eng.weight_bytes if not eng.layered else None
    res["placement"] = "".join(t[0] for t in eng.placement)
    if res["hbm_read_gbps"] and res["weight_bytes"]:
        res["tg_roofline"] = res["hbm_read_gbps"] * 1e9 / res["weight_bytes"]
        res["tg_ratio"] = res["tg_tok_per_s"]["median"] / res["tg_roofline"]
    eng.close()
    del eng
    return res


if __name__ == "__main__":
    app.run(main)
