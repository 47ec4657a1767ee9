"""The Llama forward pass as pure functions of (weights, activations, KV cache, position).

Dimension letters: B batch, T new tokens, S cache length, D model width, F feed-forward width,
N query heads, K KV heads, G = N // K query heads per KV head, H head size, V vocabulary.

`block` is jitted once per weight-type signature and called with each layer's weights as
arguments, so the same compiled function serves every layer wherever its bytes came from.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from ntransformer_jax import quants
from ntransformer_jax.kernels import attention as attention_kernel
from ntransformer_jax.kernels import norm, qmatmul, qmatvec, rope_cache
from ntransformer_jax.model_file import LlamaConfig
from ntransformer_jax.sampling import SamplingParams, sample

HIGHEST = jax.lax.Precision.HIGHEST


@jax.tree_util.register_pytree_node_class
class QTensor:
    """A weight matrix [rows, cols] kept in its GGUF encoding.

    `data` is uint8 [rows, row_bytes] for block-quantized types, or a float array [rows, cols]
    for F32/F16/BF16. With `kernel` set, `data` is instead the tuple of arrays that
    `qmatvec.repack` makes (see `pack`), and `linear` sends decode rows through the fused Pallas
    kernel: "pallas" compiles it for the GPU, "interpret" runs the Pallas interpreter (CPU
    tests). `matmul` is the input type of the matmuls that dequantize (prefill): "f32" (exact
    float32 products) or "bf16" (tensor cores; float32 accumulation). `qtype`, `n_cols`,
    `kernel` and `matmul` are static (part of the pytree structure).

    `splits`, when set, says the rows are several matrices stacked by rows (q, k and v; gate and
    up), with these row counts: one kernel launch serves them all (see `fuse_rows`).

    `index`, when set (an int32 scalar), says the arrays hold a stack of matrices on a leading
    axis and this tensor is entry `index` of it: the fused kernel then reads that entry in place
    (a `lax.scan` over stacked layers would otherwise copy every layer's slice before the
    kernel call: a second pass over all weights per token).
    """

    def __init__(self, data, qtype: gguf.GGMLQuantizationType, n_cols: int,
                 kernel: str | None = None, matmul: str = "f32", index=None,
                 splits: tuple[int, ...] | None = None):
        self.data = tuple(data) if kernel else data
        self.qtype = gguf.GGMLQuantizationType(qtype)
        self.n_cols = int(n_cols)
        self.kernel = kernel
        self.matmul = matmul
        self.index = index
        self.splits = splits

    def tree_flatten(self):
        indexed = self.index is not None
        return (self.arrays + ((self.index,) if indexed else ()),
                (self.qtype, self.n_cols, self.kernel, self.matmul, indexed, self.splits))

    @classmethod
    def tree_unflatten(cls, aux, children):
        qtype, n_cols, kernel, matmul, indexed, splits = aux
        arrays, index = (children[:-1], children[-1]) if indexed else (children, None)
        return cls(arrays if kernel else arrays[0], qtype, n_cols, kernel, matmul, index, splits)

    @property
    def arrays(self) -> tuple:
        return self.data if self.kernel else (self.data,)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.arrays[0].shape[0 if self.index is None else 1], self.n_cols)

    @property
    def nbytes(self) -> int:
        return int(sum(a.size * a.dtype.itemsize for a in self.arrays))

    def entry(self, index) -> QTensor:
        """Entry `index` of a stack of matrices, read in place by the kernel (see `index`)."""
        return QTensor(self.data, self.qtype, self.n_cols, self.kernel, self.matmul, index,
                       self.splits)

    def with_arrays(self, fn) -> QTensor:
        """The same matrix with `fn` applied to each of its arrays (row gathers, chunking);
        an entry of a stack is taken out of it first (the result has no `index`)."""
        if self.index is not None:
            take = lambda a: jax.lax.dynamic_index_in_dim(a, self.index, 0, keepdims=False)
            fn = lambda a, fn=fn: fn(take(a))
        return QTensor(tuple(map(fn, self.arrays)) if self.kernel else fn(self.data),
                       self.qtype, self.n_cols, self.kernel, self.matmul, splits=self.splits)

    def unstacked(self) -> QTensor:
        """This matrix's own arrays (an entry of a stack sliced out; others unchanged)."""
        return self if self.index is None else self.with_arrays(lambda a: a)

    def dequantize(self) -> jax.Array:
        """float32 [rows, cols]."""
        if self.index is not None:
            return self.unstacked().dequantize()
        if self.kernel:
            return qmatvec.dequantize_packed(self.data, self.qtype, self.n_cols)
        return quants.dequantize(self.data, self.qtype, self.n_cols)

    def __repr__(self) -> str:
        kind = f", {self.kernel}" if self.kernel else ""
        return f"QTensor({self.qtype.name}, shape={self.shape}{kind}, matmul={self.matmul})"


