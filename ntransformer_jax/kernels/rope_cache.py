"""RoPE on the new queries and keys, and the KV cache write, in one kernel (decode path).

After the fused q/k/v matrix-vector kernel, XLA compiles the split-K sum, the two rotations and
the two cache updates (each a bounds-checked dynamic-update-slice) as five kernels per layer, each
a few microseconds of work beside a ~2 us gap between dependent kernels. This kernel takes the
q/k/v kernel's K-split partial sums as they are (`qmatvec_packed(..., sum_splits=False)`), adds
them, rotates q and k, writes k and v into the cache in place (the cache buffers are aliased to
the outputs, so the rest of the cache is untouched) and returns the rotated q.

Pairs. llama.cpp's RoPE for `llama` rotates adjacent pairs (x[2i], x[2i+1]) of each head. The
wrapper views the last axis as [heads, H/2, 2] (a reshape, no copy) and the kernel loads the
even and odd members as two strided tiles [heads, H/2], so the rotation is plain elementwise
arithmetic: (x0 cos - x1 sin, x0 sin + x1 cos), with the angle position * inv_freq[i] computed in
float32 as `model.apply_rope` does. Pairs past n_rot / 2 (partial rotary) get frequency 0, which
leaves them unchanged.

Cache rows. Like `lax.dynamic_update_slice` of the T new rows of batch row b at its first
position, the write starts at clamp(positions[b, 0], 0, S - T), so it never leaves the buffer.

One program per new token (grid B x T); every tile dimension (heads, H / 2, the number of
partial sums) must be a power of two (Triton tiles): `supports` says when.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ntransformer_jax.errors import InputError
from ntransformer_jax.kernels import qmatvec as qm

MAX_TOKENS = 8
CACHE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(n_tokens: int, n_head: int, n_kv_head: int, head_dim: int) -> bool:
    """Whether `rope_cache_write` takes T new tokens of these head counts and size."""
    return (1 <= n_tokens <= MAX_TOKENS and _is_pow2(n_head) and _is_pow2(n_kv_head)
            and head_dim >= 4 and _is_pow2(head_dim))


def rotate_pairs(x0: jax.Array, x1: jax.Array, angle: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The pairs (x0, x1) rotated by `angle` (broadcast against them), in float32 as
    `model.apply_rope` does: (x0 cos - x1 sin, x0 sin + x1 cos). Also used inside kernels."""
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return x0 * cos - x1 * sin, x0 * sin + x1 * cos


