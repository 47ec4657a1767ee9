"""The three-tier weight store: placement, host/disk storage and the prefetching scheduler.

Tier A ("vram"): layer weights resident in device memory.
Tier B ("ram"): layer weights in pinned (page-locked) host memory, copied to the device with
  `jax.device_put` a few layers ahead of use. They are numpy views of one pinned buffer per layer
  (`pin_tree`), not `pinned_host` jax.Arrays: the copy is the same DMA at the PCIe rate, but the
  latter grew host RSS by ~1.5 KB per array copied (JAX 0.11.2 on an H200) and live in XLA's
  pinned-host pool, which grows in doubling steps and keeps what it took.
Tier C ("disk"): the layer's byte ranges in the GGUF file, read on a thread pool (KvikIO where
  CUDA and kvikio are present, `os.preadv` otherwise) into reusable staging buffers (pinned when
  cupy can allocate pinned memory), copied to the device as stored in the file and repacked
  there for the decode kernels (`LayerSource.finish`), by the same code that repacks tiers A
  and B on the host at load: the same bits whatever the tier, and no host CPU per fetch.

Placement puts as many layers as fit in A, then B, the rest in C, and spreads the streamed layers
evenly through the stack: a streamed layer's copy then overlaps the compute of the resident layers
before it, so copies and compute run side by side all through the token. With streamed layers in
index order (all at the end), the resident layers finish with at most `depth` copies in flight and
the tail runs at PCIe speed with the compute idle: about the resident compute time slower per token.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import ctypes.util
import dataclasses
import errno
import functools
import math
import os
import threading
import weakref
import time
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from ntransformer_jax.errors import InputError, NTransformerError
from ntransformer_jax.model_file import TensorInfo

GiB = 1 << 30
VRAM_RESERVE = 1 * GiB        # left free by the default VRAM budget
RAM_RESERVE = 2 * GiB         # left free by the default RAM budget
READ_CHUNK = 16 << 20         # bytes per read call on the thread pool
ALIGN = 4096                  # O_DIRECT alignment


class StreamingError(NTransformerError):
    """A streamed layer could not be read (file truncated, removed, I/O error)."""


@dataclasses.dataclass(frozen=True)
class TierOptions:
    """Placement and streaming settings (all optional).

    Attributes:
      vram_budget_gb: device memory the engine may use (default: free memory less 1 GiB).
      ram_budget_gb: host RAM for tier B and staging (default: available RAM less 2 GiB).
      max_vram_layers / max_ram_layers: caps on the layers placed in A / B.
      streaming: "pipeline" (prefetch ahead on a thread pool) or "mmap" (the naive baseline:
        each non-resident layer read from the memory map and copied when needed).
      prefetch_depth: streamed layers in flight ahead of the one computing.
      reader: "auto", "kvikio" or "posix" for tier C.
      o_direct: bypass the page cache for tier C reads where the file system allows.
      read_threads: threads of the tier-C reader pool.
      layout: "spread" (streamed layers spaced evenly through the stack, the default: see the
        module docstring) or "index" (layers in VRAM first, then RAM, then disk, by index; for
        comparison).
    """

    vram_budget_gb: float | None = None
    ram_budget_gb: float | None = None
    max_vram_layers: int | None = None
    max_ram_layers: int | None = None
    streaming: str = "pipeline"
    prefetch_depth: int = 2
    reader: str = "auto"
    o_direct: bool = False
    read_threads: int = 8
    layout: str = "spread"

    def __post_init__(self):
        number = (int, float, np.integer, np.floating)
        for name in ("vram_budget_gb", "ram_budget_gb"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, number)
                                  or not (v >= 0 and np.isfinite(v))):
                raise InputError(f"{name}={v!r} must be a non-negative number of GB")
        for name in ("max_vram_layers", "max_ram_layers", "prefetch_depth", "read_threads"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise InputError(f"{name}={v!r} must be an integer")
        for name in ("max_vram_layers", "max_ram_layers"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise InputError(f"{name}={v} must be >= 0")
        if self.streaming not in ("pipeline", "mmap"):
            raise InputError(f"streaming={self.streaming!r} must be 'pipeline' or 'mmap'")
        if self.prefetch_depth < 1:
            raise InputError(f"prefetch_depth={self.prefetch_depth} must be >= 1")
        if self.reader not in ("auto", "kvikio", "posix"):
            raise InputError(f"reader={self.reader!r} must be 'auto', 'kvikio' or 'posix'")
        if self.layout not in ("spread", "index"):
            raise InputError(f"layout={self.layout!r} must be 'spread' or 'index'")
        if self.read_threads < 1:
            raise InputError(f"read_threads={self.read_threads} must be >= 1")

    @property
    def tiered(self) -> bool:
        """Whether any placement option was given (the layered path is used)."""
        return any(v is not None for v in (self.vram_budget_gb, self.ram_budget_gb,
                                           self.max_vram_layers, self.max_ram_layers))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where every layer lives and what the budgets must hold."""

    tiers: tuple[str, ...]             # "vram" | "ram" | "disk" per layer
    layer_bytes: tuple[int, ...]
    device_working_set: dict           # name -> bytes (cache, globals, slots, workspace)
    host_working_set: dict
    vram_budget: int
    ram_budget: int

    def bytes_in(self, tier: str) -> int:
        return sum(b for t, b in zip(self.tiers, self.layer_bytes) if t == tier)

    def count(self, tier: str) -> int:
        return sum(t == tier for t in self.tiers)

    @property
    def device_bytes(self) -> int:
        return self.bytes_in("vram") + sum(self.device_working_set.values())

    @property
    def host_bytes(self) -> int:
        return self.bytes_in("ram") + sum(self.host_working_set.values())

    def summary(self) -> str:
        g = lambda b: "unlimited" if b >= 1 << 61 else f"{b / 1e9:.2f} GB"
        return (f"{self.count('vram')} layers in VRAM ({g(self.bytes_in('vram'))}), "
                f"{self.count('ram')} in RAM ({g(self.bytes_in('ram'))}), "
                f"{self.count('disk')} on disk ({g(self.bytes_in('disk'))}); device total "
                f"{g(self.device_bytes)} of {g(self.vram_budget)}, host {g(self.host_bytes)} of {g(self.ram_budget)}")


