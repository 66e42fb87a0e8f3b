"""Every family's chat template as the contract carries it (tests/family_models.py builds the tokenizers, no
weights): the contract's plain-text turns render what the Jinja template renders, training marks exactly
the answers and their end-of-turn token, and the Ollama Modelfile's Go template writes the same prompt."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from family_models import FAMILIES, tokenizer_only

from appliance import templating
from appliance.export import modelfile

SYSTEM = {"role": "system", "content": "Be brief."}
TALK = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": "Rome."}]
CONVERSATIONS = [TALK[:1], TALK[:3], TALK, [SYSTEM, *TALK[:1]], [SYSTEM, *TALK[:3]], [SYSTEM, *TALK]]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("family-tokenizers")
    return {family: templating.load_tokenizer(tokenizer_only(family, root / family, default_model_dir))
            for family in sorted(FAMILIES)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_contract_renders_what_the_template_renders(family: str, tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers[family]
    contract = templating.contract(tokenizer)
    assert contract.turns is not None
    for messages in CONVERSATIONS:
        for asked in (True, False):
            assert contract.render(messages, asked) == templating.render(tokenizer, messages, asked), (messages, asked)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_marks_the_answers_and_their_end_of_turn(family: str, tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers[family]
    stop = STOP[family]
    for messages in ([SYSTEM, *TALK], TALK):
        text, spans = templating.trained_spans(tokenizer, messages)
        thinking = "<think>\n\n</think>\n\n" if family == "qwen3" else ""  # Qwen3's last answer opens its reasoning
        lead = " " if family == "mistral" else ""  # Mistral's answer opens with the space after [/INST]
        assert [text[a:b] for a, b in spans] == [f"{lead}Paris.{stop}", f"{lead}{thinking}Rome.{stop}"]
        ids, trained = templating.encode(tokenizer, messages)
        kept = tokenizer.decode([t for t, keep in zip(ids, trained, strict=True) if keep])
        assert kept.replace(" ", "") == f"Paris.{stop}{thinking}Rome.{stop}".replace(" ", "")


STOP = {"llama": "<|eot_id|>", "mistral": "</s>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>",
        "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "phi3": "<|end|>"}
STOPS = {**{family: [stop] for family, stop in STOP.items()}, "gemma2": ["<eos>", "<end_of_turn>"],
         "gemma3": ["<eos>", "<end_of_turn>"]}
GO = {  # Gemma 2's tokenizer adds its BOS itself (the runtime does too); the tiny BPE families' do not
    "llama": ('<|begin_of_text|>{{ range .Messages }}'
              '{{ if eq .Role "system" }}<|start_header_id|>system<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
              '{{ else if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
              '{{ else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>\n\n'
              '{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n'),
    "mistral": ('<s>{{ $folded := false }}{{ range .Messages }}{{ if eq .Role "user" }} [INST] '
                '{{ if and $.System (not $folded) }}{{ $.System }}\n\n{{ end }}{{ $folded = true }}'
                '{{ .Content }} [/INST]{{ else if eq .Role "assistant" }} {{ .Content }}</s>{{ end }}{{ end }}'),
    "qwen2": ('{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
              '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
              '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}'
              '{{ end }}<|im_start|>assistant\n'),
    "qwen3": ('{{ range $i, $_ := .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n'
              '{{ .Content }}<|im_end|>\n{{ else if eq .Role "user" }}<|im_start|>user\n'
              '{{ .Content }}<|im_end|>\n{{ else if eq .Role "assistant" }}'
              '{{ if eq (len (slice $.Messages $i)) 1 }}<|im_start|>assistant\n<think>\n\n</think>\n\n'
              '{{ else }}<|im_start|>assistant\n{{ end }}{{ .Content }}<|im_end|>\n{{ end }}'
              '{{ end }}<|im_start|>assistant\n'),
    "gemma2": ('{{ $folded := false }}{{ range .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n'
               '{{ if and $.System (not $folded) }}{{ $.System }}\n\n{{ end }}{{ $folded = true }}'
               '{{ .Content }}<end_of_turn>\n{{ else if eq .Role "assistant" }}<start_of_turn>model\n'
               '{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n'),
    "gemma3": ('<bos>{{ $folded := false }}{{ range .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n'
               '{{ if and $.System (not $folded) }}{{ $.System }}\n\n{{ end }}{{ $folded = true }}'
               '{{ .Content }}<end_of_turn>\n{{ else if eq .Role "assistant" }}<start_of_turn>model\n'
               '{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n'),
    "phi3": ('{{ range .Messages }}{{ if eq .Role "system" }}<|system|>\n{{ .Content }}<|end|>\n'
             '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n'
             '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}<|end|>\n{{ end }}'
             '{{ end }}<|assistant|>\n'),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_modelfile_follows_the_contract(family: str, tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers[family]
    contract = templating.contract(tokenizer)
    text = modelfile.modelfile(contract, "m.gguf", 512)
    assert re.findall(r"^PARAMETER stop (.*)$", text, re.M) == [f'"{s}"' for s in STOPS[family]]
    template = modelfile.go_template(contract)
    assert template == GO[family]
    assert f'TEMPLATE """{template}"""' in text
    lead = contract.lead if contract.lead_added else ""
    for messages in CONVERSATIONS:
        if messages[-1]["role"] == "assistant":
            continue  # Ollama renders prompts: the conversation ends with a question
        expected = templating.render(tokenizer, messages, True)
        if contract.default_system is not None and messages[0]["role"] != "system":  # Ollama adds SYSTEM
            messages = [{"role": "system", "content": contract.default_system}, *messages]
        assert lead + go_render(template, messages) == expected, messages


def go_render(template: str, messages: list[dict[str, str]]) -> str:
    """Ollama's rendering of the few Go template constructs `go_template` writes: .Messages, .Role, .Content,
    $.System (the system messages), `if`/`else if`/`else`, `range`, variables, eq, and, not, len and slice."""
    pieces = re.split(r"(\{\{.*?\}\})", template)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out: list[str] = []
    variables: dict[str, bool] = {}

    def condition(expr: str, message: dict[str, str], last: bool) -> bool:
        if m := re.fullmatch(r'eq \.Role "(\w+)"', expr):
            return message["role"] == m.group(1)
        if expr == "eq (len (slice $.Messages $i)) 1":
            return last
        if m := re.fullmatch(r"and \$\.System \(not \$(\w+)\)", expr):
            return bool(system) and not variables[m.group(1)]
        raise AssertionError(f"unknown condition {expr}")

    def run(at: int, message: dict[str, str], last: bool, emit: bool) -> int:
        """Runs the pieces from `at` to the `end` (or `else`) that closes the block; returns where it stopped."""
        taken = False
        while at < len(pieces):
            piece, at = pieces[at], at + 1
            action = piece[2:-2].strip() if piece.startswith("{{") else None
            if action is None:
                out.append(piece) if emit else None
            elif action in ("end", "else") or action.startswith("else if"):
                return at - 1
            elif action.startswith("range"):
                body = at
                for i, each in enumerate(messages):
                    at = run(body, each, i == len(messages) - 1, emit)
                at = run(body, message, last, False) + 1 if not messages else at + 1
            elif action.startswith("if "):
                branch = condition(action[3:], message, last)
                at = run(at, message, last, emit and branch)
                taken = branch
                while pieces[at][2:-2].strip() != "end":
                    action = pieces[at][2:-2].strip()
                    branch = not taken and (action == "else" or condition(action[8:], message, last))
                    at = run(at + 1, message, last, emit and branch)
                    taken = taken or branch
                at += 1
            elif m := re.fullmatch(r"\$(\w+) :?= (true|false)", action):
                if emit or ":=" in action:
                    variables[m.group(1)] = m.group(2) == "true"
            elif action == ".Content":
                out.append(message["content"]) if emit else None
            elif action == "$.System":
                out.append(system) if emit else None
            else:
                raise AssertionError(f"unknown action {action}")
        return at

    run(0, {"role": "", "content": ""}, False, True)
    return "".join(out)


def test_served_messages_are_normalized_as_the_tokenizer_normalizes(tokenizers: dict[str, Any]) -> None:
    """Qwen's tokenizer puts text in NFC before splitting it and llama.cpp does not: the appliance's chat and
    endpoint render what llama.cpp will split with the text already in NFC, so it splits as in training."""
    from appliance.serve.model import ServedModel, formatter

    contract = templating.contract(tokenizers["qwen2"])
    assert contract.normalization == "NFC"
    assert templating.contract(tokenizers["qwen3"]).normalization is None
    served = ServedModel(path=Path("m.gguf"), name="m", sha256="", contract=contract)
    prompt = formatter(served, None)(messages=[{"role": "user", "content": "cafe\u0301"}]).prompt
    assert "caf\u00e9" in prompt and "e\u0301" not in prompt
