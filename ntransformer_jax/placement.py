"""How many bytes each layer takes, where it lives in the file, and the placement plan.

Shared by the engine (which places the weights) and `inspect` (which only reports the plan), so
both always agree.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ntransformer_jax import model as M
from ntransformer_jax.kernels import qmatvec
from ntransformer_jax.model_file import LAYER_TENSORS, ModelFile, TensorInfo
from ntransformer_jax.tiers import ALIGN, Plan, TierOptions, plan_placement


def tensor_nbytes(info: TensorInfo, packed: bool = False) -> int:
    """Bytes of a tensor as the engine holds it: as stored in the file, or, with `packed` (the
    decode kernels on), in `qmatvec.repack`'s layout where the kernel takes the matrix (K-quants
    grow 1-3%)."""
    if packed and len(info.shape) >= 2:
        rows, cols = int(np.prod(info.shape[:-1])), int(info.shape[-1])
        if qmatvec.supports(info.qtype, rows, cols):
            return qmatvec.packed_nbytes(info.qtype, rows, cols)
    return info.n_bytes


def layer_nbytes(f: ModelFile, i: int, packed: bool = False) -> int:
    """Bytes of layer i's weights (see `tensor_nbytes`)."""
    return sum(tensor_nbytes(f.layer_tensor(i, s), packed) for s in LAYER_TENSORS)


def layer_span(f: ModelFile, i: int) -> tuple[int, int]:
    """(offset, length) of the smallest ALIGN-aligned file range holding layer i's tensors."""
    infos = [f.layer_tensor(i, s) for s in LAYER_TENSORS]
    start = min(t.offset for t in infos) // ALIGN * ALIGN
    end = max(t.offset + t.n_bytes for t in infos)
    end = -(-end // ALIGN) * ALIGN     # may pass the end of the file; the reader stops there
    return start, end - start


def staging_bytes(spans: Sequence[tuple[int, int]]) -> int:
    """Bytes of one tier-C staging buffer: the longest layer span plus alignment slack."""
    return max(length for _, length in spans) + 2 * ALIGN


def device_working_set(f: ModelFile, ctx_size: int, prefill_chunk: int,
                       packed: bool = False) -> dict:
    """Device bytes needed besides the layers: KV cache, globals, compute workspace."""
    cfg = f.config
    cache = 2 * cfg.n_layers * ctx_size * cfg.kv_dim * 4
    glob = (tensor_nbytes(f.tensor("token_embd.weight"), packed)
            + f.tensor("output_norm.weight").n_bytes)
    if not cfg.tied_output:
        glob += tensor_nbytes(f.tensor("output.weight"), packed)
    # The XLA path dequantizes a matrix (or a row chunk of a big one) to float32 before its
    # matmul: room for two of those, plus prefill activations and logits of one chunk.
    biggest = min(max(cfg.n_ff * cfg.n_embd, cfg.n_vocab * cfg.n_embd), M.LINEAR_CHUNK_ELEMS)
    chunk = prefill_chunk
    acts = chunk * (3 * cfg.n_ff + 4 * cfg.n_embd + cfg.n_vocab) * 4 + chunk * chunk * cfg.n_head * 4
    # With every layer resident, a long prefill copies one layer's cache out of its stack.
    layer_cache = cache // cfg.n_layers
    return {"kv_cache": cache, "globals": glob, "workspace": 2 * biggest * 4 + acts + layer_cache}


def plan_for(f: ModelFile, ctx_size: int, options: TierOptions, free_vram: int | None,
             avail_ram: int | None, *, prefill_chunk: int, packed: bool = False) -> Plan:
    """Where the engine puts each layer of `f`, and what the budgets must hold.

    Args:
      f: the open model file (only its header is used).
      ctx_size: context length (KV cache size).
      options: budgets, caps and streaming mode.
      free_vram / avail_ram: measured free device memory and available RAM (None: unlimited).
      prefill_chunk: the engine's largest prefill chunk (sizes the activation workspace).
      packed: the decode kernels are on: matrices take `qmatvec.repack`'s size.
    Returns:
      The `Plan`; with streaming="mmap" every non-resident layer is "disk" and the host holds
      only the one staging buffer that the naive baseline copies each layer through.
    Raises:
      InputError: the working set does not fit the budgets.
    """
    n = f.config.n_layers
    layer_bytes = [layer_nbytes(f, i, packed) for i in range(n)]
    staging = staging_bytes([layer_span(f, i) for i in range(n)])
    # Disk-tier layers reach the device as stored in the file and are repacked there.
    repack = max(layer_nbytes(f, i) for i in range(n)) if packed else 0
    plan = plan_placement(layer_bytes, device_working_set(f, ctx_size, prefill_chunk, packed), staging,
                          options, free_vram, avail_ram, slot_bytes=max(layer_bytes), repack_bytes=repack)
    if options.streaming == "mmap":
        tiers = tuple("vram" if t == "vram" else "disk" for t in plan.tiers)
        plan = dataclasses.replace(
            plan, tiers=tiers, host_working_set={"staging": staging} if "disk" in tiers else {})
    return plan


def is_layered(plan: Plan, options: TierOptions) -> bool:
    """Whether the engine runs layer by layer (anything streams, or placement was asked for)."""
    return options.tiered or options.streaming == "mmap" or any(t != "vram" for t in plan.tiers)
