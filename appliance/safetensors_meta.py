"""Read safetensors headers without loading weights (no torch): names, dtypes, shapes."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from appliance.errors import StoreError

_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise ValueError(f"header length {length} is implausible")
            header: dict[str, Any] = json.loads(handle.read(length))
    except (OSError, ValueError) as exc:
        raise StoreError(
            f"{path} is not a readable safetensors file: {exc}",
            "Copy the model again; the file may be truncated.",
        ) from exc
    header.pop("__metadata__", None)
    return header


def check_complete(path: Path) -> None:
    """Raise StoreError unless `path` holds its whole header and every byte its tensors need."""
    header = read_header(path)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
    end = max((int(t["data_offsets"][1]) for t in header.values() if isinstance(t, dict) and "data_offsets" in t),
              default=0)
    size = path.stat().st_size
    if size != 8 + length + end:
        raise StoreError(f"{path} is truncated or padded: {size} bytes where its header describes {8 + length + end}",
                         "Remove it and run the stage that writes it again.")


def count_parameters(files: list[Path]) -> tuple[int, str]:
    """Total number of parameters and the most common dtype across the given files."""
    total = 0
    by_dtype: dict[str, int] = {}
    for path in files:
        for tensor in read_header(path).values():
            count = math.prod(tensor["shape"])
            total += count
            by_dtype[tensor["dtype"]] = by_dtype.get(tensor["dtype"], 0) + count
    dtype = max(by_dtype, key=lambda k: by_dtype[k]) if by_dtype else "unknown"
    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
    return total, names.get(dtype, dtype.lower())