KERNEL_MODES = ("off", "pallas", "interpret")
MATMUL_TYPES = ("f32", "bf16")


def pack(w: QTensor, kernel: str, matmul: str = "f32") -> QTensor:
    """`w` repacked for the fused decode kernel, or `w` itself where the kernel cannot take it
    (float types, types without a kernel, shapes it rejects) or `kernel` is "off".

    Works on host (numpy) or device arrays and keeps the kind: numpy in, numpy out, repacked on
    the CPU backend, so a model can be repacked while it is read and before it is placed.
    `matmul` is set either way (see `QTensor`).
    """
    if w.kernel or not packed_kernel(w.qtype, *w.shape, kernel):
        return QTensor(w.data, w.qtype, w.n_cols, w.kernel, matmul)
    if isinstance(w.data, np.ndarray):
        with jax.default_device(jax.devices("cpu")[0]):
            packed = tuple(np.asarray(a) for a in _repack_jit(w.data, w.qtype, w.n_cols))
    else:
        packed = _repack_jit(w.data, w.qtype, w.n_cols)
    return QTensor(packed, w.qtype, w.n_cols, kernel, matmul)


def packed_kernel(qtype: gguf.GGMLQuantizationType, rows: int, cols: int, kernel: str) -> str | None:
    """The `kernel` that `pack` gives a file matrix of this type and shape: `kernel` itself
    ("pallas" or "interpret") where the decode kernel takes it, else None."""
    return None if kernel == "off" or not qmatvec.supports(qtype, rows, cols) else kernel


@functools.partial(jax.jit, static_argnums=(1, 2))
def _repack_jit(data, qtype, n_cols):
    return qmatvec.repack(data, qtype, n_cols)


def fuse_rows(ws: list[QTensor]) -> QTensor | None:
    """One packed matrix holding `ws` stacked by rows (their `splits`), or None where they
    differ in type, K or mode, or are not packed. Host (numpy) or device arrays."""
    if not all(w.kernel for w in ws) or len({(w.qtype, w.n_cols, w.kernel, w.matmul, w.index)
                                              for w in ws}) != 1:
        return None
    if not qmatvec.supports(ws[0].qtype, sum(w.shape[0] for w in ws), ws[0].n_cols):
        return None
    cat = np.concatenate if isinstance(ws[0].data[0], np.ndarray) else jnp.concatenate
    arrays = tuple(cat(parts, axis=0) for parts in zip(*(w.data for w in ws)))
    w = ws[0]
    return QTensor(arrays, w.qtype, w.n_cols, w.kernel, w.matmul,
                   splits=tuple(v.shape[0] for v in ws))


def pack_layer(w: "LayerWeights", kernel: str, matmul: str = "f32") -> "LayerWeights":
    """Every matrix of a layer through `pack` (norm vectors stay as they are); with the kernel,
    q/k/v and gate/up become one matrix each where their types agree (`fuse_rows`): fewer,
    larger launches per token. The fused matrix sits in `attn_q` / `ffn_gate`; `attn_k`,
    `attn_v` / `ffn_up` are then None."""
    w = w._replace(**{k: pack(v, kernel, matmul) for k, v in w._asdict().items()
                      if isinstance(v, QTensor)})
    qkv = fuse_rows([w.attn_q, w.attn_k, w.attn_v])
    if qkv is not None:
        w = w._replace(attn_q=qkv, attn_k=None, attn_v=None)
    gate_up = fuse_rows([w.ffn_gate, w.ffn_up])
    if gate_up is not None:
        w = w._replace(ffn_gate=gate_up, ffn_up=None)
    return w


