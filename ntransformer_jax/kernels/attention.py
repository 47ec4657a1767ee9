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

Rotation and cache write fused in. `rope_decode_attention(parts, positions, inv_freq, k, v)`
is `rope_cache.rope_cache_write` then `decode_attention` in one launch on the same grid (one
launch and one launch gap fewer per layer). Program (b, k, i) adds the q/k/v projection's K-split
partial sums of its own G query heads and of KV head k's new key and value, and rotates them in
registers as `rope_cache` does (the even and odd members loaded as two strided tiles, then put
back in order by a select and a reshape). It reads the cache only below row first =
clamp(positions[b, 0], 0, S - T), where the T new tokens go, and takes the new keys from its
registers, as a key block of their own (causal: query t sees row first + u iff first + u <=
positions[b, t]). The last split alone adds them to its online softmax and writes them into
the cache (aliased to the output, updated in place). No program reads a row that another
writes, so the launch is race-free when all programs run at once.
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
from ntransformer_jax.kernels import rope_cache as rc

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

NO_KEY = jnp.iinfo(jnp.int32).max   # the key index of a padded key row: no query sees it


def _iota(shape: tuple[int, ...], axis: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _key_share(n_keys, block_s: int, split_s: int):
    """Key blocks [lo, hi) of this program: its share of the blocks holding keys 0 .. n_keys - 1
    (n_keys >= 0)."""
    n_live = (n_keys + block_s - 1) // block_s
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


def _masked_load(ref, idx, valid):
    """ref[idx], entries where `valid` (broadcast to the tile) is False read as zeros, not
    loaded (a tile may reach past the block: T new tokens padded to a power of two); a plain
    load when `valid` is None."""
    if valid is None:
        return ref[idx]
    # (integer indices as int32 scalars: the interpreter's masked load takes no Python ints)
    idx = tuple(jnp.int32(i) if isinstance(i, int) else i
                for i in (idx if isinstance(idx, tuple) else (idx,)))
    view = ref.at[idx]
    return plgpu.load(view, mask=jnp.broadcast_to(valid, view.shape), other=0)


def _online_update(m, l, acc, s, pv):
    """One online-softmax step for scores s (-inf where masked) along their last axis:
    returns (m, l, acc) after the block; `pv(p)` is the block's p @ v."""
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # a row that has seen nothing yet
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv(p)


def _scale(head_dim: int) -> jax.Array:
    return jnp.float32(1.0 / math.sqrt(head_dim))


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


# The row loop: each of the T * G query rows its own [H] vector, scalar running max and sum.

def _query_rows(n_tokens: int, n_groups: int) -> list[tuple[int, int]]:
    return [(t, g) for t in range(n_tokens) for g in range(n_groups)]


def _rows_update(qs, limits, carry, keys, k, v):
    """One key block for the rows: row r (query qs[r] [H], scaled) sees the keys [block] that
    are <= limits[r], of k, v [block, H]; returns each row's (m, l, acc) after the block."""
    out = []
    for q, limit, (m, l, acc) in zip(qs, limits, carry):
        s = jnp.sum(q[None, :] * k, axis=1)                                   # [block]
        s = jnp.where(keys <= limit, s, -jnp.inf)
        out.append(_online_update(m, l, acc, s, lambda p: jnp.sum(p[:, None] * v, axis=0)))
    return tuple(out)


def _rows_attend(qs, limits, k_ref, v_ref, lead, n_keys, block_s: int, split_s: int):
    """The rows over this program's share of cache keys [0, n_keys) (`_rows_update` per
    block): each row's (m, l, acc)."""
    head_dim = k_ref.shape[-1]
    lo, hi = _key_share(n_keys, block_s, split_s)

    def step(i, carry):
        keys, k, v = _kv_block(k_ref, v_ref, lead, i, block_s, n_keys - 1)
        return _rows_update(qs, limits, carry, keys, k, v)

    init = tuple((jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((head_dim,), jnp.float32))
                 for _ in qs)
    return lax.fori_loop(lo, hi, step, init)


def _rows_put(out_refs, rows, final, split_s: int) -> None:
    """Each row's result: o [T, G, H] (split_s = 1), else its partials acc, m, l."""
    for (t, g), (m, l, acc) in zip(rows, final):
        if split_s == 1:
            out_refs[0][t, g, :] = acc / l
        else:
            acc_ref, m_ref, l_ref = out_refs
            acc_ref[t, g, :] = acc
            m_ref[t, g] = m
            l_ref[t, g] = l


def _row_loop_kernel(*refs, n_tokens: int, n_groups: int, seq_len: int, block_s: int,
                     split_s: int, stacked: bool):
    """`_dot_kernel` for few query rows: each of the T * G rows is its own [H] vector with a
    scalar running max and sum; scores are sum(q * k, axis=1), the update sum(p * v, axis=0),
    so nothing is padded (a dot would need 16 rows)."""
    lead, pos_ref, q_ref, k_ref, v_ref, out_refs = _unpack_refs(refs, stacked)
    rows = _query_rows(n_tokens, n_groups)
    scale = _scale(q_ref.shape[-1])
    qs = [q_ref[t, g, :] * scale for t, g in rows]
    pos = [pos_ref[t] for t in range(n_tokens)]
    last = functools.reduce(jnp.maximum, pos)
    last = jnp.minimum(last, seq_len - 1)
    final = _rows_attend(qs, [jnp.minimum(pos[t], last) for t, _ in rows], k_ref, v_ref, lead,
                         last + 1, block_s, split_s)
    _rows_put(out_refs, rows, final, split_s)


# The dots: the [Tp, Gp, H] query tile as R = Tp * Gp rows, two `plgpu.dot`s per key block.

def _tile_valid(n_tokens: int, n_groups: int, t_pad: int, g_pad: int) -> jax.Array | None:
    """[Tp, Gp] True on the real query rows; None when nothing is padded."""
    if (t_pad, g_pad) == (n_tokens, n_groups):
        return None
    return (_iota((t_pad, g_pad), 0) < n_tokens) & (_iota((t_pad, g_pad), 1) < n_groups)


def _token_valid(n_tokens: int, t_pad: int) -> jax.Array | None:
    """[Tp] True on the real tokens; None when nothing is padded."""
    return None if t_pad == n_tokens else _iota((t_pad,), 0) < n_tokens


def _dots_update(q, limits, carry, keys, k, v):
    """One key block for the query rows q [R, H] (scaled): row r sees the keys [block] that are
    <= limits[r], of k, v [block, H] (block >= 16); returns (m, l, acc) after the block."""
    s = plgpu.dot(q, k, trans_b=True, precision=HIGHEST)                      # [R, block]
    s = jnp.where(keys[None, :] <= limits[:, None], s, -jnp.inf)
    return _online_update(*carry, s, lambda p: plgpu.dot(p, v, precision=HIGHEST))


def _dots_attend(q, limits, k_ref, v_ref, lead, n_keys, block_s: int, split_s: int):
    """The query rows q [R, H] over this program's share of cache keys [0, n_keys)
    (`_dots_update` per block): (m [R], l [R], acc [R, H])."""
    rows, head_dim = q.shape
    lo, hi = _key_share(n_keys, block_s, split_s)

    def step(i, carry):
        keys, k, v = _kv_block(k_ref, v_ref, lead, i, block_s, n_keys - 1)
        return _dots_update(q, limits, carry, keys, k, v)

    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    return lax.fori_loop(lo, hi, step, init)


def _tile_put(out_refs, final, valid, t_pad: int, g_pad: int, split_s: int) -> None:
    """The rows' result, through a store of the [Tp, Gp, ...] tile masked to the real rows
    (`valid`, None when nothing is padded): o (split_s = 1), else the partials acc, m, l."""
    m, l, acc = final

    def put(ref, value):
        value = value.reshape(t_pad, g_pad, *value.shape[1:])
        if valid is None:
            ref[...] = value
            return
        mask = valid if value.ndim == 2 else jnp.broadcast_to(valid[:, :, None], value.shape)
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

    # The query tile [Tp, Gp, H] -> rows [R, H], padded rows zero; each row's position.
    valid = _tile_valid(n_tokens, n_groups, t_pad, g_pad)
    q = _masked_load(q_ref, (pl.ds(0, t_pad), pl.ds(0, g_pad), slice(None)),
                     None if valid is None else valid[:, :, None])
    q = q.reshape(rows, head_dim) * _scale(head_dim)
    pos = _masked_load(pos_ref, pl.ds(0, t_pad), _token_valid(n_tokens, t_pad))      # [Tp]
    row_pos = jnp.broadcast_to(pos[:, None], (t_pad, g_pad)).reshape(rows)   # [R]
    last = jnp.minimum(jnp.max(pos), seq_len - 1)    # the last key any row may see

    final = _dots_attend(q, jnp.minimum(row_pos, last), k_ref, v_ref, lead, last + 1, block_s,
                         split_s)
    _tile_put(out_refs, final, valid, t_pad, g_pad, split_s)


# Rotation, cache write and attention in one program (`rope_decode_attention`).

def _interleave(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """Even and odd members [..., H/2] -> [..., H] (a select of the two broadcast to [..., H/2,
    2], then a reshape: there is no register gather)."""
    pair = _iota((*x0.shape, 2), x0.ndim)
    return jnp.where(pair == 0, x0[..., None], x1[..., None]).reshape(
        *x0.shape[:-1], 2 * x0.shape[-1])


def _rotated(ref, idx, valid, angle) -> jax.Array:
    """The partial sums ref[idx + (pair member,)] [P, ...] (view [..., H/2, 2]) added and
    rotated by `angle`: [..., H] float32 in the natural (interleaved) order."""
    x0, x1 = (jnp.sum(_masked_load(ref, (*idx, j), valid), axis=0) for j in (0, 1))
    return _interleave(*rc.rotate_pairs(x0, x1, angle))


def _rope_attention_kernel(*refs, n_tokens: int, n_groups: int, t_pad: int, g_pad: int,
                           n_new: int, seq_len: int, block_s: int, split_s: int, stacked: bool,
                           row_loop: bool):
    """One program of `rope_decode_attention`: (batch row b, KV head kh, split i).

    refs: with `stacked`, the [1] int32 layer index; positions [T] int32; freq [H/2] float32;
    the q/k/v partial sums of this program's G query heads [P, T, G, H/2, 2], of its new keys
    [P, T, H/2, 2] and of its new values [P, T, H]; then the outputs: o [T, G, H] (split_s = 1)
    or the partials acc [T, G, H], m [T, G], l [T, G]; last the k and v caches [S, H] (or
    [L, S, H]) of (b, kh), which are the input caches (aliased).

    The T new tokens go to cache rows first .. first + T - 1, first = clamp(positions[0], 0,
    S - T). Every program of (b, kh) reads only cache rows < first and takes the new keys and
    values from its own registers; only the last split writes the new rows. So no program
    reads a row that another writes, whatever order the GPU runs them in.
    """
    lead = (refs[0][0],) if stacked else ()
    pos_ref, freq_ref, pq_ref, pk_ref, pv_ref, *out_refs, k_ref, v_ref = (
        refs[1:] if stacked else refs)
    head_dim = k_ref.shape[-1]
    scale = _scale(head_dim)
    freq = freq_ref[...]                                                      # [H/2]
    first = jnp.clip(pos_ref[0], 0, seq_len - n_tokens)
    owner = True if split_s == 1 else pl.program_id(2) == split_s - 1   # (the shortest share)

    # The new keys and values [Tn, H] (rows past T zero) as the cache will hold them, and their
    # key indices: NO_KEY on padding, and in every program but the owner, which alone adds them.
    u = _iota((n_new,), 0)
    live = u < n_tokens
    pad = None if n_new == n_tokens else live[None, :, None]      # [1, Tn, 1] for [P, Tn, ...]
    new_pos = _masked_load(pos_ref, pl.ds(0, n_new), None if pad is None else live)   # [Tn]
    k_new = _rotated(pk_ref, (slice(None), pl.ds(0, n_new), slice(None)), pad,
                     new_pos.astype(jnp.float32)[:, None] * freq[None, :]).astype(k_ref.dtype)
    v_new = jnp.sum(_masked_load(pv_ref, (slice(None), pl.ds(0, n_new), slice(None)), pad),
                    axis=0).astype(v_ref.dtype)
    write = live & owner
    new_keys = jnp.where(write, first + u, NO_KEY)
    k_att, v_att = k_new.astype(jnp.float32), v_new.astype(jnp.float32)

    # Queries rotated in registers; cache keys [0, first), then the new ones (causal: the key
    # at row first + u is visible to query t iff first + u <= positions[t]).
    if row_loop:
        rows = _query_rows(n_tokens, n_groups)
        pos = [pos_ref[t] for t in range(n_tokens)]
        qs = [_rotated(pq_ref, (slice(None), t, g, slice(None)), None,
                       pos[t].astype(jnp.float32) * freq) * scale for t, g in rows]
        carry = _rows_attend(qs, [jnp.minimum(pos[t], first - 1) for t, _ in rows], k_ref,
                             v_ref, lead, first, block_s, split_s)
        carry = _rows_update(qs, [pos[t] for t, _ in rows], carry, new_keys, k_att, v_att)
        _rows_put(out_refs, rows, carry, split_s)
    else:
        valid = _tile_valid(n_tokens, n_groups, t_pad, g_pad)
        pos = _masked_load(pos_ref, pl.ds(0, t_pad), _token_valid(n_tokens, t_pad))  # [Tp]
        q = _rotated(pq_ref, (slice(None), pl.ds(0, t_pad), pl.ds(0, g_pad), slice(None)),
                     None if valid is None else valid[None, :, :, None],
                     pos.astype(jnp.float32)[:, None, None] * freq[None, None, :])
        q = q.reshape(t_pad * g_pad, head_dim) * scale
        row_pos = jnp.broadcast_to(pos[:, None], (t_pad, g_pad)).reshape(t_pad * g_pad)
        carry = _dots_attend(q, jnp.minimum(row_pos, first - 1), k_ref, v_ref, lead, first,
                             block_s, split_s)
        carry = _dots_update(q, row_pos, carry, new_keys, k_att, v_att)
        _tile_put(out_refs, carry, valid, t_pad, g_pad, split_s)

    # The owner writes the new rows (the others' stores are all masked off).
    mask = jnp.broadcast_to(write[:, None], (n_new, head_dim))
    for ref, new in ((k_ref, k_new), (v_ref, v_new)):
        plgpu.store(ref.at[(*lead, pl.ds(first, n_new), slice(None))], new, mask=mask)


# ---------------------------------------------------------------------------------------------
# Wrappers.
# ---------------------------------------------------------------------------------------------

def _cache_spec(k_cache: jax.Array, stacked: bool) -> pl.BlockSpec:
    """Program (b, kh, i)'s view of a cache: [S, H] of (b, kh), or [L, S, H] stacked."""
    s, h = k_cache.shape[-3], k_cache.shape[-1]
    if stacked:
        return pl.BlockSpec((k_cache.shape[0], None, s, None, h),
                            lambda b, kh, i: (0, b, 0, kh, 0))
    return pl.BlockSpec((None, s, None, h), lambda b, kh, i: (b, 0, kh, 0))


def _attention_outputs(p: Plan, batch: int, t: int, k: int, g: int, h: int):
    """(shapes, BlockSpecs) of the attention outputs: o [B, T, K, G, H] with split_s = 1, else
    the partials acc [split, B, T, K, G, H], m and l [split, B, T, K, G]."""
    split_s = p.block_sizes.split_s
    if split_s == 1:
        return ([jax.ShapeDtypeStruct((batch, t, k, g, h), jnp.float32)],
                [pl.BlockSpec((None, t, None, g, h), lambda b, kh, i: (b, 0, kh, 0, 0))])
    part = (split_s, batch, t, k, g)
    return ([jax.ShapeDtypeStruct((*part, h), jnp.float32),
             jax.ShapeDtypeStruct(part, jnp.float32), jax.ShapeDtypeStruct(part, jnp.float32)],
            [pl.BlockSpec((None, None, t, None, g, h), lambda b, kh, i: (i, b, 0, kh, 0, 0)),
             pl.BlockSpec((None, None, t, None, g), lambda b, kh, i: (i, b, 0, kh, 0)),
             pl.BlockSpec((None, None, t, None, g), lambda b, kh, i: (i, b, 0, kh, 0))])


def _call(kernel, p: Plan, name: str, operands: list, in_specs: list, out_shape: list,
          out_specs: list, aliased: list[tuple[jax.Array, int]], interpret: bool):
    """pallas_call of `kernel` over p.grid. `aliased` (array, output index) pairs are appended
    to the operands as the starting contents of those outputs (aliased, updated in place) and
    dropped from the kernel's arguments: it sees only the outputs."""
    bs = p.block_sizes
    n_in = len(operands)
    if aliased:
        kernel = qm._drop_args(kernel, n_in, len(aliased))
    return tuple(pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=p.grid,
        in_specs=in_specs + [out_specs[j] for _, j in aliased],
        out_specs=out_specs,
        input_output_aliases={n_in + a: j for a, (_, j) in enumerate(aliased)},
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=name,
    )(*operands, *(x for x, _ in aliased)))


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
    s, k = k_cache.shape[-3], k_cache.shape[-2]
    g = n // k
    q5 = q.reshape(batch, t, k, g, h)

    kv_spec = _cache_spec(k_cache, stacked)
    in_specs = [pl.BlockSpec((None, t), lambda b, kh, i: (b, 0)),
                pl.BlockSpec((None, t, None, g, h), lambda b, kh, i: (b, 0, kh, 0, 0)),
                kv_spec, kv_spec]
    operands = [positions, q5, k_cache, v_cache]
    if stacked:
        in_specs.insert(0, pl.BlockSpec((1,), lambda b, kh, i: (0,)))
        operands.insert(0, layer)
    out_shape, out_specs = _attention_outputs(p, batch, t, k, g, h)
    kernel = functools.partial(
        _attention_kernel, n_tokens=t, n_groups=g, t_pad=p.t_pad, g_pad=p.g_pad, seq_len=s,
        block_s=bs.block_s, split_s=bs.split_s, stacked=stacked, row_loop=p.row_loop)
    aliased = list(zip(out_init, range(len(out_init)))) if out_init is not None else []
    return _call(kernel, p, "decode_attention", operands, in_specs, out_shape, out_specs,
                 aliased, interpret)


def _rope_launch(parts: jax.Array, positions: jax.Array, freq: jax.Array, k_cache: jax.Array,
                 v_cache: jax.Array, p: Plan, *, n_head: int, layer: jax.Array | None = None,
                 interpret: bool = False, out_init: tuple[jax.Array, ...] | None = None
                 ) -> tuple[jax.Array, ...]:
    """Run the fused kernel. parts [P, B * T, (N + 2 K) * H] f32, positions [B, T] int32, freq
    [H / 2] f32, layer None or [1] int32.

    Returns `_launch`'s outputs followed by the updated k and v caches (the input caches,
    aliased). `out_init`: as `_launch` takes it.
    """
    bs = p.block_sizes
    stacked = layer is not None
    batch, t = positions.shape
    s, k, h = k_cache.shape[-3:]
    g, half, n_parts = n_head // k, h // 2, parts.shape[0]
    heads = n_head + 2 * k
    pair_view = parts.reshape(n_parts, batch, t, heads, half, 2)     # [P, B, T, N + 2K, H/2, 2]
    flat_view = parts.reshape(n_parts, batch, t, heads, h)           # [P, B, T, N + 2K, H]

    kv_spec = _cache_spec(k_cache, stacked)
    in_specs = [pl.BlockSpec((None, t), lambda b, kh, i: (b, 0)),
                pl.BlockSpec((half,), lambda b, kh, i: (0,)),
                pl.BlockSpec((n_parts, None, t, g, half, 2), lambda b, kh, i: (0, b, 0, kh, 0, 0)),
                pl.BlockSpec((n_parts, None, t, None, half, 2),
                             lambda b, kh, i: (0, b, 0, n_head + kh, 0, 0)),
                pl.BlockSpec((n_parts, None, t, None, h),
                             lambda b, kh, i: (0, b, 0, n_head + k + kh, 0))]
    operands = [positions, freq, pair_view, pair_view, flat_view]
    if stacked:
        in_specs.insert(0, pl.BlockSpec((1,), lambda b, kh, i: (0,)))
        operands.insert(0, layer)
    out_shape, out_specs = _attention_outputs(p, batch, t, k, g, h)
    n_att = len(out_shape)
    out_shape += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in (k_cache, v_cache)]
    out_specs += [kv_spec, kv_spec]
    kernel = functools.partial(
        _rope_attention_kernel, n_tokens=t, n_groups=g, t_pad=p.t_pad, g_pad=p.g_pad,
        n_new=_next_pow2(t) if p.row_loop else MIN_TILE, seq_len=s, block_s=bs.block_s,
        split_s=bs.split_s, stacked=stacked, row_loop=p.row_loop)
    aliased = list(zip(out_init, range(n_att))) if out_init is not None else []
    aliased += [(k_cache, n_att), (v_cache, n_att + 1)]
    return _call(kernel, p, "rope_decode_attention", operands, in_specs, out_shape, out_specs,
                 aliased, interpret)


