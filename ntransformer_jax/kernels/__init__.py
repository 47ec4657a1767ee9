"""Pallas kernels, each module holding a kernel, its wrapper and a plain-jnp reference with the
same signature.

- `qmatvec`: fused dequantize + matrix-vector product on GGUF-quantized weights (decode path);
  `from ntransformer_jax.kernels.qmatvec import qmatvec, qmatvec_packed, repack, BlockSizes`;
  `qmatvec_glu_packed` multiplies a [gate; up] matrix and returns silu(gate) * up.
- `qmatmul`: dequantize + matmul on tensor cores (prefill path).
- `norm`: residual add (with K-split partial sums) + RMSNorm in one launch.
- `rope_cache`: q/k/v partial sums added, q and k rotated, k and v written into the cache in
  place, in one launch; `from ntransformer_jax.kernels.rope_cache import rope_cache_write`.
- `attention`: causal GQA decode attention over the (stacked) KV cache in one launch;
  `from ntransformer_jax.kernels.attention import decode_attention, BlockSizes`;
  `rope_decode_attention` also does `rope_cache`'s work in the same launch.

Nothing is re-exported here: a function `qmatvec` in this namespace would shadow its module.
"""