def _linear_split(x: jax.Array, w: QTensor) -> list[jax.Array]:
    """`linear` through a row-fused matrix, split back into its parts. A kernel takes all parts
    in one launch; on the XLA path each part is multiplied on its own (its rows sliced out of
    the packed arrays), which keeps each dequantized matrix as small as before."""
    edges = np.cumsum((0, *w.splits)).tolist()
    if _takes_kernel(x, w) or _takes_prefill_kernel(x, w):
        return jnp.split(linear(x, w), edges[1:-1], axis=-1)
    return [linear(x, w.with_arrays(lambda a, s=s, e=e: a[s:e]))
            for s, e in zip(edges, edges[1:])]


class LayerWeights(NamedTuple):
    """One transformer block's weights (shapes as [out, in], numpy order)."""

    attn_norm: jax.Array   # [D] f32
    attn_q: QTensor        # [N*H, D] (or q, k, v fused by rows: see pack_layer)
    attn_k: QTensor | None  # [K*H, D]
    attn_v: QTensor | None  # [K*H, D]
    attn_output: QTensor   # [D, N*H]
    ffn_norm: jax.Array    # [D] f32
    ffn_gate: QTensor      # [F, D] (or gate and up fused by rows)
    ffn_up: QTensor | None  # [F, D]
    ffn_down: QTensor      # [D, F]


class GlobalWeights(NamedTuple):
    """Weights outside the blocks."""

    token_embd: QTensor    # [V, D]
    output_norm: jax.Array  # [D] f32
    output: QTensor        # [V, D] (token_embd again when tied)
    rope_inv_freq: jax.Array  # [n_rot // 2] f32: per-pair angular frequency


class KVCache(NamedTuple):
    """One layer's cache. k, v: [B, S, K, H]."""

    k: jax.Array
    v: jax.Array


