"""Read a GGUF's metadata and tensor types without loading it, and copy one with changed metadata.

The verification gate reads what llama.cpp will read (architecture, chat template, special token
ids, tensor types) straight from the file. `rewrite` exists so a damaged file can be reproduced
on purpose: the gate's own tests plant each failure it guards against.
"""

from __future__ import annotations

import os
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

    def token_text(self, token_id: int) -> str | None:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else None


def read(path: Path) -> GGUFInfo:
    """Everything the gate needs from `path`, read with the gguf reader."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise GGUFError(f"{path} is not a readable GGUF file: {exc}",
                        "Export again; the file may be truncated or from another program.") from exc
    scalars: dict[str, Any] = {}
    tokens: list[str] = []
    for name, reader_field in reader.fields.items():
        if name == "tokenizer.ggml.tokens":
            tokens = [str(t) for t in reader_field.contents()]
        elif reader_field.types and reader_field.types[0] != gguf.GGUFValueType.ARRAY:
            scalars[name] = reader_field.contents()
    special = {key: int(scalars[f"tokenizer.ggml.{key}_token_id"]) for key in SPECIAL_KEYS
               if f"tokenizer.ggml.{key}_token_id" in scalars}
    template = scalars.get("tokenizer.chat_template")
    info = GGUFInfo(
        path=path,
        architecture=scalars.get("general.architecture"),
        tensor_count=len(reader.tensors),
        chat_template=str(template) if template is not None else None,
        special_ids=special,
        tokens=tokens,
        tensor_types=[t.tensor_type.name for t in reader.tensors],
        fields=scalars,
    )
    del reader  # releases the memory map
    return info


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
