"""Synthetic Llama GGUF files: random weights of real Llama-3.x shapes, written at disk speed.

The files are valid `llama` GGUFs that llama.cpp loads (metadata, a generated SentencePiece-style
vocabulary, Llama-3.1 `rope_freqs.weight`), so the engine can be tested and benchmarked on 8B..405B
shapes without downloading weights, and compared with llama.cpp on the very same file.

Quantized tensors are built directly as random blocks (random integer quants and f16 scales chosen so
the dequantized values have the intended standard deviation), never by running a quantizer over
float weights. Large tensors draw their blocks from a small pool of random blocks (random pick per
block), so a 40 GB file is written chunk by chunk with flat memory while generation overlaps the
disk writes on a background thread.

CLI:
    python -m ntransformer_jax.synth --shape 8b --quant Q4_0 --out /tmp/llama-8b-q4_0.gguf
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import itertools
import math
import os
import queue
import string
import sys
import threading
import time
from typing import Callable, Iterator, NamedTuple

import gguf
import numpy as np

from ntransformer_jax.errors import InputError, NTransformerError

QT = gguf.GGMLQuantizationType
_N_FIXED_TOKENS = 3 + 256     # <unk> <s> </s>, then <0x00>..<0xFF>

# ======================================================================================
# Shapes
# ======================================================================================


@dataclasses.dataclass(frozen=True)
class SynthShape:
    """Hyperparameters of a synthetic Llama model (Llama-3.x conventions)."""

    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_kv_head: int
    n_vocab: int
    ctx_len: int
    rope_base: float = 500000.0
    rms_eps: float = 1e-5
    rope_freqs: bool = True     # write Llama-3.1 scaling factors `rope_freqs.weight` [head_dim / 2]
    tied_output: bool = False   # no `output.weight`: llama.cpp then reuses `token_embd.weight`

    def __post_init__(self):
        for name in ("n_layers", "n_embd", "n_ff", "n_head", "n_kv_head", "n_vocab", "ctx_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InputError(f"SynthShape.{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise InputError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise InputError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise InputError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.n_vocab < _N_FIXED_TOKENS + 1:
            raise InputError(f"n_vocab={self.n_vocab} must be at least {_N_FIXED_TOKENS + 1} "
                             "(3 special tokens, 256 byte tokens, one piece)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.n_kv_head * self.head_dim


_LLAMA3 = dict(n_vocab=128256, ctx_len=131072)
SHAPES: dict[str, SynthShape] = {
    "tiny": SynthShape(n_layers=2, n_embd=256, n_ff=512, n_head=4, n_kv_head=2, n_vocab=512, ctx_len=512),
    "1b": SynthShape(n_layers=16, n_embd=2048, n_ff=8192, n_head=32, n_kv_head=8, **_LLAMA3),
    "3b": SynthShape(n_layers=28, n_embd=3072, n_ff=8192, n_head=24, n_kv_head=8, **_LLAMA3),
    "8b": SynthShape(n_layers=32, n_embd=4096, n_ff=14336, n_head=32, n_kv_head=8, **_LLAMA3),
    "70b": SynthShape(n_layers=80, n_embd=8192, n_ff=28672, n_head=64, n_kv_head=8, **_LLAMA3),
    "405b": SynthShape(n_layers=126, n_embd=16384, n_ff=53248, n_head=128, n_kv_head=8, **_LLAMA3),
}


def llama3_rope_factors(head_dim: int, rope_base: float, *, factor: float = 8.0,
                        low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                        original_ctx: int = 8192) -> np.ndarray:
    """Llama-3.1 RoPE scaling factors, as stored in `rope_freqs.weight` [head_dim / 2].

    llama.cpp divides each rotation frequency `rope_base ** (-2i / head_dim)` by its factor:
    1 for short wavelengths (< original_ctx / high_freq_factor), `factor` for long ones
    (> original_ctx / low_freq_factor), and a smooth blend in between.
    """
    inv_freq = rope_base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2.0 * math.pi / inv_freq
    smooth = (original_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = 1.0 / ((1.0 - smooth) / factor + smooth)
    factors = np.where(wavelen < original_ctx / high_freq_factor, 1.0,
                       np.where(wavelen > original_ctx / low_freq_factor, factor, blended))
    return factors.astype(np.float32)


# ======================================================================================
# Quant mixes: which GGML type each tensor gets
# ======================================================================================


class _Mix(NamedTuple):
    ftype: int        # llama.cpp LLAMA_FTYPE, written as general.file_type
    base: QT          # the type of most 2-D tensors (llama.cpp's "default type" of the ftype)


_MIXES: dict[str, _Mix] = {
    "F32": _Mix(0, QT.F32),
    "F16": _Mix(1, QT.F16),
    "Q4_0": _Mix(2, QT.Q4_0),
    "Q4_1": _Mix(3, QT.Q4_1),
    "Q8_0": _Mix(7, QT.Q8_0),
    "Q5_0": _Mix(8, QT.Q5_0),
    "Q5_1": _Mix(9, QT.Q5_1),
    "Q4_K_M": _Mix(15, QT.Q4_K),
    "Q5_K_M": _Mix(17, QT.Q5_K),
    "Q6_K": _Mix(18, QT.Q6_K),
}
QUANTS: tuple[str, ...] = tuple(_MIXES)

# llama.cpp's fallback when a row length is not a multiple of the block size
_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def _fit_row(qtype: QT, n_cols: int) -> QT:
    """llama.cpp's per-row fallback: K-quants -> 32-blocks, then F16 if even that does not fit."""
    if n_cols % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = _FALLBACK.get(qtype, qtype)
        if n_cols % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = QT.F16
    return qtype


