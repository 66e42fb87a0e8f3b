"""Families beyond Llama. The merged model run a module at a time (`streamed`, what the gate asks the merged
model with) gives the plain forward's choices for tiny random-weight models of each family's layout: Llama
with tied embeddings, Mistral, Qwen2 (attention biases), Qwen3 (query/key norms), Gemma 2 (soft-capped
logits, scaled embeddings), Gemma 3 and Phi-3 (fused projections). A family that converts with the default
model's tokenizer (the Llama architecture: Mistral) goes through the converter and every check of the gate,
and a GGUF that claims another family's architecture is caught. (Qwen, Gemma and Phi need their own
tokenizers to convert: llama.cpp's converter recognises a BPE tokenizer by its pre-tokenizer.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from appliance import gguf_meta, templating, toolchain
from appliance.export import gate

SHAPE = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False}
FAMILIES: dict[str, tuple[str, str, str, dict[str, Any]]] = {  # config class, model class, GGUF architecture
    "llama": ("LlamaConfig", "LlamaForCausalLM", "llama", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "llama", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "gemma2", {"final_logit_softcapping": 30.0,
                                                                "query_pre_attn_scalar": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3", {"query_pre_attn_scalar": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "phi3", {}),
}
PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}]]


def _tiny(family: str, folder: Path, default_model_dir: Path) -> Path:
    """A random-weight model of `family` in bf16 (spread wide enough that its choices are clear), with the
    default model's tokenizer files beside it."""
    import torch
    import transformers

    config_class, model_class, _arch, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**SHAPE, **extra}, initializer_range=0.2)
    getattr(transformers, model_class)(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_model_dir / name, folder / name)
    return folder


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_model_run_a_module_at_a_time_chooses_what_the_plain_forward_does(family: str, default_model_dir: Path,
                                                                               tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from appliance import streamed

    model_dir = _tiny(family, tmp_path / family, default_model_dir)
    assert gguf_meta.expected_architecture(json.loads((model_dir / "config.json").read_text())) == FAMILIES[family][2]
    sequences = [[1, 9690, 198, 2683, 359, 253, 5356, 2, 30, 31], [5, 6, 7, 8, 9]]
    starts = [3, 2]
    chosen = streamed.top2(model_dir, sequences, starts)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for sequence, start, top in zip(sequences, starts, chosen, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[0, start - 1: len(sequence) - 1]
        best = torch.topk(logits, 2, dim=-1)
        assert top.tokens == best.indices[:, 0].tolist()
        assert top.margins == pytest.approx((best.values[:, 0] - best.values[:, 1]).tolist(), abs=1e-3)


@pytest.mark.parametrize("family", ["mistral"])
def test_a_family_converts_to_its_architecture_and_passes_the_gate(family: str, default_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    model_dir = _tiny(family, tmp_path / family, default_model_dir)
    expected = gguf_meta.expected_architecture(json.loads((model_dir / "config.json").read_text()))
    gguf = tmp_path / f"{family}-F16.gguf"
    toolchain.convert_to_gguf(model_dir, gguf, "f16")
    tokenizer = templating.load_tokenizer(model_dir)
    contract = templating.contract(tokenizer)
    reference = gate.build_reference(gguf, model_dir, tokenizer, contract, PROMPTS, [], n_ctx=512)
    report = gate.verify_file(gguf, "F16", reference, contract, expected, reference.tensor_count, 512,
                              required_agreement=True)
    statuses = {c.name: c.status for c in report.checks}
    assert statuses == {"architecture": "pass", "tensor count": "pass", "chat template": "pass",
                        "special tokens": "pass", "tokenization": "pass", "added special tokens": "pass",
                        "end-of-turn tokens": "pass", "greedy parity": "pass", "stops": "warn"}, report.checks
    assert reference.merged_agreement > 0.9  # random weights: the few differences are near-ties

    planted = tmp_path / f"{family}-claims-gemma2.gguf"
    gguf_meta.rewrite(gguf, planted, {"general.architecture": "gemma2"})
    checks = gate.check_metadata(gguf_meta.read(planted), contract, expected, reference.tensor_count)
    architecture = next(c for c in checks if c.name == "architecture")
    assert architecture.status == "fail" and f"gemma2, expected {expected}" in architecture.detail
