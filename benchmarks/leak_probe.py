"""Which host->device copy grows host memory: each copy kind the tier scheduler uses, in isolation.

    python benchmarks/leak_probe.py --n 3000 --mb 4 --out $OUT

For each case, `--n` copies of a `--mb` MB uint8 array to the device (each result waited for and
dropped), then RssAnon / RssShmem growth per copy. Cases: tier B (`pinned_host` array), tier C
(numpy view of pinned staging, and of plain numpy), each from the main thread and from a worker
thread (the scheduler issues tier-C copies on its fetch pool).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import os
import time

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from ntransformer_jax.tiers import alloc_staging


def status_mb() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) / 1024
    return out


def overlap(dev, to_dev, jit_copy, n_bytes: int = 1 << 30) -> dict:
    """Copy 1 GiB (as 8 arrays, like a layer) host -> device beside 16 chained 4096^3 matmuls, issued
    first: each copy kind alone, the compute alone, and both together (seconds, median of 3)."""
    import statistics
    import jax.numpy as jnp
    pinned = SingleDeviceSharding(dev, memory_kind="pinned_host")
    parts = [np.ones(n_bytes // 8, np.uint8) for _ in range(8)]
    tier_b = [jax.device_put(p, pinned) for p in parts]
    staged = []
    for p in parts:
        buf = alloc_staging(p.size)
        buf[:] = p
        staged.append(buf)
    a = jnp.ones((4096, 4096), jnp.float32)
    mm = jax.jit(lambda a: functools.reduce(lambda x, _: x @ a * 1e-4, range(16), a))
    jax.block_until_ready(mm(a))
    kinds = {"device_put pinned_host": lambda: jax.device_put(tier_b, to_dev),
             "jitted copy pinned_host": lambda: jit_copy(tier_b),
             "device_put pinned numpy": lambda: jax.device_put(staged, to_dev)}

    def timed(fn):
        out = []
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    res = {"compute_s": timed(lambda: mm(a))}
    for name, copy in kinds.items():
        jax.block_until_ready(copy())
        res[name] = dict(copy_s=timed(copy), gbps=n_bytes / timed(copy) / 1e9,
                         together_s=timed(lambda: (copy(), mm(a))))
        print(f"{name:26s} copy {res[name]['copy_s'] * 1e3:6.1f} ms ({res[name]['gbps']:5.1f} GB/s), "
              f"compute {res['compute_s'] * 1e3:6.1f} ms, together {res[name]['together_s'] * 1e3:6.1f} ms", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--mb", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = jax.devices()[0]
    to_dev = SingleDeviceSharding(dev, memory_kind="device")
    size = args.mb << 20
    pinned_jax = jax.device_put(np.ones(size, np.uint8), SingleDeviceSharding(dev, memory_kind="pinned_host"))
    pinned_tree = [jax.device_put(np.ones(size // 8, np.uint8), SingleDeviceSharding(dev, memory_kind="pinned_host"))
                   for _ in range(8)]
    staging = alloc_staging(size)
    staging[:] = 1
    plain = np.ones(size, np.uint8)
    pool = cf.ThreadPoolExecutor(max_workers=2)

    def put(src):
        jax.block_until_ready(jax.device_put(src, to_dev))

    # A transfer as a jitted copy between memory kinds (XLA's own host-offload copy).
    jit_copy = jax.jit(lambda a: a, out_shardings=to_dev)

    cases = {
        "pinned_host array, main thread": lambda: put(pinned_jax),
        "pinned_host array, worker thread": lambda: pool.submit(put, pinned_jax).result(),
        "pinned_host array, jitted copy": lambda: jax.block_until_ready(jit_copy(pinned_jax)),
        "pinned_host tree of 8 arrays, main": lambda: put(pinned_tree),
        "pinned staging numpy, main thread": lambda: put(staging),
        "pinned staging numpy, worker thread": lambda: pool.submit(put, staging).result(),
        "plain numpy, main thread": lambda: put(plain),
        "plain numpy, worker thread": lambda: pool.submit(put, plain).result(),
        "pinned staging tree of 8 views, worker": lambda: pool.submit(
            put, [staging[i * (size // 8):(i + 1) * (size // 8)] for i in range(8)]).result(),
    }
    res = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, card=dev.device_kind,
               n=args.n, mb=args.mb, cases={})
    for name, fn in cases.items():
        for _ in range(50):           # warm-up: compile, first-touch, pools
            fn()
        before, t = status_mb(), time.perf_counter()
        for _ in range(args.n):
            fn()
        after, dt = status_mb(), time.perf_counter() - t
        res["cases"][name] = dict(
            us_per_copy=dt / args.n * 1e6,
            **{f"{k}_kb_per_copy": (after[k] - before[k]) * 1024 / args.n for k in before})
        print(f"{name:42s} {dt / args.n * 1e6:8.1f} us  RssAnon {res['cases'][name]['RssAnon_kb_per_copy']:+8.3f} KB/copy"
              f"  RssShmem {res['cases'][name]['RssShmem_kb_per_copy']:+8.3f} KB/copy", flush=True)
    if jax.default_backend() == "gpu":
        res["overlap"] = overlap(dev, to_dev, jit_copy)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "leak_probe.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