def tensor_type(name: str, n_cols: int, shape: SynthShape, quant: str, *, pure: bool = False) -> QT:
    """The GGML type of one 2-D weight tensor, following llama.cpp's rules for `llama` models.

    This mirrors `llama_tensor_get_type` (src/llama-quant.cpp) for the ftypes offered here, with no
    importance matrix, so a file written by `write_synthetic` has the same per-tensor types as
    llama.cpp's own quantizer would give it:

    * F32 / F16: every 2-D tensor is F32 / F16. 1-D tensors (norms, rope_freqs) are always F32.
    * `output.weight` (or `token_embd.weight` when the output is tied): Q6_K, except Q8_0 when
      the base type is Q8_0 or the row length is not a multiple of the base block size.
    * Q4_K_M / Q5_K_M: `attn_v` and `ffn_down` of layer i are Q6_K when `use_more_bits(i, n)`,
      i.e. `i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2` (integer division); every other tensor,
      `token_embd` included, is the base type Q4_K / Q5_K.
    * llama.cpp's 70B rule: with 80 layers and GQA (n_head != n_kv_head), an `attn_v` that would be
      Q4_K becomes Q5_K.
    * Plain types (Q4_0, Q8_0, Q6_K, ...): the base type everywhere but the output.
    * Rows that do not split into whole blocks fall back: Q4_K -> Q5_0, Q5_K -> Q5_1,
      Q6_K -> Q8_0, then F16.

    Args:
      name: GGUF tensor name, e.g. "blk.3.attn_v.weight".
      n_cols: the row length (ggml ne0).
      shape: the model hyperparameters.
      quant: one of QUANTS.
      pure: like `llama-quantize --pure`: the base type for every 2-D tensor (output included).

    Returns:
      The GGML type.
    """
    if quant not in _MIXES:
        raise InputError(f"{quant=} is not one of {', '.join(QUANTS)}")
    base = _MIXES[quant].base
    if base in (QT.F32, QT.F16):
        return base
    if pure:
        return _fit_row(base, n_cols)
    is_output = name == "output.weight" or (shape.tied_output and name == "token_embd.weight")
    if is_output:
        if n_cols % gguf.GGML_QUANT_SIZES[base][0] or base == QT.Q8_0:
            return QT.Q8_0
        return _fit_row(QT.Q6_K, n_cols)
    qtype = base
    if name.startswith("blk."):
        i_layer = int(name.split(".")[1])
        more_bits = quant in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_layer, shape.n_layers)
        if name.endswith("attn_v.weight"):
            if more_bits:
                qtype = QT.Q6_K
            if shape.n_layers == 80 and shape.n_head != shape.n_kv_head and qtype == QT.Q4_K:
                qtype = QT.Q5_K
        elif name.endswith("ffn_down.weight") and more_bits:
            qtype = QT.Q6_K
    return _fit_row(qtype, n_cols)