def pair_freq(inv_freq: jax.Array, head_dim: int) -> jax.Array:
    """inv_freq [R] padded with zeros to [H / 2] float32: pairs past R (partial rotary) get
    frequency 0, which leaves them unchanged."""
    return jnp.pad(inv_freq.astype(jnp.float32), (0, head_dim // 2 - inv_freq.shape[0]))


def _kernel(*refs, n_head: int, n_kv_head: int, n_tokens: int, seq_len: int, stacked: bool):
    """refs: [layer [1]], positions [B, T], freq [H/2], parts [P, B*T, N+2K, H/2, 2], then the
    outputs q [B*T, N, H/2, 2] and the k and v caches [(L,) B, S, K, H/2, 2]."""
    if stacked:
        lead, refs = (refs[0][0],), refs[1:]
    else:
        lead = ()
    pos_ref, freq_ref, parts_ref, q_out, k_out, v_out = refs
    b, t = pl.program_id(0), pl.program_id(1)
    row = b * n_tokens + t
    pos = pos_ref[b, t]
    angle = (pos.astype(jnp.float32) * freq_ref[...])[None, :]   # [1, H/2]

    def pair(start, count):
        """The summed even and odd members [count, H/2] of heads [start, start + count)."""
        half = lambda j: jnp.sum(parts_ref[:, row, pl.ds(start, count), :, j], axis=0)
        return half(0), half(1)

    def rotated(start, count):
        return rotate_pairs(*pair(start, count), angle)

    q0, q1 = rotated(0, n_head)
    q_out[row, :, :, 0] = q0
    q_out[row, :, :, 1] = q1

    cache_row = jnp.clip(pos_ref[b, 0], 0, seq_len - n_tokens) + t
    at = (*lead, b, cache_row, slice(None), slice(None))
    k0, k1 = rotated(n_head, n_kv_head)
    v0, v1 = pair(n_head + n_kv_head, n_kv_head)
    for ref, (lo, hi) in ((k_out, (k0, k1)), (v_out, (v0, v1))):
        ref[(*at, 0)] = lo.astype(ref.dtype)
        ref[(*at, 1)] = hi.astype(ref.dtype)


def _check(parts, positions, inv_freq, k_cache, v_cache, n_head, n_kv_head, layer) -> None:
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise InputError(f"k and v caches differ: {k_cache.dtype} {list(k_cache.shape)} vs"
                         f" {v_cache.dtype} {list(v_cache.shape)}")
    want_ndim = 5 if layer is not None else 4
    if k_cache.ndim != want_ndim:
        form = "[L, B, S, K, H] (stacked, with layer=)" if layer is not None else "[B, S, K, H]"
        raise InputError(f"caches must be {form}, got {list(k_cache.shape)}")
    if k_cache.dtype not in CACHE_DTYPES:
        raise InputError(f"cache dtype {k_cache.dtype} is not float32, bfloat16 or float16")
    batch, seq_len, kv_heads, head_dim = k_cache.shape[-4:]
    if kv_heads != n_kv_head:
        raise InputError(f"caches have {kv_heads} KV heads, expected {n_kv_head=}")
    if positions.ndim != 2 or positions.shape[0] != batch:
        raise InputError(f"positions must be [B={batch}, T], got {list(positions.shape)}")
    n_tokens = positions.shape[1]
    if not supports(n_tokens, n_head, n_kv_head, head_dim):
        raise InputError(f"rope_cache_write takes 1 to {MAX_TOKENS} tokens and power-of-two head"
                         f" counts and size; got T={n_tokens}, {n_head=}, {n_kv_head=}, {head_dim=}")
    if n_tokens > seq_len:
        raise InputError(f"{n_tokens} new tokens do not fit a cache of {seq_len} positions")
    check_parts(parts, inv_freq, batch, n_tokens, n_head, n_kv_head, head_dim)


def check_parts(parts, inv_freq, batch: int, n_tokens: int, n_head: int, n_kv_head: int,
                head_dim: int) -> None:
    """The q/k/v partial sums [P, B * T, (N + 2 K) * H] (float32, P a power of two) and the
    frequencies [R], 2 R <= H, of T new tokens of B rows (`attention.rope_decode_attention`
    takes them too)."""
    width = (n_head + 2 * n_kv_head) * head_dim
    if (parts.ndim != 3 or parts.shape[1:] != (batch * n_tokens, width)
            or parts.dtype != jnp.float32 or not _is_pow2(parts.shape[0])):
        raise InputError(f"parts must be float32 [P, {batch * n_tokens}, {width}] with P a power of"
                         f" two, got {parts.dtype} {list(parts.shape)}")
    if inv_freq.ndim != 1 or 2 * inv_freq.shape[0] > head_dim:
        raise InputError(f"inv_freq must be [R] with 2 R <= {head_dim=}, got {list(inv_freq.shape)}")


def rope_cache_write(parts: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                     k_cache: jax.Array, v_cache: jax.Array, *, n_head: int, n_kv_head: int,
                     layer: jax.Array | None = None, interpret: bool = False):
    """Sum the q/k/v partials, rotate q and k, write k and v into the cache.

    Args:
        parts: [P, B * T, (N + 2 K) * H] float32, the fused q/k/v projection's K-split partial
            sums (P a power of two; P = 1 for a summed projection), rows in (b, t) order.
        positions: [B, T] int32 absolute position of each new token (consecutive per row).
        inv_freq: [R] float32 RoPE frequencies of the first R pairs of each head (R <= H / 2).
        k_cache, v_cache: [B, S, K, H], or stacked [L, B, S, K, H] with `layer`; donated and
            updated in place (two different arrays).
        n_head, n_kv_head: N and K (static).
        layer: int32 scalar index into stacked caches (may be traced), or None.
        interpret: run the Pallas interpreter (CPU) instead of compiling for the GPU.

    Returns:
        (q [B, T, N, H] float32 rotated, k_cache, v_cache).

    Raises:
        InputError: shapes or dtypes the kernel does not take.
    """
    if k_cache is v_cache:
        raise InputError("k_cache and v_cache are the same array; each is written in place")
    return _rope_cache_write(parts, positions, inv_freq, k_cache, v_cache, n_head=n_head,
                             n_kv_head=n_kv_head, layer=layer, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("n_head", "n_kv_head", "interpret"),
                   donate_argnames=("k_cache", "v_cache"))
def _rope_cache_write(parts: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                     k_cache: jax.Array, v_cache: jax.Array, *, n_head: int, n_kv_head: int,
                     layer: jax.Array | None = None, interpret: bool = False):
    """`rope_cache_write`, jitted (its checks run at trace time)."""
    _check(parts, positions, inv_freq, k_cache, v_cache, n_head, n_kv_head, layer)
    batch, seq_len, _, head_dim = k_cache.shape[-4:]
    n_tokens = positions.shape[1]
    half = head_dim // 2
    freq = pair_freq(inv_freq, head_dim)
    pairs = lambda a: a.reshape(*a.shape[:-1], half, 2)
    parts = parts.reshape(parts.shape[0], batch * n_tokens, n_head + 2 * n_kv_head, half, 2)
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, t: (0,) * a.ndim)
    k_pairs, v_pairs = pairs(k_cache), pairs(v_cache)
    operands = [positions.astype(jnp.int32), freq, parts, k_pairs, v_pairs]
    if layer is not None:
        operands.insert(0, qm._layer_index(layer))
    n_in = len(operands)
    q_shape = jax.ShapeDtypeStruct((batch * n_tokens, n_head, half, 2), jnp.float32)
    q, k_new, v_new = pl.pallas_call(
        qm._drop_args(functools.partial(_kernel, n_head=n_head, n_kv_head=n_kv_head,
                                        n_tokens=n_tokens, seq_len=seq_len,
                                        stacked=layer is not None), n_in - 2, 2),
        out_shape=(q_shape, jax.ShapeDtypeStruct(k_pairs.shape, k_pairs.dtype),
                   jax.ShapeDtypeStruct(v_pairs.shape, v_pairs.dtype)),
        grid=(batch, n_tokens),
        in_specs=[whole(a) for a in operands],
        out_specs=(whole(q_shape), whole(k_pairs), whole(v_pairs)),
        input_output_aliases={n_in - 2: 1, n_in - 1: 2},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="rope_cache_write",
    )(*operands)
    return (q.reshape(batch, n_tokens, n_head, head_dim), k_new.reshape(k_cache.shape),
            v_new.reshape(v_cache.shape))


def rope_cache_write_reference(parts: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                               k_cache: jax.Array, v_cache: jax.Array, *, n_head: int,
                               n_kv_head: int, layer: jax.Array | None = None,
                               interpret: bool = False):
    """Plain-jnp `rope_cache_write` (same signature; `interpret` is ignored), built from the
    model's own rotation and the dynamic-update-slice the XLA path uses."""
    del interpret
    _check(parts, positions, inv_freq, k_cache, v_cache, n_head, n_kv_head, layer)
    return _write_reference(parts, positions, inv_freq, k_cache, v_cache, n_head=n_head,
                            n_kv_head=n_kv_head, layer=layer)


def _write_reference(parts, positions, inv_freq, k_cache, v_cache, *, n_head: int,
                     n_kv_head: int, layer=None):
    """`rope_cache_write_reference` without its checks (any head counts)."""
    from ntransformer_jax.model import apply_rope
    batch, _, _, head_dim = k_cache.shape[-4:]
    n_tokens = positions.shape[1]
    qkv = jnp.sum(parts, axis=0).reshape(batch, n_tokens, n_head + 2 * n_kv_head, head_dim)
    q = apply_rope(qkv[:, :, :n_head], positions, inv_freq)
    k = apply_rope(qkv[:, :, n_head:n_head + n_kv_head], positions, inv_freq)
    v = qkv[:, :, n_head + n_kv_head:]
    start = positions[:, 0]

    def write(cache, new):
        def one(c, x, p):
            if layer is None:
                return jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (p, 0, 0))
            return jax.lax.dynamic_update_slice(c, x[None].astype(c.dtype), (layer, p, 0, 0))
        return jax.vmap(one, in_axes=(0 if layer is None else 1, 0, 0),
                        out_axes=0 if layer is None else 1)(cache, new, start)
    return q, write(k_cache, k), write(v_cache, v)


