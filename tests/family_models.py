"""Tiny random-weight models of each family, with the family's own chat template and special tokens.

No PyPI package ships the real families' tokenizers, so each family's tokenizer is built here, offline:
- the BPE families (Llama 3, Mistral, Qwen 2.5, Qwen 3, Gemma 3, Phi-3) take a copy of the default model's
  byte-level BPE and rename its first added tokens to the family's special tokens (same ids, so the weights'
  shapes stay those of SHAPE, and llama.cpp's converter still recognises the BPE pre-tokenizer by its hash,
  but for Qwen2.5's, which the export names);
- Gemma 2's converter reads only a SentencePiece `tokenizer.model`: one is trained here on a few lines
  (byte fallback, so every script still tokenizes), with Gemma's special-token ids and its turn markers as
  special tokens, and written as the Hugging Face tokenizer too, with tokenizer_config.json listing the
  special tokens as Gemma's does (the converter reads their types there).
The chat templates are the families' own (their tool-calling branches left out)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHAPE = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False}

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{- raise_exception('After the optional system "
    "message, conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}{%- endif %}{%- endfor %}")
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == 'user') or (message.role == "
    "'system' and not loop.first) or (message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\n' + "
    "message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
QWEN3 = (  # the last answer after the last question carries its (here empty) reasoning block
    "{%- set ns = namespace(last_query=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- if message.role == 'system' and loop.first %}"
    "{{- '<|im_start|>system\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'user' %}{{- '<|im_start|>user\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1]"
    ".lstrip('\n') %}{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}{{- '<|im_start|>assistant\n<think>\n' + "
    "reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}{%- else %}{{- '<|im_start|>assistant\n' + "
    "content }}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- if enable_thinking is defined and "
    "enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}")
GEMMA = (  # Gemma has no system role: the system prompt opens the first user turn
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] | trim "
    "+ '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


@dataclass(frozen=True)
class Family:
    config_class: str
    model_class: str
    architecture: str  # the GGUF architecture llama.cpp's converter writes
    template: str
    specials: tuple[str, ...]  # added tokens from id 0 on; id 1 is the BOS and id 2 the EOS of SHAPE
    bos: str | None
    eos: str
    extra: dict[str, Any] = field(default_factory=dict)  # config beyond SHAPE
    normal: tuple[str, ...] = ()  # added tokens the tokenizer does not treat as special
    sentencepiece: bool = False
    pre: str | None = None  # the export's --pre-tokenizer, for a tokenizer whose hash the converter does not know
    tokenizer_class: str | None = None  # as tokenizer_config.json names it, when the converter reads that


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", "LlamaForCausalLM", "llama", LLAMA3,
                    ("<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
                    "<|begin_of_text|>", "<|eot_id|>", {"tie_word_embeddings": True, "rope_scaling": {
                        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 256}}),  # Llama 3.1+: the converter adds rope_freqs
    "mistral": Family("MistralConfig", "MistralForCausalLM", "llama", MISTRAL, ("<unk>", "<s>", "</s>"), "<s>", "</s>"),
    # transformers reads a qwen2 tokenizer with Qwen's own pre-tokenizer (not the file's), so the default model's
    # vocabulary split that way has a hash of its own: the export names llama.cpp's "qwen2", as a user would
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", "qwen2", QWEN25, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                    None, "<|im_end|>", pre="qwen2"),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", "qwen3", QWEN3, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                    None, "<|im_end|>", normal=("<think>", "</think>")),
    "gemma2": Family("Gemma2Config", "Gemma2ForCausalLM", "gemma2", GEMMA,
                     ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
                     "<bos>", "<eos>", {"final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16,
                                        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
                                        "tie_word_embeddings": True}, sentencepiece=True),
    "gemma3": Family("Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3", GEMMA,
                     ("<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>",
                     {"query_pre_attn_scalar": 16, "pad_token_id": 0, "tie_word_embeddings": True}),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", "phi3", PHI3,
                   ("<|endoftext|>", "<|system|>", "<|end|>", "<|user|>", "<|assistant|>"), "<|endoftext|>", "<|end|>",
                   {"bos_token_id": 0}, tokenizer_class="GPT2Tokenizer"),  # Phi-4-mini's BPE layout
}


def tiny(family: str, folder: Path, default_model_dir: Path) -> Path:
    """A random-weight model of `family` in bf16 (spread wide enough that its choices are clear), with the
    family's tokenizer and chat template beside it."""
    import torch
    import transformers

    spec = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, spec.config_class)(**{**SHAPE, **spec.extra}, initializer_range=0.2)
    getattr(transformers, spec.model_class)(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    _tokenizer(spec, folder, default_model_dir)
    return folder


def tokenizer_only(family: str, folder: Path, default_model_dir: Path) -> Path:
    """The family's tokenizer and chat template, with the config whose model type picks transformers'
    tokenizer class (Qwen2's normalizes), and no weights."""
    import transformers

    spec = FAMILIES[family]
    getattr(transformers, spec.config_class)(**{**SHAPE, **spec.extra}).save_pretrained(folder)
    _tokenizer(spec, folder, default_model_dir)
    return folder


def _tokenizer(spec: Family, folder: Path, default_model_dir: Path) -> None:
    if spec.sentencepiece:
        _sentencepiece_tokenizer(spec, folder)
    else:
        _bpe_tokenizer(spec, folder, default_model_dir)


def _bpe_tokenizer(spec: Family, folder: Path, default_model_dir: Path) -> None:
    """The default model's BPE with its first added tokens renamed to the family's special tokens."""
    data = json.loads((default_model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    names = [*spec.specials, *spec.normal]
    renamed = {}
    for token_id, name in enumerate(names):
        entry = data["added_tokens"][token_id]
        renamed[entry["content"]] = name
        entry.update(content=name, special=name in spec.specials)
    data["model"]["vocab"] = {renamed.get(k, k): v for k, v in data["model"]["vocab"].items()}
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.eos, unk_token=spec.specials[0],
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, unk_token_id=None)
    if spec.tokenizer_class:
        config["tokenizer_class"] = spec.tokenizer_class
    _write_config(folder, config, spec)


def _write_config(folder: Path, config: dict[str, Any], spec: Family) -> None:
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    (folder / "chat_template.jinja").write_text(spec.template, encoding="utf-8")


CORPUS = Path(__file__).resolve().parents[1] / "README.md"


def _sentencepiece_tokenizer(spec: Family, folder: Path) -> None:
    """A SentencePiece BPE trained on the project's README (Gemma's layout: pad, eos, bos, unk, then the turn
    markers as user-defined pieces), as `tokenizer.model` and as the Hugging Face tokenizer built from it."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    pad, eos, bos, unk, *turns = spec.specials
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), model_type="bpe", vocab_size=1000,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=pad, eos_piece=eos, bos_piece=bos, unk_piece=unk,
        user_defined_symbols=[*turns, *spec.normal], minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    extracted = SentencePieceExtractor(str(folder / "tokenizer.model")).extract(None)
    tokenizer = GemmaTokenizer(vocab=extracted["vocab"], merges=extracted["merges"], pad_token=pad, eos_token=eos,
                               bos_token=bos, unk_token=unk, mask_token=unk, add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": turns})  # as Gemma's own tokenizer has them
    tokenizer.chat_template = spec.template
    tokenizer.save_pretrained(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {  # as Gemma's own tokenizer_config.json lists them (the converter reads it)
        str(token_id): {"content": name, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for token_id, name in enumerate(spec.specials)}
    _write_config(folder, config, spec)
