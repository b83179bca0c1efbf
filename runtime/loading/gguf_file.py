"""A fast reader of GGUF files: metadata parsed once into Python values, tensors as views of a memory map.

``gguf.GGUFReader`` builds a numpy array per metadata item, which takes tens of seconds for the
100k-entry vocabularies of Llama 3 or Qwen; this reader walks the same layout with ``struct`` (string
arrays in a plain loop, numeric arrays as one ``np.frombuffer``) and checks each tensor's extent
against the file size, so a truncated file names its first incomplete tensor instead of failing in
a reshape. Tensors expose the fields the loader reads from ``gguf.ReaderTensor`` (``name``,
``tensor_type``, ``shape`` innermost first, ``n_bytes``, ``data``).

    >>> from sglite.runtime.loading.gguf_file import GGUFFile
    >>> gguf = GGUFFile("SmolLM2-135M-Instruct.Q4_1.gguf")                # doctest: +SKIP
    >>> gguf.fields["llama.block_count"], gguf.tensors[0].name            # doctest: +SKIP
    (30, 'token_embd.weight')
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
"""GGUF value type -> struct format (8 = string, 9 = array)."""
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
          10: np.uint64, 11: np.int64, 12: np.float64}
_FLOAT_ITEMS = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                "I32": np.int32, "I64": np.int64}
"""Tensor types read as typed elements (every other type is read as uint8 rows of blocks)."""


class GGUFFormatError(ValueError):
    """The file is not a GGUF file, or is truncated or corrupt (the message names where)."""


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file, its data a read-only view of the file."""

    name: str
    tensor_type: object
    """A ``gguf.GGMLQuantizationType``."""
    shape: np.ndarray
    """Dimensions innermost first, as GGUF stores them (``[in, out]`` for a weight)."""
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray
    """Typed ``[out, in]`` elements for float types, uint8 ``[out, row_bytes]`` blocks for the others."""


class _Cursor:
    def __init__(self, buffer: memoryview, path: str) -> None:
        self.buffer, self.offset, self.path = buffer, 0, path

    def unpack(self, fmt: str) -> object:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.buffer):
            raise GGUFFormatError(f"{self.path}: the metadata ends early (byte {self.offset}): the file is truncated")
        value = struct.unpack_from(fmt, self.buffer, self.offset)[0]
        self.offset += size
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.offset + length > len(self.buffer):
            raise GGUFFormatError(f"{self.path}: a string runs past the end of the file (byte {self.offset}): truncated")
        value = bytes(self.buffer[self.offset:self.offset + length]).decode("utf-8", errors="replace")
        self.offset += length
        return value

    def value(self, value_type: int) -> object:
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type])
        if value_type == 8:
            return self.string()
        if value_type == 9:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _NUMPY:
                dtype = np.dtype(_NUMPY[item_type]).newbyteorder("<")
                end = self.offset + count * dtype.itemsize
                if end > len(self.buffer):
                    raise GGUFFormatError(f"{self.path}: an array runs past the end of the file: truncated")
                items = np.frombuffer(self.buffer, dtype, count, self.offset).tolist()
                self.offset = end
                return items
            return [self.value(item_type) for _ in range(count)]
        raise GGUFFormatError(f"{self.path}: unknown metadata value type {value_type} at byte {self.offset}: corrupt file")


class GGUFFile:
    """The metadata (``fields``: key -> Python value) and tensors of a GGUF file, read at once."""

    def __init__(self, path: str | os.PathLike) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = os.fspath(path)
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        cursor = _Cursor(memoryview(self.data), self.path)
        if bytes(self.data[:4]) != GGUF_MAGIC:
            raise GGUFFormatError(f"{self.path} is not a GGUF file (it does not start with 'GGUF')")
        cursor.offset = 4
        self.version = cursor.unpack("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        tensor_count, field_count = cursor.unpack("<Q"), cursor.unpack("<Q")
        self.fields: dict[str, object] = {}
        for _ in range(field_count):
            key = cursor.string()
            self.fields[key] = cursor.value(cursor.unpack("<I"))
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
            raw_type, offset = cursor.unpack("<I"), cursor.unpack("<Q")
            infos.append((name, dims, raw_type, offset))
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-cursor.offset // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        for name, dims, raw_type, offset in infos:
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise GGUFFormatError(f"GGUF tensor {name} has unknown ggml type {raw_type}: corrupt, or newer than sglite") from None
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            n_elements = int(np.prod(dims)) if dims else 1
            if dims and dims[0] % block:
                raise GGUFFormatError(f"GGUF tensor {name}: its rows of {dims[0]} values are not whole {qtype.name} blocks")
            n_bytes = n_elements // block * block_bytes
            begin = start + offset
            if begin + n_bytes > len(self.data):
                raise GGUFFormatError(
                    f"GGUF tensor {name} ends at byte {begin + n_bytes} but the file has {len(self.data)} bytes: the file is truncated"
                )
            raw = self.data[begin:begin + n_bytes]
            outer = tuple(reversed(dims[1:]))
            if qtype.name in _FLOAT_ITEMS:
                array = raw.view(_FLOAT_ITEMS[qtype.name]).reshape(*outer, dims[0] if dims else 1)
            else:
                array = raw.reshape(*outer, dims[0] // block * block_bytes)
            self.tensors.append(GGUFTensor(name, qtype, np.array(dims, dtype=np.uint64), n_elements, n_bytes, begin, array))

    def field(self, key: str, default: object = None) -> object:
        """The value of ``key``, or ``default``."""
        return self.fields.get(key, default)