@functools.lru_cache(maxsize=None)
def self_test(n_head: int, n_kv_head: int, head_dim: int, interpret: bool = False) -> None:
    """Compile and run the kernel once for these heads (stacked caches, two tokens of two batch
    rows, one at the cache's end) against `rope_cache_write_reference`; once per process and
    shape. Raises what compiling or running raises, or NTransformerError when it is wrong."""
    import numpy as np
    from ntransformer_jax.errors import NTransformerError
    rng = np.random.default_rng(0)
    width = (n_head + 2 * n_kv_head) * head_dim
    parts = jnp.asarray(rng.standard_normal((2, 4, width)), jnp.float32)
    positions = jnp.asarray([[3, 4], [10, 11]], jnp.int32)
    inv_freq = jnp.asarray(10000.0 ** (-np.arange(head_dim // 2) * 2 / head_dim), jnp.float32)
    cache = rng.standard_normal((3, 2, 12, n_kv_head, head_dim)).astype(np.float32)
    got = rope_cache_write(parts, positions, inv_freq, jnp.asarray(cache), jnp.asarray(cache),
                           n_head=n_head, n_kv_head=n_kv_head, layer=jnp.int32(1),
                           interpret=interpret)
    want = rope_cache_write_reference(parts, positions, inv_freq, jnp.asarray(cache),
                                      jnp.asarray(cache), n_head=n_head, n_kv_head=n_kv_head,
                                      layer=jnp.int32(1))
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(got, want))
    if not err <= 1e-4:
        raise NTransformerError(f"rope_cache_write self-test (N={n_head}, K={n_kv_head},"
                                f" H={head_dim}): max error {err:.3g}")
