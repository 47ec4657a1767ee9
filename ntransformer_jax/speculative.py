"""Speculative decoding: a small draft proposes k tokens, the target checks them in one pass.

The target reads its (possibly streamed) weights once for k+1 positions instead of once per
token. Acceptance follows the standard rejection rule (accept draft token d with probability
min(1, p(d) / q(d)); on rejection sample from max(0, p - q) renormalized; after k acceptances
sample one more from p), so the output distribution is the target's at any temperature. With
temperature 0 both sides are argmax and the output equals plain greedy decoding.

p and q are the final sampling distributions (after top-k / top-p / min-p and temperature), both
computed by `sampling.filter_logits`, so the rule holds for the filtered distribution too.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import time
from typing import TYPE_CHECKING, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntransformer_jax.errors import InputError
from ntransformer_jax.sampling import SamplingParams, ban_tokens, filter_logits

if TYPE_CHECKING:
    from ntransformer_jax.engine import Engine


@dataclasses.dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens the target accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


@functools.partial(jax.jit, static_argnames=("params",))
def distribution(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Sampling probabilities [n, V] from logits [n, V] (one-hot argmax when greedy)."""
    logits = ban_tokens(logits.astype(jnp.float32), params)
    if params.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filter_logits(logits, params) / params.temperature, axis=-1)


