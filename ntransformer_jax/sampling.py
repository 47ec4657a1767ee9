"""Token sampling on device, in llama.cpp's default order.

Chain: banned tokens -> repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
With temperature 0 the chain ends in argmax after the penalty (greedy). Candidates removed by a
filter get -inf.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from ntransformer_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Hashable: passed to jit as a static argument.

    Attributes:
      temperature: 0 means greedy; otherwise logits are divided by it after the filters.
      top_k: keep the k most likely tokens (0 disables).
      top_p: keep the smallest set whose probability reaches p (1.0 disables).
      min_p: drop tokens whose probability is below min_p times the best one's (0 disables).
      repeat_penalty: divide positive / multiply negative logits of recently seen tokens (1.0 disables).
      repeat_last_n: how many recent tokens the penalty looks at.
      banned: token ids never sampled (their logits become -inf first, as llama.cpp's logit
        bias of -inf; the engine's `ignore_eos` bans the end-of-generation tokens this way).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    banned: tuple[int, ...] = ()

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:
            raise InputError(f"temperature={self.temperature} must be a finite number >= 0")
        if self.top_k < 0:
            raise InputError(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise InputError(f"min_p={self.min_p} must be in [0, 1]")
        if not 0 < self.repeat_penalty < math.inf:
            raise InputError(f"repeat_penalty={self.repeat_penalty} must be a finite number > 0")
        if self.repeat_last_n < 0:
            raise InputError(f"repeat_last_n={self.repeat_last_n} must be >= 0")
        if not isinstance(self.banned, tuple) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.banned):
            raise InputError(f"banned={self.banned!r} must be a tuple of token ids (ints >= 0)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repeat_penalty(logits: jax.Array, recent: jax.Array, penalty: float) -> jax.Array:
    """logits [B, V]; recent [B, W] token ids, -1 for empty slots."""
    v = logits.shape[-1]
    hits = jax.vmap(lambda r: jnp.zeros((v,), bool).at[jnp.where(r >= 0, r, v)].set(True, mode="drop"))(recent)
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(hits, penalized, logits)


def ban_tokens(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """logits [B, V] with `params.banned` at -inf (ids past the vocabulary are the engine's
    error to report; here they are dropped)."""
    if not params.banned:
        return logits
    return logits.at[:, jnp.asarray(params.banned, jnp.int32)].set(-jnp.inf, mode="drop")


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Apply top-k, top-p and min-p to logits [B, V] (at temperature 1, as llama.cpp does)."""
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, neg)
    if params.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs          # mass of strictly better tokens
        keep_sorted = before < params.top_p                  # keeps the token that crosses p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    if params.min_p > 0.0:
        best = jnp.max(logits, axis=-1, keepdims=True)
        logits = jnp.where(logits >= best + jnp.log(params.min_p), logits, neg)
    return logits


@functools.partial(jax.jit, static_argnames=("params",))
def sample(logits: jax.Array, recent: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """Pick one token per row.

    Args:
      logits: [B, V] float32 logits of the last position.
      recent: [B, W] int32 recently seen tokens (-1 = none), for the repetition penalty.
      key: a PRNG key (unused when greedy).
      params: static sampling settings.
    Returns:
      [B] int32 token ids.
    """
    logits = ban_tokens(logits.astype(jnp.float32), params)
    if params.repeat_penalty != 1.0:
        logits = apply_repeat_penalty(logits, recent, params.repeat_penalty)
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits, params) / params.temperature
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
