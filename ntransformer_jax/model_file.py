"""Opening a GGUF Llama file: validation, the model config, and the tensor index.

The file is memory-mapped through `gguf.GGUFReader`; tensor bytes are numpy views of the map and
are only read when a tier copies them. Every problem with the file raises `ModelFileError` with a
one-line message that names the file and the offending key or tensor.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Mapping

import gguf
import numpy as np

from ntransformer_jax import quants
from ntransformer_jax.errors import ModelFileError
from ntransformer_jax.metadata import read_metadata

SUPPORTED_ARCHITECTURES = ("llama",)

# Metadata keys, `{arch}` filled in with general.architecture.
KEY_ARCH = "general.architecture"
KEY_N_LAYERS = "{arch}.block_count"
KEY_N_EMBD = "{arch}.embedding_length"
KEY_N_FF = "{arch}.feed_forward_length"
KEY_N_HEAD = "{arch}.attention.head_count"
KEY_N_KV_HEAD = "{arch}.attention.head_count_kv"
KEY_HEAD_DIM = "{arch}.attention.key_length"
KEY_HEAD_DIM_V = "{arch}.attention.value_length"
KEY_RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
KEY_CTX = "{arch}.context_length"
KEY_ROPE_BASE = "{arch}.rope.freq_base"
KEY_ROPE_DIM = "{arch}.rope.dimension_count"
KEY_ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
KEY_ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
KEY_ROPE_SCALE_LINEAR = "{arch}.rope.scale_linear"
KEY_VOCAB = "{arch}.vocab_size"

LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama model, built once from GGUF metadata (`from_metadata`)."""

    n_layers: int
    n_embd: int          # D
    n_ff: int            # F
    n_head: int          # N
    n_kv_head: int       # K
    head_dim: int        # H
    n_rot: int           # leading dims of each head that RoPE rotates
    n_vocab: int         # V
    ctx_train: int
    rope_base: float
    rope_freq_scale: float  # 1 / linear scaling factor
    rms_eps: float
    tied_output: bool
    has_rope_freqs: bool
    architecture: str = "llama"

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_head // self.n_kv_head

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]],
                      source: str = "model") -> "LlamaConfig":
        """Build the config from metadata; `tensor_shapes` (ggml order) fills optional facts.

        Raises:
          ModelFileError: a required key is missing or a value is out of range.
        """
        arch = md.get(KEY_ARCH)
        if arch is None:
            raise ModelFileError(f"{source}: missing metadata key {KEY_ARCH!r}")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFileError(f"{source}: unsupported architecture {arch!r} "
                                 f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

        def get(key: str, default: Any = None, kind: type = int) -> Any:
            name = key.format(arch=arch)
            if name not in md:
                if default is None:
                    raise ModelFileError(f"{source}: missing metadata key {name!r}")
                return default
            value = md[name]
            if isinstance(value, (list, np.ndarray)) or isinstance(value, str) != (kind is str):
                raise ModelFileError(f"{source}: metadata key {name!r} has a bad value {value!r}")
            if kind is int and (not float(value).is_integer()):
                raise ModelFileError(f"{source}: metadata key {name!r} must be an integer, got {value!r}")
            return kind(value)

        n_embd = get(KEY_N_EMBD)
        n_head = get(KEY_N_HEAD)
        n_kv_head = get(KEY_N_KV_HEAD, n_head)
        if n_head <= 0 or n_embd <= 0:
            raise ModelFileError(f"{source}: head count {n_head} and embedding length {n_embd} must be positive")
        head_dim = get(KEY_HEAD_DIM, n_embd // n_head)
        head_dim_v = get(KEY_HEAD_DIM_V, head_dim)
        if head_dim_v != head_dim:
            raise ModelFileError(f"{source}: key and value head sizes differ ({head_dim} vs {head_dim_v})")
        if "token_embd.weight" not in tensor_shapes:
            raise ModelFileError(f"{source}: missing tensor 'token_embd.weight'")
        n_vocab = get(KEY_VOCAB, int(tensor_shapes["token_embd.weight"][-1]))
        scaling_type = get(KEY_ROPE_SCALING_TYPE, "none", str)
        factor = get(KEY_ROPE_SCALING_FACTOR, 0.0, float) or get(KEY_ROPE_SCALE_LINEAR, 0.0, float)
        freq_scale = 1.0 / factor if (scaling_type == "linear" and factor > 0) else 1.0
        if scaling_type not in ("none", "linear") and not (scaling_type == "yarn" and factor <= 1.0):
            raise ModelFileError(f"{source}: unsupported rope scaling type {scaling_type!r}")
        cfg = cls(
            n_layers=get(KEY_N_LAYERS),
            n_embd=n_embd,
            n_ff=get(KEY_N_FF),
            n_head=n_head,
            n_kv_head=n_kv_head,
            head_dim=head_dim,
            n_rot=get(KEY_ROPE_DIM, head_dim),
            n_vocab=n_vocab,
            ctx_train=get(KEY_CTX),
            rope_base=get(KEY_ROPE_BASE, 10000.0, float),
            rope_freq_scale=freq_scale,
            rms_eps=get(KEY_RMS_EPS, 1e-5, float),
            tied_output="output.weight" not in tensor_shapes,
            has_rope_freqs="rope_freqs.weight" in tensor_shapes,
            architecture=arch,
        )
        cfg._validate(source)
        return cfg

    def _validate(self, source: str) -> None:
        positive = ("n_layers", "n_embd", "n_ff", "n_head", "n_kv_head", "head_dim", "n_vocab", "ctx_train")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ModelFileError(f"{source}: {name}={getattr(self, name)} must be positive")
        if self.n_head % self.n_kv_head:
            raise ModelFileError(f"{source}: head count {self.n_head} is not a multiple of "
                                 f"KV head count {self.n_kv_head}")
        if self.n_rot > self.head_dim or self.n_rot % 2:
            raise ModelFileError(f"{source}: rope dimension {self.n_rot} must be even and <= head size {self.head_dim}")
        if not (self.rope_base > 0 and np.isfinite(self.rope_base)):
            raise ModelFileError(f"{source}: rope base {self.rope_base} must be positive")
        if not (self.rms_eps >= 0 and np.isfinite(self.rms_eps)):
            raise ModelFileError(f"{source}: rms epsilon {self.rms_eps} is invalid")

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor shapes in ggml order (ne0 first), per name pattern (`blk.{i}.` for layers)."""
        shapes = {
            "token_embd.weight": (self.n_embd, self.n_vocab),
            "output_norm.weight": (self.n_embd,),
            "blk.{i}.attn_norm.weight": (self.n_embd,),
            "blk.{i}.attn_q.weight": (self.n_embd, self.q_dim),
            "blk.{i}.attn_k.weight": (self.n_embd, self.kv_dim),
            "blk.{i}.attn_v.weight": (self.n_embd, self.kv_dim),
            "blk.{i}.attn_output.weight": (self.q_dim, self.n_embd),
            "blk.{i}.ffn_norm.weight": (self.n_embd,),
            "blk.{i}.ffn_gate.weight": (self.n_embd, self.n_ff),
            "blk.{i}.ffn_up.weight": (self.n_embd, self.n_ff),
            "blk.{i}.ffn_down.weight": (self.n_ff, self.n_embd),
        }
        if not self.tied_output:
            shapes["output.weight"] = (self.n_embd, self.n_vocab)
        if self.has_rope_freqs:
            shapes["rope_freqs.weight"] = (self.n_rot // 2,)
        return shapes


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: its type, shape (rows, cols) and the raw bytes (a view of the map)."""

    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]   # numpy order: [rows, cols] for matrices, [cols] for vectors
    offset: int              # absolute byte offset in the file
    n_bytes: int
    data: np.ndarray         # uint8 view of the memory map, shape [rows, row_bytes] or [row_bytes]


def _check_header(path: str) -> None:
    if not os.path.exists(path):
        raise ModelFileError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelFileError(f"model path is a directory, not a GGUF file: {path}")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise ModelFileError(f"cannot read model file {path}: {e.strerror}") from e
    if len(head) < 4 or head[:4] != b"GGUF":
        raise ModelFileError(f"not a GGUF file (bad magic {head[:4]!r}): {path}")
    if len(head) < 24:
        raise ModelFileError(f"truncated GGUF header ({size} bytes): {path}")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise ModelFileError(f"unsupported GGUF version {version} (supported: 2, 3): {path}")
    # Every KV pair takes >= 12 bytes and every tensor info >= 28: reject impossible counts
    # before the reader tries to walk them.
    if n_kv * 12 + n_tensors * 28 > size:
        raise ModelFileError(f"truncated or corrupt GGUF header ({n_kv} keys, {n_tensors} tensors "
                             f"cannot fit in {size} bytes): {path}")


class ModelFile:
    """A validated, memory-mapped GGUF Llama model.

    Attributes:
      path: the file path.
      metadata: all key/value metadata as Python values.
      config: the `LlamaConfig`.
      tensors: name -> `TensorInfo`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        _check_header(self.path)
        try:
            reader = gguf.GGUFReader(self.path)
        except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError,
                UnicodeDecodeError, struct.error) as e:
            raise ModelFileError(f"corrupt GGUF file {self.path}: {e}") from None
        self._reader = reader
        name = os.path.basename(self.path)
        try:
            self.metadata = read_metadata(reader)
        except (ValueError, IndexError, TypeError) as e:
            raise ModelFileError(f"corrupt GGUF metadata in {self.path}: {e}") from None
        file_size = os.path.getsize(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            try:
                qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
            except ValueError:
                raise ModelFileError(f"{name}: tensor {t.name!r} has unknown type id {int(t.tensor_type)}") from None
            ne = tuple(int(x) for x in t.shape)
            if any(x <= 0 for x in ne):
                raise ModelFileError(f"{name}: tensor {t.name!r} has invalid shape {ne}")
            offset = int(t.data_offset)
            n_bytes = int(t.n_bytes)
            if offset + n_bytes > file_size:
                raise ModelFileError(f"{name}: tensor {t.name!r} data ends at byte {offset + n_bytes}, "
                                     f"past the end of the file ({file_size} bytes)")
            self.tensors[t.name] = TensorInfo(
                name=t.name, qtype=qtype, shape=tuple(reversed(ne)), offset=offset,
                n_bytes=n_bytes, data=t.data)
        ggml_shapes = {n: tuple(reversed(t.shape)) for n, t in self.tensors.items()}
        self.config = LlamaConfig.from_metadata(self.metadata, ggml_shapes, source=name)
        self._validate_tensors(name)

    def _validate_tensors(self, name: str) -> None:
        cfg = self.config
        for pattern, ggml_shape in cfg.expected_shapes().items():
            names = ([pattern.format(i=i) for i in range(cfg.n_layers)] if "{i}" in pattern else [pattern])
            for tname in names:
                info = self.tensors.get(tname)
                if info is None:
                    raise ModelFileError(f"{name}: missing tensor {tname!r}")
                want = tuple(reversed(ggml_shape))
                if info.shape != want:
                    raise ModelFileError(f"{name}: tensor {tname!r} has shape {list(reversed(info.shape))} "
                                         f"but the metadata implies {list(ggml_shape)}")
                quants.check_supported(info.qtype, tname)
                quants.row_bytes(info.qtype, info.shape[-1])

    def tensor(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def layer_tensor(self, layer: int, short: str) -> TensorInfo:
        return self.tensors[f"blk.{layer}.{short}.weight"]

    @property
    def file_size(self) -> int:
        return os.path.getsize(self.path)

    def close(self) -> None:
        """Drop the memory map (tensor views taken earlier stay valid until released)."""
        self._reader = None
        self.tensors = {}
