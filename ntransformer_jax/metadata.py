"""Reading GGUF key/value metadata into plain Python values."""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np


def field_value(field: gguf.ReaderField) -> Any:
    """Return one metadata field as a Python value.

    Strings become `str` (UTF-8, undecodable bytes replaced), scalars Python numbers/bools,
    arrays of strings `list[str]`, arrays of numbers 1-D numpy arrays.
    """
    types = field.types
    if not types:
        raise ValueError(f"metadata field {field.name!r} has no type")
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if len(types) > 1 and types[1] == gguf.GGUFValueType.ARRAY:
            return [np.asarray(field.parts[i]) for i in field.data]
        if not field.data:
            return np.zeros((0,), dtype=np.float32)
        return np.concatenate([np.asarray(field.parts[i]).reshape(-1) for i in field.data])
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]][0]
    if types[0] == gguf.GGUFValueType.BOOL:
        return bool(value)
    return value.item()


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value metadata of an open GGUF file as `{key: python value}`."""
    return {name: field_value(field) for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}
