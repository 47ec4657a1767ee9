"""Amortizing streamed weights on the GPU machine: step time against positions per step.

    python benchmarks/amortize_bench.py --vram_budget_gb 24 --out $OUT

On a synthetic 70B (written here unless --model): the time of one target pass over W = 1, 2, 4,
8, 16, 32 positions (the verify width of speculative decoding), aggregate decode tok/s of batches
of 1, 4 and 16 sequences, the time per token of a resident synthetic 1B draft, and speculative
tok/s COMPUTED from those measured step times for acceptance rates 0.5..0.9 and k = 2..8
(expected tokens per round (1 - a^(k+1)) / (1 - a)). Prints a short table last, writes JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags

import ntransformer_jax as nt
from ceilings import median_time
from synthetic import synthetic_file

flags.DEFINE_string("model", None, "Target GGUF (default: write a synthetic 70B Q4_0).")
flags.DEFINE_string("draft", None, "Draft GGUF (default: write a synthetic 1B Q4_0).")
flags.DEFINE_string("workdir", "/root/models", "Where synthetic files go.")
flags.DEFINE_float("vram_budget_gb", 24.0, "Target VRAM budget.")
flags.DEFINE_list("widths", ["1", "2", "4", "8", "16", "32"], "Positions per pass.")
flags.DEFINE_list("batches", ["1", "4", "16"], "Batch sizes for aggregate decode.")
flags.DEFINE_integer("repeats", 3, "Timed repeats.")
flags.DEFINE_integer("batch_tokens", 16, "Tokens per sequence in the long batch run.")
flags.DEFINE_string("out", None, "Folder for JSON.")
FLAGS = flags.FLAGS



def main(argv):
    del argv
    res = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, card=jax.devices()[0].device_kind)
    target_path = FLAGS.model or synthetic_file(FLAGS.workdir, "70b", "Q4_0")[0]
    draft_path = FLAGS.draft or synthetic_file(FLAGS.workdir, "1b", "Q4_0")[0]
    eng = nt.load(target_path, ctx_size=512, vram_budget_gb=FLAGS.vram_budget_gb)
    res["plan"] = eng.plan.summary()
    rng = np.random.default_rng(0)
    res["step_s"] = {}
    for w in map(int, FLAGS.widths):
        ids = rng.integers(10, 500, w).astype(np.int32)
        res["step_s"][w] = median_time(lambda: eng._forward(ids, 100, all_logits=True), FLAGS.repeats)
        print(json.dumps({"width": w, "s": res["step_s"][w]}), flush=True)
    res["batch"] = {}
    greedy = nt.SamplingParams(temperature=0)
    for b in map(int, FLAGS.batches):
        prompts = [rng.integers(10, 500, 8).tolist() for _ in range(b)]
        eng.generate_batch_tokens(prompts, max_new_tokens=2, params=greedy)        # compile
        # Mean step over the long run, warm-up steps included (conservative); the difference of a
        # long and a short run is kept as `diff_step_s` but proved biased (start-up effects).
        # (The synthetic model hits no end-of-generation token in so few steps.)
        spans = {}
        for n in (4, FLAGS.batch_tokens):
            eng.generate_batch_tokens(prompts, max_new_tokens=n, params=greedy)
            spans[n] = eng.last_stats.generate_seconds
        step = spans[FLAGS.batch_tokens] / (FLAGS.batch_tokens - 1)      # warm-up steps included
        res["batch"][b] = dict(step_s=step, aggregate_tok_per_s=b / step,
                               diff_step_s=(spans[FLAGS.batch_tokens] - spans[4]) / (FLAGS.batch_tokens - 4))
        print(json.dumps({"batch": b, **res["batch"][b]}), flush=True)
    eng.close()
    del eng
    draft = nt.load(draft_path, ctx_size=512)
    ids = list(range(10, 18))
    list(draft.generate_tokens(ids, max_new_tokens=4, params=greedy))
    list(draft.generate_tokens(ids, max_new_tokens=65, params=greedy))
    res["draft_token_s"] = 1 / draft.last_stats.generate_tok_per_s
    res["speculative_computed"] = {}
    for k in (2, 4, 6, 8):
        t_round = res["step_s"].get(k + 1) or res["step_s"][min(w for w in res["step_s"] if w >= k + 1)]
        t_round += k * res["draft_token_s"]
        for a in (0.5, 0.6, 0.7, 0.8, 0.9):
            per_round = (1 - a ** (k + 1)) / (1 - a)
            res["speculative_computed"][f"k={k},a={a}"] = per_round / t_round
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "amortize_bench.json"), "w") as f:
            json.dump(res, f, indent=1)
    s1 = res["step_s"][1]
    print(f"\n{res['card']} jax {res['jax']} {res['plan']}")
    print("positions/step: " + ", ".join(f"{w}: {s * 1e3:.0f} ms ({s / s1:.2f}x)" for w, s in res["step_s"].items()))
    print("batch aggregate tok/s: " + ", ".join(f"B={b}: {v['aggregate_tok_per_s']:.2f}" for b, v in res["batch"].items()))
    print(f"draft 1B: {res['draft_token_s'] * 1e3:.1f} ms/token; speculative (computed) k=4 a=0.7: "
          f"{res['speculative_computed']['k=4,a=0.7']:.2f} tok/s")


if __name__ == "__main__":
    app.run(main)
