"""Broken GGUF files for the error and fuzz tests, each made from one small valid model.

Header layout used by the byte patches: magic at 0, uint32 version at 4, uint64 tensor count at
8, uint64 key/value count at 16; the key/value pairs start at byte 24.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

import gguf
import numpy as np

from ntransformer_jax import synth

OFFSET_VERSION = 4
OFFSET_N_TENSORS = 8
OFFSET_N_KV = 16
HEADER_BYTES = 24

VT = gguf.GGUFValueType


def write_valid(path: str | os.PathLike[str], quant: str = "Q8_0") -> str:
    """The tiny synthetic Llama (2 layers, 512 tokens, ~1.5 MB in Q8_0), written to `path`."""
    path = os.fspath(path)
    synth.write_synthetic(path, synth.SHAPES["tiny"], quant, seed=0)
    return path


# A one-layer model with a 300-token vocabulary (~50 kB): cheap to mutate thousands of times.
SMALL_SHAPE = synth.SynthShape(n_layers=1, n_embd=64, n_ff=128, n_head=2, n_kv_head=1, n_vocab=300,
                               ctx_len=128)


def write_small(path: str | os.PathLike[str], tokenizer: str = "llama") -> str:
    """SMALL_SHAPE in Q8_0, with synth's SentencePiece vocabulary ("llama") or a byte-level BPE
    one ("gpt2": 256 byte tokens, merges, `<|endoftext|>`)."""
    path = os.fspath(path)
    if tokenizer == "llama":
        synth.write_synthetic(path, SMALL_SHAPE, "Q8_0", seed=0)
        return path
    assert tokenizer == "gpt2", tokenizer
    tmp = path + ".llama"
    synth.write_synthetic(tmp, SMALL_SHAPE, "Q8_0", seed=0)
    tokens, merges = gpt2_vocab(SMALL_SHAPE.n_vocab)
    types = [1] * (len(tokens) - 1) + [3]        # NORMAL ..., CONTROL
    eos = len(tokens) - 1
    rewritten(tmp, path, drop_keys=("tokenizer.ggml.scores", "tokenizer.ggml.unknown_token_id"),
              set_keys={
                  "tokenizer.ggml.model": ("gpt2", VT.STRING),
                  "tokenizer.ggml.pre": ("default", VT.STRING),
                  "tokenizer.ggml.tokens": (tokens, VT.ARRAY, VT.STRING),
                  "tokenizer.ggml.token_type": (types, VT.ARRAY, VT.INT32),
                  "tokenizer.ggml.merges": (merges, VT.ARRAY, VT.STRING),
                  "tokenizer.ggml.bos_token_id": (eos, VT.UINT32),
                  "tokenizer.ggml.eos_token_id": (eos, VT.UINT32),
                  "tokenizer.ggml.add_bos_token": (False, VT.BOOL),
              })
    os.remove(tmp)
    return path


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value: printable Latin-1 bytes stand for
    themselves, the others take the code points from 256 up, in byte order."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def gpt2_vocab(n_vocab: int) -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary of `n_vocab` tokens: bytes, merged pieces, `<|endoftext|>`."""
    chars = _byte_chars()
    tokens, merges = list(chars), []
    space = chars[ord(" ")]
    words = "the quick brown fox jumps over lazy dog hello world and of to in is it".split()
    pending = [space + w for w in words] + words
    for word in pending:
        piece = word[0]
        for ch in word[1:]:
            if len(tokens) >= n_vocab - 1:
                break
            if piece + ch not in tokens:
                tokens.append(piece + ch)
                merges.append(f"{piece} {ch}")
            piece += ch
    assert len(tokens) == n_vocab - 1, (len(tokens), n_vocab)
    return tokens + ["<|endoftext|>"], merges


def patched(src: str, dst: str, offset: int, data: bytes) -> str:
    """A copy of `src` with `data` written over the bytes at `offset`."""
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return dst


def truncated(src: str, dst: str, size: int) -> str:
    """The first `size` bytes of `src` (a negative size drops that many bytes from the end)."""
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[:size])
    return dst


def last_tensor(path: str) -> str:
    """Name of the tensor whose data comes last in the file."""
    reader = gguf.GGUFReader(path)
    return max(reader.tensors, key=lambda t: t.data_offset).name


def _field_value(field: gguf.ReaderField) -> tuple[Any, VT, VT | None]:
    main = field.types[0]
    if main == VT.ARRAY:
        return field.contents(), main, field.types[-1]
    return field.contents(), main, None


def rewritten(src: str, dst: str, *, arch: str | None = None, drop_keys: tuple[str, ...] = (),
              set_keys: dict[str, tuple] | None = None,
              drop_tensors: tuple[str, ...] = (),
              retype: dict[str, gguf.GGMLQuantizationType] | None = None) -> str:
    """A copy of `src` written again by `gguf.GGUFWriter`, with one thing changed.

    Args:
      src, dst: the valid file and the file to write.
      arch: a different `general.architecture` (the other keys keep their `llama.` names).
      drop_keys: metadata keys to leave out.
      set_keys: key -> (value, type) or (value, ARRAY, item type), to add or replace.
      drop_tensors: tensors to leave out.
      retype: tensor -> GGML type; its data becomes zero blocks of that type, same shape.
    """
    reader = gguf.GGUFReader(src)
    old_arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch or old_arch)
    set_keys = dict(set_keys or {})
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_keys:
            continue
        if name in set_keys:
            writer.add_key_value(name, *set_keys.pop(name))
        else:
            writer.add_key_value(name, *_field_value(field))
    for name, value in set_keys.items():
        writer.add_key_value(name, *value)
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        qtype = (retype or {}).get(t.name, t.tensor_type)
        if qtype == t.tensor_type:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=qtype)
            continue
        ne = [int(x) for x in t.shape]
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows = math.prod(ne[1:])
        blocks = np.zeros((rows, ne[0] // block_size * type_size), np.uint8)
        writer.add_tensor(t.name, blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
