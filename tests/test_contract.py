"""One chat-template contract: derived from the training tokenizer, it reproduces the Jinja template
exactly, and the Ollama Modelfile's Go template (read back here with Go's semantics for the few
constructs it uses) renders the same prompt."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from appliance import templating
from appliance.export import modelfile

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Answer with one label."}, {"role": "user", "content": "VPN down\n  again"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Any:
    from appliance.templating import load_tokenizer

    return load_tokenizer(default_model_dir)


def _go_render(template: str, system: str, messages: list[dict[str, str]]) -> str:
    """Ollama's rendering of the template we emit: SYSTEM becomes the first message when the
    conversation has none; then each message goes through the branch of its role."""
    body, tail = re.fullmatch(r"\{\{ range \.Messages \}\}(.*)\{\{ end \}\}\{\{ end \}\}(.*)", template, re.S).groups()
    branches = dict((role, (pre, post)) for role, pre, post in re.findall(
        r'\{\{ (?:if|else if) eq \.Role "(\w+)" \}\}(.*?)\{\{ \.Content \}\}(.*?)(?=\{\{ else if|\Z)', body, re.S))
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return "".join(branches[m["role"]][0] + m["content"] + branches[m["role"]][1] for m in messages) + tail


def test_contract_of_the_default_model(tokenizer: Any) -> None:
    contract = templating.contract(tokenizer, system="Classify.", task="classification", labels=["a", "b"])
    assert contract.eos_token == "<|im_end|>" and contract.eos_id == 2
    assert contract.stop_tokens == ["<|im_end|>"] and contract.stop_ids == [2]
    assert contract.turns is not None
    assert contract.turns["user"].prefix == "<|im_start|>user\n"
    assert contract.turns["assistant"].suffix == "<|im_end|>\n"
    assert contract.generation_prompt == "<|im_start|>assistant\n"
    assert contract.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert contract.render(messages) == expected


def test_modelfile_renders_what_the_jinja_template_renders(tokenizer: Any) -> None:
    contract = templating.contract(tokenizer, system="Classify the ticket.", task="classification")
    text = modelfile.modelfile(contract, "m-Q4_K_M.gguf", 4096)
    assert text.startswith("FROM ./m-Q4_K_M.gguf\n")
    assert 'SYSTEM """Classify the ticket."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_ctx 4096" in text
    assert "PARAMETER temperature 0" in text  # a classifier answers deterministically
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    for messages in CONVERSATIONS:
        with_system = messages if messages[0]["role"] == "system" else [
            {"role": "system", "content": "Classify the ticket."}, *messages]
        expected = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
        assert _go_render(template, "Classify the ticket.", messages) == expected


def test_a_template_that_is_not_a_sequence_of_turns_has_no_go_template(tokenizer: Any) -> None:
    """Llama-2 style: the system prompt is folded into the first user turn. No per-role wrapping
    reproduces it, so the Modelfile leaves the template to the GGUF instead of getting it wrong."""
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
        "{% elif m['role'] == 'user' %}[INST] {% if loop.index0 == 1 %}<<SYS>>{{ sys }}<</SYS>> {% endif %}"
        "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}<|im_end|>{% endif %}{% endfor %}")
    try:
        contract = templating.contract(tokenizer)
    finally:
        del tokenizer.chat_template  # back to the file's template for the other tests
    assert contract.turns is None and modelfile.go_template(contract) is None
    text = modelfile.modelfile(contract, "m.gguf", 2048)
    assert "TEMPLATE" not in text.replace("# The chat template", "") and 'PARAMETER stop "<|im_end|>"' in text


def test_shared_system_prompt() -> None:
    rows = [[{"role": "system", "content": "S"}, {"role": "user", "content": str(i)}] for i in range(3)]
    assert templating.shared_system_prompt(rows) == "S"
    rows.append([{"role": "user", "content": "no system"}])
    assert templating.shared_system_prompt(rows) is None
    assert templating.shared_system_prompt([]) is None
