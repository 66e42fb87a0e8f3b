"""The quantization types we offer, what each costs in size, and where K-quants fall back.

llama.cpp's K-quants work on super-blocks of 256 weights along a row. A tensor whose rows are
not a multiple of 256 wide cannot use them and llama.cpp silently picks another type (the default
model's hidden size is 576, so most of its tensors fall back). We predict that before quantizing,
so the size shown next to each choice is the size the user gets, and report it after, from the
tensor types actually written.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from appliance.safetensors_meta import read_header

QK_K = 256

# bits per weight of each ggml tensor type (block size and bytes per block in ggml)
BITS: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_1": 6.0, "Q5_0": 5.5,
    "Q5_K": 5.5, "Q4_1": 5.0, "Q4_0": 4.5, "Q4_K": 4.5, "IQ4_NL": 4.5, "Q3_K": 3.4375, "Q2_K": 2.625,
}

# what llama.cpp uses instead of a K-quant for a tensor whose row width is not a multiple of 256
FALLBACK: dict[str, str] = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class Quant:
    name: str
    description: str
    base: str  # the ggml type most tensors get
    more_bits: str | None = None  # the _M mixes give attn_v and ffn_down of half the layers this type


QUANTS: dict[str, Quant] = {q.name: q for q in (
    Quant("F16", "16-bit floats: the reference every quantization is measured against", "F16"),
    Quant("BF16", "bfloat16: as trained, for runtimes with bf16 kernels", "BF16"),
    Quant("Q8_0", "8-bit: practically lossless, half the size of F16", "Q8_0"),
    Quant("Q6_K", "6-bit K-quant: very close to F16", "Q6_K"),
    Quant("Q5_K_M", "5-bit K-quant mix: small loss, a good choice when memory allows", "Q5_K", "Q6_K"),
    Quant("Q4_K_M", "4-bit K-quant mix: the recommended balance of size and quality", "Q4_K", "Q6_K"),
    Quant("Q4_0", "4-bit legacy: fast on older CPUs, a little worse than Q4_K_M", "Q4_0"),
    Quant("Q3_K_M", "3-bit K-quant mix: for tight memory; quality drops noticeably", "Q3_K", "Q5_K"),
    Quant("Q2_K", "2-bit K-quant: last resort for very large models; small models degrade badly", "Q2_K", "Q4_K"),
)}
RECOMMENDED = "Q4_K_M"


def parse_quants(names: list[str]) -> list[str]:
    """Normalise user-given names (case, duplicates) and reject unknown ones with the list."""
    chosen: list[str] = []
    for raw in names:
        name = raw.strip().upper()
        if name not in QUANTS:
            raise ValueError(f"unknown quantization {raw!r}: choose from {', '.join(QUANTS)}")
        if name not in chosen:
            chosen.append(name)
    return chosen


@dataclass(frozen=True)
class TensorShape:
    name: str
    shape: tuple[int, ...]  # Hugging Face order: (out, in) for a linear weight


def model_tensors(model_dir: Path) -> list[TensorShape]:
    tensors = []
    for path in sorted(model_dir.glob("*.safetensors")):
        for name, info in read_header(path).items():
            tensors.append(TensorShape(name, tuple(int(d) for d in info["shape"])))
    return tensors


def _uses_more_bits(layer: int, n_layers: int) -> bool:
    # llama.cpp's use_more_bits(): the first and last eighth of the layers, and every third between
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def tensor_type(quant: Quant, tensor: TensorShape, n_layers: int, is_output: bool = False) -> str:
    """The ggml type llama.cpp gives `tensor` for `quant` (close to llama_tensor_get_type)."""
    if len(tensor.shape) < 2 or quant.base in ("F16", "BF16"):
        return "F32" if len(tensor.shape) < 2 else quant.base
    if is_output:  # the output projection (or the embeddings tied to it) keeps more bits
        return "Q8_0" if tensor.shape[-1] % QK_K or quant.base == "Q8_0" else "Q6_K"
    wanted = quant.base
    layer = _layer_of(tensor.name)
    if quant.more_bits and layer is not None and _uses_more_bits(layer, n_layers) and (
            "v_proj" in tensor.name or "down_proj" in tensor.name):
        wanted = quant.more_bits
    if tensor.shape[-1] % QK_K and wanted in FALLBACK:
        return FALLBACK[wanted]
    return wanted


@dataclass(frozen=True)
class SizePrediction:
    quant: str
    bytes: int
    fallback_tensors: int  # tensors that wanted a K-quant and cannot have one
    quantized_tensors: int


def predict(model_dir: Path, quant_name: str) -> SizePrediction:
    """Size of the GGUF that `quant_name` will produce from the model in `model_dir`."""
    return predict_tensors(model_tensors(model_dir), quant_name, _metadata_bytes(model_dir))


def predict_tensors(tensors: list[TensorShape], quant_name: str, vocab_bytes: int) -> SizePrediction:
    """Size of the GGUF of these tensors at `quant_name`, with `vocab_bytes` of vocabulary and metadata."""
    quant = QUANTS[quant_name]
    n_layers = 1 + max((_layer_of(t.name) or 0) for t in tensors) if tensors else 0
    names = {t.name for t in tensors}
    output = "lm_head.weight" if "lm_head.weight" in names else next(
        (n for n in names if n.endswith("embed_tokens.weight")), None)  # tied embeddings serve as the output
    total_bits = 0.0
    fallback = quantized = 0
    for tensor in tensors:
        kind = tensor_type(quant, tensor, n_layers, tensor.name == output)
        total_bits += math.prod(tensor.shape) * BITS[kind]
        if len(tensor.shape) >= 2 and quant.base not in ("F16", "BF16"):
            quantized += 1
            if kind in FALLBACK.values() and quant.base in FALLBACK:
                fallback += 1
    return SizePrediction(quant_name, int(total_bits / 8) + vocab_bytes, fallback, quantized)


def _metadata_bytes(model_dir: Path) -> int:
    """The vocabulary and metadata the converter writes beside the tensors: each token and merge as a
    length-prefixed string, a type per token, the chat template and a few kilobytes of settings.
    Counted from the tokenizer's content, so a pretty-printed tokenizer.json predicts the same."""
    tokenizer = model_dir / "tokenizer.json"
    if not tokenizer.is_file():
        return 1 << 20
    data = json.loads(tokenizer.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    tokens = set(model.get("vocab") or {}) | {t["content"] for t in data.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    strings = sum(8 + len(t.encode("utf-8")) for t in tokens) + sum(8 + len(m.encode("utf-8")) for m in merges)
    template = model_dir / "chat_template.jinja"
    extra = template.stat().st_size if template.is_file() else 0
    return strings + 4 * len(tokens) + extra + 4096


def fallback_note(type_counts: dict[str, int], quant_name: str) -> str | None:
    """A sentence for the user when a K-quant file holds mostly legacy types, or None."""
    quant = QUANTS[quant_name]
    if quant.base not in FALLBACK:
        return None
    fell_back = type_counts.get(FALLBACK[quant.base], 0)
    wanted = sum(n for kind, n in type_counts.items() if kind not in ("F32", "F16", "BF16"))
    if not fell_back:
        return None
    return (f"{quant_name}: {fell_back} of {wanted} quantized tensors use {FALLBACK[quant.base]} instead of "
            f"{quant.base}, because their rows are not a multiple of {QK_K} wide; expected for this model, "
            "and the file is larger than a K-quant would be")


def count_types(tensor_types: list[str]) -> dict[str, int]:
    return dict(Counter(tensor_types).most_common())
