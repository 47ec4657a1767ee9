"""Launch chosen decode kernels once each, for Nsight Compute (`ncu`) to profile; and summarize
ncu's CSV into one line per kernel.

    ncu --clock-control none --kernel-name regex:'qmatvec|rope|attention' --csv --page details \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
        --section LaunchStats --section WarpStateStats --section SchedulerStats \\
        --log-file $OUT/ncu.csv python3 benchmarks/ncu_probe.py --cases Q4_K:glu,Q8_0:glu
    python3 benchmarks/ncu_probe.py --summarize $OUT/ncu.csv [--out $OUT/ncu.json]

Cases (`--cases`, comma-separated):
- `TYPE:SHAPE[:M]`: `qmatvec_packed` (or `qmatvec_glu_packed` for `glu`) on a 70B matrix shape of
  `kernels_bench.SHAPES_70B` (`q/o`, `down`, `glu`, `qkv`, ...), M rows of x (default 1), at
  the tile the engine would pick (`kernels_bench._default`), on random valid blocks.
- `rope:fused` / `rope:two`: the 8B layer's attention at one new token and `--ctx` cache rows
  (N = 32, K = 8, H = 128, bf16 stacked cache of 32 layers, position ctx - 8):
  `attention.rope_decode_attention`, or `rope_cache.rope_cache_write` then
  `attention.decode_attention` (the engine's two launches).

Every case is compiled and launched once (ncu replays that launch for its passes).
`--summarize` keeps, per kernel launch: the name, grid and block sizes, the metrics of `KEEP`
(duration, DRAM and memory throughput, occupancy, registers per thread, ...) and every stall
metric (all go to `--out`; the printed line shows the five largest stalls).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qmatvec_case(qname: str, shape: str, m: int, interpret: bool):
    import gguf
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kernels_bench as kb
    from ntransformer_jax.kernels import qmatvec as qm

    qtype = gguf.GGMLQuantizationType[qname]
    n, k = kb.SHAPES_70B[shape]
    rng = np.random.default_rng(0)
    w = jax.device_put(kb.random_weight(rng, qtype, n, k))
    packed = jax.block_until_ready(qm.repack(w, qtype, k))
    del w
    bs = kb._default(qtype, shape, n, k, m)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32))
    if shape == kb.GLU_SHAPE:
        f = jax.jit(lambda x, p: qm.qmatvec_glu_packed(x, p, qtype, k, block_sizes=bs,
                                                               interpret=interpret))
    else:
        f = jax.jit(lambda x, p: qm.qmatvec_packed(x, p, qtype, k, block_sizes=bs,
                                                   sum_splits=False, interpret=interpret))
    return lambda: f(x, packed), f"{qname} {shape} {n}x{k} M={m} {kb._bs_short(bs)}"


def _rope_case(kind: str, ctx: int, interpret: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ntransformer_jax.kernels import attention, rope_cache

    n_head, n_kv, h, layers = 32, 8, 128, 32
    rng = np.random.default_rng(0)
    parts = jnp.asarray(rng.standard_normal((1, 1, (n_head + 2 * n_kv) * h), np.float32))
    positions = jnp.full((1, 1), ctx - 8, jnp.int32)
    inv_freq = jnp.asarray(500000.0 ** (-np.arange(h // 2) * 2 / h), jnp.float32)
    shape = (layers, 1, ctx, n_kv, h)
    k_cache = jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
    v_cache = jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
    layer = jnp.int32(5)
    heads = dict(n_head=n_head, n_kv_head=n_kv, interpret=interpret)
    if kind == "fused":
        f = jax.jit(lambda p, kc, vc: attention.rope_decode_attention(
            p, positions, inv_freq, kc, vc, **heads, layer=layer), donate_argnums=(1, 2))
    elif kind == "two":
        def two(p, kc, vc):
            q, kc, vc = rope_cache.rope_cache_write(p, positions, inv_freq, kc, vc, **heads,
                                                    layer=layer)
            return attention.decode_attention(q, kc, vc, positions, layer=layer,
                                              interpret=interpret), kc, vc
        f = jax.jit(two, donate_argnums=(1, 2))
    else:
        raise SystemExit(f"--cases: rope:{kind}: expected rope:fused or rope:two")
    state = [k_cache, v_cache]

    def call():
        out = f(parts, *state)
        state[:] = out[1:]
        return out[0]
    return call, f"rope:{kind} 8B heads ctx={ctx}"


def run_cases(cases: str, ctx: int, interpret: bool = False) -> None:
    import jax
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    for text in cases.split(","):
        fields = text.strip().split(":")
        if fields[0] == "rope":
            call, label = _rope_case(fields[1] if len(fields) > 1 else "", ctx, interpret)
        elif len(fields) in (2, 3):
            m = int(fields[2]) if len(fields) == 3 else 1
            call, label = _qmatvec_case(fields[0], fields[1], m, interpret)
        else:
            raise SystemExit(f"--cases: {text!r}: expected TYPE:SHAPE[:M] or rope:fused|two")
        jax.block_until_ready(call())     # compiled, then launched once: what ncu replays
        print(f"case {label}", flush=True)


# Metric names (ncu 2025 CSV "Metric Name" column) kept by --summarize.
KEEP = {
    "Duration": "duration",
    "DRAM Throughput": "dram_pct",
    "Memory Throughput": "mem_pct",
    "Compute (SM) Throughput": "sm_pct",
    "Achieved Occupancy": "occupancy_pct",
    "Theoretical Occupancy": "theoretical_occupancy_pct",
    "Registers Per Thread": "registers",
    "Waves Per SM": "waves",
    "Block Limit Registers": "block_limit_registers",
    "Block Limit Shared Mem": "block_limit_shared",
    "Dynamic Shared Memory Per Block": "dyn_shared",
    "Static Shared Memory Per Block": "static_shared",
    "Issue Slots Busy": "issue_busy_pct",
    "No Eligible": "no_eligible_pct",
    "Warp Cycles Per Issued Instruction": "cycles_per_issue",
    "Avg. Active Threads Per Warp": "active_threads",
    "L2 Hit Rate": "l2_hit_pct",
    "Mem Busy": "mem_busy_pct",
    "Max Bandwidth": "max_bw_pct",
}


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def summarize(path: str) -> list[dict]:
    """One dict per kernel launch of ncu's `--csv --page details` file."""
    with open(path, newline="") as fh:
        lines = [ln for ln in fh if ln.startswith('"')]    # drop ncu's and the program's prints
    launches: dict[str, dict] = {}
    for row in csv.DictReader(lines):
        key = row.get("ID", "")
        rec = launches.setdefault(key, dict(id=key, kernel=row.get("Kernel Name", ""),
                                            grid=row.get("Grid Size", ""),
                                            block=row.get("Block Size", ""), stalls={}))
        name, unit, value = row.get("Metric Name", ""), row.get("Metric Unit", ""), row.get("Metric Value", "")
        if name in KEEP:
            rec[KEEP[name]] = f"{value} {unit}".strip()
        if "stall" in name.lower():
            rec["stalls"][name] = value
    return list(launches.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="", help="TYPE:SHAPE[:M] or rope:fused|two, comma-separated")
    p.add_argument("--ctx", type=int, default=656, help="cache rows of the rope cases")
    p.add_argument("--interpret", action="store_true", help="CPU smoke run (Pallas interpreter)")
    p.add_argument("--summarize", help="ncu --csv --page details file to summarize")
    p.add_argument("--out", help="JSON file for --summarize")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.summarize:
        recs = summarize(args.summarize)
        for r in recs:
            top = sorted(r["stalls"].items(), key=lambda kv: -_number(kv[1]))[:5]
            short = {k: v for k, v in r.items() if k not in ("stalls", "id")}
            print(json.dumps(short), "top stalls:",
                  ", ".join(f"{k.replace('smsp__average_warps_issue_stalled_', '')[:40]}={v}"
                            for k, v in top))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(recs, fh, indent=1)
        return 0
    if not args.cases:
        raise SystemExit("give --cases or --summarize")
    run_cases(args.cases, args.ctx, args.interpret)
    return 0


if __name__ == "__main__":
    sys.exit(main())
