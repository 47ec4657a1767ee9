"""The Engine: a loaded model with its tokenizer, KV cache and generation loop.

    engine = ntransformer_jax.load("model.gguf", ctx_size=2048)
    for piece in engine.generate("The capital of France is", max_new_tokens=16, temperature=0):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import dataclasses
import logging
import functools
import os
import secrets
import time
from typing import Callable, Iterable, Iterator, Sequence

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from ntransformer_jax import model as M
from ntransformer_jax.kernels import attention, norm, qmatvec, rope_cache
from ntransformer_jax.errors import InputError, ModelFileError, NTransformerError, one_line
from ntransformer_jax.model_file import LAYER_TENSORS, LlamaConfig, ModelFile, TensorInfo
from ntransformer_jax.sampling import SamplingParams, sample
from ntransformer_jax.speculative import (ResidentLayersDraft, SpeculativeStats, check_compatible,
                                          speculative_tokens)
from ntransformer_jax.placement import is_layered, layer_span, plan_for, staging_bytes
from ntransformer_jax.tiers import (LayerSource, MapReader, Streamer, StreamStats, TierOptions,
                                    alloc_staging, available_ram, free_device_memory, open_reader,
                                    pin_tree, pinned_empty, StreamingError)
from ntransformer_jax.tokenizer import Tokenizer, decode_stream

DEFAULT_CTX = 4096
MIN_PREFILL_BUCKET = 16
# Bytes of one stacked weight array at most: the Pallas Triton kernels address their operands
# with 32-bit offsets (a 70B model's stacked feed-forward weights are 9 GB), so longer runs of
# resident layers are split into several scanned segments.
MAX_STACK_BYTES = (1 << 31) - 1
MAX_PREFILL_CHUNK = 512
# Resident prefill chunks longer than the decode kernels' rows run layer by layer through the
# layered path's `block` (logits bit-identical across placements); False: one dispatch over the
# stacked layers. Read per call; benchmarks/prefill_probe.py compares the two.
LAYERWISE_PREFILL = True

_FLOAT_DTYPES = {
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.BF16: jnp.bfloat16,
}


@dataclasses.dataclass
class GenerationStats:
    """Figures of the last `generate` call."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0
    stop_reason: str = ""   # "eog", "max_new_tokens" or "ctx_size"
    # Streaming during decode (layered path), summed over the decode steps.
    stream: StreamStats = dataclasses.field(default_factory=StreamStats)

    def per_token(self) -> dict:
        """Decode figures per generated token: seconds computing / waiting, bytes per tier, GB/s."""
        n = max(self.generated_tokens - 1, 0)
        if n == 0 or not self.generate_seconds:
            return {}
        s = self.stream
        t = self.generate_seconds / n
        wc, wd = s.wait_copy_s / n, s.wait_disk_s / n
        return {
            "token_s": t, "compute_s": max(t - wc - wd, 0.0), "wait_copy_s": wc, "wait_disk_s": wd,
            "bytes_ram": s.bytes_ram / n, "bytes_disk": s.bytes_disk / n,
            "ram_gbps": s.bytes_ram / n / t / 1e9, "disk_gbps": s.bytes_disk / n / t / 1e9,
        }

    @property
    def prompt_tok_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generate_tok_per_s(self) -> float:
        # The first generated token comes from the prefill, so it is not counted here.
        n = max(self.generated_tokens - 1, 0)
        return n / self.generate_seconds if self.generate_seconds else 0.0


def _prng_key(seed: int | None, device: jax.Device) -> jax.Array:
    """The sampling key on `device`: from `seed`, or random when it is None or negative.

    Placed (committed) like the step outputs that replace it, so the first decode step and
    the later ones share one compiled function: an uncommitted key (or window) makes the second
    step compile the whole step again (seen as a second slow token)."""
    if seed is not None and (not isinstance(seed, (int, np.integer)) or seed >= 1 << 63):
        raise InputError(f"seed={seed!r} must be an integer below 2**63 (negative: random)")
    key = jax.random.key(secrets.randbits(63) if seed is None or seed < 0 else int(seed))
    return jax.device_put(key, device)


def _recent_window(histories: Sequence[np.ndarray], params: SamplingParams) -> np.ndarray:
    """[B, W] the last `repeat_last_n` tokens of each history, right-aligned, -1 where none."""
    window = max(params.repeat_last_n, 1)
    recent = np.full((len(histories), window), -1, np.int32)
    for i, h in enumerate(histories):
        tail = h[-params.repeat_last_n:] if params.repeat_last_n else h[:0]
        recent[i, window - len(tail):] = tail
    return recent


def _to_host_array(info: TensorInfo) -> np.ndarray:
    """The tensor's bytes as a numpy array of the layout `QTensor` expects."""
    dtype = _FLOAT_DTYPES.get(info.qtype)
    raw = np.asarray(info.data)
    if dtype is not None:
        raw = raw.reshape(-1).view(np.uint8).view(dtype)
        return raw.reshape(info.shape)
    rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
    return raw.reshape(rows, -1)


def _layer_from_arrays(parts: dict) -> M.LayerWeights:
    """LayerWeights from {short name: (TensorInfo, host array)}; norms become float32 vectors."""
    out = {}
    for short, (info, arr) in parts.items():
        if short.endswith("norm"):
            out[short] = np.asarray(arr, dtype=np.float32).reshape(-1) if info.qtype in _FLOAT_DTYPES \
                else np.asarray(M.QTensor(arr, info.qtype, info.shape[-1]).dequantize()).reshape(-1)
        else:
            out[short] = M.QTensor(arr, info.qtype, info.shape[-1])
    return M.LayerWeights(**out)


def _layer_from_staging(f: ModelFile, i: int, span_start: int, buf: np.ndarray) -> M.LayerWeights:
    """Layer i as numpy views into a staging buffer holding the file from `span_start`."""
    parts = {}
    for short in LAYER_TENSORS:
        info = f.layer_tensor(i, short)
        raw = buf[info.offset - span_start: info.offset - span_start + info.n_bytes]
        parts[short] = (info, _to_host_array(dataclasses.replace(info, data=raw)))
    return _layer_from_arrays(parts)