def combine(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merge split partials (leading axis) of an online softmax: sum_i w_i acc_i / sum_i w_i l_i
    with w_i = exp(m_i - max_i m_i)."""
    m_max = jnp.max(m, axis=0)
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    w = jnp.exp(m - m_max)
    return jnp.sum(w[..., None] * acc, axis=0) / jnp.sum(w * l, axis=0)[..., None]


def _check_caches(k_cache, v_cache, layer) -> tuple[int, ...]:
    """Ranks and dtypes of the two caches; returns the (unstacked) cache shape [B, S, K, H]."""
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
    return tuple(k_cache.shape[1:] if stacked else k_cache.shape)


def _check_inputs(q, k_cache, v_cache, positions, layer) -> tuple[int, ...]:
    """Shapes and dtypes; returns the (unstacked) cache shape [B, S, K, H]."""
    if q.ndim != 4:
        raise InputError(f"q must be [B, T, N, H], got shape {list(q.shape)}")
    if q.dtype != jnp.float32:
        raise InputError(f"q must be float32, got {q.dtype}")
    cache_shape = _check_caches(k_cache, v_cache, layer)
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


# ---------------------------------------------------------------------------------------------
# Rotation, cache write and attention in one launch.
# ---------------------------------------------------------------------------------------------

def supports_rope(n_tokens: int, n_head: int, n_kv_head: int, head_dim: int,
                  n_parts: int = 1) -> bool:
    """Whether `rope_decode_attention` takes T = n_tokens new tokens of these head counts and
    size, from P = n_parts partial sums: what `decode_attention` takes, P a power of two."""
    return supports(n_tokens, n_head, n_kv_head, head_dim) and _is_pow2(n_parts)


def _check_rope_inputs(parts, positions, inv_freq, k_cache, v_cache, n_head, n_kv_head,
                       layer) -> tuple[int, ...]:
    """Shapes and dtypes of a `rope_decode_attention` call (the kernel's and the reference's);
    returns the (unstacked) cache shape [B, S, K, H]."""
    cache_shape = _check_caches(k_cache, v_cache, layer)
    batch, seq_len, kv_heads, head_dim = cache_shape
    if kv_heads != n_kv_head:
        raise InputError(f"caches have {kv_heads} KV heads, expected {n_kv_head=}")
    if not (n_kv_head >= 1 and n_head >= 1 and n_head % n_kv_head == 0):
        raise InputError(f"{n_head=} is not a positive multiple of {n_kv_head=}")
    if positions.ndim != 2 or positions.shape[0] != batch:
        raise InputError(f"positions must be [B={batch}, T], got shape {list(positions.shape)}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise InputError(f"positions must be integers, got {positions.dtype}")
    n_tokens = positions.shape[1]
    if not 1 <= n_tokens <= MAX_QUERIES:
        raise InputError(f"positions have T={n_tokens} new tokens; rope_decode_attention serves"
                         f" 1 to {MAX_QUERIES}")
    if n_tokens > seq_len:
        raise InputError(f"{n_tokens} new tokens do not fit a cache of {seq_len} positions")
    rc.check_parts(parts, inv_freq, batch, n_tokens, n_head, n_kv_head, head_dim)
    return cache_shape


def rope_decode_attention(parts: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                          k_cache: jax.Array, v_cache: jax.Array, *, n_head: int,
                          n_kv_head: int, layer: jax.Array | None = None,
                          block_sizes: BlockSizes | None = None, interpret: bool = False):
    """`rope_cache.rope_cache_write` then `decode_attention`, in one Pallas launch.

    The q/k/v partial sums are added, q and k rotated, the new k and v written into the cache in
    place, and the new queries attend over the cache: the results of the two kernels (within
    float32 rounding: the new keys are added to the online softmax as a block of their own).

    Grid (B, K, split_s), as `decode_attention`'s. Program (b, kh, i) adds and rotates the
    partial sums of its G query heads and of KV head kh's new key and value in registers
    (rounded to the cache's dtype, as the cache would hand them back). It reads the cache only
    below row first = clamp(positions[b, 0], 0, S - T), where the T new tokens go, and takes
    the new keys from its registers; the last split (i = split_s - 1) alone adds them to its
    online softmax and writes them to rows first .. first + T - 1. No program reads a row that
    another writes, so the launch is race-free when all programs run at once.

    Args:
        parts: [P, B * T, (N + 2 K) * H] float32, the fused q/k/v projection's K-split partial
            sums (P a power of two; P = 1 for a summed projection), rows in (b, t) order.
        positions: [B, T] integer absolute positions, consecutive along T; query (b, t) sees
            cache row j iff j <= positions[b, t] (the new tokens sit at rows first + t).
        inv_freq: [R] float32 RoPE frequencies of the first R pairs of each head (R <= H / 2;
            the other pairs are not rotated).
        k_cache, v_cache: [B, S, K, H] float32, bfloat16 or float16, or stacked [L, B, S, K, H]
            with `layer`; donated and updated in place (two different arrays). Rows at and past
            `first` may hold anything (NaN included) before the call.
        n_head, n_kv_head: N and K (static), N a multiple of K.
        layer: integer scalar index into stacked caches (may be traced), or None.
        block_sizes: tiling; `BlockSizes.get_default(B, K, S)` when None.
        interpret: run the Pallas interpreter (CPU) instead of compiling for the GPU.

    Returns:
        (attention [B, T, N, H] float32, k_cache, v_cache).

    Raises:
        InputError: shapes, dtypes or tiling the kernel cannot take (before anything runs).
    """
    if k_cache is v_cache:
        raise InputError("k_cache and v_cache are the same array; each is written in place")
    return _rope_decode_attention(parts, positions, inv_freq, k_cache, v_cache, n_head=n_head,
                                  n_kv_head=n_kv_head, layer=layer, block_sizes=block_sizes,
                                  interpret=interpret)


@functools.partial(jax.jit, static_argnames=("n_head", "n_kv_head", "block_sizes", "interpret"),
                   donate_argnames=("k_cache", "v_cache"))
def _rope_decode_attention(parts, positions, inv_freq, k_cache, v_cache, *, n_head: int,
                           n_kv_head: int, layer=None, block_sizes: BlockSizes | None = None,
                           interpret: bool = False):
    """`rope_decode_attention`, jitted (its checks run at trace time)."""
    cache_shape = _check_rope_inputs(parts, positions, inv_freq, k_cache, v_cache, n_head,
                                     n_kv_head, layer)
    batch, _, _, head_dim = cache_shape
    n_tokens = positions.shape[1]
    p = plan((batch, n_tokens, n_head, head_dim), cache_shape, block_sizes)
    *out, k_new, v_new = _rope_launch(
        parts, positions.astype(jnp.int32), rc.pair_freq(inv_freq, head_dim), k_cache, v_cache,
        p, n_head=n_head, layer=qm._layer_index(layer), interpret=interpret)
    attn = combine(*out) if len(out) == 3 else out[0]
    return attn.reshape(batch, n_tokens, n_head, head_dim), k_new, v_new


def rope_decode_attention_reference(parts: jax.Array, positions: jax.Array,
                                    inv_freq: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                                    *, n_head: int, n_kv_head: int,
                                    layer: jax.Array | None = None,
                                    block_sizes: BlockSizes | None = None,
                                    interpret: bool = False):
    """Plain-jnp `rope_decode_attention` (same signature; `block_sizes` and `interpret` are
    ignored): `rope_cache_write_reference`'s rotation and cache write (any head counts), then
    `decode_attention_reference` over the written cache."""
    del block_sizes, interpret
    parts, positions, inv_freq, k_cache, v_cache = (
        jnp.asarray(a) for a in (parts, positions, inv_freq, k_cache, v_cache))
    _check_rope_inputs(parts, positions, inv_freq, k_cache, v_cache, n_head, n_kv_head, layer)
    layer = None if layer is None else qm._layer_index(layer)[0]
    q, k_new, v_new = rc._write_reference(parts, positions.astype(jnp.int32), inv_freq, k_cache,
                                          v_cache, n_head=n_head, n_kv_head=n_kv_head,
                                          layer=layer)
    return (decode_attention_reference(q, k_new, v_new, positions, layer=layer), k_new, v_new)


@functools.lru_cache(maxsize=None)
def rope_self_test(n_head: int, n_kv_head: int, head_dim: int, interpret: bool = False) -> None:
    """Compile and run `rope_decode_attention` once for these heads (one and eight new tokens,
    two partial sums, a stacked cache whose rows from the first new one on hold NaN) against
    `rope_decode_attention_reference`; once per process and shape. Raises what compiling or
    running raises, or NTransformerError when the result is wrong."""
    from ntransformer_jax.errors import NTransformerError
    import numpy as np
    rng = np.random.default_rng(0)
    s, width = 80, (n_head + 2 * n_kv_head) * head_dim
    inv_freq = jnp.asarray(10000.0 ** (-np.arange(head_dim // 2) * 2 / head_dim), jnp.float32)
    for t in (1, MAX_QUERIES):
        parts = jnp.asarray(rng.standard_normal((2, t, width)), jnp.float32)
        positions = jnp.arange(40, 40 + t, dtype=jnp.int32)[None]
        cache = rng.standard_normal((2, 2, 1, s, n_kv_head, head_dim)).astype(np.float32)
        cache[:, :, :, 40:] = np.nan
        got = rope_decode_attention(parts, positions, inv_freq, jnp.asarray(cache[0]),
                                    jnp.asarray(cache[1]), n_head=n_head, n_kv_head=n_kv_head,
                                    layer=jnp.int32(1), interpret=interpret)
        want = rope_decode_attention_reference(parts, positions, inv_freq, cache[0], cache[1],
                                               n_head=n_head, n_kv_head=n_kv_head, layer=1)
        live = np.s_[1, :, :40 + t]     # the rows of the layer that the call may change
        err = max(float(np.max(np.abs(np.asarray(got[0]) - np.asarray(want[0])))),
                  *(float(np.max(np.abs(np.asarray(a)[live] - np.asarray(b)[live])))
                    for a, b in zip(got[1:], want[1:])))
        if not err <= 1e-4:
            raise NTransformerError(f"rope_decode_attention self-test (N={n_head},"
                                    f" K={n_kv_head}, H={head_dim}, T={t}): max error {err:.3g}")
