"""The synthetic models the benchmarks run on, written once per machine and reused."""

from __future__ import annotations

import os
import time

from ntransformer_jax import synth


def synthetic_file(workdir: str, shape: str, quant: str, seed: int = 0) -> tuple[str, float | None]:
    """Path of `synth-{shape}-{quant}.gguf` in workdir, written first if missing.

    Returns:
      (path, seconds the write took, or None when the file was already there).
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"synth-{shape}-{quant}.gguf")
    if os.path.exists(path):
        return path, None
    t = time.perf_counter()
    synth.write_synthetic(path, synth.SHAPES[shape], quant, seed=seed)
    return path, time.perf_counter() - t
