"""The three-tier weight store: placement, host/disk storage and the prefetching scheduler.

Tier A ("vram"): layer weights resident in device memory.
Tier B ("ram"): layer weights as JAX arrays in `pinned_host` memory, copied to the device with
  `jax.device_put` a few layers ahead of use.
Tier C ("disk"): the layer's byte ranges in the GGUF file, read on a thread pool (KvikIO where
  CUDA and kvikio are present, `os.preadv` otherwise) into reusable staging buffers (pinned when
  cupy can allocate pinned memory), then copied to the device.

Placement puts as many layers as fit in A, then B, the rest in C, and spreads the streamed layers
evenly through the stack: a streamed layer's copy then overlaps the compute of the resident layers
before it, so copies and compute run side by side all through the token. With streamed layers in
index order (all at the end), the resident layers finish with at most `depth` copies in flight and
the tail runs at PCIe speed with the compute idle: about the resident compute time slower per token.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import os
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from ntransformer_jax.errors import InputError, NTransformerError

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

    def __post_init__(self):
        for name in ("vram_budget_gb", "ram_budget_gb"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and np.isfinite(v)):
                raise InputError(f"{name}={v} must be a non-negative number of GB")
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


def free_device_memory(device: jax.Device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


PINNED_POOL_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
PINNED_POOL_SLACK_GB = 2


def limit_pinned_pool(ram_budget_gb: float | None) -> str | None:
    """Cap XLA's pinned-host pool at the RAM budget plus PINNED_POOL_SLACK_GB.

    Tier B lives in `pinned_host` arrays, which XLA carves from a BFC pool that grows by
    doubling regions up to 64 GB (its default cap); pinned pages count in RSS (RssShmem), so
    19 GB of tier B showed as 52 GB of RSS. The cap (the environment variable PINNED_POOL_ENV,
    in whole GB) only takes effect if it is set before JAX starts its GPU backend, so the CLI
    and benchmarks call this first; an existing setting is left alone. Returns the value used.
    """
    if PINNED_POOL_ENV in os.environ or ram_budget_gb is None or ram_budget_gb <= 0:
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
                   slot_bytes: int) -> Plan:
    """Place layers in VRAM, RAM and disk within the budgets.

    Args:
      layer_bytes: bytes of each layer's weights.
      device_working_set: device bytes needed whatever the placement (cache, globals, workspace).
      staging_bytes: host bytes per tier-C staging slot.
      options: budgets and caps.
      free_vram / avail_ram: measured free memory (None: unknown, then unlimited).
      slot_bytes: device bytes of one prefetch slot (the largest layer).
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
    base = sum(device_working_set.values())

    # Device: how many layers fit beside the working set (with slots if anything streams).
    max_a = n if options.max_vram_layers is None else min(n, options.max_vram_layers)
    order = sorted(range(n), key=lambda i: layer_bytes[i])
    n_a = 0
    for k in range(max_a, -1, -1):
        slots = 0 if k == n else (depth + 1) * slot_bytes
        if base + slots + sum(layer_bytes[i] for i in order[:k]) <= vram_budget:
            n_a = k
            break
    else:
        need = base + (depth + 1) * slot_bytes
        raise InputError(f"vram_budget_gb={vram_budget / 1e9:.2f} is too small for the working set "
                         f"(KV cache, embeddings, output head, {depth + 1} layer slots, workspace): "
                         f"the minimum is {need / 1e9:.2f} GB")
    dev_ws = dict(device_working_set)
    if n_a < n:
        dev_ws["prefetch_slots"] = (depth + 1) * slot_bytes

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

    # Which layers: the streamed ones spread evenly, disk ones spread among those.
    tiers = ["vram"] * n
    streamed = spread(n, n_rest)
    for j, i in enumerate(streamed):
        tiers[i] = "ram"
    for j in spread(len(streamed), n_rest - n_b):
        tiers[streamed[j]] = "disk"
    return Plan(tuple(tiers), tuple(int(b) for b in layer_bytes), dev_ws, host_ws,
                int(vram_budget), int(ram_budget))


