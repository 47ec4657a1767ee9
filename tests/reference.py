"""An independent float64 numpy Llama forward on weights dequantized by `gguf.quants`.

Written from the llama.cpp semantics (RMSNorm, RoPE on adjacent pairs with optional frequency
factors, GQA, SwiGLU, tied output) and sharing no code with the engine, so agreement means both
compute the same function.
"""

from __future__ import annotations

import gguf
import numpy as np


class Float64Llama:
    def __init__(self, path: str):
        reader = gguf.GGUFReader(path)
        self.t = {t.name: t for t in reader.tensors}
        f = {k: v for k, v in reader.fields.items()}

        def val(key, default=None):
            if key not in f:
                return default
            fl = f[key]
            return fl.parts[fl.data[0]][0].item()

        a = "llama"
        self.n_layers = val(f"{a}.block_count")
        self.d = val(f"{a}.embedding_length")
        self.n_head = val(f"{a}.attention.head_count")
        self.n_kv = val(f"{a}.attention.head_count_kv", self.n_head)
        self.hd = val(f"{a}.attention.key_length", self.d // self.n_head)
        self.n_rot = val(f"{a}.rope.dimension_count", self.hd)
        self.base = val(f"{a}.rope.freq_base", 10000.0)
        self.eps = val(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
        self._cache: dict[str, np.ndarray] = {}

    def w(self, name: str) -> np.ndarray:
        if name not in self._cache:
            t = self.t[name]
            arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            self._cache[name] = arr.reshape(tuple(reversed([int(x) for x in t.shape]))).astype(np.float64)
        return self._cache[name]

    def _norm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope(self, x, pos):  # x [T, heads, hd]
        half = self.n_rot // 2
        theta = self.base ** (-np.arange(half) * 2.0 / self.n_rot)
        if "rope_freqs.weight" in self.t:
            theta = theta / self.w("rope_freqs.weight")
        ang = pos[:, None] * theta[None, :]            # [T, half]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        out = x.copy()
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        out[..., 0:2 * half:2] = a * c - b * s
        out[..., 1:2 * half:2] = a * s + b * c
        return out

    def logits(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        T = len(ids)
        pos = np.arange(T, dtype=np.float64)
        x = self.w("token_embd.weight")[ids]
        g = self.n_head // self.n_kv
        causal = np.tril(np.ones((T, T), bool))
        for i in range(self.n_layers):
            p = f"blk.{i}."
            h = self._norm(x, self.w(p + "attn_norm.weight"))
            q = (h @ self.w(p + "attn_q.weight").T).reshape(T, self.n_head, self.hd)
            k = (h @ self.w(p + "attn_k.weight").T).reshape(T, self.n_kv, self.hd)
            v = (h @ self.w(p + "attn_v.weight").T).reshape(T, self.n_kv, self.hd)
            q, k = self._rope(q, pos), self._rope(k, pos)
            out = np.empty_like(q)
            for hq in range(self.n_head):
                kv = hq // g
                sc = q[:, hq] @ k[:, kv].T / np.sqrt(self.hd)
                sc = np.where(causal, sc, -np.inf)
                sc = np.exp(sc - sc.max(-1, keepdims=True))
                out[:, hq] = (sc / sc.sum(-1, keepdims=True)) @ v[:, kv]
            x = x + out.reshape(T, -1) @ self.w(p + "attn_output.weight").T
            h = self._norm(x, self.w(p + "ffn_norm.weight"))
            gate = h @ self.w(p + "ffn_gate.weight").T
            up = h @ self.w(p + "ffn_up.weight").T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ self.w(p + "ffn_down.weight").T
        x = self._norm(x, self.w("output_norm.weight"))
        out_name = "output.weight" if "output.weight" in self.t else "token_embd.weight"
        return x @ self.w(out_name).T


def compare_logits(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(median over positions of relative L2 error of centered logits, top-1 agreement)."""
    a = ours - ours.mean(axis=-1, keepdims=True)
    b = ref - ref.mean(axis=-1, keepdims=True)
    rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)
    top1 = float(np.mean(np.argmax(ours, -1) == np.argmax(ref, -1)))
    return float(np.median(rel)), top1
