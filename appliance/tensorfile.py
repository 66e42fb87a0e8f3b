"""Safetensors files read and written a tensor, or a block of rows, at a time.

Plain reads and writes, never a memory map: the pages of a map that has been read stay in the
process's resident set until it is closed, so mapping a 5 GB shard would hold 5 GB however little
of it is in use at once. Here what is in memory is what the caller holds.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from appliance.errors import ApplianceError

# safetensors' dtype names, their sizes, and torch's names for them
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
          "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
FLOATS = ("F64", "F32", "F16", "BF16")
COPY_CHUNK = 16 << 20  # bytes moved at a time when a tensor is copied unchanged


class TensorFileError(ApplianceError):
    title = "Weights file problem"


def dtype_name(torch_dtype: Any) -> str:
    """The safetensors name of a torch dtype (`torch.bfloat16` -> "BF16")."""
    name = str(torch_dtype).removeprefix("torch.")
    for key, value in _TORCH.items():
        if value == name:
            return key
    raise TensorFileError(f"no safetensors type for {name}", "Use a float16, bfloat16 or float32 model.")


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """The bytes of a tensor of safetensors type `dtype` and `shape`."""
    return math.prod(shape) * _SIZES[dtype]


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, _TORCH[name])


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors' name: "BF16"
    shape: tuple[int, ...]
    begin: int  # offsets from the start of the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


class Reader:
    """The header of one safetensors file, and its tensors read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: io.BufferedReader = open(path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        try:
            self.metadata, self.tensors = _header(path, self._file)
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def read(self, name: str) -> Any:
        """The whole tensor `name` (a torch tensor of its stored dtype)."""
        info = self.tensors[name]
        return self.rows(info, 0, info.shape[0] if info.shape else 1)

    def rows(self, info: TensorInfo, start: int, stop: int) -> Any:
        """Rows `start:stop` of `info`'s tensor (along its first dimension)."""

        if not info.shape:
            data = self._bytes(info.begin, info.nbytes)
            return data.view(torch_dtype(info.dtype)).reshape(())
        step = info.row_bytes
        data = self._bytes(info.begin + start * step, (stop - start) * step)
        return data.view(torch_dtype(info.dtype)).reshape((stop - start, *info.shape[1:]))

    def chunks(self, info: TensorInfo, size: int = COPY_CHUNK) -> Iterator[memoryview]:
        """The raw bytes of a tensor, `size` at a time, in one buffer: each piece is valid until the next."""
        buffer = memoryview(bytearray(min(size, info.nbytes)))
        self._file.seek(info.begin)
        left = info.nbytes
        while left:
            want = min(len(buffer), left)
            got = self._file.readinto(buffer[:want])
            if not got:
                raise TensorFileError(f"{self.path} ends inside tensor {info.name}",
                                      "The file is truncated: copy or import the model again.")
            left -= got
            yield buffer[:got]

    def _bytes(self, offset: int, length: int) -> Any:
        import torch

        out = torch.empty(length, dtype=torch.uint8)
        self._file.seek(offset)
        view = memoryview(out.numpy()).cast("B")
        got = 0
        while got < length:
            n = self._file.readinto(view[got:])
            if not n:
                raise TensorFileError(f"{self.path} ends early (wanted {length} bytes at {offset})",
                                      "The file is truncated: copy or import the model again.")
            got += n
        return out


def _header(path: Path, file: IO[bytes]) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    raw = file.read(8)
    size = os.fstat(file.fileno()).st_size
    if len(raw) < 8:
        raise TensorFileError(f"{path} is not a safetensors file (too short)", "Copy or import the model again.")
    (length,) = struct.unpack("<Q", raw)
    if length > min(size - 8, 100 << 20):
        raise TensorFileError(f"{path} is not a safetensors file (header of {length} bytes)",
                              "Copy or import the model again.")
    try:
        header = json.loads(file.read(length))
    except ValueError as exc:
        raise TensorFileError(f"{path}: its header is not JSON ({exc})", "Copy or import the model again.") from exc
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in _SIZES:
            raise TensorFileError(f"{path}: tensor {name} has type {entry['dtype']}, which this appliance does "
                                  "not read", "Use a model stored in float16, bfloat16 or float32.")
        info = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), start + begin, start + end)
        if info.nbytes != info.numel * _SIZES[info.dtype] or info.end > size:
            raise TensorFileError(f"{path}: tensor {name} does not fit its header", "Copy or import the model again.")
        tensors[name] = info
    return metadata, tensors


class Writer:
    """A safetensors file whose header (every name, type and shape) is known before any data is written:
    the data then goes out in order, tensor by tensor, a piece at a time."""

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = path
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._order: list[tuple[str, int]] = []
        for name, dtype, shape in layout:
            size = nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, size))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._next = -1
        self._left = 0
        self._advance()

    def write(self, name: str, data: Any) -> None:
        """The next piece of tensor `name`: bytes, or a torch tensor of its declared type."""
        if self._next >= len(self._order) or self._order[self._next][0] != name:
            expected = self._order[self._next][0] if self._next < len(self._order) else "nothing more"
            raise TensorFileError(f"{self.path}: wrote {name} where {expected} comes next",
                                  "This is a bug in the writer's caller.")
        raw = data if isinstance(data, bytes | bytearray | memoryview) else _tensor_bytes(data)
        if len(raw) > self._left:
            raise TensorFileError(f"{self.path}: more data for {name} than its shape holds",
                                  "This is a bug in the writer's caller.")
        self._file.write(raw)
        self._left -= len(raw)
        if self._left == 0:
            self._advance()

    def _advance(self) -> None:
        """On to the next tensor that has data (an empty one is complete as declared)."""
        self._next += 1
        while self._next < len(self._order) and self._order[self._next][1] == 0:
            self._next += 1
        self._left = self._order[self._next][1] if self._next < len(self._order) else 0

    def close(self) -> None:
        """Flush and sync the file; refuses when a tensor was left short."""
        try:
            if self._next < len(self._order):
                raise TensorFileError(f"{self.path}: tensor {self._order[self._next][0]} was not written in full",
                                      "This is a bug in the writer's caller.")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()


def _tensor_bytes(tensor: Any) -> memoryview:
    import torch

    flat = tensor.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def shards(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, in the order of its index when it has one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    return sorted(folder.glob("*.safetensors"))