class ResidentLayersDraft:
    """A self-draft: the target's own device-resident layers only (streamed layers skipped),
    with the target's embeddings and head, and a KV cache of its own. It costs no PCIe traffic,
    so a tiered model drafts at resident speed; how often it agrees with the full model decides
    the acceptance rate.

    Provides what `speculative_tokens` uses of a draft: config, tokenizer, ctx_size,
    `_check_ids`, `_forward` and `_cached`.
    """

    def __init__(self, target: "Engine"):
        from ntransformer_jax import model as M
        if not target.layered:
            raise InputError("a resident-layers self-draft needs a tiered model (some layers streamed); "
                             "with every layer resident the draft would be the model itself")
        self._M = M
        self.target = target
        self.config = target.config
        self.tokenizer = target.tokenizer
        self.ctx_size = target.ctx_size
        self.layers = sorted(target.resident)
        if not self.layers:
            raise InputError("a resident-layers self-draft needs at least one layer in VRAM")
        shape = (1, self.ctx_size, self.config.n_kv_head, self.config.head_dim)
        self._caches = {i: M.KVCache(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
                        for i in self.layers}
        self._cached: list[int] = []

    def _check_ids(self, ids):
        return self.target._check_ids(ids)

    def _forward(self, ids: np.ndarray, pos: int, all_logits: bool) -> jax.Array:
        M, g, cfg = self._M, self.target.globals, self.config
        x = M.embed_jit(g.token_embd, jnp.asarray(np.atleast_2d(ids), jnp.int32))
        p = jnp.int32(pos)
        norms = self.target.norms
        h = M.first_norm_jit(x, norms[self.layers[0]], cfg.rms_eps,
                             self.target.resident[self.layers[0]].attn_output.kernel)
        # Each block ends with the norm of the next layer of the draft (the output norm last).
        nxt = [norms[i] for i in self.layers[1:]] + [g.output_norm]
        for i, next_norm in zip(self.layers, nxt):
            x, h, self._caches[i] = M.block(cfg, self.target.resident[i], x, h, self._caches[i], p,
                                            g.rope_inv_freq, next_norm)
        if not all_logits:
            h = h[:, -1]
        return M.head_jit(g.output, h)


def check_compatible(target: "Engine", draft: "Engine") -> None:
    """The draft must speak the target's vocabulary."""
    if draft.config.n_vocab != target.config.n_vocab:
        raise InputError(f"draft model vocabulary ({draft.config.n_vocab}) differs from the target's "
                         f"({target.config.n_vocab})")
    probe = range(0, target.config.n_vocab, max(1, target.config.n_vocab // 97))
    if any(target.tokenizer.token_bytes(i) != draft.tokenizer.token_bytes(i) for i in probe):
        raise InputError("draft model tokenizer differs from the target's (same vocabulary needed)")


def _pick(p: np.ndarray, rng: np.random.Generator) -> int:
    p = np.asarray(p, np.float64)
    return int(rng.choice(len(p), p=p / p.sum()))


def _draw(p: np.ndarray, greedy: bool, rng: np.random.Generator) -> int:
    """The token a distribution gives: its argmax when greedy, else a sample."""
    return int(np.argmax(p)) if greedy else _pick(p, rng)


def resolve(ps: np.ndarray, qs: Sequence[np.ndarray], drafted: Sequence[int], greedy: bool,
            rng: np.random.Generator) -> tuple[list[int], int]:
    """The rejection rule for one round.

    Args:
      ps: [k+1, V] target distributions at the positions after `last`, d1, ..., dk.
      qs: k draft distributions the drafts were sampled from.
      drafted: the k draft tokens.
      greedy: compare argmaxes instead of sampling.
    Returns:
      (accepted draft tokens, the next token: the correction after a rejection, else a bonus
      token from ps[k]).
    """
    good: list[int] = []
    for i, d in enumerate(drafted):
        ok = (int(np.argmax(ps[i])) == d) if greedy else \
            rng.random() < min(1.0, ps[i][d] / max(qs[i][d], 1e-30))
        if not ok:
            break
        good.append(d)
    m = len(good)
    if greedy or m == len(drafted):
        return good, _draw(ps[m], greedy, rng)
    residual = np.maximum(np.asarray(ps[m], np.float64) - qs[m], 0.0)
    return good, _pick(residual if residual.sum() > 0 else ps[m], rng)


def speculative_tokens(target: "Engine", draft: "Engine", prompt_ids: Sequence[int], *,
                       k: int, max_new_tokens: int, params: SamplingParams, seed: int | None,
                       stats: SpeculativeStats) -> Iterator[int]:
    """Yield the target's continuation of `prompt_ids`, drafting `k` tokens a round.

    Both engines start from a fresh context. Stops at end-of-generation, `max_new_tokens`
    or the target's ctx_size.
    """
    if params.repeat_penalty != 1.0:
        raise InputError("speculative decoding does not support repeat_penalty != 1")
    if k < 1:
        raise InputError(f"draft_k={k} must be >= 1")
    ids = target._check_ids(prompt_ids)
    if ids.size == 0:
        raise InputError("the prompt is empty (no tokens to start from)")
    ctx = min(target.ctx_size, draft.ctx_size)
    if ids.size >= ctx:
        raise InputError(f"prompt of {ids.size} tokens does not fit in ctx_size={ctx}")
    rng = np.random.default_rng(secrets.randbits(63) if seed is None or seed < 0 else seed)
    gs = target.last_stats = type(target.last_stats)(prompt_tokens=int(ids.size))
    t0 = time.perf_counter()

    # Prefill both; the first token comes from the target alone.
    target._cached = []
    draft._cached = []
    p0 = np.asarray(distribution(target._forward(ids, 0, all_logits=False), params))[0]
    tokens = [int(t) for t in ids]
    last = _draw(p0, params.greedy, rng)
    n_target = len(tokens)          # target cache holds tokens[:n_target]
    n_draft = 0                     # draft cache holds tokens[:n_draft]
    emitted = 0
    gs.prompt_seconds = time.perf_counter() - t0
    t_gen = time.perf_counter()

    def emit(tok: int) -> bool:
        """Record a token; False when generation must stop."""
        nonlocal emitted
        gs.generated_tokens += 1
        gs.generate_seconds = time.perf_counter() - t_gen
        if target.tokenizer.is_eog(tok):
            gs.stop_reason = "eog"
            return False
        emitted += 1
        return True

    try:
        if not emit(last):
            return
        yield last
        gs.stop_reason = "max_new_tokens"
        while emitted < max_new_tokens:
            room = ctx - n_target - 1                # positions left after feeding `last`
            if room < 0:
                gs.stop_reason = "ctx_size"
                return
            kk = min(k, room, max_new_tokens - emitted)

            # Draft kk tokens after `last`.
            feed = np.asarray(tokens[n_draft:] + [last], np.int32)
            logits = draft._forward(feed, n_draft, all_logits=False)
            n_draft = n_target + 1
            drafted, qs = [], []
            for i in range(kk):
                q = np.asarray(distribution(logits, params))[0]
                d = _draw(q, params.greedy, rng)
                drafted.append(d)
                qs.append(q)
                if i + 1 < kk:
                    logits = draft._forward(np.asarray([d], np.int32), n_draft, all_logits=False)
                    n_draft += 1

            # Verify all of them in one target pass over kk + 1 positions.
            ps = np.asarray(distribution(target._forward(np.asarray([last] + drafted, np.int32),
                                                         n_target, all_logits=True), params))
            stats.rounds += 1
            stats.drafted += kk
            tokens.append(last)
            good, nxt = resolve(ps, qs, drafted, params.greedy, rng)
            stats.accepted += len(good)
            for d in good:
                if not emit(d):
                    return
                yield d
                tokens.append(d)
                if emitted >= max_new_tokens:
                    return
            n_target = len(tokens)                    # last and the accepted drafts are in the cache
            n_draft = min(n_draft, n_target)
            last = nxt
            if not emit(last):
                return
            yield last
    finally:
        target._cached = tokens[:n_target]   # what the target's cache holds, however generation ended
