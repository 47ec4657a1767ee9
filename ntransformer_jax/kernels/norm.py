"""Residual add + RMSNorm in one kernel, for decode rows: (x + sum(parts), rms_norm(x + sum(parts)) * w).

XLA compiles `x + delta`, the mean of squares and the scaling as three kernels; in a decode step
each is a few microseconds of work beside a ~2 us gap between dependent kernels, twice per layer.
This kernel does all three in one pass per row and also adds the K-split partial sums of the
matrix-vector kernel that produced `delta` (`qmatvec_packed(..., sum_splits=False)`), so that sum
needs no kernel of its own either.

One program per row of x (decode: 1 to 8 rows); the row (D values) lives in registers, so D must
be a power of two (Triton tiles), which Llama widths are (2048 .. 16384); other widths take the
XLA path in the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ntransformer_jax.errors import InputError
from ntransformer_jax.kernels import qmatvec as qm

MAX_ROWS = 8
NUM_WARPS: int | None = None   # warps of the one program per row; None: `default_warps(D)`


def default_warps(d: int) -> int:
    """Warps of the one program per row of width d: 16 at D = 4096 (8B Q8_0 tg128 +1.0-2.3% over
    4 warps on an H100, benchmarks/RESULTS.md session 12), 4 below, 8 above (not yet swept)."""
    return 4 if d < 4096 else 16 if d == 4096 else 8


def supports(n_rows: int, width: int) -> bool:
    """Whether `add_rms_norm` takes x of [n_rows, width]."""
    return 1 <= n_rows <= MAX_ROWS and width >= 16 and width & (width - 1) == 0


def _kernel(*refs, eps: float, stacked: bool, has_parts: bool, has_norm: bool = True):
    """x_ref [D], parts_ref [P, D] (if any), w_ref [D] (or [L, D] with layer_ref [1]; absent
    without the norm) -> h_out [D] (with the norm) and, with parts, x_out [D]."""
    if stacked:
        layer_ref, refs = refs[0], refs[1:]
    if has_parts:
        x_ref, parts_ref, *refs = refs
        x = x_ref[...] + jnp.sum(parts_ref[...], axis=0)
    else:
        x_ref, *refs = refs
        x = x_ref[...]
    if not has_norm:
        refs[0][...] = x
        return
    w_ref, *outs = refs
    if has_parts:
        outs[0][...] = x
    w = w_ref[layer_ref[0], :] if stacked else w_ref[...]
    ms = jnp.sum(x * x) / x.shape[0]
    outs[-1][...] = x * lax.rsqrt(ms + eps) * w


def _check(x: jax.Array, parts: jax.Array, weight: jax.Array, layer) -> None:
    if x.ndim != 2 or x.dtype != jnp.float32:
        raise InputError(f"x must be float32 [M, D], got {x.dtype} {list(x.shape)}")
    m, d = x.shape
    if not supports(m, d):
        raise InputError(f"x of shape {list(x.shape)}: add_rms_norm takes 1 to {MAX_ROWS} rows of a"
                         f" power-of-two width >= 16")
    if parts is None:
        pass
    elif parts.ndim != 3 or parts.shape[1:] != x.shape or parts.dtype != jnp.float32:
        raise InputError(f"parts must be float32 [P, {m}, {d}], got {parts.dtype} {list(parts.shape)}")
    elif parts.shape[0] < 1 or parts.shape[0] & (parts.shape[0] - 1):
        raise InputError(f"parts has {parts.shape[0]} partial sums; the kernel takes a power of two")
    if weight is None:
        if parts is None:
            raise InputError("add_rms_norm without a weight adds parts: give parts [P, M, D]")
        return
    want = (d,) if layer is None else weight.shape[:1] + (d,)
    if weight.ndim != len(want) or weight.shape[-1] != d:
        raise InputError(f"weight must be [{d}]" + ("" if layer is None else f" or [L, {d}] with layer=")
                         + f", got {list(weight.shape)}")


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_rms_norm(x: jax.Array, parts: jax.Array | None, weight: jax.Array, eps: float, *,
                 layer: jax.Array | None = None, interpret: bool = False):
    """Residual add then RMSNorm: x1 = x + sum(parts, 0); h = x1 / sqrt(mean(x1^2) + eps) * weight.

    Args:
        x: [M, D] float32, 1 <= M <= 8, D a power of two.
        parts: [P, M, D] float32 partial sums of the residual branch (P a power of two; P = 1 for
            a summed branch), or None: then only the norm of x (h alone is returned).
        weight: [D] float32 norm weight, or [L, D] stacked layers' weights with `layer`; or
            None: no norm, x1 alone is returned (`add_parts`).
        eps: the norm's epsilon (static).
        layer: int32 scalar index into a stacked `weight`, read inside the kernel.
        interpret: run the Pallas interpreter (CPU) instead of compiling for the GPU.

    Returns:
        (x1 [M, D], h [M, D]) float32; h alone when `parts` is None, x1 alone when `weight`
        is None.

    Raises:
        InputError: shapes or dtypes the kernel does not take.
    """
    _check(x, parts, weight, layer)
    m, d = x.shape
    row = pl.BlockSpec((None, d), lambda i: (i, 0))
    in_specs, operands = [row], [x]
    if parts is not None:
        in_specs.append(pl.BlockSpec((parts.shape[0], None, d), lambda i: (0, i, 0)))
        operands.append(parts)
    if weight is not None:
        in_specs.append(pl.BlockSpec(weight.shape, lambda i: (0,) * weight.ndim))
        operands.append(weight)
    if layer is not None:
        in_specs.insert(0, pl.BlockSpec((1,), lambda i: (0,)))
        operands.insert(0, qm._layer_index(layer))
    n_out = (parts is not None) + (weight is not None)
    out = pl.pallas_call(
        functools.partial(_kernel, eps=float(eps), stacked=layer is not None,
                          has_parts=parts is not None, has_norm=weight is not None),
        out_shape=(jax.ShapeDtypeStruct((m, d), jnp.float32),) * n_out,
        grid=(m,),
        in_specs=in_specs,
        out_specs=(row,) * n_out,
        compiler_params=plgpu.CompilerParams(
            num_warps=NUM_WARPS or default_warps(d), num_stages=1),
        interpret=interpret,
        name="add_rms_norm",
    )(*operands)
    return out if n_out == 2 else out[0]


def add_parts(x: jax.Array, parts: jax.Array, *, interpret: bool = False) -> jax.Array:
    """x + sum(parts, 0) for decode rows, the partial sums added in a fixed order by one kernel
    (a block's last residual add: XLA's fusion of it may round differently inside the resident
    layer loop than in a layer jitted alone, and logits must not depend on placement).

    Args:
        x: [M, D] float32, 1 <= M <= 8, D a power of two.
        parts: [P, M, D] float32 partial sums (P a power of two).
        interpret: run the Pallas interpreter (CPU) instead of compiling for the GPU.

    Raises:
        InputError: shapes or dtypes the kernel does not take.
    """
    if parts is None:
        raise InputError("add_parts needs parts [P, M, D]")
    return add_rms_norm(x, parts, None, 0.0, interpret=interpret)


def add_rms_norm_reference(x: jax.Array, parts: jax.Array | None, weight: jax.Array, eps: float, *,
                           layer: jax.Array | None = None, interpret: bool = False):
    """Plain-jnp `add_rms_norm` (same signature; `interpret` is ignored)."""
    del interpret
    w = weight if layer is None else weight[layer]
    x1 = x if parts is None else x + jnp.sum(parts, axis=0)
    ms = jnp.mean(jnp.square(x1), axis=-1, keepdims=True)
    h = x1 * lax.rsqrt(ms + eps) * w
    return h if parts is None else (x1, h)


@functools.lru_cache(maxsize=None)
def self_test(width: int, interpret: bool = False) -> None:
    """Compile and run the kernel once for rows of `width` (with and without parts, a stacked
    weight) against `add_rms_norm_reference`; once per process and width. Raises what compiling
    or running raises, or NTransformerError when the result is wrong."""
    import numpy as np
    from ntransformer_jax.errors import NTransformerError
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, width)), jnp.float32)
    parts = jnp.asarray(rng.standard_normal((2, 2, width)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 1.5, (3, width)), jnp.float32)
    for p in (parts, None):
        got = add_rms_norm(x, p, w, 1e-5, layer=jnp.int32(2), interpret=interpret)
        want = add_rms_norm_reference(x, p, w, 1e-5, layer=2)
        got, want = (got, want) if p is not None else ((got,), (want,))
        err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(got, want))
        if not err <= 1e-4:
            raise NTransformerError(f"add_rms_norm self-test (D={width}): max error {err:.3g}")
    err = float(np.max(np.abs(np.asarray(add_parts(x, parts, interpret=interpret))
                              - np.asarray(x + parts.sum(0)))))
    if not err <= 1e-5:
        raise NTransformerError(f"add_parts self-test (D={width}): max error {err:.3g}")