def init_kv_cache(cfg: LlamaConfig, batch: int, ctx: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, ctx, cfg.n_kv_head, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def rope_inv_freq(cfg: LlamaConfig, freq_factors: np.ndarray | None) -> np.ndarray:
    """Angular frequency of each rotated pair: base^(-2i/n_rot) * freq_scale / factor_i (float32)."""
    i = np.arange(cfg.n_rot // 2, dtype=np.float64)
    with np.errstate(all="ignore"):
        inv = cfg.rope_freq_scale * cfg.rope_base ** (-2.0 * i / cfg.n_rot)
        if freq_factors is not None:
            inv = inv / np.asarray(freq_factors, dtype=np.float64)
    if not (np.all(np.isfinite(inv)) and np.all(np.abs(inv) < np.finfo(np.float32).max)):
        from ntransformer_jax.errors import ModelFileError
        raise ModelFileError("rope frequencies are not finite (check rope.freq_base and rope_freqs.weight)")
    return inv.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

# Prefill matmuls of packed matrices through `qmatmul` (else XLA dequantizes, then multiplies).
# Off: on the H200 the kernel runs at 0.25-0.9x XLA's bf16 path at M = 512 (untuned tiles) and
# ~0.02x its f32 path (IEEE float32 dots); see benchmarks/RESULTS.md. Read when a function is
# first traced; benchmarks/e2e.py --prefill_kernel sets it.
PREFILL_KERNEL = False

# Matrices with more elements than this are dequantized and multiplied in row chunks, so the
# float32 copy XLA materializes stays small (the output head of a 128k vocabulary is 4 GB in f32).
LINEAR_CHUNK_ELEMS = 1 << 26


def _n_chunks(rows: int, cols: int) -> int:
    n = 1
    while rows * cols // n > LINEAR_CHUNK_ELEMS and rows % (2 * n) == 0:
        n *= 2
    return n


def linear(x: jax.Array, w: QTensor) -> jax.Array:
    """x [..., in] @ w.T -> [..., out], float32 accumulation.

    A packed `w` goes through a fused Pallas kernel: the decode kernel (`qmatvec`) for at most
    `qmatvec.MAX_ROWS` rows of x (decode, short verification passes), the prefill kernel
    (`qmatmul`, inputs of `w.matmul`'s type) for more. Everything else dequantizes and multiplies.
    """
    rows, cols = w.shape
    lead = x.shape[:-1]
    m = int(np.prod(lead))
    if _takes_kernel(x, w):
        return _kernel_linear(x, w, sum_splits=True)
    if _takes_prefill_kernel(x, w):
        y = qmatmul.qmatmul_packed(x.reshape(m, cols), w.data, w.qtype, cols,
                                   dtype=jnp.bfloat16 if w.matmul == "bf16" else jnp.float32,
                                   interpret=w.kernel == "interpret", layer=w.index)
        return y.reshape(*lead, rows)
    w = w.unstacked()
    if w.matmul == "bf16" and m > qmatvec.MAX_ROWS:
        x = x.astype(jnp.bfloat16)
        mm = lambda p: jnp.einsum("...i,oi->...o", x, p.dequantize().astype(jnp.bfloat16),
                                  preferred_element_type=jnp.float32)
    else:
        mm = lambda p: jnp.einsum("...i,oi->...o", x, p.dequantize(), precision=HIGHEST)
    n = _n_chunks(rows, cols)
    if n == 1:
        return mm(w)
    parts = w.with_arrays(lambda a: a.reshape(n, rows // n, *a.shape[1:]))
    out = jax.lax.map(mm, parts)                                           # [n, ..., rows/n]
    return jnp.moveaxis(out, 0, -2).reshape(*lead, rows)


def _takes_kernel(x: jax.Array, w: QTensor) -> bool:
    """Whether `linear` sends x [..., in] through the fused decode kernel (packed w, 1 to
    `qmatvec.MAX_ROWS` rows)."""
    return bool(w.kernel) and 1 <= int(np.prod(x.shape[:-1])) <= qmatvec.MAX_ROWS


def _takes_prefill_kernel(x: jax.Array, w: QTensor) -> bool:
    """Whether `linear` sends x [..., in] (more than `qmatvec.MAX_ROWS` rows) through the fused
    prefill kernel: `PREFILL_KERNEL` on, w packed and of a shape `qmatmul` tiles."""
    m = int(np.prod(x.shape[:-1]))
    return (PREFILL_KERNEL and bool(w.kernel) and m > qmatvec.MAX_ROWS
            and qmatmul.supports(w.qtype, m, *w.shape))


def _kernel_linear(x: jax.Array, w: QTensor, sum_splits: bool) -> jax.Array:
    """The fused kernel on x [..., in]: [..., out], or [P, ..., out] K-split partial sums."""
    rows, cols = w.shape
    lead = x.shape[:-1]
    y = qmatvec.qmatvec_packed(x.reshape(-1, cols), w.data, w.qtype, cols,
                               interpret=w.kernel == "interpret", layer=w.index,
                               sum_splits=sum_splits)
    return y.reshape(*y.shape[:-2], *lead, rows)


def linear_parts(x: jax.Array, w: QTensor) -> jax.Array:
    """`linear` with the fused kernel's K-split partial sums left unsummed: [P, ..., out] (P = 1
    off the kernel path), for a consumer that adds them itself (`add_norm`)."""
    return _kernel_linear(x, w, sum_splits=False) if _takes_kernel(x, w) else linear(x, w)[None]


def add_norm(x: jax.Array, parts: jax.Array | None, weight: jax.Array, eps: float,
             kernel: str | None, layer: jax.Array | None = None):
    """(x + sum(parts), rms_norm of it) or, with `parts` None, rms_norm(x) alone.

    x: [B, T, D]; parts: [P, B, T, D]; weight: [D], or [L, D] stacked with `layer` its index.
    With `kernel` ("pallas" or "interpret") and decode-sized x, one `norm.add_rms_norm` launch
    does it all (XLA would take three kernels); otherwise plain XLA.
    """
    b, t, d = x.shape
    if kernel and norm.supports(b * t, d):
        flat = None if parts is None else parts.reshape(parts.shape[0], b * t, d)
        out = norm.add_rms_norm(x.reshape(b * t, d), flat, weight, eps, layer=layer,
                                interpret=kernel == "interpret")
        return (out.reshape(x.shape) if parts is None
                else (out[0].reshape(x.shape), out[1].reshape(x.shape)))
    w = weight if layer is None else weight[layer]
    if parts is None:
        return rms_norm(x, w, eps)
    x = x + jnp.sum(parts, axis=0)
    return x, rms_norm(x, w, eps)


def add_residual(x: jax.Array, parts: jax.Array, kernel: str | None) -> jax.Array:
    """x + sum(parts) for x [B, T, D] and partial sums [P, B, T, D]: by `norm.add_parts` with
    `kernel` and decode-sized x (one fixed summation order whether the block runs alone or in
    the resident loop), else XLA."""
    b, t, d = x.shape
    if kernel and norm.supports(b * t, d):
        out = norm.add_parts(x.reshape(b * t, d), parts.reshape(parts.shape[0], b * t, d),
                             interpret=kernel == "interpret")
        return out.reshape(x.shape)
    return x + jnp.sum(parts, axis=0)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    ms = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(ms + eps) * weight


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the first 2*len(inv_freq) dims of each head.

    x: [B, T, N, H]; positions: [B, T] int32; inv_freq: [R] with R = n_rot // 2.
    """
    r = inv_freq.shape[0]
    angles = positions[..., None].astype(jnp.float32) * inv_freq   # [B, T, R]
    cos = jnp.cos(angles)[:, :, None, :]                             # [B, T, 1, R]
    sin = jnp.sin(angles)[:, :, None, :]
    rot = x[..., : 2 * r].reshape(*x.shape[:-1], r, 2)
    x0, x1 = rot[..., 0], rot[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(*x.shape[:-1], 2 * r)
    return jnp.concatenate([out, x[..., 2 * r:]], axis=-1) if 2 * r < x.shape[-1] else out


def attention(q: jax.Array, cache: KVCache, positions: jax.Array) -> jax.Array:
    """Causal GQA attention of new queries over the cache.

    q: [B, T, N, H] (already rotated); cache k/v: [B, S, K, H] holding every position up to the
    last new one; positions: [B, T] absolute position of each query. Returns [B, T, N, H].
    """
    b, t, n, h = q.shape
    k_heads = cache.k.shape[2]
    s = cache.k.shape[1]
    qg = q.reshape(b, t, k_heads, n // k_heads, h)                     # [B, T, K, G, H]
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, cache.k.astype(q.dtype),
                        precision=HIGHEST) / np.sqrt(h).astype(np.float32)
    key_pos = jnp.arange(s, dtype=jnp.int32)
    mask = key_pos[None, None, :] <= positions[:, :, None]            # [B, T, S]
    scores = jnp.where(mask[:, None, None, :, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, cache.v.astype(q.dtype), precision=HIGHEST)
    return out.reshape(b, t, n, h)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def block_step(cfg: LlamaConfig, w: LayerWeights, x: jax.Array, h: jax.Array, cache: KVCache,
               pos: jax.Array, inv_freq: jax.Array, next_norm: jax.Array | None,
               layer: jax.Array | None = None,
               norms_stacked: bool = False) -> tuple[jax.Array, jax.Array | None, KVCache]:
    """One transformer block (un-jitted; see `block` and `forward_layers`), fused with the norm
    that follows it: the block's last residual add and the next norm are one launch, so each
    layer costs two norm launches, not three.

    Args:
      cfg: static model config.
      w: this layer's weights (`w.attn_norm` is not read: h already has it applied).
      x: [B, T, D] residual stream for T new tokens at positions pos .. pos+T-1.
      h: [B, T, D] this layer's attention norm of x.
      cache: this layer's KV cache [B, S, K, H], or, when `layer` is given, a stack of caches
        [L, B, S, K, H] of which entry `layer` is this layer's.
      pos: int32 scalar or [B], the position of the first new token.
      inv_freq: [n_rot // 2] RoPE frequencies.
      next_norm: [D] the weight of the norm after this block (the next layer's attention norm,
        or the output norm after the last layer), [L, D] stacked with `norms_stacked`; or None.
      layer: index into a stacked cache, or None.
      norms_stacked: the norm weights are the stacked [L, D] arrays, entry `layer` this layer's.
    Returns:
      (x [B, T, D], next_norm applied to x (None without it), updated cache).
    """
    b, t, _ = x.shape
    pos = jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (b,))
    positions = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]   # [B, T]

    kernel = w.attn_output.kernel   # norms and attention take kernels where the matrices do
    norm_layer = layer if norms_stacked else None

    # Attention: project, rotate, write the cache, attend, project back.
    if _fused_attention(cfg, w, h):
        # Kernels only: the q/k/v partial sums go straight to one kernel that adds them, rotates
        # q and k, writes the cache in place and attends over it (`FUSE_ROPE_ATTENTION`), or to
        # one kernel that adds, rotates and writes, then one that attends.
        parts = linear_parts(h, w.attn_q)
        parts = parts.reshape(parts.shape[0], b * t, -1)          # [P, B*T, (N+2K)*H]
        heads = dict(n_head=cfg.n_head, n_kv_head=cfg.n_kv_head)
        if FUSE_ROPE_ATTENTION and attention_kernel.supports_rope(
                t, cfg.n_head, cfg.n_kv_head, cfg.head_dim, parts.shape[0]):
            attn, k_new, v_new = attention_kernel.rope_decode_attention(
                parts, positions, inv_freq, cache.k, cache.v, **heads, layer=layer,
                interpret=kernel == "interpret")
            cache = KVCache(k_new, v_new)
        else:
            q, k_new, v_new = rope_cache.rope_cache_write(
                parts, positions, inv_freq, cache.k, cache.v, **heads, layer=layer,
                interpret=kernel == "interpret")
            cache = KVCache(k_new, v_new)
            attn = attention_kernel.decode_attention(q, cache.k, cache.v, positions, layer=layer,
                                                     interpret=kernel == "interpret")
    else:
        if w.attn_k is None:         # q, k and v fused by rows (see pack_layer)
            q, k, v = _linear_split(h, w.attn_q)
        else:
            q, k, v = linear(h, w.attn_q), linear(h, w.attn_k), linear(h, w.attn_v)
        q = q.reshape(b, t, cfg.n_head, cfg.head_dim)
        k = k.reshape(b, t, cfg.n_kv_head, cfg.head_dim)
        v = v.reshape(b, t, cfg.n_kv_head, cfg.head_dim)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if layer is None:
            write = jax.vmap(lambda c, new, p: jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (p, 0, 0)))
        else:
            write = jax.vmap(
                lambda c, new, p: jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype), (layer, p, 0, 0)),
                in_axes=(1, 0, 0), out_axes=1)
        cache = KVCache(write(cache.k, k, pos), write(cache.v, v, pos))
        if kernel and attention_kernel.supports(t, cfg.n_head, cfg.n_kv_head, cfg.head_dim):
            # One kernel over the (stacked) cache in place, where XLA would copy the layer's cache out.
            attn = attention_kernel.decode_attention(q, cache.k, cache.v, positions, layer=layer,
                                                     interpret=kernel == "interpret")
        else:
            mine = cache if layer is None else KVCache(
                *(jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False) for c in cache))
            attn = attention(q, mine, positions)
    attn = attn.reshape(b, t, cfg.q_dim)

    # Feed-forward: residual add and norm in one, then SwiGLU.
    x, h = add_norm(x, linear_parts(attn, w.attn_output), w.ffn_norm, cfg.rms_eps, kernel, norm_layer)
    if w.ffn_up is None and _takes_kernel(h, w.ffn_gate) and qmatvec.supports_glu(
            w.ffn_gate.qtype, *w.ffn_gate.shape):
        # gate, up and silu(gate) * up in one launch
        g = w.ffn_gate
        ff = qmatvec.qmatvec_glu_packed(h.reshape(b * t, -1), g.data, g.qtype, g.n_cols,
                                        interpret=g.kernel == "interpret", layer=g.index)
        ff = ff.reshape(b, t, -1)
    else:
        if w.ffn_up is None:         # gate and up fused by rows
            gate, up = _linear_split(h, w.ffn_gate)
        else:
            gate, up = linear(h, w.ffn_gate), linear(h, w.ffn_up)
        ff = jax.nn.silu(gate) * up
    down = linear_parts(ff, w.ffn_down)
    if next_norm is None:
        return add_residual(x, down, kernel), None, cache
    x, h = add_norm(x, down, next_norm, cfg.rms_eps, kernel, norm_layer)
    return x, h, cache


def _fused_attention(cfg: LlamaConfig, w: LayerWeights, h: jax.Array) -> bool:
    """Whether the block takes the kernel path from the q/k/v projection to the attention
    output (q/k/v fused and packed, decode-sized h, heads the rope/cache and attention kernels
    take)."""
    t = h.shape[1]
    return (w.attn_k is None and _takes_kernel(h, w.attn_q)
            and rope_cache.supports(t, cfg.n_head, cfg.n_kv_head, cfg.head_dim)
            and attention_kernel.supports(t, cfg.n_head, cfg.n_kv_head, cfg.head_dim))


# One layer, jitted once per weight-type signature: the streaming path calls it per layer with
# whatever arrays the scheduler hands it, (x, h) carried from one call to the next.
block = jax.jit(block_step, static_argnames=("cfg",), donate_argnames=("cache",))


def first_norm(x: jax.Array, weight: jax.Array, eps: float, kernel: str | None,
               layer: jax.Array | None = None) -> jax.Array:
    """The first layer's attention norm of x [B, T, D], the launch `block_step` takes over from
    then on; `kernel` is the first layer's (its `attn_output.kernel`)."""
    return add_norm(x, None, weight, eps, kernel or None, layer)


first_norm_jit = jax.jit(first_norm, static_argnames=("eps", "kernel"))


# The decode path's rotation, cache write and attention in one launch per layer
# (`attention.rope_decode_attention`, where it takes the shapes); False: `rope_cache_write`
# then `decode_attention`, two launches, as before (benchmarks/e2e.py --fuse_rope measures both;
# read when a step is first traced; every path through `block_step` follows it). Off by default:
# compiled on an H100 it is correct but 0.9-1.4% slower a token than the two launches (8B Q8_0
# 277.1 vs 280.5 tok/s, Q4_0 420.2 vs 426.3; benchmarks/RESULTS.md, session 14).
FUSE_ROPE_ATTENTION = False

# The resident loop fuses each block's last residual add with the next norm (`block_step`);
# False: a separate norm launch after the add, as before (benchmarks/e2e.py --fuse_norm
# measures both; read when a step is first traced; the layered path always fuses).
FUSE_NORM = True

# Layers per iteration of the resident scan (True: the whole segment as straight-line code).
# Read when a step is first traced; benchmarks/e2e.py --scan_unroll sets it.
SCAN_UNROLL: int | bool = 1


def forward_layers(cfg: LlamaConfig, segments: tuple[LayerWeights, ...], caches: tuple[KVCache, ...],
                   next_norms: tuple[jax.Array, ...], x: jax.Array, pos: jax.Array,
                   inv_freq: jax.Array) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """All resident layers: each segment holds consecutive layers of one weight signature, stacked
    on a leading axis, and runs as one `lax.scan`; its cache is stacked the same way [L, B, S, K, H],
    and `next_norms` holds, per segment, the [L, D] weights of the norm after each of its layers.

    Returns (the output norm of the last layer's x [B, T, D], caches): the head's input.
    """
    new_caches = []
    h = first_norm(x, segments[0].attn_norm, cfg.rms_eps, segments[0].attn_output.kernel,
                   jnp.int32(0))
    for seg, cache, nn in zip(segments, caches, next_norms):
        def body(i, carry, seg=seg, nn=nn):
            x, h, cache = carry
            w = LayerWeights(*(v.entry(i) if isinstance(v, QTensor) else v for v in seg))
            if FUSE_NORM:
                return block_step(cfg, w, x, h, cache, pos, inv_freq, nn, layer=i, norms_stacked=True)
            x, _, cache = block_step(cfg, w, x, h, cache, pos, inv_freq, None, layer=i,
                                     norms_stacked=True)
            return x, first_norm(x, nn, cfg.rms_eps, w.attn_output.kernel, i), cache
        # The layer index is the loop's own counter (no array of indices to slice per layer).
        x, h, cache = jax.lax.fori_loop(0, cache.k.shape[0], body, (x, h, cache), unroll=SCAN_UNROLL)
        new_caches.append(cache)
    return h, tuple(new_caches)


def embed(token_embd: QTensor, ids: jax.Array) -> jax.Array:
    """ids [B, T] -> [B, T, D] float32; only the looked-up rows are dequantized."""
    rows = token_embd.with_arrays(lambda a: a[ids.reshape(-1)])
    return rows.dequantize().reshape(*ids.shape, token_embd.n_cols)


def head(output: QTensor, h: jax.Array) -> jax.Array:
    """The output norm of the last layer's x, h [B, T, D] (or [B, D]) -> logits [B, T, V] float32
    (the norm is the last block's: see `block_step`)."""
    return linear(h, output)


@functools.partial(jax.jit, static_argnames=("cfg", "all_logits"), donate_argnames=("caches",))
def prefill(cfg: LlamaConfig, segments: tuple[LayerWeights, ...], next_norms: tuple[jax.Array, ...],
            g: GlobalWeights, caches: tuple[KVCache, ...], ids: jax.Array, pos: jax.Array,
            n_real: jax.Array, all_logits: bool) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """Run ids [B, T] (row b: the first `n_real[b]` real, the rest padding) from position `pos`.

    Returns logits [B, T, V] when `all_logits`, else [B, V] at each row's last real position.
    `next_norms`: as `forward_layers` takes them.
    """
    x = embed(g.token_embd, ids)
    h, caches = forward_layers(cfg, segments, caches, next_norms, x, pos, g.rope_inv_freq)
    if not all_logits:
        last = jnp.broadcast_to(jnp.asarray(n_real, jnp.int32), (h.shape[0],)) - 1   # [B]
        h = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    return head(g.output, h), caches


@functools.partial(jax.jit, static_argnames=("cfg", "params"), donate_argnames=("caches", "recent"))
def decode_step(cfg: LlamaConfig, params: SamplingParams, segments: tuple[LayerWeights, ...],
                next_norms: tuple[jax.Array, ...], g: GlobalWeights, caches: tuple[KVCache, ...],
                token: jax.Array, pos: jax.Array, key: jax.Array, recent: jax.Array):
    """One token for every sequence, sampling included, in one dispatch.

    Args:
      next_norms: as `forward_layers` takes them.
      token: [B] int32 the last token of each sequence, at position `pos` ([B] or scalar).
      key: PRNG key, split here.
      recent: [B, W] recent tokens for the repetition penalty; `token` is appended.
    Returns:
      (next tokens [B], caches, key, recent).
    """
    x = embed(g.token_embd, token[:, None])
    h, caches = forward_layers(cfg, segments, caches, next_norms, x, pos, g.rope_inv_freq)
    nxt, key, recent = sample_next(params, g.output, h[:, 0], key, token, recent)
    return nxt, caches, key, recent


def sample_next(params: SamplingParams, output: QTensor, h: jax.Array, key: jax.Array,
                token: jax.Array, recent: jax.Array):
    """The head on h [B, D] (the last layer's output norm), `token` [B] appended to the
    repetition window, the next token drawn.

    Returns (next tokens [B], key, recent).
    """
    logits = head(output, h)
    recent = jnp.concatenate([recent[:, 1:], token[:, None]], axis=1)
    key, sub = jax.random.split(key)
    return sample(logits, recent, sub, params), key, recent


embed_jit = jax.jit(embed)
head_jit = jax.jit(head)
# The layered path's decode tail (the resident path has it inside `decode_step`).
head_sample = jax.jit(sample_next, static_argnames=("params",), donate_argnames=("recent",))
