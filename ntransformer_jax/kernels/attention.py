"""Causal GQA attention of a few new queries over the KV cache, in one kernel (decode path).

`decode_attention(q, k_cache, v_cache, positions)` equals `model.attention(q, KVCache(k, v),
positions)` for T <= 8 new tokens, as a single Pallas launch (flash-decoding) in place of the
~8 XLA kernels that the einsum/softmax form compiles to per layer.

Grid (B, K, split_s). A program takes the T * G query rows that share KV head k of batch row b
(G = N / K query heads per KV head) and walks its share of the key axis in blocks of `block_s`
keys with an online softmax: a running max m, running sum l and accumulator acc [rows, H], all
float32; products are elementwise or `plgpu.dot` at HIGHEST precision (IEEE on Triton, no TF32).

Layout. q [B, T, N, H] is viewed as [B, T, K, G, H] (a reshape, no copy), and so is the
output, which the kernel writes directly: with split_s = 1 the launch is the only kernel. Two
forms of the loop body, chosen statically (`BlockSizes.max_row_loop`):
- rows (T * G <= 4 by default: one-token decode of Llama-3-8B or SmolLM2): each query row is
  its own [H] vector with a scalar running max and sum; scores are sum(q * k, axis=1), the
  update sum(p[:, None] * v, axis=0). Nothing is padded.
- dots (more rows): the program loads the tile [Tp, Gp, H] of its head, Tp and Gp powers of two
  >= T and G with Tp * Gp >= 16 (`plgpu.dot`'s smallest tile), rows past T or G masked to
  zero, merges it to [Tp * Gp, H] rows and does two `plgpu.dot`s per key block; the result
  goes back through a masked store of the [Tp, Gp, H] tile.

The cache. k_cache and v_cache [B, S, K, H] (or stacked [L, B, S, K, H] with `layer`, an int32
index passed to the kernel as a [1] operand and applied inside it, so no layer slice is ever
copied out of the stack) are read in place. S need not be a multiple of block_s: key blocks are
masked loads. A program only walks the blocks up to max(positions[b]) (read inside the kernel),
so a cache allocated for the whole context costs only its filled rows. Keys past that maximum
are never trusted: they are loaded as zeros (a masked load, `other=0`), so garbage there, NaN
included, changes nothing; a key j visible to some rows of the batch row but not to query
(b, t) (j > positions[b, t]) gets score -inf and weight exactly 0 for that row.

Split. With split_s > 1 the blocks up to max(positions[b]) are shared out evenly among the
split_s programs of (b, k) (at run time, so a half-empty cache still spreads its work); each
writes its partial (m, l, acc) and the wrapper combines them with jnp (one small XLA fusion):
M = max_i m_i, out = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i. An empty share writes
m = -inf, l = 0, acc = 0, which drops out of the combination.

Precondition (not checked: positions are traced): 0 <= positions < S. A query row with no
visible key would give NaN, as `model.attention` does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ntransformer_jax.errors import InputError
from ntransformer_jax.kernels import qmatvec as qm

HIGHEST = lax.Precision.HIGHEST

MAX_QUERIES = 8          # T, new tokens per call (decode / speculative verification)
MIN_TILE = 16            # plgpu.dot's smallest tile dimension (query rows, keys, H)
CACHE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# ---------------------------------------------------------------------------------------------
# Tile sizes.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of one `decode_attention` launch (static; part of the jit cache key).

    Attributes:
        block_s: keys per loop step; a power of two >= 16.
        split_s: programs sharing one (batch row, KV head), each over an even share of the
            key blocks up to max(positions); their partials are combined by the wrapper.
            Raises the program count for long contexts.
        num_warps, num_stages: Triton launch options (ignored in interpret mode).
        max_row_loop: up to this many query rows (T * G) per program, the kernel keeps each
            row apart (products and sums, no padding) instead of padding the rows to a
            16-row `plgpu.dot`; 0 always uses the dot.
    """

    block_s: int = 32
    split_s: int = 1
    num_warps: int = 4
    num_stages: int = 2
    max_row_loop: int = 4

    @classmethod
    def get_default(cls, batch: int, kv_heads: int, seq_len: int) -> BlockSizes:
        """The default tiling for a [batch, seq_len, kv_heads, H] cache.

        block_s is DEFAULT_BLOCK_S, or the smallest power of two >= 16 covering a shorter
        cache. split_s doubles while the launch has at most half of TARGET_PROGRAMS programs
        and every share keeps at least MIN_BLOCKS_PER_SPLIT blocks of the full cache: 1 for
        short caches, B * K * split_s of 128 to 256 for long ones.

        Measured on an H200 (JAX 0.11.2, Llama-3-8B heads, B = 1, S = 4096, per layer in a
        32-layer loop; XLA's attention 48 us at T = 1, 80 us at T = 8): T = 1 (row loop)
        25 us at block_s 32 / split 32, 29 us at 64 / 16, 43 us with padded dots; T = 8
        (dots) 64 us at 32 / 32, 68 us at 32 / 16, 830 us at 64 / 16 with 4 warps (spills).
        """
        block_s = min(DEFAULT_BLOCK_S, max(MIN_TILE, _next_pow2(max(seq_len, 1))))
        n_blocks = -(-max(seq_len, 1) // block_s)
        split_s = 1
        while (batch * kv_heads * split_s * 2 <= TARGET_PROGRAMS
               and n_blocks >= 2 * split_s * MIN_BLOCKS_PER_SPLIT):
            split_s *= 2
        return cls(block_s=block_s, split_s=split_s)


DEFAULT_BLOCK_S = 32
TARGET_PROGRAMS = 256      # B * K * split_s that `get_default` aims for on long caches
MIN_BLOCKS_PER_SPLIT = 4   # a share shorter than this is not worth its partial write


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def supports(n_tokens: int, n_head: int, n_kv_head: int, head_dim: int) -> bool:
    """Whether `decode_attention` takes T = n_tokens queries of these head counts and size."""
    return (1 <= n_tokens <= MAX_QUERIES and n_kv_head >= 1 and n_head % n_kv_head == 0
            and _is_pow2(head_dim) and head_dim >= MIN_TILE)


@functools.lru_cache(maxsize=None)
def self_test(n_head: int, n_kv_head: int, head_dim: int, interpret: bool = False) -> None:
    """Compile and run the kernel once for these heads (one and eight queries, a stacked cache
    whose rows past the positions hold NaN) against `decode_attention_reference`; once per
    process and shape. Raises what compiling or running raises, or NTransformerError when the
    result is wrong (a caller can then fall back to XLA)."""
    from ntransformer_jax.errors import NTransformerError
    import numpy as np
    rng = np.random.default_rng(0)
    s = 80
    for t in (1, MAX_QUERIES):
        q = jnp.asarray(rng.standard_normal((1, t, n_head, head_dim)), jnp.float32)
        kv = rng.standard_normal((2, 2, 1, s, n_kv_head, head_dim)).astype(np.float32)
        kv[:, :, :, 40 + t:] = np.nan
        k, v = jnp.asarray(kv[0]), jnp.asarray(kv[1])
        positions = jnp.arange(40, 40 + t, dtype=jnp.int32)[None]
        got = np.asarray(decode_attention(q, k, v, positions, layer=jnp.int32(1), interpret=interpret))
        want = np.asarray(decode_attention_reference(q, k, v, positions, layer=1))
        err = float(np.max(np.abs(got - want)))
        if not err <= 1e-4:
            raise NTransformerError(f"decode_attention self-test (N={n_head}, K={n_kv_head},"
                                    f" H={head_dim}, T={t}): max error {err:.3g}")


def _check_heads(q_shape: tuple[int, ...], cache_shape: tuple[int, ...]) -> None:
    """T in range and N a multiple of K (checks the reference shares)."""
    t, n, k = q_shape[1], q_shape[2], cache_shape[2]
    if not 1 <= t <= MAX_QUERIES:
        raise InputError(f"q has T={t} new tokens; decode_attention serves 1 to {MAX_QUERIES}"
                         " (use model.attention)")
    if k < 1 or n % k:
        raise InputError(f"q has N={n} heads, not a positive multiple of the cache's K={k}"
                         " KV heads")


class Plan(NamedTuple):
    """The launch geometry `decode_attention` derives from the shapes (all static)."""

    block_sizes: BlockSizes
    grid: tuple[int, int, int]   # (B, K, split_s)
    t_pad: int                   # Tp: query tokens per tile (power of two >= T)
    g_pad: int                   # Gp: query heads per KV head per tile (power of two >= G)
    row_loop: bool               # one row at a time (T * G <= max_row_loop) or padded dots


def plan(q_shape: tuple[int, ...], cache_shape: tuple[int, ...],
         block_sizes: BlockSizes | None = None) -> Plan:
    """Validate a launch for q [B, T, N, H] over an (unstacked) cache [B, S, K, H].

    Raises:
        InputError: naming the first value that the kernel cannot handle.
    """
    batch, t, n, h = q_shape
    _, s, k, _ = cache_shape
    _check_heads(q_shape, cache_shape)
    if not (_is_pow2(h) and h >= MIN_TILE):
        raise InputError(f"head_dim H={h} must be a power of two >= {MIN_TILE}")
    if batch < 1:
        raise InputError(f"batch B={batch} must be positive")
    if s < 1:
        raise InputError(f"cache length S={s} must be positive")
    g = n // k
    g_pad = _next_pow2(g)
    t_pad = max(_next_pow2(t), MIN_TILE // min(g_pad, MIN_TILE))
    bs = block_sizes or BlockSizes.get_default(batch, k, s)
    if not isinstance(bs, BlockSizes):
        raise InputError(f"block_sizes must be an attention.BlockSizes, got {type(bs).__name__}")
    if not (_is_pow2(bs.block_s) and bs.block_s >= MIN_TILE):
        raise InputError(f"block_s={bs.block_s} must be a power of two >= {MIN_TILE}")
    if not (isinstance(bs.split_s, int) and bs.split_s >= 1):
        raise InputError(f"split_s={bs.split_s} must be a positive integer")
    if not _is_pow2(bs.num_warps):
        raise InputError(f"num_warps={bs.num_warps} must be a power of two")
    if not (isinstance(bs.num_stages, int) and bs.num_stages >= 1):
        raise InputError(f"num_stages={bs.num_stages} must be a positive integer")
    if not (isinstance(bs.max_row_loop, int) and bs.max_row_loop >= 0):
        raise InputError(f"max_row_loop={bs.max_row_loop} must be a non-negative integer")
    return Plan(block_sizes=bs, grid=(batch, k, bs.split_s), t_pad=t_pad, g_pad=g_pad,
                row_loop=t * g <= bs.max_row_loop)


# ---------------------------------------------------------------------------------------------
# The kernel.
# ---------------------------------------------------------------------------------------------

def _iota(shape: tuple[int, ...], axis: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _key_share(last, block_s: int, split_s: int):
    """Key blocks [lo, hi) of this program: its share of blocks 0 .. last // block_s."""
    n_live = last // block_s + 1
    if split_s == 1:
        return 0, n_live
    share = (n_live + split_s - 1) // split_s
    lo = pl.program_id(2) * share
    return lo, jnp.minimum(lo + share, n_live)


def _kv_block(k_ref, v_ref, lead, i, block_s: int, last):
    """Keys [i * block_s, (i + 1) * block_s): their indices and k, v [block_s, H] float32, rows
    past `last` (those no query sees, and those past S) loaded as zeros, not read."""
    head_dim = k_ref.shape[-1]
    start = pl.multiple_of(i * block_s, block_s)
    keys = start + _iota((block_s,), 0)
    mask = jnp.broadcast_to((keys <= last)[:, None], (block_s, head_dim))
    idx = (*lead, pl.ds(start, block_s), slice(None))
    k = plgpu.load(k_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
    v = plgpu.load(v_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
    return keys, k, v


def _online_update(m, l, acc, s, pv):
    """One online-softmax step for scores s (-inf where masked) along their last axis:
    returns (m, l, acc) after the block; `pv(p)` is the block's p @ v."""
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # a row that has seen nothing yet
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv(p)


def _attention_kernel(*refs, n_tokens: int, n_groups: int, t_pad: int, g_pad: int,
                      seq_len: int, block_s: int, split_s: int, stacked: bool, row_loop: bool):
    if row_loop:
        _row_loop_kernel(*refs, n_tokens=n_tokens, n_groups=n_groups, seq_len=seq_len,
                         block_s=block_s, split_s=split_s, stacked=stacked)
    else:
        _dot_kernel(*refs, n_tokens=n_tokens, n_groups=n_groups, t_pad=t_pad, g_pad=g_pad,
                    seq_len=seq_len, block_s=block_s, split_s=split_s, stacked=stacked)


def _unpack_refs(refs, stacked: bool):
    """(leading cache index: (layer,) or (), positions, q, k, v, output refs) of a program."""
    lead = (refs[0][0],) if stacked else ()
    pos_ref, q_ref, k_ref, v_ref, *out_refs = refs[1:] if stacked else refs
    return lead, pos_ref, q_ref, k_ref, v_ref, out_refs


def _row_loop_kernel(*refs, n_tokens: int, n_groups: int, seq_len: int, block_s: int,
                     split_s: int, stacked: bool):
    """`_dot_kernel` for few query rows: each of the T * G rows is its own [H] vector with a
    scalar running max and sum; scores are sum(q * k, axis=1), the update sum(p * v, axis=0),
    so nothing is padded (a dot would need 16 rows)."""
    lead, pos_ref, q_ref, k_ref, v_ref, out_refs = _unpack_refs(refs, stacked)
    head_dim = q_ref.shape[-1]
    rows = [(t, g) for t in range(n_tokens) for g in range(n_groups)]
    scale = jnp.float32(1.0 / math.sqrt(head_dim))
    qs = [q_ref[t, g, :] * scale for t, g in rows]
    pos = [pos_ref[t] for t in range(n_tokens)]
    last = functools.reduce(jnp.maximum, pos)
    last = jnp.minimum(last, seq_len - 1)
    lo, hi = _key_share(last, block_s, split_s)

    def step(i, carry):
        keys, k, v = _kv_block(k_ref, v_ref, lead, i, block_s, last)
        out = []
        for (t, _), q, (m, l, acc) in zip(rows, qs, carry):
            s = jnp.sum(q[None, :] * k, axis=1)                               # [block_s]
            s = jnp.where(keys <= pos[t], s, -jnp.inf)
            out.append(_online_update(m, l, acc, s,
                                      lambda p: jnp.sum(p[:, None] * v, axis=0)))
        return tuple(out)

    init = tuple((jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((head_dim,), jnp.float32))
                 for _ in rows)
    final = lax.fori_loop(lo, hi, step, init)
    for (t, g), (m, l, acc) in zip(rows, final):
        if split_s == 1:
            out_refs[0][t, g, :] = acc / l
        else:
            acc_ref, m_ref, l_ref = out_refs
            acc_ref[t, g, :] = acc
            m_ref[t, g] = m
            l_ref[t, g] = l


def _dot_kernel(*refs, n_tokens: int, n_groups: int, t_pad: int, g_pad: int,
                seq_len: int, block_s: int, split_s: int, stacked: bool):
    """One program: the Tp * Gp query rows of (batch row b, KV head k), over its key share.

    refs: with `stacked`, first the [1] int32 layer index; then positions [T] int32, q [T, G, H]
    f32, k and v [S, H] (or [L, S, H]); then either o [T, G, H] (split_s = 1) or the partials
    acc [T, G, H], m [T, G], l [T, G] of this split.
    """
    lead, pos_ref, q_ref, k_ref, v_ref, out_refs = _unpack_refs(refs, stacked)
    head_dim = q_ref.shape[-1]
    rows = t_pad * g_pad
    padded = (t_pad, g_pad) != (n_tokens, n_groups)

    # The query tile [Tp, Gp, H] -> rows [R, H], padded rows zero; each row's position.
    tile_mask = (_iota((t_pad, g_pad), 0) < n_tokens) & (_iota((t_pad, g_pad), 1) < n_groups)
    if padded:
        q = plgpu.load(q_ref.at[pl.ds(0, t_pad), pl.ds(0, g_pad), :],
                       mask=jnp.broadcast_to(tile_mask[:, :, None], (t_pad, g_pad, head_dim)),
                       other=0.0)
    else:
        q = q_ref[...]
    q = q.reshape(rows, head_dim) * jnp.float32(1.0 / math.sqrt(head_dim))
    if t_pad != n_tokens:
        pos = plgpu.load(pos_ref.at[pl.ds(0, t_pad)], mask=_iota((t_pad,), 0) < n_tokens,
                         other=0)
    else:
        pos = pos_ref[...]
    row_pos = jnp.broadcast_to(pos[:, None], (t_pad, g_pad)).reshape(rows)   # [R]
    last = jnp.minimum(jnp.max(pos), seq_len - 1)    # the last key any row may see

    lo, hi = _key_share(last, block_s, split_s)

    def step(i, carry):
        keys, k, v = _kv_block(k_ref, v_ref, lead, i, block_s, last)
        s = plgpu.dot(q, k, trans_b=True, precision=HIGHEST)                 # [R, block_s]
        s = jnp.where(keys[None, :] <= row_pos[:, None], s, -jnp.inf)
        return _online_update(*carry, s, lambda p: plgpu.dot(p, v, precision=HIGHEST))

    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    m, l, acc = lax.fori_loop(lo, hi, step, init)

    def put(ref, value):
        value = value.reshape(t_pad, g_pad, *value.shape[1:])
        if not padded:
            ref[...] = value
            return
        mask = tile_mask if value.ndim == 2 else jnp.broadcast_to(
            tile_mask[:, :, None], value.shape)
        plgpu.store(ref.at[(pl.ds(0, t_pad), pl.ds(0, g_pad), *[slice(None)] * (value.ndim - 2))],
                    value, mask=mask)

    if split_s == 1:
        (o_ref,) = out_refs
        put(o_ref, acc / l[:, None])
    else:
        acc_ref, m_ref, l_ref = out_refs
        put(acc_ref, acc)
        put(m_ref, m)
        put(l_ref, l)


# ---------------------------------------------------------------------------------------------
# Wrappers.
# ---------------------------------------------------------------------------------------------

def _launch(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array,
            p: Plan, *, layer: jax.Array | None = None, interpret: bool = False,
            out_init: tuple[jax.Array, ...] | None = None) -> tuple[jax.Array, ...]:
    """Run the kernel. q [B, T, N, H] f32, positions [B, T] int32, layer None or [1] int32.

    Returns (o [B, T, K, G, H],) with split_s = 1, else the partials (acc [split, B, T, K, G, H],
    m [split, B, T, K, G], l [split, B, T, K, G]). `out_init`, if given, are the output buffers'
    starting contents (tests poison them with NaN).
    """
    bs = p.block_sizes
    stacked = layer is not None
    batch, t, n, h = q.shape
    cache_shape = k_cache.shape[1:] if stacked else k_cache.shape
    s, k = cache_shape[1], cache_shape[2]
    g = n // k
    q5 = q.reshape(batch, t, k, g, h)

    if stacked:
        kv_spec = pl.BlockSpec((k_cache.shape[0], None, s, None, h),
                               lambda b, kh, i: (0, b, 0, kh, 0))
    else:
        kv_spec = pl.BlockSpec((None, s, None, h), lambda b, kh, i: (b, 0, kh, 0))
    in_specs = [pl.BlockSpec((None, t), lambda b, kh, i: (b, 0)),
                pl.BlockSpec((None, t, None, g, h), lambda b, kh, i: (b, 0, kh, 0, 0)),
                kv_spec, kv_spec]
    operands = [positions, q5, k_cache, v_cache]
    if stacked:
        in_specs.insert(0, pl.BlockSpec((1,), lambda b, kh, i: (0,)))
        operands.insert(0, layer)

    if bs.split_s == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, t, k, g, h), jnp.float32)]
        out_specs = [pl.BlockSpec((None, t, None, g, h), lambda b, kh, i: (b, 0, kh, 0, 0))]
    else:
        part = (bs.split_s, batch, t, k, g)
        out_shape = [jax.ShapeDtypeStruct((*part, h), jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, t, None, g, h),
                                  lambda b, kh, i: (i, b, 0, kh, 0, 0)),
                     pl.BlockSpec((None, None, t, None, g), lambda b, kh, i: (i, b, 0, kh, 0)),
                     pl.BlockSpec((None, None, t, None, g), lambda b, kh, i: (i, b, 0, kh, 0))]
    kernel = functools.partial(
        _attention_kernel, n_tokens=t, n_groups=g, t_pad=p.t_pad, g_pad=p.g_pad, seq_len=s,
        block_s=bs.block_s, split_s=bs.split_s, stacked=stacked, row_loop=p.row_loop)
    aliases = {}
    if out_init is not None:
        n_in = len(operands)
        in_specs += out_specs
        operands += list(out_init)
        aliases = {n_in + j: j for j in range(len(out_init))}
        kernel = qm._drop_args(kernel, n_in, len(out_init))
    return tuple(pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=p.grid,
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="decode_attention",
    )(*operands))


