"""Read a GGUF's metadata and tensor types without loading it, and copy one with changed metadata.

The verification gate reads what llama.cpp will read (architecture, chat template, special token
ids, tensor types) straight from the file. `rewrite` exists so a damaged file can be reproduced
on purpose: the gate's own tests plant each failure it guards against.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError

SPECIAL_KEYS = ("bos", "eos", "eot", "eom", "padding", "unknown", "sep")

# The GGUF architecture llama.cpp's converter writes for each Hugging Face model class it converts (read
# from the pinned converter's `ModelBase.register` lines; Mistral is converted as a Llama).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3",
}


def expected_architecture(config: Mapping[str, Any]) -> str | None:
    """The GGUF architecture a model with this `config.json` converts to; None for a family not listed."""
    classes = config.get("architectures") or []
    return next((ARCHITECTURES[c] for c in classes if c in ARCHITECTURES), None)


def generated_tensors(config: Mapping[str, Any]) -> int:
    """Tensors llama.cpp's converter writes beyond the checkpoint's own: the rope frequency factors of Llama 3.1
    and later (rope type llama3: one tensor) and Phi-3's long and short rope factors (longrope: two)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope = rope.get("full_attention", rope) if isinstance(rope, Mapping) else {}
    kind = str(rope.get("rope_type") or rope.get("type") or "").lower()
    classes = config.get("architectures") or []
    if kind == "llama3" and any(c in ("LlamaForCausalLM", "MistralForCausalLM") for c in classes):
        return 1
    if kind in ("longrope", "su") and rope.get("long_factor") and "Phi3ForCausalLM" in classes:
        return 2
    return 0


class GGUFError(ApplianceError):
    title = "Unreadable GGUF file"


@dataclass
class GGUFInfo:
    path: Path
    architecture: str | None
    tensor_count: int
    chat_template: str | None
    special_ids: dict[str, int]  # bos, eos, eot, padding ... as written in tokenizer.ggml.*_token_id
    tokens: list[str]
    tensor_types: list[str]
    fields: dict[str, Any] = field(default_factory=dict)  # every scalar and string field
    arrays: dict[str, list[Any]] = field(default_factory=dict)  # the other arrays (not the per-token ones)
    tensor_names: list[str] = field(default_factory=list)

    def token_text(self, token_id: int) -> str | None:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else None


# GGUF value types (the format's numbering) and their struct codes; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Arrays with one entry per vocabulary token: only the token texts are kept (the gate names tokens by them).
PER_TOKEN = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


class _Cursor:
    """Reads GGUF's header values from a memory map, in the file's byte order."""

    def __init__(self, data: Any, order: str) -> None:
        self.data, self.order, self.at = data, order, 0

    def take(self, code: str) -> Any:
        fmt = self.order + code
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        text = bytes(self.data[self.at:self.at + n]).decode("utf-8", errors="replace")
        self.at += n
        return text

    def value(self, kind: int, keep: bool = True) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in _SCALARS and not keep:  # skipped without decoding
                self.at += count * struct.calcsize(self.order + _SCALARS[item])
                return None
            if item in _SCALARS:
                fmt = f"{self.order}{count}{_SCALARS[item]}"
                values = list(struct.unpack_from(fmt, self.data, self.at))
                self.at += struct.calcsize(fmt)
                return values
            items = [self.value(item, keep) for _ in range(count)]
            return items if keep else None
        if kind not in _SCALARS:
            raise ValueError(f"unknown value type {kind} at byte {self.at}")
        return self.take(_SCALARS[kind])


def read(path: Path) -> GGUFInfo:
    """Everything the gate needs from `path`: the header's fields and tensor types, read straight from the
    file (gguf's own reader decodes every array element as a numpy view: seconds per file for a 49k vocabulary,
    where this takes milliseconds)."""
    from gguf import GGMLQuantizationType

    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                raise ValueError("it does not start with the GGUF magic number")
            order = "<" if struct.unpack_from("<I", data, 4)[0] < 65536 else ">"
            cursor = _Cursor(data, order)
            cursor.at = 8
            tensor_count, kv_count = cursor.take("Q"), cursor.take("Q")
            fields: dict[str, Any] = {}
            arrays: dict[str, list[Any]] = {}
            tokens: list[str] = []
            for _ in range(kv_count):
                name, kind = cursor.string(), cursor.take("I")
                keep = name not in PER_TOKEN or name == "tokenizer.ggml.tokens"
                value = cursor.value(kind, keep)
                if name == "tokenizer.ggml.tokens":
                    tokens = value
                elif kind == _ARRAY and keep:
                    arrays[name] = value
                elif kind != _ARRAY:
                    fields[name] = value
            tensor_types, tensor_names = [], []
            for _ in range(tensor_count):
                tensor_names.append(cursor.string())
                dims = cursor.take("I")
                cursor.at += 8 * dims
                tensor_types.append(GGMLQuantizationType(cursor.take("I")).name)
                cursor.take("Q")
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise GGUFError(f"{path} is not a readable GGUF file: {exc}",
                        "Export again; the file may be truncated or from another program.") from exc
    special = {key: int(fields[f"tokenizer.ggml.{key}_token_id"]) for key in SPECIAL_KEYS
               if f"tokenizer.ggml.{key}_token_id" in fields}
    template = fields.get("tokenizer.chat_template")
    return GGUFInfo(path=path, architecture=fields.get("general.architecture"), tensor_count=tensor_count,
                    chat_template=str(template) if template is not None else None, special_ids=special,
                    tokens=tokens, tensor_types=tensor_types, fields=fields, arrays=arrays,
                    tensor_names=tensor_names)


def rewrite(src: Path, dst: Path, set_fields: Mapping[str, Any] | None = None,
            drop: tuple[str, ...] = ()) -> None:
    """Copy `src` to `dst` with fields removed (`drop`) or changed (`set_fields`, existing keys only,
    keeping their type). Written under a temporary name and renamed when complete."""
    import gguf

    set_fields = dict(set_fields or {})
    reader = gguf.GGUFReader(str(src))
    arch = set_fields.pop("general.architecture", reader.fields["general.architecture"].contents())
    tmp = dst.with_name(f".{dst.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    try:
        for name, reader_field in reader.fields.items():
            if name == "general.architecture" or name.startswith("GGUF.") or name in drop:
                continue
            value_type = reader_field.types[0]
            sub_type = reader_field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            value = set_fields.pop(name, reader_field.contents())
            writer.add_key_value(name, value, value_type, sub_type=sub_type)
        if set_fields:
            raise GGUFError(f"{src} has no fields {', '.join(set_fields)} to change")
        for tensor in reader.tensors:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                   tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        writer.close()
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
