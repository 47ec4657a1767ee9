"""Whose pinned memory is it: RssShmem at each stage of tier-B streaming, per XLA pinned-pool cap.

    python benchmarks/pinned_probe.py --layers 8 --passes 5 --out $OUT

Each configuration runs in a fresh process (the cap, XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB, only
takes effect before JAX starts its GPU backend). A "layer" is a pytree of uint8 arrays with the
byte sizes of a 70B Q4_0 layer (q, k, v, o, gate, up, down), copied to the device the way the
tier scheduler does it (`depth` copies in flight, the oldest waited for). Stages recorded:
after JAX starts, after the pinned layers are allocated (ours: `pin_tree`; or XLA's
`pinned_host` arrays), after the first pass, after all passes, with GB/s of the passes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MB = 1 << 20
# 70B Q4_0 (bytes, 18 per 32 weights): q/o 8192x8192, k/v 1024x8192, gate/up/down 8192x28672.
LAYER = [8192 * 8192 * 18 // 32, 1024 * 8192 * 18 // 32, 1024 * 8192 * 18 // 32, 8192 * 8192 * 18 // 32,
         8192 * 28672 * 18 // 32, 8192 * 28672 * 18 // 32, 8192 * 28672 * 18 // 32]


def status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmLck"):
                out[key] = round(int(line.split()[1]) / 1024 / 1024, 3)    # GB (GiB)
    return out


def single(kind: str, layers: int, passes: int, depth: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import SingleDeviceSharding
    from ntransformer_jax.tiers import pin_tree, pinned_bytes

    dev = jax.devices()[0]
    to_dev = SingleDeviceSharding(dev, memory_kind="device")
    jax.block_until_ready(jnp.ones(4) + 1)
    res = {"start": status()}
    trees = [[np.full(n, i, np.uint8) for n in LAYER] for i in range(layers)]
    if kind == "pin_tree":
        trees = [pin_tree(t) for t in trees]
    elif kind in ("hostalloc", "register"):
        import cupy
        keep = []

        def place(t):
            n = sum(a.nbytes for a in t)
            if kind == "hostalloc":      # cudaHostAlloc of the exact size, no pool
                mem = cupy.cuda.PinnedMemoryPointer(cupy.cuda.PinnedMemory(n), 0)
                buf = np.frombuffer(mem, np.uint8, n)
            else:                        # anonymous mmap, registered (page-locked) with CUDA
                import mmap
                m = mmap.mmap(-1, n)
                buf = np.frombuffer(m, np.uint8, n)
                cupy.cuda.runtime.hostRegister(buf.ctypes.data, n, 0)
            keep.append(buf)
            out, o = [], 0
            for a in t:
                v = buf[o:o + a.nbytes]
                v[...] = a
                out.append(v)
                o += a.nbytes
            return out
        trees = [place(t) for t in trees]
    elif kind == "pinned_host":
        host = SingleDeviceSharding(dev, memory_kind="pinned_host")
        trees = [jax.block_until_ready(jax.device_put(t, host)) for t in trees]
    res["allocated"] = status()
    res["allocated_gb"] = layers * sum(LAYER) / 2**30
    res["pinned_live_gb"] = pinned_bytes() / 2**30
    times = []
    for p in range(passes):
        t = time.perf_counter()
        inflight = []
        for tree in trees:
            if len(inflight) >= depth:
                jax.block_until_ready(inflight.pop(0))
            inflight.append(jax.device_put(tree, to_dev))
        jax.block_until_ready(inflight)
        del inflight
        times.append(time.perf_counter() - t)
        if p == 0:
            res["first_pass"] = status()
    res["after"] = status()
    res["gbps"] = [round(layers * sum(LAYER) / t / 1e9, 1) for t in times]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--single", default=None)
    ap.add_argument("--kinds", default="pin_tree,hostalloc,register,plain,pinned_host")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.single:
        print("JSON" + json.dumps(single(args.single, args.layers, args.passes, args.depth)))
        return
    configs = [(k, None) for k in args.kinds.split(",")]
    results = []
    for kind, cap in configs:
        env = dict(os.environ)
        env.pop("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", None)
        if cap:
            env["XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"] = cap
        p = subprocess.run([sys.executable, __file__, "--single", kind, "--layers", str(args.layers),
                            "--passes", str(args.passes), "--depth", str(args.depth)],
                           env=env, capture_output=True, text=True, timeout=300)
        line = next((l for l in p.stdout.splitlines() if l.startswith("JSON")), None)
        r = json.loads(line[4:]) if line else {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
        r.update(kind=kind, cap=cap)
        results.append(r)
        if "error" in r:
            print(f"{kind:12s} cap {cap}: {r['error']}", flush=True)
            continue
        sh = [r[s]["RssShmem"] for s in ("start", "allocated", "first_pass", "after")]
        rss = [r[s]["VmRSS"] for s in ("start", "allocated", "after")]
        print(f"{kind:12s} cap {str(cap):4s} tier {r['allocated_gb']:.2f} GiB  RssShmem start/alloc/pass1/end "
              f"{sh[0]:.2f}/{sh[1]:.2f}/{sh[2]:.2f}/{sh[3]:.2f}  VmRSS start/alloc/end "
              f"{rss[0]:.2f}/{rss[1]:.2f}/{rss[2]:.2f} GiB  GB/s {r['gbps']}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "pinned_probe.json"), "w") as f:
            json.dump(dict(date=time.strftime("%Y-%m-%d"), results=results), f, indent=1)


if __name__ == "__main__":
    main()