@jax.jit
def _stack_entry(tree, j: jax.Array):
    """Entry j of every array of a stacked tree (one layer of a segment, or of its cache)."""
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, j, 0, keepdims=False),
                                  tree)


@functools.partial(jax.jit, donate_argnums=0)
def _set_stack_entry(stack, entry, j: jax.Array):
    """`stack` with entry j replaced by `entry`, in place (the stack is donated)."""
    return jax.tree_util.tree_map(
        lambda a, e: jax.lax.dynamic_update_index_in_dim(a, e, j, 0), stack, entry)


@functools.partial(jax.jit, donate_argnums=0)
def _put_and_take(stack, entry, j: jax.Array, seg, k: jax.Array):
    """(`stack` with entry j replaced by `entry`, in place; entry k of `seg` and of the result)."""
    stack = _set_stack_entry(stack, entry, j)
    return stack, _stack_entry((seg, stack), k)


class Engine:
    """A model ready to run. Create with `ntransformer_jax.load`."""

    def __init__(self, model_file: ModelFile, *, ctx_size: int | None = None,
                 device: jax.Device | None = None, tier_options: TierOptions | None = None,
                 progress: Callable[[int, int], None] | None = None, kernels: str = "auto",
                 matmul: str = "f32"):
        self.model_file = model_file
        self.config: LlamaConfig = model_file.config
        try:
            self.tokenizer = Tokenizer.from_metadata(model_file.metadata)
        except ModelFileError as e:   # name the file, as the model file's own errors do
            raise ModelFileError(f"{os.path.basename(model_file.path)}: {e}") from None
        except (ValueError, TypeError, OverflowError, IndexError, KeyError) as e:  # a corrupt vocabulary
            raise ModelFileError(f"{os.path.basename(model_file.path)}: bad tokenizer metadata "
                                 f"({type(e).__name__}: {e})") from e
        if ctx_size is None or ctx_size == 0:
            ctx_size = min(self.config.ctx_train, DEFAULT_CTX)
        if ctx_size < 1:
            raise InputError(f"ctx_size={ctx_size} must be positive")
        self.ctx_size = int(ctx_size)
        self.device = device or jax.devices()[0]
        self.tier_options = tier_options or TierOptions()
        self.kernels = _kernel_mode(kernels, self.device)
        if self.kernels != "off":
            self._check_kernels(explicit=kernels != "auto")
        if matmul not in M.MATMUL_TYPES:
            raise InputError(f"matmul={matmul!r} must be one of {', '.join(M.MATMUL_TYPES)}")
        self.matmul = matmul
        self._progress = progress
        self.streamer: Streamer | None = None
        self.draft: "Engine | None" = None       # speculative decoding, see `load(draft_model=...)`
        self.draft_k = 4
        self.spec_stats = SpeculativeStats()
        self._load_weights()
        try:
            self._caches = self._new_caches()
        except jax.errors.JaxRuntimeError as err:
            cfg = self.config
            need = 2 * cfg.n_layers * self.ctx_size * cfg.kv_dim * 4
            raise NTransformerError(f"cannot allocate the KV cache for ctx_size={self.ctx_size} "
                                    f"({need / 1e9:.2f} GB): {str(err).splitlines()[0][:120]}") from None
        self._cached: list[int] = []
        self._layer_ids: list[jax.Array] | None = None
        self.last_stats = GenerationStats()

    # -- loading ---------------------------------------------------------------------------

    def _put(self, info: TensorInfo) -> jax.Array:
        return self._to_device(_to_host_array(info))

    def _to_device(self, tree):
        """Host arrays to the device; on a GPU through pinned staging (`pin_tree`): a direct
        DMA, where pageable memory would be staged through XLA's pinned-host pool, which keeps
        what it grows to in this process's RSS."""
        if self.device.platform != "cpu":
            tree = pin_tree(tree)
        return jax.device_put(tree, self.device)

    def _release_layer_pages(self, i: int) -> None:
        """Drop layer i's file pages from this process's RSS once its copy is placed (GPU only:
        on the CPU backend device arrays may alias the map)."""
        if self.device.platform != "cpu":
            self.model_file.release_range(*layer_span(self.model_file, i))

    def _qtensor(self, info: TensorInfo, pack: bool = True) -> M.QTensor:
        w = M.QTensor(self._put(info), info.qtype, info.shape[-1])
        return M.pack(w, self.kernels if pack else "off", self.matmul)

    def _vector(self, info: TensorInfo) -> jax.Array:
        return self._qtensor(info, pack=False).dequantize().reshape(-1)

    def _host_layer(self, i: int, pack: bool = False) -> M.LayerWeights:
        """Layer i as numpy arrays (views of the memory map for matrices; with `pack`, matrices
        the decode kernel takes are repacked into new arrays, see `model.pack`)."""
        w = _layer_from_arrays({short: (self.model_file.layer_tensor(i, short),
                                        _to_host_array(self.model_file.layer_tensor(i, short)))
                                for short in LAYER_TENSORS})
        return M.pack_layer(w, self.kernels if pack else "off", self.matmul)

    def _check_kernels(self, explicit: bool) -> None:
        """Run each kernel type the model needs once on a small matrix; if one fails, use XLA
        (with a warning) under kernels="auto", or fail with the reason when they were asked for."""
        f = self.model_file
        infos = [f.layer_tensor(i, s) for i in range(self.config.n_layers) for s in LAYER_TENSORS]
        infos += [f.tensors[n] for n in ("token_embd.weight", "output.weight") if n in f.tensors]
        types = sorted({int(t.qtype) for t in infos if t.qtype in qmatvec.SUPPORTED_TYPES})
        cfg, interpret = self.config, self.kernels == "interpret"
        try:
            for t in types:
                qmatvec.self_test(gguf.GGMLQuantizationType(t), interpret=interpret)
            if attention.supports(1, cfg.n_head, cfg.n_kv_head, cfg.head_dim):
                attention.self_test(cfg.n_head, cfg.n_kv_head, cfg.head_dim, interpret=interpret)
            if rope_cache.supports(1, cfg.n_head, cfg.n_kv_head, cfg.head_dim):
                rope_cache.self_test(cfg.n_head, cfg.n_kv_head, cfg.head_dim, interpret=interpret)
                if M.FUSE_ROPE_ATTENTION and attention.supports_rope(
                        1, cfg.n_head, cfg.n_kv_head, cfg.head_dim):   # (it replaces both)
                    self._check_fused_rope(interpret)
            if norm.supports(1, cfg.n_embd):
                norm.self_test(cfg.n_embd, interpret=interpret)
        except Exception as e:   # noqa: BLE001 -- any compile or runtime failure means "no kernels"
            reason = one_line(e)
            if explicit:
                raise NTransformerError(f"the decode kernels do not run here ({reason})") from e
            logging.warning("decode kernels unavailable (%s); using XLA", reason)
            self.kernels = "off"

    def _check_fused_rope(self, interpret: bool) -> None:
        """`attention.rope_self_test`; where the fused kernel fails, the two kernels it replaces
        (which passed theirs) run instead, process-wide, with a warning."""
        cfg = self.config
        try:
            attention.rope_self_test(cfg.n_head, cfg.n_kv_head, cfg.head_dim, interpret=interpret)
        except Exception as e:   # noqa: BLE001 -- any failure: keep rope_cache + decode_attention
            reason = one_line(e)
            logging.warning("the fused rope + attention kernel fails here (%s); using two"
                            " kernels", reason)
            M.FUSE_ROPE_ATTENTION = False
            jax.clear_caches()

    def _staged_layer(self, i: int, span_start: int, buf: np.ndarray) -> M.LayerWeights:
        """A disk-tier layer as read (file bytes, numpy views of staging): it moves to the
        device as is and is repacked there (`_pack_on_device`)."""
        return M.pack_layer(_layer_from_staging(self.model_file, i, span_start, buf), "off",
                            self.matmul)

    @functools.cached_property
    def _pack_on_device(self) -> Callable | None:
        """Disk-tier layers, copied to the device as stored in the file, repacked there for the
        decode kernels by the same `pack_layer` that packs resident and RAM layers at load (on the
        CPU): the same bits, so logits do not depend on placement, and no host CPU per fetch.
        None with the kernels off (nothing to repack)."""
        if self.kernels == "off":
            return None
        return jax.jit(functools.partial(M.pack_layer, kernel=self.kernels, matmul=self.matmul))

    def _load_weights(self) -> None:
        f, cfg, opts = self.model_file, self.config, self.tier_options
        self.plan = plan_for(f, self.ctx_size, opts, free_device_memory(self.device), available_ram(),
                             prefill_chunk=MAX_PREFILL_CHUNK, packed=self.kernels != "off")
        layer_bytes = list(self.plan.layer_bytes)
        self.placement = list(self.plan.tiers)
        self.layered = is_layered(self.plan, opts)
        # The globals first, their file pages dropped at once: their transit through host memory
        # does not add to the layers' (host RSS peaks below the RAM budget + the runtime's).
        self._load_globals()
        if not self.layered:
            self._load_resident_segments(layer_bytes)
        else:
            self._load_layered(layer_bytes)
        if self.device.platform != "cpu":
            # Everything placed is now a copy (device or pinned host): drop the file pages this
            # process touched from its RSS. (On CPU the arrays may alias the map: keep it.)
            jax.block_until_ready(jax.tree_util.tree_leaves((self.globals, getattr(self, "resident", {}),
                                                             getattr(self, "segments", ()))))
            f.release_pages()

    def _load_globals(self) -> None:
        f, cfg = self.model_file, self.config
        embd = self._qtensor(f.tensor("token_embd.weight"))
        output = embd if cfg.tied_output else self._qtensor(f.tensor("output.weight"))
        factors = (np.asarray(_to_host_array(f.tensor("rope_freqs.weight")), np.float32).reshape(-1)
                   if cfg.has_rope_freqs else None)
        self.globals = M.GlobalWeights(
            token_embd=embd,
            output_norm=self._vector(f.tensor("output_norm.weight")),
            output=output,
            rope_inv_freq=jax.device_put(M.rope_inv_freq(cfg, factors), self.device),
        )
        # Every layer's attention norm, then the output norm: entry i + 1 is the norm that layer
        # i's block applies to its output (`model.block_step`), wherever layer i + 1 is placed.
        self.norms = [self._vector(f.layer_tensor(i, "attn_norm")) for i in range(cfg.n_layers)]
        self.norms.append(self.globals.output_norm)
        out = f.layer_tensor(0, "attn_output")
        # The first layer's norm runs before its block, with the kernel its block's norms take.
        self._first_kernel = M.packed_kernel(out.qtype, out.shape[0], out.shape[-1], self.kernels)
        if self.device.platform != "cpu":
            jax.block_until_ready(self.globals)
            for name in ("token_embd.weight", "output.weight"):
                if name in f.tensors:
                    info = f.tensors[name]
                    f.release_range(info.offset, info.n_bytes)

    def _load_layered(self, layer_bytes: list[int]) -> None:
        """Place each layer in its tier and start the streamer.

        Where anything streams, VRAM and RAM layers are read like disk-tier layers: through the
        tier's reader into one staging buffer (later the streamer's first slot), copied to the
        device and repacked there (`_pack_on_device`); RAM layers then come back into their
        pinned buffer one array at a time (`pin_tree`). Host memory thus holds no layer in
        transit beyond that staging buffer (repacking on the host took three copies of a layer
        at once), and device memory no more than the prefetch slots it later hands to the
        streamer. With nothing streamed (no slots to borrow) layers are repacked on the host as
        the resident path does.
        """
        f, opts = self.model_file, self.tier_options
        spans = [layer_span(f, i) for i in range(self.config.n_layers)]
        staging = staging_bytes(spans)
        self.resident: dict[int, M.LayerWeights] = {}
        sources: dict[int, LayerSource] = {}
        streams = any(t != "vram" for t in self.placement)
        needs_reader = any(t == "disk" for t in self.placement) and opts.streaming != "mmap"
        reader = open_reader(f.path, opts) if needs_reader else None
        load_reader = reader if reader is not None else (open_reader(f.path, opts) if streams else None)
        load_buf = alloc_staging(staging) if streams else None
        total, done = sum(layer_bytes), 0
        try:
            for i, tier in enumerate(self.placement):
                if tier in ("vram", "ram") and streams:
                    tree = self._read_layer(i, spans[i], load_reader, load_buf, device=tier == "vram"
                                            or self._pack_on_device is not None)
                    if tier == "vram":
                        self.resident[i] = tree
                    else:       # from the device or from staging, into its own pinned buffer
                        sources[i] = LayerSource("ram", host_tree=pin_tree(tree), n_bytes=layer_bytes[i])
                        del tree
                elif tier == "vram":
                    self.resident[i] = jax.block_until_ready(self._to_device(self._host_layer(i, pack=True)))
                    self._release_layer_pages(i)
                elif opts.streaming == "mmap":
                    infos = [f.layer_tensor(i, s) for s in LAYER_TENSORS]
                    start = min(t.offset for t in infos)
                    end = max(t.offset + t.n_bytes for t in infos)   # exact: within the map
                    sources[i] = LayerSource("mmap", span=(start, end - start), n_bytes=layer_bytes[i],
                                             build=functools.partial(self._staged_layer, i, start),
                                             finish=self._pack_on_device)
                else:
                    sources[i] = LayerSource("disk", span=spans[i], n_bytes=layer_bytes[i],
                                             build=functools.partial(self._staged_layer, i, spans[i][0]),
                                             finish=self._pack_on_device)
                done += layer_bytes[i]
                if self._progress:
                    self._progress(done, total)
        finally:
            if load_reader is not None and load_reader is not reader:
                load_reader.close()
        mapped = any(s.tier == "mmap" for s in sources.values())
        if mapped:
            reader = MapReader(f.path, f.tensor("token_embd.weight"),
                               release=f.release_range if self.device.platform != "cpu" else None)
        self.streamer = Streamer(sources, self.device, opts, reader, staging,
                                 staging=() if load_buf is None else (load_buf,))

    def _read_layer(self, i: int, span: tuple[int, int], reader, buf: np.ndarray, device: bool):
        """Layer i read through `reader` into staging `buf`: on the device and repacked there
        (`device`), else (kernels off, a RAM layer) pinned on the host as read."""
        view = buf[:span[1]]
        try:
            reader.read_into(view, span[0])
        except OSError as e:
            raise ModelFileError(f"cannot read layer {i} from {self.model_file.path}: "
                                 f"{e.strerror or e}") from None
        except StreamingError as e:
            raise ModelFileError(f"layer {i}: {e}") from None
        host = self._staged_layer(i, span[0], view)
        if not device:
            return host                         # views of staging: the caller copies them
        if self.device.platform == "cpu":       # the CPU backend may alias: detach from staging
            host = jax.tree_util.tree_map(np.array, host)
        tree = jax.device_put(host, self.device)
        if self._pack_on_device is not None:
            tree = self._pack_on_device(tree)
        return jax.block_until_ready(tree)      # staging reusable only once copied

    def _load_resident_segments(self, layer_bytes: list[int]) -> None:
        # Consecutive layers with the same weight signature (types and shapes) form a segment,
        # stacked on a leading axis and run by one lax.scan: one dispatch for all layers. Each
        # segment is filled layer by layer into one preallocated host stack (repacked on the
        # way), so host memory peaks at one segment, not two (a 70B model is 40 GB); segments
        # stay under MAX_STACK_BYTES per array.
        signature = lambda w: (jax.tree_util.tree_structure(w),
                               tuple((np.shape(x), np.asarray(x).dtype)
                                     for x in jax.tree_util.tree_leaves(w)))
        n_layers = self.config.n_layers
        sigs = [signature(self._host_layer(i)) for i in range(n_layers)]   # views: no reads
        bounds = [0] + [i for i in range(1, n_layers) if sigs[i] != sigs[i - 1]] + [n_layers]
        total, done = sum(layer_bytes), 0
        segments, sizes = [], []
        for start, end in zip(bounds, bounds[1:]):
            i = start
            while i < end:        # one chunk of the run per stack that the kernels can address
                leaves, tree = jax.tree_util.tree_flatten(self._host_layer(i, pack=True))
                biggest = max(np.asarray(a).nbytes for a in leaves)
                n = max(1, min(end - i, MAX_STACK_BYTES // max(biggest, 1)))
                empty = np.empty if self.device.platform == "cpu" else pinned_empty
                stack = [empty((n, *np.shape(a)), np.asarray(a).dtype) for a in leaves]
                for j in range(i, i + n):
                    if j > i:
                        leaves = jax.tree_util.tree_leaves(self._host_layer(j, pack=True))
                    for dst, a in zip(stack, leaves):
                        dst[j - i] = a
                    self._release_layer_pages(j)
                    done += layer_bytes[j]
                    if self._progress:
                        self._progress(done, total)
                # Pinned stacks: a direct DMA (see `_to_device`); waited for, so the next
                # segment's stack can reuse the pinned blocks.
                segments.append(jax.block_until_ready(
                    jax.device_put(jax.tree_util.tree_unflatten(tree, stack), self.device)))
                sizes.append(n)
                del stack, leaves
                i += n
        self.segments = tuple(segments)
        self.segment_sizes = tuple(sizes)
        starts = np.cumsum((0, *sizes)).tolist()
        self.next_norms = tuple(jnp.stack(self.norms[a + 1:a + n + 1])
                                for a, n in zip(starts, sizes))

    def _new_caches(self, batch: int = 1):
        cfg = self.config
        zeros = lambda *lead: jnp.zeros((*lead, batch, self.ctx_size, cfg.n_kv_head, cfg.head_dim),
                                        jnp.float32, device=self.device)
        if self.layered:
            return [M.KVCache(zeros(), zeros()) for _ in range(cfg.n_layers)]
        return tuple(M.KVCache(zeros(n), zeros(n)) for n in self.segment_sizes)

    def layer_weights(self, i: int) -> M.LayerWeights:
        """Layer i's weights on the device (for streamed layers: a fresh copy)."""
        if self.layered:
            if i in self.resident:
                return self.resident[i]
            src = self.streamer.sources[i]
            if src.tier in ("mmap", "disk"):
                # Through the tier's reader into staging, never from views of the map: a file
                # truncated under us is a StreamingError, not a SIGBUS.
                return self.streamer.read_now(i)
            return jax.device_put(src.host_tree, self.device)
        for seg, n in zip(self.segments, self.segment_sizes):
            if i < n:
                return jax.tree_util.tree_map(lambda a: a[i], seg)
            i -= n
        raise IndexError(i)

    def close(self) -> None:
        """Stop the streaming threads and release the file."""
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights in their GGUF encoding, wherever they are placed (each read once per
        decoded token); the tied embedding/output matrix counts once."""
        leaves = {id(x): x for x in jax.tree_util.tree_leaves(self.globals)}
        return sum(self.plan.layer_bytes) + sum(int(x.size * x.dtype.itemsize) for x in leaves.values())

    # -- tokenizer ---------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, with llama.cpp's `llama_tokenize` meaning of the two flags."""
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    # -- forward ---------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        if isinstance(ids, (str, bytes)):
            raise InputError("token ids must be a sequence of integers, not text (see tokenize)")
        raw = np.asarray(list(ids))
        if raw.size and (raw.dtype.kind not in "iu" or raw.ndim != 1):
            raise InputError("token ids must be a flat sequence of integers"
                             + (f" (got {raw.dtype} values)" if raw.ndim == 1 else ""))
        arr = raw.astype(np.int64)
        if arr.ndim != 1:
            raise InputError("token ids must be a flat sequence of integers")
        if arr.size and (arr.min() < 0 or arr.max() >= self.config.n_vocab):
            bad = int(arr[(arr < 0) | (arr >= self.config.n_vocab)][0])
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.config.n_vocab})")
        return arr.astype(np.int32)

    def _forward(self, ids: np.ndarray, pos: int, all_logits: bool,
                 lengths: np.ndarray | None = None) -> jax.Array:
        """Run ids ([T], or [B, T] right-padded with `lengths` [B]) from `pos`, updating the cache.

        Returns logits [T, V] for every position when `all_logits` (B = 1), else [B, V] at each
        row's last real token. The prompt goes in chunks padded to power-of-two buckets so few
        shapes are compiled; padded slots write cache entries past a row's last real token, which
        are overwritten before any query of that row can see them.
        """
        ids = np.atleast_2d(ids)
        b, t = ids.shape
        lengths = np.full(b, t) if lengths is None else np.asarray(lengths)
        outputs, final = [], None
        start = 0
        while start < t:
            n = min(MAX_PREFILL_CHUNK, t - start)
            room = self.ctx_size - (pos + start)
            bucket = 1 << (n - 1).bit_length()
            if b * bucket > qmatvec.MAX_ROWS:     # short passes stay within the decode kernels' rows
                bucket = max(MIN_PREFILL_BUCKET, bucket)
            if bucket > room:
                bucket = n
            chunk = np.zeros((b, bucket), np.int32)
            chunk[:, :n] = ids[:, start:start + n]
            idx = np.clip(lengths - 1 - start, 0, n - 1).astype(np.int32)
            logits = self._prefill(jnp.asarray(chunk), pos + start, idx, all_logits)
            if all_logits:
                outputs.append(logits[0, :n])
            else:
                here = jnp.asarray((lengths - 1 >= start) & (lengths - 1 < start + n))[:, None]
                final = logits if final is None else jnp.where(here, logits, final)
            start += n
        if not all_logits:
            return final
        return jnp.concatenate(outputs, axis=0) if len(outputs) > 1 else outputs[0]

    def _prefill(self, chunk: jax.Array, pos: int, idx: np.ndarray, all_logits: bool) -> jax.Array:
        """One padded chunk [B, T] from `pos`: logits [B, T, V], or [B, V] at row b's token idx[b].

        Resident layers take one dispatch for decode-sized chunks (the decode kernels, whose
        results are the same in the stacked loop as in a layer alone). A longer chunk goes layer
        by layer through the very `block` executable the layered path runs, each layer's weights
        and cache copied out of their stacks (one more read and write of the weights per chunk:
        15-21% of an 8B pp512 on the H200): XLA compiles the matmuls of the stacked loop
        differently from those of a layer alone, and logits would differ in the last bits by
        placement.
        """
        if not self.layered and (chunk.size <= qmatvec.MAX_ROWS or not LAYERWISE_PREFILL):
            logits, self._caches = M.prefill(self.config, self.segments, self.next_norms,
                                             self.globals, self._caches, chunk, jnp.int32(pos),
                                             jnp.asarray(idx + 1), all_logits=all_logits)
            return logits
        x = M.embed_jit(self.globals.token_embd, chunk)
        h = self._run_layered(x, pos) if self.layered else self._run_resident_layers(x, pos)
        if not all_logits:
            h = h[jnp.arange(h.shape[0]), jnp.asarray(idx)]
        return M.head_jit(self.globals.output, h)

    def _first_norm(self, x: jax.Array) -> jax.Array:
        return M.first_norm_jit(x, self.norms[0], self.config.rms_eps, self._first_kernel)

    def _run_layered(self, x: jax.Array, pos) -> jax.Array:
        """Every layer through the jitted per-layer block; streamed layers come from the
        scheduler, which keeps the next `prefetch_depth` of them in flight. Returns the output
        norm of the last layer's x (the head's input)."""
        p = jnp.asarray(pos, jnp.int32)
        inv_freq = self.globals.rope_inv_freq
        h = self._first_norm(x)
        for i in range(self.config.n_layers):
            streamed = i not in self.resident
            w = self.streamer.take(i) if streamed else self.resident[i]
            # Issue upcoming copies before this layer's compute, so they run beside it.
            self.streamer.prefetch_from(i + 1)
            x, h, self._caches[i] = M.block(self.config, w, x, h, self._caches[i], p, inv_freq,
                                            self.norms[i + 1])
            if streamed:
                self.streamer.computed(x)
        return h

    def _run_resident_layers(self, x: jax.Array, pos) -> jax.Array:
        """Every resident layer through the jitted per-layer block, as `_run_layered` does: layer
        j's weights and cache copied out of their stacks, the cache written back in place. Two
        dispatches per layer (the block, then one that writes back and takes the next layer
        out), with layer indices made once: per-dispatch host work, not the copies, bounded a
        form with four dispatches and a fresh index each."""
        p = jnp.asarray(pos, jnp.int32)
        inv_freq = self.globals.rope_inv_freq
        if self._layer_ids is None:     # device scalars made once: no transfer per dispatch
            self._layer_ids = [jnp.int32(j) for j in range(max(self.segment_sizes))]
        ids = self._layer_ids
        caches = list(self._caches)
        h, i = self._first_norm(x), 0
        for s, (seg, n) in enumerate(zip(self.segments, self.segment_sizes)):
            w, cache = _stack_entry((seg, caches[s]), ids[0])
            for j in range(n):
                i += 1
                x, h, cache = M.block(self.config, w, x, h, cache, p, inv_freq, self.norms[i])
                if j + 1 < n:
                    caches[s], (w, cache) = _put_and_take(caches[s], cache, ids[j], seg, ids[j + 1])
                else:
                    caches[s] = _set_stack_entry(caches[s], cache, ids[j])
        self._caches = tuple(caches)
        return h

    def _decode(self, params: SamplingParams, token: jax.Array, pos, key: jax.Array,
                recent: jax.Array):
        """One decode step for every row: (next tokens [B], key, recent). pos: int or [B]."""
        if not self.layered:
            nxt, self._caches, key, recent = M.decode_step(
                self.config, params, self.segments, self.next_norms, self.globals, self._caches, token,
                np.asarray(pos, np.int32), key, recent)   # numpy: no dispatch of its own
            return nxt, key, recent
        h = self._run_layered(M.embed_jit(self.globals.token_embd, token[:, None]), pos)
        return M.head_sample(params, self.globals.output, h[:, 0], key, token, recent)

    def logits_layerwise(self, ids: Sequence[int]) -> np.ndarray:
        """Like `logits`, but dispatching the jitted per-layer `block` once per layer (the path a
        streaming scheduler uses); one compiled block serves every layer of a signature."""
        arr = self._check_ids(ids)
        x = M.embed(self.globals.token_embd, jnp.asarray(arr)[None])
        cfg = self.config
        h = self._first_norm(x)
        for i in range(cfg.n_layers):
            cache = M.KVCache(*(jnp.zeros((1, len(arr), cfg.n_kv_head, cfg.head_dim), jnp.float32)
                                for _ in range(2)))
            x, h, _ = M.block(cfg, self.layer_weights(i), x, h, cache, jnp.int32(0),
                              self.globals.rope_inv_freq, self.norms[i + 1])
        return np.asarray(M.head(self.globals.output, h)[0], dtype=np.float32)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits for every position of `ids` from a fresh context: float32 [len(ids), n_vocab]."""
        arr = self._check_ids(ids)
        if arr.size == 0:
            return np.zeros((0, self.config.n_vocab), np.float32)
        if arr.size > self.ctx_size:
            raise InputError(f"{arr.size} tokens do not fit in ctx_size={self.ctx_size}")
        self._cached = []
        out = np.asarray(self._forward(arr, 0, all_logits=True), dtype=np.float32)
        self._cached = [int(i) for i in arr]
        return out

    # -- generation ------------------------------------------------------------------------

    @property
    def cached_tokens(self) -> list[int]:
        """Tokens whose keys/values sit in the cache, position 0 first (for prefix reuse)."""
        return list(self._cached)

    def _sampling(self, params: SamplingParams, ignore_eos: bool) -> SamplingParams:
        """`params` checked against this vocabulary, with the end-of-generation tokens banned
        when `ignore_eos` (as llama.cpp's --ignore-eos: they are never sampled)."""
        if ignore_eos:
            params = dataclasses.replace(
                params, banned=tuple(sorted(set(params.banned) | set(self.tokenizer.eog_ids))))
        bad = [t for t in params.banned if t >= self.config.n_vocab]
        if bad:
            raise InputError(f"banned token id {bad[0]} is outside the vocabulary [0, {self.config.n_vocab})")
        return params

    def generate_tokens(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 128,
                        params: SamplingParams = SamplingParams(), seed: int | None = None,
                        start_pos: int = 0, ignore_eos: bool = False) -> Iterator[int]:
        """Yield new token ids after `prompt_ids`, stopping at end-of-generation, the limit or ctx_size.

        Args:
          prompt_ids: tokens to feed, placed at positions start_pos, start_pos + 1, ...
          max_new_tokens: most tokens to generate.
          params: sampling settings.
          seed: PRNG seed (None or negative: random).
          start_pos: keep the cache entries of `cached_tokens[:start_pos]` and continue after
            them (a chat turn appends this way); 0 starts a fresh context.
          ignore_eos: never sample end-of-generation tokens (generation runs to the limit or
            ctx_size), as llama.cpp's --ignore-eos.
        """
        params = self._sampling(params, ignore_eos)
        if self.draft is not None and start_pos == 0 and params.repeat_penalty == 1.0:
            if max_new_tokens < 0:
                raise InputError(f"max_new_tokens={max_new_tokens} must be >= 0")
            self.spec_stats = SpeculativeStats()
            yield from speculative_tokens(self, self.draft, prompt_ids, k=self.draft_k,
                                          max_new_tokens=max_new_tokens, params=params, seed=seed,
                                          stats=self.spec_stats)
            return
        ids = self._check_ids(prompt_ids)
        if ids.size == 0:
            raise InputError("the prompt is empty (no tokens to start from)")
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens={max_new_tokens} must be >= 0")
        if not 0 <= start_pos <= len(self._cached):
            raise InputError(f"start_pos={start_pos} is outside the cached context (0..{len(self._cached)})")
        if start_pos + ids.size >= self.ctx_size:
            raise InputError(f"prompt of {start_pos + ids.size} tokens does not fit in ctx_size={self.ctx_size} "
                             f"(it needs at least {start_pos + ids.size + 1})")
        del self._cached[start_pos:]
        stats = self.last_stats = GenerationStats(prompt_tokens=int(ids.size))
        if max_new_tokens == 0:
            stats.stop_reason = "max_new_tokens"
            return
        key = _prng_key(seed, self.device)
        history = np.concatenate([np.asarray(self._cached[:start_pos], np.int32), ids])
        recent = jax.device_put(_recent_window([history], params), self.device)   # committed

        t0 = time.perf_counter()
        logits = self._forward(ids, start_pos, all_logits=False)  # [1, V]
        self._cached.extend(int(i) for i in ids)
        key, sub = jax.random.split(key)
        pending = sample(logits, recent, sub, params)             # [1] on device
        pos = start_pos + int(ids.size)
        stats.stop_reason = "max_new_tokens"
        for step in range(max_new_tokens):
            if step == 0:
                # The clock for decode speed starts when the first token is known, so the
                # interval holds exactly one decode step per later token.
                token = int(np.asarray(pending)[0])   # a copy, not an indexing dispatch
                t_gen = time.perf_counter()
                stats.prompt_seconds = t_gen - t0
                s0 = dataclasses.replace(self.streamer.stats) if self.streamer else None
            # Dispatch the next step before reading this token, so the device never waits on
            # the host; a step dispatched past the end is discarded (its cache slot is unused).
            more = step + 1 < max_new_tokens and pos < self.ctx_size
            if more:
                nxt, key, recent = self._decode(params, pending, pos, key, recent)
            if step > 0:
                token = int(np.asarray(pending)[0])   # a copy, not an indexing dispatch
            stats.generated_tokens += 1
            stats.generate_seconds = time.perf_counter() - t_gen
            if s0 is not None:
                stats.stream = self.streamer.stats.since(s0)
            if self.tokenizer.is_eog(token):
                stats.stop_reason = "eog"
                return
            yield token
            if not more:
                if step + 1 < max_new_tokens:
                    stats.stop_reason = "ctx_size"
                return
            pending = nxt
            self._cached.append(token)
            pos += 1

    def generate_batch_tokens(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                              params: SamplingParams = SamplingParams(), seed: int | None = None,
                              ignore_eos: bool = False) -> list[list[int]]:
        """Generate for several token prompts together: each streamed layer is read once per
        step for all of them. Each row stops on its own (end-of-generation, the limit, ctx_size).

        Returns the new tokens of each prompt (the end-of-generation token excluded).
        """
        params = self._sampling(params, ignore_eos)
        rows = [self._check_ids(p) for p in prompts]
        if not rows:
            return []
        for i, r in enumerate(rows):
            if r.size == 0:
                raise InputError(f"prompt {i} is empty (no tokens to start from)")
            if r.size >= self.ctx_size:
                raise InputError(f"prompt {i} of {r.size} tokens does not fit in ctx_size={self.ctx_size} "
                                 f"(it needs at least {r.size + 1})")
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens={max_new_tokens} must be >= 0")
        b = len(rows)
        lengths = np.array([r.size for r in rows])
        padded = np.zeros((b, lengths.max()), np.int32)
        for i, r in enumerate(rows):
            padded[i, :r.size] = r
        recent = _recent_window(rows, params)
        out: list[list[int]] = [[] for _ in range(b)]
        stats = self.last_stats = GenerationStats(prompt_tokens=int(lengths.sum()))
        if max_new_tokens == 0:
            return out
        key = _prng_key(seed, self.device)
        self._caches = self._new_caches(b)
        self._cached = []
        try:
            t0 = time.perf_counter()
            recent = jax.device_put(recent, self.device)   # committed, see _prng_key
            logits = self._forward(padded, 0, all_logits=False, lengths=lengths)   # [B, V]
            key, sub = jax.random.split(key)
            pending = sample(logits, recent, sub, params)
            pos = lengths.copy()
            done = np.zeros(b, bool)
            for step in range(max_new_tokens):
                if step == 0:
                    toks = np.asarray(pending)
                    t_gen = time.perf_counter()
                    stats.prompt_seconds = t_gen - t0
                live = ~done
                more = step + 1 < max_new_tokens and bool((pos[live] < self.ctx_size).any())
                if more:
                    nxt, key, recent = self._decode(params, pending, np.minimum(pos, self.ctx_size - 1),
                                                    key, recent)
                if step > 0:
                    toks = np.asarray(pending)
                for i in np.flatnonzero(live):
                    tok = int(toks[i])
                    if self.tokenizer.is_eog(tok):
                        done[i] = True
                        continue
                    out[i].append(tok)
                    stats.generated_tokens += 1
                    if len(out[i]) >= max_new_tokens or pos[i] >= self.ctx_size:
                        done[i] = True
                stats.generate_seconds = time.perf_counter() - t_gen
                if done.all() or not more:
                    break
                pending = nxt
                pos = pos + 1
            stats.stop_reason = "batch"
        finally:
            self._caches = self._new_caches(1)
        return out

    def generate_batch(self, prompts: Sequence[str], max_new_tokens: int = 128, temperature: float = 0.8,
                       top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                       repeat_penalty: float = 1.0, seed: int | None = None, *,
                       repeat_last_n: int = 64, ignore_eos: bool = False) -> list[str]:
        """Continue every prompt, decoding them together; returns the continuations in order."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n)
        if isinstance(prompts, (str, bytes)):
            raise InputError("prompts must be a list of strings (one per row), not one string")
        ids = [self.tokenize(p) for p in prompts]
        outs = self.generate_batch_tokens(ids, max_new_tokens=max_new_tokens, params=params, seed=seed,
                                          ignore_eos=ignore_eos)
        return [b"".join(self.tokenizer.token_bytes(t) for t in o).decode("utf-8", errors="replace")
                for o in outs]

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 repeat_penalty: float = 1.0, seed: int | None = None, *,
                 repeat_last_n: int = 64, add_special: bool = True,
                 parse_special: bool = True, ignore_eos: bool = False,
                 stop: Sequence[str] = ()) -> Iterator[str]:
        """Generate a continuation of `prompt`, yielding text pieces as they are produced.

        A UTF-8 character split across tokens is yielded once it is whole. Stops at an
        end-of-generation token (unless `ignore_eos`), after `max_new_tokens`, when the context
        is full, or where the text reaches one of the `stop` strings, which is not yielded
        (`last_stats.stop_reason`: "eog", "max_new_tokens", "ctx_size" or "stop"). Text that
        could be the start of a stop string is held back until it is known not to be one.
        """
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n)
        stop = _check_stop(stop)
        ids = self.tokenize(prompt, add_special=add_special, parse_special=parse_special)
        tokens = self.generate_tokens(ids, max_new_tokens=max_new_tokens, params=params, seed=seed,
                                      ignore_eos=ignore_eos)
        pieces = decode_stream(tokens, self.tokenizer.token_bytes)
        if not stop:
            yield from pieces
            return
        try:
            for text, hit in until_stop(pieces, stop):
                if text:
                    yield text
                if hit:
                    self.last_stats.stop_reason = "stop"
                    return
        finally:
            tokens.close()           # no more decode steps

    def chat(self, messages: Sequence[dict[str, str]], *, chat_template: str | None = None,
             **sampling) -> Iterator[str]:
        """Stream the assistant's reply to `messages`, rendered with the model's chat template.

        Args:
          messages: dicts with "role" and "content", e.g. [{"role": "user", "content": "Hi"}].
          chat_template: template text or file path overriding the model's `tokenizer.chat_template`.
          **sampling: max_new_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
            repeat_last_n, seed (as for `generate`).
        Raises:
          InputError: no chat template, bad messages, or the prompt does not fit in ctx_size.
        For a multi-turn conversation that reuses the KV cache, see `chat.ChatSession`.
        """
        from ntransformer_jax import chat
        return chat.complete(self, messages, template=chat_template, **sampling)


def _check_stop(stop: Sequence[str]) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    try:
        stop = tuple(stop)
    except TypeError:
        raise InputError(f"stop={stop!r} must be a string or a list of strings") from None
    if not all(isinstance(s, str) and s for s in stop):
        raise InputError(f"stop={stop!r} must be non-empty strings")
    return stop


def until_stop(pieces: Iterable[str], stop: Sequence[str]) -> Iterator[tuple[str, bool]]:
    """(text, hit) pairs: `pieces` re-cut so that no text at or after the first occurrence of
    any `stop` string is yielded; `hit` is True on the last pair when a stop string was found.
    The tail that could begin a stop string is held back until the next piece decides it."""
    held = ""
    for piece in pieces:
        held += piece
        found = [i for i in (held.find(s) for s in stop) if i >= 0]
        if found:
            yield held[:min(found)], True
            return
        # The longest suffix of `held` that is a proper prefix of some stop string stays.
        keep = max((k for s in stop for k in range(min(len(s) - 1, len(held)), 0, -1)
                    if held.endswith(s[:k])), default=0)
        if len(held) > keep:
            yield held[:len(held) - keep], False
            held = held[len(held) - keep:]
    if held:
        yield held, False


_TIER_OPTIONS = {f.name for f in dataclasses.fields(TierOptions)}


def _kernel_mode(kernels: str, device: jax.Device) -> str:
    """"auto" -> "pallas" on a GPU, "off" elsewhere (on CPU Pallas only interprets: slow)."""
    if kernels == "auto":
        return "pallas" if device.platform == "gpu" else "off"
    if kernels == "on":
        if device.platform != "gpu":
            raise InputError(f"kernels='on' needs a GPU (this device is {device.platform}; "
                             "'interpret' runs the Pallas interpreter, for tests)")
        return "pallas"
    if kernels not in M.KERNEL_MODES:
        raise InputError(f"kernels={kernels!r} must be one of auto, on, "
                         + ", ".join(M.KERNEL_MODES))
    return kernels


def load(path: str | os.PathLike[str], *, ctx_size: int | None = None,
         progress: Callable[[int, int], None] | None = None, draft_model: str | None = None,
         draft_k: int = 4, kernels: str = "auto", matmul: str = "f32",
         **tier_options) -> Engine:
    """Open a GGUF Llama model and place its weights.

    Args:
      path: the .gguf file.
      ctx_size: context length (KV cache size); default min(training context, 4096).
      progress: called as progress(bytes_placed, bytes_total) while layers are placed.
      draft_model: a smaller GGUF with the same vocabulary (e.g. a lower-bit quantization of the
        same model), kept resident, for speculative decoding; or "self": the model's own
        VRAM-resident layers (a tiered model drafts without streaming).
      draft_k: tokens drafted per speculative round.
      kernels: "auto" (fused Pallas decode kernels on a GPU, XLA elsewhere), "on" (a GPU's
        kernels, or an error), "off", or "interpret" (the Pallas interpreter: CPU tests). With kernels, matrices of
        the supported types are repacked at load (see `qmatvec`) in tiers A and B; tier C and
        the mmap baseline keep the file's layout.
      matmul: input type of the prefill matmuls (more than 8 rows): "f32" (exact float32
        products, the default) or "bf16" (tensor cores, float32 accumulation: much faster
        prompts, logits within about 1e-2).
      **tier_options: `TierOptions` fields (vram_budget_gb, ram_budget_gb, max_vram_layers,
        ...). XLA's pinned-host pool (used only for small copies) is bounded when
        `tiers.limit_pinned_pool(ram_budget_gb)` runs before JAX starts its GPU backend (the
        CLI does). Fields: vram_budget_gb, ram_budget_gb, max_vram_layers, max_ram_layers,
        streaming ("pipeline" | "mmap"), prefetch_depth, reader, o_direct, read_threads,
        layout ("spread" | "index"). With none given, layers stay in device memory when they fit.
    Returns:
      An `Engine`; `engine.placement` tells where each layer went.
    Raises:
      NTransformerError: the file or an option is unusable (message names it).
    """
    unknown = sorted(set(tier_options) - _TIER_OPTIONS)
    if unknown:
        raise InputError(f"unknown load option {unknown[0]!r}")
    if draft_k < 1:
        raise InputError(f"draft_k={draft_k} must be >= 1")
    options = TierOptions(**{k: v for k, v in tier_options.items() if v is not None})
    draft = load(draft_model, ctx_size=ctx_size) if draft_model and draft_model != "self" else None
    model_file = ModelFile(path)
    try:
        engine = Engine(model_file, ctx_size=ctx_size, tier_options=options, progress=progress,
                        kernels=kernels, matmul=matmul)
    except NTransformerError:
        model_file.close()
        raise
    if draft is not None:
        check_compatible(engine, draft)
        engine.draft, engine.draft_k = draft, draft_k
    elif draft_model == "self":
        engine.draft, engine.draft_k = ResidentLayersDraft(engine), draft_k
    return engine
