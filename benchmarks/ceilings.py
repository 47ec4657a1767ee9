"""Hardware ceilings measured on the machine at hand, for the figures the other benchmarks report.

    python benchmarks/ceilings.py [--file BIG.gguf] [--out $OUT]

HBM read (jitted reduction over 4 GiB), pinned host <-> device copies (2 GiB), disk reads of a
large file cold (page cache dropped, O_DIRECT, 8 threads) and warm, and the bf16 matmul rate.
The other benchmark scripts import these functions so every figure sits beside its ceiling.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import SingleDeviceSharding


def median_time(fn, repeats: int) -> float:
    """Median wall time of fn() (blocked until ready) over `repeats` runs after one warm-up."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def pipelined_time(fn, repeats: int, min_sample_s: float = 5e-3, max_calls: int = 256,
                   warmup_s: float = 0.0) -> float:
    """Median seconds per fn() call, with calls issued back to back and blocked once per sample.

    Each sample dispatches fn() n times without waiting (n chosen so a sample lasts about
    `min_sample_s`), then blocks on all results. Host dispatch thus overlaps device work, and a
    device program shorter than one host round trip is not charged that round trip, as it would
    be by `median_time`. If the host dispatches slower than the device runs, the figure is the
    dispatch rate. Call fn() once beforehand: the first blocked call here only sizes n.
    `warmup_s`: run samples untimed for that long first. An H100 left idle (a compile, host
    work) drops its SM clock (345 MHz idle against 1,980 under load) and needs a while under
    load to come back (one short launch read 1.5x slower timed cold, session 16).
    """
    t = time.perf_counter()
    jax.block_until_ready(fn())
    n = max(1, min(max_calls, math.ceil(min_sample_s / max(time.perf_counter() - t, 1e-9))))
    t = time.perf_counter()
    while time.perf_counter() - t < warmup_s:
        jax.block_until_ready([fn() for _ in range(n)])
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready([fn() for _ in range(n)])
        samples.append((time.perf_counter() - t) / n)
    return statistics.median(samples)


def hbm_read_gbps(n_bytes: int = 4 << 30, warmup_s: float = 0.5) -> float:
    """HBM read bandwidth (GB/s): the faster of two jitted XLA reductions over n_bytes, a flat
    f32 sum and an int32 max of each 64 KiB row, each timed with calls back to back
    (`pipelined_time`) after `warmup_s` of the same work (so the clocks are up; a cold card
    measured as low as 1.9 TB/s on an H100 where a warm one gives 2.7-2.9)."""
    x = jnp.ones((n_bytes // 4,), jnp.float32) * jnp.float32(1.0001)
    rows = lax.bitcast_convert_type(x, jnp.int32).reshape(-1, 1 << 14)
    best = 0.0
    for f, a in ((jax.jit(jnp.sum), x), (jax.jit(lambda v: jnp.max(v, axis=1)), rows)):
        jax.block_until_ready(f(a))
        best = max(best, n_bytes / pipelined_time(lambda: f(a), 10, warmup_s=warmup_s) / 1e9)
    return best


def same_size_read_gbps(n_bytes: int, copies: int = 1, calls: int = 8, repeats: int = 7) -> float:
    """GB/s of one XLA read of `n_bytes` (an int32 max of each 64 KiB row, `hbm_read_gbps`'s
    kernel, the size rounded down to whole rows): `calls` reductions in one jitted program, each
    over the next of `copies` buffers in turn; each takes the max with one value of the one
    before, so XLA can neither merge two into one launch nor compute one read once for two
    calls (it removes optimization barriers and does both). Timed like `hbm_read_gbps`. What a
    plain read of that size reaches, for comparison with a short kernel; on an H100 it was as
    noisy as the kernels (benchmarks/RESULTS.md, session 16), so it is no bound yet."""
    rows = max(1, n_bytes // (1 << 16))
    bufs = [jnp.full((rows, 1 << 14), i, jnp.int32) for i in range(copies)]

    @jax.jit
    def reads(bufs):
        out, dep = [], jnp.int32(-1)
        for i in range(calls):
            out.append(jnp.max(jnp.maximum(bufs[i % copies], dep), axis=1))
            dep = out[-1][0] - (1 << 20)   # below every value: the max is unchanged, but not known
        return out

    jax.block_until_ready(reads(bufs))
    return rows * (1 << 16) * calls / pipelined_time(lambda: reads(bufs), repeats,
                                                     warmup_s=0.2) / 1e9


def h2d_gbps(n_bytes: int = 2 << 30) -> float:
    """pinned_host -> device `device_put` bandwidth (GB/s)."""
    dev = jax.devices()[0]
    host = jax.device_put(np.ones(n_bytes, np.uint8), SingleDeviceSharding(dev, memory_kind="pinned_host"))
    to_dev = SingleDeviceSharding(dev, memory_kind="device")
    return n_bytes / median_time(lambda: jax.device_put(host, to_dev), 5) / 1e9


def d2h_gbps(n_bytes: int = 2 << 30) -> float:
    """device -> pinned_host `device_put` bandwidth (GB/s)."""
    dev = jax.devices()[0]
    x = jnp.ones((n_bytes,), jnp.uint8)
    to_host = SingleDeviceSharding(dev, memory_kind="pinned_host")
    return n_bytes / median_time(lambda: jax.device_put(x, to_host), 5) / 1e9


def drop_caches() -> None:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)


def disk_read_gbps(path: str, n_bytes: int = 8 << 30, threads: int = 8, cold: bool = True) -> float:
    """Reads of `path` into pinned staging: cold (page cache dropped, O_DIRECT) or warm."""
    from ntransformer_jax.tiers import PosixReader, alloc_staging
    n_bytes = min(n_bytes, os.path.getsize(path) // 4096 * 4096)
    buf = alloc_staging(n_bytes)
    reader = PosixReader(path, threads, o_direct=cold)
    if cold:
        drop_caches()
    else:
        reader.read_into(buf, 0)
    t = time.perf_counter()
    reader.read_into(buf, 0)
    dt = time.perf_counter() - t
    reader.close()
    return n_bytes / dt / 1e9


def bf16_matmul_tflops(n: int = 8192) -> float:
    """Dense bf16 n x n x n matmul rate on random data (TFLOP/s)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n ** 3 / median_time(lambda: f(a, b), 10) / 1e12


def main() -> None:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", help="a large file for the disk figures")
    p.add_argument("--out", help="folder for ceilings.json")
    args = p.parse_args()
    dev = jax.devices()[0]
    res = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, card=dev.device_kind,
               hbm_read_gbps=hbm_read_gbps(), h2d_gbps=h2d_gbps(), d2h_gbps=d2h_gbps(),
               bf16_tflops=bf16_matmul_tflops())
    if args.file:
        res["disk_cold_gbps"] = disk_read_gbps(args.file, cold=True)
        res["disk_warm_gbps"] = disk_read_gbps(args.file, cold=False)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ceilings.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    print("\n" + " | ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
