"""Opening a GGUF Llama file: validation, the model config, and the tensor index.

The file is memory-mapped and its header, metadata and tensor infos parsed here (not by
`gguf.GGUFReader`, which trusts every count in the file); tensor bytes are numpy views of the map
and are only read when a tier copies them. Every problem with the file raises `ModelFileError`
with a one-line message that names the file and the offending key or tensor.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
from typing import Any, Mapping

import gguf
import numpy as np

from ntransformer_jax import quants
from ntransformer_jax.errors import ModelFileError

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
KEY_EXPERTS = "{arch}.expert_count"

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

        n_experts = get(KEY_EXPERTS, 0)
        if n_experts > 0:
            raise ModelFileError(f"{source}: mixture-of-experts models are not supported "
                                 f"({KEY_EXPERTS.format(arch=arch)}={n_experts})")
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


# ---------------------------------------------------------------------------------------------
# The GGUF container, parsed defensively
# ---------------------------------------------------------------------------------------------
# Layout (little-endian): magic "GGUF", uint32 version, uint64 tensor count, uint64 key/value
# count; the key/value pairs (string key, uint32 value type, value); the tensor infos (string
# name, uint32 n_dims, uint64 dims[n_dims] ne0 first, uint32 ggml type, uint64 offset from the
# data start); padding to `general.alignment`; the tensor data. A string is a uint64 length and
# that many UTF-8 bytes; an array is a uint32 item type, a uint64 count and the items.
#
# `gguf.GGUFReader` trusts every count and length in a file: an absurd array count makes it loop
# for hours, a bad string or type id raises whatever Python raises. So the file is parsed here,
# checking each count and length against the bytes that remain before reading it, so that any
# file either opens or raises ModelFileError quickly. Numeric arrays are read as one numpy view.

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64          # tensor names are shorter (ggml stores them NUL-terminated)
DEFAULT_ALIGNMENT = 32
_HEADER_BYTES = 24
_MIN_KV_BYTES = 8 + 4 + 1                  # empty key, type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

_VT = gguf.GGUFValueType
_SCALAR_DTYPES: dict[int, np.dtype] = {
    _VT.UINT8: np.dtype("<u1"), _VT.INT8: np.dtype("<i1"), _VT.UINT16: np.dtype("<u2"),
    _VT.INT16: np.dtype("<i2"), _VT.UINT32: np.dtype("<u4"), _VT.INT32: np.dtype("<i4"),
    _VT.FLOAT32: np.dtype("<f4"), _VT.BOOL: np.dtype("?"), _VT.UINT64: np.dtype("<u8"),
    _VT.INT64: np.dtype("<i8"), _VT.FLOAT64: np.dtype("<f8"),
}


def _short_repr(value: Any, limit: int = 60) -> str:
    """repr() of a value read from a file, cut to one short line for an error message."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Cursor:
    """Reads GGUF fields from a buffer, refusing any read that would pass its end."""

    def __init__(self, buf: mmap.mmap, name: str):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.name = name

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"corrupt GGUF file {self.name}: {what}")

    def need(self, n: int, what: str) -> int:
        """Reserve `n` bytes at the cursor; returns their offset."""
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ends at "
                            f"byte {self.size} (truncated?)")
        pos = self.pos
        self.pos += n
        return pos

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.need(8, what))[0]

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        pos = self.need(n, f"{what} of {n} bytes")
        return self.buf[pos:pos + n]

    def text(self, what: str) -> str:
        """A string that must be valid UTF-8 (a key or tensor name)."""
        pos = self.pos
        try:
            return self.raw_string(what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {pos} is not valid UTF-8") from None

    def value(self, vtype: int, key: str) -> Any:
        """One metadata value, as `metadata.read_metadata` returns it."""
        if vtype == _VT.STRING:
            return self.raw_string(f"string value of {key!r}").decode("utf-8", errors="replace")
        dtype = _SCALAR_DTYPES.get(vtype)
        if dtype is not None:
            pos = self.need(dtype.itemsize, f"value of {key!r}")
            value = np.frombuffer(self.buf, dtype, 1, pos)[0]
            return bool(value) if vtype == _VT.BOOL else value.item()
        if vtype != _VT.ARRAY:
            raise self.fail(f"metadata key {key!r} has unknown value type {vtype}")
        item_type = self.u32(f"array type of {key!r}")
        count = self.u64(f"array length of {key!r}")
        if item_type == _VT.STRING:
            if count * 8 > self.size - self.pos:
                raise self.fail(f"metadata key {key!r}: {count} strings cannot fit in the "
                                f"{self.size - self.pos} bytes left (truncated?)")
            return [self.raw_string(f"string {i} of {key!r}").decode("utf-8", errors="replace")
                    for i in range(count)]
        dtype = _SCALAR_DTYPES.get(item_type)
        if dtype is None:
            what = "arrays of arrays" if item_type == _VT.ARRAY else f"array item type {item_type}"
            raise self.fail(f"metadata key {key!r}: {what} not supported")
        if count * dtype.itemsize > self.size - self.pos:
            raise self.fail(f"metadata key {key!r}: {count} items of {dtype.itemsize} bytes cannot "
                            f"fit in the {self.size - self.pos} bytes left (truncated?)")
        pos = self.need(count * dtype.itemsize, f"array {key!r}")
        # A read-only view of the map: no copy, whatever the count says.
        return np.frombuffer(self.buf, dtype.newbyteorder("<"), count, pos)


@dataclasses.dataclass(frozen=True)
class _TensorEntry:
    name: str
    qtype: gguf.GGMLQuantizationType
    ne: tuple[int, ...]     # ggml order, ne0 first
    offset: int             # from the start of the data section
    n_bytes: int


def _read_tensor_entry(cur: _Cursor, index: int) -> _TensorEntry:
    name = cur.text(f"name of tensor {index}")
    if len(name.encode("utf-8")) >= GGML_MAX_NAME:
        raise cur.fail(f"tensor {index} name {_short_repr(name)} is longer than "
                       f"{GGML_MAX_NAME - 1} bytes")
    n_dims = cur.u32(f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {GGML_MAX_DIMS} allowed)")
    ne = tuple(cur.u64(f"shape of tensor {name!r}") for _ in range(n_dims))
    type_id = cur.u32(f"type of tensor {name!r}")
    offset = cur.u64(f"data offset of tensor {name!r}")
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown type id {type_id}") from None
    if any(x == 0 or x >= 1 << 63 for x in ne):
        raise cur.fail(f"tensor {name!r} has invalid shape {list(ne)}")
    if ne[0] % block_size:
        raise cur.fail(f"tensor {name!r} rows of {ne[0]} elements are not a whole number of "
                       f"{qtype.name} blocks of {block_size}")
    n_bytes = math.prod(ne) // block_size * type_size
    return _TensorEntry(name, qtype, ne, offset, n_bytes)


def _parse_gguf(buf: mmap.mmap, name: str) -> tuple[dict[str, Any], list[_TensorEntry], int]:
    """Parse the header, metadata and tensor infos of a GGUF file held in `buf`.

    Returns:
      (metadata, tensor entries, byte offset of the data section).
    Raises:
      ModelFileError: anything malformed; the message names the file and the field.
    """
    cur = _Cursor(buf, name)
    cur.need(_HEADER_BYTES, "header")
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    # Reject impossible counts before walking them.
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cur.size - _HEADER_BYTES:
        raise cur.fail(f"{n_kv} metadata keys and {n_tensors} tensors cannot fit in "
                       f"{cur.size} bytes (truncated?)")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.text(f"metadata key {i}")
        vtype = cur.u32(f"value type of {key!r}")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(vtype, key)
    entries, seen = [], set()
    for i in range(n_tensors):
        entry = _read_tensor_entry(cur, i)
        if entry.name in seen:
            raise cur.fail(f"tensor {entry.name!r} appears twice")
        seen.add(entry.name)
        entries.append(entry)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1)
            or alignment >= 1 << 32):
        raise cur.fail(f"general.alignment={_short_repr(alignment)} must be a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    for entry in entries:
        if entry.offset % alignment:
            raise cur.fail(f"tensor {entry.name!r} data offset {entry.offset} is not a multiple "
                           f"of the alignment {alignment}")
        end = data_start + entry.offset + entry.n_bytes
        if end > cur.size:
            raise ModelFileError(f"{name}: tensor {entry.name!r} data ends at byte {end}, past "
                                 f"the end of the file ({cur.size} bytes; truncated?)")
    return metadata, entries, data_start


def _open_checked(path: str) -> mmap.mmap:
    """Memory-map `path` after checking that it exists, is a file and starts like a GGUF file."""
    if not os.path.exists(path):
        raise ModelFileError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelFileError(f"model path is a directory, not a GGUF file: {path}")
    if not os.path.isfile(path):
        raise ModelFileError(f"model path is not a regular file: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelFileError(f"model file is empty: {path}")
            if head[:4] != GGUF_MAGIC:
                raise ModelFileError(f"not a GGUF file (bad magic {head[:4]!r}): {path}")
            if len(head) < _HEADER_BYTES:
                raise ModelFileError(f"truncated GGUF header ({size} bytes): {path}")
            version = struct.unpack_from("<I", head, 4)[0]
            if version not in GGUF_VERSIONS:
                swapped = struct.unpack_from(">I", head, 4)[0]
                hint = " (a big-endian file?)" if swapped in GGUF_VERSIONS else ""
                raise ModelFileError(f"unsupported GGUF version {version}{hint} (supported: "
                                     f"{', '.join(map(str, GGUF_VERSIONS))}): {path}")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelFileError(f"cannot read model file {path}: {e.strerror or e}") from None


def _float_values(info: TensorInfo) -> np.ndarray | None:
    """The values of an F32/F16/BF16 tensor as a flat float32 array; None for other types."""
    raw = info.data.reshape(-1)
    if info.qtype == gguf.GGMLQuantizationType.F32:
        return raw.view("<f4").astype(np.float32)
    if info.qtype == gguf.GGMLQuantizationType.F16:
        return raw.view("<f2").astype(np.float32)
    if info.qtype == gguf.GGMLQuantizationType.BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return None


class ModelFile:
    """A validated, memory-mapped GGUF Llama model.

    Attributes:
      path: the file path.
      metadata: all key/value metadata as Python values (as `metadata.read_metadata` gives them).
      config: the `LlamaConfig`.
      tensors: name -> `TensorInfo`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        """Open and validate `path`.

        Raises:
          ModelFileError: the file is missing, unreadable, corrupt, or not a supported Llama
            model; the one-line message names the file and the key or tensor at fault.
        """
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self._buffer = buf = _open_checked(self.path)
        self.metadata, entries, data_start = _parse_gguf(buf, self.name)
        self.tensors: dict[str, TensorInfo] = {}
        for e in entries:
            shape = tuple(reversed(e.ne))                 # numpy order
            offset = data_start + e.offset
            data = np.frombuffer(buf, np.uint8, e.n_bytes, offset)
            self.tensors[e.name] = TensorInfo(
                name=e.name, qtype=e.qtype, shape=shape, offset=offset, n_bytes=e.n_bytes,
                data=data.reshape(shape[:-1] + (e.n_bytes // math.prod(shape[:-1]),)))
        ggml_shapes = {e.name: e.ne for e in entries}
        self.config = LlamaConfig.from_metadata(self.metadata, ggml_shapes, source=self.name)
        self._validate_tensors(self.name)

    def _validate_tensors(self, name: str) -> None:
        cfg = self.config
        for pattern, ggml_shape in cfg.expected_shapes().items():
            # A generator: an absurd block_count fails at the first missing layer, not after
            # building billions of names.
            names = ((pattern.format(i=i) for i in range(cfg.n_layers)) if "{i}" in pattern
                     else [pattern])
            for tname in names:
                info = self.tensors.get(tname)
                if info is None:
                    raise ModelFileError(f"{name}: missing tensor {tname!r}")
                want = tuple(reversed(ggml_shape))
                if info.shape != want:
                    raise ModelFileError(f"{name}: tensor {tname!r} has shape {list(reversed(info.shape))} "
                                         f"but the metadata implies {list(ggml_shape)}")
                try:
                    quants.check_supported(info.qtype, tname)
                    quants.row_bytes(info.qtype, info.shape[-1])
                except ModelFileError as e:
                    raise ModelFileError(f"{name}: {e}") from None
        if cfg.has_rope_freqs:
            # A handful of numbers that divide the RoPE frequencies: check them here, where a
            # bad one is still a clear message rather than infinities in every logit.
            factors = _float_values(self.tensors["rope_freqs.weight"])
            if factors is None:
                raise ModelFileError(f"{name}: tensor 'rope_freqs.weight' must be F32, F16 or BF16, "
                                     f"not {self.tensors['rope_freqs.weight'].qtype.name}")
            if not np.all(np.isfinite(factors) & (factors > 0)):
                raise ModelFileError(f"{name}: tensor 'rope_freqs.weight' holds a factor that is not a "
                                     f"positive finite number")

    def tensor(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def layer_tensor(self, layer: int, short: str) -> TensorInfo:
        return self.tensors[f"blk.{layer}.{short}.weight"]

    @property
    def file_size(self) -> int:
        return os.path.getsize(self.path)

    def release_pages(self) -> None:
        """Tell the kernel this process no longer needs the mapped pages it touched (they stay in
        the page cache, but leave this process's RSS); later reads of the map fault them back."""
        if self._buffer is not None:
            self.release_range(0, len(self._buffer))

    def release_range(self, offset: int, length: int) -> None:
        """`release_pages` for the bytes [offset, offset + length) only (whole pages inside it,
        and the map's last partial page when the range reaches the end)."""
        if self._buffer is None or not hasattr(self._buffer, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (len(self._buffer) if offset + length >= len(self._buffer)
               else (offset + length) // mmap.PAGESIZE * mmap.PAGESIZE)
        if end > start:
            try:
                self._buffer.madvise(mmap.MADV_DONTNEED, start, end - start)
            except OSError:
                pass   # advisory only

    def close(self) -> None:
        """Drop the memory map (tensor views taken earlier stay valid until released)."""
        self._buffer = None
        self.tensors = {}