def combine(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merge split partials (leading axis) of an online softmax: sum_i w_i acc_i / sum_i w_i l_i
    with w_i = exp(m_i - max_i m_i)."""
    m_max = jnp.max(m, axis=0)
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    w = jnp.exp(m - m_max)
    return jnp.sum(w[..., None] * acc, axis=0) / jnp.sum(w * l, axis=0)[..., None]


def _check_inputs(q, k_cache, v_cache, positions, layer) -> tuple[int, ...]:
    """Shapes and dtypes; returns the (unstacked) cache shape [B, S, K, H]."""
    if q.ndim != 4:
        raise InputError(f"q must be [B, T, N, H], got shape {list(q.shape)}")
    if q.dtype != jnp.float32:
        raise InputError(f"q must be float32, got {q.dtype}")
    stacked = layer is not None
    want_ndim = 5 if stacked else 4
    form = "[L, B, S, K, H] (stacked, with layer=)" if stacked else "[B, S, K, H]"
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.ndim != want_ndim:
            raise InputError(f"{name} must be {form}, got shape {list(c.shape)}")
        if c.dtype not in CACHE_DTYPES:
            raise InputError(f"{name} must be float32, bfloat16 or float16, got {c.dtype}")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise InputError(f"k_cache {k_cache.dtype} {list(k_cache.shape)} and v_cache"
                         f" {v_cache.dtype} {list(v_cache.shape)} differ")
    cache_shape = tuple(k_cache.shape[1:] if stacked else k_cache.shape)
    if cache_shape[0] != q.shape[0] or cache_shape[3] != q.shape[3]:
        raise InputError(f"q {list(q.shape)} and cache {list(k_cache.shape)} disagree on the"
                         " batch B or head_dim H")
    _check_heads(tuple(q.shape), cache_shape)
    if positions.shape != q.shape[:2]:
        raise InputError(f"positions must be [B, T] = {list(q.shape[:2])}, got shape"
                         f" {list(positions.shape)}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise InputError(f"positions must be integers, got {positions.dtype}")
    return cache_shape


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     positions: jax.Array, *, layer: jax.Array | None = None,
                     block_sizes: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
    """Causal GQA attention of T new queries over the cache, in one Pallas kernel.

    Args:
        q: [B, T, N, H] float32, already rotated; 1 <= T <= 8; H a power of two >= 16.
        k_cache, v_cache: [B, S, K, H] float32 (bfloat16 and float16 are read as float32); with
            `layer`, stacked [L, B, S, K, H] of which entry `layer` is used, read in place.
            N = K * G: query head n uses KV head n // G.
        positions: [B, T] integer absolute positions, 0 <= positions < S; key j is visible to
            query (b, t) iff j <= positions[b, t]. Rows past max(positions[b]) may hold anything
            (NaN included) and do not touch the result.
        layer: integer scalar (may be traced, e.g. a `fori_loop` counter), or None.
        block_sizes: tiling; `BlockSizes.get_default(B, K, S, ...)` when None.
        interpret: run the Pallas interpreter (CPU) instead of compiling for the GPU.

    Returns:
        [B, T, N, H] float32, `model.attention(q, KVCache(k, v), positions)`.

    Raises:
        InputError: shapes, dtypes or tiling the kernel cannot take (before anything runs).
    """
    cache_shape = _check_inputs(q, k_cache, v_cache, positions, layer)
    p = plan(tuple(q.shape), cache_shape, block_sizes)
    layer_idx = qm._layer_index(layer)
    out = _launch(q, k_cache, v_cache, positions.astype(jnp.int32), p, layer=layer_idx,
                  interpret=interpret)
    if len(out) == 3:
        out = (combine(*out),)
    return out[0].reshape(q.shape)


def decode_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                               positions: jax.Array, *, layer: jax.Array | None = None,
                               block_sizes: BlockSizes | None = None,
                               interpret: bool = False) -> jax.Array:
    """Plain-jnp `decode_attention` (`block_sizes` and `interpret` are ignored): the layer's
    cache sliced out, then `model.attention`'s einsums at HIGHEST precision, except that cache
    rows past max(positions[b]) are zeroed first so that garbage there cannot leak in."""
    del block_sizes, interpret
    q, k, v, positions = (jnp.asarray(a) for a in (q, k_cache, v_cache, positions))
    cache_shape = _check_inputs(q, k, v, positions, layer)
    if layer is not None:
        index = qm._layer_index(layer)[0]
        k = lax.dynamic_index_in_dim(k, index, 0, keepdims=False)
        v = lax.dynamic_index_in_dim(v, index, 0, keepdims=False)
    b, t, n, h = q.shape
    s, kh = cache_shape[1], cache_shape[2]
    key_pos = jnp.arange(s, dtype=jnp.int32)
    positions = positions.astype(jnp.int32)
    live = (key_pos[None, :] <= jnp.max(positions, axis=1)[:, None])[:, :, None, None]
    k = jnp.where(live, k.astype(jnp.float32), 0.0)
    v = jnp.where(live, v.astype(jnp.float32), 0.0)
    qg = q.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, precision=HIGHEST) / jnp.float32(
        math.sqrt(h))
    mask = key_pos[None, None, :] <= positions[:, :, None]             # [B, T, S]
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, precision=HIGHEST)
    return out.reshape(b, t, n, h)