RESIDUAL_GAIN = 16.0


class TensorSpec(NamedTuple):
    """One tensor of the file: name, numpy shape [rows, cols] (ggml order reversed), type, std."""

    name: str
    shape: tuple[int, ...]
    qtype: QT
    std: float            # target std of the (dequantized) values; 1-D tensors: noise around `mean`
    mean: float = 0.0


def tensor_plan(shape: SynthShape, quant: str, *, pure: bool = False) -> list[TensorSpec]:
    """Every tensor of the synthetic file, in file order (rope_freqs, token_embd, layers, output).

    Scales keep activations bounded through any depth: matrices are N(0, 1/fan_in), so every
    matmul maps unit-RMS inputs to unit-RMS outputs; the two matrices that write into the residual
    stream (attn_output, ffn_down) are multiplied by RESIDUAL_GAIN / sqrt(2 * n_layers), so the
    residual stream ends near RMS ~ 0.7 * RESIDUAL_GAIN at any depth (measured: 80 and 126 layers).
    RMSNorm makes the stream's overall scale irrelevant to the outputs; the gain of 16 gives
    weight magnitudes like real checkpoints (8B ffn_down std 0.017) and keeps most f16 block scales
    out of the f16 subnormal range (at 70B/405B the K-quant and Q8_0 scales of attn_output and
    ffn_down are still f16 subnormals, as in real files of that size).
    The embedding has std 1/sqrt(n_embd) (Llama-like; also gives O(1) logits when tied).
    Norm weights are 1 + N(0, 0.02).
    """
    e, f, kv, n = shape.n_embd, shape.n_ff, shape.n_embd_kv, shape.n_layers
    resid = RESIDUAL_GAIN / math.sqrt(2.0 * n)

    def mat(name: str, rows: int, cols: int, std: float) -> TensorSpec:
        return TensorSpec(name, (rows, cols), tensor_type(name, cols, shape, quant, pure=pure), std)

    def norm(name: str) -> TensorSpec:
        return TensorSpec(name, (e,), QT.F32, 0.02, 1.0)

    specs = []
    if shape.rope_freqs:
        specs.append(TensorSpec("rope_freqs.weight", (shape.head_dim // 2,), QT.F32, 0.0))
    specs.append(mat("token_embd.weight", shape.n_vocab, e, 1.0 / math.sqrt(e)))
    for i in range(n):
        p = f"blk.{i}."
        specs += [
            norm(p + "attn_norm.weight"),
            mat(p + "attn_q.weight", e, e, 1.0 / math.sqrt(e)),
            mat(p + "attn_k.weight", kv, e, 1.0 / math.sqrt(e)),
            mat(p + "attn_v.weight", kv, e, 1.0 / math.sqrt(e)),
            mat(p + "attn_output.weight", e, e, resid / math.sqrt(e)),
            norm(p + "ffn_norm.weight"),
            mat(p + "ffn_gate.weight", f, e, 1.0 / math.sqrt(e)),
            mat(p + "ffn_up.weight", f, e, 1.0 / math.sqrt(e)),
            mat(p + "ffn_down.weight", e, f, resid / math.sqrt(f)),
        ]
    specs.append(norm("output_norm.weight"))
    if not shape.tied_output:
        specs.append(mat("output.weight", shape.n_vocab, e, 1.0 / math.sqrt(e)))
    return specs


def tensor_nbytes(spec: TensorSpec) -> int:
    block, size = gguf.GGML_QUANT_SIZES[spec.qtype]
    return math.prod(spec.shape) // block * size


# ======================================================================================
# Tokenizer: a generated SentencePiece-style (`llama`) vocabulary
# ======================================================================================

def _filler_pieces() -> Iterator[str]:
    """Unique pieces: "▁", printable ASCII characters, then "▁"+word and word over a..z by length."""
    yield "\u2581"
    yield from (c for c in string.printable if not c.isspace())
    letters = string.ascii_lowercase
    for length in itertools.count(1):
        for combo in itertools.product(letters, repeat=length):
            word = "".join(combo)
            yield "\u2581" + word
            if length > 1:
                yield word


def make_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A `llama` (SentencePiece) vocabulary of `n_vocab` tokens that llama.cpp accepts.

    Returns:
      (tokens, scores, token_types): <unk>=0, <s>=1, </s>=2, the 256 byte tokens <0xNN> (BYTE),
      then generated pieces with decreasing scores (NORMAL).
    """
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    n_fill = n_vocab - len(tokens)
    tokens += list(itertools.islice(_filler_pieces(), n_fill))
    scores += [-float(i) for i in range(1, n_fill + 1)]
    types += [gguf.TokenType.NORMAL] * n_fill
    return tokens, scores, [int(t) for t in types]


# ======================================================================================
# Random quantized blocks
# ======================================================================================
# Block layouts (ggml-common.h; gguf.quants dequantizers), all little-endian, f16 scales:
#   Q8_0  34 B: d, qs[32] int8                         x = d * q
#   Q4_0  18 B: d, qs[16] (lo nibble: x0..15, hi: x16..31)      x = d * (q - 8)
#   Q4_1  20 B: d, m, qs[16]                            x = d * q + m
#   Q5_0  22 B: d, qh u32 (bit i = bit 4 of q_i), qs[16] as Q4_0   x = d * (q - 16)
#   Q5_1  24 B: d, m, qh u32, qs[16]                    x = d * q + m
#   Q4_K 144 B: d, dmin, scales[12] (8 six-bit scales sc_j and mins m_j), qs[128]:
#               32-byte group g holds sub-block 2g in lo nibbles, 2g+1 in hi   x = d*sc_j*q - dmin*m_j
#   Q5_K 176 B: d, dmin, scales[12], qh[32] (bit j of byte i = bit 4 of sub-block j elem i), qs[128]
#   Q6_K 210 B: ql[128], qh[64], scales[16] int8, d:
#               element e of 256: half h = e // 128, r = e % 128:
#               ql[64h + r % 64] nibble r // 64 = low 4 bits; qh[32h + r % 32] bits 2*(r // 32) = high 2
#               x = d * sc_(e // 16) * (q - 32)
# Zero-mean choices: Q4_0/Q5_0 use a random sign on d (llama.cpp's quantizer also gives negative d);
# Q*_1 and Q4_K/Q5_K put the offset at the middle of the range; Q6_K has random-sign scales.

_POOL_BLOCKS = 1 << 16            # pool of random blocks per type, for large tensors
_FRESH_MAX_VALUES = 1 << 20       # tensors up to this many values get fully fresh blocks ...
_MIN_POOL_ROW_BLOCKS = 4          # ... and so do tensors with fewer blocks than this per row
_CHUNK_BYTES = 32 << 20           # output chunk size


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).view(np.uint8).reshape(-1, 2)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


def pack_q8_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Blocks [n, 34] from scales d [n] and int8 quants q [n, 32]."""
    return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


def pack_q4_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Blocks [n, 18] from d [n] and quants q [n, 32] in 0..15 (value d * (q - 8))."""
    q = q.astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _nibbles(q[:, :16], q[:, 16:])], axis=1)


def pack_q4_1(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Blocks [n, 20] from d, m [n] and q [n, 32] in 0..15 (value d * q + m)."""
    q = q.astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles(q[:, :16], q[:, 16:])], axis=1)


def _qh32(q: np.ndarray) -> np.ndarray:
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def pack_q5_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Blocks [n, 22] from d [n] and q [n, 32] in 0..31 (value d * (q - 16))."""
    q = q.astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _qh32(q), _nibbles(q[:, :16], q[:, 16:])], axis=1)


def pack_q5_1(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Blocks [n, 24] from d, m [n] and q [n, 32] in 0..31 (value d * q + m)."""
    q = q.astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _qh32(q),
                           _nibbles(q[:, :16], q[:, 16:])], axis=1)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and mins [n, 8] into the 12-byte K-quant scale field."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _k_low_nibbles(q: np.ndarray) -> np.ndarray:
    q = q.reshape(-1, 4, 2, 32)
    return _nibbles(q[:, :, 0], q[:, :, 1]).reshape(-1, 128)


