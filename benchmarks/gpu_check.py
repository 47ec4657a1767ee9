"""Correctness and first speed figures on the GPU machine, in one run.

    python benchmarks/gpu_check.py --models a.gguf,b.gguf --smollm smollm.gguf --out $OUT

For every model: logits on the default JAX backend (the GPU) against the float64 numpy reference
on the same dequantized weights (median relative error of centered logits, top-1 agreement).
For SmolLM2 also: greedy decode tok/s (median of repeats after warm-up) and the HBM read ceiling
measured in the same run. Prints a short table last and writes JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import ntransformer_jax as nt  # noqa: E402
from reference import Float64Llama, compare_logits  # noqa: E402
from ceilings import hbm_read_gbps  # noqa: E402

flags.DEFINE_list("models", [], "GGUF files for the logits check.")
flags.DEFINE_string("smollm", None, "SmolLM2 GGUF for the logits check and decode speed.")
flags.DEFINE_string("out", None, "Folder for results.json.")
flags.DEFINE_integer("n_tokens", 128, "Tokens to decode for the speed figure.")
flags.DEFINE_integer("repeats", 3, "Timed decode repeats.")
FLAGS = flags.FLAGS


def logits_check(path: str, n: int = 64) -> dict:
    """n positions in one prefill (XLA matmuls; the qmatmul kernel with model.PREFILL_KERNEL
    on), then 8 (the fused decode kernels' rows)."""
    engine = nt.load(path, ctx_size=256)
    ids = np.random.default_rng().integers(0, engine.config.n_vocab, n)
    ref = Float64Llama(path).logits(ids)
    rel, top1 = compare_logits(engine.logits(ids), ref)
    k_rel, k_top1 = compare_logits(engine.logits(ids[:8]), ref[:8])
    ok = bool(rel <= 1e-2 and top1 >= 0.97 and k_rel <= 1e-2 and k_top1 >= 0.97)
    bf16 = nt.load(path, ctx_size=256, matmul="bf16")
    b_rel, b_top1 = compare_logits(bf16.logits(ids), ref)
    return dict(model=os.path.basename(path), kernels=engine.kernels, rel=rel, top1=top1,
                kernel_rel=k_rel, kernel_top1=k_top1, passed=ok, bf16_prefill_rel=b_rel,
                bf16_prefill_top1=b_top1)


def decode_speed(path: str) -> dict:
    engine = nt.load(path, ctx_size=1024)
    prompt = engine.tokenize("The capital of France is")
    params = nt.SamplingParams(temperature=0)
    list(engine.generate_tokens(prompt, max_new_tokens=16, params=params))   # compile
    rates = []
    for _ in range(FLAGS.repeats):
        list(engine.generate_tokens(prompt, max_new_tokens=FLAGS.n_tokens, params=params))
        rates.append(engine.last_stats.generate_tok_per_s)
    text = "".join(engine.generate("The capital of France is", max_new_tokens=8, temperature=0))
    return dict(model=os.path.basename(path), tok_per_s=statistics.median(rates),
                spread=[min(rates), max(rates)], weight_bytes=engine.weight_bytes, greedy_text=text)


def main(argv):
    del argv
    res = dict(jax=jax.__version__, device=str(jax.devices()[0]),
               device_kind=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d"))
    res["hbm_read_gbps"] = hbm_read_gbps() if jax.default_backend() == "gpu" else None
    paths = list(FLAGS.models) + ([FLAGS.smollm] if FLAGS.smollm else [])
    res["logits"] = [logits_check(p) for p in paths]
    if FLAGS.smollm:
        res["decode"] = decode_speed(FLAGS.smollm)
        d = res["decode"]
        if res["hbm_read_gbps"]:
            bound = res["hbm_read_gbps"] * 1e9 / d["weight_bytes"]
            d["roofline_tok_per_s"] = bound
            d["ratio"] = d["tok_per_s"] / bound
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "gpu_check.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    print(f"\n{res['device_kind']} jax {res['jax']} HBM read {res['hbm_read_gbps']} GB/s")
    for r in res["logits"]:
        print(f"{r['model']:40s} rel {r['rel']:.2e} top1 {r['top1']:.3f} | 8 rows ({r['kernels']}) "
              f"rel {r['kernel_rel']:.2e} top1 {r['kernel_top1']:.3f} {'PASS' if r['passed'] else 'FAIL'}"
              f" | bf16 prefill rel {r['bf16_prefill_rel']:.2e} top1 {r['bf16_prefill_top1']:.3f}")
    if "decode" in res:
        print(f"decode {res['decode']['tok_per_s']:.1f} tok/s {res['decode'].get('ratio')}")


if __name__ == "__main__":
    app.run(main)
