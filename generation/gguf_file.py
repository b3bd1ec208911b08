"""A GGUF file's scalar metadata and its tensors' bytes, read without parsing its arrays.

`gguf.GGUFReader` builds a numpy view of every metadata value, the tokenizer's 151,000
strings and as many merges included: 40-75 s for a Qwen2.5 GGUF on the 2-core machines
here, most of the first `RAGQA_QUANTIZATION=gguf` load. The packs need three numbers and
the tensor table, so this reader steps over arrays (strings by their lengths, the rest by
their counts) and maps the file once: well under a second for the same files.

Layout (GGUF v2 and v3, little-endian): magic, version (uint32), tensor count and metadata
count (uint64); each metadata entry a key string (uint64 length, bytes), a value type
(uint32) and the value, arrays as an element type (uint32), a count (uint64) and the
elements; then each tensor's name, dimension count (uint32), dimensions (uint64, the row
length first), type (uint32) and offset (uint64) into the data, which starts at the next
multiple of `general.alignment` (32 when absent).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)

# Fixed-size value types: struct format.
_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}

_VALUE_TYPES = {int(t): t for t in GGUFValueType}
# Types whose block sizes are known (GGML_QUANT_SIZES): a tensor's bytes can be located.
_TENSOR_TYPES = {int(t): t for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # as transformers orders it: rows first ([N, K] for a weight)
    type_name: str  # "Q4_K", "Q8_0", "F32", ...
    data: np.ndarray  # the tensor's bytes, uint8, a view of the mapped file


class GgufFile:
    """`fields`: every scalar and string value by key (arrays are skipped: absent);
    `tensors`: by GGUF name."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self._map)  # type: ignore[arg-type]
        self._pos = 0
        try:
            self._parse()
        except struct.error as exc:
            raise ValueError(f"{self.path} ends inside its GGUF header ({exc})") from exc

    def _parse(self) -> None:
        magic, version = self._unpack("<II")
        if magic != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (magic {magic:#010x})")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} (this reader knows 2 and 3)")
        n_tensors, n_fields = self._unpack("<QQ")
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = self._string()
            kind = self._value_type()
            value = self._value(kind)
            if kind != GGUFValueType.ARRAY:
                self.fields[key] = value
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            kind_id, offset = self._unpack("<IQ")
            if kind_id not in _TENSOR_TYPES:
                raise ValueError(f"{self.path}: tensor {name} has type {kind_id}, not a known one")
            infos.append((name, tuple(int(d) for d in dims), _TENSOR_TYPES[kind_id], offset))
        alignment = int(self.fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))  # type: ignore[call-overload]
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"{self.path}: general.alignment {alignment} is not a power of two")
        start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GgufTensor] = {}
        for name, dims, kind, offset in infos:
            block, block_bytes = GGML_QUANT_SIZES[kind]
            values = int(np.prod(dims)) if dims else 1
            if values % block:
                raise ValueError(f"{self.path}: {name} has {values} values, not whole blocks")
            begin = start + offset
            end = begin + values // block * block_bytes
            if end > len(self._map):
                raise ValueError(f"{self.path}: {name} ends at byte {end}, past the file's end")
            self.tensors[name] = GgufTensor(name, dims[::-1], kind.name, self._map[begin:end])

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        text = bytes(self._buf[self._pos : self._pos + length]).decode("utf-8", errors="replace")
        self._pos += length
        return text

    def _value_type(self) -> GGUFValueType:
        (kind,) = self._unpack("<I")
        if kind not in _VALUE_TYPES:
            raise ValueError(
                f"{self.path}: unknown metadata value type {kind} at byte {self._pos - 4}"
            )
        return _VALUE_TYPES[kind]

    def _value(self, kind: GGUFValueType) -> object:
        if kind == GGUFValueType.STRING:
            return self._string()
        if kind == GGUFValueType.ARRAY:
            element = self._value_type()
            (count,) = self._unpack("<Q")
            if element in _SCALARS:
                self._pos += count * struct.calcsize(_SCALARS[element])
            elif element == GGUFValueType.STRING:  # the vocabulary, the merges: lengths only
                for _ in range(count):
                    self._pos += 8 + struct.unpack_from("<Q", self._buf, self._pos)[0]
            else:  # nested arrays: one by one
                for _ in range(count):
                    self._value(element)
            return None
        return self._unpack(_SCALARS[kind])[0]