# ---------------------------------------------------------------------------------------------
# Tier C readers
# ---------------------------------------------------------------------------------------------

def alloc_staging(n_bytes: int) -> np.ndarray:
    """A page-aligned uint8 host buffer, pinned (page-locked) when cupy can provide it."""
    try:
        import cupy  # noqa: F401  (present on CUDA machines)
        mem = cupy.cuda.alloc_pinned_memory(n_bytes + ALIGN)
        buf = np.frombuffer(mem, np.uint8, n_bytes + ALIGN)
        off = (-buf.ctypes.data) % ALIGN
        return buf[off:off + n_bytes]   # the view's buffer export keeps `mem` alive, no longer
    except Exception:  # noqa: BLE001 - no cupy / no CUDA driver: plain aligned memory
        raw = np.empty(n_bytes + ALIGN, np.uint8)
        off = (-raw.ctypes.data) % ALIGN
        return raw[off:off + n_bytes]



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


class MapGuard:
    """Tier C in mmap mode: checks that the model file still holds a layer before its pages are read.

    Touching mapped pages past the end of a file truncated under the map kills the process with
    SIGBUS, which no handler turns into an error; one fstat per layer read raises a StreamingError
    instead. The fd is opened beside the map, on the same inode: a file removed or renamed over
    while the engine runs keeps its pages and reads on; a file truncated in place shows its new size.
    """

    name = "mmap"

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def check(self, layer: int, end: int) -> None:
        """Raise StreamingError unless the file holds bytes up to `end` (layer's last byte + 1)."""
        size = os.fstat(self.fd).st_size
        if size < end:
            raise StreamingError(f"layer {layer}: model file {self.path} was truncated while streaming "
                                 f"(it ends at byte {size}, the layer at byte {end})")

    def close(self) -> None:
        os.close(self.fd)


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
    """Where a streamed layer's bytes are: a pinned-host pytree (B) or file ranges (C)."""

    tier: str
    host_tree: object = None              # B: LayerWeights of pinned_host arrays
    span: tuple[int, int] = (0, 0)        # C: (file offset, length) covering the layer's tensors
    build: Callable | None = None         # C: staging uint8 view -> LayerWeights of numpy views;
                                          # mmap: () -> LayerWeights of views of the map
    n_bytes: int = 0


class Streamer:
    """Issues the copies and reads of streamed layers `depth` layers ahead of their use.

    Slots: at most `depth` streamed layers are in flight besides the one computing; a new fetch
    waits for the compute that used the oldest slot (so device memory stays bounded).
    """

    def __init__(self, sources: dict[int, LayerSource], device: jax.Device,
                 options: TierOptions, reader, staging_bytes: int):
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
        n_staging = self.depth + 1 if any(s.tier == "disk" for s in sources.values()) else 0
        self._staging = [alloc_staging(staging_bytes) for _ in range(n_staging)]
        self._free_staging = list(range(n_staging))
        self._staging_lock = threading.Condition()
        self._io = cf.ThreadPoolExecutor(max_workers=max(1, self.depth), thread_name_prefix="ntj-fetch")
        self._closed = False

    # -- fetching --------------------------------------------------------------------------

    def _fetch_disk(self, layer: int):
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
            jax.block_until_ready(tree)             # staging reusable only once copied
            return tree
        finally:
            with self._staging_lock:
                self._free_staging.append(slot)
                self._staging_lock.notify()

    def read_mapped(self, layer: int):
        """An mmap-tier layer as host arrays viewing the map, once the file is known to hold it."""
        src = self.sources[layer]
        self.reader.check(layer, src.span[0] + src.span[1])
        return src.build()

    def _issue(self, layer: int) -> None:
        src = self.sources[layer]
        if src.tier == "mmap":
            # The baseline: read from the memory map and copy now, synchronously.
            t = time.perf_counter()
            tree = jax.device_put(self.read_mapped(layer), self._sharding)
            jax.block_until_ready(tree)
            self.stats.wait_disk_s += time.perf_counter() - t
            self._inflight[layer] = tree
            self.stats.bytes_disk += src.n_bytes
        elif src.tier == "ram":
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
