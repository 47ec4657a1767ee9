"""One jitted Llama layer (`model.block`): decode and prefill time beside the HBM ceiling.

    python benchmarks/layer_jit.py [--shape 8b,70b] [--quant Q4_0,Q8_0,Q4_K_M] [--out F]
    python benchmarks/layer_jit.py --smoke            # CPU check: the tiny shape

For each shape (`synth.SHAPES`) and quantization (`synth.QUANTS`, llama.cpp ftype names) one
layer's weights are built in device memory (random valid blocks, as in kernels_bench.py; no file),
with the per-tensor types llama.cpp gives layer `--layer` of such a file (`synth.tensor_type`;
`--pure` for the base type everywhere). Then, with an f32 KV cache of `--ctx` positions:
- decode: 1 token at position ctx - 1 (attention reads the whole cache);
- prefill: `--prefill` tokens from position 0.
Each is `model.block` exactly as the engine calls it (cache donated and passed back, the block's
input norm done before it and the next layer's norm at its end), timed by
`ceilings.pipelined_time`: calls dispatched back to back, median over `--repeats` samples. Decode
bytes = weights + the KV cache it reads; GB/s and % of the HBM read ceiling measured in the same
run. `host_us` is the host's time to dispatch one call: when it is close to the call time, the
layer is dispatch-bound (the resident path runs all layers in one program instead).
Prints a table last and writes JSON to `--out` (default $OUT/layer_jit.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from ceilings import hbm_read_gbps, pipelined_time
from kernels_bench import random_weight
from ntransformer_jax import model as M
from ntransformer_jax import synth
from ntransformer_jax.model_file import LlamaConfig

T = gguf.GGMLQuantizationType
FLOAT_ARRAYS = {T.F32: np.float32, T.F16: np.float16}

# (field of LayerWeights, [rows, cols] from the shape)
MATRICES = {
    "attn_q": lambda s: (s.n_embd, s.n_embd),
    "attn_k": lambda s: (s.n_embd_kv, s.n_embd),
    "attn_v": lambda s: (s.n_embd_kv, s.n_embd),
    "attn_output": lambda s: (s.n_embd, s.n_embd),
    "ffn_gate": lambda s: (s.n_ff, s.n_embd),
    "ffn_up": lambda s: (s.n_ff, s.n_embd),
    "ffn_down": lambda s: (s.n_embd, s.n_ff),
}


def config_for(shape: synth.SynthShape) -> LlamaConfig:
    """The LlamaConfig a file of this synthetic shape would load as."""
    return LlamaConfig(
        n_layers=shape.n_layers, n_embd=shape.n_embd, n_ff=shape.n_ff, n_head=shape.n_head,
        n_kv_head=shape.n_kv_head, head_dim=shape.head_dim, n_rot=shape.head_dim,
        n_vocab=shape.n_vocab, ctx_train=shape.ctx_len, rope_base=shape.rope_base,
        rope_freq_scale=1.0, rms_eps=shape.rms_eps, tied_output=shape.tied_output,
        has_rope_freqs=shape.rope_freqs)


def layer_weights(shape: synth.SynthShape, quant: str, layer: int, pure: bool,
                  rng: np.random.Generator) -> tuple[M.LayerWeights, dict[str, str]]:
    """Random LayerWeights on the default device, and the GGML type name of each matrix."""
    fields: dict[str, Any] = {}
    types = {}
    for name, dims in MATRICES.items():
        rows, cols = dims(shape)
        qtype = synth.tensor_type(f"blk.{layer}.{name}.weight", cols, shape, quant, pure=pure)
        # Small half scales keep the activations finite (the values matter for nothing else).
        data = random_weight(rng, qtype, rows, cols, scale=0.1 / math.sqrt(cols))
        if qtype in FLOAT_ARRAYS:
            data = data.view(FLOAT_ARRAYS[qtype]).reshape(rows, cols)
        fields[name] = M.QTensor(jax.device_put(data), qtype, cols)
        types[name] = qtype.name
    for name in ("attn_norm", "ffn_norm"):
        fields[name] = jax.device_put(
            (1.0 + 0.02 * rng.standard_normal(shape.n_embd)).astype(np.float32))
    return M.LayerWeights(**fields), types


def time_block(cfg: LlamaConfig, w: M.LayerWeights, x: jax.Array, pos: int, ctx: int,
               inv_freq: jax.Array, repeats: int) -> tuple[float, float]:
    """(seconds per `model.block` call, host seconds to dispatch one), the cache passed along."""
    state = {"cache": M.init_kv_cache(cfg, x.shape[0], ctx)}
    pos = jnp.asarray(pos, jnp.int32)
    # The block gets x with its norm applied and ends with the next layer's norm (its own
    # attention norm stands in), as the engine runs it.
    h = M.first_norm_jit(x, w.attn_norm, cfg.rms_eps, w.attn_output.kernel)

    def step():
        y, _, state["cache"] = M.block(cfg, w, x, h, state["cache"], pos, inv_freq, w.attn_norm)
        return y

    jax.block_until_ready(step())   # compile
    t = pipelined_time(step, repeats)
    n = 8
    t0 = time.perf_counter()
    outs = [step() for _ in range(n)]
    host = (time.perf_counter() - t0) / n
    jax.block_until_ready(outs)
    return t, host


def bench_one(shape_name: str, quant: str, args: argparse.Namespace, ceiling: float,
              rng: np.random.Generator) -> dict:
    shape = synth.SHAPES[shape_name]
    cfg = config_for(shape)
    layer = shape.n_layers // 2 if args.layer is None else args.layer
    w, types = layer_weights(shape, quant, layer, args.pure, rng)
    w = M.pack_layer(w, args.kernel_mode)        # repacked (and q/k/v, gate/up fused) for the kernels
    factors = synth.llama3_rope_factors(shape.head_dim, shape.rope_base) if shape.rope_freqs else None
    inv_freq = jax.device_put(M.rope_inv_freq(cfg, factors))
    weight_bytes = sum(v.nbytes for v in w if isinstance(v, M.QTensor)) + 2 * 4 * shape.n_embd
    kv_bytes = 2 * args.ctx * cfg.n_kv_head * cfg.head_dim * 4     # f32 K and V, batch 1
    n_params = sum(math.prod(dims(shape)) for dims in MATRICES.values())
    rec: dict[str, Any] = dict(shape=shape_name, quant=quant, layer=layer, pure=args.pure,
                               kernels=args.kernel_mode,
                               types=types, weight_bytes=weight_bytes, kv_cache_bytes=kv_bytes,
                               ctx=args.ctx, prefill_tokens=args.prefill)
    for phase, t_new, pos in (("decode", 1, args.ctx - 1), ("prefill", args.prefill, 0)):
        x = jax.device_put(rng.standard_normal((1, t_new, shape.n_embd)).astype(np.float32))
        try:
            t, host = time_block(cfg, w, x, pos, args.ctx, inv_freq, args.repeats)
        except Exception as err:  # noqa: BLE001 - one case must not end the run
            rec[phase] = dict(error=f"{type(err).__name__}: {' '.join(str(err).split())[:200]}")
            print(f"!!! {shape_name} {quant} {phase}: {rec[phase]['error']}", flush=True)
            continue
        n_bytes = weight_bytes + kv_bytes
        rec[phase] = dict(time_s=t, host_us=host * 1e6, bytes=n_bytes, gbps=n_bytes / t / 1e9,
                          pct_hbm=100.0 * n_bytes / t / 1e9 / ceiling, tok_per_s=t_new / t,
                          tflops=2.0 * n_params * t_new / t / 1e12)
        print(json.dumps({"shape": shape_name, "quant": quant, phase: rec[phase]}), flush=True)
    return rec


def _table(res: dict) -> str:
    lines = [f"{'shape':<5} {'quant':<7} {'weights MB':>10} {'decode us':>9} {'host us':>7} "
             f"{'GB/s':>6} {'%HBM':>5} {'prefill ms':>10} {'tok/s':>8} {'TFLOP/s':>7}"]
    for r in res["results"]:
        d, p = r.get("decode", {}), r.get("prefill", {})
        dec = (f"{d['time_s'] * 1e6:>9.1f} {d['host_us']:>7.1f} {d['gbps']:>6.0f} {d['pct_hbm']:>5.1f}"
               if "time_s" in d else f"{'ERROR':>9} {'-':>7} {'-':>6} {'-':>5}")
        pre = (f"{p['time_s'] * 1e3:>10.2f} {p['tok_per_s']:>8.0f} {p['tflops']:>7.1f}"
               if "time_s" in p else f"{'ERROR':>10} {'-':>8} {'-':>7}")
        lines.append(f"{r['shape']:<5} {r['quant']:<7} {r['weight_bytes'] / 1e6:>10.1f} {dec} {pre}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", help="comma-separated synth.SHAPES names (default 8b,70b; smoke tiny)")
    p.add_argument("--quant", help="comma-separated synth.QUANTS names (default Q4_0,Q8_0,Q4_K_M;"
                   f" smoke Q4_0,Q4_K_M), of {', '.join(synth.QUANTS)}")
    p.add_argument("--layer", type=int, default=None,
                   help="layer index whose llama.cpp tensor types to use (default: the middle)")
    p.add_argument("--pure", action="store_true", help="the base type for every matrix")
    p.add_argument("--ctx", type=int, help="KV cache length; decode at ctx - 1 (default 1024; smoke 64)")
    p.add_argument("--prefill", type=int, help="prefill tokens, <= ctx (default 512; smoke 16)")
    p.add_argument("--repeats", type=int, help="timed samples (default 7; smoke 2)")
    p.add_argument("--kernels", default="auto", choices=("auto", "on", "off"),
                   help="fused decode kernels (auto: on a GPU; in --smoke, on = the interpreter)")
    p.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny shape")
    p.add_argument("--seed", type=int, default=0)
    default_out = os.path.join(os.environ["OUT"], "layer_jit.json") if os.environ.get("OUT") else None
    p.add_argument("--out", default=default_out, help="JSON file (default $OUT/layer_jit.json)")
    args = p.parse_args(argv)
    defaults = (dict(shape="tiny", quant="Q4_0,Q4_K_M", ctx=64, prefill=16, repeats=2) if args.smoke
                else dict(shape="8b,70b", quant="Q4_0,Q8_0,Q4_K_M", ctx=1024, prefill=512, repeats=7))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    gpu = jax.default_backend() == "gpu"
    args.kernel_mode = ("off" if args.kernels == "off" or (args.kernels == "auto" and not gpu)
                        else "pallas" if gpu else "interpret")
    args.shapes = [s.strip() for s in args.shape.split(",")]
    args.quants = [q.strip() for q in args.quant.split(",")]
    for s in args.shapes:
        if s not in synth.SHAPES:
            p.error(f"--shape {s!r} is not one of {', '.join(synth.SHAPES)}")
    for q in args.quants:
        if q not in synth.QUANTS:
            p.error(f"--quant {q!r} is not one of {', '.join(synth.QUANTS)}")
    if not 1 <= args.prefill <= args.ctx:
        p.error(f"--prefill={args.prefill} must be between 1 and --ctx={args.ctx}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    ceiling = hbm_read_gbps(64 << 20 if args.smoke else 4 << 30)
    print(f"{dev.device_kind} jax {jax.__version__}: HBM read ceiling {ceiling:.0f} GB/s", flush=True)
    res: dict[str, Any] = dict(date=time.strftime("%Y-%m-%d %H:%M"), jax=jax.__version__,
                               card=dev.device_kind, backend=jax.default_backend(),
                               hbm_read_gbps=ceiling, repeats=args.repeats, results=[])
    rng = np.random.default_rng(args.seed)
    for shape_name in args.shapes:
        for quant in args.quants:
            res["results"].append(bench_one(shape_name, quant, args, ceiling, rng))
    res["elapsed_s"] = time.perf_counter() - t_start
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(f"\n{res['card']} jax {res['jax']}, HBM read ceiling {ceiling:.0f} GB/s, one layer, "
          f"KV cache {args.ctx} (f32), decode at {args.ctx - 1}, prefill {args.prefill} tokens")
    print(_table(res))
    failed = [r for r in res["results"] if "error" in r.get("decode", {}) or "error" in r.get("prefill", {})]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