def pack_q4_k(d, dmin, sc, mn, q) -> np.ndarray:
    """Blocks [n, 144] from d, dmin [n], scales/mins [n, 8] in 0..63, q [n, 256] in 0..15."""
    q = q.astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scales(sc, mn),
                           _k_low_nibbles(q)], axis=1)


def pack_q5_k(d, dmin, sc, mn, q) -> np.ndarray:
    """Blocks [n, 176] from d, dmin [n], scales/mins [n, 8] in 0..63, q [n, 256] in 0..31."""
    q = q.astype(np.uint8)
    high = ((q >> 4) & 1).reshape(-1, 8, 32).transpose(0, 2, 1)          # [n, i, j]
    qh = np.packbits(high, axis=2, bitorder="little").reshape(-1, 32)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scales(sc, mn), qh,
                           _k_low_nibbles(q)], axis=1)


def pack_q6_k(d, sc, q) -> np.ndarray:
    """Blocks [n, 210] from d [n], int8 scales [n, 16], q [n, 256] in 0..63 (value d*sc*(q-32))."""
    q = q.astype(np.uint8)
    low = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = _nibbles(low[:, :, 0], low[:, :, 1]).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6))
    return np.concatenate([ql, qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                           _f16_bytes(d)], axis=1)


def _mean_sq(values) -> float:
    return float(np.mean(np.square(np.asarray(values, dtype=np.float64))))


