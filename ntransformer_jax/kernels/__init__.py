"""Pallas kernels, each module holding a kernel, its wrapper and a plain-jnp reference with the
same signature.

- `qmatvec`: fused dequantize + matrix-vector product on GGUF-quantized weights (decode path);
  `from ntransformer_jax.kernels.qmatvec import qmatvec, qmatvec_packed, repack, BlockSizes`.
- `attention`: causal GQA decode attention over the (stacked) KV cache in one launch;
  `from ntransformer_jax.kernels.attention import decode_attention, BlockSizes`.

Nothing is re-exported here: a function `qmatvec` in this namespace would shadow its module.
"""
