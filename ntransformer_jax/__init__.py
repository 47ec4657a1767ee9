"""ntransformer-jax: run GGUF Llama models larger than GPU memory on one GPU, in JAX.

Public API:
  load(path, *, ctx_size=None, **tier_options) -> Engine
  Engine: .config, .placement, .tokenize, .detokenize, .logits, .generate, .generate_batch, .chat
  SamplingParams, TierOptions, ChatSession, LlamaConfig, NTransformerError (and its subclasses)
  default_model_path()

Names are imported on first use, so `import ntransformer_jax` stays cheap.
"""

import importlib

_EXPORTS = {
    "Engine": "engine", "GenerationStats": "engine", "load": "engine",
    "InputError": "errors", "ModelFileError": "errors", "NTransformerError": "errors",
    "LlamaConfig": "model_file",
    "default_model_path": "models",
    "SamplingParams": "sampling",
    "TierOptions": "tiers",
    "ChatSession": "chat",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"ntransformer_jax.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ntransformer_jax' has no attribute {name!r}")


def __dir__():
    return __all__