_SC_RANGE = (16, 61)     # K-quant six-bit sub-scales drawn from [16, 60]
_MIN_JITTER = 3          # K-quant mins = scale + U{-3..3}
_M_JITTER = 0.1          # Q4_1/Q5_1: m = -mid * d * U(0.9, 1.1)


def _unit_scale(rng: np.random.Generator, n: int, signed: bool = False) -> np.ndarray:
    """Per-block jitter U(0.8, 1.2) (mean square 1.0133), optionally with a random sign."""
    s = rng.uniform(0.8, 1.2, n).astype(np.float32) / np.float32(math.sqrt(1 + 0.4 ** 2 / 12))
    if signed:
        s *= rng.choice(np.array([-1.0, 1.0], np.float32), n)
    return s


def _sample_blocks(qtype: QT, rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """`n` random blocks of `qtype` whose dequantized values have mean 0 and std ~ `std`."""
    ints = functools.partial(rng.integers, dtype=np.int8)   # every quant/scale fits int8
    if qtype == QT.Q8_0:
        unit = 1.0 / math.sqrt(_mean_sq(np.arange(-127, 128)))
        return pack_q8_0(std * unit * _unit_scale(rng, n), ints(-127, 128, (n, 32)))
    if qtype in (QT.Q4_0, QT.Q5_0):
        levels = 16 if qtype == QT.Q4_0 else 32
        unit = 1.0 / math.sqrt(_mean_sq(np.arange(levels) - levels // 2))
        d = std * unit * _unit_scale(rng, n, signed=True)
        pack = pack_q4_0 if qtype == QT.Q4_0 else pack_q5_0
        return pack(d, ints(0, levels, (n, 32)))
    if qtype in (QT.Q4_1, QT.Q5_1):
        levels = 16 if qtype == QT.Q4_1 else 32
        mid = (levels - 1) / 2
        u = rng.uniform(1 - _M_JITTER, 1 + _M_JITTER, n).astype(np.float32)
        unit = 1.0 / math.sqrt(_mean_sq(np.arange(levels) - mid) + mid ** 2 * _M_JITTER ** 2 / 3)
        d = std * unit * _unit_scale(rng, n)
        pack = pack_q4_1 if qtype == QT.Q4_1 else pack_q5_1
        return pack(d, -mid * d * u, ints(0, levels, (n, 32)))
    if qtype in (QT.Q4_K, QT.Q5_K):
        levels = 16 if qtype == QT.Q4_K else 32
        mid = (levels - 1) / 2
        sc = ints(*_SC_RANGE, (n, 8))
        mn = sc + ints(-_MIN_JITTER, _MIN_JITTER + 1, (n, 8))
        # x = d*sc*q - dmin*mn with dmin = mid*d:  x = d * (sc*(q - mid) - mid*(mn - sc))
        var = (_mean_sq(np.arange(*_SC_RANGE)) * _mean_sq(np.arange(levels) - mid)
               + mid ** 2 * _mean_sq(np.arange(-_MIN_JITTER, _MIN_JITTER + 1)))
        d = std / math.sqrt(var) * _unit_scale(rng, n)
        pack = pack_q4_k if qtype == QT.Q4_K else pack_q5_k
        return pack(d, mid * d, sc, mn, ints(0, levels, (n, 256)))
    if qtype == QT.Q6_K:
        sc = ints(*_SC_RANGE, (n, 16)) * rng.choice(np.array([-1, 1], np.int8), (n, 16))
        var = _mean_sq(np.arange(*_SC_RANGE)) * _mean_sq(np.arange(64) - 32)
        d = std / math.sqrt(var) * _unit_scale(rng, n)
        return pack_q6_k(d, sc, ints(0, 64, (n, 256)))
    raise InputError(f"no random block generator for {qtype.name}")


# byte offsets of the f16 fields that scale linearly with the std (d, and m / dmin)
_SCALE_FIELDS = {QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q5_0: (0,), QT.Q4_1: (0, 2), QT.Q5_1: (0, 2),
                 QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


_FLOAT_BLOCK = 256                 # F32/F16 tensors are pooled in runs of 256 values
_FLOAT_DTYPES = {QT.F32: np.float32, QT.F16: np.float16}


def _pool_geometry(qtype: QT) -> tuple[int, int, int]:
    """(values per pool block, bytes per pool block, blocks in the pool) for `qtype`."""
    if qtype in _FLOAT_DTYPES:
        return _FLOAT_BLOCK, _FLOAT_BLOCK * np.dtype(_FLOAT_DTYPES[qtype]).itemsize, _POOL_BLOCKS // 8
    return (*gguf.GGML_QUANT_SIZES[qtype], _POOL_BLOCKS)


class _BlockPool:
    """A pool of unit-std random blocks; large tensors pick their blocks from it at random."""

    def __init__(self, qtype: QT, rng: np.random.Generator):
        self._qtype = qtype
        self._size = _pool_geometry(qtype)[2]
        if qtype in _FLOAT_DTYPES:
            self._unit = rng.standard_normal((self._size, _FLOAT_BLOCK), np.float32)
            self._fields = []
        else:
            self._unit = _sample_blocks(qtype, rng, self._size, 1.0)
            self._fields = [(o, np.ascontiguousarray(self._unit[:, o:o + 2]).view(np.float16)
                             .reshape(-1).astype(np.float32)) for o in _SCALE_FIELDS[qtype]]
        self._scaled: dict[float, np.ndarray] = {}

    def scaled(self, std: float) -> np.ndarray:
        """The pool as bytes, values multiplied by `std` [pool blocks, bytes per block]."""
        if std not in self._scaled:
            if self._qtype in _FLOAT_DTYPES:
                blocks = (self._unit * np.float32(std)).astype(_FLOAT_DTYPES[self._qtype]).view(np.uint8)
            else:
                blocks = self._unit.copy()
                for offset, values in self._fields:
                    blocks[:, offset:offset + 2] = _f16_bytes(values * np.float32(std))
            self._scaled[std] = blocks
        return self._scaled[std]

    def take(self, rng: np.random.Generator, n: int, std: float) -> np.ndarray:
        """`n` blocks picked at random, as bytes [n, bytes per block]."""
        return np.take(self.scaled(std), rng.integers(0, self._size, n), axis=0)


def _tensor_chunks(spec: TensorSpec, shape: SynthShape, rng: np.random.Generator,
                   pool: Callable[[QT], _BlockPool]) -> Iterator[np.ndarray]:
    """The tensor's bytes, as contiguous uint8 chunks of whole rows (about _CHUNK_BYTES each)."""
    if spec.name == "rope_freqs.weight":
        yield llama3_rope_factors(shape.head_dim, shape.rope_base).view(np.uint8)
        return
    if len(spec.shape) == 1:
        yield (spec.mean + spec.std * rng.standard_normal(spec.shape, np.float32)).view(np.uint8)
        return
    rows, cols = spec.shape
    row_bytes = tensor_nbytes(spec) // rows
    chunk_rows = max(1, _CHUNK_BYTES // row_bytes)
    # Small tensors and short rows get fresh blocks (pool picks could repeat a whole row there).
    block, _, _ = _pool_geometry(spec.qtype)
    fresh = (cols % block or rows * cols <= _FRESH_MAX_VALUES
             or cols // block < _MIN_POOL_ROW_BLOCKS)
    for r0 in range(0, rows, chunk_rows):
        n_rows = min(chunk_rows, rows - r0)
        if not fresh:
            yield pool(spec.qtype).take(rng, n_rows * cols // block, spec.std)
        elif spec.qtype in _FLOAT_DTYPES:
            x = rng.standard_normal((n_rows, cols), np.float32)
            x *= np.float32(spec.std)
            yield x.astype(_FLOAT_DTYPES[spec.qtype]).view(np.uint8)
        else:
            yield _sample_blocks(spec.qtype, rng, n_rows * cols // block, spec.std)


# ======================================================================================
# Writer
# ======================================================================================


class _BackgroundWriter:
    """Writes byte chunks to a file on a thread, so generation overlaps the disk writes."""

    def __init__(self, fout, depth: int = 3):
        self._fout = fout
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="synth-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._fout.write(memoryview(chunk).cast("B"))
                except BaseException as e:  # re-raised in the caller's thread
                    self._error = e

    def write(self, chunk: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(np.ascontiguousarray(chunk))

    def close(self) -> None:
        """Wait for the queued chunks; raises the writer's error (once). Idempotent."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
            if self._error is not None:
                raise self._error


ProgressFn = Callable[[int, int, str], None]   # (bytes written, total bytes, current tensor)


def write_synthetic(path, shape: SynthShape, quant: str, seed: int = 0, *,
                    progress: ProgressFn | None = None, pure: bool = False) -> None:
    """Write a random-weight Llama GGUF with llama.cpp's tensor types for `quant`.

    Memory stays flat (a few 32 MiB chunks in flight) whatever the model size.

    Args:
      path: output file.
      shape: the model hyperparameters (see SHAPES).
      quant: one of QUANTS; the per-tensor types follow `tensor_type`.
      seed: the random seed; the same (shape, quant, seed) gives the same bytes.
      progress: called after every chunk with (bytes written, total bytes, tensor name).
      pure: one type for all 2-D tensors, like `llama-quantize --pure`.
    """
    if quant not in _MIXES:
        raise InputError(f"{quant=} is not one of {', '.join(QUANTS)}")
    specs = tensor_plan(shape, quant, pure=pure)
    writer = gguf.GGUFWriter(os.fspath(path), "llama")
    _add_metadata(writer, shape, quant)
    for spec in specs:
        writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), tensor_nbytes(spec),
                               raw_dtype=spec.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    align = writer.data_alignment
    fout.write(bytes(-fout.tell() % align))

    total = sum(-(-tensor_nbytes(s) // align) * align for s in specs)
    pools: dict[QT, _BlockPool] = {}

    def pool(qtype: QT) -> _BlockPool:
        if qtype not in pools:
            pools[qtype] = _BlockPool(qtype, np.random.default_rng([seed, 1 << 20, int(qtype)]))
        return pools[qtype]

    done = 0
    bg = _BackgroundWriter(fout)
    try:
        for index, spec in enumerate(specs):
            written = 0
            for chunk in _tensor_chunks(spec, shape, np.random.default_rng([seed, index]), pool):
                bg.write(chunk)
                written += chunk.nbytes
                done += chunk.nbytes
                if progress is not None:
                    progress(done, total, spec.name)
            assert written == tensor_nbytes(spec), (spec.name, written)
            pad = -written % align
            if pad:
                bg.write(np.zeros(pad, np.uint8))
                done += pad
        bg.close()
    except BaseException:
        try:
            bg.close()
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        os.remove(path)    # no half-written model files
        raise
    finally:
        writer.close()
    if progress is not None:
        progress(done, total, "")


def _add_metadata(w: gguf.GGUFWriter, shape: SynthShape, quant: str) -> None:
    w.add_name(f"synthetic-llama-{shape.n_layers}L-{shape.n_embd}-{quant}")
    w.add_block_count(shape.n_layers)
    w.add_context_length(shape.ctx_len)
    w.add_embedding_length(shape.n_embd)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_kv_head)
    w.add_rope_freq_base(shape.rope_base)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_vocab_size(shape.n_vocab)
    w.add_file_type(_MIXES[quant].ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, scores, types = make_vocab(shape.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


# ======================================================================================
# llama.cpp's own quantizer
# ======================================================================================

LLAMA_CPP_FTYPES: dict[str, int] = {
    "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18,
}


def quantize_with_llama_cpp(src, dst, ftype: str) -> None:
    """Quantize GGUF `src` into `dst` with llama.cpp (`llama_model_quantize`, via llama-cpp-python).

    Args:
      src: input GGUF (typically F32 or F16 from `write_synthetic`).
      dst: output GGUF.
      ftype: one of LLAMA_CPP_FTYPES, e.g. "Q4_K_M".
    """
    if ftype not in LLAMA_CPP_FTYPES:
        raise InputError(f"{ftype=} is not one of {', '.join(LLAMA_CPP_FTYPES)}")
    import llama_cpp  # lazily: an optional test dependency

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_CPP_FTYPES[ftype]
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(os.fspath(src).encode(), os.fspath(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise NTransformerError(f"llama.cpp failed to quantize {src} to {ftype} ({dst}): code {rc}")


# ======================================================================================
# CLI
# ======================================================================================


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_enum("shape", "tiny", list(SHAPES), "Shape preset.")
    flags.DEFINE_enum("quant", "Q4_0", list(QUANTS), "Quantization mix (llama.cpp ftype name).")
    flags.DEFINE_string("out", None, "Output .gguf path.", required=True)
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_boolean("pure", False, "One type for every 2-D tensor (like llama-quantize --pure).")
    flags.DEFINE_integer("n_layers", None, "Override: number of layers.")
    flags.DEFINE_integer("n_embd", None, "Override: embedding width.")
    flags.DEFINE_integer("n_ff", None, "Override: feed-forward width.")
    flags.DEFINE_integer("n_head", None, "Override: attention heads.")
    flags.DEFINE_integer("n_kv_head", None, "Override: key/value heads.")
    flags.DEFINE_integer("vocab", None, "Override: vocabulary size.")
    flags.DEFINE_integer("ctx", None, "Override: training context length (metadata only).")
    flags.DEFINE_boolean("rope_freqs", None, "Override: write Llama-3.1 rope_freqs.weight.")
    flags.DEFINE_boolean("tied_output", None, "Override: omit output.weight (tied embeddings).")


def main(argv) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    overrides = dict(n_layers=f.n_layers, n_embd=f.n_embd, n_ff=f.n_ff, n_head=f.n_head,
                     n_kv_head=f.n_kv_head, n_vocab=f.vocab, ctx_len=f.ctx,
                     rope_freqs=f.rope_freqs, tied_output=f.tied_output)
    shape = dataclasses.replace(SHAPES[f.shape], **{k: v for k, v in overrides.items() if v is not None})
    start = time.perf_counter()
    last = [0.0]

    def report(done: int, total: int, name: str) -> None:
        now = time.perf_counter()
        if now - last[0] < 0.5 and done < total:
            return
        last[0] = now
        rate = done / max(now - start, 1e-9) / 1e9
        sys.stderr.write(f"\r[{100 * done / total:5.1f}%] {done / 1e9:7.2f} / {total / 1e9:.2f} GB"
                         f"  {rate:5.2f} GB/s  {name:<28}")
        sys.stderr.flush()

    write_synthetic(f.out, shape, f.quant, f.seed, progress=report, pure=f.pure)
    size = os.path.getsize(f.out)
    sys.stderr.write(f"\nwrote {f.out}: {size / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s\n")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