def spread(n_total: int, n_pick: int) -> list[int]:
    """n_pick indices out of range(n_total), evenly spaced (centered in their intervals)."""
    if n_pick <= 0:
        return []
    return sorted({min(n_total - 1, int((k + 0.5) * n_total / n_pick)) for k in range(n_pick)})


def _streamed(n_total: int, n_pick: int, layout: str) -> list[int]:
    """Indices of the n_pick streamed layers of n_total: spread evenly, or the last ones."""
    return spread(n_total, n_pick) if layout == "spread" else list(range(n_total - n_pick, n_total))


def free_device_memory(device: jax.Device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


PINNED_POOL_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
PINNED_POOL_SLACK_GB = 2


def limit_pinned_pool(ram_budget_gb: float | None) -> str | None:
    """Cap XLA's pinned-host pool at the RAM budget plus PINNED_POOL_SLACK_GB.

    XLA stages copies of pageable host memory through a BFC pool of pinned memory that grows by
    doubling regions up to 64 GB (its default cap) and keeps what it took; pinned pages count in
    RSS (RssShmem): when tier B lived in `pinned_host` arrays (which XLA carves from the same
    pool), 19 GB of tier B showed as 52 GB of RSS. The engine now keeps tier B and its load
    staging in pinned buffers of its own (`pin_tree`), so the pool only serves small copies; the
    cap bounds it anyway. It (the environment variable PINNED_POOL_ENV, in whole GB) only takes
    effect if set before JAX starts its GPU backend, so the CLI and benchmarks call this first;
    an existing setting is left alone. Returns the value used.
    """
    if (PINNED_POOL_ENV in os.environ or ram_budget_gb is None or not math.isfinite(ram_budget_gb)
            or ram_budget_gb <= 0):     # a bad budget is TierOptions' error to name
        return os.environ.get(PINNED_POOL_ENV)
    os.environ[PINNED_POOL_ENV] = str(math.ceil(ram_budget_gb + PINNED_POOL_SLACK_GB))
    return os.environ[PINNED_POOL_ENV]


def available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def plan_placement(layer_bytes: Sequence[int], device_working_set: dict, staging_bytes: int,
                   options: TierOptions, free_vram: int | None, avail_ram: int | None,
                   slot_bytes: int, repack_bytes: int = 0) -> Plan:
    """Place layers in VRAM, RAM and disk within the budgets.

    Args:
      layer_bytes: bytes of each layer's weights.
      device_working_set: device bytes needed whatever the placement (cache, globals, workspace).
      staging_bytes: host bytes per tier-C staging slot.
      options: budgets and caps.
      free_vram / avail_ram: measured free memory (None: unknown, then unlimited).
      slot_bytes: device bytes of one prefetch slot (the largest layer).
      repack_bytes: device bytes a tier-C layer takes as read, before it is repacked on the
        device (0: not repacked); counted once per concurrent fetch where layers land on disk.
    Raises:
      InputError: the working set does not fit the budgets (the message gives the minimum).
    """
    n = len(layer_bytes)
    unlimited = 1 << 62
    vram_budget = (int(options.vram_budget_gb * 1e9) if options.vram_budget_gb is not None
                   else (free_vram - VRAM_RESERVE if free_vram is not None else unlimited))
    ram_budget = (int(options.ram_budget_gb * 1e9) if options.ram_budget_gb is not None
                  else (avail_ram - RAM_RESERVE if avail_ram is not None else unlimited))
    depth = options.prefetch_depth
    # Concurrent tier-C fetches (each holds its layer as read until repacked): the fetch pool's
    # workers, or the one synchronous copy of the mmap baseline.
    repack = (1 if options.streaming == "mmap" else depth) * repack_bytes
    plan = _place(layer_bytes, device_working_set, staging_bytes, options, vram_budget, ram_budget,
                  slot_bytes, 0)
    from_file = any(t == "disk" or (t == "ram" and options.streaming == "mmap") for t in plan.tiers)
    if repack and from_file:
        plan = _place(layer_bytes, device_working_set, staging_bytes, options, vram_budget, ram_budget,
                      slot_bytes, repack)
    return plan


def _place(layer_bytes, device_working_set, staging_bytes, options, vram_budget, ram_budget,
           slot_bytes, repack) -> Plan:
    """`plan_placement` with `repack` device bytes set aside for tier-C repacking (counted
    only where a layer streams)."""
    n = len(layer_bytes)
    depth = options.prefetch_depth
    base = sum(device_working_set.values())

    # Device: the most layers that fit beside the working set (with slots if anything streams),
    # counting the bytes of the very layers the layout puts in VRAM (layers may differ in size).
    max_a = n if options.max_vram_layers is None else min(n, options.max_vram_layers)
    n_a = 0
    for k in range(max_a, -1, -1):
        # All resident: two layers' copies (a long prefill runs layer by layer, the next layer
        # taken out of its stack while one runs; see the engine).
        slots = 2 * slot_bytes if k == n else (depth + 1) * slot_bytes + repack
        resident = set(range(n)) - set(_streamed(n, n - k, options.layout))
        if base + slots + sum(layer_bytes[i] for i in resident) <= vram_budget:
            n_a = k
            break
    else:
        need = base + (depth + 1) * slot_bytes + repack
        raise InputError(f"vram_budget_gb={vram_budget / 1e9:.2f} is too small for the working set "
                         f"(KV cache, embeddings, output head, {depth + 1} layer slots, workspace): "
                         f"the minimum is {need / 1e9:.2f} GB")
    dev_ws = dict(device_working_set)
    if n_a == n:
        dev_ws["layer_copies"] = 2 * slot_bytes
    else:
        dev_ws["prefetch_slots"] = (depth + 1) * slot_bytes
        if repack:
            dev_ws["disk_repack"] = repack

    # Host: tier B within the RAM budget, beside the staging slots tier C needs.
    n_rest = n - n_a
    max_b = n_rest if options.max_ram_layers is None else min(n_rest, options.max_ram_layers)
    host_ws: dict = {}
    n_b = 0
    if n_rest:
        for k in range(max_b, -1, -1):
            staging = 0 if k == n_rest else (depth + 1) * staging_bytes
            if staging + k * slot_bytes <= ram_budget:
                n_b = k
                break
        else:
            raise InputError(f"ram_budget_gb={ram_budget / 1e9:.2f} is too small for the disk staging "
                             f"buffers: the minimum is {(depth + 1) * staging_bytes / 1e9:.2f} GB")
        if n_b < n_rest:
            host_ws["staging"] = (depth + 1) * staging_bytes

    # Which layers: the streamed ones by the layout, the disk ones spread among those (or last).
    tiers = ["vram"] * n
    streamed = _streamed(n, n_rest, options.layout)
    for i in streamed:
        tiers[i] = "ram"
    for j in _streamed(len(streamed), n_rest - n_b, options.layout):
        tiers[streamed[j]] = "disk"
    return Plan(tuple(tiers), tuple(int(b) for b in layer_bytes), dev_ws, host_ws,
                int(vram_budget), int(ram_budget))


# ---------------------------------------------------------------------------------------------
# Tier C readers
# ---------------------------------------------------------------------------------------------

_pinned_live = [0]   # bytes of pinned buffers from alloc_staging not yet freed


def _pinned_freed(n: int) -> None:
    _pinned_live[0] -= n


def pinned_bytes() -> int:
    """Bytes of the pinned buffers `alloc_staging` handed out that are still referenced (for
    host-memory accounting in tiers_bench.py, beside the process's RssShmem)."""
    return _pinned_live[0]


def alloc_staging(n_bytes: int) -> np.ndarray:
    """A page-aligned uint8 host buffer, pinned (page-locked) when cupy can provide it.

    Allocated with cudaHostAlloc of the size asked for (`cupy.cuda.PinnedMemory`), not from
    cupy's pinned pool: the pool rounds sizes up (a 70B Q4_0 layer of 0.449 GiB took 0.5 GiB,
    +11% of tier B in RSS; benchmarks/pinned_probe.py) and keeps freed blocks.
    """
    try:
        import cupy  # noqa: F401  (present on CUDA machines)
        mem = cupy.cuda.PinnedMemoryPointer(cupy.cuda.PinnedMemory(n_bytes + ALIGN), 0)
        buf = np.frombuffer(mem, np.uint8, n_bytes + ALIGN)
        _pinned_live[0] += n_bytes + ALIGN
        weakref.finalize(buf, _pinned_freed, n_bytes + ALIGN)   # when the last view goes
        off = (-buf.ctypes.data) % ALIGN
        return buf[off:off + n_bytes]   # the view's buffer export keeps `mem` alive, no longer
    except Exception:  # noqa: BLE001 - no cupy / no CUDA driver: plain aligned memory
        raw = np.empty(n_bytes + ALIGN, np.uint8)
        off = (-raw.ctypes.data) % ALIGN
        return raw[off:off + n_bytes]


def pin_tree(tree):
    """A copy of a pytree of host or device arrays in one page-aligned host buffer (pinned when
    cupy can provide it; see `alloc_staging`): a pytree of numpy views of that buffer. Leaves
    are copied one at a time, so device arrays pass through host memory a leaf, not a tree, at
    a time.

    `jax.device_put` of such views DMAs them straight to the device at the PCIe rate, without
    XLA's pinned-host pool (measured on an H200: 52 GB/s, overlapping compute, host memory flat
    over thousands of copies, where a `device_put` of `pinned_host` jax.Arrays grew RSS by
    ~1.5 KB per array copied; benchmarks/leak_probe.py).
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    offsets, total = [], 0
    for a in leaves:
        offsets.append(total)
        total += -(-a.nbytes // 256) * 256        # every view 256-byte aligned
    buf = alloc_staging(max(total, 1))
    views = []
    for a, o in zip(leaves, offsets):
        v = buf[o:o + a.nbytes].view(np.dtype(a.dtype)).reshape(a.shape)
        v[...] = np.asarray(a)
        views.append(v)
    return jax.tree_util.tree_unflatten(treedef, views)


def pinned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized host array in pinned memory where cupy can provide it (else plain)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    return alloc_staging(max(n, 1))[:n].view(dtype).reshape(shape)


class PosixReader:
    """Reads byte ranges of one file with `os.preadv` on a thread pool (optionally O_DIRECT)."""

    name = "posix"

    def __init__(self, path: str, threads: int, o_direct: bool):
        self.path = path
        self.o_direct = False
        flags = os.O_RDONLY
        if o_direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, flags | os.O_DIRECT)
                self.o_direct = True
            except OSError:
                self.fd = os.open(path, flags)
        else:
            self.fd = os.open(path, flags)
        self.pool = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ntj-read")
        self.size_at_open = os.fstat(self.fd).st_size

    def _read_chunk(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n <= 0:
                if offset + done >= self.size_at_open:
                    return   # an aligned span may reach past the end of the file: nothing to read
                raise StreamingError(f"model file {self.path} ended at byte {offset + done} while "
                                     f"streaming (truncated or replaced?)")
            done += n

    def read_into(self, dst: np.ndarray, offset: int) -> None:
        """Fill dst (uint8) with the file's bytes from `offset`, in parallel chunks."""
        view = memoryview(dst)
        futures = [self.pool.submit(self._read_chunk, view[s:s + READ_CHUNK], offset + s)
                   for s in range(0, len(dst), READ_CHUNK)]
        for f in futures:
            f.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        os.close(self.fd)


class KvikioReader:
    """Reads byte ranges with KvikIO (its own thread pool; compat mode without GPUDirect)."""

    name = "kvikio"

    def __init__(self, path: str, threads: int):
        import kvikio
        import kvikio.defaults
        if hasattr(kvikio.defaults, "set"):
            kvikio.defaults.set({"num_threads": threads})
        self.path = path
        self.o_direct = False
        self.file = kvikio.CuFile(path, "r")

    def read_into(self, dst: np.ndarray, offset: int) -> None:
        n = self.file.pread(dst, len(dst), offset).get()
        if n != len(dst):
            raise StreamingError(f"unexpected end of {self.path} at byte {offset + n}")

    def close(self) -> None:
        self.file.close()


# process_vm_readv(2) on this process: the kernel copies from the mapped pages (faulting them in
# from the page cache) and reports a page past the end of a truncated file as EFAULT or a short
# count, where a load from the map would be SIGBUS.
COPY_CHUNK = 64 << 20         # bytes per process_vm_readv call


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


@functools.lru_cache(maxsize=None)
def _process_vm_readv():
    """libc's process_vm_readv if it works in this process (one 8-byte copy tried), else None:
    missing from libc, ENOSYS, or refused by a seccomp filter (EPERM)."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).process_vm_readv
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong,
                   ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.c_ulong]
    src, dst = np.arange(8, dtype=np.uint8), np.zeros(8, np.uint8)
    local, remote = _IOVec(dst.ctypes.data, 8), _IOVec(src.ctypes.data, 8)
    works = fn(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) == 8
    return fn if works and np.array_equal(src, dst) else None


def copy_from_map(dst: np.ndarray, src_address: int, n: int) -> int:
    """Copy `n` bytes at `src_address` of this process (a memory map) into `dst` with process_vm_readv.

    A page that cannot be read (past the end of a file truncated under its map) ends the copy
    there, with no signal.

    Args:
      dst: C-contiguous uint8 array of at least `n` bytes.
      src_address: address of the first byte to copy.
      n: bytes to copy.
    Returns:
      The bytes copied: `n`, or fewer where the source stopped being readable.
    Raises:
      OSError: process_vm_readv is unavailable here, or failed other than with EFAULT.
    """
    fn = _process_vm_readv()
    if fn is None:
        raise OSError(errno.ENOSYS, "process_vm_readv is unavailable")
    if dst.dtype != np.uint8 or not dst.flags.c_contiguous or dst.nbytes < n:
        raise ValueError(f"dst must be a contiguous uint8 array of at least {n} bytes")
    pid, done = os.getpid(), 0
    while done < n:
        size = min(n - done, COPY_CHUNK)
        local, remote = _IOVec(dst.ctypes.data + done, size), _IOVec(src_address + done, size)
        got = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if err == errno.EFAULT:
                break
            raise OSError(err, os.strerror(err))
        if got == 0:
            break
        done += got
    return done


class MapReader:
    """Tier C in mmap mode: copies a layer's bytes out of the engine's memory map of the model file.

    The copy is `copy_from_map` (process_vm_readv): pages past the end of a file truncated under
    the map end the copy short instead of killing the process with SIGBUS, which no handler turns
    into an error. Where process_vm_readv does not work (old kernel, seccomp), the reader falls
    back to an fstat check of the file size followed by a plain copy; a truncation between the
    two is then still SIGBUS. Either way an fstat after the copy catches a cut inside the last
    page of the file, whose tail reads as zeros. The fd is opened beside the map, on the same
    inode: a file removed or renamed over while the engine runs keeps its pages and reads on; a
    file truncated in place shows its new size.
    """

    name = "mmap"
    o_direct = False

    def __init__(self, path: str, anchor: TensorInfo,
                 release: Callable[[int, int], None] | None = None):
        """`anchor`: any tensor of the mapped file; its view gives the map's address and keeps
        the map alive while the reader lives. `release(offset, length)`, if given, is called
        after each copy to drop the pages just read from this process's RSS (they stay in the
        page cache), so a pass over the streamed layers does not leave them all mapped."""
        self.path = path
        self._release = release
        self._anchor = anchor.data
        self._base = anchor.data.ctypes.data - anchor.offset     # address of file byte 0
        self.fd = os.open(path, os.O_RDONLY)

    def _check(self, end: int) -> None:
        size = os.fstat(self.fd).st_size
        if size < end:
            raise StreamingError(f"model file {self.path} was truncated while streaming "
                                 f"(it ends at byte {size}, the layer at byte {end})")

    def read_into(self, dst: np.ndarray, offset: int) -> None:
        """Fill dst (uint8) with the file's bytes from `offset`, copied from the map.

        Raises:
          StreamingError: the file no longer holds those bytes.
        """
        n, end = len(dst), offset + len(dst)
        if _process_vm_readv() is None:
            self._check(end)           # a truncation from here to the copy is still SIGBUS
            ctypes.memmove(dst.ctypes.data, self._base + offset, n)
            copied = n
        else:
            copied = copy_from_map(dst, self._base + offset, n)
        if self._release is not None:
            self._release(offset, n)
        self._check(end)
        if copied < n:
            raise StreamingError(f"model file {self.path}: cannot read byte {offset + copied} "
                                 f"from its memory map")

    def close(self) -> None:
        os.close(self.fd)
        self._anchor = None


def open_reader(path: str, options: TierOptions):
    if options.reader in ("auto", "kvikio") and jax.default_backend() == "gpu":
        try:
            return KvikioReader(path, options.read_threads)
        except Exception as e:  # noqa: BLE001 - kvikio missing or unusable: POSIX fallback
            if options.reader == "kvikio":
                raise InputError(f"reader='kvikio' is unavailable: {e}") from None
    return PosixReader(path, options.read_threads, options.o_direct)


# ---------------------------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class StreamStats:
    """Running totals of the scheduler; the engine reports differences of two snapshots."""

    wait_copy_s: float = 0.0
    wait_disk_s: float = 0.0
    bytes_ram: int = 0
    bytes_disk: int = 0
    disk_read_s: float = 0.0     # time the reader threads spent reading (summed over layers)

    def since(self, earlier: "StreamStats") -> "StreamStats":
        """What accumulated between the snapshot `earlier` and now."""
        return StreamStats(*(getattr(self, f.name) - getattr(earlier, f.name)
                             for f in dataclasses.fields(self)))


@dataclasses.dataclass(frozen=True)
class LayerSource:
    """Where a streamed layer's bytes are: a pinned-host pytree (B) or file ranges (C; tier "mmap":
    the same, copied out of the memory map)."""

    tier: str
    host_tree: object = None              # B: LayerWeights of numpy views of pinned memory
    span: tuple[int, int] = (0, 0)        # C: (file offset, length) covering the layer's tensors
    build: Callable | None = None         # C, mmap: staging uint8 view -> LayerWeights of numpy views
    finish: Callable | None = None        # C, mmap: device tree as read -> device tree as computed
    n_bytes: int = 0


class Streamer:
    """Issues the copies and reads of streamed layers `depth` layers ahead of their use.

    Slots: at most `depth` streamed layers are in flight besides the one computing; a new fetch
    waits for the compute that used the oldest slot (so device memory stays bounded). Tier "mmap"
    layers (the naive baseline) are fetched when used, through one staging buffer.
    """

    def __init__(self, sources: dict[int, LayerSource], device: jax.Device,
                 options: TierOptions, reader, staging_bytes: int,
                 staging: Sequence[np.ndarray] = ()):
        self.sources = sources
        self.order = sorted(sources)           # streamed layers, cyclic over tokens
        self.device = device
        self.depth = options.prefetch_depth
        self.mmap = options.streaming == "mmap"
        self._aliases_host = device.platform == "cpu"
        self.reader = reader
        self.stats = StreamStats()
        self._sharding = SingleDeviceSharding(device, memory_kind="device")
        self._inflight: dict[int, object] = {}     # layer -> device tree or Future
        self._done_markers: list = []              # outputs of finished streamed layers
        mapped = [s.span[1] for s in sources.values() if s.tier == "mmap"]
        if any(s.tier == "disk" for s in sources.values()):
            n_staging = self.depth + 1          # staging_bytes holds any span, mapped ones too
        else:
            n_staging, staging_bytes = (1, max(mapped)) if mapped else (0, 0)
        # Buffers handed over (the load's own staging) are used first, if large enough.
        reuse = [b for b in staging if b.nbytes >= staging_bytes][:n_staging]
        self._staging = reuse + [alloc_staging(staging_bytes) for _ in range(n_staging - len(reuse))]
        self._free_staging = list(range(n_staging))
        self._staging_lock = threading.Condition()
        self._io = cf.ThreadPoolExecutor(max_workers=max(1, self.depth), thread_name_prefix="ntj-fetch")
        self._closed = False

    # -- fetching --------------------------------------------------------------------------

    def _fetch_disk(self, layer: int):
        """Read a tier-C or mmap layer into a staging buffer and copy it to the device (waits)."""
        src = self.sources[layer]
        with self._staging_lock:
            while not self._free_staging:
                self._staging_lock.wait()
            slot = self._free_staging.pop()
        try:
            buf = self._staging[slot][:src.span[1]]
            t = time.perf_counter()
            try:
                self.reader.read_into(buf, src.span[0])
            except OSError as e:
                raise StreamingError(f"cannot read layer {layer} from {self.reader.path}: "
                                     f"{e.strerror or e}") from None
            except StreamingError as e:
                raise StreamingError(f"layer {layer}: {e}") from None
            self.stats.disk_read_s += time.perf_counter() - t
            host = src.build(buf)
            if self._aliases_host:
                # The CPU backend may alias numpy memory instead of copying: detach from staging.
                host = jax.tree_util.tree_map(np.array, host)
            tree = jax.device_put(host, self._sharding)
            if src.finish is not None:
                tree = src.finish(tree)
            jax.block_until_ready(tree)             # staging reusable only once copied
            return tree
        finally:
            with self._staging_lock:
                self._free_staging.append(slot)
                self._staging_lock.notify()

    def read_now(self, layer: int):
        """An mmap- or disk-tier layer on the device, read through the tier's reader (out of the
        memory map, or from the file) into staging and copied now (synchronously).

        Raises:
          StreamingError: the model file no longer holds the layer (truncated), naming both.
        """
        return self._fetch_disk(layer)

    def _issue(self, layer: int) -> None:
        src = self.sources[layer]
        if src.tier == "mmap":
            # The baseline: read from the memory map and copy now, synchronously.
            t = time.perf_counter()
            self._inflight[layer] = self.read_now(layer)
            self.stats.wait_disk_s += time.perf_counter() - t
            self.stats.bytes_disk += src.n_bytes
        elif src.tier == "ram":
            # Numpy views of pinned memory (`pin_tree`): an asynchronous DMA, issued here.
            self._inflight[layer] = jax.device_put(src.host_tree, self._sharding)
            self.stats.bytes_ram += src.n_bytes
        else:
            self._inflight[layer] = self._io.submit(self._fetch_disk, layer)
            self.stats.bytes_disk += src.n_bytes

    def prefetch_from(self, layer: int) -> None:
        """Make sure the fetches of the next `depth` streamed layers from `layer` on are issued."""
        if not self.order or self.mmap:
            return
        # Streamed layers at or after `layer` in cyclic order, `depth` of them.
        start = next((k for k, l in enumerate(self.order) if l >= layer), 0)
        want = [self.order[(start + k) % len(self.order)] for k in range(min(self.depth, len(self.order)))]
        for l in want:
            if l not in self._inflight:
                # Bound device memory to depth + 1 layer slots: wait for the oldest streamed
                # compute still running before issuing another copy.
                self._done_markers = [m for m in self._done_markers if not m.is_ready()]
                while self._done_markers and len(self._inflight) + len(self._done_markers) >= self.depth + 1:
                    jax.block_until_ready(self._done_markers.pop(0))
                self._issue(l)

    def take(self, layer: int):
        """The device weights of streamed `layer` (waits for its read/copy)."""
        if layer not in self._inflight:
            self._issue(layer)
        item = self._inflight.pop(layer)
        if isinstance(item, cf.Future):
            t = time.perf_counter()
            try:
                item = item.result()
            finally:
                self.stats.wait_disk_s += time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(item)
        self.stats.wait_copy_s += time.perf_counter() - t
        return item

    def computed(self, marker) -> None:
        """Record the output of a streamed layer's compute (its slot frees when it is ready)."""
        if not self.mmap:    # mmap copies are synchronous: nothing waits on the markers there
            self._done_markers.append(marker)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for item in self._inflight.values():
            if isinstance(item, cf.Future):
                item.cancel()
        self._io.shutdown(wait=True)
        self._inflight.clear()
        if self.reader is not None:
            self.reader.close()
